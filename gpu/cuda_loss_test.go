//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

func TestCUDANLL(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(60, 61))
	for _, V := range []int{1, 17, 1000, 50257} {
		const N = 6
		logitsHost := randNormal(r, N*V, 4, -2)
		logitsHost[0] = 40 // a confident row: nll of its argmax is tiny
		targets := randInts(r, N, V)
		targets[0] = 0
		want := make([]float32, N)
		ref.NLL(want, logitsHost, targets, N, V)
		nll := alloc(t, c, F32, N)
		poison(t, c, nll)
		c.NLL(nll, uploadNew(t, c, F32, logitsHost), uploadInts(t, c, targets), N, V)
		checkOK(t, c)
		compare(t, fmt.Sprintf("nll V=%d", V), download(t, c, nll), want, 1e-6, 1e-5)
	}
	// A target outside the vocabulary gives NaN.
	nll := alloc(t, c, F32, 1)
	c.NLL(nll, uploadNew(t, c, F32, []float32{1, 2, 3}), uploadInts(t, c, []int32{3}), 1, 3)
	checkOK(t, c)
	if got := download(t, c, nll)[0]; !math.IsNaN(float64(got)) {
		t.Errorf("target out of range: nll %v, want NaN", got)
	}
}

func BenchmarkCUDANLL64x50257(b *testing.B) {
	c := newTestCUDA(b)
	const N, V = 64, 50257
	r := rand.New(rand.NewPCG(62, 63))
	logits := uploadNew(b, c, F32, randNormal(r, N*V, 3, 0))
	targets := uploadInts(b, c, randInts(r, N, V))
	nll := alloc(b, c, F32, N)
	benchGraph(b, c, int64(N*V*4), func() {
		c.NLL(nll, logits, targets, N, V)
	})
}
