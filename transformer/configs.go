package transformer

import (
	"embed"
	"fmt"
)

// The exact configs of the two models of the original work, for benchmarks
// and conformance runs with random weights (the real checkpoints are
// downloaded from the Hugging Face hub by users).
//
//go:embed configs/*.json
var configFS embed.FS

// BuiltinConfigs lists the names BuiltinConfig knows.
func BuiltinConfigs() []string { return []string{"distilgpt2", "smollm2-135m"} }

// BuiltinConfig returns the exact config of distilgpt2 or smollm2-135m.
func BuiltinConfig(name string) (*Config, error) {
	b, err := configFS.ReadFile("configs/" + name + ".json")
	if err != nil {
		return nil, fmt.Errorf("unknown config %q (known: distilgpt2, smollm2-135m, or a model directory)", name)
	}
	return ParseConfig(b, name)
}
