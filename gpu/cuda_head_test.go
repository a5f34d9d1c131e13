//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

// newTestHead uploads a random fp16 head [V, C] (rows of varied scale, some
// duplicated so that exact ties occur) and screens it.
func newTestHead(t *testing.T, c *CUDA, r *rand.Rand, V, C int) (w []float32, wb Buf, h *HeadScreen) {
	t.Helper()
	w = make([]float32, V*C)
	for i := 0; i < V; i++ {
		scale := 0.02 * math.Exp(r.NormFloat64()*0.5)
		for k := 0; k < C; k++ {
			w[i*C+k] = float32(r.NormFloat64() * scale)
		}
		if i > 0 && i%97 == 0 { // a duplicate of the row before: tied logits
			copy(w[i*C:(i+1)*C], w[(i-1)*C:i*C])
		}
	}
	w = roundF16(w)
	wb = uploadNew(t, c, F16, w)
	h, err := c.newHeadScreen(wb, V, C)
	if err != nil {
		t.Fatal(err)
	}
	return w, wb, h
}

// TestCUDAHeadQuantize compares the device's int8 copy with ref.HeadQuantize:
// the same bytes and scales, bounds within a rounding.
func TestCUDAHeadQuantize(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(90, 91))
	for _, sh := range []struct{ V, C int }{{1000, 64}, {4099, 576}, {513, 1024}} {
		w, wb, h := newTestHead(t, c, r, sh.V, sh.C)
		wantQ, wantRows := ref.HeadQuantize(w, sh.V, sh.C)
		words := downloadInts(t, c, h.Q)
		rows := download(t, c, h.Rows)
		for i, want := range wantQ {
			if got := int8(words[i/4] >> (8 * (i % 4))); got != want {
				t.Fatalf("V=%d C=%d: byte %d is %d, want %d", sh.V, sh.C, i, got, want)
			}
		}
		for i := 0; i < len(wantRows); i += 4 {
			if rows[i] != wantRows[i] || rows[i+3] != 0 {
				t.Fatalf("V=%d C=%d row %d: scale %g, want %g", sh.V, sh.C, i/4, rows[i], wantRows[i])
			}
			for j := 1; j <= 2; j++ {
				if d := math.Abs(float64(rows[i+j] - wantRows[i+j])); d > 1e-6*float64(wantRows[i+j]) {
					t.Fatalf("V=%d C=%d row %d: bound %d is %g, want %g", sh.V, sh.C, i/4, j, rows[i+j], wantRows[i+j])
				}
			}
		}
		h.Close()
		c.Free(wb)
	}
	if _, err := c.NewHeadScreen(alloc(t, c, F16, 20000*48), 20000, 48); err == nil {
		t.Error("a head of 48 columns (not a multiple of 32) was screened")
	}
	if _, err := c.NewHeadScreen(alloc(t, c, F16, 3000*64), 3000, 64); err == nil {
		t.Error("a head MatMul runs through fused.cu's GEMV was screened")
	}
}

// headInput is a test input row: normal, or one of the cases that stress
// the bound (zeros, a huge or tiny scale, outliers, a non-finite value).
func headInput(r *rand.Rand, C, kind int) []float32 {
	x := randNormal(r, C, 1, 0)
	switch kind {
	case 1:
		clear(x)
	case 2:
		for i := range x {
			x[i] *= 1e30
		}
	case 3:
		for i := range x {
			x[i] *= 1e-35
		}
	case 4:
		for i := 0; i < 5; i++ {
			x[r.IntN(C)] *= 200
		}
	case 5:
		x[r.IntN(C)] = float32(math.Inf(1))
	case 6:
		x[r.IntN(C)] = float32(math.NaN())
	}
	return x
}

