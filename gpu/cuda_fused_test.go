//go:build cuda && !nofused

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

// fusedVariants are the entry points' variants a small-N test runs: the
// fused kernel launched normally and as a programmatic dependent, the
// two-step path (scratch + MatMul) that large N and the LM head take, and
// the N = 1 register kernel.
var fusedVariants = []int{fusedKernel, fusedPDL, fusedTwoStep, fusedRegs}

func variantName(v int) string {
	return [...]string{"auto", "kernel", "pdl", "twostep", "regs", "prefill"}[v]
}

// refWeight is asWeight keeping an absent operand absent.
func refWeight(dt DType, v []float32) []float32 {
	if v == nil {
		return nil
	}
	return asWeight(dt, v)
}

// fusedTol is the relative tolerance of a fused product: fp32 arithmetic
// (the reference sees the same fp16-rounded weights) except where the
// tensor-core GEMM rounds activations to fp16 (F16 weights, N > 8).
func fusedTol(wdt DType, N int) float64 {
	if wdt == F16 && N > 8 {
		return 1e-2
	}
	return 1e-5
}

func TestCUDAFusedNormMatMul(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(21, 22))
	shapes := []struct{ N, C, OC int }{
		{1, 64, 33}, {1, 576, 961}, {1, 768, 2305}, {2, 768, 129}, {3, 576, 193}, {3, 64, 65},
		{5, 768, 77}, {8, 576, 31}, {37, 576, 201}, {37, 64, 65}, {300, 768, 97},
		{1, 64, 8193}, // over 1536 blocks: the default takes the two-step path (as for an LM head)
	}
	for i, sh := range shapes {
		if testing.Short() && i%4 != 0 {
			continue // memcheck runs: a few shapes
		}
		variants := append([]int{fusedAuto}, fusedVariants...)
		if sh.N > 8 {
			variants = []int{fusedAuto, fusedTwoStep, fusedPrefill}
		}
		for _, wdt := range weightTypes {
			for _, norm := range []NormKind{LayerNormKind, RMSNormKind} {
				for _, mode := range []string{"plain", "gelu", "acc"} {
					for _, v := range variants {
						name := fmt.Sprintf("N%d_C%d_OC%d_%v_norm%d_%s_%s", sh.N, sh.C, sh.OC, wdt, norm, mode, variantName(v))
						// LayerNorm with norm bias and product bias (GPT-2), RMSNorm without (Llama).
						withBias := norm == LayerNormKind
						testNormMatMul(t, c, rng, name, sh.N, sh.C, sh.OC, wdt, wdt, norm, withBias, withBias, mode == "gelu", mode == "acc", v)
					}
				}
			}
		}
	}
	// Mixed dtypes and optional operands: LayerNorm without its bias, an F32
	// product bias over F16 weights, F16 norm weights over F32 weights.
	for _, v := range append(fusedVariants, fusedAuto) {
		testNormMatMul(t, c, rng, "mixed_a_"+variantName(v), 3, 768, 95, F16, F32, LayerNormKind, false, true, false, false, v)
		testNormMatMul(t, c, rng, "mixed_b_"+variantName(v), 1, 576, 130, F32, F16, LayerNormKind, true, false, true, false, v)
	}
}

func testNormMatMul(t *testing.T, c *CUDA, rng *rand.Rand, name string, N, C, OC int, wdt, ndt DType, norm NormKind,
	normBias, bias, gelu, acc bool, variant int) {
	t.Helper()
	in := randNormal(rng, N*C, 1, 0.4) // a non-zero mean: LayerNorm must subtract it
	nw := randNormal(rng, C, 0.2, 1)
	var nb, bv []float32
	if normBias && norm == LayerNormKind {
		nb = randNormal(rng, C, 0.1, 0)
	}
	if bias {
		bv = randNormal(rng, OC, 0.5, 0)
	}
	w := randVals(rng, OC*C, 1/float32(math.Sqrt(float64(C))))
	prev := randNormal(rng, N*OC, 1, 0)

	want := make([]float32, N*OC)
	if acc {
		copy(want, prev)
	}
	ref.NormMatMul(want, in, refWeight(ndt, nw), refWeight(ndt, nb), asWeight(wdt, w), refWeight(ndt, bv), N, C, OC, 1e-5,
		norm == RMSNormKind, gelu, acc)

	inBuf := uploadNew(t, c, F32, in)
	nwBuf := uploadNew(t, c, ndt, nw)
	var nbBuf, bBuf Buf
	if nb != nil {
		nbBuf = uploadNew(t, c, ndt, nb)
	}
	if bv != nil {
		bBuf = uploadNew(t, c, ndt, bv)
	}
	wBuf := uploadNew(t, c, wdt, w)
	out := uploadNew(t, c, F32, prev)
	if !acc {
		poison(t, c, out)
	}
	act := NoAct
	if gelu {
		act = GeluAct
	}
	c.normMatMul(out, inBuf, nwBuf, nbBuf, wBuf, bBuf, N, C, OC, 1e-5, norm, act, acc, variant)
	got := download(t, c, out)
	tol := fusedTol(wdt, N)
	if e := relErr(got, want); e > tol {
		t.Errorf("%s: max|Δ|/max|ref| = %.3g > %g", name, e, tol)
	}
	compare(t, name, got, want, tol*maxAbs(want), tol)
	for _, b := range []Buf{inBuf, nwBuf, nbBuf, bBuf, wBuf, out} {
		c.Free(b)
	}
}

func TestCUDAFusedSwiGLUMatMul(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(23, 24))
	shapes := []struct{ N, F, OC int }{
		{1, 64, 33}, {1, 1536, 577}, {2, 96, 129}, {3, 1536, 65}, {4, 1536, 31}, {8, 256, 77},
		{1, 36, 17}, // F not a multiple of the 16-byte vector: the two-step path
		{37, 1536, 101}, {300, 96, 63},
	}
	for i, sh := range shapes {
		if testing.Short() && i%3 != 0 {
			continue
		}
		variants := append([]int{fusedAuto}, fusedVariants...)
		if sh.N > 8 {
			variants = []int{fusedAuto, fusedTwoStep, fusedPrefill}
		}
		for _, wdt := range weightTypes {
			for _, acc := range []bool{false, true} {
				for _, v := range variants {
					name := fmt.Sprintf("N%d_F%d_OC%d_%v_acc%v_%s", sh.N, sh.F, sh.OC, wdt, acc, variantName(v))
					gu := randNormal(rng, sh.N*2*sh.F, 1.5, 0)
					w := randVals(rng, sh.OC*sh.F, 1/float32(math.Sqrt(float64(sh.F))))
					prev := randNormal(rng, sh.N*sh.OC, 1, 0)
					want := make([]float32, sh.N*sh.OC)
					if acc {
						copy(want, prev)
					}
					ref.SwiGLUMatMul(want, gu, asWeight(wdt, w), sh.N, sh.F, sh.OC, acc)
					guBuf := uploadNew(t, c, F32, gu)
					wBuf := uploadNew(t, c, wdt, w)
					out := uploadNew(t, c, F32, prev)
					if !acc {
						poison(t, c, out)
					}
					c.swiGLUMatMul(out, guBuf, wBuf, sh.N, sh.F, sh.OC, acc, v)
					got := download(t, c, out)
					tol := fusedTol(wdt, sh.N)
					if e := relErr(got, want); e > tol {
						t.Errorf("%s: max|Δ|/max|ref| = %.3g > %g", name, e, tol)
					}
					compare(t, name, got, want, tol*maxAbs(want), tol)
					for _, b := range []Buf{guBuf, wBuf, out} {
						c.Free(b)
					}
				}
			}
		}
	}
}

