package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/kvalign/kvalign/internal/testenv"
	"github.com/x448/float16"
)

// The register-resident kernels (csrc/align.cu, variants 6 and 7) depend on
// index bookkeeping a GPU test can only report as "wrong": which neuron each
// packed row holds, which k-slots a lane's 16-byte loads feed, which
// accumulator becomes which next-layer fragment. emulateAlignTile runs the
// kernels' per-lane program on the CPU, with the fragment layouts of
// mma.sync m16n8k16 (f16) and m16n8k8 (tf32) as the PTX ISA defines them,
// so the packing and the lane arithmetic are checked here against ref.Align
// on every CPU test run.

// Fragments: one warp's registers of an operand, [lane][register] (f16
// registers hold two values, [lane][register][half]).
type cFrag [32][4]float64

// mmaF16 is mma.sync.m16n8k16 (row.col, fp32 accumulate) over the warp:
// A[g][2t+e] = a[lane][0][e], A[g+8][2t+e] = a[lane][1][e], A[g][2t+8+e] =
// a[lane][2][e], A[g+8][2t+8+e] = a[lane][3][e]; B[2t+e][g] = b[lane][0][e],
// B[2t+8+e][g] = b[lane][1][e]; C[g][2t+e] = c[lane][e], C[g+8][2t+e] =
// c[lane][2+e] (g = lane/4, t = lane%4).
func mmaF16(c *cFrag, a *[32][4][2]float64, b *[32][2][2]float64) {
	var A [16][16]float64
	var B [16][8]float64
	for lane := range 32 {
		g, t := lane/4, lane%4
		for e := range 2 {
			A[g][2*t+e], A[g+8][2*t+e] = a[lane][0][e], a[lane][1][e]
			A[g][2*t+8+e], A[g+8][2*t+8+e] = a[lane][2][e], a[lane][3][e]
			B[2*t+e][g], B[2*t+8+e][g] = b[lane][0][e], b[lane][1][e]
		}
	}
	mmaC(c, A[:], B[:])
}

// mmaTF32 is mma.sync.m16n8k8 with tf32 operands: A[g][t] = a[lane][0],
// A[g+8][t] = a[lane][1], A[g][t+4] = a[lane][2], A[g+8][t+4] = a[lane][3];
// B[t][g] = b[lane][0], B[t+4][g] = b[lane][1]; C as mmaF16.
func mmaTF32(c *cFrag, a *[32][4]float64, b *[32][2]float64) {
	A := make([][16]float64, 16) // k < 8 used
	B := make([][8]float64, 16)
	for lane := range 32 {
		g, t := lane/4, lane%4
		A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4] = a[lane][0], a[lane][1], a[lane][2], a[lane][3]
		B[t][g], B[t+4][g] = b[lane][0], b[lane][1]
	}
	mmaC(c, A, B)
}

func mmaC(c *cFrag, A [][16]float64, B [][8]float64) {
	for lane := range 32 {
		g, t := lane/4, lane%4
		for e := range 2 {
			var s0, s1 float64
			for k := range len(B) {
				s0 += A[g][k] * B[k][2*t+e]
				s1 += A[g+8][k] * B[k][2*t+e]
			}
			c[lane][e] += s0
			c[lane][2+e] += s1
		}
	}
}

func half(v float64) float64 { return float64(float16.Fromfloat32(float32(v)).Float32()) }

// laneBlock is a warp's share of one 32-wide k block: v[lane][r][p] is row g
// (r = 0) or g+8 (r = 1) at k = 32c+8t+p.
type laneBlock [32][2][8]float64

// blockMMA is the math policies' mma: acc += A·Wᵀ over the block, where
// lane (g, t) supplies w(lane) = W[n = 8j+g][32c+8t … +7] (its 16-byte
// shared-memory load). F16 (MathF16): two k16 steps, slots q of step σ are
// p = 4σ+q, operands rounded to fp16. F32 (MathTF32x3): four k8 steps, slot
// t is p = 2j, slot t+4 is p = 2j+1 (the three-pass split is exact here:
// float64 operands, which is what it approximates).
func blockMMA(dt DType, acc *cFrag, v *laneBlock, w func(lane int) []float64) {
	if dt == F16 {
		for sg := range 2 {
			var a [32][4][2]float64
			var b [32][2][2]float64
			for lane := range 32 {
				wl := w(lane)
				for e := range 2 {
					a[lane][0][e] = half(v[lane][0][4*sg+e])
					a[lane][1][e] = half(v[lane][1][4*sg+e])
					a[lane][2][e] = half(v[lane][0][4*sg+2+e])
					a[lane][3][e] = half(v[lane][1][4*sg+2+e])
					b[lane][0][e] = half(wl[4*sg+e])
					b[lane][1][e] = half(wl[4*sg+2+e])
				}
			}
			mmaF16(acc, &a, &b)
		}
		return
	}
	for j := range 4 {
		var a [32][4]float64
		var b [32][2]float64
		for lane := range 32 {
			wl := w(lane)
			a[lane] = [4]float64{v[lane][0][2*j], v[lane][1][2*j], v[lane][0][2*j+1], v[lane][1][2*j+1]}
			b[lane] = [2]float64{wl[2*j], wl[2*j+1]}
		}
		mmaTF32(acc, &a, &b)
	}
}

