//go:build cuda

package gpu

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

func TestCUDAEmbed(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(10, 11))
	const V, P, N, C = 37, 19, 13, 67
	wteHost, wpeHost := randNormal(r, V*C, 1, 0), randNormal(r, P*C, 0.5, 0)
	tokens, pos := randInts(r, N, V), randInts(r, N, P)
	tok, ps := uploadInts(t, c, tokens), uploadInts(t, c, pos)
	out := alloc(t, c, F32, N*C)
	for _, dt := range weightTypes {
		wte, wpe := uploadNew(t, c, dt, wteHost), uploadNew(t, c, dt, wpeHost)
		for _, withPos := range []bool{true, false} {
			want := make([]float32, N*C)
			wp, wpRef := Buf{}, []float32(nil)
			if withPos {
				wp, wpRef = wpe, asWeight(dt, wpeHost)
			}
			ref.Embed(want, asWeight(dt, wteHost), wpRef, tokens, pos, N, C)
			poison(t, c, out)
			c.Embed(out, wte, wp, tok, ps, N, C)
			checkOK(t, c)
			compare(t, "embed "+dt.String(), download(t, c, out), want, 0, 0)
		}
	}
	// An id outside the table gives a NaN row, not a fault.
	bad := uploadInts(t, c, []int32{V + 5})
	wte := uploadNew(t, c, F32, wteHost)
	c.Embed(out, wte, Buf{}, bad, Buf{}, 1, C)
	checkOK(t, c)
	if got := download(t, c, out); !math.IsNaN(float64(got[0])) || !math.IsNaN(float64(got[C-1])) {
		t.Errorf("out-of-range token: row starts %v, want NaN", got[0])
	}
}

func BenchmarkCUDAEmbed(b *testing.B) {
	c := newTestCUDA(b)
	r := rand.New(rand.NewPCG(12, 13))
	const V, N, C = 50257, 1, 768
	wte := uploadNew(b, c, F16, randNormal(r, V*C, 1, 0))
	wpe := uploadNew(b, c, F16, randNormal(r, 1024*C, 1, 0))
	tok, pos := uploadInts(b, c, randInts(r, N, V)), uploadInts(b, c, randInts(r, N, 1024))
	out := alloc(b, c, F32, N*C)
	benchGraph(b, c, int64(N*C*(2+2+4)), func() {
		c.Embed(out, wte, wpe, tok, pos, N, C)
	})
}
