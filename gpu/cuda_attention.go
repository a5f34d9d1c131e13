//go:build cuda

package gpu

/*
#include "kvalign.h"
*/
import "C"

// Attention: softmax(q·kᵀ/sqrt(HS))·v over cache entries (see Backend,
// AttnParams, ref.Attention), csrc/attention.cu. Decoding (T·NH/NKV ≤ 16
// query vectors per kv head) runs a kernel that reads each K/V row once for
// all query heads of its kv head and splits long sequences over many blocks;
// longer T runs a tiled flash-attention kernel. Slots in order must lie in
// the caches (device data, not checked here).
func (c *CUDA) Attention(out, q, kc, vc, order, lens Buf, p AttnParams) {
	c.attention(out, q, kc, vc, order, lens, p, 0, c.attnWork(attnWorkFloats(p)))
}

// attnWorkFloats is the scratch the split decode kernel needs for p's shapes
// (0: it does not split).
func attnWorkFloats(p AttnParams) int {
	if p.B <= 0 || p.T <= 0 || p.NKV <= 0 {
		return 0
	}
	return int(C.kv_attention_work_floats(C.int(p.B), C.int(p.T), C.int(p.NH), C.int(p.NKV), C.int(p.HS), C.int(p.MaxLen)))
}

// attention runs one kernel variant (0 chooses: 6 or 9 for decodes up to
// 1024 entries, else 4 for decoding, 12 above with p.F16 and HS = 64, else
// 7; tests force 1 = decode v2, 2 = prefill with 64-query tiles, 3 = the
// two-launch decode, 4 = decode v3 (split), 5 = prefill with tiles sized to
// the grid, 6 = decode v4 (a block per kv head), 7 = 5 pipelined, 8 = 6 in
// clusters of 4 blocks (sm_90), 9 = 6 in clusters of 8 blocks of 128
// threads (sm_90), 12 = the tensor-core prefill (fp16 operands, HS = 64),
// 13 = 12 launched normally, see kv_attention) with scratch work (may be
// absent; zero-filled when first used).
func (c *CUDA) attention(out, q, kc, vc, order, lens Buf, p AttnParams, variant int, work Buf) {
	const op = "attention"
	if !c.need(op, p.B >= 0 && p.T >= 0 && p.NH > 0 && p.NKV > 0 && p.NH%p.NKV == 0,
		"invalid heads or shape B=%d T=%d NH=%d NKV=%d (NH must be a multiple of NKV)", p.B, p.T, p.NH, p.NKV) ||
		!c.need(op, p.HS > 0 && p.HS%2 == 0 && p.HS <= C.KV_ATTN_MAX_HS,
			"head size %d: the kernels take even sizes up to %d", p.HS, C.KV_ATTN_MAX_HS) ||
		!c.need(op, p.QStride >= p.NH*p.HS && p.MaxLen >= 0,
			"QStride %d < NH·HS %d or negative MaxLen %d", p.QStride, p.NH*p.HS, p.MaxLen) {
		return
	}
	n := p.B * p.T
	if n == 0 {
		return
	}
	row := p.NKV * p.HS
	if !c.needBuf(op, "out", out, n*p.NH*p.HS, F32) ||
		!c.needBuf(op, "q", q, (n-1)*p.QStride+p.NH*p.HS, F32) ||
		!c.needBuf(op, "kc", kc, row, F32) ||
		!c.needBuf(op, "vc", vc, row, F32) ||
		!c.needBuf(op, "order", order, p.B*p.MaxLen, I32) ||
		!c.needBuf(op, "lens", lens, p.B, I32) {
		return
	}
	if !work.IsZero() && !c.needBuf(op, "work", work, 0, F32) {
		return
	}
	if p.F16 {
		variant |= C.KV_ATTN_F16 // the tensor-core prefill may take variant 0
	}
	c.run(op, func() C.kv_status {
		return C.kv_attention(c.stream, devF32(out), devF32(q), devF32(kc), devF32(vc), devI32(order), devI32(lens),
			C.int(p.B), C.int(p.T), C.int(p.NH), C.int(p.NKV), C.int(p.HS), C.int(p.QStride), C.int(p.MaxLen),
			C.float(p.RopeTheta), devF32(work), C.longlong(work.n), C.int(variant))
	})
}

// attnWork returns c.attnScratch, grown first to need floats when it is
// smaller and the stream is not being captured (allocation is not allowed
// then). A too-small buffer only makes the decode kernel run unsplit
// (correct, slower at long lengths): a model sizes it by running one step
// before Capture. Growing is best effort: failing to allocate a scratch is
// not an error of the attention itself.
func (c *CUDA) attnWork(need int) Buf {
	if need <= 0 || c.attnScratch.n >= need || c.capturing || c.failed() {
		return c.attnScratch
	}
	if !c.attnScratch.IsZero() {
		c.Free(c.attnScratch)
		c.attnScratch = Buf{}
	}
	b, err := c.Alloc(F32, need)
	if err != nil {
		return Buf{}
	}
	// The split kernel's counters start at zero (and it leaves them so).
	c.run("attention", func() C.kv_status { return C.kv_memset(c.stream, dev(b), 0, C.size_t(need*4)) })
	c.attnScratch = b
	return c.attnScratch
}