type ropeStoreCase struct {
	name                      string
	NH, NKV, HS, pad, rotHead int
	theta                     float32
}

var ropeStoreCases = []ropeStoreCase{
	{"llama", 9, 3, 64, 0, 12, 10000},          // queries and keys rotated, then cached
	{"llama_shiftkeys", 9, 3, 64, 0, 9, 10000}, // keys cached unrotated
	{"gpt2", 12, 12, 64, 0, 0, 0},              // no rotation: the cache copies only
	{"padded", 4, 2, 16, 5, 8, 500000},         // rows wider than q|k|v, every head rotated
	{"theta_no_heads", 2, 1, 8, 3, 0, 10000},   // theta given but nothing to rotate
}

func TestCUDAFusedRopeStore(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(25, 26))
	for _, cs := range ropeStoreCases {
		for _, N := range []int{1, 3, 37, 300} {
			if testing.Short() && N > 3 {
				continue
			}
			for _, v := range []int{fusedKernel, fusedPDL} {
				name := fmt.Sprintf("%s_N%d_%s", cs.name, N, variantName(v))
				testRopeStore(t, c, rng, name, cs, N, v)
			}
		}
	}
}

// ropeStoreInputs draws N rows' worth of RopeStore inputs for cs: caches of
// N+5 slots, positions, and distinct slots with row 1 (when N > 1) a
// padding row (slot −1: rotated in place, not cached).
func ropeStoreInputs(rng *rand.Rand, cs ropeStoreCase, N int) (kc, vc []float32, pos, slots []int32) {
	S := N + 5
	row := cs.NKV * cs.HS
	kc = randNormal(rng, S*row, 1, 0)
	vc = randNormal(rng, S*row, 1, 0)
	pos = randInts(rng, N, 100000)
	perm := rng.Perm(S)
	slots = make([]int32, N)
	for r := range slots {
		slots[r] = int32(perm[r])
	}
	if N > 1 {
		slots[1] = -1
	}
	return kc, vc, pos, slots
}

// refRopeStoreRows applies ref.RopeStore to qkv's N rows (stride apart) one
// by one, since the reference has no padding rows: those are only rotated.
func refRopeStoreRows(qkv, kc, vc []float32, pos, slots []int32, cs ropeStoreCase, stride int) {
	for r := range slots {
		x := qkv[r*stride:]
		if slots[r] < 0 {
			if cs.theta != 0 && cs.rotHead > 0 {
				ref.RoPE(x, pos[r:r+1], 1, cs.rotHead, cs.HS, stride, cs.theta)
			}
			continue
		}
		ref.RopeStore(x, kc, vc, pos[r:r+1], slots[r:r+1], 1, cs.NH, cs.NKV, cs.HS, stride, cs.rotHead, cs.theta)
	}
}

func testRopeStore(t *testing.T, c *CUDA, rng *rand.Rand, name string, cs ropeStoreCase, N, variant int) {
	t.Helper()
	width := (cs.NH + 2*cs.NKV) * cs.HS
	stride := width + cs.pad
	qkv := randNormal(rng, N*stride, 1, 0)
	kc, vc, pos, slots := ropeStoreInputs(rng, cs, N)

	wantQKV := append([]float32(nil), qkv...)
	wantK := append([]float32(nil), kc...)
	wantV := append([]float32(nil), vc...)
	refRopeStoreRows(wantQKV, wantK, wantV, pos, slots, cs, stride)

	qkvBuf := uploadNew(t, c, F32, qkv)
	kBuf := uploadNew(t, c, F32, kc)
	vBuf := uploadNew(t, c, F32, vc)
	posBuf := uploadInts(t, c, pos)
	slotBuf := uploadInts(t, c, slots)
	c.ropeStore(qkvBuf, kBuf, vBuf, posBuf, slotBuf, N, cs.NH, cs.NKV, cs.HS, stride, cs.rotHead, cs.theta, variant)
	compare(t, name+" qkv", download(t, c, qkvBuf), wantQKV, 1e-5, 1e-5)
	compare(t, name+" kc", download(t, c, kBuf), wantK, 1e-5, 1e-5)
	compare(t, name+" vc", download(t, c, vBuf), wantV, 1e-5, 1e-5)
	for _, b := range []Buf{qkvBuf, kBuf, vBuf, posBuf, slotBuf} {
		c.Free(b)
	}
}

// TestCUDAFusedNormMatMulStore: the q|k|v product with RoPE and cache
// writes fused in, against NormMatMul + RopeStore in the reference, for the
// RoPE cases (GPT-2, Llama with and without shifted keys, all heads
// rotated), both weight dtypes, row counts that take the single kernel and
// the two-launch path, fp32 shapes whose blocks hold 2 rows, and padding
// rows (slot −1: rotated but not cached).
func TestCUDAFusedNormMatMulStore(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(27, 28))
	for _, cs := range ropeStoreCases {
		if cs.pad != 0 {
			continue // q|k|v rows are exactly (NH+2·NKV)·HS wide here
		}
		for _, C := range []int{64, 576} {
			for _, N := range []int{1, 3, 8, 37} {
				if testing.Short() && (N == 8 || C == 64) {
					continue
				}
				for _, wdt := range weightTypes {
					for _, v := range []int{fusedAuto, fusedKernel, fusedPDL, fusedTwoStep, fusedRegs} {
						name := fmt.Sprintf("%s_C%d_N%d_%v_%s", cs.name, C, N, wdt, variantName(v))
						testNormMatMulStore(t, c, rng, name, cs, C, N, wdt, v, false)
						if v != fusedRegs {
							testNormMatMulStore(t, c, rng, name+"_sum", cs, C, N, wdt, v, true)
						}
					}
				}
			}
		}
	}
}

