//go:build cuda

package gpu

// #include "kvalign.h"
import "C"

// LayerNorm: out[N,C] = (in − mean)/sqrt(var + eps)·w + b (csrc/norm.cu);
// w and b (b may be absent) are F16 or F32, of the same dtype.
func (c *CUDA) LayerNorm(out, in, w, b Buf, N, C int, eps float32) {
	c.layerNorm(out, in, w, b, N, C, eps, 0)
}

// layerNorm runs one kernel variant (0 chooses; tests force 1 and 2).
func (c *CUDA) layerNorm(out, in, w, b Buf, N, C int, eps float32, variant int) {
	const op = "layernorm"
	if N <= 0 || C <= 0 ||
		!c.needBuf(op, "out", out, N*C, F32) ||
		!c.needBuf(op, "in", in, N*C, F32) ||
		!c.needBuf(op, "w", w, C, F32, F16) ||
		!b.IsZero() && !c.needBuf(op, "b", b, C, w.dt) {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_layernorm(c.stream, devF32(out), devF32(in), dev(w), dev(b), f16(w),
			C.int(N), C.int(C), C.float(eps), C.int(variant))
	})
}

// RMSNorm: out[N,C] = in/sqrt(mean(in²) + eps)·w (csrc/norm.cu).
func (c *CUDA) RMSNorm(out, in, w Buf, N, C int, eps float32) {
	c.rmsNorm(out, in, w, N, C, eps, 0)
}

func (c *CUDA) rmsNorm(out, in, w Buf, N, C int, eps float32, variant int) {
	const op = "rmsnorm"
	if N <= 0 || C <= 0 ||
		!c.needBuf(op, "out", out, N*C, F32) ||
		!c.needBuf(op, "in", in, N*C, F32) ||
		!c.needBuf(op, "w", w, C, F32, F16) {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_rmsnorm(c.stream, devF32(out), devF32(in), dev(w), f16(w), C.int(N), C.int(C),
			C.float(eps), C.int(variant))
	})
}