// TestCUDAHeadSample checks the screen against the unscreened path on
// fresh random heads and inputs: every row's approximation is ref.HeadScreen's
// and within its bound of the GEMV's logit (matmul.cu's kernel, whose sums
// the screen's exact rows repeat), every logit it writes is the GEMV's bit
// for bit, and every pick equals MatMul then Sample's, with bans, over top-k
// 1 to 64.
func TestCUDAHeadSample(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(92, 93))
	const maxBan = 6
	cands, rowsSeen := 0, 0
	shapes := []struct{ V, C, B int }{{49152, 576, 1}, {50257, 768, 2}, {3000, 64, 3}, {700, 1024, 1}}
	kinds, topKs := 6, []int{1, 5, 20, 64}
	if testing.Short() { // under compute-sanitizer
		shapes, kinds, topKs = shapes[2:], 5, []int{5, 20}
	}
	for _, sh := range shapes {
		w, wb, h := newTestHead(t, c, r, sh.V, sh.C)
		B, V, C := sh.B, sh.V, sh.C
		padded := ref.HeadRows(V)
		wantQ, wantRows := ref.HeadQuantize(w, V, C)
		for kind := 0; kind <= kinds; kind++ {
			for _, topK := range topKs {
				xs := make([]float32, 0, B*C)
				for b := 0; b < B; b++ {
					xs = append(xs, headInput(r, C, kind)...)
				}
				x := uploadNew(t, c, F32, xs)
				full := alloc(t, c, F32, B*V)
				c.matmul(full, x, wb, Buf{}, B, C, V, false, 1) // matmul.cu's GEMV, whatever the shape
				checkOK(t, c)
				logits := download(t, c, full)
				banned := make([]int32, B*maxBan)
				for b := 0; b < B; b++ {
					n := r.IntN(maxBan + 1)
					for i := 0; i < maxBan; i++ {
						switch {
						case i == n:
							banned[b*maxBan+i] = -1
						case i == 0:
							banned[b*maxBan+i] = argmax(logits[b*V : (b+1)*V]) // ban the greedy pick
						default:
							banned[b*maxBan+i] = int32(r.IntN(V + 2))
						}
					}
				}
				bn, ct := uploadInts(t, c, banned), uploadInts(t, c, randInts(r, B, 1<<31-1))
				p := SampleParams{B: B, V: V, TopK: topK, MaxBan: maxBan, Seed: r.Uint64()}
				want, got := alloc(t, c, I32, B), alloc(t, c, I32, B)
				c.sample(want, full, bn, ct, p, 5)
				screened, debug, stats := alloc(t, c, F32, B*V), alloc(t, c, F32, 2*B*padded), uploadInts(t, c, []int32{0})
				poison(t, c, screened)
				poison(t, c, got)
				c.headSample(got, screened, x, h, bn, ct, p, debug, stats)
				checkOK(t, c)
				name := fmt.Sprintf("V=%d C=%d input %d top-%d", V, C, kind, topK)
				if g, w := downloadInts(t, c, got), downloadInts(t, c, want); fmt.Sprint(g) != fmt.Sprint(w) {
					t.Errorf("%s: drew %v, the unscreened path %v", name, g, w)
				}
				sl, dbg, n := download(t, c, screened), download(t, c, debug), downloadInts(t, c, stats)[0]
				written := 0
				for i, v := range sl {
					if math.Float32bits(v) == math.Float32bits(float32(math.NaN())) {
						continue // poison: not a candidate (the device's NaN has other bits)
					}
					written++
					if math.Float32bits(v) != math.Float32bits(logits[i]) {
						t.Fatalf("%s: logit %d is %g, the GEMV's %g", name, i, v, logits[i])
					}
				}
				if kind != 6 && written != int(n) {
					t.Errorf("%s: %d logits written, %d rows recomputed", name, written, n)
				}
				cands += int(n)
				rowsSeen += B * V
				for b := 0; b < B; b++ {
					a, bound := ref.HeadScreen(wantQ, wantRows, xs[b*C:(b+1)*C], V, C)
					for i := 0; i < V; i++ {
						ga, gb, l := dbg[2*(b*padded+i)], dbg[2*(b*padded+i)+1], logits[b*V+i]
						if math.Float32bits(ga) != math.Float32bits(a[i]) && !(math.IsNaN(float64(ga)) && math.IsNaN(float64(a[i]))) {
							t.Fatalf("%s row %d/%d: approximation %g, ref.HeadScreen %g", name, b, i, ga, a[i])
						}
						if !(math.Abs(float64(gb-bound[i])) <= 1e-4*float64(bound[i])) && !(math.IsInf(float64(gb), 1) && math.IsInf(float64(bound[i]), 1)) {
							t.Fatalf("%s row %d/%d: bound %g, ref.HeadScreen %g", name, b, i, gb, bound[i])
						}
						if d := math.Abs(float64(l - ga)); d > float64(gb) && !math.IsNaN(float64(l)) && !math.IsInf(float64(l), 0) {
							t.Fatalf("%s row %d/%d: |logit %g − approximation %g| = %g above the bound %g", name, b, i, l, ga, d, gb)
						}
					}
				}
				for _, buf := range []Buf{x, full, bn, ct, want, got, screened, debug, stats} {
					c.Free(buf)
				}
			}
		}
		h.Close()
		c.Free(wb)
	}
	t.Logf("screened head: %d of %d rows recomputed exactly (%.2f%%)", cands, rowsSeen, 100*float64(cands)/float64(rowsSeen))
}