// testNormMatMulStore checks NormMatMulStore, or with withSum
// NormMatMulStoreSum on an accumulator of random values (and its sum).
func testNormMatMulStore(t *testing.T, c *CUDA, rng *rand.Rand, name string, cs ropeStoreCase, C, N int, wdt DType, variant int, withSum bool) {
	t.Helper()
	oc := (cs.NH + 2*cs.NKV) * cs.HS
	norm := RMSNormKind
	var nb, bv []float32
	if cs.theta == 0 { // GPT-2: LayerNorm with both biases
		norm = LayerNormKind
		nb = randNormal(rng, C, 0.1, 0)
		bv = randNormal(rng, oc, 0.5, 0)
	}
	in := randNormal(rng, N*C, 1, 0.4)
	nw := randNormal(rng, C, 0.2, 1)
	w := randVals(rng, oc*C, 1/float32(math.Sqrt(float64(C))))
	kc, vc, pos, slots := ropeStoreInputs(rng, cs, N)

	want := make([]float32, N*oc)
	wantK := append([]float32(nil), kc...)
	wantV := append([]float32(nil), vc...)
	var acc []int64
	refIn := in
	if withSum {
		acc = randFixed(rng, N*C)
		refIn = make([]float32, N*C)
		ref.SumAcc(refIn, in, acc, nil, N, C)
	}
	ref.NormMatMul(want, refIn, refWeight(wdt, nw), refWeight(wdt, nb), asWeight(wdt, w), refWeight(wdt, bv), N, C, oc, 1e-5,
		norm == RMSNormKind, false, false)
	refRopeStoreRows(want, wantK, wantV, pos, slots, cs, oc)

	inBuf := uploadNew(t, c, F32, in)
	nwBuf := uploadNew(t, c, wdt, nw)
	var nbBuf, bBuf Buf
	if nb != nil {
		nbBuf = uploadNew(t, c, wdt, nb)
		bBuf = uploadNew(t, c, wdt, bv)
	}
	wBuf := uploadNew(t, c, wdt, w)
	kBuf := uploadNew(t, c, F32, kc)
	vBuf := uploadNew(t, c, F32, vc)
	posBuf := uploadInts(t, c, pos)
	slotBuf := uploadInts(t, c, slots)
	out, err := c.Alloc(F32, N*oc)
	if err != nil {
		t.Fatal(err)
	}
	poison(t, c, out)
	st := QKVStore{K: kBuf, V: vBuf, Pos: posBuf, Slots: slotBuf, NH: cs.NH, NKV: cs.NKV, HS: cs.HS, RopeHeads: cs.rotHead, Theta: cs.theta}
	var sumBuf, accBuf Buf
	if withSum {
		sumBuf, accBuf = alloc(t, c, F32, N*C), uploadInts(t, c, packed(acc))
		poison(t, c, sumBuf)
		defer c.Free(sumBuf)
		defer c.Free(accBuf)
	}
	c.normMatMulStoreSum(out, sumBuf, inBuf, accBuf, nwBuf, nbBuf, wBuf, bBuf, N, C, 1e-5, norm, st, variant)
	if withSum {
		compare(t, name+" sum", download(t, c, sumBuf), refIn, 0, 0)
	}
	tol := fusedTol(wdt, N)
	got := download(t, c, out)
	if e := relErr(got, want); e > tol {
		t.Errorf("%s: qkv max|Δ|/max|ref| = %.3g > %g", name, e, tol)
	}
	compare(t, name+" qkv", got, want, tol*maxAbs(want), tol)
	compare(t, name+" kc", download(t, c, kBuf), wantK, tol*maxAbs(wantK), tol)
	compare(t, name+" vc", download(t, c, vBuf), wantV, tol*maxAbs(wantV), tol)
	for _, b := range []Buf{inBuf, nwBuf, nbBuf, bBuf, wBuf, kBuf, vBuf, posBuf, slotBuf, out} {
		c.Free(b)
	}
}

// TestCUDAFusedCapture captures a Llama-like and a GPT-2-like layer built
// from the fused operations (plus the final norm and LM head) once per
// variant and row count, and replays it with new activations, positions and
// slots written between replays, checking every output against the
// reference chain. N = 37 runs the two-step path, whose scratch buffers
// become graph memory nodes.
func TestCUDAFusedCapture(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(27, 28))
	const C, NH, NKV, HS, F, V = 576, 9, 3, 64, 1536, 1001
	const QKV = (NH + 2*NKV) * HS
	const eps, theta = 1e-5, 10000
	for _, wdt := range weightTypes {
		wq := randVals(rng, QKV*C, 0.05)
		wup := randVals(rng, 2*F*C, 0.05)
		wfc := randVals(rng, F*C, 0.05)
		bfc := randNormal(rng, F, 0.1, 0)
		wdown := randVals(rng, C*F, 0.03)
		wlm := randVals(rng, V*C, 0.05)
		n1, n2, nf, lnb := randNormal(rng, C, 0.2, 1), randNormal(rng, C, 0.2, 1), randNormal(rng, C, 0.2, 1), randNormal(rng, C, 0.1, 0)
		bufs := map[string]Buf{}
		up := func(name string, dt DType, v []float32) Buf {
			b := uploadNew(t, c, dt, v)
			bufs[name] = b
			return b
		}
		Wq, Wup, Wfc, Bfc, Wdown, Wlm := up("wq", wdt, wq), up("wup", wdt, wup), up("wfc", wdt, wfc), up("bfc", wdt, bfc), up("wdown", wdt, wdown), up("wlm", wdt, wlm)
		N1, N2, NF, LNB := up("n1", wdt, n1), up("n2", wdt, n2), up("nf", wdt, nf), up("lnb", wdt, lnb)
		for _, N := range []int{1, 37} {
			for _, v := range append([]int{fusedAuto}, fusedVariants...) {
				name := fmt.Sprintf("%v_N%d_%s", wdt, N, variantName(v))
				S := N + 3
				x := alloc(t, c, F32, N*C)
				qkv := alloc(t, c, F32, N*QKV)
				kc, vc := alloc(t, c, F32, S*NKV*HS), alloc(t, c, F32, S*NKV*HS)
				gu := alloc(t, c, F32, N*2*F)
				h := alloc(t, c, F32, N*F)
				logits := alloc(t, c, F32, N*V)
				pos, slots := alloc(t, c, I32, N), alloc(t, c, I32, N)
				rep, err := c.Capture(func() {
					// The q|k|v product with its RoPE and cache writes (the
					// runner's path; fusedTwoStep takes the two launches).
					c.normMatMulStore(qkv, x, N1, Buf{}, Wq, Buf{}, N, C, eps, RMSNormKind,
						QKVStore{K: kc, V: vc, Pos: pos, Slots: slots, NH: NH, NKV: NKV, HS: HS, RopeHeads: NH + NKV, Theta: theta}, v)
					c.normMatMul(gu, x, N2, Buf{}, Wup, Buf{}, N, C, 2*F, eps, RMSNormKind, NoAct, false, v)
					c.swiGLUMatMul(x, gu, Wdown, N, F, C, true, v)
					c.normMatMul(h, x, N2, LNB, Wfc, Bfc, N, C, F, eps, LayerNormKind, GeluAct, false, v)
					c.normMatMul(logits, x, NF, Buf{}, Wlm, Buf{}, N, C, V, eps, RMSNormKind, NoAct, false, v)
				})
				if err != nil {
					t.Fatalf("%s: capture: %v", name, err)
				}
				kcHost, vcHost := make([]float32, S*NKV*HS), make([]float32, S*NKV*HS)
				for step := 0; step < 3; step++ {
					xh := randNormal(rng, N*C, 1, 0.2)
					ph := randInts(rng, N, 5000)
					perm := rng.Perm(S)
					sh := make([]int32, N)
					for r := range sh {
						sh[r] = int32(perm[r])
					}
					c.Upload(x, xh)
					c.UploadInts(pos, ph)
					c.UploadInts(slots, sh)
					for _, b := range []Buf{qkv, gu, h, logits} {
						poison(t, c, b)
					}
					rep.Run()
					checkOK(t, c)

					rq, rgu, rh, rl := make([]float32, N*QKV), make([]float32, N*2*F), make([]float32, N*F), make([]float32, N*V)
					rx := append([]float32(nil), xh...)
					ref.NormMatMul(rq, rx, asWeight(wdt, n1), nil, asWeight(wdt, wq), nil, N, C, QKV, eps, true, false, false)
					ref.RopeStore(rq, kcHost, vcHost, ph, sh, N, NH, NKV, HS, QKV, NH+NKV, theta)
					ref.NormMatMul(rgu, rx, asWeight(wdt, n2), nil, asWeight(wdt, wup), nil, N, C, 2*F, eps, true, false, false)
					ref.SwiGLUMatMul(rx, rgu, asWeight(wdt, wdown), N, F, C, true)
					ref.NormMatMul(rh, rx, asWeight(wdt, n2), asWeight(wdt, lnb), asWeight(wdt, wfc), asWeight(wdt, bfc), N, C, F, eps, false, true, false)
					ref.NormMatMul(rl, rx, asWeight(wdt, nf), nil, asWeight(wdt, wlm), nil, N, C, V, eps, true, false, false)

					tol := 1e-4 // a chain of products: rounding accumulates
					if wdt == F16 && N > 8 {
						tol = 2e-2
					}
					stepName := fmt.Sprintf("%s step %d", name, step)
					for _, o := range []struct {
						what      string
						got, want []float32
					}{
						{"qkv", download(t, c, qkv), rq}, {"gu", download(t, c, gu), rgu}, {"x", download(t, c, x), rx},
						{"h", download(t, c, h), rh}, {"logits", download(t, c, logits), rl},
					} {
						if e := relErr(o.got, o.want); e > tol {
							t.Errorf("%s %s: max|Δ|/max|ref| = %.3g > %g", stepName, o.what, e, tol)
						}
					}
					// The cache rows written this step (others hold last step's or poison).
					gk, gv := download(t, c, kc), download(t, c, vc)
					for _, s := range sh {
						lo, hi := int(s)*NKV*HS, int(s+1)*NKV*HS
						compare(t, stepName+" kc", gk[lo:hi], kcHost[lo:hi], tol*maxAbs(kcHost[lo:hi]), tol)
						compare(t, stepName+" vc", gv[lo:hi], vcHost[lo:hi], tol*maxAbs(vcHost[lo:hi]), tol)
					}
				}
				if err := rep.Close(); err != nil {
					t.Fatal(err)
				}
				for _, b := range []Buf{x, qkv, kc, vc, gu, h, logits, pos, slots} {
					c.Free(b)
				}
				checkOK(t, c)
			}
		}
		for _, b := range bufs {
			c.Free(b)
		}
	}
}

