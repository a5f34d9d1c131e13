package ref

import (
	"math"
	"math/rand/v2"
	"testing"
)

// TestHeadScreenBounds: on random heads (values exact in fp16, rows of
// varied scale) and inputs (normal, zero, huge, tiny, with outliers), every
// row's fp32 logit, summed in order, is within HeadScreen's bound of its
// approximation, and the bound is not vacuous on normal inputs.
func TestHeadScreenBounds(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	const V, C = 700, 96
	w := make([]float32, V*C)
	for i := 0; i < V; i++ {
		scale := 0.02 * math.Exp(r.NormFloat64())
		for k := 0; k < C; k++ {
			// A value with 11 significant bits, as an fp16 weight has.
			v := r.NormFloat64() * scale
			e := math.Floor(math.Log2(math.Abs(v)))
			w[i*C+k] = float32(math.Ldexp(math.Round(math.Ldexp(v, 10-int(e))), int(e)-10))
		}
	}
	q, rows := HeadQuantize(w, V, C)
	for kind := 0; kind < 5; kind++ {
		x := make([]float32, C)
		for i := range x {
			x[i] = float32(r.NormFloat64())
			switch kind {
			case 1:
				x[i] = 0
			case 2:
				x[i] *= 1e25
			case 3:
				x[i] *= 1e-20
			}
		}
		if kind == 4 {
			x[3] *= 300
		}
		a, b := HeadScreen(q, rows, x, V, C)
		var slack float64
		for i := 0; i < V; i++ {
			var l float32
			for k := 0; k < C; k++ {
				l = float32(math.FMA(float64(w[i*C+k]), float64(x[k]), float64(l)))
			}
			d := math.Abs(float64(l) - float64(a[i]))
			if d > float64(b[i]) {
				t.Fatalf("input %d row %d: |logit %g − approximation %g| = %g above the bound %g", kind, i, l, a[i], d, b[i])
			}
			if b[i] > 0 {
				slack += d / float64(b[i])
			}
		}
		t.Logf("input %d: mean |error|/bound %.3f", kind, slack/V)
		if kind == 0 && slack/V < 0.01 {
			t.Errorf("the bound is vacuous: mean |error|/bound %.4f", slack/V)
		}
	}
}
