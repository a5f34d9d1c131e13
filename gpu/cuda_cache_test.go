//go:build cuda

package gpu

import (
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

func TestCUDACacheStore(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(50, 51))
	const S, N, rowSize, stride = 11, 5, 24, 40
	cacheHost := randNormal(r, S*rowSize, 1, 0)
	srcHost := randNormal(r, N*stride, 1, 0)
	perm := r.Perm(S)
	slots := make([]int32, N)
	for i := range slots {
		slots[i] = int32(perm[i])
	}
	cache := uploadNew(t, c, F32, cacheHost)
	src := uploadNew(t, c, F32, srcHost)
	want := append([]float32(nil), cacheHost...)
	ref.CacheStore(want, srcHost, slots, N, rowSize, stride)
	c.CacheStore(cache, src, uploadInts(t, c, slots), N, rowSize, stride)
	checkOK(t, c)
	compare(t, "cachestore", download(t, c, cache), want, 0, 0)

	// Slots outside the cache are skipped.
	c.CacheStore(cache, src, uploadInts(t, c, []int32{-1, S, 1 << 30}), 3, rowSize, stride)
	checkOK(t, c)
	compare(t, "cachestore skipped slots", download(t, c, cache), want, 0, 0)
}

func BenchmarkCUDACacheStore1x768(b *testing.B) {
	c := newTestCUDA(b)
	const S, N, rowSize = 1024, 1, 768
	r := rand.New(rand.NewPCG(52, 53))
	cache := alloc(b, c, F32, S*rowSize)
	src := uploadNew(b, c, F32, randNormal(r, N*3*rowSize, 1, 0))
	slots := uploadInts(b, c, randInts(r, N, S))
	benchGraph(b, c, int64(N*rowSize*8), func() {
		c.CacheStore(cache, src, slots, N, rowSize, 3*rowSize)
	})
}
