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

// MatMulLead: MatMul accumulating, letting the next kernel launch at once
// (see Fused and kv_matmul_lead).
func (c *CUDA) MatMulLead(out, in, w, bias Buf, n, ch, oc int) {
	const op = "matmul"
	if !c.matmulArgs(op, out, in, w, bias, n, ch, oc) || n == 0 || oc == 0 {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_matmul_lead(c.stream, devF32(out), devF32(in), dev(w), f16(w), dev(bias), f16(bias),
			C.int(n), C.int(ch), C.int(oc))
	})
}

// matmulArgs checks MatMul's arguments, recording the first error.
func (c *CUDA) matmulArgs(op string, out, in, w, bias Buf, n, ch, oc int) bool {
	return c.need(op, n >= 0 && ch >= 0 && oc >= 0, "negative shape N=%d C=%d OC=%d", n, ch, oc) &&
		c.needBuf(op, "out", out, n*oc, F32) &&
		c.needBuf(op, "in", in, n*ch, F32) &&
		c.needBuf(op, "w", w, oc*ch, F32, F16) &&
		(bias.IsZero() || c.needBuf(op, "bias", bias, oc, F32, F16))
}

// Variants of kv_matmul_variant that tests and benchmarks force.
const (
	gemmAuto    = 0 // N > 8: v3 for fp16 weights where it applies, else v2; N ≤ 8: the GEMV as a programmatic dependent
	gemmFirst   = 1 // N > 8: the first kernels (64×64 tiles, register prefetch); N ≤ 8: the plain GEMV
	gemmV2      = 2 // cp.async pipeline, 32/64-row tiles
	gemmV3      = 3 // 16/32-row tiles, split-K clusters (sm_90), programmatic dependent
	gemmV3Plain = 4 // v3 launched normally
)

// matmul runs the product with kernel variant (see kv_matmul_variant and
// the gemm… constants): 0 the default, others for tests and benchmarks to
// compare.
func (c *CUDA) matmul(out, in, w, bias Buf, n, ch, oc int, accumulate bool, variant int) {
	const op = "matmul"
	if !c.matmulArgs(op, out, in, w, bias, n, ch, oc) || n == 0 || oc == 0 {
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
