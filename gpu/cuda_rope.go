//go:build cuda

package gpu

// #include "kvalign.h"
import "C"

// RoPE rotates heads 0..nHeads-1 of each row of x at position pos[r], HF
// rotate-half (csrc/rope.cu). HS must be even and at most 1024.
func (c *CUDA) RoPE(x, pos Buf, N, nHeads, HS, rowStride int, theta float32) {
	c.rope(x, pos, N, nHeads, HS, rowStride, theta, 0)
}

// rope runs one kernel variant (0 chooses; tests force 1 and 2).
func (c *CUDA) rope(x, pos Buf, N, nHeads, HS, rowStride int, theta float32, variant int) {
	const op = "rope"
	if N <= 0 || nHeads <= 0 {
		return
	}
	if !c.need(op, HS > 0 && HS%2 == 0 && HS <= 1024, "head size %d must be even and ≤ 1024", HS) ||
		!c.need(op, rowStride >= nHeads*HS, "rowStride %d < %d heads × %d", rowStride, nHeads, HS) ||
		!c.need(op, theta > 0, "theta %v must be positive", theta) ||
		!c.needBuf(op, "x", x, (N-1)*rowStride+nHeads*HS, F32) ||
		!c.needBuf(op, "pos", pos, N, I32) {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_rope(c.stream, devF32(x), devI32(pos), C.int(N), C.int(nHeads), C.int(HS), C.int(rowStride), C.float(theta), C.int(variant))
	})
}