// emulateAlignTile is the kernel's work on one 16-row tile: x [16][HS] the
// rows' head vectors, p [16] their window indices, lh the tile's row of the
// LH table. It returns the realigned rows.
func emulateAlignTile(pk *AlignPackHost, x [][]float32, p []int, lh int) [][]float32 {
	NX, NH2, nc1 := pk.HSp/32, pk.H2p/32, pk.H1p/32
	// wrow is a lane's 16-byte load: region row n, columns col … col+7.
	wrow := func(off, ld, n, col int) []float64 {
		out := make([]float64, 8)
		for q := range out {
			out[q] = float64(pk.W[off+n*ld+col+q])
		}
		return out
	}
	xa := make([]laneBlock, NX)
	for lane := range 32 {
		g, t := lane/4, lane%4
		for r2 := range 2 {
			for s := range NX {
				for q := range 8 {
					if col := 32*s + 8*t + q; col < pk.HS {
						xa[s][lane][r2][q] = float64(x[g+8*r2][col])
					}
				}
			}
		}
	}
	// blockRelu: the lane values of the 32 neurons held by acc[0..3]
	// (tile j = p/2, e = p%2), plus add, relu'd (then rounded to fp32, as the
	// kernels' registers hold them).
	blockRelu := func(acc []cFrag, add func(lane, p int) float64) (v laneBlock) {
		for lane := range 32 {
			for r2 := range 2 {
				for q := range 8 {
					v[lane][r2][q] = float64(float32(math.Max(acc[q/2][lane][2*r2+q%2]+add(lane, q), 0)))
				}
			}
		}
		return v
	}
	acc2 := make([]cFrag, 4*NH2)
	for c := range nc1 {
		acc1 := make([]cFrag, 4)
		for j := range 4 {
			for lane := range 32 {
				g, t := lane/4, lane%4
				for e := range 2 {
					for r2 := range 2 {
						col := 32*c + 8*t + 2*j + e
						acc1[j][lane][2*r2+e] = float64(pk.PosT[p[g+8*r2]*pk.H1p+col] + pk.LH[lh*pk.H1p+col])
					}
				}
			}
		}
		for s := range NX {
			for j := range 4 {
				blockMMA(pk.DType, &acc1[j], &xa[s], func(lane int) []float64 {
					return wrow(0, pk.ld1, 32*c+8*j+lane/4, 32*s+8*(lane%4))
				})
			}
		}
		ha := blockRelu(acc1, func(int, int) float64 { return 0 })
		for j := range 4 * NH2 {
			blockMMA(pk.DType, &acc2[j], &ha, func(lane int) []float64 {
				return wrow(pk.off2, pk.ld2, 8*j+lane/4, 32*c+8*(lane%4))
			})
		}
	}
	acc3 := make([]cFrag, 4*NX)
	for c := range NH2 {
		ha := blockRelu(acc2[4*c:4*c+4], func(lane, q int) float64 { return float64(pk.Bias[32*c+8*(lane%4)+q]) })
		for j := range 4 * NX {
			blockMMA(pk.DType, &acc3[j], &ha, func(lane int) []float64 {
				return wrow(pk.off3, pk.ld3, 8*j+lane/4, 32*c+8*(lane%4))
			})
		}
	}
	out := make([][]float32, 16)
	for r := range out {
		out[r] = append([]float32(nil), x[r]...)
	}
	for lane := range 32 {
		g, t := lane/4, lane%4
		for r2 := range 2 {
			for s := range NX {
				for q := range 8 {
					col := 32*s + 8*t + q
					if col >= pk.HS {
						continue
					}
					y := float32(acc3[4*s+q/2][lane][2*r2+q%2]) + pk.Bias[pk.H2p+col]
					out[g+8*r2][col] = x[g+8*r2][col] + y
				}
			}
		}
	}
	return out
}

func randNet(rng *rand.Rand, L, NKV, HS, P, H1, H2 int) *ref.AlignNet {
	const DP, DL, DH = 32, 4, 8
	in := HS + DP + DL + DH
	vals := func(n int, scale float64) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32((2*rng.Float64() - 1) * scale)
		}
		return v
	}
	return &ref.AlignNet{
		Pos: vals(P*DP, 1), Layer: vals(L*DL, 1), Head: vals(NKV*DH, 1),
		W1: vals(H1*in, 1/math.Sqrt(float64(in))), B1: vals(H1, 0.1),
		W2: vals(H2*H1, 1/math.Sqrt(float64(H1))), B2: vals(H2, 0.1),
		W3: vals(HS*H2, 1/math.Sqrt(float64(H2))), B3: vals(HS, 0.1),
		P: P, DP: DP, DL: DL, DH: DH, H1: H1, H2: H2,
	}
}

