package ref

import "math"

// The fused decode operations (gpu.Fused) defined as the sequences of plain
// operations they replace: the oracle for the fused CUDA kernels.

// NormMatMul: out[N,OC] (+)= act(norm(in)·wᵀ + bias); rms selects RMSNorm
// (normB unused) over LayerNorm, gelu applies gelu_new.
func NormMatMul(out, in, normW, normB, w, bias []float32, N, C, OC int, eps float32, rms, gelu, accumulate bool) {
	xn := make([]float32, N*C)
	if rms {
		RMSNorm(xn, in, normW, N, C, eps)
	} else {
		LayerNorm(xn, in, normW, normB, N, C, eps)
	}
	MatMul(out, xn, w, bias, N, C, OC, accumulate)
	if gelu {
		GeluNew(out[:N*OC])
	}
}

// NormMatMulSwiGLU: out[N, OC/2] = silu(p[:, :OC/2])·p[:, OC/2:] with
// p = norm(in)·wᵀ + bias (Llama's gate|up product and its activation).
func NormMatMulSwiGLU(out, in, normW, normB, w, bias []float32, N, C, OC int, eps float32, rms bool) {
	p := make([]float32, N*OC)
	NormMatMul(p, in, normW, normB, w, bias, N, C, OC, eps, rms, false, false)
	SiluMul(out, p, p[OC/2:], N, OC/2, OC)
}

// SwiGLUMatMul: out[N,OC] (+)= (silu(gu[:, :F])·gu[:, F:])·wᵀ, gu rows 2F wide.
func SwiGLUMatMul(out, gu, w []float32, N, F, OC int, accumulate bool) {
	act := make([]float32, N*F)
	SiluMul(act, gu, gu[F:], N, F, 2*F)
	MatMul(out, act, w, nil, N, F, OC, accumulate)
}

// RopeStore: RoPE on heads 0..ropeHeads-1 of each q|k|v row (if theta ≠ 0),
// then the row's NKV key and value heads to slot slots[r] of kc and vc.
func RopeStore(qkv, kc, vc []float32, pos, slots []int32, N, NH, NKV, HS, rowStride, ropeHeads int, theta float32) {
	if theta != 0 && ropeHeads > 0 {
		RoPE(qkv, pos, N, ropeHeads, HS, rowStride, theta)
	}
	CacheStore(kc, qkv[NH*HS:], slots, N, NKV*HS, rowStride)
	CacheStore(vc, qkv[(NH+NKV)*HS:], slots, N, NKV*HS, rowStride)
}

// AttentionOutProj: decode attention (T = 1) with the output projection
// folded in: for every query head h, its share of attn·woᵀ,
// part_h[c] = Σ_d wo[c·NH·HS + h·HS + d] · attn(b, h)[d] (attn as Attention,
// wo [C, NH·HS] as MatMul's weights, no bias), is added to acc[b·C + c] in
// fixed point (Fix): the heads' sum does not depend on the order they
// arrive in. float32 partials, each a dot product in float64.
func AttentionOutProj(acc []int64, q, kc, vc []float32, order, lens []int32, wo []float32, B, NH, NKV, HS, qStride, maxLen, C int, ropeTheta float32) {
	att := make([]float32, B*NH*HS)
	Attention(att, q, kc, vc, order, lens, B, 1, NH, NKV, HS, qStride, maxLen, ropeTheta)
	K := NH * HS
	for b := 0; b < B; b++ {
		for h := 0; h < NH; h++ {
			a := att[(b*NH+h)*HS : (b*NH+h)*HS+HS]
			for c := 0; c < C; c++ {
				acc[b*C+c] += Fix(float32(dot64(a, wo[c*K+h*HS:c*K+h*HS+HS])))
			}
		}
	}
}

// Fix is v in fixed point with 32 fraction bits, rounded to nearest even,
// clamped to ±2^62 (NaN to −2^62): csrc's kv_fix, bit for bit.
func Fix(v float32) int64 {
	const lim = 0x1p62
	f := float64(v * 0x1p32) // exact: a float32 times a power of two
	if !(f > -lim) {
		f = -lim
	}
	if f > lim {
		f = lim
	}
	return int64(math.RoundToEven(f))
}

// Unfix is s as a float32 (rounded once, to nearest even) over 2^32:
// csrc's kv_unfix.
func Unfix(s int64) float32 { return float32(s) * 0x1p-32 }

// SumAcc: sum[n·C + c] = in[n·C + c] + (bias[c] + Unfix(acc[n·C + c])) in
// fp32, bias nil for none: the residual stream after a folded attention
// (AttentionOutProj).
func SumAcc(sum, in []float32, acc []int64, bias []float32, N, C int) {
	for i := 0; i < N*C; i++ {
		var t float32
		if bias != nil {
			t = bias[i%C]
		}
		t += Unfix(acc[i])
		sum[i] = in[i] + t
	}
}

// MLPAcc: acc[n·C + c] += Fix(mlp(in)[n·C + c]), the MLP block without its
// residual: norm (RMSNorm with swiglu, else LayerNorm with normB), the up
// product, act (swiglu: silu(gate)·up, upW holding the F gate rows then the
// F up rows, no upB; else gelu_new of the product + upB), the down product
// + downB (nil for none). csrc's kv_mlp_acc sums the same in blocks of
// columns, each rounded to fixed point, so the two agree to ~1e-6, not bit
// for bit.
func MLPAcc(acc []int64, in, normW, normB, upW, upB, downW, downB []float32, N, C, F int, eps float32, swiglu bool) {
	h := make([]float32, N*F)
	if swiglu {
		gu := make([]float32, N*2*F)
		NormMatMul(gu, in, normW, nil, upW, nil, N, C, 2*F, eps, true, false, false)
		SiluMul(h, gu, gu[F:], N, F, 2*F)
	} else {
		NormMatMul(h, in, normW, normB, upW, upB, N, C, F, eps, false, true, false)
	}
	out := make([]float32, N*C)
	MatMul(out, h, downW, downB, N, F, C, false)
	for i, v := range out {
		acc[i] += Fix(v)
	}
}
