//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/x448/float16"
)

// randVals draws n values uniform in [-scale, scale).
func randVals(rng *rand.Rand, n int, scale float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = (2*rng.Float32() - 1) * scale
	}
	return v
}

// roundF16 is v as the device holds it in half precision.
func roundF16(v []float32) []float32 {
	out := make([]float32, len(v))
	for i, x := range v {
		out[i] = float16.Fromfloat32(x).Float32()
	}
	return out
}

// maxAbs is max |v|, the scale of the relative tolerances (atol = rtol·max|ref|).
func maxAbs(v []float32) float64 {
	m := 0.0
	for _, x := range v {
		m = math.Max(m, math.Abs(float64(x)))
	}
	return m
}

// relErr is max|got−want| / max|want| (NaN anywhere gives +Inf).
func relErr(got, want []float32) float64 {
	d := 0.0
	for i := range want {
		e := math.Abs(float64(got[i]) - float64(want[i]))
		if math.IsNaN(e) {
			return math.Inf(1)
		}
		d = math.Max(d, e)
	}
	return d / math.Max(maxAbs(want), 1e-30)
}

func TestCUDAMatMul(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(1, 2))
	shapes := []struct{ N, C, OC int }{
		{1, 64, 33}, {1, 768, 2304}, {2, 72, 129}, {3, 576, 961}, {4, 3072, 65}, {5, 1536, 77},
		{1, 3072, 769}, {1, 1536, 130}, // one row, long rows: warps of 12 chunks a lane (fp16)
		{8, 67, 45},                  // C not a multiple of the vector: scalar GEMV
		{4, 768, 300}, {6, 768, 130}, // lanes split evenly (32 per group, 3 chunks each)
		{9, 40, 17}, {37, 576, 203}, {37, 67, 51}, {200, 768, 97}, {64, 64, 64},
		{70, 3072, 200}, {1030, 72, 1100}, // GEMM v2: 32-row tiles, many k-tiles; 64-row tiles
	}
	for _, sh := range shapes {
		for _, wdt := range []DType{F32, F16} {
			for _, biasDT := range []int{-1, int(wdt), int(F32 + F16 - wdt)} { // none, same, the other dtype
				for _, acc := range []bool{false, true} {
					for _, misalign := range []int{0, 1} {
						if misalign == 1 && (sh.N > 9 || biasDT != int(wdt) || acc) {
							continue // one misaligned run per shape and dtype is enough
						}
						// Variant 1: the first GEMM kernels (N > 8) or the plain
						// GEMV (N ≤ 8); 2–4 the other GEMMs, side by side.
						variants := []int{gemmAuto, gemmFirst}
						if sh.N > 8 {
							variants = append(variants, gemmV2, gemmV3, gemmV3Plain)
						}
						for _, v := range variants {
							name := fmt.Sprintf("N%d_C%d_OC%d_w%v_bias%d_acc%v_mis%d_v%d", sh.N, sh.C, sh.OC, wdt, biasDT, acc, misalign, v)
							testMatMul(t, c, rng, name, sh.N, sh.C, sh.OC, wdt, biasDT, acc, misalign, v)
						}
					}
				}
			}
		}
	}
}

// TestCUDAMatMulLead: MatMulLead gives MatMul's accumulated result bit for
// bit, on the one-token path (which lets the next kernel launch early) and
// on the shapes that fall back to the other products; in a captured graph
// too, after a product that writes its input and before one that reads its
// output.
func TestCUDAMatMulLead(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(5, 6))
	for _, sh := range []struct{ N, C, OC int }{{1, 576, 576}, {1, 3072, 768}, {2, 72, 129}, {8, 67, 45}, {12, 576, 203}} {
		for _, wdt := range []DType{F32, F16} {
			for _, withBias := range []bool{false, true} {
				name := fmt.Sprintf("N%d_C%d_OC%d_w%v_bias%v", sh.N, sh.C, sh.OC, wdt, withBias)
				src := randVals(rng, sh.N*sh.C, 1)
				pre := randVals(rng, sh.C*sh.C, 1/float32(math.Sqrt(float64(sh.C))))
				w := randVals(rng, sh.OC*sh.C, 1/float32(math.Sqrt(float64(sh.C))))
				prev := randVals(rng, sh.N*sh.OC, 1)
				next := randVals(rng, sh.OC*sh.OC, 1/float32(math.Sqrt(float64(sh.OC))))
				srcBuf, preBuf, wBuf, nextBuf := uploadNew(t, c, F32, src), uploadNew(t, c, wdt, pre), uploadNew(t, c, wdt, w), uploadNew(t, c, wdt, next)
				in, y := alloc(t, c, F32, sh.N*sh.C), alloc(t, c, F32, sh.N*sh.OC)
				var bBuf Buf
				if withBias {
					bBuf = uploadNew(t, c, wdt, randVals(rng, sh.OC, 0.5))
				}
				// in = src·preᵀ; out += in·wᵀ + b; y = out·nextᵀ, plain and with
				// the lead, each captured and replayed twice.
				results := [2][2][]float32{}
				for lead := 0; lead < 2; lead++ {
					out := uploadNew(t, c, F32, prev)
					r, err := c.Capture(func() {
						c.MatMul(in, srcBuf, preBuf, Buf{}, sh.N, sh.C, sh.C, false)
						if lead == 1 {
							c.MatMulLead(out, in, wBuf, bBuf, sh.N, sh.C, sh.OC)
						} else {
							c.MatMul(out, in, wBuf, bBuf, sh.N, sh.C, sh.OC, true)
						}
						c.MatMul(y, out, nextBuf, Buf{}, sh.N, sh.OC, sh.OC, false)
					})
					if err != nil {
						t.Fatalf("%s: capture: %v", name, err)
					}
					r.Run()
					r.Run()
					checkOK(t, c)
					results[lead] = [2][]float32{download(t, c, out), download(t, c, y)}
					r.Close()
					c.Free(out)
				}
				for i, what := range []string{"out", "y"} {
					if !slices.Equal(results[0][i], results[1][i]) {
						t.Errorf("%s: %s with MatMulLead differs from MatMul's", name, what)
					}
				}
				for _, b := range []Buf{srcBuf, preBuf, wBuf, nextBuf, in, y, bBuf} {
					if !b.IsZero() {
						c.Free(b)
					}
				}
			}
		}
	}
	// Bad arguments: one error, as MatMul.
	c.MatMulLead(Buf{}, Buf{}, Buf{}, Buf{}, 1, 2, 2)
	if c.Err() == nil {
		t.Error("MatMulLead with empty buffers: no error")
	}
}