// TestAlignPackEmulated: the packed network, run the way the kernels run it
// (fp16 operands for F16, float64 in place of the fp32 accumulators and of
// 3xTF32's operands for F32), matches ref.Align: to fp16 accuracy, and to
// float32 rounding for F32, for padded and unpadded shapes.
func TestAlignPackEmulated(t *testing.T) {
	rng := rand.New(rand.NewPCG(31, 32))
	for _, s := range []struct {
		L, NKV, HS, H1, H2 int
		dts                []DType
	}{
		{2, 3, 64, 256, 64, []DType{F16, F32}},  // distilgpt2 keys
		{1, 2, 64, 64, 128, []DType{F16, F32}},  // distilgpt2 values
		{3, 3, 64, 128, 128, []DType{F16, F32}}, // SmolLM2
		{2, 2, 30, 70, 17, []DType{F16, F32}},   // everything padded
		{1, 2, 64, 96, 256, []DType{F16}},       // fc2 at its largest
		{2, 1, 100, 33, 100, []DType{F16}},      // head at its largest
	} {
		for _, dt := range s.dts {
			t.Run(fmt.Sprintf("%v_HS%d_h%d_%d", dt, s.HS, s.H1, s.H2), func(t *testing.T) {
				const P = 40
				net := randNet(rng, s.L, s.NKV, s.HS, P, s.H1, s.H2)
				pk, err := PackAlign(net, dt)
				if err != nil {
					t.Fatal(err)
				}
				// One tile: 16 rows of layer l, head h, cache slots 0..15.
				l, h := s.L-1, s.NKV-1
				cache := make([]float32, s.L*16*s.NKV*s.HS)
				for i := range cache {
					cache[i] = float32(rng.NormFloat64())
				}
				slots, index := make([]int32, 16), make([]int32, 16)
				x := make([][]float32, 16)
				p := make([]int, 16)
				layerStride := 16 * s.NKV * s.HS
				for i := range 16 {
					slots[i], index[i] = int32(i), int32(rng.IntN(P))
					p[i] = int(index[i])
					off := l*layerStride + (i*s.NKV+h)*s.HS
					x[i] = cache[off : off+s.HS]
				}
				got := emulateAlignTile(pk, x, p, l*pk.Hn+h)
				want := append([]float32(nil), cache...)
				ref.Align(want, slots, index, net, s.L, s.NKV, s.HS, layerStride)
				var gotCorr, wantCorr []float32
				for i := range 16 {
					off := l*layerStride + (i*s.NKV+h)*s.HS
					for k := range s.HS {
						gotCorr = append(gotCorr, got[i][k]-x[i][k])
						wantCorr = append(wantCorr, want[off+k]-x[i][k])
					}
				}
				e := testenv.RelErr(gotCorr, wantCorr)
				t.Logf("correction: max|Δ|/max|ref| = %.3g", e)
				tol := 5e-3 // fp16 operands
				if dt == F32 {
					tol = 1e-5 // float32 rounding of the tables, activations and outputs
				}
				if !(e <= tol) {
					t.Errorf("correction off by %.3g relative (want ≤ %g)", e, tol)
				}
			})
		}
	}
}

// PackAlign refuses what no kernel instance takes, so that the caller keeps
// the fp32 network.
func TestAlignPackRefuses(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, s := range []struct{ HS, H2 int }{{129, 64}, {64, 257}, {128, 256}} {
		if _, err := PackAlign(randNet(rng, 1, 1, s.HS, 4, 32, s.H2), F16); err == nil {
			t.Errorf("head %d, fc2 %d: packed, want an error", s.HS, s.H2)
		}
	}
	for _, s := range []struct{ HS, H2 int }{{65, 64}, {64, 129}} {
		if _, err := PackAlign(randNet(rng, 1, 1, s.HS, 4, 32, s.H2), F32); err == nil {
			t.Errorf("f32, head %d, fc2 %d: packed, want an error", s.HS, s.H2)
		}
	}
}

// alignPsi is a permutation of every 32-column block.
func TestAlignPsi(t *testing.T) {
	seen := map[int]bool{}
	for c := range 64 {
		n := alignPsi(c)
		if n/32 != c/32 || seen[n] {
			t.Fatalf("alignPsi(%d) = %d: not a permutation within the block", c, n)
		}
		seen[n] = true
	}
	for _, k := range []int{32, 64, 96, 128, 256} {
		for _, dt := range []DType{F16, F32} {
			ld := alignLd(k, dt)
			if ld < k || ld*dt.Size()%128 != 64 {
				t.Errorf("alignLd(%d, %v) = %d", k, dt, ld)
			}
		}
	}
}
