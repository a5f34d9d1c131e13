//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

// TestCUDASample draws with random logits, bans and counters and compares
// every pick with ref.Sample; the kernel reproduces the reference's
// arithmetic, so it must agree on (nearly) every trial and always for top-1.
func TestCUDASample(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(70, 71))
	total, mismatches := 0, 0
	for _, tc := range []struct {
		B, V, rounds int
		ties         bool // logits rounded to a coarse grid: many exact ties (and ±0)
	}{
		{64, 50257, 2, false},
		{1, 50257, 4, false}, // a decode step's shape
		{8, 70000, 1, false}, // v5: 137 chunk lists, more than its final kernel preloads (4 a warp)
		{16, 1000, 2, true},
		{3, 7, 1, false},
		{128, 1000, 4, false},
		{128, 1000, 2, true},
		{64, 7, 1, false},
		{32, 130, 2, true},
	} {
		for _, topK := range []int{1, 5, 9, 40, 64} {
			rounds := tc.rounds
			if testing.Short() {
				rounds = 1
			}
			for round := 0; round < rounds; round++ {
				const maxBan = 5
				logitsHost := randNormal(r, tc.B*tc.V, 3, 0)
				if tc.ties {
					for i, v := range logitsHost {
						logitsHost[i] = float32(math.Round(float64(v)*2) / 2)
						if logitsHost[i] == 0 && r.IntN(2) == 0 {
							logitsHost[i] = float32(math.Copysign(0, -1))
						}
					}
				}
				banned := make([]int32, tc.B*maxBan)
				for b := 0; b < tc.B; b++ {
					n := r.IntN(maxBan + 1)
					for i := 0; i < maxBan; i++ {
						switch {
						case i == n:
							banned[b*maxBan+i] = -1
						case i == 0 && b%3 == 0:
							banned[b*maxBan+i] = argmax(logitsHost[b*tc.V : (b+1)*tc.V]) // ban the greedy pick
						default:
							banned[b*maxBan+i] = int32(r.IntN(tc.V + 2)) // ids ≥ V are ignored
						}
					}
				}
				counter := randInts(r, tc.B, 1<<31-1)
				seed := r.Uint64()
				want := make([]int32, tc.B)
				ref.Sample(want, logitsHost, banned, counter, tc.B, tc.V, topK, maxBan, seed, nil)
				out, also := alloc(t, c, I32, tc.B), alloc(t, c, I32, tc.B)
				p := SampleParams{B: tc.B, V: tc.V, TopK: topK, MaxBan: maxBan, Seed: seed, Also: also}
				lg, bn, ct := uploadNew(t, c, F32, logitsHost), uploadInts(t, c, banned), uploadInts(t, c, counter)
				for variant := 1; variant <= 5; variant++ {
					poison(t, c, out)
					poison(t, c, also)
					c.sample(out, lg, bn, ct, p, variant)
					checkOK(t, c)
					got := downloadInts(t, c, out)
					if a := downloadInts(t, c, also); !slices.Equal(a, got) {
						t.Errorf("v%d V=%d topK=%d: Also got %v, out %v", variant, tc.V, topK, a[:min(4, len(a))], got[:min(4, len(got))])
					}
					bad := 0
					for b := range want {
						if got[b] != want[b] {
							bad++
							if bad <= 3 {
								t.Logf("v%d V=%d topK=%d ties=%v row %d: got %d, want %d", variant, tc.V, topK, tc.ties, b, got[b], want[b])
							}
						}
					}
					if topK == 1 && bad > 0 {
						t.Errorf("v%d greedy (topK=1) V=%d: %d of %d rows differ from the reference", variant, tc.V, bad, tc.B)
					}
					total += tc.B
					mismatches += bad
				}
				c.Free(lg)
				c.Free(bn)
				c.Free(ct)
				c.Free(out)
				c.Free(also)
			}
		}
	}
	t.Logf("sample: %d of %d picks differ from ref.Sample", mismatches, total)
	if float64(mismatches) > 0.001*float64(total) {
		t.Errorf("sample: %d of %d picks differ from ref.Sample (> 0.1%%)", mismatches, total)
	}
}

