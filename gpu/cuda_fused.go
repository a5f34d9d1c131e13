//go:build cuda && !nofused

package gpu

// #include "kvalign.h"
import "C"

// The CUDA backend's fused decode operations (gpu.Fused, csrc/fused.cu).
// Build tag nofused leaves them out, so the same tree gives the unfused
// backend to compare against (kvalign bench decode with and without).

var _ Fused = (*CUDA)(nil)

// Variants of the fused entry points (kvalign.h): tests and benchmarks force
// each one; the operations use fusedAuto.
const (
	fusedAuto    = 0 // ≤ 8 rows: fusedPDL up to 1536 blocks (the block matrices), fusedTwoStep above (the LM head); more rows: fusedPrefill (SwiGLUMatMul: fusedTwoStep)
	fusedKernel  = 1 // the fused kernel (v1), launched normally
	fusedPDL     = 2 // the fused kernel (v1) as a programmatic dependent (sm_90)
	fusedTwoStep = 3 // norm/activation into stream-ordered scratch, then MatMul
	fusedRegs    = 4 // N = 1: the register kernel (v2, slower; for comparison) as a programmatic dependent
	// GEMM v3 with the RMSNorm or SwiGLU in its A tiles (fp16 weights, no
	// LayerNorm or gelu; else fusedTwoStep): what NormMatMul's fusedAuto
	// takes above 8 rows.
	// NormMatMul with SwiGLUAct: 0 = 5 = GEMM v3 with the norm in its A
	// tiles and SwiGLU in its epilogue where it applies (fp16, RMSNorm), 3
	// three steps.
	fusedPrefill = 5
)

// NormMatMul: out[N,OC] (+)= act(norm(in)·wᵀ + bias), see Fused. normW,
// normB (optional, LayerNorm only), w and bias (optional) are F16 or F32;
// normB has normW's dtype. out must not overlap in.
func (c *CUDA) NormMatMul(out, in, normW, normB, w, bias Buf, N, C, OC int, eps float32, norm NormKind, act Act, accumulate bool) {
	c.normMatMul(out, in, normW, normB, w, bias, N, C, OC, eps, norm, act, accumulate, fusedAuto)
}

func (c *CUDA) normMatMul(out, in, normW, normB, w, bias Buf, n, ch, oc int, eps float32, norm NormKind, act Act, accumulate bool, variant int) {
	const op = "normmatmul"
	if !c.need(op, n >= 0 && ch > 0 && oc >= 0, "invalid shape N=%d C=%d OC=%d", n, ch, oc) ||
		!c.need(op, norm == LayerNormKind || norm == RMSNormKind, "unknown norm kind %d", norm) ||
		!c.need(op, act == NoAct || act == GeluAct || act == SwiGLUAct, "unknown activation %d", act) ||
		!c.need(op, !(accumulate && act != NoAct), "an activation cannot be combined with accumulate") ||
		!c.need(op, act != SwiGLUAct || oc%2 == 0, "SwiGLU needs an even OC, not %d", oc) ||
		!c.needBuf(op, "out", out, outWidth(oc, act)*n, F32) ||
		!c.needBuf(op, "in", in, n*ch, F32) ||
		!c.needBuf(op, "normW", normW, ch, F32, F16) ||
		norm == LayerNormKind && !normB.IsZero() && !c.needBuf(op, "normB", normB, ch, normW.dt) ||
		!c.needBuf(op, "w", w, oc*ch, F32, F16) ||
		!bias.IsZero() && !c.needBuf(op, "bias", bias, oc, F32, F16) ||
		!c.need(op, !overlaps(out, n*outWidth(oc, act), in, n*ch), "out overlaps in") {
		return
	}
	if n == 0 || oc == 0 {
		return
	}
	rms, gelu, acc := cFlag(norm == RMSNormKind), cFlag(act == GeluAct), cFlag(accumulate)
	if norm == RMSNormKind {
		normB = Buf{} // RMSNorm has no bias
	}
	if act == SwiGLUAct {
		c.run(op, func() C.kv_status {
			return C.kv_norm_matmul_swiglu(c.stream, devF32(out), devF32(in), dev(normW), dev(normB), f16(normW),
				dev(w), f16(w), dev(bias), f16(bias), C.int(n), C.int(ch), C.int(oc), C.float(eps), rms, C.int(variant))
		})
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_norm_matmul(c.stream, devF32(out), devF32(in), dev(normW), dev(normB), f16(normW),
			dev(w), f16(w), dev(bias), f16(bias), C.int(n), C.int(ch), C.int(oc), C.float(eps), rms, gelu, acc,
			C.int(variant))
	})
}