// TestCUDAFusedErrors: bad arguments are errors naming the operation.
func TestCUDAFusedErrors(t *testing.T) {
	c := newTestCUDA(t)
	x := alloc(t, c, F32, 64)
	w := alloc(t, c, F16, 64*4)
	c.NormMatMul(x, x, w.View(0, 64), Buf{}, w, Buf{}, 1, 64, 4, 1e-5, RMSNormKind, NoAct, false)
	if err := c.Err(); err == nil || !strings.Contains(err.Error(), "normmatmul") || !strings.Contains(err.Error(), "overlaps") {
		t.Errorf("overlapping in/out: error %v", err)
	}
	d := newTestCUDA(t)
	y := alloc(t, d, F32, 64)
	o := alloc(t, d, F32, 4)
	v := alloc(t, d, F16, 64*4)
	d.NormMatMul(o, y, v.View(0, 64), Buf{}, v, Buf{}, 1, 64, 4, 1e-5, LayerNormKind, GeluAct, true)
	if err := d.Err(); err == nil || !strings.Contains(err.Error(), "accumulate") {
		t.Errorf("gelu with accumulate: error %v", err)
	}
}

// ---- benchmarks ----

// fusedBenchShapes are the decode-time fused products of the two models.
var fusedBenchShapes = []struct {
	name       string
	norm       NormKind // 0: SwiGLUMatMul (C is then F)
	C, OC      int
	gelu, bias bool
	accumulate bool
}{
	{"distil_ln_qkv", LayerNormKind, 768, 2304, false, true, false},
	{"distil_ln_fc_gelu", LayerNormKind, 768, 3072, true, true, false},
	{"distil_ln_lmhead", LayerNormKind, 768, 50257, false, false, false},
	{"smol_rms_qkv", RMSNormKind, 576, 960, false, false, false},
	{"smol_rms_gateup", RMSNormKind, 576, 3072, false, false, false},
	{"smol_swiglu_down", 0, 1536, 576, false, false, true},
	{"smol_rms_lmhead", RMSNormKind, 576, 49152, false, false, false},
}

