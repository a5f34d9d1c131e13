//go:build cuda && !nofused

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

// The folded attention output projection (kv_attention_out) and the two
// products that add its partials to the residual stream
// (kv_norm_matmul_sum, kv_res_matmul), each against gpu/ref.

func TestCUDAAttentionOutProj(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(81, 82))
	shapes := []struct{ NH, NKV, HS, C int }{
		{12, 12, 64, 768}, // distilgpt2
		{9, 3, 64, 576},   // SmolLM2
		{4, 2, 16, 100},   // rows not a multiple of the cluster
		{4, 2, 128, 130},
		{2, 1, 32, 7},
	}
	for _, sh := range shapes {
		for _, B := range []int{1, 3} {
			for _, theta := range []float32{0, 10000} {
				qStride := (sh.NH + 2*sh.NKV) * sh.HS // fused q|k|v rows
				p := AttnParams{B: B, T: 1, NH: sh.NH, NKV: sh.NKV, HS: sh.HS, QStride: qStride, MaxLen: 260, RopeTheta: theta}
				a := newAttnCase(t, c, rng, p)
				wo := asWeight(F16, randVals(rng, sh.C*sh.NH*sh.HS, 0.125))
				woBuf := uploadNew(t, c, F16, wo)
				acc := alloc(t, c, I32, 2*B*sh.C)
				wantAcc := make([]int64, B*sh.C)
				ref.AttentionOutProj(wantAcc, a.q, a.kc, a.vc, a.order, a.lens, wo, B, sh.NH, sh.NKV, sh.HS, qStride, p.MaxLen, sh.C, theta)
				want := unfixAll(wantAcc)
				var first []int32
				for run, v := range []int{0, 1, 1} {
					name := fmt.Sprintf("B%d_NH%d_NKV%d_HS%d_C%d_rope%v_v%d", B, sh.NH, sh.NKV, sh.HS, sh.C, theta, v)
					c.UploadInts(acc, make([]int32, 2*B*sh.C))
					// Variant 0 folds only where kv_attention's default
					// takes v14: several query heads a kv head, few rows.
					auto := sh.NH > sh.NKV && B*sh.NH*8 <= 132
					launched := c.attentionOutProj(acc, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p, woBuf, sh.C, v)
					checkOK(t, c)
					if v == 0 && launched != auto {
						t.Fatalf("%s: variant 0 launched %v, want %v", name, launched, auto)
					}
					if !launched {
						if v != 0 {
							t.Fatalf("%s: not launched", name)
						}
						continue
					}
					raw := downloadInts(t, c, acc)
					got := unfixAll(unpackInt64(raw))
					if e := relErr(got, want); e > 2e-5 {
						t.Errorf("%s: max|Δ|/max|ref| = %.3g > 2e-5", name, e)
					}
					compare(t, name, got, want, 2e-5*maxAbs(want), 2e-5)
					// The heads' atomics arrive in any order; the fixed-point
					// sum must not care: every run agrees bit for bit.
					if first == nil {
						first = raw
					} else if !slices.Equal(first, raw) {
						t.Errorf("%s: run %d differs from the first", name, run)
					}
				}
				for _, b := range []Buf{woBuf, acc, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf} {
					c.Free(b)
				}
			}
		}
	}
}

