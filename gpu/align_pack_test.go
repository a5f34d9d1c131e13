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

// The register-resident kernel (csrc/align.cu, variant 6) depends on index
// bookkeeping a GPU test can only report as "wrong": which neuron each
// packed row holds, which k-slots a lane's 16-byte loads feed, which
// accumulator becomes which next-layer fragment. emulateAlignTile runs the
// kernel's per-lane program on the CPU, with mma.sync m16n8k16's fragment
// layouts as the PTX ISA defines them, so the packing and the lane
// arithmetic are checked here against ref.Align on every CPU test run.

// mmaFrags is one warp's registers of an operand: [lane][register][half].
type aFrag [32][4][2]float64
type bFrag [32][2][2]float64
type cFrag [32][4]float64

// mma16816 is mma.sync.m16n8k16 (row.col, fp32 accumulate) over the warp:
// A[g][2t+e] = a[lane][0][e], A[g+8][2t+e] = a[lane][1][e], A[g][2t+8+e] =
// a[lane][2][e], A[g+8][2t+8+e] = a[lane][3][e]; B[2t+e][g] = b[lane][0][e],
// B[2t+8+e][g] = b[lane][1][e]; C[g][2t+e] = c[lane][e], C[g+8][2t+e] =
// c[lane][2+e] (g = lane/4, t = lane%4).
func mma16816(c *cFrag, a *aFrag, b *bFrag) {
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
	for lane := range 32 {
		g, t := lane/4, lane%4
		for e := range 2 {
			var s0, s1 float64
			for k := range 16 {
				s0 += A[g][k] * B[k][2*t+e]
				s1 += A[g+8][k] * B[k][2*t+e]
			}
			c[lane][e] += s0
			c[lane][2+e] += s1
		}
	}
}

func half(v float64) float64 { return float64(float16.Fromfloat32(float32(v)).Float32()) }

