//go:build cuda && !nofused

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/x448/float16"
)

// Tests of the prefill kernels (csrc/attention_prefill.cu, csrc/gemm_prefill.cu):
// the tensor-core attention (kv_attention variants 12/13, and 0 with F16),
// GEMM v3 (kv_matmul variants 3/4) and its fused RMSNorm/SwiGLU inputs
// (fused variant 5), each on fresh random inputs, outputs poisoned first.
//
// Tolerances (max|Δ| / max|ref|, and element-wise atol = tol·max|ref|):
//   - attention, fp16 operands, against ref.Attention (float64, unrounded):
//     2e-3 (an emulation of the kernel's roundings gave ≤ 5.4e-4 with
//     queries ×3, HS = 64, 1–256 entries); against a float64 reference on
//     the fp16-rounded q·scale, rotated k and v: 5e-4 (what is left is the
//     rounding of the probabilities to fp16, ~1e-4);
//   - GEMM v3 against ref.MatMul on fp16-rounded activations and weights:
//     1e-4 (fp32 accumulation in another order; the old test's 1e-3 bound
//     would hide a lost k-step of a long product);
//   - RMSNorm fused: 1e-4 against the kernel's own rounding (fp16(x·w_norm)
//     times the row's 1/rms), and 1e-3 against ref.NormMatMul
//     (unrounded; the emulation gave ≤ 2.3e-4, as the two-step path);
//   - SwiGLU fused into the A tiles: 1e-4 against ref.MatMul on
//     fp16(silu(g)·u);
//   - NormMatMul with SwiGLUAct (RMSNorm in the A tiles, SwiGLU in the
//     epilogue): 1e-4 against the kernel's rounding, 1e-3 against
//     ref.NormMatMulSwiGLU; fp32 weights (three steps) 1e-4.
// fp32 models do not reach these kernels (attention without F16 keeps the
// fp32 SIMT kernel; v3 needs fp16 weights): their 1e-5 tests stay as they are.

func f16round(x float64) float64 { return float64(float16.Fromfloat32(float32(x)).Float32()) }

// attnRefF16 is ref.Attention on the operands the tensor-core kernel
// multiplies: q·scale·log2(e) and the (rotated) keys and values rounded to
// fp16, everything else in float64.
func attnRefF16(out, q, kc, vc []float32, order, lens []int32, B, T, NH, NKV, HS, qStride, maxLen int, theta float32) {
	group := NH / NKV
	qscale := math.Log2E / math.Sqrt(float64(HS))
	var inv []float32
	if theta != 0 {
		inv = ref.RopeInvFreq(HS, theta)
	}
	key := make([]float32, HS)
	acc := make([]float64, HS)
	for row := 0; row < B*T; row++ {
		b, t := row/T, row%T
		n := int(lens[b]) - T + t + 1
		for h := 0; h < NH; h++ {
			kh := h / group
			qv := q[row*qStride+h*HS : row*qStride+h*HS+HS]
			var scores []float64
			m := math.Inf(-1)
			for j := 0; j < n; j++ {
				slot := int(order[b*maxLen+j])
				copy(key, kc[(slot*NKV+kh)*HS:(slot*NKV+kh)*HS+HS])
				if inv != nil {
					ref.RopeRotate(key, j, inv)
				}
				var s float64
				for i := range key {
					s += f16round(float64(float32(float64(qv[i])*qscale))) * f16round(float64(key[i]))
				}
				scores = append(scores, s)
				m = math.Max(m, s)
			}
			clear(acc)
			var sum float64
			for j := 0; j < n; j++ {
				p := math.Exp2(scores[j] - m)
				sum += p
				slot := int(order[b*maxLen+j])
				v := vc[(slot*NKV+kh)*HS : (slot*NKV+kh)*HS+HS]
				for c := range acc {
					acc[c] += p * f16round(float64(v[c]))
				}
			}
			o := out[row*NH*HS+h*HS : row*NH*HS+h*HS+HS]
			for c := range o {
				if n > 0 {
					o[c] = float32(acc[c] / sum)
				} else {
					o[c] = 0
				}
			}
		}
	}
}