func testMatMul(t *testing.T, c *CUDA, rng *rand.Rand, name string, N, C, OC int, wdt DType, biasDT int, acc bool, misalign, variant int) {
	t.Helper()
	in := randVals(rng, N*C, 1)
	w := randVals(rng, OC*C, 1/float32(math.Sqrt(float64(C))))
	var bias []float32
	if biasDT >= 0 {
		bias = randVals(rng, OC, 0.5)
	}
	prev := randVals(rng, N*OC, 1)

	// The reference sees what the device sees: half weights (and, on the
	// tensor-core path N > 8, half activations) rounded as the device rounds.
	refIn, refW, refBias := in, w, bias
	if wdt == F16 {
		refW = roundF16(w)
		if N > 8 {
			refIn = roundF16(in)
		}
	}
	if biasDT == int(F16) {
		refBias = roundF16(bias)
	}
	want := make([]float32, N*OC)
	if acc {
		copy(want, prev)
	}
	ref.MatMul(want, refIn, refW, refBias, N, C, OC, acc)

	// misalign = 1 shifts in by one float: rows lose 16-byte alignment, so
	// the scalar GEMV and the unvectorised GEMM loads run.
	inBuf := uploadNew(t, c, F32, append(make([]float32, misalign), in...)).View(misalign, N*C)
	wBuf := uploadNew(t, c, wdt, w)
	var bBuf Buf
	if biasDT >= 0 {
		bBuf = uploadNew(t, c, DType(biasDT), bias)
	}
	out := uploadNew(t, c, F32, prev)
	if !acc {
		poison(t, c, out)
	}
	c.matmul(out, inBuf, wBuf, bBuf, N, C, OC, acc, variant)
	got := download(t, c, out)
	rtol := 1e-5
	if wdt == F16 || biasDT == int(F16) {
		rtol = 1e-3
	}
	if e := relErr(got, want); e > rtol {
		t.Errorf("%s: max|Δ|/max|ref| = %.3g > %g", name, e, rtol)
	}
	compare(t, name, got, want, rtol*maxAbs(want), rtol)
}

// graphTime captures reps calls fn(0..reps-1) as one CUDA graph, replays it
// b.N times and returns seconds per call. Graph replays keep the host's
// per-launch cost (cgo, set-device, launch) out of kernel times, as in a
// captured decode step.
func graphTime(b *testing.B, c *CUDA, reps int, fn func(i int)) float64 {
	b.Helper()
	r, err := c.Capture(func() {
		for i := 0; i < reps; i++ {
			fn(i)
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	r.Run()
	r.Run()
	if err := c.Sync(); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		r.Run()
	}
	if err := c.Sync(); err != nil {
		b.Fatal(err)
	}
	el := time.Since(start)
	b.StopTimer()
	return el.Seconds() / float64(b.N*reps)
}

// benchPool is one large buffer of random half values that benchmarks cut
// into many copies of a matrix, rotated between calls so that the 50 MB L2
// never holds the weights (the decode step streams them from HBM too).
const benchPoolElems = 160 << 20 // 320 MB of halves

func newBenchPool(b *testing.B, c *CUDA, dt DType) Buf {
	pool, err := c.Alloc(dt, benchPoolElems/dt.Size()*2)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Free(pool) })
	rng := rand.New(rand.NewPCG(7, 7))
	chunk := randVals(rng, 1<<20, 0.05)
	for off := 0; off < pool.Len(); off += len(chunk) {
		n := min(len(chunk), pool.Len()-off)
		c.Upload(pool.View(off, n), chunk[:n])
	}
	if err := c.Sync(); err != nil {
		b.Fatal(err)
	}
	return pool
}