// outWidth is the width of NormMatMul's output rows for OC product columns.
func outWidth(oc int, act Act) int {
	if act == SwiGLUAct {
		return oc / 2
	}
	return oc
}

// SwiGLUMatMul: out[N,OC] (+)= (silu(gu[:, :F])·gu[:, F:2F])·wᵀ, see Fused;
// w is F16 or F32. out must not overlap gu.
func (c *CUDA) SwiGLUMatMul(out, gu, w Buf, N, F, OC int, accumulate bool) {
	c.swiGLUMatMul(out, gu, w, N, F, OC, accumulate, fusedAuto)
}

func (c *CUDA) swiGLUMatMul(out, gu, w Buf, n, f, oc int, accumulate bool, variant int) {
	const op = "swiglumatmul"
	if !c.need(op, n >= 0 && f > 0 && oc >= 0, "invalid shape N=%d F=%d OC=%d", n, f, oc) ||
		!c.needBuf(op, "out", out, n*oc, F32) ||
		!c.needBuf(op, "gu", gu, n*2*f, F32) ||
		!c.needBuf(op, "w", w, oc*f, F32, F16) ||
		!c.need(op, !overlaps(out, n*oc, gu, n*2*f), "out overlaps gu") {
		return
	}
	if n == 0 || oc == 0 {
		return
	}
	acc := cFlag(accumulate)
	c.run(op, func() C.kv_status {
		return C.kv_swiglu_matmul(c.stream, devF32(out), devF32(gu), dev(w), f16(w), C.int(n), C.int(f), C.int(oc),
			acc, C.int(variant))
	})
}

// RopeStore rotates heads 0..ropeHeads-1 of each q|k|v row in place at
// pos[r] (when theta ≠ 0) and copies the row's key and value heads to slot
// slots[r] of kc and vc, see Fused. HS must be even; slots outside the
// caches are skipped (as CacheStore does).
func (c *CUDA) RopeStore(qkv, kc, vc, pos, slots Buf, N, NH, NKV, HS, rowStride, ropeHeads int, theta float32) {
	c.ropeStore(qkv, kc, vc, pos, slots, N, NH, NKV, HS, rowStride, ropeHeads, theta, fusedAuto)
}

func (c *CUDA) ropeStore(qkv, kc, vc, pos, slots Buf, n, nh, nkv, hs, rowStride, ropeHeads int, theta float32, variant int) {
	const op = "ropestore"
	width := (nh + 2*nkv) * hs
	rotates := theta != 0 && ropeHeads > 0
	if n <= 0 {
		return
	}
	if !c.need(op, nh >= 0 && nkv > 0 && hs > 0 && hs%2 == 0, "invalid heads NH=%d NKV=%d HS=%d (HS must be even)", nh, nkv, hs) ||
		!c.need(op, rowStride >= width, "rowStride %d < %d heads × %d", rowStride, nh+2*nkv, hs) ||
		!c.need(op, ropeHeads >= 0 && ropeHeads <= nh+2*nkv, "ropeHeads %d outside [0, %d]", ropeHeads, nh+2*nkv) ||
		!c.need(op, !rotates || theta > 0, "theta %v must be positive", theta) ||
		!c.needBuf(op, "qkv", qkv, (n-1)*rowStride+width, F32) ||
		!c.needBuf(op, "kc", kc, nkv*hs, F32) ||
		!c.needBuf(op, "vc", vc, kc.n, F32) ||
		!c.needBuf(op, "pos", pos, n, I32) ||
		!c.needBuf(op, "slots", slots, n, I32) {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_rope_store(c.stream, devF32(qkv), devF32(kc), devF32(vc), C.int(kc.n/(nkv*hs)), devI32(pos), devI32(slots),
			C.int(n), C.int(nh), C.int(nkv), C.int(hs), C.int(rowStride), C.int(ropeHeads), C.float(theta), C.int(variant))
	})
}