func TestCUDASampleEdges(t *testing.T) {
	c := newTestCUDA(t)
	// Everything banned: −1. Fewer tokens than top-k: sample among them.
	logits := uploadNew(t, c, F32, []float32{1, 2, 3, 0.5, 0.25, 4})
	banned := uploadInts(t, c, []int32{0, 1, 2, -1, 9, 9})
	counter := uploadInts(t, c, []int32{7, 8})
	out := alloc(t, c, I32, 2)
	c.Sample(out, logits, banned, counter, SampleParams{B: 2, V: 3, TopK: 64, MaxBan: 3, Seed: 1})
	checkOK(t, c)
	got := downloadInts(t, c, out)
	want := make([]int32, 2)
	ref.Sample(want, []float32{1, 2, 3, 0.5, 0.25, 4}, []int32{0, 1, 2, -1, 9, 9}, []int32{7, 8}, 2, 3, 64, 3, 1, nil)
	if got[0] != -1 || got[1] != want[1] {
		t.Errorf("edges: got %v, want [-1 %d]", got, want[1])
	}
	c.Sample(out, logits, Buf{}, counter, SampleParams{B: 2, V: 3, TopK: 65})
	if c.Err() == nil {
		t.Error("top-k 65: no error")
	}
}

func argmax(v []float32) int32 {
	best := 0
	for i := range v {
		if v[i] > v[best] {
			best = i
		}
	}
	return int32(best)
}

func BenchmarkCUDASample(b *testing.B) {
	for _, tc := range []struct{ B, V, topK, variant int }{
		{1, 50257, 1, 4}, {1, 50257, 1, 5}, {1, 50257, 40, 4}, {1, 50257, 40, 5},
		{1, 49152, 64, 5}, {16, 50257, 40, 4}, {16, 50257, 40, 5}, {64, 50257, 40, 5},
	} {
		b.Run(fmt.Sprintf("B%d_V%d_top%d_v%d", tc.B, tc.V, tc.topK, tc.variant), func(b *testing.B) {
			c := newTestCUDA(b)
			r := rand.New(rand.NewPCG(72, 73))
			logits := uploadNew(b, c, F32, randNormal(r, tc.B*tc.V, 3, 0))
			banned := uploadInts(b, c, append(randInts(r, tc.B*4, tc.V), -1))
			counter := uploadInts(b, c, randInts(r, tc.B, 1000))
			out := alloc(b, c, I32, tc.B)
			p := SampleParams{B: tc.B, V: tc.V, TopK: tc.topK, MaxBan: 4, Seed: 5}
			benchGraph(b, c, int64(tc.B*tc.V*4), func() {
				c.sample(out, logits, banned, counter, p, tc.variant)
			})
		})
	}
}

