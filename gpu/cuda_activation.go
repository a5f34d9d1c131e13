//go:build cuda

package gpu

// #include "kvalign.h"
import "C"

// GeluNew: x = gelu_new(x) in place over the first n elements (csrc/activation.cu).
func (c *CUDA) GeluNew(x Buf, n int) {
	if n <= 0 || !c.needBuf("gelu", "x", x, n, F32) {
		return
	}
	c.run("gelu", func() C.kv_status { return C.kv_gelu_new(c.stream, devF32(x), C.longlong(n)) })
}

// SiluMul: out[N,F] = silu(gate)·up, gate and up rows rowStride apart.
func (c *CUDA) SiluMul(out, gate, up Buf, N, F, rowStride int) {
	const op = "silumul"
	if N <= 0 || F <= 0 {
		return
	}
	span := (N-1)*rowStride + F
	if !c.need(op, rowStride >= F, "rowStride %d < F %d", rowStride, F) ||
		!c.needBuf(op, "out", out, N*F, F32) ||
		!c.needBuf(op, "gate", gate, span, F32) ||
		!c.needBuf(op, "up", up, span, F32) {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_silu_mul(c.stream, devF32(out), devF32(gate), devF32(up), C.int(N), C.int(F), C.int(rowStride))
	})
}
