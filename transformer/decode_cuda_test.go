//go:build cuda

package transformer

import (
	"fmt"
	"testing"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/internal/testenv"
)

// The persistent decode kernel (fp16 one-token steps on CUDA) against the
// same steps run one kernel per operation: both fixture models, sw, kv
// (eviction without the shift; identity networks) and ar, 350 teacher-forced
// steps through a 32-entry cache (over 300 past the first eviction). Every
// step's logits agree closely and so does every top-1 token. A second
// persistent stream must match the first exactly (the kernel is
// deterministic), which also tells, on a mismatch, which side moved.
func TestPersistentDecodeMatchesChain(t *testing.T) {
	forEachFixtureF16(t, func(name string, m *Model) {
		toks := testTokens(400, m.Cfg.VocabSize, 7)
		for _, mode := range []Mode{SlidingWindow, KVAlign, Recompute} {
			t.Run(fmt.Sprintf("%s/%s", name, mode), func(t *testing.T) {
				open := func(persistent bool) *Stream {
					s, err := NewStream(m, StreamOptions{Mode: mode, CacheSize: 32, StartSize: 4, Realigner: identityRealigner{}, MaxBan: 1, DecodeKernel: DecodeKernel{Persistent: persistent}})
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(s.Close)
					return s
				}
				fast, again, slow := open(true), open(true), open(false)
				if !fast.Persistent() || slow.Persistent() {
					t.Fatalf("persistent kernel: %v and %v, want true and false", fast.Persistent(), slow.Persistent())
				}
				feedLogits(t, fast, toks[:50])
				feedLogits(t, again, toks[:50])
				feedLogits(t, slow, toks[:50])
				worst, differ := 0.0, 0
				for i := 50; i < len(toks); i++ {
					got := feedLogits(t, fast, toks[i:i+1])
					got2 := feedLogits(t, again, toks[i:i+1])
					want := feedLogits(t, slow, toks[i:i+1])
					e, e2 := testenv.RelErr(got, want), testenv.RelErr(got, got2)
					worst = max(worst, e)
					if !(e <= 2e-3) || e2 != 0 {
						t.Fatalf("step %d: logits differ from the chain's by %.3g and from a second persistent stream's by %.3g (max|Δ|/max|ref|)", i, e, e2)
					}
					if Argmax(got) != Argmax(want) {
						differ++
					}
				}
				t.Logf("worst logits Δ %.3g; top-1 differs at %d of %d steps", worst, differ, len(toks)-50)
				if differ > 0 {
					t.Errorf("top-1 token differs at %d steps", differ)
				}
			})
		}
	})
}

// forEachFixtureF16 runs fn with each fixture model on the GPU, in fp16.
func forEachFixtureF16(t *testing.T, fn func(name string, m *Model)) {
	be, err := gpu.NewCUDA(0)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	for _, name := range []string{"gutenberg-gpt2-7m", "gutenberg-llama-7m"} {
		ck, err := LoadCheckpoint(testenv.Shared(t, "models", name))
		if err != nil {
			t.Fatal(err)
		}
		m, err := NewModel(ck.Cfg, ck.Weights, be, gpu.F16)
		if err != nil {
			t.Fatal(err)
		}
		fn(name, m)
		m.Close()
	}
}
