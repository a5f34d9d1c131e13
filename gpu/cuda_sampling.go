//go:build cuda

package gpu

// #include "kvalign.h"
import "C"

// cudaMaxTopK is the largest SampleParams.TopK the CUDA backend supports.
const cudaMaxTopK = C.KV_SAMPLE_MAX_TOPK

// Sample draws one token per row into out, see SampleParams
// (csrc/sampling.cu). The same token as ref.Sample: the kernel reproduces its
// candidate order, fp32 softmax sums and Uniform bits.
func (c *CUDA) Sample(out, logits, banned, counter Buf, p SampleParams) {
	c.sample(out, logits, banned, counter, p, 0)
}

// sample runs one kernel variant (0 chooses; tests force 1 and 2).
func (c *CUDA) sample(out, logits, banned, counter Buf, p SampleParams, variant int) {
	const op = "sample"
	if p.B <= 0 {
		return
	}
	if !c.need(op, p.V > 0, "vocabulary size %d", p.V) ||
		!c.need(op, p.TopK >= 1 && p.TopK <= cudaMaxTopK, "top-k %d outside 1..%d", p.TopK, cudaMaxTopK) ||
		!c.need(op, p.MaxBan >= 0, "MaxBan %d is negative", p.MaxBan) ||
		!c.needBuf(op, "out", out, p.B, I32) ||
		!p.Also.IsZero() && !c.needBuf(op, "also", p.Also, p.B, I32) ||
		!c.needBuf(op, "logits", logits, p.B*p.V, F32) ||
		!c.needBuf(op, "counter", counter, p.B, I32) ||
		p.MaxBan > 0 && !c.needBuf(op, "banned", banned, p.B*p.MaxBan, I32) {
		return
	}
	succ, ok := c.succArg(op, p)
	if !ok {
		return
	}
	scratchKeys := c.sampleScratch.n / 2
	c.run(op, func() C.kv_status {
		return C.kv_sample(c.stream, devI32(out), devI32(p.Also), devF32(logits), devI32(banned), devI32(counter),
			C.int(p.B), C.int(p.V), C.int(p.TopK), C.int(p.MaxBan), C.uint64_t(p.Seed), succ, C.int(c.smemOptin),
			(*C.uint64_t)(dev(c.sampleScratch)), C.longlong(scratchKeys), C.int(variant))
	})
}

// succArg is p's 2-gram memory as the kernels take it (zero: none); false
// after recording an error of op.
func (c *CUDA) succArg(op string, p SampleParams) (C.kv_succ, bool) {
	var succ C.kv_succ
	m := p.Succ
	if m.IsZero() {
		return succ, true
	}
	if err := m.check(p.B, p.V); !c.need(op, err == nil, "%v", err) {
		return succ, false
	}
	return C.kv_succ{prev: devI32(m.Prev), count: devI32(m.Count), dir: devI32(m.Dir), pages: devI32(m.Pages),
		used: devI32(m.Used), prev_stride: C.int(m.PrevStride), keep: C.int(m.Keep), dirs: C.int(SuccessorDirs(m.Keep)),
		n_pages: C.int(m.Pages.n / 32)}, true
}