// poolViews cuts pool into as many n-element views (16-byte aligned) as fit.
func poolViews(pool Buf, n int) []Buf {
	step := (n + 7) / 8 * 8
	var v []Buf
	for off := 0; off+n <= pool.Len() && len(v) < 256; off += step {
		v = append(v, pool.View(off, n))
	}
	return v
}

var gemvShapes = []struct {
	name  string
	C, OC int
}{
	{"distil_qkv", 768, 2304}, {"distil_proj", 768, 768}, {"distil_fc", 768, 3072}, {"distil_fcproj", 3072, 768},
	{"distil_lmhead", 768, 50257},
	{"smol_qkv", 576, 960}, {"smol_o", 576, 576}, {"smol_gateup", 576, 3072}, {"smol_down", 1536, 576},
	{"smol_lmhead", 576, 49152},
}

// BenchmarkCUDAMatMulGEMV: decode-time matrix-vector products (N = 1, fp16
// weights) at the model shapes; GB/s counts weight bytes (+ in/out).
// BenchmarkCUDAMatMulGEMV/copy is the device-to-device copy of a 256 MB
// buffer (bytes read + written), the bandwidth yardstick.
func BenchmarkCUDAMatMulGEMV(b *testing.B) {
	c := newTestCUDA(b)
	pool := newBenchPool(b, c, F16)
	rng := rand.New(rand.NewPCG(3, 4))
	b.Run("copy", func(b *testing.B) {
		half := pool.Len() / 2 / 8 * 8
		src, dst := pool.View(0, half), pool.View(half, half)
		bytes := float64(2 * half * 2)
		sec := graphTime(b, c, 10, func(int) { c.copyDevice(dst, src, half) })
		b.ReportMetric(bytes/sec/1e9, "GB/s")
		b.ReportMetric(sec*1e6, "µs/call")
	})
	for _, sh := range gemvShapes {
		for _, n := range []int{1, 4} {
			b.Run(fmt.Sprintf("%s_N%d", sh.name, n), func(b *testing.B) {
				ws := poolViews(pool, sh.OC*sh.C)
				in := uploadNew(b, c, F32, randVals(rng, n*sh.C, 1))
				bias := uploadNew(b, c, F16, randVals(rng, sh.OC, 0.1))
				out := uploadNew(b, c, F32, make([]float32, n*sh.OC))
				bytes := float64(sh.OC*sh.C*2 + sh.OC*2 + n*(sh.C+sh.OC)*4)
				sec := graphTime(b, c, len(ws), func(i int) { c.MatMul(out, in, ws[i], bias, n, sh.C, sh.OC, false) })
				b.ReportMetric(bytes/sec/1e9, "GB/s")
				b.ReportMetric(sec*1e6, "µs/call")
			})
		}
	}
}

// BenchmarkCUDAMatMulGEMM: prefill-size products (N = 256 and 1024), fp16
// (tensor cores) and fp32 (SIMT) weights; TFLOP/s = 2·N·C·OC / time.
func BenchmarkCUDAMatMulGEMM(b *testing.B) {
	c := newTestCUDA(b)
	rng := rand.New(rand.NewPCG(5, 6))
	for _, wdt := range []DType{F16, F32} {
		for _, sh := range []struct{ N, C, OC int }{{256, 768, 2304}, {256, 768, 768}, {256, 768, 3072}, {256, 3072, 768},
			{64, 3072, 768}, {256, 576, 960}, {256, 1536, 576}, {1024, 768, 3072}, {256, 768, 50257}} {
			for _, variant := range []int{1, 0} {
				b.Run(fmt.Sprintf("%v_N%d_C%d_OC%d/v%d", wdt, sh.N, sh.C, sh.OC, variant), func(b *testing.B) {
					in := uploadNew(b, c, F32, randVals(rng, sh.N*sh.C, 1))
					w := uploadNew(b, c, wdt, randVals(rng, sh.OC*sh.C, 0.05))
					bias := uploadNew(b, c, wdt, randVals(rng, sh.OC, 0.1))
					out, err := c.Alloc(F32, sh.N*sh.OC)
					if err != nil {
						b.Fatal(err)
					}
					defer c.Free(out)
					sec := graphTime(b, c, 10, func(int) { c.matmul(out, in, w, bias, sh.N, sh.C, sh.OC, false, variant) })
					b.ReportMetric(2*float64(sh.N)*float64(sh.C)*float64(sh.OC)/sec/1e12, "TFLOP/s")
					b.ReportMetric(sec*1e6, "µs/call")
				})
			}
		}
	}
}
