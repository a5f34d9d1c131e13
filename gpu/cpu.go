package gpu

import (
	"fmt"

	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/x448/float16"
)

// CPU is the pure-Go backend: every operation runs at once through the
// reference kernels of gpu/ref, in fp32 (fp16 weights are widened on upload).
type CPU struct {
	err error
}

// NewCPU returns a CPU backend.
func NewCPU() *CPU { return &CPU{} }

func (c *CPU) Name() string                      { return "cpu" }
func (c *CPU) WeightDType(want DType) DType      { return F32 }
func (c *CPU) Close() error                      { return nil }
func (c *CPU) Err() error                        { return c.err }
func (c *CPU) Sync() error                       { return c.err }
func (c *CPU) Free(b Buf)                        {}
func (c *CPU) Capture(fn func()) (Replay, error) { return cpuReplay(fn), c.err }

type cpuReplay func()

func (r cpuReplay) Run()         { r() }
func (r cpuReplay) Close() error { return nil }

type cpuHostInts []int32

func (h cpuHostInts) Ints() []int32 { return h }
func (h cpuHostInts) Close() error  { return nil }
func (h cpuHostInts) Buf() Buf      { return Buf{dt: I32, n: len(h), i: h} }

func (c *CPU) NewHostInts(n int) (HostInts, error) { return cpuHostInts(make([]int32, n)), nil }

// cpuEvent: the CPU backend has run everything by the time it is recorded.
type cpuEvent struct{ c *CPU }

func (e cpuEvent) Record()      {}
func (e cpuEvent) Wait() error  { return e.c.err }
func (e cpuEvent) Close() error { return nil }

func (c *CPU) NewEvent() (Event, error) { return cpuEvent{c}, nil }

func (c *CPU) Alloc(dt DType, n int) (Buf, error) {
	if n < 0 {
		return Buf{}, &Error{Op: "alloc", Msg: fmt.Sprintf("negative size %d", n)}
	}
	switch dt {
	case F32, F16:
		return Buf{dt: F32, n: n, f: make([]float32, n)}, nil
	case I32:
		return Buf{dt: I32, n: n, i: make([]int32, n)}, nil
	}
	return Buf{}, &Error{Op: "alloc", Msg: "unknown dtype " + dt.String()}
}

// F32 exposes a CPU buffer's memory (tests and the CPU-only paths use it).
func (b Buf) F32() []float32 { return b.f }

// Ints exposes a CPU int buffer's memory.
func (b Buf) Ints() []int32 { return b.i }

func (c *CPU) Upload(dst Buf, src []float32)     { copy(dst.f, src) }
func (c *CPU) UploadInts(dst Buf, src []int32)   { copy(dst.i, src) }
func (c *CPU) Download(dst []float32, src Buf)   { copy(dst, src.f) }
func (c *CPU) DownloadInts(dst []int32, src Buf) { copy(dst, src.i) }
func (c *CPU) CopyIn(dst Buf, src HostInts)      { copy(dst.i, src.Ints()) }
func (c *CPU) CopyOut(dst HostInts, src Buf)     { copy(dst.Ints(), src.i) }

func (c *CPU) CopyInAhead(dst Buf, src HostInts, off, n int) {
	if c.err != nil {
		return
	}
	if off < 0 || n < 0 || off+n > len(src.Ints()) || off+n > len(dst.i) {
		c.err = &Error{Op: "copyinahead", Msg: fmt.Sprintf("ints [%d, %d) outside the %d staged or the %d of dst", off, off+n, len(src.Ints()), len(dst.i))}
		return
	}
	copy(dst.i[off:off+n], src.Ints()[off:off+n])
}

func (c *CPU) Embed(out, wte, wpe, tokens, pos Buf, N, C int) {
	ref.Embed(out.f, wte.f, wpe.f, tokens.i, pos.i, N, C)
}

func (c *CPU) LayerNorm(out, in, w, b Buf, N, C int, eps float32) {
	ref.LayerNorm(out.f, in.f, w.f, b.f, N, C, eps)
}

func (c *CPU) RMSNorm(out, in, w Buf, N, C int, eps float32) {
	ref.RMSNorm(out.f, in.f, w.f, N, C, eps)
}

func (c *CPU) MatMul(out, in, w, bias Buf, N, C, OC int, accumulate bool) {
	ref.MatMul(out.f, in.f, w.f, bias.f, N, C, OC, accumulate)
}

func (c *CPU) GeluNew(x Buf, n int) { ref.GeluNew(x.f[:n]) }

func (c *CPU) SiluMul(out, gate, up Buf, N, F, rowStride int) {
	ref.SiluMul(out.f, gate.f, up.f, N, F, rowStride)
}

func (c *CPU) RoPE(x, pos Buf, N, nHeads, HS, rowStride int, theta float32) {
	ref.RoPE(x.f, pos.i, N, nHeads, HS, rowStride, theta)
}

func (c *CPU) CacheStore(cache, src, slots Buf, N, rowSize, srcStride int) {
	ref.CacheStore(cache.f, src.f, slots.i, N, rowSize, srcStride)
}

func (c *CPU) Attention(out, q, kc, vc, order, lens Buf, p AttnParams) {
	ref.Attention(out.f, q.f, kc.f, vc.f, order.i, lens.i, p.B, p.T, p.NH, p.NKV, p.HS, p.QStride, p.MaxLen, p.RopeTheta)
}

func (c *CPU) NLL(nll, logits, targets Buf, N, V int) { ref.NLL(nll.f, logits.f, targets.i, N, V) }

func (c *CPU) Sample(out, logits, banned, counter Buf, p SampleParams) {
	if c.err != nil {
		return
	}
	var succ *ref.Successors
	if m := p.Succ; !m.IsZero() {
		if err := m.check(p.B, p.V); err != nil {
			c.err = &Error{Op: "sample", Msg: err.Error()}
			return
		}
		succ = &ref.Successors{Prev: m.Prev.i, PrevStride: m.PrevStride, Count: m.Count.i, Dir: m.Dir.i,
			Pages: m.Pages.i, Used: m.Used.i, Keep: m.Keep, Dirs: SuccessorDirs(m.Keep)}
	}
	ref.Sample(out.i, logits.f, banned.i, counter.i, p.B, p.V, p.TopK, p.MaxBan, p.Seed, succ)
	if !p.Also.IsZero() {
		copy(p.Also.i[:p.B], out.i[:p.B])
	}
}

func (c *CPU) Align(cache, slots, index Buf, net *AlignNet, p AlignParams) {
	ref.Align(cache.f, slots.i[:p.Rows], index.i[:p.Rows], net.ref(), p.L, p.NKV, p.HS, p.LayerStride)
}

func (n *AlignNet) ref() *ref.AlignNet {
	return &ref.AlignNet{
		Pos: n.Pos.f, Layer: n.Layer.f, Head: n.Head.f,
		W1: n.W1.f, B1: n.B1.f, W2: n.W2.f, B2: n.B2.f, W3: n.W3.f, B3: n.B3.f,
		P: n.P, DP: n.DP, DL: n.DL, DH: n.DH, H1: n.H1, H2: n.H2,
	}
}

// ToF16 converts float32 values to IEEE half bits (weights for the GPU).
func ToF16(dst []uint16, src []float32) {
	for i, v := range src {
		dst[i] = uint16(float16.Fromfloat32(v))
	}
}
