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
