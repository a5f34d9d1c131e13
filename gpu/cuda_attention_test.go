//go:build cuda

package gpu

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

// attnCase is one attention problem with host copies of its inputs.
type attnCase struct {
	p                AttnParams
	S                int // cache slots
	q, kc, vc        []float32
	order, lens      []int32
	qBuf, kBuf, vBuf Buf
	oBuf, lBuf       Buf
}

// newAttnCase draws caches of S slots, per-sequence slot orders (random
// permutations, so entries are gathered from everywhere) and lengths in
// [T, MaxLen] with the first sequence at exactly T (its first query sees one
// entry) when B > 1.
func newAttnCase(t testing.TB, c *CUDA, rng *rand.Rand, p AttnParams) *attnCase {
	a := &attnCase{p: p, S: p.B*p.MaxLen/2 + p.MaxLen + 3}
	N := p.B * p.T
	a.q = randVals(rng, max(N-1, 0)*p.QStride+p.NH*p.HS, 1)
	a.kc = randVals(rng, a.S*p.NKV*p.HS, 1)
	a.vc = randVals(rng, a.S*p.NKV*p.HS, 1)
	a.order = make([]int32, p.B*p.MaxLen)
	a.lens = make([]int32, p.B)
	for b := 0; b < p.B; b++ {
		perm := rng.Perm(a.S)
		for j := 0; j < p.MaxLen; j++ {
			a.order[b*p.MaxLen+j] = int32(perm[j])
		}
		a.lens[b] = int32(p.T + rng.IntN(p.MaxLen-p.T+1))
	}
	if p.B > 1 {
		a.lens[0] = int32(p.T)
	}
	if p.B > 2 {
		a.lens[2] = int32(p.MaxLen)
	}
	a.qBuf = uploadNew(t, c, F32, a.q)
	a.kBuf = uploadNew(t, c, F32, a.kc)
	a.vBuf = uploadNew(t, c, F32, a.vc)
	a.oBuf = uploadInts(t, c, a.order)
	a.lBuf = uploadInts(t, c, a.lens)
	return a
}

// replay sets the case's lengths on the device, replays a captured
// attention into out (poisoned first) and returns what it wrote and the
// reference for those lengths.
func (a *attnCase) replay(t testing.TB, c *CUDA, r Replay, out Buf, lens []int32) (got, want []float32) {
	t.Helper()
	copy(a.lens, lens)
	c.UploadInts(a.lBuf, a.lens)
	poison(t, c, out)
	r.Run()
	return download(t, c, out), a.want()
}

func (a *attnCase) want() []float32 {
	p := a.p
	out := make([]float32, p.B*p.T*p.NH*p.HS)
	ref.Attention(out, a.q, a.kc, a.vc, a.order, a.lens, p.B, p.T, p.NH, p.NKV, p.HS, p.QStride, p.MaxLen, p.RopeTheta)
	return out
}

func TestCUDAAttention(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(11, 12))
	heads := []struct{ NH, NKV int }{{12, 12}, {9, 3}, {4, 2}}
	for _, hd := range heads {
		for _, HS := range []int{16, 64, 128} {
			for _, B := range []int{1, 3} {
				for _, T := range []int{1, 3, 37} {
					for _, theta := range []float32{0, 10000} {
						if HS == 128 && (B == 3 || hd.NH == 12) {
							continue // keep the large-head cases few
						}
						qStride := hd.NH * HS
						if hd.NH != hd.NKV {
							qStride = (hd.NH + 2*hd.NKV) * HS // rows of a fused qkv projection
						}
						p := AttnParams{B: B, T: T, NH: hd.NH, NKV: hd.NKV, HS: HS, QStride: qStride, MaxLen: 300, RopeTheta: theta}
						testAttention(t, c, rng, p)
					}
				}
			}
		}
	}
	// Long sequences, the decode shapes that matter, across many splits.
	for _, hd := range heads[:2] {
		p := AttnParams{B: 2, T: 1, NH: hd.NH, NKV: hd.NKV, HS: 64, QStride: hd.NH * 64, MaxLen: 2100, RopeTheta: 10000}
		testAttention(t, c, rng, p)
	}
}

