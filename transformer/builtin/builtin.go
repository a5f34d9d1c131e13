//go:build !nobuiltin

// Package builtin embeds kvalign's default model so that `kvalign run` works
// offline with no download. Only the command imports it: the 14 MB stay out
// of every other binary.
package builtin

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// The default model, embedded so that `kvalign run` works offline with no
// download: the project's own GPT-2 fixture (6 layers, d=256, 7.1M
// parameters, trained on Project Gutenberg books).
//
//go:embed model
var builtinFS embed.FS

// Name is the name of the embedded default model.
const Name = "gutenberg-gpt2-7m"

// ExtractBuiltin writes the embedded model to the user cache directory
// (once; a content hash names the copy) and returns its path, so it loads
// through the same memory-mapped path as any model directory.
func Extract() (string, error) {
	sub, err := fs.Sub(builtinFS, "model")
	if err != nil {
		return "", err
	}
	files, err := fs.ReadDir(sub, ".")
	if err != nil {
		return "", err
	}
	h := sha256.New()
	for _, f := range files {
		b, err := fs.ReadFile(sub, f.Name())
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %d\n", f.Name(), len(b))
		h.Write(b)
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	dir := filepath.Join(base, "kvalign", Name+"-"+hex.EncodeToString(h.Sum(nil))[:12])
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err == nil {
		return dir, nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", fmt.Errorf("extracting the built-in model: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".extract-")
	if err != nil {
		return "", fmt.Errorf("extracting the built-in model: %w", err)
	}
	defer os.RemoveAll(tmp)
	for _, f := range files {
		b, _ := fs.ReadFile(sub, f.Name())
		if err := os.WriteFile(filepath.Join(tmp, f.Name()), b, 0o644); err != nil {
			return "", fmt.Errorf("extracting the built-in model: %w", err)
		}
	}
	// Rename the whole directory: another process extracting at the same
	// time either wins or finds the finished copy.
	if err := os.Rename(tmp, dir); err != nil {
		if _, statErr := os.Stat(filepath.Join(dir, "config.json")); statErr == nil {
			return dir, nil
		}
		return "", fmt.Errorf("extracting the built-in model: %w", err)
	}
	return dir, nil
}
