package transformer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
)

// Family is the architecture family of a model. Each family has its own
// forward pass; everything else (cache, alignment, evaluation) is shared.
type Family int

const (
	// GPT2: learned absolute positions, LayerNorm, gelu_new MLP, biases
	// everywhere (HF GPT2LMHeadModel; distilgpt2 is one).
	GPT2 Family = iota + 1
	// Llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases
	// (HF LlamaForCausalLM; SmolLM2 is one).
	Llama
)

// String returns the HF model_type of the family.
func (f Family) String() string {
	switch f {
	case GPT2:
		return "gpt2"
	case Llama:
		return "llama"
	}
	return fmt.Sprintf("Family(%d)", int(f))
}

// Config is the part of an HF config.json the forward pass depends on, with
// HF defaults applied. Shape names follow the rest of the project: C channels,
// NH query heads, NKV key/value heads, HS head size.
type Config struct {
	Family    Family
	VocabSize int
	MaxPos    int // GPT-2 n_positions (rows of wpe); Llama max_position_embeddings
	C         int // hidden size: GPT-2 n_embd, Llama hidden_size
	NLayer    int
	NH, NKV   int // query heads, key/value heads (GPT-2: NKV = NH)
	HS        int // head size: Llama head_dim when given, else C/NH
	FFN       int // MLP inner size: GPT-2 n_inner (null → 4·C), Llama intermediate_size
	Eps       float32
	RopeTheta float64 // Llama RoPE base; 0 for GPT-2
	// TiedEmbeddings: the LM head is the token embedding (no lm_head tensor
	// needed). HF defaults differ: GPT2Config true, LlamaConfig false.
	TiedEmbeddings bool
	BOS, EOS       int // -1 when the config has none
}

// LoadConfig reads an HF config.json. path may also be a model directory
// holding config.json.
func LoadConfig(path string) (*Config, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		path = filepath.Join(path, "config.json")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read model config: %w", err)
	}
	return ParseConfig(data, path)
}

// ParseConfig parses the bytes of an HF config.json; name (usually the file
// path) prefixes every error. Settings that would change the arithmetic in
// ways the forward passes do not implement are refused by name rather than
// silently ignored, so a model that loads is a model that computes what HF
// computes.
func ParseConfig(data []byte, name string) (*Config, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("%s: not a JSON object: %w", name, err)
	}
	if raw == nil { // the JSON literal null
		return nil, fmt.Errorf("%s: not a JSON object", name)
	}
	r := &cfgReader{raw: raw, name: name}
	modelType, ok := r.str("model_type", "")
	if r.err != nil {
		return nil, r.err
	}
	if !ok {
		return nil, fmt.Errorf("%s: no model_type (want \"gpt2\" or \"llama\")", name)
	}
	var c *Config
	switch modelType {
	case "gpt2":
		c = cfgParseGPT2(r)
	case "llama":
		c = cfgParseLlama(r)
	default:
		return nil, fmt.Errorf("%s: model_type %q is not supported (want \"gpt2\" or \"llama\")", name, modelType)
	}
	if r.err != nil {
		return nil, r.err
	}
	c.BOS = r.tokenID("bos_token_id")
	c.EOS = r.tokenID("eos_token_id")
	if r.err != nil {
		return nil, r.err
	}
	if err := c.cfgValidate(name); err != nil {
		return nil, err
	}
	return c, nil
}

// cfgParseGPT2 reads a GPT2Config. Keys may use the HF attribute_map aliases
// (hidden_size for n_embd, …), which save_pretrained never writes but
// hand-written configs sometimes use.
func cfgParseGPT2(r *cfgReader) *Config {
	c := &Config{Family: GPT2}
	c.VocabSize = r.requiredInt("vocab_size")
	c.MaxPos = r.requiredInt("n_positions", "max_position_embeddings")
	c.C = r.requiredInt("n_embd", "hidden_size")
	c.NLayer = r.requiredInt("n_layer", "num_hidden_layers")
	c.NH = r.requiredInt("n_head", "num_attention_heads")
	c.NKV = c.NH
	if r.err == nil && c.NH > 0 {
		if c.C%c.NH != 0 {
			r.fail("n_embd %d is not divisible by n_head %d", c.C, c.NH)
		}
		c.HS = c.C / c.NH
	}
	if inner, ok := r.int("n_inner"); ok {
		c.FFN = inner
	} else {
		c.FFN = 4 * c.C
	}
	c.Eps = float32(r.float("layer_norm_epsilon", 1e-5))
	c.TiedEmbeddings = r.boolean("tie_word_embeddings", true)

	// gelu_pytorch_tanh is the same tanh approximation as gelu_new.
	if act, _ := r.str("activation_function", "gelu_new"); act != "gelu_new" && act != "gelu_pytorch_tanh" {
		r.fail("activation_function %q is not supported (want \"gelu_new\")", act)
	}
	if !r.boolean("scale_attn_weights", true) {
		r.fail("scale_attn_weights false is not supported (attention always scales by 1/sqrt(head size))")
	}
	for _, key := range []string{"scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"} {
		if r.boolean(key, false) {
			r.fail("%s true is not supported", key)
		}
	}
	return c
}