// NormMatMulStore: the q|k|v product with its RoPE and cache writes in one
// kernel where it applies, see Fused and kv_norm_matmul_store.
func (c *CUDA) NormMatMulStore(qkv, in, normW, normB, w, bias Buf, N, C int, eps float32, norm NormKind, st QKVStore) {
	c.normMatMulStore(qkv, in, normW, normB, w, bias, N, C, eps, norm, st, fusedAuto)
}

func (c *CUDA) normMatMulStore(qkv, in, normW, normB, w, bias Buf, n, ch int, eps float32, norm NormKind, st QKVStore, variant int) {
	c.normMatMulStoreSum(qkv, Buf{}, in, Buf{}, normW, normB, w, bias, n, ch, eps, norm, st, variant)
}

// NormMatMulStoreSum: the residual stream an MLPAcc left in acc, then the
// q|k|v product on it, see Fused and kv_norm_matmul_store_sum.
func (c *CUDA) NormMatMulStoreSum(qkv, sum, in, acc, normW, normB, w, bias Buf, N, C int, eps float32, norm NormKind, st QKVStore) {
	c.normMatMulStoreSum(qkv, sum, in, acc, normW, normB, w, bias, N, C, eps, norm, st, fusedAuto)
}

// normMatMulStoreSum is both: without acc (zero) NormMatMulStore, with it
// the sum first.
func (c *CUDA) normMatMulStoreSum(qkv, sum, in, acc, normW, normB, w, bias Buf, n, ch int, eps float32, norm NormKind, st QKVStore, variant int) {
	op := "normmatmulstore"
	withSum := !acc.IsZero()
	if withSum {
		op = "normmatmulstoresum"
	}
	if n <= 0 {
		return
	}
	nh, nkv, hs := st.NH, st.NKV, st.HS
	oc := (nh + 2*nkv) * hs
	rotates := st.Theta != 0 && st.RopeHeads > 0
	if !c.need(op, ch > 0, "invalid C=%d", ch) ||
		!c.need(op, norm == LayerNormKind || norm == RMSNormKind, "unknown norm kind %d", norm) ||
		!c.need(op, nh >= 0 && nkv > 0 && hs > 0 && hs%2 == 0, "invalid heads NH=%d NKV=%d HS=%d (HS must be even)", nh, nkv, hs) ||
		!c.need(op, st.RopeHeads >= 0 && st.RopeHeads <= nh+2*nkv, "RopeHeads %d outside [0, %d]", st.RopeHeads, nh+2*nkv) ||
		!c.need(op, !rotates || st.Theta > 0, "theta %v must be positive", st.Theta) ||
		!c.needBuf(op, "qkv", qkv, n*oc, F32) ||
		!c.needBuf(op, "in", in, n*ch, F32) ||
		!c.needBuf(op, "normW", normW, ch, F32, F16) ||
		norm == LayerNormKind && !normB.IsZero() && !c.needBuf(op, "normB", normB, ch, normW.dt) ||
		!c.needBuf(op, "w", w, oc*ch, F32, F16) ||
		!bias.IsZero() && !c.needBuf(op, "bias", bias, oc, F32, F16) ||
		!c.needBuf(op, "K", st.K, nkv*hs, F32) ||
		!c.needBuf(op, "V", st.V, st.K.n, F32) ||
		!c.needBuf(op, "Pos", st.Pos, n, I32) ||
		!c.needBuf(op, "Slots", st.Slots, n, I32) ||
		!c.need(op, !overlaps(qkv, n*oc, in, n*ch), "qkv overlaps in") {
		return
	}
	if withSum && (!c.needBuf(op, "sum", sum, n*ch, F32) || !c.needBuf(op, "acc", acc, 2*n*ch, I32) ||
		!c.need(op, !overlaps(sum, n*ch, in, n*ch) && !overlaps(sum, n*ch, qkv, n*oc), "sum overlaps in or qkv")) {
		return
	}
	if norm == RMSNormKind {
		normB = Buf{}
	}
	if withSum {
		c.run(op, func() C.kv_status {
			return C.kv_norm_matmul_store_sum(c.stream, devF32(qkv), devF32(sum), devF32(in), devI64(acc), dev(normW),
				dev(normB), f16(normW), dev(w), f16(w), dev(bias), f16(bias), C.int(n), C.int(ch), C.float(eps),
				cFlag(norm == RMSNormKind), devF32(st.K), devF32(st.V), C.int(st.K.n/(nkv*hs)), devI32(st.Pos),
				devI32(st.Slots), C.int(nh), C.int(nkv), C.int(hs), C.int(st.RopeHeads), C.float(st.Theta), C.int(variant),
				cFlag(st.Lead))
		})
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_norm_matmul_store(c.stream, devF32(qkv), devF32(in), dev(normW), dev(normB), f16(normW),
			dev(w), f16(w), dev(bias), f16(bias), C.int(n), C.int(ch), C.float(eps), cFlag(norm == RMSNormKind),
			devF32(st.K), devF32(st.V), C.int(st.K.n/(nkv*hs)), devI32(st.Pos), devI32(st.Slots), C.int(nh), C.int(nkv),
			C.int(hs), C.int(st.RopeHeads), C.float(st.Theta), C.int(variant), cFlag(st.Lead))
	})
}

