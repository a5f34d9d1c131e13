//go:build nobuiltin

package builtin

import "errors"

// Name is the name of the default model.
const Name = "gutenberg-gpt2-7m"

// Extract reports that this binary was built without the default model
// (tag nobuiltin: a smaller binary for GPU test machines; pass --model).
func Extract() (string, error) {
	return "", errors.New("this kvalign was built without the built-in model (tag nobuiltin): pass --model")
}
