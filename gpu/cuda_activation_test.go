//go:build cuda

package gpu

import (
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

func TestCUDAGeluNew(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(30, 31))
	const n = 100003
	xHost := randNormal(r, n, 3, 0)
	x := uploadNew(t, c, F32, xHost)
	// Only the first n−5 elements change.
	want := append([]float32(nil), xHost...)
	ref.GeluNew(want[:n-5])
	c.GeluNew(x, n-5)
	checkOK(t, c)
	compare(t, "gelu_new", download(t, c, x), want, 2e-6, 1e-5)
}

func TestCUDASiluMul(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(32, 33))
	const N, F = 5, 131
	const stride = 2*F + 5 // gate at 0, up at F+2 of each fused row
	guHost := randNormal(r, N*stride, 3, 0)
	gu := uploadNew(t, c, F32, guHost)
	out := alloc(t, c, F32, N*F)
	want := make([]float32, N*F)
	ref.SiluMul(want, guHost, guHost[F+2:], N, F, stride)
	poison(t, c, out)
	c.SiluMul(out, gu, gu.View(F+2, N*stride-(F+2)), N, F, stride)
	checkOK(t, c)
	compare(t, "silu_mul", download(t, c, out), want, 1e-6, 1e-5)
}

func BenchmarkCUDAGeluNew1x3072(b *testing.B)    { benchGelu(b, 3072) }
func BenchmarkCUDAGeluNew1024x3072(b *testing.B) { benchGelu(b, 1024*3072) }

func benchGelu(b *testing.B, n int) {
	c := newTestCUDA(b)
	x := uploadNew(b, c, F32, randNormal(rand.New(rand.NewPCG(34, 35)), n, 0.01, 0))
	benchGraph(b, c, int64(n*8), func() {
		c.GeluNew(x, n)
	})
}

func BenchmarkCUDASiluMul1x1536(b *testing.B)    { benchSiluMul(b, 1, 1536) }
func BenchmarkCUDASiluMul1024x1536(b *testing.B) { benchSiluMul(b, 1024, 1536) }

func benchSiluMul(b *testing.B, N, F int) {
	c := newTestCUDA(b)
	gu := uploadNew(b, c, F32, randNormal(rand.New(rand.NewPCG(36, 37)), N*2*F, 1, 0))
	out := alloc(b, c, F32, N*F)
	benchGraph(b, c, int64(N*F*12), func() {
		c.SiluMul(out, gu, gu.View(F, N*2*F-F), N, F, 2*F)
	})
}
