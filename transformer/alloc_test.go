package transformer

import (
	"testing"

	"github.com/kvalign/kvalign/gpu"
)

// A steady-state decode step (cache full, graph replay, sampling on the
// device) allocates no Go memory in the stream and the runner.
func TestDecodeStepAllocatesNothing(t *testing.T) {
	for _, mode := range []Mode{SlidingWindow, KVAlign, Recompute} {
		m := tinyModel(t, "tiny-llama", gpu.NewCPU())
		s := newStream(t, m, mode, 12, 4, identityRealigner{})
		feedLogits(t, s, testTokens(30, m.Cfg.VocabSize, 1))
		tok := []int32{3}
		samp := &Sampling{TopK: 1, Counter: []int32{0}, Banned: [][]int32{{5}}}
		fo := FeedOptions{Sample: samp}
		step := func() {
			if err := s.Feed(tok, fo); err != nil {
				t.Fatal(err)
			}
		}
		step()
		// The CPU backend's reference kernels allocate scratch of their own;
		// count only what the stream and runner add on top of them by
		// comparing with a runner-level replay.
		allocs := testing.AllocsPerRun(20, step)
		base := testing.AllocsPerRun(20, func() { s.r.graphs[s.r.last].Run() })
		if allocs > base {
			t.Errorf("%s: a decode step allocates %.0f times beyond its kernels (%.0f)", mode, allocs-base, base)
		}
	}
}
