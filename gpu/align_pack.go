package gpu

import (
	"fmt"

	"github.com/kvalign/kvalign/gpu/ref"
)

// AlignPack is a realignment network rearranged, once at upload, for the
// CUDA kernels that keep a row tile's activations in registers
// (csrc/align.cu: variant 6, fp16 tensor cores with fp32 accumulation, for
// fp16 models; variant 7, 3xTF32 tensor cores at fp32 accuracy, for fp32
// models). Two things change against AlignNet:
//
//   - fc1's embedding columns are gone. fc1(cat[x, Pos[p], Layer[l],
//     Head[h]]) = W1x·x + W1p·Pos[p] + W1l·Layer[l] + W1h·Head[h] + b1, and
//     only the first term depends on the cache: PosT[p] = W1p·Pos[p] and
//     LH[l·Hn+h] = W1l·Layer[l] + W1h·Head[h] + b1 are tables (computed in
//     float64, stored fp32) the kernel adds to its fc1 accumulators. fc1
//     shrinks from HS+DP+DL+DH = 108 inputs to HS = 64, and the per-row
//     gather of 44 embedding values becomes two 8-float loads per 32 outputs.
//   - The weights are W, one image of the kernel's shared memory: fc1's x
//     columns, fc2 and fc3, zero-padded and with rows permuted so that an
//     mma's accumulator fragment is, register for register, the next mma's
//     input fragment (see alignPsi), and rows padded so that 16-byte
//     shared-memory loads hit distinct banks (see alignLd). The block copies
//     it with 16-byte cp.async, no reshaping.
type AlignPack struct {
	DType DType // W's element type: F16 (variant 6) or F32 (variant 7)
	W     Buf   // the shared-memory image, alignPackLayout
	Bias  Buf   // F32 [H2p + HSp]: fc2's bias, then fc3's, zero-padded
	PosT  Buf   // F32 [P, H1p]: W1p·Pos[p]
	LH    Buf   // F32 [Ln·Hn, H1p]: W1l·Layer[l] + W1h·Head[h] + b1

	HS, HSp, H1p, H2p int // head size; padded head size, fc1 and fc2 widths
	P, Ln, Hn         int // window indices, layers and heads of the tables
}

// SmemBytes is the shared memory the kernel stages: W and Bias.
func (p *AlignPack) SmemBytes() int { return alignSmemBytes(p.HSp, p.H1p, p.H2p, p.DType) }

// Free releases the pack's buffers on be (the zero pack is fine).
func (p *AlignPack) Free(be Backend) {
	for _, b := range []Buf{p.W, p.Bias, p.PosT, p.LH} {
		if !b.IsZero() {
			be.Free(b)
		}
	}
	*p = AlignPack{}
}

// AlignPackHost is an AlignPack's contents on the host (PackAlign), in
// float32; Upload converts W to the pack's dtype.
type AlignPackHost struct {
	DType                     DType
	W, Bias, PosT, LH         []float32
	HS, HSp, H1p, H2p         int
	P, Ln, Hn                 int
	off2, off3, ld1, ld2, ld3 int
}

// The padded sizes the kernels are compiled for (template instances in
// csrc/align.cu): fp16 a head of up to 64 or 128 values with fc2 up to 64,
// 128 or 256 wide (not 128 with 256: more accumulators per lane than the
// registers take); fp32 (whose 3xTF32 operands take twice the registers) a
// head up to 64 with fc2 up to 128. fc1's width is a loop bound, any
// multiple of 32.
var (
	alignHSCaps = []int{64, 128}
	alignH2Caps = []int{64, 128, 256}
)

func alignInstance(HSp, H2p int, dt DType) bool {
	if dt == F16 {
		return HSp*H2p <= 128*128
	}
	return HSp == 64 && H2p <= 128
}

func padTo(n int, caps []int) (int, bool) {
	for _, c := range caps {
		if n <= c {
			return c, true
		}
	}
	return 0, false
}

// alignLd is the row stride (elements) of a k-wide weight matrix in the
// shared-memory image: the kernel's B-fragment load is 16 bytes per lane,
// lanes 4g..4g+3 reading one row's 64 contiguous bytes, and a quarter warp
// (rows g, g+1) must cover all 32 banks once, so the stride in bytes is
// ≡ 64 (mod 128). k is a multiple of 32.
func alignLd(k int, dt DType) int {
	esz := dt.Size()
	ld := k
	for ld*esz%128 != 64 {
		ld += 64 / esz
	}
	return ld
}

// alignPsi maps the logical output column c of a packed layer (the column
// an mma accumulator holds it in) to the network's neuron: within each block
// of 32, c = 16σ + 8h + 2t + e (lane t of a quad, tile h of a pair, k-step
// σ) holds neuron 8t + 4σ + 2h + e. Then lane t's accumulators of the four
// n-tiles of a 32-column block are neurons 32s + 8t … 32s + 8t + 7 in order:
// as the next layer's A fragments of the two k16 steps of that block they
// feed the k-slots whose weights are the same 8 contiguous columns of the
// next weight matrix (one 16-byte load), the bias and fc1 tables are read as
// two float4 each, and fc3's outputs land on the 8 contiguous head values the
// lane loaded as input (the residual add needs no shuffle).
func alignPsi(c int) int {
	s, r := c/32, c%32
	sigma, h, t, e := r/16, r/8%2, r/2%4, r%2
	return 32*s + 8*t + 4*sigma + 2*h + e
}