// TestCUDAAttentionOutProjCaptured replays the folded kernel (both models'
// shapes) from a graph while the lengths change, and checks the cases it
// refuses enqueue nothing and record no error.
func TestCUDAAttentionOutProjCaptured(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(83, 84))
	for _, sh := range []struct{ NH, NKV, C int }{{12, 12, 768}, {9, 3, 576}} {
		p := AttnParams{B: 1, T: 1, NH: sh.NH, NKV: sh.NKV, HS: 64, QStride: (sh.NH + 2*sh.NKV) * 64, MaxLen: 256, RopeTheta: 10000}
		a := newAttnCase(t, c, rng, p)
		wo := asWeight(F16, randVals(rng, sh.C*sh.NH*64, 0.125))
		woBuf := uploadNew(t, c, F16, wo)
		acc := alloc(t, c, I32, 2*sh.C)
		launched := false
		rep, err := c.Capture(func() {
			launched = c.attentionOutProj(acc, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p, woBuf, sh.C, 1)
		})
		if err != nil || !launched {
			t.Fatalf("NH%d: capture: launched %v, %v", sh.NH, launched, err)
		}
		for _, n := range []int32{1, 2, 100, 256} {
			a.lens[0] = n
			c.UploadInts(a.lBuf, a.lens)
			c.UploadInts(acc, make([]int32, 2*sh.C))
			rep.Run()
			got := unfixAll(unpackInt64(downloadInts(t, c, acc)))
			wantAcc := make([]int64, sh.C)
			ref.AttentionOutProj(wantAcc, a.q, a.kc, a.vc, a.order, a.lens, wo, 1, sh.NH, sh.NKV, 64, p.QStride, p.MaxLen, sh.C, p.RopeTheta)
			if e := relErr(got, unfixAll(wantAcc)); e > 2e-5 {
				t.Errorf("NH%d len %d: max|Δ|/max|ref| = %.3g > 2e-5", sh.NH, n, e)
			}
		}
		rep.Close()
	}
	// Refused: fp32 weights, T > 1, a cache beyond one pass.
	p := AttnParams{B: 1, T: 1, NH: 9, NKV: 3, HS: 64, QStride: 15 * 64, MaxLen: 16}
	a := newAttnCase(t, c, rng, p)
	w32 := uploadNew(t, c, F32, randVals(rng, 576*576, 0.1))
	w16 := uploadNew(t, c, F16, randVals(rng, 576*576, 0.1))
	acc := alloc(t, c, I32, 2*576)
	for _, tc := range []struct {
		name string
		T    int
		len  int
		wo   Buf
	}{{"fp32 wo", 1, 16, w32}, {"T = 2", 2, 16, w16}, {"1100 entries", 1, 1100, w16}} {
		p := p
		p.T, p.MaxLen = tc.T, tc.len
		if tc.len > 16 {
			order := uploadInts(t, c, make([]int32, tc.len))
			a.oBuf = order
		}
		if c.AttentionOutProj(acc, a.qBuf, a.kBuf, a.vBuf, a.oBuf, a.lBuf, p, tc.wo, 576) {
			t.Errorf("%s: launched", tc.name)
		}
	}
	checkOK(t, c)
}