// cfgParseLlama reads a LlamaConfig, in both the transformers 4 form
// (top-level rope_theta, rope_scaling) and the transformers 5 form
// (rope_parameters: {rope_type, rope_theta}).
func cfgParseLlama(r *cfgReader) *Config {
	c := &Config{Family: Llama}
	c.VocabSize = r.requiredInt("vocab_size")
	c.C = r.requiredInt("hidden_size")
	c.NLayer = r.requiredInt("num_hidden_layers")
	c.NH = r.requiredInt("num_attention_heads")
	c.FFN = r.requiredInt("intermediate_size")
	if pos, ok := r.int("max_position_embeddings"); ok {
		c.MaxPos = pos
	} else {
		c.MaxPos = 2048 // LlamaConfig default
	}
	if kv, ok := r.int("num_key_value_heads"); ok {
		c.NKV = kv
	} else {
		c.NKV = c.NH // HF: absent means multi-head attention
	}
	if hs, ok := r.int("head_dim"); ok {
		c.HS = hs
	} else if r.err == nil && c.NH > 0 {
		if c.C%c.NH != 0 {
			r.fail("hidden_size %d is not divisible by num_attention_heads %d (and no head_dim is given)", c.C, c.NH)
		}
		c.HS = c.C / c.NH
	}
	c.Eps = float32(r.float("rms_norm_eps", 1e-6))
	c.TiedEmbeddings = r.boolean("tie_word_embeddings", false)

	// HF ACT2FN maps both names to SiLU.
	if act, _ := r.str("hidden_act", "silu"); act != "silu" && act != "swish" {
		r.fail("hidden_act %q is not supported (want \"silu\")", act)
	}
	for _, key := range []string{"attention_bias", "mlp_bias"} {
		if r.boolean(key, false) {
			r.fail("%s true is not supported", key)
		}
	}
	// pretraining_tp > 1 only splits the same matmuls into slices and sums
	// them (HF LlamaMLP), so it changes nothing but rounding and is ignored.
	// rope_interleaved (a nanotron key in SmolLM2's config) is ignored by HF
	// too, and so here.

	c.RopeTheta = r.float("rope_theta", 10000)
	if scaling, ok := r.raw["rope_scaling"]; ok && !cfgIsNull(scaling) {
		r.fail("rope_scaling %s is not supported (only plain RoPE)", cfgCompact(scaling))
	}
	if params, ok := r.raw["rope_parameters"]; ok && !cfgIsNull(params) {
		var rp map[string]json.RawMessage
		if err := json.Unmarshal(params, &rp); err != nil || rp == nil {
			r.fail("rope_parameters: want a JSON object, got %s", cfgCompact(params))
		} else {
			sub := &cfgReader{raw: rp, name: r.name, prefix: "rope_parameters."}
			if typ, _ := sub.str("rope_type", "default"); typ != "default" {
				sub.fail("rope_type %q is not supported (only \"default\" RoPE)", typ)
			}
			c.RopeTheta = sub.float("rope_theta", c.RopeTheta)
			if sub.err != nil && r.err == nil {
				r.err = sub.err
			}
		}
	}
	return c
}

// cfgValidate checks the sizes every later allocation and loop relies on.
// LoadWeights calls it too, so a hand-built Config gets an error, not a panic.
func (c *Config) cfgValidate(name string) error {
	if c == nil {
		return fmt.Errorf("%s: no model config", name)
	}
	if c.Family != GPT2 && c.Family != Llama {
		return fmt.Errorf("%s: unknown model family %v", name, c.Family)
	}
	sizes := []struct {
		what string
		v    int
	}{
		{"vocab size", c.VocabSize}, {"max positions", c.MaxPos}, {"hidden size", c.C},
		{"layer count", c.NLayer}, {"query head count", c.NH}, {"key/value head count", c.NKV},
		{"head size", c.HS}, {"MLP inner size", c.FFN},
	}
	for _, s := range sizes {
		if s.v <= 0 {
			return fmt.Errorf("%s: %s must be positive, got %d", name, s.what, s.v)
		}
		// Products of sizes index slices; keep them far from overflow.
		if s.v > 1<<24 {
			return fmt.Errorf("%s: %s %d is implausibly large", name, s.what, s.v)
		}
	}
	if c.NH%c.NKV != 0 {
		return fmt.Errorf("%s: query head count %d is not divisible by key/value head count %d", name, c.NH, c.NKV)
	}
	if c.Family == GPT2 && c.NH*c.HS != c.C {
		return fmt.Errorf("%s: GPT-2 needs head count × head size = hidden size, got %d×%d ≠ %d", name, c.NH, c.HS, c.C)
	}
	if !(c.Eps > 0) || math.IsInf(float64(c.Eps), 0) {
		return fmt.Errorf("%s: norm epsilon must be positive and finite, got %v", name, c.Eps)
	}
	if c.Family == Llama && (!(c.RopeTheta > 0) || math.IsInf(c.RopeTheta, 0)) {
		return fmt.Errorf("%s: rope_theta must be positive and finite, got %v", name, c.RopeTheta)
	}
	// Estimated in float64 so that absurd sizes cannot overflow the int
	// arithmetic of ParamCount and the weight allocation.
	perLayer := float64(c.NH+2*c.NKV)*float64(c.HS)*float64(c.C) + float64(c.C)*float64(c.NH*c.HS) +
		3*float64(c.FFN)*float64(c.C) + 8*float64(c.C)
	estimate := float64(c.NLayer)*perLayer + float64(c.VocabSize+c.MaxPos+2)*float64(c.C)*2
	if estimate > 1<<40 {
		return fmt.Errorf("%s: about %.3g parameters is implausibly many", name, estimate)
	}
	return nil
}

