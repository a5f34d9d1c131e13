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

// The one-launch MLP block (kv_mlp_acc) against gpu/ref.MLPAcc.

func TestCUDAMLPAcc(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(91, 92))
	shapes := []struct {
		name   string
		C, F   int
		swiglu bool
	}{
		{"smollm2", 576, 1536, true},
		{"distilgpt2", 768, 3072, false},
		{"small_llama", 64, 32, true},
		{"small_gpt2", 104, 48, false},
	}
	for _, sh := range shapes {
		for _, N := range []int{1, 2, 3, 8} {
			for _, v := range []int{0, 1} {
				name := fmt.Sprintf("%s_N%d_v%d", sh.name, N, v)
				// Variant 0 takes MLPs of up to 8 MiB of weights
				// (SmolLM2's, not distilgpt2's).
				upRows := sh.F
				if sh.swiglu {
					upRows = 2 * sh.F
				}
				want := v == 1 || (upRows+sh.F)*sh.C*2 <= 8<<20
				testMLPAcc(t, c, rng, name, N, sh.C, sh.F, sh.swiglu, F16, v, want, false)
				// MLPAccSum: the stream plus a folded attention's accumulator
				// (the Llama pairing only: GPT-2's attention does not fold).
				testMLPAcc(t, c, rng, name+"_sum", N, sh.C, sh.F, sh.swiglu, F16, v, want && sh.swiglu, true)
			}
		}
	}
	// Not for this kernel: fp32 weights, F not a multiple of 16, more than 8 rows.
	testMLPAcc(t, c, rng, "fp32", 1, 64, 32, true, F32, 1, false, false)
	testMLPAcc(t, c, rng, "F24", 1, 64, 24, false, F16, 1, false, true)
	testMLPAcc(t, c, rng, "N9", 9, 64, 32, true, F16, 1, false, true)
	checkOK(t, c)
}

