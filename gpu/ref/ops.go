// Package ref holds the CPU reference kernels: plain Go, one function per
// operation of package gpu, named like it. They are the oracle every CUDA
// kernel is tested against and the arithmetic of the CPU backend, so they
// favour clarity and accumulate in float64 where rounding matters.
//
// Shapes are in comments: B sequences, T tokens, N rows, C channels, NH/NKV
// query/key-value heads, HS head size, V vocabulary.
package ref

import (
	"math"
	"runtime"
	"sync"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas32"
)

// Embed: out[N,C] = wte[tokens[r]] + wpe[pos[r]]; wpe may be nil (Llama).
func Embed(out, wte, wpe []float32, tokens, pos []int32, N, C int) {
	for r := 0; r < N; r++ {
		t := wte[int(tokens[r])*C : int(tokens[r])*C+C]
		o := out[r*C : r*C+C]
		if wpe == nil {
			copy(o, t)
			continue
		}
		p := wpe[int(pos[r])*C : int(pos[r])*C+C]
		for c := range o {
			o[c] = t[c] + p[c]
		}
	}
}

// LayerNorm: out[N,C] = (in − mean)/sqrt(var + eps)·w + b, biased variance as torch.
func LayerNorm(out, in, w, b []float32, N, C int, eps float32) {
	for r := 0; r < N; r++ {
		x := in[r*C : r*C+C]
		var sum float64
		for _, v := range x {
			sum += float64(v)
		}
		mean := sum / float64(C)
		var ss float64
		for _, v := range x {
			d := float64(v) - mean
			ss += d * d
		}
		rstd := 1 / math.Sqrt(ss/float64(C)+float64(eps))
		o := out[r*C : r*C+C]
		for c := range o {
			y := (float64(x[c]) - mean) * rstd * float64(w[c])
			if b != nil {
				y += float64(b[c])
			}
			o[c] = float32(y)
		}
	}
}

// RMSNorm: out[N,C] = in/sqrt(mean(in²) + eps)·w (HF LlamaRMSNorm).
func RMSNorm(out, in, w []float32, N, C int, eps float32) {
	for r := 0; r < N; r++ {
		x := in[r*C : r*C+C]
		var ss float64
		for _, v := range x {
			ss += float64(v) * float64(v)
		}
		rstd := 1 / math.Sqrt(ss/float64(C)+float64(eps))
		o := out[r*C : r*C+C]
		for c := range o {
			o[c] = float32(float64(x[c]) * rstd * float64(w[c]))
		}
	}
}

// MatMul: out[N,OC] = in[N,C]·w[OC,C]ᵀ + bias (bias may be nil); with
// accumulate, out += the same. A gonum SGEMM (fp32 accumulation, blocked and
// parallel): fast enough for the CPU backend and within 1e-6 relative of a
// float64 product at these sizes.
func MatMul(out, in, w, bias []float32, N, C, OC int, accumulate bool) {
	var beta float32
	if accumulate {
		beta = 1
	}
	a := blas32.General{Rows: N, Cols: C, Stride: C, Data: in[:N*C]}
	b := blas32.General{Rows: OC, Cols: C, Stride: C, Data: w[:OC*C]}
	c := blas32.General{Rows: N, Cols: OC, Stride: OC, Data: out[:N*OC]}
	if N == 1 {
		// GEMV: out = w·x (+ out).
		blas32.Gemv(blas.NoTrans, 1, b, blas32.Vector{N: C, Inc: 1, Data: in[:C]}, beta, blas32.Vector{N: OC, Inc: 1, Data: out[:OC]})
	} else {
		blas32.Gemm(blas.NoTrans, blas.Trans, 1, a, b, beta, c)
	}
	if bias != nil {
		for r := 0; r < N; r++ {
			o := out[r*OC : r*OC+OC]
			for i := range o {
				o[i] += bias[i]
			}
		}
	}
}

func dot64(a, b []float32) float64 {
	var s0, s1, s2, s3 float64
	n := len(a)
	b = b[:n]
	i := 0
	for ; i+4 <= n; i += 4 {
		s0 += float64(a[i]) * float64(b[i])
		s1 += float64(a[i+1]) * float64(b[i+1])
		s2 += float64(a[i+2]) * float64(b[i+2])
		s3 += float64(a[i+3]) * float64(b[i+3])
	}
	for ; i < n; i++ {
		s0 += float64(a[i]) * float64(b[i])
	}
	return (s0 + s1) + (s2 + s3)
}

// GeluNew: x = 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))) in place (HF NewGELUActivation).
func GeluNew(x []float32) {
	const k = 0.7978845608028654 // sqrt(2/π)
	for i, v := range x {
		f := float64(v)
		x[i] = float32(0.5 * f * (1 + math.Tanh(k*(f+0.044715*f*f*f))))
	}
}

// SiluMul: out[N,F] = silu(gate)·up, gate and up rows rowStride apart.
func SiluMul(out, gate, up []float32, N, F, rowStride int) {
	for r := 0; r < N; r++ {
		for i := 0; i < F; i++ {
			g := float64(gate[r*rowStride+i])
			out[r*F+i] = float32(g / (1 + math.Exp(-g)) * float64(up[r*rowStride+i]))
		}
	}
}

