package ref

import (
	"math"
	"math/rand/v2"
	"testing"
)

func TestFixUnfix(t *testing.T) {
	for _, tc := range []struct {
		v    float32
		want int64
	}{
		{0, 0}, {1, 1 << 32}, {-1.5, -3 << 31}, {0x1p-33, 0}, {0x1p-32, 1}, {3 * 0x1p-33, 2}, // ties to even
		{0x1p40, 1 << 62}, {-0x1p40, -1 << 62}, // clamped
		{float32(math.Inf(1)), 1 << 62}, {float32(math.Inf(-1)), -1 << 62}, {float32(math.NaN()), -1 << 62},
	} {
		if got := Fix(tc.v); got != tc.want {
			t.Errorf("Fix(%g) = %d, want %d", tc.v, got, tc.want)
		}
	}
	// Every float32 with at most 32 fraction bits and |v| < 2^30 survives the
	// round trip; sums of fixed-point terms do not depend on their order.
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 10000; i++ {
		v := float32(math.Ldexp(float64(r.Int32N(1<<24)-1<<23), r.IntN(28)-30))
		if got := Unfix(Fix(v)); got != v {
			t.Fatalf("Unfix(Fix(%g)) = %g", v, got)
		}
	}
	terms := make([]float32, 12)
	for i := range terms {
		terms[i] = float32(r.NormFloat64() * 100)
	}
	var fwd, bwd int64
	for i := range terms {
		fwd += Fix(terms[i])
		bwd += Fix(terms[len(terms)-1-i])
	}
	if fwd != bwd {
		t.Errorf("fixed-point sums differ by order: %d vs %d", fwd, bwd)
	}
}

// TestAttentionOutProjMatchesUnfused: the folded attention plus SumAcc
// equal Attention then MatMul accumulating into the residual, to float32
// rounding.
func TestAttentionOutProjMatchesUnfused(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	const B, NH, NKV, HS, C, maxLen = 2, 4, 2, 16, 40, 9
	qStride := (NH + 2*NKV) * HS
	randv := func(n int) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(r.NormFloat64())
		}
		return v
	}
	q, kc, vc := randv(B*qStride), randv(20*NKV*HS), randv(20*NKV*HS)
	wo, bias, x := randv(C*NH*HS), randv(C), randv(B*C)
	order := make([]int32, B*maxLen)
	for i := range order {
		order[i] = int32(r.IntN(20))
	}
	lens := []int32{3, maxLen}
	att := make([]float32, B*NH*HS)
	Attention(att, q, kc, vc, order, lens, B, 1, NH, NKV, HS, qStride, maxLen, 10000)
	want := append([]float32(nil), x...)
	MatMul(want, att, wo, bias, B, NH*HS, C, true)

	acc := make([]int64, B*C)
	AttentionOutProj(acc, q, kc, vc, order, lens, wo, B, NH, NKV, HS, qStride, maxLen, C, 10000)
	got := make([]float32, B*C)
	SumAcc(got, x, acc, bias, B, C)
	for i := range got {
		if d := math.Abs(float64(got[i] - want[i])); d > 1e-5*(1+math.Abs(float64(want[i]))) {
			t.Fatalf("element %d: %g, want %g", i, got[i], want[i])
		}
	}
}