// AttentionOutProj: decode attention with the out-projection folded in
// (see Fused, kv_attention_out); false where the kernel does not apply.
func (c *CUDA) AttentionOutProj(acc, qkv, kc, vc, order, lens Buf, p AttnParams, wo Buf, C int) bool {
	return c.attentionOutProj(acc, qkv, kc, vc, order, lens, p, wo, C, 0)
}

func (c *CUDA) attentionOutProj(acc, q, kc, vc, order, lens Buf, p AttnParams, wo Buf, ch, variant int) bool {
	const op = "attentionoutproj"
	if p.T != 1 || c.failed() {
		return false
	}
	if !c.need(op, p.B > 0 && p.NH > 0 && p.NKV > 0 && p.NH%p.NKV == 0 && ch > 0,
		"invalid shape B=%d NH=%d NKV=%d C=%d (NH must be a multiple of NKV)", p.B, p.NH, p.NKV, ch) ||
		!c.need(op, p.HS > 0 && p.HS%2 == 0 && p.HS <= C.KV_ATTN_MAX_HS,
			"head size %d: the kernels take even sizes up to %d", p.HS, C.KV_ATTN_MAX_HS) ||
		!c.need(op, p.QStride >= p.NH*p.HS && p.MaxLen >= 0,
			"QStride %d < NH·HS %d or negative MaxLen %d", p.QStride, p.NH*p.HS, p.MaxLen) ||
		!c.needBuf(op, "acc", acc, 2*p.B*ch, I32) ||
		!c.needBuf(op, "q", q, (p.B-1)*p.QStride+p.NH*p.HS, F32) ||
		!c.needBuf(op, "kc", kc, p.NKV*p.HS, F32) ||
		!c.needBuf(op, "vc", vc, p.NKV*p.HS, F32) ||
		!c.needBuf(op, "order", order, p.B*p.MaxLen, I32) ||
		!c.needBuf(op, "lens", lens, p.B, I32) ||
		!c.needBuf(op, "wo", wo, ch*p.NH*p.HS, F32, F16) {
		return false
	}
	var launched C.int
	c.run(op, func() C.kv_status {
		return C.kv_attention_out(c.stream, devI64(acc), devF32(q), devF32(kc), devF32(vc), devI32(order), devI32(lens),
			C.int(p.B), C.int(p.NH), C.int(p.NKV), C.int(p.HS), C.int(p.QStride), C.int(p.MaxLen), C.float(p.RopeTheta),
			dev(wo), f16(wo), C.int(ch), C.int(variant), &launched)
	})
	return launched != 0 && !c.failed()
}