// TestCUDAAttentionPrefillTC: the tensor-core prefill on the `ar` shapes
// (T = cache+1, every entry new), odd T, several sequences of different
// lengths (one seeing exactly T entries, one the whole MaxLen), GQA, the
// RoPE position shift, fused-qkv query strides, both tile widths (MaxLen ≤
// 64: 4 warps, else 8), against both references.
func TestCUDAAttentionPrefillTC(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(41, 42))
	type tc struct {
		B, T, NH, NKV, maxLen int
		theta                 float32
	}
	cases := []tc{
		{1, 33, 9, 3, 33, 0}, {1, 65, 9, 3, 65, 0}, {1, 129, 9, 3, 129, 0}, {1, 256, 9, 3, 256, 0},
		{1, 256, 12, 12, 256, 0}, {1, 65, 12, 12, 65, 0},
		{3, 37, 9, 3, 300, 10000}, {3, 37, 4, 2, 300, 0}, {2, 17, 12, 12, 64, 10000}, {3, 5, 4, 1, 50, 500000},
		{2, 100, 9, 3, 130, 100000}, {1, 1, 12, 12, 40, 0}, {1, 300, 4, 2, 1030, 10000},
	}
	if testing.Short() {
		cases = []tc{{1, 65, 9, 3, 65, 0}, {3, 37, 9, 3, 300, 10000}}
	}
	for _, cs := range cases {
		qStride := cs.NH * 64
		if cs.NH != cs.NKV {
			qStride = (cs.NH + 2*cs.NKV) * 64 // rows of a fused qkv projection
		}
		p := AttnParams{B: cs.B, T: cs.T, NH: cs.NH, NKV: cs.NKV, HS: 64, QStride: qStride, MaxLen: cs.maxLen, RopeTheta: cs.theta, F16: true}
		a := newAttnCase(t, c, rng, p)
		if cs.B == 1 && cs.maxLen == cs.T {
			// The `ar` step: entries 0…T−1 in slots 0…T−1, all visible.
			for j := range a.order {
				a.order[j] = int32(j)
			}
			a.lens[0] = int32(cs.T)
			c.UploadInts(a.oBuf, a.order)
			c.UploadInts(a.lBuf, a.lens)
		}
		// Queries ×3: sharper softmax, so score errors show.
		for i := range a.q {
			a.q[i] *= 3
		}
		c.Upload(a.qBuf, a.q)
		want := a.want()
		tight := make([]float32, len(want))
		attnRefF16(tight, a.q, a.kc, a.vc, a.order, a.lens, p.B, p.T, p.NH, p.NKV, p.HS, p.QStride, p.MaxLen, p.RopeTheta)
		out := alloc(t, c, F32, len(want))
		for _, v := range []int{12, 13, 0} {
			name := fmt.Sprintf("B%d_T%d_NH%d_NKV%d_len%d_rope%v_v%d", cs.B, cs.T, cs.NH, cs.NKV, cs.maxLen, cs.theta, v)
			poison(t, c, out)
			c.attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p, v, Buf{})
			got := download(t, c, out)
			e, et := relErr(got, want), relErr(got, tight)
			if e > 2e-3 || et > 5e-4 {
				t.Errorf("%s: max|Δ|/max|ref| = %.3g (≤ 2e-3), against the fp16-operand reference %.3g (≤ 5e-4)", name, e, et)
			} else {
				t.Logf("%s: max|Δ|/max|ref| = %.3g, against the fp16-operand reference %.3g", name, e, et)
			}
			compare(t, name, got, want, 2e-3*maxAbs(want), 2e-3)
		}
		c.Free(out)
	}
}

// TestCUDAAttentionPrefillTCDefault: without F16 the default stays the fp32
// kernel (1e-5); with F16 but HS ≠ 64 too.
func TestCUDAAttentionPrefillTCDefault(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(43, 44))
	for _, p := range []AttnParams{
		{B: 1, T: 65, NH: 9, NKV: 3, HS: 64, QStride: 15 * 64, MaxLen: 65},
		{B: 2, T: 40, NH: 4, NKV: 2, HS: 32, QStride: 8 * 32, MaxLen: 90, F16: true, RopeTheta: 10000},
	} {
		a := newAttnCase(t, c, rng, p)
		want := a.want()
		out := alloc(t, c, F32, len(want))
		poison(t, c, out)
		c.Attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p)
		got := download(t, c, out)
		name := fmt.Sprintf("HS%d_F16%v", p.HS, p.F16)
		if e := relErr(got, want); e > 1e-5 {
			t.Errorf("%s: max|Δ|/max|ref| = %.3g > 1e-5: the fp32 kernel should have run", name, e)
		}
	}
	// Variant 12 refuses shapes it cannot take (a backend of its own: the
	// error is sticky).
	be, err := NewCUDA(0)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	c2 := be.(*CUDA)
	p := AttnParams{B: 1, T: 40, NH: 4, NKV: 2, HS: 32, QStride: 4 * 32, MaxLen: 40, F16: true}
	a := newAttnCase(t, c2, rng, p)
	out := alloc(t, c2, F32, p.T*p.NH*p.HS)
	c2.attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p, 12, Buf{})
	if err := c2.Sync(); err == nil {
		t.Errorf("variant 12 with HS = %d should fail", p.HS)
	}
}