// testMLPAcc checks one MLPAcc launch (sum: MLPAccSum, its input the
// stream plus an accumulator, written to a sum buffer bit for bit as
// ref.SumAcc, and a clear buffer of two accumulators).
func testMLPAcc(t *testing.T, c *CUDA, rng *rand.Rand, name string, N, C, F int, swiglu bool, wdt DType, variant int, want, sum bool) {
	t.Helper()
	upRows, norm, act := F, LayerNormKind, GeluAct
	if swiglu {
		upRows, norm, act = 2*F, RMSNormKind, SwiGLUAct
	}
	in := randNormal(rng, N*C, 1, 0.3)
	nw := asWeight(wdt, randNormal(rng, C, 0.2, 1))
	upW := asWeight(wdt, randVals(rng, upRows*C, 1/float32(math.Sqrt(float64(C)))))
	downW := asWeight(wdt, randVals(rng, C*F, 1/float32(math.Sqrt(float64(F)))))
	var nb, upB, downB []float32
	if !swiglu { // GPT-2: every bias
		nb = asWeight(wdt, randNormal(rng, C, 0.1, 0))
		upB = asWeight(wdt, randNormal(rng, F, 0.3, 0))
		downB = asWeight(wdt, randNormal(rng, C, 0.3, 0))
	}
	// The accumulator already holds a sum (what the kernel adds to); the
	// other one is dirty (what it clears).
	prior := make([]int64, N*C)
	for i := range prior {
		prior[i] = ref.Fix(rng.Float32()*4 - 2)
	}
	wantAcc := slices.Clone(prior)
	mlpIn, inAcc, wantSum := in, []int64(nil), []float32(nil)
	clearN := N * C
	if sum {
		inAcc = randFixed(rng, N*C)
		wantSum = make([]float32, N*C)
		ref.SumAcc(wantSum, in, inAcc, nil, N, C)
		mlpIn, clearN = wantSum, 2*N*C
	}
	ref.MLPAcc(wantAcc, mlpIn, nw, nb, upW, upB, downW, downB, N, C, F, 1e-5, swiglu)

	bufs := []Buf{}
	up := func(dt DType, v []float32) Buf {
		if v == nil {
			return Buf{}
		}
		b := uploadNew(t, c, dt, v)
		bufs = append(bufs, b)
		return b
	}
	inBuf, nwBuf, nbBuf := up(F32, in), up(wdt, nw), up(wdt, nb)
	upBuf, upBBuf, downBuf, downBBuf := up(wdt, upW), up(wdt, upB), up(wdt, downW), up(wdt, downB)
	accBuf := uploadInts(t, c, packed(prior))
	clearBuf := uploadInts(t, c, packed(slices.Repeat([]int64{-7}, clearN)))
	bufs = append(bufs, accBuf, clearBuf)
	var inAccBuf, sumBuf Buf
	if sum {
		inAccBuf, sumBuf = uploadInts(t, c, packed(inAcc)), alloc(t, c, F32, N*C)
		bufs = append(bufs, inAccBuf, sumBuf)
	}
	defer func() {
		for _, b := range bufs {
			c.Free(b)
		}
	}()
	var first []int32
	for run := 0; run < 2; run++ {
		c.UploadInts(accBuf, packed(prior))
		var launched bool
		if sum {
			launched = c.mlpAccSum(accBuf, clearBuf, sumBuf, inBuf, inAccBuf, nwBuf, nbBuf, upBuf, upBBuf, downBuf, downBBuf, N, C, F, 1e-5, norm, act, variant, false)
		} else {
			launched = c.mlpAcc(accBuf, clearBuf, inBuf, nwBuf, nbBuf, upBuf, upBBuf, downBuf, downBBuf, N, C, F, 1e-5, norm, act, variant)
		}
		checkOK(t, c)
		if launched != want {
			t.Fatalf("%s: launched %v, want %v", name, launched, want)
		}
		if !launched {
			return
		}
		raw := downloadInts(t, c, accBuf)
		// Compare what the MLP added (the prior cancels exactly in fixed point).
		got, wantD := make([]float32, N*C), make([]float32, N*C)
		for i, a := range unpackInt64(raw) {
			got[i] = ref.Unfix(a - prior[i])
			wantD[i] = ref.Unfix(wantAcc[i] - prior[i])
		}
		if e := relErr(got, wantD); e > 2e-5 {
			t.Errorf("%s: max|Δ|/max|ref| = %.3g > 2e-5", name, e)
		}
		compare(t, name, got, wantD, 2e-5*maxAbs(wantD), 2e-5)
		if cl := unpackInt64(downloadInts(t, c, clearBuf)); slices.ContainsFunc(cl, func(v int64) bool { return v != 0 }) {
			t.Errorf("%s: clear not zeroed", name)
		}
		if sum {
			if got := download(t, c, sumBuf); !slices.Equal(got, wantSum) {
				t.Errorf("%s: the sum differs from ref.SumAcc", name)
			}
		}
		// The blocks' atomics arrive in any order; the fixed-point sum must
		// not care: every run agrees bit for bit.
		if first == nil {
			first = raw
		} else if !slices.Equal(first, raw) {
			t.Errorf("%s: run %d differs from the first", name, run)
		}
		c.UploadInts(clearBuf, packed(slices.Repeat([]int64{-7}, clearN)))
	}
}

// packed is v as the I32 pairs of an accumulator buffer.
func packed(v []int64) []int32 {
	p := make([]int32, 2*len(v))
	packInt64(p, v)
	return p
}

// TestCUDAMLPAccCaptured: the runner's one-token layer chain with the MLP
// in accumulators (NormMatMulStoreSum, leading from the second layer on,
// MatMulLead, MLPAcc, the last layer's ResMatMul clearing the one left),
// captured once and replayed, against the unfused chain on the CPU
// reference; and the same chain with the attention output projection
// folded (AttentionOutProj, MLPAccSum clearing the other parity's two
// accumulators).
func TestCUDAMLPAccCaptured(t *testing.T) {
	for _, fold := range []bool{false, true} {
		t.Run(fmt.Sprintf("fold=%v", fold), func(t *testing.T) { testMLPAccCaptured(t, fold) })
	}
}

