package ref

import (
	"math"
	"math/rand/v2"
	"testing"
)

// randomAlignNet draws a network the way PyTorch initialises one:
// embeddings N(0,1), linear layers U(±1/sqrt(fan_in)).
func randomAlignNet(rng *rand.Rand, L, NKV, HS, P, DP, DL, DH, H1, H2 int) *AlignNet {
	normal := func(n int) []float32 {
		s := make([]float32, n)
		for i := range s {
			s[i] = float32(rng.NormFloat64())
		}
		return s
	}
	uniform := func(n, fanIn int) []float32 {
		s := make([]float32, n)
		bound := 1 / math.Sqrt(float64(fanIn))
		for i := range s {
			s[i] = float32((2*rng.Float64() - 1) * bound)
		}
		return s
	}
	in := HS + DP + DL + DH
	return &AlignNet{
		Pos: normal(P * DP), Layer: normal(L * DL), Head: normal(NKV * DH),
		W1: uniform(H1*in, in), B1: uniform(H1, in),
		W2: uniform(H2*H1, H1), B2: uniform(H2, H1),
		W3: uniform(HS*H2, H2), B3: uniform(HS, H2),
		P: P, DP: DP, DL: DL, DH: DH, H1: H1, H2: H2,
	}
}

// naiveAlignRow is the network written literally from its definition, with
// an explicit concatenation, as the oracle for Align's table-based version.
func naiveAlignRow(net *AlignNet, x []float32, pos, layer, head int) []float32 {
	HS := len(x)
	in := append([]float32(nil), x...)
	in = append(in, net.Pos[pos*net.DP:(pos+1)*net.DP]...)
	in = append(in, net.Layer[layer*net.DL:(layer+1)*net.DL]...)
	in = append(in, net.Head[head*net.DH:(head+1)*net.DH]...)
	linear := func(w, b []float32, v []float32, out int, relu bool) []float32 {
		res := make([]float32, out)
		for j := range out {
			s := float64(b[j])
			for k, vk := range v {
				s += float64(w[j*len(v)+k]) * float64(vk)
			}
			if relu && s < 0 {
				s = 0
			}
			res[j] = float32(s)
		}
		return res
	}
	h1 := linear(net.W1, net.B1, in, net.H1, true)
	h2 := linear(net.W2, net.B2, h1, net.H2, true)
	y := linear(net.W3, net.B3, h2, HS, false)
	for k := range y {
		y[k] += x[k]
	}
	return y
}

func TestAlignMatchesNaive(t *testing.T) {
	cases := []struct {
		name                        string
		L, NKV, HS, P, H1, H2, S, N int // S cache slots, N realigned entries
		pad                         int // extra floats between layers
	}{
		{"distilgpt2-like", 3, 12, 64, 256, 256, 64, 40, 17, 0},
		{"odd shapes", 2, 3, 7, 11, 5, 9, 13, 6, 5},
		{"single row", 1, 1, 64, 256, 128, 128, 4, 1, 3},
		{"no entries", 2, 2, 8, 4, 3, 3, 5, 0, 0},
	}
	for ci, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(ci), 42))
			net := randomAlignNet(rng, c.L, c.NKV, c.HS, c.P, 6, 3, 5, c.H1, c.H2)
			layerStride := c.S*c.NKV*c.HS + c.pad
			cache := make([]float32, c.L*layerStride)
			for i := range cache {
				cache[i] = float32(rng.NormFloat64() * 3)
			}
			orig := append([]float32(nil), cache...)
			perm := rng.Perm(c.S)
			slots := make([]int32, c.N)
			index := make([]int32, c.N)
			for i := range c.N {
				slots[i] = int32(perm[i])
				index[i] = int32(rng.IntN(c.P))
			}
			if c.N > 1 {
				index[0], index[1] = 0, int32(c.P-1) // both ends of the embedding table
			}

			want := append([]float32(nil), orig...)
			for l := range c.L {
				for i := range c.N {
					for h := range c.NKV {
						off := l*layerStride + int(slots[i])*c.NKV*c.HS + h*c.HS
						copy(want[off:off+c.HS], naiveAlignRow(net, orig[off:off+c.HS], int(index[i]), l, h))
					}
				}
			}
			Align(cache, slots, index, net, c.L, c.NKV, c.HS, layerStride)

			var maxDiff, maxRef float64
			reported := 0
			for i := range want {
				d := math.Abs(float64(cache[i] - want[i]))
				maxDiff = max(maxDiff, d)
				maxRef = max(maxRef, math.Abs(float64(want[i])))
				if d > 1e-5+1e-5*math.Abs(float64(want[i])) && reported < 5 {
					reported++
					t.Errorf("element %d: got %g, want %g (was %g)", i, cache[i], want[i], orig[i])
				}
			}
			t.Logf("max|Δ| = %.3g, max|ref| = %.3g", maxDiff, maxRef)
		})
	}
}

// TestAlignLeavesOtherRowsAlone checks the addressing: only the listed
// slots of each layer change, the padding between layers never does.
func TestAlignLeavesOtherRowsAlone(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	const L, NKV, HS, S, pad = 2, 2, 4, 6, 3
	net := randomAlignNet(rng, L, NKV, HS, 8, 2, 2, 2, 4, 4)
	for i := range net.B3 {
		net.B3[i] = 100 // every realigned value moves far from its old one
	}
	layerStride := S*NKV*HS + pad
	cache := make([]float32, L*layerStride)
	orig := append([]float32(nil), cache...)
	slots := []int32{4, 1}
	Align(cache, slots, []int32{3, 5}, net, L, NKV, HS, layerStride)
	for i := range cache {
		l, rest := i/layerStride, i%layerStride
		slot := rest / (NKV * HS)
		touched := rest < S*NKV*HS && (slot == 4 || slot == 1)
		if touched == (cache[i] == orig[i]) {
			t.Errorf("element %d (layer %d, slot %d): touched=%v but value %g → %g", i, l, slot, touched, orig[i], cache[i])
		}
	}
}

func BenchmarkAlign(b *testing.B) {
	for _, c := range []struct {
		name           string
		L, NKV, H1, H2 int
	}{
		{"distilgpt2-keys", 6, 12, 256, 64},
		{"smollm2", 30, 3, 128, 128},
	} {
		b.Run(c.name, func(b *testing.B) {
			const HS, P, window = 64, 256, 250
			rng := rand.New(rand.NewPCG(1, 2))
			net := randomAlignNet(rng, c.L, c.NKV, HS, P, 32, 4, 8, c.H1, c.H2)
			layerStride := window * c.NKV * HS
			cache := make([]float32, c.L*layerStride)
			for i := range cache {
				cache[i] = float32(rng.NormFloat64())
			}
			slots := make([]int32, window)
			index := make([]int32, window)
			for i := range window {
				slots[i], index[i] = int32(i), int32(i)
			}
			rows := c.L * window * c.NKV
			b.SetBytes(int64(rows * HS * 4 * 2)) // each row read and written
			b.ResetTimer()
			for range b.N {
				Align(cache, slots, index, net, c.L, c.NKV, HS, layerStride)
			}
			b.ReportMetric(float64(rows)*float64(b.N)/b.Elapsed().Seconds(), "rows/s")
		})
	}
}
