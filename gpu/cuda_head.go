//go:build cuda

package gpu

// #include "kvalign.h"
import "C"

import "fmt"

var _ HeadSampler = (*CUDA)(nil)

// NewHeadScreen makes the int8 copy of an fp16 LM head (csrc/head.cu,
// kv_head_quantize): V·C bytes and 16 bytes a row, rows padded to 512.
// It takes heads whose one-row product MatMul runs through matmul.cu's
// GEMV, whose sums the screen repeats.
func (c *CUDA) NewHeadScreen(w Buf, V, ch int) (*HeadScreen, error) {
	if V >= 1 && ch >= 1 && C.kv_head_sums_as_matmul(C.int(V), C.int(ch)) == 0 {
		return nil, fmt.Errorf("%w: MatMul sums a head of V=%d C=%d in another order", ErrNoHeadScreen, V, ch)
	}
	return c.newHeadScreen(w, V, ch)
}

// newHeadScreen is NewHeadScreen for any shape the kernel takes (tests).
func (c *CUDA) newHeadScreen(w Buf, V, ch int) (*HeadScreen, error) {
	if w.dt != F16 || w.n < V*ch || V < 1 || ch < 1 || C.kv_head_applies(C.int(V), C.int(ch), C.int(c.smemOptin)) == 0 {
		return nil, fmt.Errorf("%w: %v head of %d elements, V=%d C=%d", ErrNoHeadScreen, w.dt, w.n, V, ch)
	}
	rows := int(C.kv_head_rows(C.int(V)))
	q, err := c.Alloc(I32, rows*ch/4)
	if err != nil {
		return nil, fmt.Errorf("allocating the LM head's int8 copy: %w", err)
	}
	bounds, err := c.Alloc(F32, rows*4)
	if err != nil {
		c.Free(q)
		return nil, fmt.Errorf("allocating the LM head's row bounds: %w", err)
	}
	sync, err := c.Alloc(I32, headSyncRows*rows/512)
	if err != nil {
		c.Free(q)
		c.Free(bounds)
		return nil, fmt.Errorf("allocating the LM head's threshold exchange: %w", err)
	}
	c.UploadInts(sync, make([]int32, sync.n)) // launches leave it zeroed
	h := &HeadScreen{W: w, V: V, C: ch, Q: q, Rows: bounds, Sync: sync, free: c.Free}
	c.run("headquantize", func() C.kv_status {
		return C.kv_head_quantize(c.stream, dev(q), devF32(bounds), dev(w), C.int(V), C.int(ch))
	})
	if err := c.Sync(); err != nil {
		h.Close()
		return nil, err
	}
	return h, nil
}

// headSyncRows: the rows (sequences) whose blocks can share a threshold,
// the runner's one-token steps (gemvMaxRows); more rows take one a block.
const headSyncRows = 8

// HeadSample: the LM head's product and Sample in one screened pass, see
// HeadSampler (csrc/head.cu, kv_head_sample).
func (c *CUDA) HeadSample(out, logits, x Buf, h *HeadScreen, banned, counter Buf, p SampleParams) {
	c.headSample(out, logits, x, h, banned, counter, p, Buf{}, Buf{})
}

// headSample also writes, for tests, each row's approximation and bound to
// debug (F32, 2·B·rows) and adds the rows it recomputed to stats (I32, 1).
func (c *CUDA) headSample(out, logits, x Buf, h *HeadScreen, banned, counter Buf, p SampleParams, debug, stats Buf) {
	const op = "headsample"
	if p.B <= 0 {
		return
	}
	if !c.need(op, h != nil && h.free != nil, "no screened head (closed?)") ||
		!c.need(op, p.V == h.V, "vocabulary size %d, the head has %d", p.V, h.V) ||
		!c.need(op, p.TopK >= 1 && p.TopK <= cudaMaxTopK, "top-k %d outside 1..%d", p.TopK, cudaMaxTopK) ||
		!c.need(op, p.MaxBan >= 0, "MaxBan %d is negative", p.MaxBan) ||
		!c.need(op, p.B*((p.V+511)/512)*64 <= c.sampleScratch.n/2, "%d rows need more sampling scratch", p.B) ||
		!c.needBuf(op, "out", out, p.B, I32) ||
		!p.Also.IsZero() && !c.needBuf(op, "also", p.Also, p.B, I32) ||
		!logits.IsZero() && !c.needBuf(op, "logits", logits, p.B*p.V, F32) ||
		!c.needBuf(op, "x", x, p.B*h.C, F32) ||
		!c.needBuf(op, "counter", counter, p.B, I32) ||
		p.MaxBan > 0 && !c.needBuf(op, "banned", banned, p.B*p.MaxBan, I32) ||
		!debug.IsZero() && !c.needBuf(op, "debug", debug, 2*p.B*h.Rows.n/4, F32) ||
		!stats.IsZero() && !c.needBuf(op, "stats", stats, 1, I32) {
		return
	}
	succ, ok := c.succArg(op, p)
	if !ok {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_head_sample(c.stream, devI32(out), devI32(p.Also), devF32(logits), devF32(x), dev(h.Q), devF32(h.Rows), dev(h.W),
			devI32(banned), devI32(counter), C.int(p.B), C.int(p.V), C.int(h.C), C.int(p.TopK), C.int(p.MaxBan),
			C.uint64_t(p.Seed), succ, C.int(c.smemOptin), C.int(c.sms), (*C.uint64_t)(dev(c.sampleScratch)),
			C.longlong(c.sampleScratch.n/2), dev(h.Sync), C.int(headSyncRows), devF32(debug), devI32(stats))
	})
}
