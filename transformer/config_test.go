package transformer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kvalign/kvalign/internal/testenv"
)

func TestParseConfigReferenceConfigs(t *testing.T) {
	shared := testenv.Shared(t)
	tests := []struct {
		path   string
		want   Config
		params int
	}{
		{
			// No tie_word_embeddings and no n_inner: GPT2Config defaults apply.
			"reference/configs/distilgpt2.config.json",
			Config{Family: GPT2, VocabSize: 50257, MaxPos: 1024, C: 768, NLayer: 6, NH: 12, NKV: 12, HS: 64,
				FFN: 3072, Eps: 1e-5, TiedEmbeddings: true, BOS: 50256, EOS: 50256},
			81912576, // HF distilgpt2 num_parameters()
		},
		{
			"reference/configs/smollm2-135m.config.json",
			Config{Family: Llama, VocabSize: 49152, MaxPos: 8192, C: 576, NLayer: 30, NH: 9, NKV: 3, HS: 64,
				FFN: 1536, Eps: 1e-5, RopeTheta: 100000, TiedEmbeddings: true, BOS: 0, EOS: 0},
			134515008, // HF SmolLM2-135M num_parameters()
		},
		{
			"models/gutenberg-gpt2-7m/config.json",
			Config{Family: GPT2, VocabSize: 8192, MaxPos: 1024, C: 256, NLayer: 6, NH: 4, NKV: 4, HS: 64,
				FFN: 1024, Eps: 1e-5, TiedEmbeddings: true, BOS: 0, EOS: 0},
			7098368, // training_report.json
		},
		{
			// transformers 5 form: rope_parameters {rope_theta, rope_type}.
			"models/gutenberg-llama-7m/config.json",
			Config{Family: Llama, VocabSize: 8192, MaxPos: 2048, C: 256, NLayer: 6, NH: 4, NKV: 2, HS: 64,
				FFN: 768, Eps: 1e-5, RopeTheta: 10000, TiedEmbeddings: true, BOS: 0, EOS: 0},
			6819072, // training_report.json
		},
	}
	for _, tt := range tests {
		t.Run(filepath.Base(tt.path), func(t *testing.T) {
			c, err := LoadConfig(filepath.Join(shared, tt.path))
			if err != nil {
				t.Fatal(err)
			}
			if *c != tt.want {
				t.Errorf("got  %+v\nwant %+v", *c, tt.want)
			}
			if got := c.ParamCount(); got != tt.params {
				t.Errorf("ParamCount = %d, want %d", got, tt.params)
			}
		})
	}
	// A model directory stands for its config.json.
	c, err := LoadConfig(filepath.Join(shared, "models/gutenberg-llama-7m"))
	if err != nil || c.Family != Llama {
		t.Errorf("LoadConfig(model dir) = %+v, %v", c, err)
	}
}

// cfgTestGPT2 and cfgTestLlama are minimal valid configs the cases edit.
func cfgTestGPT2() map[string]any {
	return map[string]any{"model_type": "gpt2", "vocab_size": 100, "n_positions": 32, "n_embd": 16,
		"n_layer": 2, "n_head": 4, "activation_function": "gelu_new"}
}