// TestCUDAAttentionPrefillTCCapture replays a captured tensor-core prefill
// (as an `ar` step's graph does) after the lengths change on the device.
func TestCUDAAttentionPrefillTCCapture(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(45, 46))
	p := AttnParams{B: 2, T: 33, NH: 9, NKV: 3, HS: 64, QStride: 15 * 64, MaxLen: 200, RopeTheta: 10000, F16: true}
	a := newAttnCase(t, c, rng, p)
	out := alloc(t, c, F32, p.B*p.T*p.NH*p.HS)
	r, err := c.Capture(func() { c.Attention(out, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p) })
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for step, lens := range [][]int32{{33, 200}, {150, 34}, {200, 200}} {
		got, want := a.replay(t, c, r, out, lens)
		if e := relErr(got, want); e > 2e-3 {
			t.Errorf("replay %d lens %v: max|Δ|/max|ref| = %.3g > 2e-3", step, lens, e)
		}
		compare(t, fmt.Sprintf("replay %d lens %v", step, lens), got, want, 2e-3*maxAbs(want), 2e-3)
	}
}

// gemmV3Shapes cover v3's tile heights (16, 32, 64 rows), cluster splits
// (1, 2, 4, 8), partial k-tiles (K % 32 ≠ 0) and column tiles (OC % 64 ≠ 0).
var gemmV3Shapes = []struct{ N, C, OC int }{
	{33, 1536, 576}, // 16 rows, split 8 (SmolLM2 down projection at cache 32)
	{33, 576, 960},  // 16 rows, split 4 (qkv)
	{33, 576, 3072}, // 16 rows, split 2 (gate|up)
	{20, 64, 100},   // 16 rows, 2 k-tiles, no split
	{40, 1000, 130}, // split 8, the last split's last k-tile partial
	{129, 1536, 576},
	{256, 576, 3072}, // 32 rows, no split
	{65, 72, 201},
	{600, 256, 2048}, // 64 rows
}

func TestCUDAMatMulV3(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(47, 48))
	for i, sh := range gemmV3Shapes {
		if testing.Short() && i%3 != 0 {
			continue
		}
		in := randVals(rng, sh.N*sh.C, 1)
		w := randVals(rng, sh.OC*sh.C, 1/float32(math.Sqrt(float64(sh.C))))
		bias := randVals(rng, sh.OC, 0.5)
		prev := randVals(rng, sh.N*sh.OC, 1)
		inBuf, wBuf := uploadNew(t, c, F32, in), uploadNew(t, c, F16, w)
		for _, biasDT := range []int{-1, int(F16), int(F32)} {
			var bBuf Buf
			var refBias []float32
			if biasDT >= 0 {
				bBuf = uploadNew(t, c, DType(biasDT), bias)
				refBias = asWeight(DType(biasDT), bias)
			}
			for _, acc := range []bool{false, true} {
				want := make([]float32, sh.N*sh.OC)
				if acc {
					copy(want, prev)
				}
				ref.MatMul(want, roundF16(in), roundF16(w), refBias, sh.N, sh.C, sh.OC, acc)
				for _, v := range []int{gemmV3, gemmV3Plain} {
					name := fmt.Sprintf("N%d_C%d_OC%d_bias%d_acc%v_v%d", sh.N, sh.C, sh.OC, biasDT, acc, v)
					out := uploadNew(t, c, F32, prev)
					if !acc {
						poison(t, c, out)
					}
					c.matmul(out, inBuf, wBuf, bBuf, sh.N, sh.C, sh.OC, acc, v)
					got := download(t, c, out)
					if e := relErr(got, want); e > 1e-4 {
						t.Errorf("%s: max|Δ|/max|ref| = %.3g > 1e-4", name, e)
					}
					compare(t, name, got, want, 1e-4*maxAbs(want), 1e-4)
					c.Free(out)
				}
			}
			if !bBuf.IsZero() {
				c.Free(bBuf)
			}
		}
		c.Free(inBuf)
		c.Free(wBuf)
	}
}

