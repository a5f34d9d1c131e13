package transformer

import (
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/kvalign/kvalign/internal/testenv"
)

func tinyModel(t testing.TB, name string, be gpu.Backend) *Model {
	t.Helper()
	cfg, w := loadModelDir(t, testenv.Testdata(t, "models", name))
	m, err := NewModel(cfg, w, be, gpu.F32)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// testTokens is a deterministic pseudo-random token sequence.
func testTokens(n, vocab int, seed uint64) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(ref.Uniform(seed, uint32(i)) * float32(vocab))
	}
	return out
}

// fullLogits is an independent forward pass: tokens at positions 0…T-1 in a
// fresh cache, logits of the last one.
func fullLogits(t testing.TB, m *Model, tokens []int32) []float32 {
	t.Helper()
	T := len(tokens)
	r, err := NewRunner(m, RunnerOptions{B: 1, MaxT: T, MaxLen: T})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	idx := make([]int32, T)
	for i := range idx {
		idx[i] = int32(i)
	}
	if err := r.Run(&Step{T: T, Tokens: tokens, Pos: idx, Slots: idx, Order: [][]int32{idx}, Logits: LastRow}); err != nil {
		t.Fatal(err)
	}
	l, err := r.Logits(1)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func newStream(t testing.TB, m *Model, mode Mode, size, start int, re Realigner) *Stream {
	t.Helper()
	s, err := NewStream(m, StreamOptions{Mode: mode, CacheSize: size, StartSize: start, Realigner: re, MaxBan: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func feedLogits(t testing.TB, s *Stream, tokens []int32) []float32 {
	t.Helper()
	if err := s.Feed(tokens, FeedOptions{}); err != nil {
		t.Fatal(err)
	}
	l, err := s.Logits()
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func assertClose(t testing.TB, what string, got, want []float32, tol float64) {
	t.Helper()
	if e := testenv.RelErr(got, want); e > tol || math.IsNaN(e) {
		t.Fatalf("%s: max|Δ|/max|ref| = %.3g > %.g", what, e, tol)
	}
}

// Until the first eviction, sw decoding is plain full-cache decoding.
func TestSlidingWindowBeforeEvictionIsFullCache(t *testing.T) {
	for _, name := range []string{"tiny-gpt2", "tiny-llama"} {
		t.Run(name, func(t *testing.T) {
			m := tinyModel(t, name, gpu.NewCPU())
			toks := testTokens(41, m.Cfg.VocabSize, 1)
			s := newStream(t, m, SlidingWindow, 40, 4, nil)
			feedLogits(t, s, toks[:10])
			for i := 10; i < len(toks); i++ {
				got := feedLogits(t, s, toks[i:i+1])
				assertClose(t, "step "+strconv.Itoa(i), got, fullLogits(t, m, toks[:i+1]), 1e-5)
			}
			if s.Cache().Len() != 41 {
				t.Fatalf("cache holds %d entries, want 41", s.Cache().Len())
			}
		})
	}
}

// ar is an independent full recompute of the last cache_size+1 tokens.
func TestRecomputeIsFullRecompute(t *testing.T) {
	for _, name := range []string{"tiny-gpt2", "tiny-llama"} {
		t.Run(name, func(t *testing.T) {
			m := tinyModel(t, name, gpu.NewCPU())
			const size = 12
			toks := testTokens(60, m.Cfg.VocabSize, 2)
			s := newStream(t, m, Recompute, size, 4, nil)
			feedLogits(t, s, toks[:5])
			for i := 5; i < len(toks); i++ {
				got := feedLogits(t, s, toks[i:i+1])
				lo := max(0, i+1-(size+1))
				assertClose(t, "step "+strconv.Itoa(i), got, fullLogits(t, m, toks[lo:i+1]), 1e-5)
			}
		})
	}
}

// identityRealigner stands in for networks in streams where realignment
// must not matter (the KV-Align test with real networks is in package align).
type identityRealigner struct{}

func (identityRealigner) Realign(be gpu.Backend, K, V, slots, index gpu.Buf, p gpu.AlignParams) {}

// Llama sw (StreamingLLM's position shift): rotating the cached pre-RoPE keys
// by hand at their cache index and attending without the shift gives the same
// logits.
func TestLlamaPositionShiftIsRopeAtCacheIndex(t *testing.T) {
	be := gpu.NewCPU()
	m := tinyModel(t, "tiny-llama", be)
	cfg := m.Cfg
	const size, start = 10, 4
	toks := testTokens(30, cfg.VocabSize, 4)
	s := newStream(t, m, SlidingWindow, size, start, nil)
	feedLogits(t, s, toks[:len(toks)-1])
	// The stream's next step, done by hand: evict, then the new token at
	// the cache length, with keys rotated explicitly.
	c := s.Cache()
	sr := s.Runner()
	K := append([]float32(nil), sr.K.F32()...)
	V := append([]float32(nil), sr.V.F32()...)
	got := feedLogits(t, s, toks[len(toks)-1:])

	r, err := NewRunner(m, RunnerOptions{B: 1, MaxT: 1, MaxLen: c.Slots()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	inv := ref.RopeInvFreq(cfg.HS, float32(cfg.RopeTheta))
	row := cfg.NKV * cfg.HS
	layer := sr.Slots * row
	order := append([]int32(nil), c.Order()...) // after this step's eviction
	for l := 0; l < cfg.NLayer; l++ {
		for j, slot := range order[:len(order)-1] {
			for h := 0; h < cfg.NKV; h++ {
				off := l*layer + int(slot)*row + h*cfg.HS
				ref.RopeRotate(K[off:off+cfg.HS], j, inv)
			}
		}
	}
	be.Upload(r.K, K)
	be.Upload(r.V, V)
	pos := int32(len(order) - 1)
	if err := r.Run(&Step{T: 1, Tokens: toks[len(toks)-1:], Pos: []int32{pos}, Slots: []int32{order[len(order)-1]}, Order: [][]int32{order}, Logits: LastRow}); err != nil {
		t.Fatal(err)
	}
	want, _ := r.Logits(1)
	assertClose(t, "position-shifted logits", got, want, 1e-5)
}

// A prompt longer than the cache streams through the same policy: the cache
// ends at size+1 entries and the logits equal feeding the tail token by token.
func TestLongPromptStreams(t *testing.T) {
	for _, mode := range []Mode{SlidingWindow, KVAlign, Recompute} {
		for _, name := range []string{"tiny-gpt2", "tiny-llama"} {
			t.Run(mode.String()+"/"+name, func(t *testing.T) {
				m := tinyModel(t, name, gpu.NewCPU())
				const size = 16
				toks := testTokens(5*size, m.Cfg.VocabSize, 5)
				once := newStream(t, m, mode, size, 4, identityRealigner{})
				got := feedLogits(t, once, toks)
				step := newStream(t, m, mode, size, 4, identityRealigner{})
				feedLogits(t, step, toks[:size+1])
				var want []float32
				for i := size + 1; i < len(toks); i++ {
					want = feedLogits(t, step, toks[i:i+1])
				}
				assertClose(t, "long prompt", got, want, 1e-6)
				if mode != Recompute && once.Cache().Len() != size+1 {
					t.Fatalf("cache holds %d entries after a %d-token prompt, want %d", once.Cache().Len(), len(toks), size+1)
				}
			})
		}
	}
}

// rssKB is the resident set size of this process.
func rssKB(t *testing.T) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status: cannot measure RSS here")
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, _ := strconv.Atoi(strings.Fields(line)[1])
			return kb
		}
	}
	t.Skip("no VmRSS line")
	return 0
}

// Memory stays flat over 100,000 tokens: nothing grows with the stream.
func TestMemoryFlatOver100kTokens(t *testing.T) {
	if testing.Short() {
		t.Skip("long: 100,000 decode steps")
	}
	m := tinyModel(t, "tiny-gpt2", gpu.NewCPU())
	s := newStream(t, m, SlidingWindow, 16, 4, nil)
	tok := []int32{1}
	var at10k int
	for i := 0; i < 100_000; i++ {
		if err := s.Feed(tok, FeedOptions{Sample: &Sampling{TopK: 20, Seed: 9, Counter: []int32{int32(i)}}}); err != nil {
			t.Fatal(err)
		}
		next, err := s.Sampled()
		if err != nil {
			t.Fatal(err)
		}
		tok[0] = next
		if i == 10_000 {
			runtime.GC()
			at10k = rssKB(t)
		}
	}
	runtime.GC()
	end := rssKB(t)
	t.Logf("RSS after 10k tokens %d kB, after 100k %d kB", at10k, end)
	if end-at10k > 4096 {
		t.Fatalf("RSS grew by %d kB between 10k and 100k tokens", end-at10k)
	}
}