func cfgTestLlama() map[string]any {
	return map[string]any{"model_type": "llama", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2,
		"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40}
}

func cfgTestParse(t *testing.T, m map[string]any) (*Config, error) {
	t.Helper()
	data, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return ParseConfig(data, "test/config.json")
}

func TestParseConfigDefaults(t *testing.T) {
	c, err := cfgTestParse(t, cfgTestGPT2())
	if err != nil {
		t.Fatal(err)
	}
	want := Config{Family: GPT2, VocabSize: 100, MaxPos: 32, C: 16, NLayer: 2, NH: 4, NKV: 4, HS: 4, FFN: 64,
		Eps: 1e-5, TiedEmbeddings: true, BOS: -1, EOS: -1}
	if *c != want {
		t.Errorf("GPT-2 defaults: got %+v, want %+v", *c, want)
	}

	m := cfgTestLlama()
	delete(m, "num_key_value_heads")
	c, err = cfgTestParse(t, m)
	if err != nil {
		t.Fatal(err)
	}
	want = Config{Family: Llama, VocabSize: 100, MaxPos: 2048, C: 16, NLayer: 2, NH: 4, NKV: 4, HS: 4, FFN: 40,
		Eps: 1e-6, RopeTheta: 10000, TiedEmbeddings: false, BOS: -1, EOS: -1}
	if *c != want {
		t.Errorf("Llama defaults: got %+v, want %+v", *c, want)
	}
}

func TestParseConfigAccepts(t *testing.T) {
	tests := []struct {
		name  string
		base  func() map[string]any
		edit  map[string]any
		check func(c *Config) bool
	}{
		{"gelu_pytorch_tanh", cfgTestGPT2, map[string]any{"activation_function": "gelu_pytorch_tanh"}, func(c *Config) bool { return true }},
		{"n_inner null", cfgTestGPT2, map[string]any{"n_inner": nil}, func(c *Config) bool { return c.FFN == 64 }},
		{"hidden_size alias", cfgTestGPT2, map[string]any{"n_embd": nil, "hidden_size": 16}, func(c *Config) bool { return c.C == 16 }},
		{"integral float", cfgTestGPT2, map[string]any{"n_embd": 16.0}, func(c *Config) bool { return c.C == 16 }},
		{"untied gpt2", cfgTestGPT2, map[string]any{"tie_word_embeddings": false}, func(c *Config) bool { return !c.TiedEmbeddings }},
		{"head_dim without divisibility", cfgTestLlama, map[string]any{"hidden_size": 18, "head_dim": 8},
			func(c *Config) bool { return c.HS == 8 && c.C == 18 }},
		{"top-level rope_theta", cfgTestLlama, map[string]any{"rope_theta": 100000}, func(c *Config) bool { return c.RopeTheta == 100000 }},
		{"rope_parameters", cfgTestLlama, map[string]any{"rope_theta": 5, "rope_parameters": map[string]any{"rope_type": "default", "rope_theta": 500000.0}},
			func(c *Config) bool { return c.RopeTheta == 500000 }},
		{"rope_scaling null", cfgTestLlama, map[string]any{"rope_scaling": nil}, func(c *Config) bool { return true }},
		{"pretraining_tp ignored", cfgTestLlama, map[string]any{"pretraining_tp": 2}, func(c *Config) bool { return true }},
		{"swish", cfgTestLlama, map[string]any{"hidden_act": "swish"}, func(c *Config) bool { return true }},
		{"eos list", cfgTestLlama, map[string]any{"eos_token_id": []int{7, 9}, "bos_token_id": nil},
			func(c *Config) bool { return c.EOS == 7 && c.BOS == -1 }},
		{"tied llama", cfgTestLlama, map[string]any{"tie_word_embeddings": true}, func(c *Config) bool { return c.TiedEmbeddings }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := tt.base()
			for k, v := range tt.edit {
				m[k] = v
			}
			c, err := cfgTestParse(t, m)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(c) {
				t.Errorf("unexpected config %+v", *c)
			}
		})
	}
}