// BenchmarkCUDAFused: each fused product at N = 1 with fp16 weights rotated
// through a pool larger than L2 (as the decode step streams them), per
// variant, timed inside a captured graph of back-to-back calls (so the
// programmatic-dependent variant overlaps each call's weight fetch with the
// previous call, as in a decode step). GB/s counts weight bytes.
func BenchmarkCUDAFused(b *testing.B) {
	c := newTestCUDA(b)
	pool := newBenchPool(b, c, F16)
	rng := rand.New(rand.NewPCG(29, 30))
	for _, sh := range fusedBenchShapes {
		for _, v := range append([]int{fusedAuto}, fusedVariants...) {
			b.Run(fmt.Sprintf("%s_N1/%s", sh.name, variantName(v)), func(b *testing.B) {
				ws := poolViews(pool, sh.OC*sh.C)
				inLen := sh.C
				if sh.norm == 0 {
					inLen = 2 * sh.C
				}
				in := uploadNew(b, c, F32, randNormal(rng, inLen, 1, 0.1))
				nw := uploadNew(b, c, F16, randNormal(rng, sh.C, 0.2, 1))
				nb := uploadNew(b, c, F16, randNormal(rng, sh.C, 0.1, 0))
				var bias Buf
				if sh.bias {
					bias = uploadNew(b, c, F16, randNormal(rng, sh.OC, 0.1, 0))
				}
				out := uploadNew(b, c, F32, make([]float32, sh.OC))
				act := NoAct
				if sh.gelu {
					act = GeluAct
				}
				sec := graphTime(b, c, len(ws), func(i int) {
					switch sh.norm {
					case 0:
						c.swiGLUMatMul(out, in, ws[i], 1, sh.C, sh.OC, sh.accumulate, v)
					case LayerNormKind:
						c.normMatMul(out, in, nw, nb, ws[i], bias, 1, sh.C, sh.OC, 1e-5, LayerNormKind, act, sh.accumulate, v)
					default:
						c.normMatMul(out, in, nw, Buf{}, ws[i], bias, 1, sh.C, sh.OC, 1e-5, RMSNormKind, act, sh.accumulate, v)
					}
				})
				b.ReportMetric(float64(sh.OC*sh.C*2)/sec/1e9, "GB/s")
				b.ReportMetric(sec*1e6, "µs/call")
			})
		}
	}
	for _, cs := range ropeStoreCases[:3] {
		for _, v := range []int{fusedKernel, fusedPDL} {
			b.Run(fmt.Sprintf("ropestore_%s_N1/%s", cs.name, variantName(v)), func(b *testing.B) {
				width := (cs.NH + 2*cs.NKV) * cs.HS
				qkv := uploadNew(b, c, F32, randNormal(rng, width, 1, 0))
				kc := uploadNew(b, c, F32, make([]float32, 256*cs.NKV*cs.HS))
				vc := uploadNew(b, c, F32, make([]float32, 256*cs.NKV*cs.HS))
				pos := uploadInts(b, c, []int32{1234})
				slots := uploadInts(b, c, []int32{77})
				sec := graphTime(b, c, 100, func(int) {
					c.ropeStore(qkv, kc, vc, pos, slots, 1, cs.NH, cs.NKV, cs.HS, width, cs.rotHead, cs.theta, v)
				})
				b.ReportMetric(sec*1e6, "µs/call")
			})
		}
	}
}

// decodeChainModel is the part of a decode step a model spends outside
// attention: per layer the qkv product, RoPE and cache writes, the output
// projection, the MLP; then the final norm and the LM head.
type decodeChainModel struct {
	name                    string
	llama                   bool
	L, C, NH, NKV, HS, F, V int
}

var decodeChainModels = []decodeChainModel{
	{"distilgpt2", false, 6, 768, 12, 12, 64, 3072, 50257},
	{"smollm2", true, 30, 576, 9, 3, 64, 1536, 49152},
}

// upWidth is the width of the MLP's first product (Llama: gate|up).
func (m decodeChainModel) upWidth() int {
	if m.llama {
		return 2 * m.F
	}
	return m.F
}

// benchLayer is one layer's weights in a benchmark pool (Llama's biases and
// norm biases absent).
type benchLayer struct{ qkv, o, up, down, n1, n2, nb1, nb2, bq, bo, bu, bd Buf }

// poolCarver hands out consecutive views of a benchmark pool, each at a
// multiple of 64 elements (128 bytes of fp16): aligned for the GEMVs' and
// the tensor-core kernels' 16-byte loads.
type poolCarver struct {
	pool Buf
	off  int
}

func (pc *poolCarver) take(n int) Buf {
	v := pc.pool.View(pc.off, n)
	pc.off += (n + 63) / 64 * 64
	return v
}

// layers carves m.L layers' weights, each layer its own, so that a chain
// of layers streams from memory rather than from L2.
func (pc *poolCarver) layers(m decodeChainModel) []benchLayer {
	qkvW, upW := (m.NH+2*m.NKV)*m.HS, m.upWidth()
	layers := make([]benchLayer, m.L)
	for l := range layers {
		ly := &layers[l]
		ly.qkv, ly.o, ly.up, ly.down = pc.take(qkvW*m.C), pc.take(m.C*m.NH*m.HS), pc.take(upW*m.C), pc.take(m.C*m.F)
		ly.n1, ly.n2, ly.nb1, ly.nb2 = pc.take(m.C), pc.take(m.C), pc.take(m.C), pc.take(m.C)
		ly.bq, ly.bo, ly.bu, ly.bd = pc.take(qkvW), pc.take(m.C), pc.take(upW), pc.take(m.C)
		if m.llama {
			ly.nb1, ly.nb2, ly.bq, ly.bo, ly.bu, ly.bd = Buf{}, Buf{}, Buf{}, Buf{}, Buf{}, Buf{}
		}
	}
	return layers
}

// fits fails the benchmark when more was carved than the pool holds.
func (pc *poolCarver) fits(b *testing.B, name string) {
	if pc.off > pc.pool.Len() {
		b.Fatalf("%s: pool too small (%d > %d)", name, pc.off, pc.pool.Len())
	}
}

