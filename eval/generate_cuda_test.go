//go:build cuda

package eval

import (
	"testing"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/internal/testenv"
	"github.com/kvalign/kvalign/transformer"
)

// Generate on the GPU in fp32 draws the same greedy text as on the CPU, for
// both fixture models in sw and ar, with repeated 2-grams banned: the
// chained CUDA graphs, the 2-gram memory on the device and the host's
// reading of each token one step behind must all agree with the reference.
func TestGenerateAgreesAcrossBackends(t *testing.T) {
	cuda, steps := gpuAndSteps(t)
	defer cuda.Close()
	for _, name := range []string{"gutenberg-gpt2-7m", "gutenberg-llama-7m"} {
		ck, err := transformer.LoadCheckpoint(testenv.Shared(t, "models", name))
		if err != nil {
			t.Fatal(err)
		}
		var prompt []int32
		for _, id := range ck.Tok.Encode("The old house stood at the end of the lane, and nobody had lived in it for years.") {
			prompt = append(prompt, int32(id))
		}
		o := GenerateOptions{NumTokens: steps, FirstTopK: 1, TopK: 1, EOS: int32(ck.Tok.EOS()), Newline: -1, Keep: 64}
		for _, mode := range []transformer.Mode{transformer.SlidingWindow, transformer.Recompute} {
			gen := func(be gpu.Backend) []int32 {
				m, err := transformer.NewModel(ck.Cfg, ck.Weights, be, gpu.F32)
				if err != nil {
					t.Fatal(err)
				}
				defer m.Close()
				return generateOn(t, m, transformer.StreamOptions{Mode: mode, CacheSize: 54, StartSize: 4, MaxBan: 1}, prompt, o)
			}
			want, got := gen(gpu.NewCPU()), gen(cuda)
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("%s/%s: token %d differs from the CPU's (%d vs %d)", name, mode, i, got[i], want[i])
				}
			}
			t.Logf("%s/%s: %d/%d greedy tokens identical to the CPU", name, mode, len(want), len(want))
		}
	}
}

// Generate on the GPU in fp16 draws the same sampled text with the LM head
// screened (DecodeKernel.ScreenHead) as with every logit computed, at the
// full-size shapes of both families (random weights of the reference
// configs), top-5 then top-20 with repeated 2-grams banned: the screen must
// never lose a token that could be drawn, nor change the order of those
// kept.
func TestGenerateScreenedHead(t *testing.T) {
	cuda, steps := gpuAndSteps(t)
	defer cuda.Close()
	for _, name := range []string{"distilgpt2", "smollm2-135m"} {
		cfg, err := transformer.LoadConfig(testenv.Shared(t, "reference", "configs", name+".config.json"))
		if err != nil {
			t.Fatal(err)
		}
		m, err := transformer.NewModel(cfg, transformer.RandomWeights(cfg, 7), cuda, gpu.F16)
		if err != nil {
			t.Fatal(err)
		}
		prompt := make([]int32, 24)
		for i := range prompt {
			prompt[i] = int32((i*7919 + 13) % cfg.VocabSize)
		}
		o := GenerateOptions{NumTokens: steps, FirstTopK: 5, TopK: 20, Seed: 11, EOS: 0, Newline: 198, Keep: 64}
		gen := func(screen bool) []int32 {
			return generateOn(t, m, transformer.StreamOptions{Mode: transformer.SlidingWindow, CacheSize: 54, StartSize: 4,
				MaxBan: 1, DecodeKernel: transformer.DecodeKernel{ScreenHead: screen}}, prompt, o)
		}
		want, got := gen(false), gen(true)
		if len(got) != len(want) {
			t.Fatalf("%s: %d tokens screened, %d with every logit", name, len(got), len(want))
		}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("%s: token %d differs with the screened head (%d vs %d)", name, i, got[i], want[i])
			}
		}
		t.Logf("%s: %d/%d sampled tokens identical with the screened head", name, len(want), len(want))
		m.Close()
	}
}

// generateOn is the text Generate draws from a new stream of m.
func generateOn(t *testing.T, m *transformer.Model, so transformer.StreamOptions, prompt []int32, o GenerateOptions) []int32 {
	t.Helper()
	s, err := transformer.NewStream(m, so)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var out []int32
	if _, err := Generate(s, prompt, o, func(id int32) error { out = append(out, id); return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}

// gpuAndSteps opens the GPU and says how many tokens a test generates
// (fewer under compute-sanitizer, which runs with -short).
func gpuAndSteps(t *testing.T) (gpu.Backend, int) {
	t.Helper()
	cuda, err := gpu.NewCUDA(0)
	if err != nil {
		t.Fatalf("CUDA build but no GPU: %v", err)
	}
	if testing.Short() {
		return cuda, 40
	}
	return cuda, 300
}