func TestParseConfigRefuses(t *testing.T) {
	tests := []struct {
		name string
		base func() map[string]any
		edit map[string]any
		want string // a substring of the error
	}{
		{"no model_type", cfgTestGPT2, map[string]any{"model_type": nil}, "no model_type"},
		{"unknown model_type", cfgTestGPT2, map[string]any{"model_type": "mistral"}, `model_type "mistral"`},
		{"model_type not string", cfgTestGPT2, map[string]any{"model_type": 3}, "model_type: want a string"},
		{"activation", cfgTestGPT2, map[string]any{"activation_function": "relu"}, `activation_function "relu"`},
		{"inverse layer idx", cfgTestGPT2, map[string]any{"scale_attn_by_inverse_layer_idx": true}, "scale_attn_by_inverse_layer_idx"},
		{"reorder and upcast", cfgTestGPT2, map[string]any{"reorder_and_upcast_attn": true}, "reorder_and_upcast_attn"},
		{"cross attention", cfgTestGPT2, map[string]any{"add_cross_attention": true}, "add_cross_attention"},
		{"unscaled attention", cfgTestGPT2, map[string]any{"scale_attn_weights": false}, "scale_attn_weights"},
		{"gpt2 heads", cfgTestGPT2, map[string]any{"n_head": 5}, "not divisible by n_head"},
		{"missing size", cfgTestGPT2, map[string]any{"vocab_size": nil}, "missing vocab_size"},
		{"zero layers", cfgTestGPT2, map[string]any{"n_layer": 0}, "layer count must be positive"},
		{"negative n_inner", cfgTestGPT2, map[string]any{"n_inner": -4}, "MLP inner size must be positive"},
		{"string size", cfgTestGPT2, map[string]any{"n_embd": "16"}, `n_embd: want an integer, got "16"`},
		{"fractional size", cfgTestGPT2, map[string]any{"n_embd": 16.5}, "n_embd: want an integer"},
		{"bool not bool", cfgTestGPT2, map[string]any{"tie_word_embeddings": "yes"}, "tie_word_embeddings: want true or false"},
		{"negative eps", cfgTestGPT2, map[string]any{"layer_norm_epsilon": -1}, "epsilon must be positive"},
		{"huge", cfgTestGPT2, map[string]any{"n_embd": 1 << 30, "n_head": 1}, "implausibly large"},
		{"negative token id", cfgTestGPT2, map[string]any{"eos_token_id": -3}, "must not be negative"},
		{"hidden_act", cfgTestLlama, map[string]any{"hidden_act": "gelu"}, `hidden_act "gelu"`},
		{"rope_scaling", cfgTestLlama, map[string]any{"rope_scaling": map[string]any{"rope_type": "linear", "factor": 2}}, "rope_scaling"},
		{"rope_type", cfgTestLlama, map[string]any{"rope_parameters": map[string]any{"rope_type": "llama3", "rope_theta": 5e5}}, `rope_type "llama3"`},
		{"rope_parameters not object", cfgTestLlama, map[string]any{"rope_parameters": 3}, "rope_parameters: want a JSON object"},
		{"rope_theta zero", cfgTestLlama, map[string]any{"rope_theta": 0}, "rope_theta must be positive"},
		{"attention_bias", cfgTestLlama, map[string]any{"attention_bias": true}, "attention_bias true"},
		{"mlp_bias", cfgTestLlama, map[string]any{"mlp_bias": true}, "mlp_bias true"},
		{"gqa", cfgTestLlama, map[string]any{"num_key_value_heads": 3}, "not divisible by key/value head count 3"},
		{"llama heads", cfgTestLlama, map[string]any{"num_attention_heads": 3, "num_key_value_heads": 3}, "not divisible by num_attention_heads"},
		{"head_dim zero", cfgTestLlama, map[string]any{"head_dim": 0}, "head size must be positive"},
		{"missing ffn", cfgTestLlama, map[string]any{"intermediate_size": nil}, "missing intermediate_size"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := tt.base()
			for k, v := range tt.edit {
				if v == nil {
					delete(m, k)
				} else {
					m[k] = v
				}
			}
			_, err := cfgTestParse(t, m)
			if err == nil {
				t.Fatalf("accepted %v", m)
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), "test/config.json: ") {
				t.Errorf("error %q, want it to name the file and contain %q", err, tt.want)
			}
		})
	}
	for _, bad := range []string{"", "null", "[1,2]", `{"model_type": "gpt2"`} {
		if _, err := ParseConfig([]byte(bad), "bad.json"); err == nil || !strings.Contains(err.Error(), "bad.json") {
			t.Errorf("ParseConfig(%q) error = %v, want one naming bad.json", bad, err)
		}
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "absent.json")); err == nil || !strings.Contains(err.Error(), "absent.json") {
		t.Errorf("LoadConfig(absent) error = %v", err)
	}
}

func TestFamilyString(t *testing.T) {
	if GPT2.String() != "gpt2" || Llama.String() != "llama" || Family(9).String() != "Family(9)" {
		t.Errorf("Family strings: %v %v %v", GPT2, Llama, Family(9))
	}
}

func TestLoadConfigReadsFile(t *testing.T) {
	dir := t.TempDir()
	data, _ := json.Marshal(cfgTestLlama())
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dir, filepath.Join(dir, "config.json")} {
		if c, err := LoadConfig(p); err != nil || c.Family != Llama {
			t.Errorf("LoadConfig(%s) = %v, %v", p, c, err)
		}
	}
}