// testAttention runs every kernel variant that takes p (decode with and
// without split scratch, prefill) against ref.Attention.
func testAttention(t *testing.T, c *CUDA, rng *rand.Rand, p AttnParams) {
	t.Helper()
	a := newAttnCase(t, c, rng, p)
	want := a.want()
	out, err := c.Alloc(F32, len(want))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Free(out)
	var work Buf
	if n := attnWorkFloats(p); n > 0 {
		work = uploadNew(t, c, F32, make([]float32, n)) // zeroed, as the kernels require
		defer c.Free(work)
	}
	type run struct {
		variant int
		work    Buf
	}
	runs := []run{{0, work}, {2, Buf{}}, {5, Buf{}}}
	if p.T*p.NH/p.NKV <= 16 {
		// The second split run reuses work: the first must leave its counters at zero.
		runs = append(runs, run{1, Buf{}}, run{1, work}, run{3, Buf{}}, run{3, work}, run{4, Buf{}}, run{4, work}, run{4, work})
	}
	if p.T*p.NH/p.NKV <= 4 && (p.HS == 16 || p.HS == 32 || p.HS == 64 || p.HS == 128) {
		// One block (a cluster of 4 or 8 on sm_90) per kv head, any length,
		// as programmatic dependents and (10, 11) launched normally; 14: a
		// cluster of 8 per query head.
		runs = append(runs, run{6, Buf{}}, run{8, Buf{}}, run{9, Buf{}}, run{10, Buf{}}, run{11, Buf{}}, run{14, Buf{}})
	}
	for _, r := range runs {
		name := fmt.Sprintf("B%d_T%d_NH%d_NKV%d_HS%d_rope%v_v%d_split%v", p.B, p.T, p.NH, p.NKV, p.HS, p.RopeTheta, r.variant, !r.work.IsZero())
		poison(t, c, out)
		c.attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p, r.variant, r.work)
		got := download(t, c, out)
		if e := relErr(got, want); e > 1e-5 {
			t.Errorf("%s: max|Δ|/max|ref| = %.3g > 1e-5", name, e)
		}
		compare(t, name, got, want, 1e-5*maxAbs(want), 1e-5)
	}
}

// BenchmarkCUDAAttention: decode (T = 1, split over the entries) at lengths
// 255 and 1024 for distilgpt2 (12/12 heads) and SmolLM2 (9/3, keys rotated),
// and a perplexity-window prefill (T = 1024).
func BenchmarkCUDAAttention(b *testing.B) {
	c := newTestCUDA(b)
	rng := rand.New(rand.NewPCG(13, 14))
	models := []struct {
		name    string
		NH, NKV int
		theta   float32
	}{{"distil", 12, 12, 0}, {"smol", 9, 3, 100000}, {"smol_norope", 9, 3, 0}, {"smol_g1", 3, 3, 100000}}
	for _, m := range models {
		for _, n := range []int{255, 1024} {
			for _, B := range []int{1, 4} {
				b.Run(fmt.Sprintf("decode_%s_len%d_B%d", m.name, n, B), func(b *testing.B) {
					p := AttnParams{B: B, T: 1, NH: m.NH, NKV: m.NKV, HS: 64, QStride: m.NH * 64, MaxLen: n, RopeTheta: m.theta}
					a := newAttnCase(b, c, rng, p)
					lens := make([]int32, B)
					for i := range lens {
						lens[i] = int32(n)
					}
					c.UploadInts(a.lBuf, lens)
					out := uploadNew(b, c, F32, make([]float32, B*m.NH*64))
					work := uploadNew(b, c, F32, make([]float32, max(attnWorkFloats(p), 1)))
					for _, variant := range []int{1, 3, 4, 6, 8, 9, 14, 0} {
						b.Run(fmt.Sprintf("v%d", variant), func(b *testing.B) {
							sec := graphTime(b, c, 20, func(int) { c.attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p, variant, work) })
							b.ReportMetric(float64(2*B*n*m.NKV*64*4)/sec/1e9, "GB/s")
							b.ReportMetric(sec*1e6, "µs/call")
						})
					}
				})
			}
		}
		// Prefills: a perplexity window (T = 1024) and the `ar` mode's full
		// recomputation of a 256-entry cache.
		for _, T := range []int{1024, 256} {
			for _, variant := range []int{2, 5, 7} {
				b.Run(fmt.Sprintf("prefill_%s_T%d/v%d", m.name, T, variant), func(b *testing.B) {
					p := AttnParams{B: 1, T: T, NH: m.NH, NKV: m.NKV, HS: 64, QStride: m.NH * 64, MaxLen: T, RopeTheta: m.theta}
					a := newAttnCase(b, c, rng, p)
					c.UploadInts(a.lBuf, []int32{int32(T)})
					out := uploadNew(b, c, F32, make([]float32, T*m.NH*64))
					sec := graphTime(b, c, 5, func(int) { c.attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p, variant, Buf{}) })
					flops := 2.0 * 2 * float64(T) * float64(T) / 2 * 64 * float64(m.NH) // causal: half the scores
					b.ReportMetric(flops/sec/1e12, "TFLOP/s")
					b.ReportMetric(sec*1e6, "µs/call")
				})
			}
		}
	}
}