// AttentionBlock: see AttentionBlocker and kv_attention_block.
func (c *CUDA) AttentionBlock(acc, sum, in, mlpAcc, normW, w Buf, st QKVStore, order, lens Buf, p AttnParams, wo Buf, ch int, eps float32) bool {
	const op = "attentionblock"
	if p.T != 1 || c.failed() || w.dt != F16 || wo.dt != F16 {
		return false
	}
	qkvW := (p.NH + 2*p.NKV) * p.HS
	if !c.need(op, p.B > 0 && p.NH > 0 && p.NKV > 0 && p.NH%p.NKV == 0 && ch > 0 && st.NH == p.NH && st.NKV == p.NKV && st.HS == p.HS,
		"invalid shape B=%d NH=%d NKV=%d C=%d", p.B, p.NH, p.NKV, ch) ||
		!c.needBuf(op, "acc", acc, 2*p.B*ch, I32) ||
		!c.needBuf(op, "sum", sum, p.B*ch, F32) ||
		st.Tokens.IsZero() && !c.needBuf(op, "in", in, p.B*ch, F32) ||
		!mlpAcc.IsZero() && !c.needBuf(op, "mlpAcc", mlpAcc, 2*p.B*ch, I32) ||
		!st.Tokens.IsZero() && (!c.need(op, mlpAcc.IsZero() && !st.Lead, "an embedding block takes no accumulator and does not lead") ||
			!c.needBuf(op, "tokens", st.Tokens, p.B, I32) ||
			!c.need(op, !st.Wte.IsZero() && st.Wte.n%ch == 0, "token embeddings of %d elements for width %d", st.Wte.n, ch) ||
			!c.needBuf(op, "wte", st.Wte, st.Wte.n, F32, F16)) ||
		!c.needBuf(op, "normW", normW, ch, F32, F16) ||
		!c.needBuf(op, "w", w, qkvW*ch, F16) ||
		!c.needBuf(op, "kc", st.K, p.NKV*p.HS, F32) ||
		!c.needBuf(op, "vc", st.V, p.NKV*p.HS, F32) ||
		!c.needBuf(op, "pos", st.Pos, p.B, I32) ||
		!c.needBuf(op, "slots", st.Slots, p.B, I32) ||
		!c.needBuf(op, "order", order, p.B*p.MaxLen, I32) ||
		!c.needBuf(op, "lens", lens, p.B, I32) ||
		!c.needBuf(op, "wo", wo, ch*p.NH*p.HS, F16) {
		return false
	}
	var launched C.int
	c.run(op, func() C.kv_status {
		return C.kv_attention_block(c.stream, devI64(acc), devF32(sum), devF32(in), devI64(mlpAcc), dev(normW), f16(normW),
			dev(w), f16(w), devF32(st.K), devF32(st.V), devI32(st.Pos), devI32(st.Slots), devI32(order), devI32(lens),
			C.int(p.B), C.int(p.NH), C.int(p.NKV), C.int(p.HS), C.int(p.MaxLen), C.float(p.RopeTheta), C.float(st.Theta),
			C.int(st.RopeHeads), C.float(eps), C.int(ch), dev(wo), f16(wo), devI32(st.Tokens), dev(st.Wte), f16(st.Wte),
			C.int(st.Wte.n/ch), cFlag(st.Lead), &launched)
	})
	return launched != 0 && !c.failed()
}