func TestCUDANormMatMulSum(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(85, 86))
	cases := []struct {
		name         string
		N, C, OC     int
		norm         NormKind
		act          Act
		accBias, wdt DType
	}{
		{"distil", 1, 768, 3072, LayerNormKind, GeluAct, F16, F16},
		{"distil_B2", 2, 768, 3072, LayerNormKind, GeluAct, F16, F16},
		{"smol", 1, 576, 3072, RMSNormKind, NoAct, 0, F16},
		{"smol_fp32", 1, 576, 3072, RMSNormKind, NoAct, 0, F32},
		{"rows9_twostep", 9, 576, 300, RMSNormKind, NoAct, F32, F16},
		{"odd_twostep", 2, 70, 33, LayerNormKind, GeluAct, F32, F32},
	}
	for _, tc := range cases {
		in := randNormal(rng, tc.N*tc.C, 1, 0.4)
		acc := make([]int64, tc.N*tc.C)
		for i, v := range randNormal(rng, tc.N*tc.C, 2, 0) {
			acc[i] = ref.Fix(v)
		}
		var ab []float32
		if tc.accBias != 0 {
			ab = asWeight(tc.accBias, randNormal(rng, tc.C, 0.2, 0))
		}
		nw := asWeight(tc.wdt, randNormal(rng, tc.C, 0.2, 1))
		var nb, bias []float32
		if tc.norm == LayerNormKind {
			nb = asWeight(tc.wdt, randNormal(rng, tc.C, 0.1, 0))
			bias = asWeight(tc.wdt, randNormal(rng, tc.OC, 0.5, 0))
		}
		w := asWeight(tc.wdt, randVals(rng, tc.OC*tc.C, 1/float32(math.Sqrt(float64(tc.C)))))
		wantSum := make([]float32, tc.N*tc.C)
		ref.SumAcc(wantSum, in, acc, ab, tc.N, tc.C)
		want := make([]float32, tc.N*tc.OC)
		ref.NormMatMul(want, wantSum, nw, nb, w, bias, tc.N, tc.C, tc.OC, 1e-5, tc.norm == RMSNormKind, tc.act == GeluAct, false)

		inBuf, accBuf := uploadNew(t, c, F32, in), uploadInts(t, c, packed(acc))
		var abBuf, nbBuf, bBuf Buf
		if ab != nil {
			abBuf = uploadNew(t, c, tc.accBias, ab)
		}
		if nb != nil {
			nbBuf, bBuf = uploadNew(t, c, tc.wdt, nb), uploadNew(t, c, tc.wdt, bias)
		}
		nwBuf, wBuf := uploadNew(t, c, tc.wdt, nw), uploadNew(t, c, tc.wdt, w)
		out, sum := alloc(t, c, F32, tc.N*tc.OC), alloc(t, c, F32, tc.N*tc.C)
		poison(t, c, out)
		poison(t, c, sum)
		c.NormMatMulSum(out, sum, inBuf, accBuf, abBuf, nwBuf, nbBuf, wBuf, bBuf, tc.N, tc.C, tc.OC, 1e-5, tc.norm, tc.act)
		// The summed stream is the reference's to the bit: the same
		// conversions and fp32 additions in the same order.
		if got := download(t, c, sum); !slices.Equal(got, wantSum) {
			t.Errorf("%s: sum differs from ref.SumAcc (max|Δ| %.3g)", tc.name, maxAbsDiff(got, wantSum))
		}
		got := download(t, c, out)
		tol := fusedTol(tc.wdt, tc.N)
		if e := relErr(got, want); e > tol {
			t.Errorf("%s: max|Δ|/max|ref| = %.3g > %g", tc.name, e, tol)
		}
		for _, b := range []Buf{inBuf, accBuf, abBuf, nbBuf, bBuf, nwBuf, wBuf, out, sum} {
			c.Free(b)
		}
	}
}

func TestCUDAResMatMul(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(87, 88))
	cases := []struct {
		name     string
		N, K, OC int
		act      Act
		bias     bool
		wdt      DType
	}{
		{"gpt2_proj", 1, 3072, 768, NoAct, true, F16},
		{"gpt2_proj_B2", 2, 3072, 768, NoAct, true, F32},
		{"llama_down", 1, 1536, 576, SwiGLUAct, false, F16},
		{"llama_down_B3", 3, 1536, 576, SwiGLUAct, false, F16},
		{"rows9_twostep", 9, 256, 96, NoAct, true, F16},
		{"swiglu_twostep", 9, 128, 40, SwiGLUAct, false, F32},
	}
	for _, tc := range cases {
		inW := tc.K
		if tc.act == SwiGLUAct {
			inW = 2 * tc.K
		}
		in := randNormal(rng, tc.N*inW, 1, 0)
		res := randNormal(rng, tc.N*tc.OC, 1, 0)
		w := asWeight(tc.wdt, randVals(rng, tc.OC*tc.K, 1/float32(math.Sqrt(float64(tc.K)))))
		var bias []float32
		if tc.bias {
			bias = asWeight(tc.wdt, randNormal(rng, tc.OC, 0.5, 0))
		}
		want := slices.Clone(res)
		if tc.act == SwiGLUAct {
			ref.SwiGLUMatMul(want, in, w, tc.N, tc.K, tc.OC, true)
		} else {
			ref.MatMul(want, in, w, bias, tc.N, tc.K, tc.OC, true)
		}
		inBuf, resBuf, wBuf := uploadNew(t, c, F32, in), uploadNew(t, c, F32, res), uploadNew(t, c, tc.wdt, w)
		var bBuf Buf
		if bias != nil {
			bBuf = uploadNew(t, c, tc.wdt, bias)
		}
		out := alloc(t, c, F32, tc.N*tc.OC)
		poison(t, c, out)
		acc := alloc(t, c, I32, 2*tc.N*tc.OC)
		poison(t, c, acc)
		c.ResMatMul(out, resBuf, inBuf, wBuf, bBuf, acc, tc.N, tc.K, tc.OC, tc.act)
		if a := downloadInts(t, c, acc); slices.ContainsFunc(a, func(v int32) bool { return v != 0 }) {
			t.Errorf("%s: the accumulator was not cleared", tc.name)
		}
		got := download(t, c, out)
		tol := fusedTol(tc.wdt, tc.N)
		if e := relErr(got, want); e > tol {
			t.Errorf("%s: max|Δ|/max|ref| = %.3g > %g", tc.name, e, tol)
		}
		if r := download(t, c, resBuf); !slices.Equal(r, res) {
			t.Errorf("%s: res was written", tc.name)
		}
		for _, b := range []Buf{inBuf, resBuf, wBuf, bBuf, out, acc} {
			c.Free(b)
		}
	}
	// Argument errors: res = out.
	x := uploadNew(t, c, F32, []float32{1, 2})
	w := uploadNew(t, c, F32, []float32{1, 2, 3, 4})
	c.ResMatMul(x, x, x, w, Buf{}, Buf{}, 1, 2, 2, NoAct)
	if c.Err() == nil {
		t.Error("ResMatMul with res = out: no error")
	}
}