// TestCUDAHeadGEMVOrder: the screen's exact rows repeat matmul.cu's GEMV,
// which is what MatMul runs for the LM heads of the two families (more
// blocks than the fused GEMV takes): the default path gives the same bits,
// and NewHeadScreen takes those heads.
func TestCUDAHeadGEMVOrder(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(94, 95))
	for _, sh := range []struct{ V, C int }{{49152, 576}, {50257, 768}} {
		w := uploadNew(t, c, F16, roundF16(randNormal(r, sh.V*sh.C, 0.02, 0)))
		x := uploadNew(t, c, F32, randNormal(r, sh.C, 1, 0))
		a, b := alloc(t, c, F32, sh.V), alloc(t, c, F32, sh.V)
		c.MatMul(a, x, w, Buf{}, 1, sh.C, sh.V, false)
		c.matmul(b, x, w, Buf{}, 1, sh.C, sh.V, false, 1)
		if h, err := c.NewHeadScreen(w, sh.V, sh.C); err != nil {
			t.Errorf("V=%d C=%d: %v", sh.V, sh.C, err)
		} else {
			h.Close()
		}
		ga, gb := download(t, c, a), download(t, c, b)
		for i := range ga {
			if math.Float32bits(ga[i]) != math.Float32bits(gb[i]) {
				t.Fatalf("V=%d C=%d row %d: MatMul %g, matmul.cu's GEMV %g", sh.V, sh.C, i, ga[i], gb[i])
			}
		}
		for _, buf := range []Buf{w, x, a, b} {
			c.Free(buf)
		}
	}
}