// TestCUDAFusedPrefill: GEMM v3 with RMSNorm or SwiGLU in its A tiles
// (fused variant 5, and fusedAuto above 8 rows) against the kernel's own
// rounding and against the unfused reference.
func TestCUDAFusedPrefill(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(49, 50))
	for i, sh := range gemmV3Shapes {
		if testing.Short() && i%3 != 0 {
			continue
		}
		for _, ndt := range []DType{F16, F32} {
			for _, acc := range []bool{false, true} {
				// RMSNorm → product (+ bias of the norm weights' dtype, + residual).
				x := randNormal(rng, sh.N*sh.C, 1, 0.4)
				nw := asWeight(ndt, randNormal(rng, sh.C, 0.2, 1))
				w := randVals(rng, sh.OC*sh.C, 1/float32(math.Sqrt(float64(sh.C))))
				bias := asWeight(ndt, randNormal(rng, sh.OC, 0.5, 0))
				prev := randNormal(rng, sh.N*sh.OC, 1, 0)
				want := make([]float32, sh.N*sh.OC)
				if acc {
					copy(want, prev)
				}
				ref.NormMatMul(want, x, nw, nil, roundF16(w), bias, sh.N, sh.C, sh.OC, 1e-5, true, false, acc)
				// The kernel's own rounding: fp16(x·w_norm), the row's 1/rms after the product.
				a := make([]float32, sh.N*sh.C)
				rstd := make([]float64, sh.N)
				for r := 0; r < sh.N; r++ {
					var ss float64
					for k := 0; k < sh.C; k++ {
						v := float64(x[r*sh.C+k])
						ss += v * v
						a[r*sh.C+k] = float16.Fromfloat32(x[r*sh.C+k] * nw[k]).Float32()
					}
					rstd[r] = 1 / math.Sqrt(ss/float64(sh.C)+1e-5)
				}
				prod := make([]float32, sh.N*sh.OC)
				ref.MatMul(prod, a, roundF16(w), nil, sh.N, sh.C, sh.OC, false)
				tight := make([]float32, sh.N*sh.OC)
				for r := 0; r < sh.N; r++ {
					for o := 0; o < sh.OC; o++ {
						v := float64(prod[r*sh.OC+o])*rstd[r] + float64(bias[o])
						if acc {
							v += float64(prev[r*sh.OC+o])
						}
						tight[r*sh.OC+o] = float32(v)
					}
				}
				xBuf, nwBuf, wBuf, bBuf := uploadNew(t, c, F32, x), uploadNew(t, c, ndt, nw), uploadNew(t, c, F16, w), uploadNew(t, c, ndt, bias)
				for _, v := range []int{fusedPrefill, fusedAuto} {
					name := fmt.Sprintf("rms_N%d_C%d_OC%d_norm%v_acc%v_%s", sh.N, sh.C, sh.OC, ndt, acc, variantName(v))
					out := uploadNew(t, c, F32, prev)
					if !acc {
						poison(t, c, out)
					}
					c.normMatMul(out, xBuf, nwBuf, Buf{}, wBuf, bBuf, sh.N, sh.C, sh.OC, 1e-5, RMSNormKind, NoAct, acc, v)
					got := download(t, c, out)
					e, et := relErr(got, want), relErr(got, tight)
					if e > 1e-3 || et > 1e-4 {
						t.Errorf("%s: max|Δ|/max|ref| = %.3g (≤ 1e-3), against the kernel's rounding %.3g (≤ 1e-4)", name, e, et)
					}
					compare(t, name, got, tight, 1e-4*maxAbs(tight), 1e-4)
					c.Free(out)
				}
				for _, b := range []Buf{xBuf, nwBuf, wBuf, bBuf} {
					c.Free(b)
				}
			}
		}
		// RMSNorm → gate|up product (OC columns) → SwiGLU into OC/2 outputs.
		if sh.OC%2 == 0 {
			testNormMatMulSwiGLU(t, c, rng, sh.N, sh.C, sh.OC)
		}
		// SwiGLU → product (+ residual): K = sh.C is the activation width F.
		for _, acc := range []bool{false, true} {
			F := sh.C
			gu := randNormal(rng, sh.N*2*F, 1.5, 0)
			w := randVals(rng, sh.OC*F, 1/float32(math.Sqrt(float64(F))))
			prev := randNormal(rng, sh.N*sh.OC, 1, 0)
			act := make([]float32, sh.N*F)
			ref.SiluMul(act, gu, gu[F:], sh.N, F, 2*F)
			want := make([]float32, sh.N*sh.OC)
			if acc {
				copy(want, prev)
			}
			ref.MatMul(want, roundF16(act), roundF16(w), nil, sh.N, F, sh.OC, acc)
			guBuf, wBuf := uploadNew(t, c, F32, gu), uploadNew(t, c, F16, w)
			for _, v := range []int{fusedPrefill, fusedAuto} {
				name := fmt.Sprintf("swiglu_N%d_F%d_OC%d_acc%v_%s", sh.N, F, sh.OC, acc, variantName(v))
				out := uploadNew(t, c, F32, prev)
				if !acc {
					poison(t, c, out)
				}
				c.swiGLUMatMul(out, guBuf, wBuf, sh.N, F, sh.OC, acc, v)
				got := download(t, c, out)
				if e := relErr(got, want); e > 1e-4 {
					t.Errorf("%s: max|Δ|/max|ref| = %.3g > 1e-4", name, e)
				}
				compare(t, name, got, want, 1e-4*maxAbs(want), 1e-4)
				c.Free(out)
			}
			c.Free(guBuf)
			c.Free(wBuf)
		}
	}
}

