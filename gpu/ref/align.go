package ref

// AlignNet is a KV-Align realignment network's weights as plain slices, in
// the layout of the original PyTorch module (and of align.Network):
//
//	Pos   [P, DP]   emb_pos.weight     (window index embedding)
//	Layer [L, DL]   emb_blocks.weight  (layer embedding)
//	Head  [NKV, DH] emb_heads.weight   (kv head embedding)
//	W1 [H1, HS+DP+DL+DH], B1 [H1]      fc1
//	W2 [H2, H1],          B2 [H2]      fc2
//	W3 [HS, H2],          B3 [HS]      fc3
//
// Linear weights are row-major [out, in] like torch.nn.Linear.
type AlignNet struct {
	Pos, Layer, Head       []float32
	W1, B1, W2, B2, W3, B3 []float32
	P, DP, DL, DH, H1, H2  int
}

// Align replaces, for every layer l < L, list entry i < len(slots) and head
// h < NKV, the head vector x at
//
//	cache[l*layerStride + slots[i]*NKV*HS + h*HS : +HS]
//
// by the KV-Align network's output
//
//	x' = x + fc3(relu(fc2(relu(fc1(cat[x, Pos[index[i]], Layer[l], Head[h]])))))
//
// Rows are independent, so they are spread over GOMAXPROCS goroutines
// (dot64 and parallel live in ops.go).
// slots must be distinct (two rows writing one slot would race), index[i]
// must lie in [0, P), and the cache must hold every addressed row: the caller
// (align.Network.Check and the backend) validates these; here a violation
// panics like any out-of-range slice access.
//
// Precision: dot products accumulate in float64, and each layer's output is
// rounded to float32 as PyTorch stores it, so the result matches a float32
// PyTorch forward to about 1e-6 relative.
func Align(cache []float32, slots, index []int32, net *AlignNet, L, NKV, HS, layerStride int) {
	n := len(slots)
	rows := L * n * NKV
	if rows == 0 {
		return
	}
	if len(index) < n {
		panic("ref.Align: index shorter than slots")
	}
	t := newAlignTables(slots, index, net, L, NKV, HS)

	// A few thousand multiply-adds per row make goroutine start-up
	// negligible once a worker has a handful of rows.
	parallel(rows, 8, func(lo, hi int) { t.run(cache, lo, hi, layerStride) })
}

// alignTables holds one Align call's weights in float64 and the parts of
// fc1 that do not depend on x, computed once per call.
//
// fc1's input is [x, pos, layer, head], so fc1(in) = W1x·x + W1p·pos +
// W1l·layer + W1h·head + B1. Only the first term varies per row; the others
// take one of L·NKV (layer, head) pairs and one value per list entry, so
// precomputing them removes (DP+DL+DH)/(HS+DP+DL+DH) ≈ 40% of fc1's work.
// In float64 the changed summation order is far below float32 rounding.
type alignTables struct {
	slots           []int32
	NKV, HS, H1, H2 int
	n               int       // list entries
	w1x             []float64 // [H1, HS]: the x columns of W1
	w2              []float64 // [H2, H1]
	w3              []float64 // [HS, H2]
	b2, b3          []float64
	base            []float64 // [L*NKV, H1]: B1 + W1l·Layer[l] + W1h·Head[h]
	pos             []float64 // [n, H1]: W1p·Pos[index[i]]
}

func newAlignTables(slots, index []int32, net *AlignNet, L, NKV, HS int) *alignTables {
	H1, H2, DP, DL, DH := net.H1, net.H2, net.DP, net.DL, net.DH
	in := HS + DP + DL + DH
	n := len(slots)
	t := &alignTables{
		slots: slots, NKV: NKV, HS: HS, H1: H1, H2: H2, n: n,
		w1x:  make([]float64, H1*HS),
		w2:   widen(net.W2[:H2*H1]),
		w3:   widen(net.W3[:HS*H2]),
		b2:   widen(net.B2[:H2]),
		b3:   widen(net.B3[:HS]),
		base: make([]float64, L*NKV*H1),
		pos:  make([]float64, n*H1),
	}
	w1 := net.W1[:H1*in]
	for j := range H1 {
		row := w1[j*in : (j+1)*in]
		for k := range HS {
			t.w1x[j*HS+k] = float64(row[k])
		}
	}
	layerPart := make([]float64, H1)
	for l := range L {
		emb := net.Layer[l*DL : (l+1)*DL]
		for j := range H1 {
			layerPart[j] = dot64(w1[j*in+HS+DP:j*in+HS+DP+DL], emb) + float64(net.B1[j])
		}
		for h := range NKV {
			emb := net.Head[h*DH : (h+1)*DH]
			b := t.base[(l*NKV+h)*H1 : (l*NKV+h+1)*H1]
			for j := range H1 {
				b[j] = layerPart[j] + dot64(w1[j*in+HS+DP+DL:j*in+in], emb)
			}
		}
	}
	for i := range n {
		p := int(index[i])
		emb := net.Pos[p*DP : (p+1)*DP]
		out := t.pos[i*H1 : (i+1)*H1]
		for j := range H1 {
			out[j] = dot64(w1[j*in+HS:j*in+HS+DP], emb)
		}
	}
	return t
}