// ParamCount is the number of model parameters, the tied embedding counted
// once, as HF's model.num_parameters() reports it.
func (c *Config) ParamCount() int {
	n := 0
	for _, size := range wTensorSizes(c) {
		n += size
	}
	return n
}

// cfgReader reads typed values out of a decoded JSON object; the first error
// sticks (as bufio.Writer's does) so the parsers read straight through.
type cfgReader struct {
	raw    map[string]json.RawMessage
	name   string
	prefix string // for keys of nested objects, e.g. "rope_parameters."
	err    error
}

func (r *cfgReader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf("%s: %s", r.name, fmt.Sprintf(format, args...))
	}
}

// lookup returns the first of keys present and not null.
func (r *cfgReader) lookup(keys ...string) (string, json.RawMessage, bool) {
	for _, k := range keys {
		if v, ok := r.raw[k]; ok && !cfgIsNull(v) {
			return k, v, true
		}
	}
	return keys[0], nil, false
}

// int reads an integer; JSON numbers with an integral value (1024.0) count.
func (r *cfgReader) int(keys ...string) (int, bool) {
	key, v, ok := r.lookup(keys...)
	if !ok {
		return 0, false
	}
	var f float64
	if err := json.Unmarshal(v, &f); err != nil || f != math.Trunc(f) || math.Abs(f) > 1<<53 {
		r.fail("%s%s: want an integer, got %s", r.prefix, key, cfgCompact(v))
		return 0, false
	}
	return int(f), true
}

func (r *cfgReader) requiredInt(keys ...string) int {
	v, ok := r.int(keys...)
	if !ok && r.err == nil {
		r.fail("missing %s%s", r.prefix, keys[0])
	}
	return v
}

func (r *cfgReader) float(key string, def float64) float64 {
	_, v, ok := r.lookup(key)
	if !ok {
		return def
	}
	var f float64
	if err := json.Unmarshal(v, &f); err != nil {
		r.fail("%s%s: want a number, got %s", r.prefix, key, cfgCompact(v))
		return def
	}
	return f
}

func (r *cfgReader) boolean(key string, def bool) bool {
	_, v, ok := r.lookup(key)
	if !ok {
		return def
	}
	var b bool
	if err := json.Unmarshal(v, &b); err != nil {
		r.fail("%s%s: want true or false, got %s", r.prefix, key, cfgCompact(v))
		return def
	}
	return b
}

// str returns the string at key, or def and false when absent or null.
func (r *cfgReader) str(key string, def string) (string, bool) {
	_, v, ok := r.lookup(key)
	if !ok {
		return def, false
	}
	var s string
	if err := json.Unmarshal(v, &s); err != nil {
		r.fail("%s%s: want a string, got %s", r.prefix, key, cfgCompact(v))
		return def, false
	}
	return s, true
}

// tokenID reads bos_token_id/eos_token_id: absent or null → -1. A list (as
// Llama 3 configs give for eos) yields its first id, the one generation
// stops on in the common case.
func (r *cfgReader) tokenID(key string) int {
	_, v, ok := r.lookup(key)
	if !ok {
		return -1
	}
	var list []json.RawMessage
	if json.Unmarshal(v, &list) == nil {
		if len(list) == 0 {
			return -1
		}
		v = list[0]
	}
	sub := &cfgReader{raw: map[string]json.RawMessage{key: v}, name: r.name, prefix: r.prefix}
	id, _ := sub.int(key)
	if sub.err == nil && id < 0 {
		sub.fail("%s%s: token id must not be negative, got %d", r.prefix, key, id)
	}
	if sub.err != nil {
		if r.err == nil {
			r.err = sub.err
		}
		return -1
	}
	return id
}

func cfgIsNull(v json.RawMessage) bool {
	return string(bytes.TrimSpace(v)) == "null"
}

// cfgCompact renders a JSON value for an error message, cut short when long.
func cfgCompact(v json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, v) != nil {
		b.Reset()
		b.Write(v)
	}
	s := b.String()
	if len(s) > 80 {
		s = s[:77] + "..."
	}
	return s
}