func testMLPAccCaptured(t *testing.T, fold bool) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(93, 94))
	const C, NH, NKV, HS, F, L = 64, 4, 2, 16, 48, 3
	const QKV = (NH + 2*NKV) * HS
	type layer struct{ n1, qkv, o, n2, up, down []float32 }
	var ls []layer
	var lbufs []struct{ n1, qkv, o, n2, up, down Buf }
	for range L {
		ly := layer{
			randNormal(rng, C, 0.2, 1), asWeight(F16, randVals(rng, QKV*C, 0.15)), asWeight(F16, randVals(rng, C*NH*HS, 0.1)),
			randNormal(rng, C, 0.2, 1), asWeight(F16, randVals(rng, 2*F*C, 0.15)), asWeight(F16, randVals(rng, C*F, 0.15)),
		}
		ls = append(ls, ly)
		lbufs = append(lbufs, struct{ n1, qkv, o, n2, up, down Buf }{
			uploadNew(t, c, F32, ly.n1), uploadNew(t, c, F16, ly.qkv), uploadNew(t, c, F16, ly.o),
			uploadNew(t, c, F32, ly.n2), uploadNew(t, c, F16, ly.up), uploadNew(t, c, F16, ly.down),
		})
	}
	const S = 8
	x0 := randNormal(rng, C, 1, 0)
	fw := randNormal(rng, C, 0.2, 1) // the final norm's weights (fold)
	finalW := uploadNew(t, c, F32, fw)
	xBuf, xnBuf := uploadNew(t, c, F32, x0), alloc(t, c, F32, C)
	qkv, att, up := alloc(t, c, F32, QKV), alloc(t, c, F32, NH*HS), alloc(t, c, F32, 2*F)
	// The runner's layout: for each parity of layers the attention's
	// accumulator, then the MLP's.
	accBuf := uploadInts(t, c, make([]int32, 2*4*C))
	pairs := [2]Buf{accBuf.View(0, 4*C), accBuf.View(4*C, 4*C)}
	accs := [2]Buf{pairs[0].View(2*C, 2*C), pairs[1].View(2*C, 2*C)}
	attnAccs := [2]Buf{pairs[0].View(0, 2*C), pairs[1].View(0, 2*C)}
	kc, vc := alloc(t, c, F32, L*S*NKV*HS), alloc(t, c, F32, L*S*NKV*HS)
	pos, slots := uploadInts(t, c, []int32{0}), uploadInts(t, c, []int32{0})
	order, lens := uploadInts(t, c, []int32{0}), uploadInts(t, c, []int32{1})
	ap := AttnParams{B: 1, T: 1, NH: NH, NKV: NKV, HS: HS, QStride: QKV, MaxLen: 1}
	step := func() Buf {
		x, pending := xBuf, Buf{}
		pair, cur := [2]Buf{xBuf, xnBuf}, 0
		for l, b := range lbufs {
			st := QKVStore{K: kc.View(l*S*NKV*HS, S*NKV*HS), V: vc.View(l*S*NKV*HS, S*NKV*HS), Pos: pos, Slots: slots,
				NH: NH, NKV: NKV, HS: HS, RopeHeads: NH + NKV, Theta: 10000, Lead: l > 0}
			if pending.IsZero() {
				c.NormMatMulStore(qkv, x, b.n1, Buf{}, b.qkv, Buf{}, 1, C, 1e-5, RMSNormKind, st)
			} else {
				cur = 1 - cur
				c.NormMatMulStoreSum(qkv, pair[cur], x, pending, b.n1, Buf{}, b.qkv, Buf{}, 1, C, 1e-5, RMSNormKind, st)
				x = pair[cur]
			}
			if fold && l < L-1 {
				if !c.attentionOutProj(attnAccs[l%2], qkv, st.K, st.V, order, lens, ap, b.o, C, 1) {
					t.Fatalf("layer %d: AttentionOutProj not launched (%v)", l, c.Err())
				}
				sum := pair[1-cur]
				if !c.mlpAccSum(accs[l%2], pairs[1-l%2], sum, x, attnAccs[l%2], b.n2, Buf{}, b.up, Buf{}, b.down, Buf{}, 1, C, F, 1e-5, RMSNormKind, SwiGLUAct, 1, false) {
					t.Fatalf("layer %d: MLPAccSum not launched (%v)", l, c.Err())
				}
				cur, x, pending = 1-cur, sum, accs[l%2]
				continue
			}
			c.Attention(att, qkv, st.K, st.V, order, lens, ap)
			if fold { // the last layer as the runner's steps that end in logits
				c.MatMulLead(x, att, b.o, Buf{}, 1, NH*HS, C)
				if !c.mlpAccSum(accs[l%2], pairs[1-l%2], Buf{}, x, Buf{}, b.n2, Buf{}, b.up, Buf{}, b.down, Buf{}, 1, C, F, 1e-5, RMSNormKind, SwiGLUAct, 1, false) {
					t.Fatalf("layer %d: MLPAcc not launched (%v)", l, c.Err())
				}
				out := pair[1-cur]
				c.NormSum(out, x, accs[l%2], Buf{}, finalW, Buf{}, 1, C, 1e-5, RMSNormKind)
				return out
			}
			if l < L-1 { // as the runner: the MLP kernel may start during the attention
				c.MatMulLead(x, att, b.o, Buf{}, 1, NH*HS, C)
			} else {
				c.MatMul(x, att, b.o, Buf{}, 1, NH*HS, C, true)
			}
			if l < L-1 {
				if !c.mlpAcc(accs[l%2], accs[1-l%2], x, b.n2, Buf{}, b.up, Buf{}, b.down, Buf{}, 1, C, F, 1e-5, RMSNormKind, SwiGLUAct, 1) {
					t.Fatalf("layer %d: MLPAcc not launched (%v)", l, c.Err())
				}
				pending = accs[l%2]
				continue
			}
			cur = 1 - cur
			c.NormMatMul(up, x, b.n2, Buf{}, b.up, Buf{}, 1, C, 2*F, 1e-5, RMSNormKind, NoAct, false)
			c.ResMatMul(pair[cur], x, up, b.down, Buf{}, pending, 1, F, C, SwiGLUAct)
			x = pair[cur]
		}
		return x
	}
	var final Buf
	r, err := c.Capture(func() { final = step() })
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// The reference: the plain chain in fp32 (one entry, at position 0).
	want := slices.Clone(x0)
	for _, ly := range ls {
		q := make([]float32, QKV)
		ref.NormMatMul(q, want, ly.n1, nil, ly.qkv, nil, 1, C, QKV, 1e-5, true, false, false)
		ref.RoPE(q, []int32{0}, 1, NH+NKV, HS, QKV, 10000)
		a := make([]float32, NH*HS)
		for h := range NH { // one entry: attention returns its value
			copy(a[h*HS:(h+1)*HS], q[(NH+NKV+h/(NH/NKV))*HS:])
		}
		ref.MatMul(want, a, ly.o, nil, 1, NH*HS, C, true)
		gu := make([]float32, 2*F)
		ref.NormMatMul(gu, want, ly.n2, nil, ly.up, nil, 1, C, 2*F, 1e-5, true, false, false)
		ref.SwiGLUMatMul(want, gu, ly.down, 1, F, C, true)
	}
	if fold {
		ref.RMSNorm(want, slices.Clone(want), fw, 1, C, 1e-5)
	}
	for rep := range 3 {
		c.Upload(xBuf, x0)
		r.Run()
		got := download(t, c, final)
		name := fmt.Sprintf("replay %d", rep)
		compare(t, name, got, want, 1e-4*maxAbs(want), 1e-4)
		if v := downloadInts(t, c, accBuf); slices.ContainsFunc(v, func(x int32) bool { return x != 0 }) {
			t.Errorf("%s: accumulators not zero after the step", name)
		}
	}
	checkOK(t, c)
}