// TestCUDAAttentionCapture replays a captured decode attention (split, with
// the backend's own scratch) after the lengths change on the device, as a
// captured decode step does every token.
func TestCUDAAttentionCapture(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(15, 16))
	for _, maxLen := range []int{700, 300} { // split v3; one block per kv head (v4)
		testAttentionCapture(t, c, rng, maxLen)
	}
}

func testAttentionCapture(t *testing.T, c *CUDA, rng *rand.Rand, maxLen int) {
	p := AttnParams{B: 2, T: 1, NH: 9, NKV: 3, HS: 64, QStride: 15 * 64, MaxLen: maxLen, RopeTheta: 10000}
	a := newAttnCase(t, c, rng, p)
	out := alloc(t, c, F32, p.B*p.NH*p.HS)
	c.Attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p) // sizes the scratch outside the capture
	checkOK(t, c)
	r, err := c.Capture(func() { c.Attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p) })
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for step, lens := range [][]int32{{1, 700}, {699, 33}, {0, 64}, {257, 511}} {
		for i := range lens {
			lens[i] = min(lens[i], int32(maxLen))
		}
		got, want := a.replay(t, c, r, out, lens)
		compare(t, fmt.Sprintf("replay %d lens %v", step, lens), got, want, 1e-5*maxAbs(want), 1e-5)
	}
}

// TestCUDAAttentionSharedScratch alternates decode shapes (T = 3, 1, 2 and
// B = 3, 1) through the public Attention, which shares one scratch: a call
// must not leave anything behind (partials over counters) that breaks the
// next one of another shape.
func TestCUDAAttentionSharedScratch(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(17, 18))
	var cases []*attnCase
	for _, bt := range [][2]int{{3, 3}, {1, 1}, {3, 2}, {1, 3}, {3, 1}} {
		p := AttnParams{B: bt[0], T: bt[1], NH: 12, NKV: 12, HS: 64, QStride: 12 * 64, MaxLen: 900}
		cases = append(cases, newAttnCase(t, c, rng, p))
	}
	for round := 0; round < 2; round++ {
		for i, a := range cases {
			p := a.p
			out := alloc(t, c, F32, p.B*p.T*p.NH*p.HS)
			poison(t, c, out)
			c.Attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p)
			got := download(t, c, out)
			c.Free(out)
			want := a.want()
			compare(t, fmt.Sprintf("round %d case %d B%d T%d", round, i, p.B, p.T), got, want, 1e-5*maxAbs(want), 1e-5)
		}
	}
}