// MLPAcc: the one-token MLP block into a fixed-point accumulator, see
// Fused and kv_mlp_acc.
func (c *CUDA) MLPAcc(acc, clear, in, normW, normB, upW, upB, downW, downB Buf, N, C, F int, eps float32, norm NormKind, act Act) bool {
	return c.mlpAcc(acc, clear, in, normW, normB, upW, upB, downW, downB, N, C, F, eps, norm, act, 0)
}

// MLPAccSum: MLPAcc on the residual stream after AttentionOutProj, see
// Fused and kv_mlp_acc (in_acc).
func (c *CUDA) MLPAccSum(acc, clear, sum, in, inAcc, normW, normB, upW, upB, downW, downB Buf, N, C, F int, eps float32, norm NormKind, act Act) bool {
	return c.mlpAccSum(acc, clear, sum, in, inAcc, normW, normB, upW, upB, downW, downB, N, C, F, eps, norm, act, 0, false)
}

// MLPAccLead is MLPAccSum letting the next kernel, an AttentionBlock,
// launch before this one's input is ready (see AttentionBlocker).
func (c *CUDA) MLPAccLead(acc, clear, sum, in, inAcc, normW, normB, upW, upB, downW, downB Buf, N, C, F int, eps float32, norm NormKind, act Act) bool {
	return c.mlpAccSum(acc, clear, sum, in, inAcc, normW, normB, upW, upB, downW, downB, N, C, F, eps, norm, act, 0, true)
}

// mlpAcc runs kv_mlp_acc's variant: 0 the default, 1 also without
// programmatic launches (tests on any GPU).
func (c *CUDA) mlpAcc(acc, clr, in, normW, normB, upW, upB, downW, downB Buf, n, ch, f int, eps float32, norm NormKind, act Act, variant int) bool {
	if !clr.IsZero() && clr.Len() > 2*n*ch {
		clr = clr.View(0, 2*n*ch) // MLPAcc clears one accumulator
	}
	return c.mlpAccSum(acc, clr, Buf{}, in, Buf{}, normW, normB, upW, upB, downW, downB, n, ch, f, eps, norm, act, variant, false)
}

func (c *CUDA) mlpAccSum(acc, clr, sum, in, inAcc, normW, normB, upW, upB, downW, downB Buf, n, ch, f int, eps float32, norm NormKind, act Act, variant int, lead bool) bool {
	const op = "mlpacc"
	if c.failed() {
		return false
	}
	swiglu := act == SwiGLUAct
	upRows := f
	if swiglu {
		upRows = 2 * f
	}
	if !c.need(op, n >= 0 && ch > 0 && f > 0, "invalid shape N=%d C=%d F=%d", n, ch, f) ||
		!c.need(op, (norm == RMSNormKind && swiglu) || (norm == LayerNormKind && act == GeluAct),
			"norm %d with activation %d: want RMSNorm with SwiGLU or LayerNorm with gelu", norm, act) ||
		!c.need(op, !swiglu || upB.IsZero(), "SwiGLU takes no up bias") ||
		!c.needBuf(op, "acc", acc, 2*n*ch, I32) ||
		!clr.IsZero() && !c.needBuf(op, "clear", clr, 2*n*ch, I32) ||
		!c.need(op, clr.IsZero() || clr.Len()%2 == 0 && !overlaps(acc, 2*n*ch, clr, clr.Len()), "clear overlaps acc or holds a half int64") ||
		!c.needBuf(op, "in", in, n*ch, F32) ||
		!inAcc.IsZero() && !c.needBuf(op, "inAcc", inAcc, 2*n*ch, I32) ||
		!inAcc.IsZero() && !c.needBuf(op, "sum", sum, n*ch, F32) ||
		!c.need(op, inAcc.IsZero() || !overlaps(sum, n*ch, in, n*ch) && !overlaps(inAcc, 2*n*ch, acc, 2*n*ch) && !overlaps(inAcc, 2*n*ch, clr, clr.Len()),
			"sum overlaps in, or inAcc overlaps acc or clear") ||
		!c.needBuf(op, "normW", normW, ch, F32, F16) ||
		norm == LayerNormKind && !normB.IsZero() && !c.needBuf(op, "normB", normB, ch, normW.dt) ||
		!c.needBuf(op, "upW", upW, upRows*ch, F32, F16) ||
		!upB.IsZero() && !c.needBuf(op, "upB", upB, f, F32, F16) ||
		!c.needBuf(op, "downW", downW, ch*f, F32, F16) ||
		!downB.IsZero() && !c.needBuf(op, "downB", downB, ch, F32, F16) {
		return false
	}
	if n == 0 {
		return true
	}
	if norm == RMSNormKind {
		normB = Buf{}
	}
	var launched C.int
	c.run(op, func() C.kv_status {
		return C.kv_mlp_acc(c.stream, devI64(acc), devI64(clr), C.longlong(clr.Len()/2), devF32(in), devI64(inAcc), devF32(sum),
			dev(normW), dev(normB), f16(normW),
			dev(upW), f16(upW), dev(upB), f16(upB), dev(downW), f16(downW), dev(downB), f16(downB), C.int(n), C.int(ch),
			C.int(f), C.float(eps), cFlag(norm == RMSNormKind), cFlag(swiglu), C.int(variant), cFlag(lead), &launched)
	})
	return launched != 0 && !c.failed()
}

