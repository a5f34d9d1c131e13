package transformer

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Checkpoint is a model directory read into host memory: config, weights
// and tokenizer.
type Checkpoint struct {
	Dir     string
	Name    string // what the user called it
	Cfg     *Config
	Weights *Weights
	Tok     *Tokenizer
}

// knownModels maps the names the original code accepted to Hugging Face
// repositories.
var knownModels = map[string]string{
	"distilgpt2": "distilbert/distilgpt2", "gpt2": "distilbert/distilgpt2", "distilbert/distilgpt2": "distilbert/distilgpt2",
	"smollm2": "HuggingFaceTB/SmolLM2-135M", "rope": "HuggingFaceTB/SmolLM2-135M", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
	"huggingfacetb/smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
}

// KnownRepo is the Hugging Face repository of a known model name, or "".
func KnownRepo(name string) string { return knownModels[strings.ToLower(name)] }

// ResolveModel turns a --model value into a directory: an existing directory
// as is, or a known name (distilgpt2/gpt2, smollm2/rope) looked up in the
// local Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub or
// ~/.cache/huggingface/hub), snapshot of refs/main.
func ResolveModel(name string) (string, error) {
	if st, err := os.Stat(name); err == nil {
		if !st.IsDir() {
			return "", fmt.Errorf("model %s is a file; want a model directory (config.json, model.safetensors, tokenizer)", name)
		}
		return name, nil
	}
	repo := KnownRepo(name)
	if repo == "" {
		return "", fmt.Errorf("unknown model %q: give a model directory or a known name (distilgpt2, gpt2, smollm2, rope)", name)
	}
	cache := HubCacheDir()
	dir := filepath.Join(cache, "models--"+strings.ReplaceAll(repo, "/", "--"))
	ref, err := os.ReadFile(filepath.Join(dir, "refs", "main"))
	if err != nil {
		return "", fmt.Errorf("model %s (%s) is not in the local Hugging Face cache %s; download it there (e.g. `huggingface-cli download %s`) or pass a model directory", name, repo, cache, repo)
	}
	snap := filepath.Join(dir, "snapshots", strings.TrimSpace(string(ref)))
	if _, err := os.Stat(filepath.Join(snap, "config.json")); err != nil {
		return "", fmt.Errorf("model %s: the Hugging Face cache snapshot %s has no config.json", name, snap)
	}
	return snap, nil
}

// HubCacheDir is where the Hugging Face hub client keeps downloads.
func HubCacheDir() string {
	if d := os.Getenv("HF_HUB_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("HF_HOME"); d != "" {
		return filepath.Join(d, "hub")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = "."
	}
	return filepath.Join(home, ".cache", "huggingface", "hub")
}

// LoadCheckpoint reads config.json, the safetensors weights and the
// tokenizer of a model directory.
func LoadCheckpoint(dir string) (*Checkpoint, error) {
	cfg, err := LoadConfig(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	w, err := LoadWeights(dir, cfg)
	if err != nil {
		return nil, err
	}
	tok, err := LoadTokenizer(dir)
	if err != nil {
		return nil, err
	}
	if tok.VocabSize() > cfg.VocabSize {
		return nil, fmt.Errorf("model %s: tokenizer has %d tokens but the model's vocabulary is %d", dir, tok.VocabSize(), cfg.VocabSize)
	}
	return &Checkpoint{Dir: dir, Name: dir, Cfg: cfg, Weights: w, Tok: tok}, nil
}
