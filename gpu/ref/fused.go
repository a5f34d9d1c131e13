package ref

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
