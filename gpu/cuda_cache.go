//go:build cuda

package gpu

// #include "kvalign.h"
import "C"

// CacheStore copies row r of src (rowSize elements, srcStride apart) to slot
// slots[r] of cache (csrc/cache.cu). Slots outside the cache (e.g. −1 for a
// padding row) are skipped.
func (c *CUDA) CacheStore(cache, src, slots Buf, N, rowSize, srcStride int) {
	const op = "cachestore"
	if N <= 0 || rowSize <= 0 {
		return
	}
	if !c.need(op, srcStride >= rowSize, "srcStride %d < rowSize %d", srcStride, rowSize) ||
		!c.needBuf(op, "cache", cache, rowSize, F32) ||
		!c.needBuf(op, "src", src, (N-1)*srcStride+rowSize, F32) ||
		!c.needBuf(op, "slots", slots, N, I32) {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_cache_store(c.stream, devF32(cache), C.int(cache.n/rowSize), devF32(src), devI32(slots),
			C.int(N), C.int(rowSize), C.int(srcStride))
	})
}
