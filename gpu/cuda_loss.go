//go:build cuda

package gpu

// #include "kvalign.h"
import "C"

// NLL: nll[r] = logsumexp(logits[r]) − logits[r, targets[r]] (csrc/loss.cu);
// a target outside [0, V) gives NaN.
func (c *CUDA) NLL(nll, logits, targets Buf, N, V int) {
	const op = "nll"
	if N <= 0 ||
		!c.need(op, V > 0, "vocabulary size %d", V) ||
		!c.needBuf(op, "nll", nll, N, F32) ||
		!c.needBuf(op, "logits", logits, N*V, F32) ||
		!c.needBuf(op, "targets", targets, N, I32) {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_nll(c.stream, devF32(nll), devF32(logits), devI32(targets), C.int(N), C.int(V))
	})
}