// RopeInvFreq is HF's default RoPE inverse frequency 1/θ^(2i/HS), i < HS/2,
// computed as HF does it (in float32 from an int64 arange).
func RopeInvFreq(HS int, theta float32) []float32 {
	f := make([]float32, HS/2)
	for i := range f {
		f[i] = float32(1 / math.Pow(float64(theta), float64(float32(2*i)/float32(HS))))
	}
	return f
}

// RopeRotate rotates one head vector x[HS] in place at position pos in HF's
// rotate-half convention: x1' = x1·cos − x2·sin, x2' = x2·cos + x1·sin, where
// x1, x2 are the two halves and the angle of pair i is pos·invFreq[i]
// (computed in float32 like HF, then cos/sin in float64).
func RopeRotate(x []float32, pos int, invFreq []float32) {
	h := len(invFreq)
	for i := 0; i < h; i++ {
		a := float64(float32(pos) * invFreq[i])
		c, s := math.Cos(a), math.Sin(a)
		x1, x2 := float64(x[i]), float64(x[i+h])
		x[i] = float32(x1*c - x2*s)
		x[i+h] = float32(x2*c + x1*s)
	}
}

// RoPE rotates heads 0..nHeads-1 of each of N rows (rowStride apart) of x at
// position pos[r].
func RoPE(x []float32, pos []int32, N, nHeads, HS, rowStride int, theta float32) {
	inv := RopeInvFreq(HS, theta)
	for r := 0; r < N; r++ {
		for h := 0; h < nHeads; h++ {
			off := r*rowStride + h*HS
			RopeRotate(x[off:off+HS], int(pos[r]), inv)
		}
	}
}

// CacheStore copies row r of src (rowSize elements, srcStride apart) to slot
// slots[r] of cache.
func CacheStore(cache, src []float32, slots []int32, N, rowSize, srcStride int) {
	for r := 0; r < N; r++ {
		s := int(slots[r])
		copy(cache[s*rowSize:s*rowSize+rowSize], src[r*srcStride:r*srcStride+rowSize])
	}
}

// Attention computes out[N, NH·HS] for the queries q (rows qStride apart)
// over cache entries, see gpu.AttnParams: query t of sequence b sees
// order[b·maxLen + j] for j ≤ lens[b] − T + t; query head h reads key/value
// head h/(NH/NKV) (grouped-query attention). With ropeTheta ≠ 0 the key of
// logical entry j is rotated at position j as it is read.
func Attention(out, q, kc, vc []float32, order, lens []int32, B, T, NH, NKV, HS, qStride, maxLen int, ropeTheta float32) {
	group := NH / NKV
	scale := 1 / math.Sqrt(float64(HS))
	var inv []float32
	if ropeTheta != 0 {
		inv = RopeInvFreq(HS, ropeTheta)
	}
	parallel(B*T*NH, 1, func(lo, hi int) {
		key := make([]float32, HS)
		var scores []float64
		acc := make([]float64, HS)
		for idx := lo; idx < hi; idx++ {
			row, h := idx/NH, idx%NH
			b, t := row/T, row%T
			n := int(lens[b]) - T + t + 1
			kh := h / group
			qv := q[row*qStride+h*HS : row*qStride+h*HS+HS]
			scores = scores[:0]
			maxs := math.Inf(-1)
			for j := 0; j < n; j++ {
				slot := int(order[b*maxLen+j])
				copy(key, kc[(slot*NKV+kh)*HS:(slot*NKV+kh)*HS+HS])
				if inv != nil {
					RopeRotate(key, j, inv)
				}
				s := dot64(qv, key) * scale
				scores = append(scores, s)
				maxs = math.Max(maxs, s)
			}
			var sum float64
			for j := range scores {
				scores[j] = math.Exp(scores[j] - maxs)
				sum += scores[j]
			}
			clear(acc)
			for j := 0; j < n; j++ {
				slot := int(order[b*maxLen+j])
				v := vc[(slot*NKV+kh)*HS : (slot*NKV+kh)*HS+HS]
				p := scores[j] / sum
				for c := range acc {
					acc[c] += p * float64(v[c])
				}
			}
			o := out[row*NH*HS+h*HS : row*NH*HS+h*HS+HS]
			for c := range o {
				o[c] = float32(acc[c])
			}
		}
	})
}

// NLL: nll[r] = logsumexp(logits[r]) − logits[r, targets[r]].
func NLL(nll, logits []float32, targets []int32, N, V int) {
	for r := 0; r < N; r++ {
		l := logits[r*V : r*V+V]
		m := math.Inf(-1)
		for _, v := range l {
			m = math.Max(m, float64(v))
		}
		var s float64
		for _, v := range l {
			s += math.Exp(float64(v) - m)
		}
		nll[r] = float32(m + math.Log(s) - float64(l[targets[r]]))
	}
}

// parallel splits [0,n) into chunks of at least minChunk over GOMAXPROCS
// goroutines.
func parallel(n, minChunk int, fn func(lo, hi int)) {
	workers := runtime.GOMAXPROCS(0)
	if minChunk < 1 {
		minChunk = 1
	}
	if w := n / minChunk; w < workers {
		workers = w
	}
	if workers <= 1 {
		fn(0, n)
		return
	}
	var wg sync.WaitGroup
	chunk := (n + workers - 1) / workers
	for lo := 0; lo < n; lo += chunk {
		hi := min(lo+chunk, n)
		wg.Add(1)
		go func() { defer wg.Done(); fn(lo, hi) }()
	}
	wg.Wait()
}
