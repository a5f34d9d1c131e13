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