// NormSum: the final norm on the residual stream an MLPAcc left in acc,
// which it clears, see Fused and kv_norm_sum.
func (c *CUDA) NormSum(out, in, acc, clear, normW, normB Buf, N, C int, eps float32, norm NormKind) {
	const op = "normsum"
	if N <= 0 {
		return
	}
	if !c.need(op, C > 0, "invalid C=%d", C) ||
		!c.need(op, norm == LayerNormKind || norm == RMSNormKind, "unknown norm kind %d", norm) ||
		!c.needBuf(op, "out", out, N*C, F32) ||
		!c.needBuf(op, "in", in, N*C, F32) ||
		!c.need(op, !overlaps(out, N*C, in, N*C), "out overlaps in") ||
		!c.needBuf(op, "acc", acc, 2*N*C, I32) ||
		!clear.IsZero() && (!c.needBuf(op, "clear", clear, 2*N*C, I32) || !c.need(op, !overlaps(clear, 2*N*C, acc, 2*N*C), "clear overlaps acc")) ||
		!c.needBuf(op, "normW", normW, C, F32, F16) ||
		norm == LayerNormKind && !normB.IsZero() && !c.needBuf(op, "normB", normB, C, normW.dt) {
		return
	}
	if norm == RMSNormKind {
		normB = Buf{}
	}
	c.run(op, func() C.kv_status {
		return C.kv_norm_sum(c.stream, devF32(out), devF32(in), devI64(acc), devI64(clear), dev(normW), dev(normB), f16(normW),
			C.int(N), C.int(C), C.float(eps), cFlag(norm == RMSNormKind))
	})
}

// devI64 is an I32 buffer holding int64 pairs (an AttentionOutProj
// accumulator) as the kernels take it.
func devI64(b Buf) *C.longlong { return (*C.longlong)(dev(b)) }

