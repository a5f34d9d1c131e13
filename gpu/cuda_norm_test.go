//go:build cuda

package gpu

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

func TestCUDANorms(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(20, 21))
	for _, C := range []int{1, 4, 67, 128, 576, 768, 1029, 2048, 4099} {
		const N = 7
		// A large mean tests the two-pass variance.
		inHost := randNormal(r, N*C, 2, 3)
		wHost, bHost := randNormal(r, C, 0.5, 1), randNormal(r, C, 0.2, 0)
		in := uploadNew(t, c, F32, inHost)
		out := alloc(t, c, F32, N*C)
		for _, dt := range weightTypes {
			w, bias := uploadNew(t, c, dt, wHost), uploadNew(t, c, dt, bHost)
			wr, br := asWeight(dt, wHost), asWeight(dt, bHost)
			for _, withBias := range []bool{true, false} {
				want := make([]float32, N*C)
				bb, bbRef := Buf{}, []float32(nil)
				if withBias {
					bb, bbRef = bias, br
				}
				ref.LayerNorm(want, inHost, wr, bbRef, N, C, 1e-5)
				for variant := 0; variant <= 2; variant++ {
					poison(t, c, out)
					c.layerNorm(out, in, w, bb, N, C, 1e-5, variant)
					checkOK(t, c)
					compare(t, fmt.Sprintf("layernorm v%d C=%d %v bias=%v", variant, C, dt, withBias), download(t, c, out), want, 1e-5, 1e-5)
				}
			}
			want := make([]float32, N*C)
			ref.RMSNorm(want, inHost, wr, N, C, 1e-6)
			for variant := 0; variant <= 2; variant++ {
				poison(t, c, out)
				c.rmsNorm(out, in, w, N, C, 1e-6, variant)
				checkOK(t, c)
				compare(t, fmt.Sprintf("rmsnorm v%d C=%d %v", variant, C, dt), download(t, c, out), want, 1e-5, 1e-5)
			}
			// A misaligned input row (a view one element in) takes the fallback.
			big := uploadNew(t, c, F32, append([]float32{0}, inHost...))
			poison(t, c, out)
			c.RMSNorm(out, big.View(1, N*C), w, N, C, 1e-6)
			checkOK(t, c)
			compare(t, fmt.Sprintf("rmsnorm misaligned C=%d %v", C, dt), download(t, c, out), want, 1e-5, 1e-5)
		}
	}
}

func benchNorm(b *testing.B, N, C int, rms bool, variant int) {
	c := newTestCUDA(b)
	r := rand.New(rand.NewPCG(22, 23))
	in := uploadNew(b, c, F32, randNormal(r, N*C, 1, 0))
	w, bias := uploadNew(b, c, F16, randNormal(r, C, 1, 1)), uploadNew(b, c, F16, randNormal(r, C, 1, 0))
	out := alloc(b, c, F32, N*C)
	benchGraph(b, c, int64(N*C*8), func() {
		if rms {
			c.rmsNorm(out, in, w, N, C, 1e-5, variant)
		} else {
			c.layerNorm(out, in, w, bias, N, C, 1e-5, variant)
		}
	})
}

func BenchmarkCUDALayerNorm1x768v1(b *testing.B)    { benchNorm(b, 1, 768, false, 1) }
func BenchmarkCUDALayerNorm1x768v2(b *testing.B)    { benchNorm(b, 1, 768, false, 2) }
func BenchmarkCUDALayerNorm1024x768v1(b *testing.B) { benchNorm(b, 1024, 768, false, 1) }
func BenchmarkCUDALayerNorm1024x768v2(b *testing.B) { benchNorm(b, 1024, 768, false, 2) }
func BenchmarkCUDARMSNorm1x576v1(b *testing.B)      { benchNorm(b, 1, 576, true, 1) }
func BenchmarkCUDARMSNorm1x576v2(b *testing.B)      { benchNorm(b, 1, 576, true, 2) }
func BenchmarkCUDARMSNorm1024x576v1(b *testing.B)   { benchNorm(b, 1024, 576, true, 1) }
func BenchmarkCUDARMSNorm1024x576v2(b *testing.B)   { benchNorm(b, 1024, 576, true, 2) }