// BenchmarkCUDAFusedDecodeChain times that part of a batch-1 decode step
// (attention and sampling left out) as one captured graph: the plain
// operations (what the runner enqueues without Fused), and the fused
// operations per variant (normal launch, programmatic dependents, two-step,
// the N = 1 register kernel, and the default choice).
// Each layer has its own fp16 weights from a pool larger than L2.
func BenchmarkCUDAFusedDecodeChain(b *testing.B) {
	c := newTestCUDA(b)
	pool := newBenchPool(b, c, F16)
	rng := rand.New(rand.NewPCG(31, 32))
	for _, m := range decodeChainModels {
		qkvW, upW := (m.NH+2*m.NKV)*m.HS, m.upWidth()
		pc := &poolCarver{pool: pool}
		layers := pc.layers(m)
		lm, nf, nbf := pc.take(m.V*m.C), pc.take(m.C), pc.take(m.C)
		if m.llama {
			nbf = Buf{}
		}
		pc.fits(b, m.name)
		x := uploadNew(b, c, F32, randNormal(rng, m.C, 1, 0))
		xn := alloc(b, c, F32, m.C)
		qkv := alloc(b, c, F32, qkvW)
		att := uploadNew(b, c, F32, randNormal(rng, m.NH*m.HS, 1, 0))
		up := alloc(b, c, F32, upW)
		act := alloc(b, c, F32, m.F)
		logits := alloc(b, c, F32, m.V)
		kc, vc := alloc(b, c, F32, 256*m.NKV*m.HS), alloc(b, c, F32, 256*m.NKV*m.HS)
		pos, slots := uploadInts(b, c, []int32{300}), uploadInts(b, c, []int32{5})
		theta, rot := float32(0), 0
		if m.llama {
			theta, rot = 10000, m.NH+m.NKV
		}
		norm := func(out, in, w, bb Buf) {
			if m.llama {
				c.RMSNorm(out, in, w, 1, m.C, 1e-5)
			} else {
				c.LayerNorm(out, in, w, bb, 1, m.C, 1e-5)
			}
		}
		nk := LayerNormKind
		if m.llama {
			nk = RMSNormKind
		}
		unfused := func() {
			for _, ly := range layers {
				norm(xn, x, ly.n1, ly.nb1)
				c.MatMul(qkv, xn, ly.qkv, ly.bq, 1, m.C, qkvW, false)
				if m.llama {
					c.RoPE(qkv, pos, 1, rot, m.HS, qkvW, theta)
				}
				c.CacheStore(kc, qkv.View(m.NH*m.HS, m.NKV*m.HS*2), slots, 1, m.NKV*m.HS, qkvW)
				c.CacheStore(vc, qkv.View((m.NH+m.NKV)*m.HS, m.NKV*m.HS), slots, 1, m.NKV*m.HS, qkvW)
				c.MatMul(x, att, ly.o, ly.bo, 1, m.NH*m.HS, m.C, true)
				norm(xn, x, ly.n2, ly.nb2)
				if m.llama {
					c.MatMul(up, xn, ly.up, Buf{}, 1, m.C, upW, false)
					c.SiluMul(act, up, up.View(m.F, m.F), 1, m.F, 2*m.F)
					c.MatMul(x, act, ly.down, Buf{}, 1, m.F, m.C, true)
				} else {
					c.MatMul(up, xn, ly.up, ly.bu, 1, m.C, upW, false)
					c.GeluNew(up, m.F)
					c.MatMul(x, up, ly.down, ly.bd, 1, m.F, m.C, true)
				}
			}
			norm(xn, x, nf, nbf)
			c.MatMul(logits, xn, lm, Buf{}, 1, m.C, m.V, false)
		}
		fused := func(v int) func() {
			return func() {
				for _, ly := range layers {
					c.normMatMul(qkv, x, ly.n1, ly.nb1, ly.qkv, ly.bq, 1, m.C, qkvW, 1e-5, nk, NoAct, false, v)
					c.ropeStore(qkv, kc, vc, pos, slots, 1, m.NH, m.NKV, m.HS, qkvW, rot, theta, v)
					c.MatMul(x, att, ly.o, ly.bo, 1, m.NH*m.HS, m.C, true)
					if m.llama {
						c.normMatMul(up, x, ly.n2, Buf{}, ly.up, Buf{}, 1, m.C, upW, 1e-5, nk, NoAct, false, v)
						c.swiGLUMatMul(x, up, ly.down, 1, m.F, m.C, true, v)
					} else {
						c.normMatMul(up, x, ly.n2, ly.nb2, ly.up, ly.bu, 1, m.C, upW, 1e-5, nk, GeluAct, false, v)
						c.MatMul(x, up, ly.down, ly.bd, 1, m.F, m.C, true)
					}
				}
				c.normMatMul(logits, x, nf, nbf, lm, Buf{}, 1, m.C, m.V, 1e-5, nk, NoAct, false, v)
			}
		}
		// The runner's decode layer: the q|k|v product with RoPE and cache
		// writes, attention over a full 256-entry cache (Llama: with the
		// position shift, keys rotated as read), then the rest.
		order := make([]int32, 256)
		for i := range order {
			order[i] = int32(i)
		}
		orderBuf, lensBuf := uploadInts(b, c, order), uploadInts(b, c, []int32{256})
		ap := AttnParams{B: 1, T: 1, NH: m.NH, NKV: m.NKV, HS: m.HS, QStride: qkvW, MaxLen: 256}
		storeRot := 0
		if m.llama {
			ap.RopeTheta, storeRot = theta, m.NH
		}
		work := c.attnWork(attnWorkFloats(ap))
		apNoRope := ap
		apNoRope.RopeTheta = 0
		runnerLayer := func(attention bool, variant, mmVariant int) func() {
			return func() {
				ap := ap
				if variant < 0 { // the attention without the position shift
					ap, variant = apNoRope, -variant
				}
				for _, ly := range layers {
					c.NormMatMulStore(qkv, x, ly.n1, ly.nb1, ly.qkv, ly.bq, 1, m.C, 1e-5, nk,
						QKVStore{K: kc, V: vc, Pos: pos, Slots: slots, NH: m.NH, NKV: m.NKV, HS: m.HS, RopeHeads: storeRot, Theta: theta})
					if attention {
						c.attention(att, qkv, kc, vc, orderBuf, lensBuf, ap, variant, work)
					}
					c.matmul(x, att, ly.o, ly.bo, 1, m.NH*m.HS, m.C, true, mmVariant)
					if m.llama {
						c.NormMatMul(up, x, ly.n2, Buf{}, ly.up, Buf{}, 1, m.C, upW, 1e-5, nk, NoAct, false)
						c.SwiGLUMatMul(x, up, ly.down, 1, m.F, m.C, true)
					} else {
						c.NormMatMul(up, x, ly.n2, ly.nb2, ly.up, ly.bu, 1, m.C, upW, 1e-5, nk, GeluAct, false)
						c.matmul(x, up, ly.down, ly.bd, 1, m.F, m.C, true, mmVariant)
					}
				}
				c.NormMatMul(logits, x, nf, nbf, lm, Buf{}, 1, m.C, m.V, 1e-5, nk, NoAct, false)
			}
		}
		// The same with the attention output projection folded into the
		// attention (AttentionOutProj, forced on), as the runner's one-token
		// steps run it where the default takes it (SmolLM2).
		acc := uploadInts(b, c, make([]int32, 2*m.C))
		fold := func() {
			for _, ly := range layers {
				c.NormMatMulStore(qkv, x, ly.n1, ly.nb1, ly.qkv, ly.bq, 1, m.C, 1e-5, nk,
					QKVStore{K: kc, V: vc, Pos: pos, Slots: slots, NH: m.NH, NKV: m.NKV, HS: m.HS, RopeHeads: storeRot, Theta: theta})
				if !c.attentionOutProj(acc, qkv, kc, vc, orderBuf, lensBuf, ap, ly.o, m.C, 1) {
					b.Fatalf("%s: AttentionOutProj did not launch (%v)", m.name, c.Err())
				}
				if m.llama {
					c.NormMatMulSum(up, xn, x, acc, Buf{}, ly.n2, Buf{}, ly.up, Buf{}, 1, m.C, upW, 1e-5, nk, NoAct)
					c.ResMatMul(x, xn, up, ly.down, Buf{}, acc, 1, m.F, m.C, SwiGLUAct)
				} else {
					c.NormMatMulSum(up, xn, x, acc, ly.bo, ly.n2, ly.nb2, ly.up, ly.bu, 1, m.C, upW, 1e-5, nk, GeluAct)
					c.ResMatMul(x, xn, up, ly.down, ly.bd, acc, 1, m.F, m.C, NoAct)
				}
			}
			c.NormMatMul(logits, x, nf, nbf, lm, Buf{}, 1, m.C, m.V, 1e-5, nk, NoAct, false)
		}
		// The runner's one-token layer with the MLP in one launch
		// (MLPAcc into two accumulators, NormMatMulStoreSum reading them;
		// the last layer's MLP as two products), forced for both models
		// (the default takes it for SmolLM2 only).
		accs := [2]Buf{uploadInts(b, c, make([]int32, 2*m.C)), uploadInts(b, c, make([]int32, 2*m.C))}
		mlp := func() {
			xc, pending := x, Buf{}
			pair, cur := [2]Buf{x, xn}, 0
			act := GeluAct
			if m.llama {
				act = SwiGLUAct
			}
			for l, ly := range layers { // (Llama's biases are absent Bufs)
				st := QKVStore{K: kc, V: vc, Pos: pos, Slots: slots, NH: m.NH, NKV: m.NKV, HS: m.HS, RopeHeads: storeRot, Theta: theta}
				if pending.IsZero() {
					c.NormMatMulStore(qkv, xc, ly.n1, ly.nb1, ly.qkv, ly.bq, 1, m.C, 1e-5, nk, st)
				} else {
					cur = 1 - cur
					c.NormMatMulStoreSum(qkv, pair[cur], xc, pending, ly.n1, ly.nb1, ly.qkv, ly.bq, 1, m.C, 1e-5, nk, st)
					xc = pair[cur]
				}
				c.attention(att, qkv, kc, vc, orderBuf, lensBuf, ap, 0, work)
				c.MatMul(xc, att, ly.o, ly.bo, 1, m.NH*m.HS, m.C, true)
				if l < len(layers)-1 {
					if !c.mlpAcc(accs[l%2], pending, xc, ly.n2, ly.nb2, ly.up, ly.bu, ly.down, ly.bd, 1, m.C, m.F, 1e-5, nk, act, 1) {
						b.Fatalf("%s: MLPAcc did not launch (%v)", m.name, c.Err())
					}
					pending = accs[l%2]
					continue
				}
				cur = 1 - cur
				if m.llama {
					c.NormMatMul(up, xc, ly.n2, Buf{}, ly.up, Buf{}, 1, m.C, upW, 1e-5, nk, NoAct, false)
					c.ResMatMul(pair[cur], xc, up, ly.down, Buf{}, pending, 1, m.F, m.C, SwiGLUAct)
				} else {
					c.NormMatMul(up, xc, ly.n2, ly.nb2, ly.up, ly.bu, 1, m.C, upW, 1e-5, nk, GeluAct, false)
					c.ResMatMul(pair[cur], xc, up, ly.down, ly.bd, pending, 1, m.F, m.C, NoAct)
				}
				xc = pair[cur]
			}
			c.NormMatMul(logits, xc, nf, nbf, lm, Buf{}, 1, m.C, m.V, 1e-5, nk, NoAct, false)
		}
		for _, way := range []struct {
			name string
			fn   func()
		}{{"unfused", unfused}, {"fused", fused(fusedKernel)}, {"fusedPDL", fused(fusedPDL)}, {"twostep", fused(fusedTwoStep)},
			{"regsPDL", fused(fusedRegs)}, {"auto", fused(fusedAuto)}, {"store", runnerLayer(false, 0, 0)},
			{"store_plaingemv", runnerLayer(false, 0, 1)}, {"store+attention", runnerLayer(true, 0, 0)},
			{"store+attention_v6", runnerLayer(true, 6, 0)}, {"store+attention_v8", runnerLayer(true, 8, 0)},
			{"store+attention_v9", runnerLayer(true, 9, 0)}, {"store+attention_v4", runnerLayer(true, 4, 0)},
			{"store+attention_v9_norope", runnerLayer(true, -9, 0)}, {"store+attention_v10", runnerLayer(true, 10, 0)},
			{"store+attention_v11", runnerLayer(true, 11, 0)}, {"store+attention_v14", runnerLayer(true, 14, 0)},
			{"store+attention+fold", fold}, {"store+attention+mlp", mlp}} {
			b.Run(m.name+"/"+way.name, func(b *testing.B) {
				sec := graphTime(b, c, 1, func(int) { way.fn() })
				b.ReportMetric(sec*1e6, "µs/step")
				b.ReportMetric(sec*1e6/float64(m.L), "µs/layer")
			})
		}
	}
}