// emulateAlignTile is the kernel's work on one 16-row tile: x [16][HS] the
// rows' head vectors, p [16] their window indices, lh the tile's row of the
// LH table. It returns the realigned rows.
func emulateAlignTile(pk *AlignPackHost, x [][]float32, p []int, lh int) [][]float32 {
	NX, NH2, nc1 := pk.HSp/32, pk.H2p/32, pk.H1p/32
	W := func(off, ld, n, k int) float64 { return half(float64(pk.W[off+n*ld+k])) }
	// bLoad is a lane's 16-byte B load: row n, columns col..col+7, as the
	// fragments of the two k16 steps σ: b[σ][reg][e] = W[n][col+4σ+2reg+e].
	bLoad := func(dst *[2]bFrag, lane, off, ld, n, col int) {
		for sg := range 2 {
			for reg := range 2 {
				for e := range 2 {
					dst[sg][lane][reg][e] = W(off, ld, n, col+4*sg+2*reg+e)
				}
			}
		}
	}
	// Lane registers: the rows g and g+8 of x at columns 32s+8t+q.
	var xr [32][2][4][8]float64
	for lane := range 32 {
		g, t := lane/4, lane%4
		for r2 := range 2 {
			for s := range NX {
				for q := range 8 {
					if col := 32*s + 8*t + q; col < pk.HS {
						xr[lane][r2][s][q] = float64(x[g+8*r2][col])
					}
				}
			}
		}
	}
	var xa [4][2]aFrag // [s][σ]
	for lane := range 32 {
		for s := range NX {
			for sg := range 2 {
				for e := range 2 {
					xa[s][sg][lane][0][e] = half(xr[lane][0][s][4*sg+e])
					xa[s][sg][lane][1][e] = half(xr[lane][1][s][4*sg+e])
					xa[s][sg][lane][2][e] = half(xr[lane][0][s][4*sg+2+e])
					xa[s][sg][lane][3][e] = half(xr[lane][1][s][4*sg+2+e])
				}
			}
		}
	}
	// toA turns four accumulator tiles (plus an 8-float addend per row pair,
	// then relu, then fp16) into the A fragments of two k16 steps.
	toA := func(acc *[4]cFrag, add func(lane, r2, q int) float64) (ha [2]aFrag) {
		for lane := range 32 {
			for j := range 4 {
				for e := range 2 {
					for r2 := range 2 {
						acc[j][lane][2*r2+e] += add(lane, r2, 2*j+e)
					}
				}
			}
			relu := func(v float64) float64 { return half(math.Max(v, 0)) }
			for sg := range 2 {
				for e := range 2 {
					ha[sg][lane][0][e] = relu(acc[2*sg][lane][e])
					ha[sg][lane][1][e] = relu(acc[2*sg][lane][2+e])
					ha[sg][lane][2][e] = relu(acc[2*sg+1][lane][e])
					ha[sg][lane][3][e] = relu(acc[2*sg+1][lane][2+e])
				}
			}
		}
		return ha
	}
	acc2 := make([]cFrag, 4*NH2)
	var b [2]bFrag
	for c := range nc1 {
		var acc1 [4]cFrag
		for s := range NX {
			for j := range 4 {
				for lane := range 32 {
					g, t := lane/4, lane%4
					bLoad(&b, lane, 0, pk.ld1, 32*c+8*j+g, 32*s+8*t)
				}
				mma16816(&acc1[j], &xa[s][0], &b[0])
				mma16816(&acc1[j], &xa[s][1], &b[1])
			}
		}
		ha := toA(&acc1, func(lane, r2, q int) float64 {
			g, t := lane/4, lane%4
			col := 32*c + 8*t + q
			return float64(pk.PosT[p[g+8*r2]*pk.H1p+col]) + float64(pk.LH[lh*pk.H1p+col])
		})
		for j := range 4 * NH2 {
			for lane := range 32 {
				g, t := lane/4, lane%4
				bLoad(&b, lane, pk.off2, pk.ld2, 8*j+g, 32*c+8*t)
			}
			mma16816(&acc2[j], &ha[0], &b[0])
			mma16816(&acc2[j], &ha[1], &b[1])
		}
	}
	acc3 := make([]cFrag, 4*NX)
	for c := range NH2 {
		var four [4]cFrag
		copy(four[:], acc2[4*c:4*c+4])
		ha := toA(&four, func(lane, r2, q int) float64 { return float64(pk.Bias[32*c+8*(lane%4)+q]) })
		for j := range 4 * NX {
			for lane := range 32 {
				g, t := lane/4, lane%4
				bLoad(&b, lane, pk.off3, pk.ld3, 8*j+g, 32*c+8*t)
			}
			mma16816(&acc3[j], &ha[0], &b[0])
			mma16816(&acc3[j], &ha[1], &b[1])
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

// TestAlignPackEmulated: the packed network, run the way the kernel runs it
// (fp16 operands, float64 in place of the fp32 accumulators), matches
// ref.Align to fp16 accuracy, for padded and unpadded shapes.
func TestAlignPackEmulated(t *testing.T) {
	rng := rand.New(rand.NewPCG(31, 32))
	for _, s := range []struct{ L, NKV, HS, H1, H2 int }{
		{2, 3, 64, 256, 64},  // distilgpt2 keys
		{1, 2, 64, 64, 128},  // distilgpt2 values
		{3, 3, 64, 128, 128}, // SmolLM2
		{2, 2, 30, 70, 17},   // everything padded
		{1, 2, 64, 96, 256},  // fc2 at its largest
		{2, 1, 100, 33, 100}, // head at its largest
	} {
		t.Run(fmt.Sprintf("HS%d_h%d_%d", s.HS, s.H1, s.H2), func(t *testing.T) {
			const P = 40
			net := randNet(rng, s.L, s.NKV, s.HS, P, s.H1, s.H2)
			pk, err := PackAlign(net, F16)
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
			if e > 5e-3 || math.IsNaN(e) {
				t.Errorf("correction off by %.3g relative (fp16 operands: want ≤ 5e-3)", e)
			}
		})
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
	if _, err := PackAlign(randNet(rng, 1, 1, 64, 4, 32, 64), F32); err == nil {
		t.Error("f32 pack: want an error (no such kernel)")
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
