package gpu

import "github.com/kvalign/kvalign/gpu/ref"

// CPUFused is the CPU backend plus the fused operations, each run as the
// reference sequence it replaces: it exercises a model's fused path
// without a GPU (the plain CPU backend keeps the unfused path).
type CPUFused struct{ CPU }

// NewCPUFused returns a CPU backend that also implements Fused.
func NewCPUFused() *CPUFused { return &CPUFused{} }

func (c *CPUFused) NormMatMul(out, in, normW, normB, w, bias Buf, N, C, OC int, eps float32, norm NormKind, act Act, accumulate bool) {
	if act == SwiGLUAct {
		ref.NormMatMulSwiGLU(out.f, in.f, normW.f, normB.f, w.f, bias.f, N, C, OC, eps, norm == RMSNormKind)
		return
	}
	ref.NormMatMul(out.f, in.f, normW.f, normB.f, w.f, bias.f, N, C, OC, eps, norm == RMSNormKind, act == GeluAct, accumulate)
}

func (c *CPUFused) SwiGLUMatMul(out, gu, w Buf, N, F, OC int, accumulate bool) {
	ref.SwiGLUMatMul(out.f, gu.f, w.f, N, F, OC, accumulate)
}

func (c *CPUFused) RopeStore(qkv, kc, vc, pos, slots Buf, N, NH, NKV, HS, rowStride, ropeHeads int, theta float32) {
	ref.RopeStore(qkv.f, kc.f, vc.f, pos.i, slots.i, N, NH, NKV, HS, rowStride, ropeHeads, theta)
}

func (c *CPUFused) NormMatMulStore(qkv, in, normW, normB, w, bias Buf, N, C int, eps float32, norm NormKind, st QKVStore) {
	OC := (st.NH + 2*st.NKV) * st.HS
	c.NormMatMul(qkv, in, normW, normB, w, bias, N, C, OC, eps, norm, NoAct, false)
	c.RopeStore(qkv, st.K, st.V, st.Pos, st.Slots, N, st.NH, st.NKV, st.HS, OC, st.RopeHeads, st.Theta)
}

// AttentionOutProj folds the out-projection in as ref.AttentionOutProj, so
// that the fused path's bookkeeping (the accumulator, NormMatMulSum,
// ResMatMul) runs without a GPU too.
func (c *CPUFused) AttentionOutProj(acc, qkv, kc, vc, order, lens Buf, p AttnParams, wo Buf, C int) bool {
	if p.T != 1 {
		return false
	}
	a := unpackInt64(acc.i[:2*p.B*C])
	ref.AttentionOutProj(a, qkv.f, kc.f, vc.f, order.i, lens.i, wo.f, p.B, p.NH, p.NKV, p.HS, p.QStride, p.MaxLen, C, p.RopeTheta)
	packInt64(acc.i, a)
	return true
}

func (c *CPUFused) NormMatMulSum(out, sum, in, acc, accBias Buf, normW, normB, w, bias Buf, N, C, OC int, eps float32, norm NormKind, act Act) {
	ref.SumAcc(sum.f, in.f, unpackInt64(acc.i[:2*N*C]), accBias.f, N, C)
	c.NormMatMul(out, sum, normW, normB, w, bias, N, C, OC, eps, norm, act, false)
}

func (c *CPUFused) ResMatMul(out, res, in, w, bias, acc Buf, N, K, OC int, act Act) {
	copy(out.f[:N*OC], res.f[:N*OC])
	if act == SwiGLUAct {
		c.SwiGLUMatMul(out, in, w, N, K, OC, true)
	} else {
		c.MatMul(out, in, w, bias, N, K, OC, true)
	}
	if !acc.IsZero() {
		clear(acc.i[:2*N*OC])
	}
}

// MatMulLead is MatMul accumulating: on the CPU nothing runs ahead.
func (c *CPUFused) MatMulLead(out, in, w, bias Buf, N, C, OC int) {
	c.MatMul(out, in, w, bias, N, C, OC, true)
}

func (c *CPUFused) MLPAcc(acc, clr, in, normW, normB, upW, upB, downW, downB Buf, N, C, F int, eps float32, norm NormKind, act Act) bool {
	a := unpackInt64(acc.i[:2*N*C])
	ref.MLPAcc(a, in.f, normW.f, normB.f, upW.f, upB.f, downW.f, downB.f, N, C, F, eps, act == SwiGLUAct)
	packInt64(acc.i, a)
	if !clr.IsZero() {
		clear(clr.i[:2*N*C])
	}
	return true
}

