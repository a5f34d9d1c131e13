//go:build cuda

package gpu

// #include "kvalign.h"
import "C"

// Embed: out[N,C] = wte[tokens[r]] + wpe[pos[r]] (csrc/embed.cu). wte and wpe
// may be F16 or F32; an id outside its table gives a NaN row.
func (c *CUDA) Embed(out, wte, wpe, tokens, pos Buf, N, C int) {
	const op = "embed"
	if N <= 0 || C <= 0 ||
		!c.needBuf(op, "out", out, N*C, F32) ||
		!c.needBuf(op, "wte", wte, C, F32, F16) ||
		!c.needBuf(op, "tokens", tokens, N, I32) {
		return
	}
	P := 0
	if !wpe.IsZero() {
		if !c.needBuf(op, "wpe", wpe, C, F32, F16) || !c.needBuf(op, "pos", pos, N, I32) {
			return
		}
		P = wpe.n / C
	}
	c.run(op, func() C.kv_status {
		return C.kv_embed(c.stream, devF32(out), dev(wte), f16(wte), C.int(wte.n/C),
			dev(wpe), f16(wpe), C.int(P), devI32(tokens), devI32(pos), C.int(N), C.int(C))
	})
}

// CopyInEmbed: CopyIn(dst, src), then Embed(out, wte, wpe, tokens, pos, N,
// C). Where tokens and pos are views of dst's copied ids, kv_copy_in_embed
// (csrc/embed.cu) does both, in one launch for N ≤ 8; otherwise the two
// operations.
func (c *CUDA) CopyInEmbed(dst Buf, src HostInts, out, wte, wpe, tokens, pos Buf, N, C int) {
	const op = "copyinembed"
	p, ok := c.pinned(op, src)
	if !ok {
		return
	}
	n := min(len(p.ints), dst.n)
	tokOff, tokIn := offsetIn(dst, n, tokens, N)
	posOff, posIn := offsetIn(dst, n, pos, N)
	if N <= 0 || C <= 0 || !tokIn || (!wpe.IsZero() && !posIn) {
		c.CopyIn(dst, src)
		c.Embed(out, wte, wpe, tokens, pos, N, C)
		return
	}
	if !c.needBuf(op, "dst", dst, n, I32) ||
		!c.needBuf(op, "out", out, N*C, F32) ||
		!c.needBuf(op, "wte", wte, C, F32, F16) ||
		!wpe.IsZero() && !c.needBuf(op, "wpe", wpe, C, F32, F16) {
		return
	}
	P := 0
	if !wpe.IsZero() {
		P = wpe.n / C
	}
	c.run(op, func() C.kv_status {
		return C.kv_copy_in_embed(c.stream, devI32(dst), (*C.int32_t)(p.p), C.int(n), devF32(out), dev(wte), f16(wte),
			C.int(wte.n/C), dev(wpe), f16(wpe), C.int(P), C.int(tokOff), C.int(posOff), C.int(N), C.int(C))
	})
}

// offsetIn is where the n ids of b start within the first an ids of a, if
// they lie there (b a view of a).
func offsetIn(a Buf, an int, b Buf, n int) (int, bool) {
	if a.ptr == 0 || a.dt != I32 || b.dt != I32 || b.ptr < a.ptr || (b.ptr-a.ptr)%4 != 0 {
		return 0, false
	}
	off := int((b.ptr - a.ptr) / 4)
	return off, off+n <= an
}