// randFixed is an accumulator of n uniform values in [-1, 1) in fixed point.
func randFixed(rng *rand.Rand, n int) []int64 {
	v := make([]int64, n)
	for i := range v {
		v[i] = ref.Fix(rng.Float32()*2 - 1)
	}
	return v
}

func unfixAll(v []int64) []float32 {
	f := make([]float32, len(v))
	for i, s := range v {
		f[i] = ref.Unfix(s)
	}
	return f
}

func maxAbsDiff(a, b []float32) float64 {
	m := 0.0
	for i := range a {
		m = max(m, math.Abs(float64(a[i])-float64(b[i])))
	}
	return m
}

// TestCUDAAttentionBlock: the q|k|v product inside the folded attention
// (AttentionBlock) against the two kernels it replaces, NormMatMulStoreSum
// then AttentionOutProj (each checked against the CPU reference in its own
// test), on fresh random inputs: the stream's sum, the heads' projected
// outputs, and the cache with its newest entry, for keys cached rotated at
// their position and keys rotated at attention time (StreamingLLM's shift);
// and as the first layer's block, which embeds its token itself (against
// Embed then the two kernels without an accumulator).
func TestCUDAAttentionBlock(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(85, 86))
	shapes := []struct{ NH, NKV, HS, C int }{
		{9, 3, 64, 576}, // SmolLM2
		{4, 2, 64, 256}, // the Llama fixture
		{4, 2, 128, 128},
	}
	const theta, eps = 10000, 1e-5
	for _, sh := range shapes {
		for _, shift := range []bool{false, true} {
			for _, n := range []int{1, 7, 200} {
				for _, embed := range []bool{false, true} {
					name := fmt.Sprintf("NH%d_NKV%d_HS%d_C%d_shift%v_len%d_embed%v", sh.NH, sh.NKV, sh.HS, sh.C, shift, n, embed)
					qkvW := (sh.NH + 2*sh.NKV) * sh.HS
					const maxLen = 256
					S := maxLen + 5
					p := AttnParams{B: 1, T: 1, NH: sh.NH, NKV: sh.NKV, HS: sh.HS, QStride: qkvW, MaxLen: maxLen}
					ropeHeads := sh.NH + sh.NKV
					if shift {
						p.RopeTheta, ropeHeads = theta, sh.NH
					}
					in := randNormal(rng, sh.C, 1, 0)
					prior := make([]int64, sh.C)
					for i := range prior {
						prior[i] = ref.Fix(rng.Float32()*2 - 1)
					}
					normW := randNormal(rng, sh.C, 0.2, 1)
					w := asWeight(F16, randVals(rng, qkvW*sh.C, 0.1))
					wo := asWeight(F16, randVals(rng, sh.C*sh.NH*sh.HS, 0.1))
					kc, vc := randVals(rng, S*sh.NKV*sh.HS, 1), randVals(rng, S*sh.NKV*sh.HS, 1)
					perm := rng.Perm(S)
					order := make([]int32, maxLen)
					for j := range order {
						order[j] = int32(perm[j])
					}
					bufs := []Buf{}
					up := func(dt DType, v []float32) Buf { b := uploadNew(t, c, dt, v); bufs = append(bufs, b); return b }
					ints := func(v []int32) Buf { b := uploadInts(t, c, v); bufs = append(bufs, b); return b }
					inBuf, nwBuf, wBuf, woBuf := up(F32, in), up(F32, normW), up(F16, w), up(F16, wo)
					accIn := ints(packed(prior))
					var tokBuf, wteBuf Buf
					if embed { // the stream is a token's embedding, no accumulator
						const V = 50
						tokBuf, wteBuf = ints([]int32{int32(rng.IntN(V))}), up(F16, asWeight(F16, randNormal(rng, V*sh.C, 1, 0)))
						c.Embed(inBuf, wteBuf, Buf{}, tokBuf, Buf{}, 1, sh.C)
						accIn = ints(make([]int32, 2*sh.C))
					}
					orderBuf, lensBuf := ints(order), ints([]int32{int32(n)})
					posBuf, slotBuf := ints([]int32{int32(n - 1 + rng.IntN(50))}), ints([]int32{order[n-1]})
					// The two kernels it replaces, on their own copies.
					k1, v1, k2, v2 := up(F32, kc), up(F32, vc), up(F32, kc), up(F32, vc)
					qkv, sum1, sum2 := alloc(t, c, F32, qkvW), alloc(t, c, F32, sh.C), alloc(t, c, F32, sh.C)
					acc1, acc2 := ints(make([]int32, 2*sh.C)), ints(make([]int32, 2*sh.C))
					bufs = append(bufs, qkv, sum1, sum2)
					st := QKVStore{K: k1, V: v1, Pos: posBuf, Slots: slotBuf, NH: sh.NH, NKV: sh.NKV, HS: sh.HS, RopeHeads: ropeHeads, Theta: theta}
					c.NormMatMulStoreSum(qkv, sum1, inBuf, accIn, nwBuf, Buf{}, wBuf, Buf{}, 1, sh.C, eps, RMSNormKind, st)
					if !c.attentionOutProj(acc1, qkv, k1, v1, orderBuf, lensBuf, p, woBuf, sh.C, 1) {
						t.Fatalf("%s: AttentionOutProj not launched", name)
					}
					st.K, st.V = k2, v2
					blockIn, blockAcc := inBuf, accIn
					if embed {
						st.Tokens, st.Wte = tokBuf, wteBuf
						blockIn, blockAcc = Buf{}, Buf{}
					}
					if !c.AttentionBlock(acc2, sum2, blockIn, blockAcc, nwBuf, wBuf, st, orderBuf, lensBuf, p, woBuf, sh.C, eps) {
						t.Fatalf("%s: AttentionBlock not launched (%v)", name, c.Err())
					}
					checkOK(t, c)
					compare(t, name+" sum", download(t, c, sum2), download(t, c, sum1), 0, 0)
					want, got := unfixAll(unpackInt64(downloadInts(t, c, acc1))), unfixAll(unpackInt64(downloadInts(t, c, acc2)))
					if e := relErr(got, want); e > 1e-4 {
						t.Errorf("%s: output max|Δ|/max|ref| = %.3g > 1e-4", name, e)
					}
					compare(t, name+" keys", download(t, c, k2), download(t, c, k1), 1e-4, 1e-4)
					compare(t, name+" values", download(t, c, v2), download(t, c, v1), 1e-4, 1e-4)
					for _, b := range bufs {
						c.Free(b)
					}
				}
			}
		}
	}
	// Not for this kernel: fp32 weights (nothing enqueued, no error).
	p := AttnParams{B: 1, T: 1, NH: 4, NKV: 2, HS: 64, QStride: 512, MaxLen: 8}
	w32 := alloc(t, c, F32, 512*64)
	defer c.Free(w32)
	if c.AttentionBlock(Buf{}, Buf{}, Buf{}, Buf{}, Buf{}, w32, QKVStore{}, Buf{}, Buf{}, p, w32, 64, 1e-5) {
		t.Error("fp32 weights: launched")
	}
	checkOK(t, c)
}