func (c *CPUFused) MLPAccSum(acc, clr, sum, in, inAcc, normW, normB, upW, upB, downW, downB Buf, N, C, F int, eps float32, norm NormKind, act Act) bool {
	if !inAcc.IsZero() {
		ref.SumAcc(sum.f[:N*C], in.f, unpackInt64(inAcc.i[:2*N*C]), nil, N, C)
		in = sum
	}
	c.MLPAcc(acc, Buf{}, in, normW, normB, upW, upB, downW, downB, N, C, F, eps, norm, act)
	if !clr.IsZero() {
		clear(clr.i)
	}
	return true
}

func (c *CPUFused) NormSum(out, in, acc, clr, normW, normB Buf, N, C int, eps float32, norm NormKind) {
	sum := make([]float32, N*C)
	ref.SumAcc(sum, in.f, unpackInt64(acc.i[:2*N*C]), nil, N, C)
	if norm == RMSNormKind {
		ref.RMSNorm(out.f, sum, normW.f, N, C, eps)
	} else {
		ref.LayerNorm(out.f, sum, normW.f, normB.f, N, C, eps)
	}
	clear(acc.i[:2*N*C])
	if !clr.IsZero() {
		clear(clr.i[:2*N*C])
	}
}

func (c *CPUFused) NormMatMulStoreSum(qkv, sum, in, acc, normW, normB, w, bias Buf, N, C int, eps float32, norm NormKind, st QKVStore) {
	ref.SumAcc(sum.f, in.f, unpackInt64(acc.i[:2*N*C]), nil, N, C)
	c.NormMatMulStore(qkv, sum, normW, normB, w, bias, N, C, eps, norm, st)
}

// unpackInt64 reads int64s stored as little-endian pairs of int32 (the I32
// view of an accumulator); packInt64 writes them back.
func unpackInt64(p []int32) []int64 {
	v := make([]int64, len(p)/2)
	for i := range v {
		v[i] = int64(uint32(p[2*i])) | int64(p[2*i+1])<<32
	}
	return v
}

func packInt64(p []int32, v []int64) {
	for i, x := range v {
		p[2*i], p[2*i+1] = int32(uint32(x)), int32(x>>32)
	}
}

// AttentionBlock is NormMatMulStoreSum then AttentionOutProj (the CPU has
// no launches to save; this runs the runner's two-launch path without a
// GPU too); without mlpAcc, sum is in, or with st.Tokens their embeddings.
func (c *CPUFused) AttentionBlock(acc, sum, in, mlpAcc, normW, w Buf, st QKVStore, order, lens Buf, p AttnParams, wo Buf, C int, eps float32) bool {
	if p.T != 1 {
		return false
	}
	qkv := Buf{dt: F32, n: p.B * p.QStride, f: make([]float32, p.B*p.QStride)}
	if !st.Tokens.IsZero() {
		c.Embed(sum, st.Wte, Buf{}, st.Tokens, Buf{}, p.B, C)
		c.NormMatMulStore(qkv, sum, normW, Buf{}, w, Buf{}, p.B, C, eps, RMSNormKind, st)
	} else if mlpAcc.IsZero() {
		copy(sum.f[:p.B*C], in.f[:p.B*C])
		c.NormMatMulStore(qkv, sum, normW, Buf{}, w, Buf{}, p.B, C, eps, RMSNormKind, st)
	} else {
		c.NormMatMulStoreSum(qkv, sum, in, mlpAcc, normW, Buf{}, w, Buf{}, p.B, C, eps, RMSNormKind, st)
	}
	return c.AttentionOutProj(acc, qkv, st.K, st.V, order, lens, p, wo, C)
}

// MLPAccLead is MLPAccSum: on the CPU nothing runs ahead.
func (c *CPUFused) MLPAccLead(acc, clr, sum, in, inAcc, normW, normB, upW, upB, downW, downB Buf, N, C, F int, eps float32, norm NormKind, act Act) bool {
	return c.MLPAccSum(acc, clr, sum, in, inAcc, normW, normB, upW, upB, downW, downB, N, C, F, eps, norm, act)
}
