package transformer

import (
	"encoding/json"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kvalign/kvalign/internal/testenv"
)

// wTestConfig parses a config edited from a base.
func wTestConfig(t *testing.T, m map[string]any) *Config {
	t.Helper()
	data, _ := json.Marshal(m)
	c, err := ParseConfig(data, "test")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// wTestTinyConfigs covers both families, tied and untied, and a Llama whose
// head_dim·NH differs from the hidden size.
func wTestTinyConfigs(t *testing.T) map[string]*Config {
	gpt2 := map[string]any{"model_type": "gpt2", "vocab_size": 37, "n_positions": 11, "n_embd": 12,
		"n_layer": 2, "n_head": 3, "n_inner": 20}
	llama := map[string]any{"model_type": "llama", "vocab_size": 37, "hidden_size": 12, "num_hidden_layers": 2,
		"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 5, "intermediate_size": 18, "tie_word_embeddings": true}
	out := map[string]*Config{"gpt2-tied": wTestConfig(t, gpt2), "llama-tied": wTestConfig(t, llama)}
	gpt2["tie_word_embeddings"] = false
	llama["tie_word_embeddings"] = false
	out["gpt2-untied"] = wTestConfig(t, gpt2)
	out["llama-untied"] = wTestConfig(t, llama)
	return out
}

// wTestCheckSizes checks every tensor of w against the size table.
func wTestCheckSizes(t *testing.T, c *Config, w *Weights) {
	t.Helper()
	if len(w.Layers) != c.NLayer {
		t.Fatalf("%d layers, want %d", len(w.Layers), c.NLayer)
	}
	total := 0
	for i, s := range wSlots(c, w) {
		if len(*s.dst) != s.n {
			t.Errorf("tensor %d: %d floats, want %d", i, len(*s.dst), s.n)
		}
		total += s.n
	}
	if total != c.ParamCount() {
		t.Errorf("%d floats, ParamCount %d", total, c.ParamCount())
	}
	if len(w.LMHead) != c.VocabSize*c.C {
		t.Errorf("LMHead %d floats, want %d", len(w.LMHead), c.VocabSize*c.C)
	}
	if tiedShared := &w.LMHead[0] == &w.Wte[0]; tiedShared != c.TiedEmbeddings {
		t.Errorf("LMHead shares Wte: %v, tied: %v", tiedShared, c.TiedEmbeddings)
	}
	l := w.Layers[0]
	if gpt2 := c.Family == GPT2; (w.Wpe != nil) != gpt2 || (w.NormFB != nil) != gpt2 || (l.QKVB != nil) != gpt2 ||
		(l.Norm1B != nil) != gpt2 || (l.OB != nil) != gpt2 || (l.UpB != nil) != gpt2 || (l.DownB != nil) != gpt2 {
		t.Errorf("%v: bias/wpe presence wrong", c.Family)
	}
}

func TestLoadWeightsGPT2Fixture(t *testing.T) {
	dir := testenv.Shared(t, "models", "gutenberg-gpt2-7m")
	c, err := LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	w, err := LoadWeights(dir, c)
	if err != nil {
		t.Fatal(err)
	}
	wTestCheckSizes(t, c, w)

	s, err := OpenSafeTensors(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	raw := func(name string) []float32 {
		v, _, err := s.Float32(name)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	C, FFN := c.C, c.FFN
	// Conv1D [in, out] → canonical [out, in]: QKVW[o][i] = c_attn[i][o].
	cAttn := raw("transformer.h.3.attn.c_attn.weight")
	l := w.Layers[3]
	for _, oi := range [][2]int{{0, 0}, {1, 0}, {0, 1}, {C + 5, 17}, {3*C - 1, C - 1}, {2*C + 100, 200}} {
		o, i := oi[0], oi[1]
		if got, want := l.QKVW[o*C+i], cAttn[i*3*C+o]; got != want {
			t.Errorf("QKVW[%d][%d] = %v, c_attn[%d][%d] = %v", o, i, got, i, o, want)
		}
	}
	cProj := raw("transformer.h.3.mlp.c_proj.weight") // [FFN, C]
	if got, want := l.DownW[7*FFN+300], cProj[300*C+7]; got != want {
		t.Errorf("DownW[7][300] = %v, c_proj[300][7] = %v", got, want)
	}
	if !slices.Equal(l.QKVB, raw("transformer.h.3.attn.c_attn.bias")) || !slices.Equal(w.Wpe, raw("transformer.wpe.weight")) ||
		!slices.Equal(w.NormFB, raw("transformer.ln_f.bias")) || !slices.Equal(l.Norm2W, raw("transformer.h.3.ln_2.weight")) {
		t.Errorf("untransposed tensors differ from the checkpoint")
	}
	if w.Wte[5*C+9] != raw("transformer.wte.weight")[5*C+9] {
		t.Errorf("Wte differs from the checkpoint")
	}
	wTestAllFinite(t, w, c)
}

func TestLoadWeightsLlamaFixture(t *testing.T) {
	dir := testenv.Shared(t, "models", "gutenberg-llama-7m")
	c, err := LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	w, err := LoadWeights(filepath.Join(dir, "model.safetensors"), c)
	if err != nil {
		t.Fatal(err)
	}
	wTestCheckSizes(t, c, w)

	s, err := OpenSafeTensors(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	raw := func(name string) []float32 {
		v, _, err := s.Float32(name)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	C, FFN, q, kv := c.C, c.FFN, c.NH*c.HS, c.NKV*c.HS
	l := w.Layers[5]
	p := "model.layers.5."
	if !slices.Equal(l.QKVW[:q*C], raw(p+"self_attn.q_proj.weight")) ||
		!slices.Equal(l.QKVW[q*C:(q+kv)*C], raw(p+"self_attn.k_proj.weight")) ||
		!slices.Equal(l.QKVW[(q+kv)*C:], raw(p+"self_attn.v_proj.weight")) {
		t.Errorf("QKVW is not q_proj, k_proj, v_proj stacked")
	}
	if !slices.Equal(l.UpW[:FFN*C], raw(p+"mlp.gate_proj.weight")) || !slices.Equal(l.UpW[FFN*C:], raw(p+"mlp.up_proj.weight")) {
		t.Errorf("UpW is not gate_proj then up_proj")
	}
	if !slices.Equal(l.OW, raw(p+"self_attn.o_proj.weight")) || !slices.Equal(l.DownW, raw(p+"mlp.down_proj.weight")) ||
		!slices.Equal(w.NormFW, raw("model.norm.weight")) || !slices.Equal(w.Wte, raw("model.embed_tokens.weight")) {
		t.Errorf("o_proj/down_proj/norm/embedding differ from the checkpoint")
	}
	wTestAllFinite(t, w, c)
}

func wTestAllFinite(t *testing.T, w *Weights, c *Config) {
	t.Helper()
	for i, s := range wSlots(c, w) {
		for _, v := range *s.dst {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				t.Fatalf("tensor %d holds %v", i, v)
			}
		}
	}
}

func TestSaveLoadWeightsRoundTrip(t *testing.T) {
	for name, c := range wTestTinyConfigs(t) {
		t.Run(name, func(t *testing.T) {
			w := RandomWeights(c, 7)
			wTestCheckSizes(t, c, w)
			path := filepath.Join(t.TempDir(), "model.safetensors")
			if err := SaveWeights(path, c, w); err != nil {
				t.Fatal(err)
			}
			s, err := OpenSafeTensors(path)
			if err != nil {
				t.Fatal(err)
			}
			if s.Metadata()["format"] != "pt" {
				t.Errorf("metadata %v lacks format pt (transformers requires it)", s.Metadata())
			}
			_, hasHead := s.Info("lm_head.weight")
			s.Close()
			if hasHead == c.TiedEmbeddings {
				t.Errorf("lm_head.weight written: %v, tied: %v", hasHead, c.TiedEmbeddings)
			}
			got, err := LoadWeights(path, c)
			if err != nil {
				t.Fatal(err)
			}
			wTestEqual(t, c, got, w)
		})
	}
}

func wTestEqual(t *testing.T, c *Config, got, want *Weights) {
	t.Helper()
	gs, ws := wSlots(c, got), wSlots(c, want)
	for i := range gs {
		if !slices.Equal(*gs[i].dst, *ws[i].dst) {
			t.Fatalf("tensor %d differs after the round trip", i)
		}
	}
	if !slices.Equal(got.LMHead, want.LMHead) {
		t.Fatalf("LMHead differs")
	}
}

// wTestRewrite copies the checkpoint src to dst through edit.
func wTestRewrite(t *testing.T, src, dst string, edit func([]NamedTensor) []NamedTensor) {
	t.Helper()
	s, err := OpenSafeTensors(src)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var tensors []NamedTensor
	for _, name := range s.Names() {
		v, shape, err := s.Float32(name)
		if err != nil {
			t.Fatal(err)
		}
		tensors = append(tensors, NamedTensor{Name: name, Shape: shape, F32: v})
	}
	if err := WriteSafeTensors(dst, edit(tensors), s.Metadata()); err != nil {
		t.Fatal(err)
	}
}

func TestLoadWeightsBareNamesAndExtras(t *testing.T) {
	for _, name := range []string{"gpt2-untied", "llama-tied"} {
		c := wTestTinyConfigs(t)[name]
		dir := t.TempDir()
		w := RandomWeights(c, 1)
		full := filepath.Join(dir, "full.safetensors")
		if err := SaveWeights(full, c, w); err != nil {
			t.Fatal(err)
		}
		// GPT2Model/LlamaModel checkpoints drop the module prefix, and GPT-2
		// ones may carry the attn.bias/masked_bias buffers: both must load.
		bare := filepath.Join(dir, "bare.safetensors")
		wTestRewrite(t, full, bare, func(ts []NamedTensor) []NamedTensor {
			for i := range ts {
				ts[i].Name = strings.TrimPrefix(strings.TrimPrefix(ts[i].Name, "transformer."), "model.")
			}
			return append(ts,
				NamedTensor{Name: "h.0.attn.bias", Shape: []int{1, 1, 4, 4}, I64: make([]int64, 16)},
				NamedTensor{Name: "h.0.attn.masked_bias", Shape: []int{}, F32: []float32{-1e4}})
		})
		got, err := LoadWeights(bare, c)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		wTestEqual(t, c, got, w)
	}
}

func TestLoadWeightsRefuses(t *testing.T) {
	configs := wTestTinyConfigs(t)
	dir := t.TempDir()
	saved := map[string]string{}
	for name, c := range configs {
		saved[name] = filepath.Join(dir, name+".safetensors")
		if err := SaveWeights(saved[name], c, RandomWeights(c, 2)); err != nil {
			t.Fatal(err)
		}
	}
	drop := func(victim string) func([]NamedTensor) []NamedTensor {
		return func(ts []NamedTensor) []NamedTensor {
			return slices.DeleteFunc(ts, func(x NamedTensor) bool { return x.Name == victim })
		}
	}
	tests := []struct {
		name   string
		config string
		source string
		edit   func([]NamedTensor) []NamedTensor
		want   string
	}{
		{"missing tensor", "gpt2-tied", "gpt2-tied", drop("transformer.h.1.mlp.c_fc.bias"),
			`missing tensor "transformer.h.1.mlp.c_fc.bias", want shape [20]`},
		{"missing lm_head", "llama-untied", "llama-tied", nil, `missing tensor "lm_head.weight"`},
		{"wrong family", "gpt2-tied", "llama-tied", nil, "no gpt2 token embedding"},
		{"mis-shaped", "gpt2-tied", "gpt2-tied", func(ts []NamedTensor) []NamedTensor {
			for i := range ts {
				if ts[i].Name == "transformer.h.0.attn.c_attn.weight" {
					ts[i].Shape = []int{3 * 12, 12} // [out, in]: not transposed as Conv1D stores it
				}
			}
			return ts
		}, `"transformer.h.0.attn.c_attn.weight" has shape [36 12], want [12 36]`},
		{"config mismatch", "llama-tied", "llama-tied", func(ts []NamedTensor) []NamedTensor {
			return ts // loaded with a config of a different intermediate size below
		}, `"model.layers.0.mlp.gate_proj.weight" has shape [18 12], want [19 12]`},
		{"integer weight", "llama-tied", "llama-tied", func(ts []NamedTensor) []NamedTensor {
			for i := range ts {
				if ts[i].Name == "model.norm.weight" {
					ts[i].F32, ts[i].I64 = nil, make([]int64, 12)
				}
			}
			return ts
		}, `"model.norm.weight" has dtype I64`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := saved[tt.source]
			if tt.edit != nil {
				path = filepath.Join(t.TempDir(), "edited.safetensors")
				wTestRewrite(t, saved[tt.source], path, tt.edit)
			}
			c := *configs[tt.config]
			if tt.name == "config mismatch" {
				c.FFN = 19
			}
			_, err := LoadWeights(path, &c)
			if err == nil {
				t.Fatal("loaded")
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), path) {
				t.Errorf("error %q, want it to name %s and contain %q", err, path, tt.want)
			}
		})
	}
	bad := *configs["gpt2-tied"]
	bad.NH = 0
	if _, err := LoadWeights(saved["gpt2-tied"], &bad); err == nil || !strings.Contains(err.Error(), "must be positive") {
		t.Errorf("invalid config: err %v", err)
	}
	if _, err := LoadWeights(saved["gpt2-tied"], nil); err == nil {
		t.Errorf("nil config accepted")
	}
	if err := SaveWeights(filepath.Join(dir, "x.safetensors"), configs["llama-tied"], RandomWeights(configs["gpt2-tied"], 1)); err == nil {
		t.Errorf("SaveWeights accepted weights of another config")
	}
}

func TestRandomWeights(t *testing.T) {
	c := wTestTinyConfigs(t)["llama-untied"]
	a, b, other := RandomWeights(c, 3), RandomWeights(c, 3), RandomWeights(c, 4)
	wTestEqual(t, c, a, b)
	if slices.Equal(a.Wte, other.Wte) {
		t.Errorf("seeds 3 and 4 give the same embedding")
	}

	// Statistics on a config big enough to measure: matrices N(0, 0.02),
	// norm weights near 1, biases near 0.
	g := wTestConfig(t, map[string]any{"model_type": "gpt2", "vocab_size": 500, "n_positions": 64, "n_embd": 128,
		"n_layer": 1, "n_head": 4})
	w := RandomWeights(g, 11)
	mean, std := wTestMoments(w.Wte)
	if math.Abs(mean) > 0.002 || math.Abs(std-0.02) > 0.001 {
		t.Errorf("Wte mean %v std %v, want N(0, 0.02)", mean, std)
	}
	if mean, _ := wTestMoments(w.Layers[0].Norm1W); math.Abs(mean-1) > 0.05 {
		t.Errorf("Norm1W mean %v, want about 1", mean)
	}
	if mean, std := wTestMoments(w.Layers[0].UpB); math.Abs(mean) > 0.01 || std == 0 {
		t.Errorf("UpB mean %v std %v, want small noise", mean, std)
	}
}

func wTestMoments(x []float32) (mean, std float64) {
	for _, v := range x {
		mean += float64(v)
	}
	mean /= float64(len(x))
	for _, v := range x {
		std += (float64(v) - mean) * (float64(v) - mean)
	}
	return mean, math.Sqrt(std / float64(len(x)))
}

func BenchmarkRandomWeightsSmolLM2(b *testing.B) {
	c, err := LoadConfig(testenv.Shared(b, "reference", "configs", "smollm2-135m.config.json"))
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(c.ParamCount()) * 4)
	for b.Loop() {
		RandomWeights(c, 1)
	}
}

func BenchmarkLoadWeightsGPT2Fixture(b *testing.B) {
	dir := testenv.Shared(b, "models", "gutenberg-gpt2-7m")
	c, err := LoadConfig(dir)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(c.ParamCount()) * 4)
	for b.Loop() {
		if _, err := LoadWeights(dir, c); err != nil {
			b.Fatal(err)
		}
	}
}