// TestCUDANormMatMulStoreLead: with QKVStore.Lead the q|k|v product lets
// the attention after it launch early (it gathers its older K/V rows before
// its wait); every result is the same bits as without. The chain is the
// runner's: a product writing the input (or an MLP block filling the
// accumulator), the q|k|v product, the attention, a product reading its
// output, captured once and replayed over steps that grow the cache, on
// the attention's cluster path (few kv heads, RoPE, keys rotated when read
// or when stored) and its one-block path (GPT-2's heads).
func TestCUDANormMatMulStoreLead(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(97, 98))
	for _, sh := range []struct {
		name           string
		C, NH, NKV, HS int
		llama, shift   bool
		sum            bool // the input is the stream an MLPAcc left in an accumulator
	}{
		{"smollm2_sum", 576, 9, 3, 64, true, true, true},
		{"smollm2", 576, 9, 3, 64, true, true, false},
		{"llama_rotated", 64, 4, 2, 16, true, false, true},
		{"gpt2", 768, 12, 12, 64, false, false, false},
	} {
		const S, F, steps = 24, 128, 20
		QKV := (sh.NH + 2*sh.NKV) * sh.HS
		norm, theta, rot := LayerNormKind, float32(0), 0
		var attnTheta float32
		if sh.llama {
			norm, theta, rot = RMSNormKind, 10000, sh.NH+sh.NKV
			if sh.shift { // keys cached unrotated, rotated at their index when read
				rot, attnTheta = sh.NH, 10000
			}
		}
		src := randNormal(rng, sh.C, 1, 0)
		pre := asWeight(F16, randVals(rng, sh.C*sh.C, 1/float32(math.Sqrt(float64(sh.C)))))
		nw := asWeight(F16, randNormal(rng, sh.C, 0.2, 1))
		w := asWeight(F16, randVals(rng, QKV*sh.C, 1/float32(math.Sqrt(float64(sh.C)))))
		next := asWeight(F16, randVals(rng, sh.C*sh.NH*sh.HS, 0.1))
		upW := asWeight(F16, randVals(rng, 2*F*sh.C, 0.1))
		downW := asWeight(F16, randVals(rng, sh.C*F, 0.1))
		srcBuf, preBuf, nwBuf := uploadNew(t, c, F32, src), uploadNew(t, c, F16, pre), uploadNew(t, c, F16, nw)
		wBuf, nextBuf := uploadNew(t, c, F16, w), uploadNew(t, c, F16, next)
		upBuf, downBuf := uploadNew(t, c, F16, upW), uploadNew(t, c, F16, downW)
		x, sum, qkv := alloc(t, c, F32, sh.C), alloc(t, c, F32, sh.C), alloc(t, c, F32, QKV)
		att, y := alloc(t, c, F32, sh.NH*sh.HS), alloc(t, c, F32, sh.C)
		acc := uploadInts(t, c, make([]int32, 2*sh.C))
		kc, vc := alloc(t, c, F32, S*sh.NKV*sh.HS), alloc(t, c, F32, S*sh.NKV*sh.HS)
		pos, slots := uploadInts(t, c, []int32{0}), uploadInts(t, c, []int32{0})
		order, lens := uploadInts(t, c, make([]int32, S)), uploadInts(t, c, []int32{1})
		ap := AttnParams{B: 1, T: 1, NH: sh.NH, NKV: sh.NKV, HS: sh.HS, QStride: QKV, MaxLen: S, RopeTheta: attnTheta, F16: true}
		var runs [2][][]float32
		for lead := 0; lead < 2; lead++ {
			st := QKVStore{K: kc, V: vc, Pos: pos, Slots: slots, NH: sh.NH, NKV: sh.NKV, HS: sh.HS, RopeHeads: rot, Theta: theta, Lead: lead == 1}
			r, err := c.Capture(func() {
				c.MatMul(x, srcBuf, preBuf, Buf{}, 1, sh.C, sh.C, false)
				if sh.sum {
					if !c.mlpAcc(acc, Buf{}, x, nwBuf, Buf{}, upBuf, Buf{}, downBuf, Buf{}, 1, sh.C, F, 1e-5, RMSNormKind, SwiGLUAct, 1) {
						t.Fatalf("%s: MLPAcc not launched (%v)", sh.name, c.Err())
					}
					c.NormMatMulStoreSum(qkv, sum, x, acc, nwBuf, Buf{}, wBuf, Buf{}, 1, sh.C, 1e-5, norm, st)
				} else {
					c.NormMatMulStore(qkv, x, nwBuf, Buf{}, wBuf, Buf{}, 1, sh.C, 1e-5, norm, st)
				}
				c.Attention(att, qkv, kc, vc, order, lens, ap)
				c.MatMul(y, att, nextBuf, Buf{}, 1, sh.NH*sh.HS, sh.C, false)
			})
			if err != nil {
				t.Fatalf("%s: capture: %v", sh.name, err)
			}
			c.Upload(kc, make([]float32, S*sh.NKV*sh.HS))
			c.Upload(vc, make([]float32, S*sh.NKV*sh.HS))
			ord := make([]int32, S)
			for step := range steps {
				// Entry step goes to slot (7·step) mod S: the order is not the
				// slots' order, as after evictions.
				ord[step] = int32(7 * step % S)
				c.UploadInts(pos, []int32{int32(step)})
				c.UploadInts(slots, []int32{ord[step]})
				c.UploadInts(order, ord)
				c.UploadInts(lens, []int32{int32(step + 1)})
				c.UploadInts(acc, make([]int32, 2*sh.C))
				r.Run()
				checkOK(t, c)
				runs[lead] = append(runs[lead], download(t, c, qkv), download(t, c, att), download(t, c, y))
			}
			runs[lead] = append(runs[lead], download(t, c, kc), download(t, c, vc))
			r.Close()
		}
		for i := range runs[0] {
			if !slices.Equal(runs[0][i], runs[1][i]) {
				t.Errorf("%s: result %d with Lead differs from without", sh.name, i)
			}
		}
		if last := runs[1][3*steps-2]; !slices.ContainsFunc(last, func(v float32) bool { return v != 0 }) {
			t.Errorf("%s: the last attention output is all zero", sh.name)
		}
		for _, b := range []Buf{srcBuf, preBuf, nwBuf, wBuf, nextBuf, upBuf, downBuf, x, sum, qkv, att, y, acc, kc, vc, pos, slots, order, lens} {
			c.Free(b)
		}
	}
}