// alignBlock is how many rows run advances together: each weight loaded
// from memory then feeds that many multiply-adds, which is what limits a
// scalar matrix-vector loop (about 1.5× faster than one row at a time).
const alignBlock = 4

// run realigns rows [lo, hi) of the (l, i, h) enumeration, row r = (l·n + i)·NKV + h.
func (t *alignTables) run(cache []float32, lo, hi, layerStride int) {
	HS, H1, H2, NKV := t.HS, t.H1, t.H2, t.NKV
	x := make([]float64, alignBlock*HS)
	h1 := make([]float64, alignBlock*H1)
	h2 := make([]float64, alignBlock*H2)
	y := make([]float64, alignBlock*HS)
	var rows [alignBlock][]float32
	for r0 := lo; r0 < hi; r0 += alignBlock {
		nb := min(alignBlock, hi-r0)
		clear(x) // a short last block computes harmless zero rows
		for b := range nb {
			r := r0 + b
			h := r % NKV
			i := (r / NKV) % t.n
			l := r / (NKV * t.n)
			off := l*layerStride + int(t.slots[i])*NKV*HS + h*HS
			rows[b] = cache[off : off+HS]
			for k, v := range rows[b] {
				x[b*HS+k] = float64(v)
			}
			base := t.base[(l*NKV+h)*H1 : (l*NKV+h+1)*H1]
			pos := t.pos[i*H1 : (i+1)*H1]
			for j := range H1 {
				h1[b*H1+j] = base[j] + pos[j]
			}
		}
		matVecAdd4(h1, t.w1x, x, H1, HS)
		for k, v := range h1 {
			h1[k] = relu32(v)
		}
		for b := range alignBlock {
			copy(h2[b*H2:(b+1)*H2], t.b2)
			copy(y[b*HS:(b+1)*HS], t.b3)
		}
		matVecAdd4(h2, t.w2, h1, H2, H1)
		for k, v := range h2 {
			h2[k] = relu32(v)
		}
		matVecAdd4(y, t.w3, h2, HS, H2)
		for b := range nb {
			for k := range rows[b] {
				// PyTorch rounds fc3's output to float32 before the residual add.
				rows[b][k] += float32(y[b*HS+k])
			}
		}
	}
}

// matVecAdd4 adds w·x_b to acc_b for the alignBlock rows b of x [alignBlock,
// in] and acc [alignBlock, out]; w is [out, in].
func matVecAdd4(acc, w, x []float64, out, in int) {
	x0, x1, x2, x3 := x[:in], x[in:2*in], x[2*in:3*in], x[3*in:4*in]
	for j := range out {
		wr := w[j*in : (j+1)*in]
		x0, x1, x2, x3 := x0[:len(wr)], x1[:len(wr)], x2[:len(wr)], x3[:len(wr)]
		var s0, s1, s2, s3 float64
		for k, wk := range wr {
			s0 += wk * x0[k]
			s1 += wk * x1[k]
			s2 += wk * x2[k]
			s3 += wk * x3[k]
		}
		acc[j] += s0
		acc[out+j] += s1
		acc[2*out+j] += s2
		acc[3*out+j] += s3
	}
}

// relu32 is max(v, 0) rounded to float32, as PyTorch stores an activation.
func relu32(v float64) float64 {
	if v <= 0 {
		return 0
	}
	return float64(float32(v))
}

func widen(s []float32) []float64 {
	out := make([]float64, len(s))
	for i, v := range s {
		out[i] = float64(v)
	}
	return out
}