func alignSmemBytes(HSp, H1p, H2p int, dt DType) int {
	return alignPackWLen(HSp, H1p, H2p, dt)*dt.Size() + 4*(H2p+HSp)
}

// alignPackWLen is the number of elements of AlignPack.W.
func alignPackWLen(HSp, H1p, H2p int, dt DType) int {
	return H1p*alignLd(HSp, dt) + H2p*alignLd(H1p, dt) + HSp*alignLd(H2p, dt)
}

// PackAlign rearranges net (head size len(B3)) for the register-resident
// kernel in dtype dt (F16: variant 6; F32: variant 7). It fails for shapes
// no kernel instance takes; callers then keep the plain network (kv_align
// variant 4).
func PackAlign(net *ref.AlignNet, dt DType) (*AlignPackHost, error) {
	if dt != F16 && dt != F32 {
		return nil, fmt.Errorf("align pack: dtype %v (want f16 or f32)", dt)
	}
	HS, H1, H2, DP, DL, DH := len(net.B3), net.H1, net.H2, net.DP, net.DL, net.DH
	if HS == 0 || H1 <= 0 || H2 <= 0 || DL <= 0 || DH <= 0 || net.P <= 0 {
		return nil, fmt.Errorf("align pack: empty network (HS %d, H1 %d, H2 %d, DL %d, DH %d, P %d)", HS, H1, H2, DL, DH, net.P)
	}
	in := HS + DP + DL + DH
	Ln, Hn := len(net.Layer)/DL, len(net.Head)/DH
	if len(net.W1) < H1*in || len(net.B1) < H1 || len(net.W2) < H2*H1 || len(net.B2) < H2 ||
		len(net.W3) < HS*H2 || len(net.Pos) < net.P*DP {
		return nil, fmt.Errorf("align pack: network tensors shorter than their shapes")
	}
	HSp, ok1 := padTo(HS, alignHSCaps)
	H2p, ok2 := padTo(H2, alignH2Caps)
	if !ok1 || !ok2 || !alignInstance(HSp, H2p, dt) {
		return nil, fmt.Errorf("align pack: no %v kernel for head size %d with fc2 width %d", dt, HS, H2)
	}
	H1p := (H1 + 31) / 32 * 32
	h := &AlignPackHost{DType: dt, HS: HS, HSp: HSp, H1p: H1p, H2p: H2p, P: net.P, Ln: Ln, Hn: Hn,
		ld1: alignLd(HSp, dt), ld2: alignLd(H1p, dt), ld3: alignLd(H2p, dt)}
	h.off2 = H1p * h.ld1
	h.off3 = h.off2 + H2p*h.ld2
	h.W = make([]float32, h.off3+HSp*h.ld3)
	// region copies rows of w ([m, ldw], the first k columns used) into the
	// image at off, logical row r holding neuron alignPsi(r).
	region := func(off, ld, rows int, w []float32, m, k, ldw int) {
		for r := range rows {
			n := alignPsi(r)
			if n >= m {
				continue
			}
			copy(h.W[off+r*ld:off+r*ld+k], w[n*ldw:n*ldw+k])
		}
	}
	region(0, h.ld1, H1p, net.W1, H1, HS, in)
	region(h.off2, h.ld2, H2p, net.W2, H2, H1, H1)
	region(h.off3, h.ld3, HSp, net.W3, HS, H2, H2)

	h.Bias = make([]float32, H2p+HSp)
	copy(h.Bias, net.B2[:H2])
	copy(h.Bias[H2p:], net.B3[:HS])

	h.PosT = make([]float32, net.P*H1p)
	for p := range net.P {
		emb := net.Pos[p*DP : (p+1)*DP]
		for j := range H1 {
			h.PosT[p*H1p+j] = float32(dot(net.W1[j*in+HS:j*in+HS+DP], emb))
		}
	}
	h.LH = make([]float32, Ln*Hn*H1p)
	for l := range Ln {
		lemb := net.Layer[l*DL : (l+1)*DL]
		for hd := range Hn {
			hemb := net.Head[hd*DH : (hd+1)*DH]
			row := h.LH[(l*Hn+hd)*H1p:]
			for j := range H1 {
				w := net.W1[j*in : (j+1)*in]
				row[j] = float32(float64(net.B1[j]) + dot(w[HS+DP:HS+DP+DL], lemb) + dot(w[HS+DP+DL:], hemb))
			}
		}
	}
	return h, nil
}

// dot is a float64 dot product of equal-length float32 slices.
func dot(a, b []float32) float64 {
	var s float64
	for i, v := range a {
		s += float64(v) * float64(b[i])
	}
	return s
}

// Upload copies the pack to be (W converted to the pack's dtype).
func (h *AlignPackHost) Upload(be Backend) (*AlignPack, error) {
	p := &AlignPack{DType: h.DType, HS: h.HS, HSp: h.HSp, H1p: h.H1p, H2p: h.H2p, P: h.P, Ln: h.Ln, Hn: h.Hn}
	for _, t := range []struct {
		dst *Buf
		dt  DType
		src []float32
	}{{&p.W, h.DType, h.W}, {&p.Bias, F32, h.Bias}, {&p.PosT, F32, h.PosT}, {&p.LH, F32, h.LH}} {
		b, err := be.Alloc(t.dt, len(t.src))
		if err != nil {
			p.Free(be)
			return nil, err
		}
		*t.dst = b
		be.Upload(b, t.src)
	}
	return p, be.Err()
}
