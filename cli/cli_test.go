package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kvalign/kvalign/internal/testenv"
)

func runCLI(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	code = Main(append([]string{"kvalign"}, args...), &o, &e)
	return o.String(), e.String(), code
}

// A user's mistakes give one error line naming the problem and exit status
// 2; broken files give one line and status 1; never a panic.
func TestBadInputIsOneLine(t *testing.T) {
	tmp := t.TempDir()
	corrupt := filepath.Join(tmp, "corrupt")
	os.MkdirAll(corrupt, 0o755)
	os.WriteFile(filepath.Join(corrupt, "config.json"), []byte(`{"model_type": "gpt2", "n_embd": 64`), 0o644)
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"run", "--model", "no-such-model"}, 2, "unknown model"},
		{[]string{"run", "--mode", "fast"}, 2, "unknown mode"},
		{[]string{"run", "--cache-size", "5", "--start-size", "4"}, 2, "--cache-size 5 must exceed --start-size 4"},
		{[]string{"run", "--cache-size", "1024"}, 2, "n_positions-1 = 1023"},
		{[]string{"run", "--num-tokens", "0"}, 2, "--num-tokens 0"},
		{[]string{"run", "--num-tokens", "x"}, 2, "invalid value"},
		{[]string{"run", "--bogus"}, 2, "flag provided but not defined"},
		{[]string{"run", "--mode", "kv"}, 2, "needs KV-Align networks"},
		{[]string{"run", "--device", "tpu"}, 2, "invalid --device"},
		{[]string{"run", "--dtype", "int4", "--num-tokens", "1"}, 2, "--dtype"},
		{[]string{"run", "--decode-kernel", "fast"}, 2, "unknown --decode-kernel"},
		{[]string{"run", "--align-kernel", "fast"}, 2, "unknown --align-kernel"},
		{[]string{"bench", "run", "--align-kernel", "fast"}, 2, "unknown --align-kernel"},
		{[]string{"bench", "decode", "--decode-kernel", "fast"}, 2, "unknown --decode-kernel"},
		{[]string{"bench", "run", "--decode-kernel", "fast"}, 2, "unknown --decode-kernel"},
		{[]string{"info", corrupt}, 1, "config.json"},
		{[]string{"score", "--model", tmp}, 1, "config.json"},
	}
	for _, c := range cases {
		_, stderr, code := runCLI(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) || strings.Count(strings.TrimSpace(stderr), "\n") > 1 {
			t.Errorf("kvalign %s: exit %d, stderr %q; want exit %d and one line containing %q", strings.Join(c.args, " "), code, stderr, c.code, c.want)
		}
	}
}

// kv mode refuses networks that do not fit the model or the window, naming
// both sides.
func TestRunRefusesMismatchedNetworks(t *testing.T) {
	nets := testenv.Shared(t, "seed", "networks")
	_, stderr, code := runCLI(t, "run", "--mode", "kv", "--align", nets+"/keys_network_smollm2.pth,"+nets+"/values_network_smollm2.pth", "--num-tokens", "1")
	if code != 2 || !strings.Contains(stderr, "30 layers") || !strings.Contains(stderr, "model has 6") {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
}

func TestRunStreamsFromTheBuiltinModel(t *testing.T) {
	stdout, stderr, code := runCLI(t, "run", "--device", "cpu", "--num-tokens", "40", "--seed", "3")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if len(strings.Fields(stdout)) < 10 || !strings.Contains(stderr, "generated tokens 40") {
		t.Fatalf("stdout %q, stderr %q", stdout, stderr)
	}
	again, _, _ := runCLI(t, "run", "--device", "cpu", "--num-tokens", "40", "--seed", "3")
	if again != stdout {
		t.Fatalf("same seed, different text:\n%q\n%q", stdout, again)
	}
}

func TestTokenizeAndScore(t *testing.T) {
	model := testenv.Shared(t, "models", "gutenberg-gpt2-7m")
	in := filepath.Join(t.TempDir(), "in.txt")
	os.WriteFile(in, []byte("Hello world. It was a dark and stormy night."), 0o644)
	stdout, stderr, code := runCLI(t, "tokenize", "--model", model, in)
	if code != 0 || len(strings.Fields(stdout)) < 5 {
		t.Fatalf("tokenize: exit %d, %q %q", code, stdout, stderr)
	}
	stdout, stderr, code = runCLI(t, "score", "--model", model, "--device", "cpu", in)
	lines := strings.Split(strings.TrimSpace(stdout), "\n")
	if code != 0 || len(lines) < 5 || !strings.HasPrefix(lines[len(lines)-1], "perplexity\t") {
		t.Fatalf("score: exit %d, %q %q", code, stdout, stderr)
	}
}

// TestAnchorTable: each mode's slowest cell against its target and the
// PyTorch eager anchor; nothing for configs without anchors.
func TestAnchorTable(t *testing.T) {
	cells := []benchCell{
		{Config: "smollm2-135m", Mode: "sw", CacheSize: 32, MedianMs: 0.25},
		{Config: "smollm2-135m", Mode: "sw", CacheSize: 255, MedianMs: 0.38},
		{Config: "smollm2-135m", Mode: "ar", CacheSize: 32, MedianMs: 1.15},
		{Config: "distilgpt2", Mode: "sw", CacheSize: 32, MedianMs: 9},
	}
	got := anchorTable("smollm2-135m", cells)
	for _, want := range []string{
		"| sw | 0.380 | ≤ 0.30: not met | 19 | 50× |",
		"| ar | 1.150 | ≤ 2.00: met | 23 | 20× |",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("anchorTable lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "| kv |") || strings.Contains(got, "9.000") {
		t.Errorf("anchorTable shows a mode or config that was not run:\n%s", got)
	}
	if got := anchorTable("my-model", cells); got != "" {
		t.Errorf("a config without anchors got a table:\n%s", got)
	}
}
