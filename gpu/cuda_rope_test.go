//go:build cuda

package gpu

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

func TestCUDARoPE(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(40, 41))
	for _, tc := range []struct {
		N, nHeads, HS int
		theta         float32
		maxPos        int
	}{
		{9, 5, 64, 10000, 100000},
		{3, 9, 64, 100000, 4096},
		{4, 3, 6, 10000, 50},
		{2, 2, 128, 500000, 131072},
	} {
		stride := tc.nHeads*tc.HS + 17 // the tail of each row is not rotated
		xHost := randNormal(r, tc.N*stride, 1, 0)
		pos := randInts(r, tc.N, tc.maxPos)
		ps := uploadInts(t, c, pos)
		want := append([]float32(nil), xHost...)
		ref.RoPE(want, pos, tc.N, tc.nHeads, tc.HS, stride, tc.theta)
		for variant := 0; variant <= 2; variant++ {
			x := uploadNew(t, c, F32, xHost)
			c.rope(x, ps, tc.N, tc.nHeads, tc.HS, stride, tc.theta, variant)
			checkOK(t, c)
			compare(t, fmt.Sprintf("rope v%d %+v", variant, tc), download(t, c, x), want, 2e-6, 1e-5)
		}
	}
}

func BenchmarkCUDARoPE1x12x64v1(b *testing.B)    { benchRoPE(b, 1, 12, 64, 1) }
func BenchmarkCUDARoPE1x12x64v2(b *testing.B)    { benchRoPE(b, 1, 12, 64, 2) }
func BenchmarkCUDARoPE1024x12x64v1(b *testing.B) { benchRoPE(b, 1024, 12, 64, 1) }
func BenchmarkCUDARoPE1024x12x64v2(b *testing.B) { benchRoPE(b, 1024, 12, 64, 2) }

func benchRoPE(b *testing.B, N, nHeads, HS, variant int) {
	c := newTestCUDA(b)
	r := rand.New(rand.NewPCG(42, 43))
	x := uploadNew(b, c, F32, randNormal(r, N*nHeads*HS, 1, 0))
	ps := uploadInts(b, c, randInts(r, N, 8192))
	benchGraph(b, c, int64(N*nHeads*HS*8), func() {
		c.rope(x, ps, N, nHeads, HS, nHeads*HS, 10000, variant)
	})
}