// TestCUDAHeadSuccessors chains draws through a 2-gram memory with the
// screened head and with MatMul then Sample, on two memories that must stay
// identical, at top-20 (the decode default after the first token).
func TestCUDAHeadSuccessors(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(96, 97))
	const B, V, C, keep, steps = 2, 5000, 576, 40, 60
	_, wb, h := newTestHead(t, c, r, V, C)
	dirs := SuccessorDirs(keep)
	pages := 8 + B*steps
	newMem := func(prev Buf) Successors {
		return Successors{Count: uploadInts(t, c, make([]int32, B*V)), Dir: uploadInts(t, c, make([]int32, B*V*dirs)),
			Pages: uploadInts(t, c, make([]int32, 32*pages)), Used: uploadInts(t, c, make([]int32, 1)), Keep: keep,
			Prev: prev, PrevStride: 1}
	}
	prev := alloc(t, c, I32, B)
	m1, m2 := newMem(prev), newMem(prev)
	full := alloc(t, c, F32, B*V)
	o1, o2, ct := alloc(t, c, I32, B), alloc(t, c, I32, B), alloc(t, c, I32, B)
	for step := 0; step < steps; step++ {
		prevs := randInts(r, B, 3) // few previous tokens: rings fill and bans bite
		c.UploadInts(prev, prevs)
		c.UploadInts(ct, randInts(r, B, 1<<31-1))
		x := uploadNew(t, c, F32, randNormal(r, B*C, 1, 0))
		p := SampleParams{B: B, V: V, TopK: 20, Seed: 5, Succ: m1}
		c.matmul(full, x, wb, Buf{}, B, C, V, false, 1)
		c.sample(o1, full, Buf{}, ct, p, 5)
		p.Succ = m2
		c.HeadSample(o2, Buf{}, x, h, Buf{}, ct, p)
		checkOK(t, c)
		if g, w := downloadInts(t, c, o2), downloadInts(t, c, o1); fmt.Sprint(g) != fmt.Sprint(w) {
			t.Fatalf("step %d: drew %v, the unscreened path %v", step, g, w)
		}
		c.Free(x)
	}
	// The same successors kept (pages are taken in whatever order rows ask).
	mem := func(m Successors) *ref.Successors {
		return &ref.Successors{Count: downloadInts(t, c, m.Count), Dir: downloadInts(t, c, m.Dir),
			Pages: downloadInts(t, c, m.Pages), Used: downloadInts(t, c, m.Used), Keep: keep, Dirs: dirs}
	}
	d1, d2 := mem(m1), mem(m2)
	for b := 0; b < B; b++ {
		for prev := int32(0); prev < 3; prev++ {
			var s1, s2 []int32
			d1.Each(b, V, prev, func(t int32) { s1 = append(s1, t) })
			d2.Each(b, V, prev, func(t int32) { s2 = append(s2, t) })
			if len(s1) == 0 || fmt.Sprint(s1) != fmt.Sprint(s2) {
				t.Fatalf("row %d token %d: the screened path keeps %v, the unscreened %v", b, prev, s2, s1)
			}
		}
	}
	h.Close()
	c.Free(wb)
}

// BenchmarkCUDAHeadSample times a sampled step's tail at the two families'
// head shapes (N(0, 0.02) weights, as RandomWeights; top-20 with one ban):
// the final RMSNorm, then the LM head and the sampler, unscreened (GEMV,
// chunk and final kernels) or screened (head.cu and the final kernel).
// cands/step is the rows the screen recomputed.
func BenchmarkCUDAHeadSample(b *testing.B) {
	c := newTestCUDA(b)
	r := rand.New(rand.NewPCG(98, 99))
	for _, sh := range []struct {
		name string
		V, C int
	}{{"smollm2", 49152, 576}, {"distilgpt2", 50257, 768}} {
		V, C := sh.V, sh.C
		wb := uploadNew(b, c, F16, randNormal(r, V*C, 0.02, 0))
		h, err := c.NewHeadScreen(wb, V, C)
		if err != nil {
			b.Fatal(err)
		}
		x, xn := uploadNew(b, c, F32, randNormal(r, C, 1, 0)), alloc(b, c, F32, C)
		nw := uploadNew(b, c, F16, randNormal(r, C, 0.05, 1))
		logits, out := alloc(b, c, F32, V), alloc(b, c, I32, 1)
		banned, counter := uploadInts(b, c, []int32{0, -1}), uploadInts(b, c, []int32{3})
		p := SampleParams{B: 1, V: V, TopK: 20, MaxBan: 2, Seed: 5}
		norm := func() { c.RMSNorm(xn, x, nw, 1, C, 1e-5) }
		b.Run(sh.name+"/unscreened", func(b *testing.B) {
			benchGraph(b, c, 0, func() {
				norm()
				c.MatMul(logits, xn, wb, Buf{}, 1, C, V, false)
				c.Sample(out, logits, banned, counter, p)
			})
		})
		b.Run(sh.name+"/screened", func(b *testing.B) {
			benchGraph(b, c, 0, func() { norm(); c.HeadSample(out, logits, xn, h, banned, counter, p) })
			stats := uploadInts(b, c, []int32{0})
			norm()
			c.headSample(out, logits, xn, h, banned, counter, p, Buf{}, stats)
			b.ReportMetric(float64(downloadInts(b, c, stats)[0]), "cands/step")
			c.Free(stats)
		})
		h.Close()
		for _, buf := range []Buf{wb, x, xn, nw, logits, out, banned, counter} {
			c.Free(buf)
		}
	}
}