// TestCUDASampleCaptured replays a captured Sample over a GPT-2-sized
// vocabulary (the staged kernel, with its large shared memory) with new
// counters written to pinned memory between replays.
func TestCUDASampleCaptured(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(74, 75))
	const B, V, maxBan = 2, 50257, 3
	logitsHost := randNormal(r, B*V, 3, 0)
	banned := []int32{5, 77, -1, 9, -1, 0}
	logits, bn := uploadNew(t, c, F32, logitsHost), uploadInts(t, c, banned)
	counter, out := alloc(t, c, I32, B), alloc(t, c, I32, B)
	in, err := c.NewHostInts(B)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	res, err := c.NewHostInts(B)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Close()
	p := SampleParams{B: B, V: V, TopK: 50, MaxBan: maxBan, Seed: 1234}
	rep, err := c.Capture(func() {
		c.CopyIn(counter, in)
		c.Sample(out, logits, bn, counter, p)
		c.CopyOut(res, out)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	for step := 0; step < 10; step++ {
		in.Ints()[0], in.Ints()[1] = int32(step), int32(1000+step)
		rep.Run()
		checkOK(t, c)
		want := make([]int32, B)
		ref.Sample(want, logitsHost, banned, in.Ints(), B, V, p.TopK, maxBan, p.Seed, nil)
		if got := res.Ints(); got[0] != want[0] || got[1] != want[1] {
			t.Errorf("step %d: sampled %v, want %v", step, got, want)
		}
	}
}

// TestCUDASampleToHost: Sample writes its picks straight into pinned host
// memory (HostInts.Buf) from a replayed graph, each replay's visible after
// Sync, as the runner's decode step uses it.
func TestCUDASampleToHost(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(78, 79))
	const B, V = 2, 50257
	logitsHost := randNormal(r, B*V, 3, 0)
	logits := uploadNew(t, c, F32, logitsHost)
	counter := alloc(t, c, I32, B)
	in, err := c.NewHostInts(B)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	picks, err := c.NewHostInts(B)
	if err != nil {
		t.Fatal(err)
	}
	defer picks.Close()
	if b := picks.Buf(); b.Len() != B || b.DType() != I32 {
		t.Fatalf("Buf() = %d × %v, want %d × i32", b.Len(), b.DType(), B)
	}
	p := SampleParams{B: B, V: V, TopK: 20, Seed: 4321}
	rep, err := c.Capture(func() {
		c.CopyIn(counter, in)
		c.Sample(picks.Buf(), logits, Buf{}, counter, p)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	for step := 0; step < 20; step++ {
		in.Ints()[0], in.Ints()[1] = int32(7*step), int32(7*step+3)
		picks.Ints()[0], picks.Ints()[1] = -1, -1
		rep.Run()
		checkOK(t, c)
		want := make([]int32, B)
		ref.Sample(want, logitsHost, nil, in.Ints(), B, V, p.TopK, 0, p.Seed, nil)
		if got := picks.Ints(); got[0] != want[0] || got[1] != want[1] {
			t.Errorf("step %d: picks %v, want %v", step, got, want)
		}
	}
}

// BenchmarkCUDAStepEdges times what a decode step runs around its layers,
// each as a graph node the way the runner captures it: the staged integers
// copied in (a memcpy node of ~1 KiB), GPT-2's embedding, sampling over
// GPT-2's vocabulary, the pick copied out, and all four in sequence; then
// distilgpt2's LM head two ways, and the step's tail (LM head, sampling,
// copy out).
func BenchmarkCUDAStepEdges(b *testing.B) {
	c := newTestCUDA(b)
	r := rand.New(rand.NewPCG(76, 77))
	const C, V, maxLen = 768, 50257, 256
	stage, err := c.NewHostInts(maxLen + 8)
	if err != nil {
		b.Fatal(err)
	}
	defer stage.Close()
	pick, err := c.NewHostInts(1)
	if err != nil {
		b.Fatal(err)
	}
	defer pick.Close()
	ints := uploadInts(b, c, make([]int32, maxLen+8)) // token 0 at position 0; counter 0
	wte := uploadNew(b, c, F16, randNormal(r, V*C, 0.1, 0))
	wpe := uploadNew(b, c, F16, randNormal(r, 1024*C, 0.1, 0))
	x := alloc(b, c, F32, C)
	logits := uploadNew(b, c, F32, randNormal(r, V, 3, 0))
	banned := uploadInts(b, c, []int32{-1})
	out := alloc(b, c, I32, 1)
	p := SampleParams{B: 1, V: V, TopK: 20, MaxBan: 1, Seed: 5}
	copyIn := func() { c.CopyIn(ints, stage) }
	embed := func() { c.Embed(x, wte, wpe, ints.View(0, 1), ints.View(1, 1), 1, C) }
	sample := func() { c.Sample(out, logits, banned, ints.View(2, 1), p) }
	copyOut := func() { c.CopyOut(pick, out) }
	// The LM head as the runner's fused path asks for it (NormMatMul: at
	// V rows, a LayerNorm into stream-ordered scratch, then the product)
	// and as two plain operations on a buffer of its own.
	nw, nb := uploadNew(b, c, F16, randNormal(r, C, 0.2, 1)), uploadNew(b, c, F16, randNormal(r, C, 0.1, 0))
	xn := alloc(b, c, F32, C)
	lmFused := func() { c.NormMatMul(logits, x, nw, nb, wte, Buf{}, 1, C, V, 1e-5, LayerNormKind, NoAct, false) }
	lmPlain := func() { c.LayerNorm(xn, x, nw, nb, 1, C, 1e-5); c.MatMul(logits, xn, wte, Buf{}, 1, C, V, false) }
	for _, tc := range []struct {
		name string
		fn   func()
	}{
		{"copyin", copyIn}, {"embed", embed}, {"sample", sample}, {"copyout", copyOut},
		{"all", func() { copyIn(); embed(); sample(); copyOut() }},
		{"lmhead_normmatmul", lmFused}, {"lmhead_norm+matmul", lmPlain},
		{"lmhead_twostep", func() {
			c.normMatMul(logits, x, nw, nb, wte, Buf{}, 1, C, V, 1e-5, LayerNormKind, NoAct, false, fusedTwoStep)
		}},
		{"tail", func() { lmFused(); sample(); copyOut() }},
		{"sample_to_host", func() { c.Sample(pick.Buf(), logits, banned, ints.View(2, 1), p) }},
	} {
		b.Run(tc.name, func(b *testing.B) { benchGraph(b, c, 0, tc.fn) })
	}
}

// TestCUDASampleSuccessors chains greedy draws through a 2-gram memory on
// the device, in every kernel variant, against ref.Sample on the same
// memory: each step's picks must match (the bans decide them), and at the
// end the memory itself (every kept set, the pages used). Few previous
// tokens make long rings: keep 3 wraps within a page, keep 40 spans two.
// Previous tokens sit at a stride of 2, as a two-token step's last rows.
func TestCUDASampleSuccessors(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(72, 73))
	for _, tc := range []struct{ B, V, keep, steps int }{
		{1, 50257, 40, 120}, {3, 1000, 3, 80}, {5, 300, 40, 100},
	} {
		for variant := 1; variant <= 5; variant++ {
			t.Run(fmt.Sprintf("B%d/V%d/keep%d/v%d", tc.B, tc.V, tc.keep, variant), func(t *testing.T) {
				B, V := tc.B, tc.V
				dirs := SuccessorDirs(tc.keep)
				pages := 8 + tc.B*tc.steps // a page a row a step at most: never runs out
				h := &ref.Successors{Count: make([]int32, B*V), Dir: make([]int32, B*V*dirs), Pages: make([]int32, 32*pages),
					Used: make([]int32, 1), Keep: tc.keep, Dirs: dirs, PrevStride: 2}
				for i := 0; i < 30; i++ { // some memory to start from
					b, prev, next := r.IntN(B), int32(r.IntN(4)), int32(r.IntN(V))
					if !h.Contains(b, V, prev, next) {
						h.Record(b, V, prev, next)
					}
				}
				m := Successors{Count: uploadInts(t, c, h.Count), Dir: uploadInts(t, c, h.Dir), Pages: uploadInts(t, c, h.Pages),
					Used: uploadInts(t, c, h.Used), Keep: tc.keep, PrevStride: 2}
				prevBuf := alloc(t, c, I32, 2*B)
				m.Prev = prevBuf.View(1, 2*B-1)
				out := alloc(t, c, I32, B)
				counter := uploadInts(t, c, make([]int32, B))
				p := SampleParams{B: B, V: V, TopK: 1, Seed: 1, Succ: m}
				prevs := make([]int32, 2*B)
				want := make([]int32, B)
				for step := 0; step < tc.steps; step++ {
					for b := 0; b < B; b++ {
						prevs[2*b+1] = int32(r.IntN(4))
						if step%3 == 0 {
							prevs[2*b+1] = int32(r.IntN(V + 1)) // V: outside, nothing banned or recorded
						}
					}
					logits := randNormal(r, B*V, 3, 0)
					h.Prev = prevs[1:]
					ref.Sample(want, logits, nil, make([]int32, B), B, V, 1, 0, 1, h)
					c.UploadInts(prevBuf, prevs)
					lg := uploadNew(t, c, F32, logits)
					poison(t, c, out)
					c.sample(out, lg, Buf{}, counter, p, variant)
					checkOK(t, c)
					c.Free(lg)
					got := downloadInts(t, c, out)
					for b := range want {
						if got[b] != want[b] {
							t.Fatalf("step %d row %d (after %d): drew %d, want %d", step, b, prevs[2*b+1], got[b], want[b])
						}
					}
				}
				d := &ref.Successors{Count: downloadInts(t, c, m.Count), Dir: downloadInts(t, c, m.Dir), Pages: downloadInts(t, c, m.Pages),
					Used: downloadInts(t, c, m.Used), Keep: tc.keep, Dirs: dirs}
				if d.Used[0] != h.Used[0] {
					t.Errorf("%d pages used, want %d", d.Used[0], h.Used[0])
				}
				for b := 0; b < B; b++ {
					for prev := int32(0); prev < int32(V); prev++ {
						var got, w []int32
						d.Each(b, V, prev, func(t int32) { got = append(got, t) })
						h.Each(b, V, prev, func(t int32) { w = append(w, t) })
						if fmt.Sprint(got) != fmt.Sprint(w) {
							t.Fatalf("row %d token %d: the device keeps %v, want %v", b, prev, got, w)
						}
					}
				}
			})
		}
	}
}