// TestCUDANormSum: the final norm on the stream an MLPAcc left in an
// accumulator (kv_norm_sum) against ref.SumAcc then the norm, on the
// one-warp kernel and on the fallback for rows it cannot hold; the
// accumulator, and the second one it is asked to clear, are zero afterwards.
func TestCUDANormSum(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(99, 100))
	for _, sh := range []struct {
		name string
		N, C int
		norm NormKind
		wdt  DType
		bias bool
	}{
		{"smollm2", 1, 576, RMSNormKind, F16, false},
		{"gpt2", 1, 768, LayerNormKind, F16, true},
		{"rows3", 3, 64, RMSNormKind, F32, false},
		{"wide_fallback", 2, 4096, LayerNormKind, F32, true},
		{"wide_fallback_rms", 1, 3000, RMSNormKind, F16, false},
	} {
		in := randNormal(rng, sh.N*sh.C, 1, 0.5)
		nw := asWeight(sh.wdt, randNormal(rng, sh.C, 0.2, 1))
		var nb []float32
		if sh.bias {
			nb = asWeight(sh.wdt, randNormal(rng, sh.C, 0.1, 0))
		}
		acc := make([]int64, sh.N*sh.C)
		for i := range acc {
			acc[i] = ref.Fix(rng.Float32()*4 - 2)
		}
		sum := make([]float32, sh.N*sh.C)
		ref.SumAcc(sum, in, acc, nil, sh.N, sh.C)
		want := make([]float32, sh.N*sh.C)
		if sh.norm == RMSNormKind {
			ref.RMSNorm(want, sum, nw, sh.N, sh.C, 1e-5)
		} else {
			ref.LayerNorm(want, sum, nw, nb, sh.N, sh.C, 1e-5)
		}
		inBuf, nwBuf, accBuf := uploadNew(t, c, F32, in), uploadNew(t, c, sh.wdt, nw), uploadInts(t, c, packed(acc))
		other := make([]int64, sh.N*sh.C)
		for i := range other {
			other[i] = ref.Fix(rng.Float32() - 0.5)
		}
		clrBuf := uploadInts(t, c, packed(other))
		out := alloc(t, c, F32, sh.N*sh.C)
		var nbBuf Buf
		if nb != nil {
			nbBuf = uploadNew(t, c, sh.wdt, nb)
		}
		c.NormSum(out, inBuf, accBuf, clrBuf, nwBuf, nbBuf, sh.N, sh.C, 1e-5, sh.norm)
		checkOK(t, c)
		compare(t, sh.name, download(t, c, out), want, 2e-6*maxAbs(want), 2e-6)
		if v := downloadInts(t, c, accBuf); slices.ContainsFunc(v, func(x int32) bool { return x != 0 }) {
			t.Errorf("%s: the accumulator is not zero afterwards", sh.name)
		}
		if v := downloadInts(t, c, clrBuf); slices.ContainsFunc(v, func(x int32) bool { return x != 0 }) {
			t.Errorf("%s: the accumulator to clear is not zero afterwards", sh.name)
		}
		for _, b := range []Buf{inBuf, nwBuf, accBuf, clrBuf, out, nbBuf} {
			if !b.IsZero() {
				c.Free(b)
			}
		}
	}
	// out over in: refused with an error (the backend's errors are sticky,
	// so this comes last).
	x, w, acc := alloc(t, c, F32, 64), alloc(t, c, F32, 64), uploadInts(t, c, make([]int32, 128))
	c.NormSum(x, x, acc, Buf{}, w, Buf{}, 1, 64, 1e-5, RMSNormKind)
	if c.Err() == nil {
		t.Error("NormSum with out = in: no error")
	}
}
