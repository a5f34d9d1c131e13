// Package testenv finds the files tests read: the module root (testdata/)
// and the shared fixtures (KVALIGN_SHARED, default ../shared beside the
// repository).
package testenv

import (
	"math"
	"os"
	"path/filepath"
	"testing"
)

// Root is the directory holding go.mod, found by walking up from the
// working directory ("" if none).
func Root() string {
	dir, err := os.Getwd()
	if err != nil {
		return ""
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

// SharedDir is the shared fixture directory, or "" when it is absent.
func SharedDir() string {
	d := os.Getenv("KVALIGN_SHARED")
	if d == "" {
		root := Root()
		if root == "" {
			return ""
		}
		d = filepath.Join(root, "..", "shared")
	}
	if st, err := os.Stat(d); err != nil || !st.IsDir() {
		return ""
	}
	return d
}

// Shared is the path of a file under the shared fixtures (the directory
// itself with no rel); the test is skipped, saying why, when the fixtures or
// the file are absent.
func Shared(t testing.TB, rel ...string) string {
	t.Helper()
	d := SharedDir()
	if d == "" {
		t.Skip("shared fixtures not found: set KVALIGN_SHARED (default ../shared beside the repository)")
	}
	p := filepath.Join(append([]string{d}, rel...)...)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("shared fixture %s not found", p)
	}
	return p
}

// Testdata is the path of a file under the repository's testdata/; the test
// is skipped, saying why, when it is absent (goldens not yet generated).
func Testdata(t testing.TB, rel ...string) string {
	t.Helper()
	p := filepath.Join(append([]string{Root(), "testdata"}, rel...)...)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("%s not found: generate it with scripts/reference (see scripts/reference/README.md)", p)
	}
	return p
}

// RelErr is max|got − want| / max|want| (max|got − want| when want is all
// zero): the error measure of every numerical comparison in the tests. NaN
// in got makes it NaN, which fails any bound.
func RelErr(got, want []float32) float64 {
	var d, m float64
	for i := range want {
		diff := math.Abs(float64(got[i]) - float64(want[i]))
		if math.IsNaN(diff) {
			return math.NaN()
		}
		d = math.Max(d, diff)
		m = math.Max(m, math.Abs(float64(want[i])))
	}
	if m == 0 {
		return d
	}
	return d / m
}