// testNormMatMulSwiGLU: NormMatMul with SwiGLUAct (GEMM v3: RMSNorm in the A
// tiles, SwiGLU in the epilogue; variant 3: three steps) against
// ref.NormMatMulSwiGLU (1e-3: fp16 activations) and, for v3, against the
// kernel's own rounding (1e-4); fp32 weights (three steps, fp32) at 1e-4.
func testNormMatMulSwiGLU(t *testing.T, c *CUDA, rng *rand.Rand, N, C, OC int) {
	t.Helper()
	F := OC / 2
	x := randNormal(rng, N*C, 1, 0.4)
	nw := asWeight(F16, randNormal(rng, C, 0.2, 1))
	w := randVals(rng, OC*C, 2/float32(math.Sqrt(float64(C))))
	want := make([]float32, N*F)
	ref.NormMatMulSwiGLU(want, x, nw, nil, roundF16(w), nil, N, C, OC, 1e-5, true)
	// The kernel's rounding: p = fp16(x·w_norm)·wᵀ scaled by the row's 1/rms.
	a := make([]float32, N*C)
	rstd := make([]float64, N)
	for r := 0; r < N; r++ {
		var ss float64
		for k := 0; k < C; k++ {
			v := float64(x[r*C+k])
			ss += v * v
			a[r*C+k] = float16.Fromfloat32(x[r*C+k] * nw[k]).Float32()
		}
		rstd[r] = 1 / math.Sqrt(ss/float64(C)+1e-5)
	}
	prod := make([]float32, N*OC)
	ref.MatMul(prod, a, roundF16(w), nil, N, C, OC, false)
	tight := make([]float32, N*F)
	for r := 0; r < N; r++ {
		for f := 0; f < F; f++ {
			g, u := float64(prod[r*OC+f])*rstd[r], float64(prod[r*OC+F+f])*rstd[r]
			tight[r*F+f] = float32(g / (1 + math.Exp(-g)) * u)
		}
	}
	xBuf, nwBuf := uploadNew(t, c, F32, x), uploadNew(t, c, F16, nw)
	defer c.Free(xBuf)
	defer c.Free(nwBuf)
	out := alloc(t, c, F32, N*F)
	defer c.Free(out)
	for _, wdt := range weightTypes {
		wBuf := uploadNew(t, c, wdt, w)
		wantW := want
		if wdt == F32 {
			wantW = make([]float32, N*F)
			ref.NormMatMulSwiGLU(wantW, x, nw, nil, w, nil, N, C, OC, 1e-5, true)
		}
		for _, v := range []int{fusedPrefill, fusedTwoStep, fusedAuto} {
			name := fmt.Sprintf("swigluact_N%d_C%d_OC%d_w%v_%s", N, C, OC, wdt, variantName(v))
			poison(t, c, out)
			c.normMatMul(out, xBuf, nwBuf, Buf{}, wBuf, Buf{}, N, C, OC, 1e-5, RMSNormKind, SwiGLUAct, false, v)
			got := download(t, c, out)
			tol := 1e-3
			if wdt == F32 {
				tol = 1e-4
			}
			if e := relErr(got, wantW); e > tol {
				t.Errorf("%s: max|Δ|/max|ref| = %.3g > %g", name, e, tol)
			}
			compare(t, name, got, wantW, tol*maxAbs(wantW), tol)
			if wdt == F16 && v != fusedTwoStep {
				if e := relErr(got, tight); e > 1e-4 {
					t.Errorf("%s: against the kernel's rounding max|Δ|/max|ref| = %.3g > 1e-4", name, e)
				}
			}
		}
		c.Free(wBuf)
	}
}
