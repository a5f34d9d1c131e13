//go:build cuda

package gpu

/*
#include "kvalign.h"
*/
import "C"

// MatMul: out[N,OC] = in[N,C]·w[OC,C]ᵀ + bias, or out += the same with
// accumulate (see Backend). w and bias may be F16 or F32 independently; in
// and out are F32 and must not overlap. csrc/matmul.cu picks a GEMV for
// N ≤ 8 (decoding: a weight stream) and a tiled GEMM above (tensor cores for
// F16 weights, fp32 SIMT for F32 weights).
func (c *CUDA) MatMul(out, in, w, bias Buf, N, C, OC int, accumulate bool) {
	c.matmul(out, in, w, bias, N, C, OC, accumulate, 0)
}

// matmul runs the product with kernel variant (see kv_matmul_variant): 0
// the default, 1 the first kernels (N > 8) or the plain GEMV (N ≤ 8) that
// the default replaced (tests and benchmarks compare them).
func (c *CUDA) matmul(out, in, w, bias Buf, n, ch, oc int, accumulate bool, variant int) {
	const op = "matmul"
	if !c.need(op, n >= 0 && ch >= 0 && oc >= 0, "negative shape N=%d C=%d OC=%d", n, ch, oc) ||
		!c.needBuf(op, "out", out, n*oc, F32) ||
		!c.needBuf(op, "in", in, n*ch, F32) ||
		!c.needBuf(op, "w", w, oc*ch, F32, F16) ||
		!bias.IsZero() && !c.needBuf(op, "bias", bias, oc, F32, F16) {
		return
	}
	if n == 0 || oc == 0 {
		return
	}
	acc := cFlag(accumulate)
	c.run(op, func() C.kv_status {
		return C.kv_matmul_variant(c.stream, devF32(out), devF32(in), dev(w), f16(w), dev(bias), f16(bias),
			C.int(n), C.int(ch), C.int(oc), acc, C.int(variant))
	})
}

// copyDevice copies n elements of src to dst on the stream: the
// device-to-device copy whose bandwidth is the GEMV benchmark's yardstick.
func (c *CUDA) copyDevice(dst, src Buf, n int) {
	if !c.needBuf("copy", "dst", dst, n, src.dt) || !c.needBuf("copy", "src", src, n, F32, F16, I32) || n == 0 {
		return
	}
	c.run("copy", func() C.kv_status {
		return C.kv_copy_d2d(c.stream, dev(dst), dev(src), C.size_t(n*src.dt.Size()))
	})
}