// NormMatMulSum: the residual stream after AttentionOutProj, then the
// normalised product, see Fused and kv_norm_matmul_sum.
func (c *CUDA) NormMatMulSum(out, sum, in, acc, accBias Buf, normW, normB, w, bias Buf, N, C, OC int, eps float32, norm NormKind, act Act) {
	const op = "normmatmulsum"
	n, ch, oc := N, C, OC
	if !c.need(op, n >= 0 && ch > 0 && oc >= 0, "invalid shape N=%d C=%d OC=%d", n, ch, oc) ||
		!c.need(op, norm == LayerNormKind || norm == RMSNormKind, "unknown norm kind %d", norm) ||
		!c.need(op, act == NoAct || act == GeluAct, "activation %d: want none or gelu", act) ||
		!c.needBuf(op, "out", out, n*oc, F32) ||
		!c.needBuf(op, "sum", sum, n*ch, F32) ||
		!c.needBuf(op, "in", in, n*ch, F32) ||
		!c.needBuf(op, "acc", acc, 2*n*ch, I32) ||
		!accBias.IsZero() && !c.needBuf(op, "accBias", accBias, ch, F32, F16) ||
		!c.needBuf(op, "normW", normW, ch, F32, F16) ||
		norm == LayerNormKind && !normB.IsZero() && !c.needBuf(op, "normB", normB, ch, normW.dt) ||
		!c.needBuf(op, "w", w, oc*ch, F32, F16) ||
		!bias.IsZero() && !c.needBuf(op, "bias", bias, oc, F32, F16) ||
		!c.need(op, !overlaps(sum, n*ch, in, n*ch), "sum overlaps in") ||
		!c.need(op, !overlaps(out, n*oc, sum, n*ch) && !overlaps(out, n*oc, in, n*ch), "out overlaps sum or in") {
		return
	}
	if n == 0 || oc == 0 {
		return
	}
	if norm == RMSNormKind {
		normB = Buf{}
	}
	c.run(op, func() C.kv_status {
		return C.kv_norm_matmul_sum(c.stream, devF32(out), devF32(sum), devF32(in), devI64(acc),
			dev(accBias), f16(accBias), dev(normW), dev(normB), f16(normW), dev(w), f16(w), dev(bias), f16(bias),
			C.int(n), C.int(ch), C.int(oc), C.float(eps), cFlag(norm == RMSNormKind), cFlag(act == GeluAct))
	})
}

// ResMatMul: out = res + product, clearing an accumulator, see Fused and
// kv_res_matmul.
func (c *CUDA) ResMatMul(out, res, in, w, bias, acc Buf, N, K, OC int, act Act) {
	const op = "resmatmul"
	n, k, oc := N, K, OC
	inW := k
	if act == SwiGLUAct {
		inW = 2 * k
	}
	if !c.need(op, n >= 0 && k > 0 && oc >= 0, "invalid shape N=%d K=%d OC=%d", n, k, oc) ||
		!c.need(op, act == NoAct || act == SwiGLUAct, "activation %d: want none or SwiGLU", act) ||
		!c.need(op, act != SwiGLUAct || bias.IsZero(), "SwiGLU takes no bias") ||
		!c.needBuf(op, "out", out, n*oc, F32) ||
		!c.needBuf(op, "res", res, n*oc, F32) ||
		!c.needBuf(op, "in", in, n*inW, F32) ||
		!c.needBuf(op, "w", w, oc*k, F32, F16) ||
		!bias.IsZero() && !c.needBuf(op, "bias", bias, oc, F32, F16) ||
		!acc.IsZero() && !c.needBuf(op, "acc", acc, 2*n*oc, I32) ||
		!c.need(op, !overlaps(out, n*oc, res, n*oc) && !overlaps(out, n*oc, in, n*inW), "out overlaps res or in") {
		return
	}
	if n == 0 || oc == 0 {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_res_matmul(c.stream, devF32(out), devF32(res), devF32(in), dev(w), f16(w), dev(bias), f16(bias),
			C.int(n), C.int(k), C.int(oc), cFlag(act == SwiGLUAct), devI64(acc))
	})
}

// overlaps reports whether the first na elements of a and the first nb of b
// share device memory.
func overlaps(a Buf, na int, b Buf, nb int) bool {
	if a.ptr == 0 || b.ptr == 0 || na == 0 || nb == 0 {
		return false
	}
	aEnd := a.ptr + uintptr(na*a.dt.Size())
	bEnd := b.ptr + uintptr(nb*b.dt.Size())
	return a.ptr < bEnd && b.ptr < aEnd
}
