package align

import (
	"fmt"

	"github.com/kvalign/kvalign/gpu"
)

// Device is a Pair of networks uploaded to a backend; it realigns a model's
// K/V stores after each eviction (it implements transformer.Realigner).
type Device struct {
	keys, values gpu.AlignNet
	bufs         []gpu.Buf
	packs        []*gpu.AlignPack
	be           gpu.Backend
}

// Upload copies both networks to be for a model whose weights are dt (the
// dtype asked of be.WeightDType), twice: as they are (fp32; kernels without
// a pack use them) and packed for the register-resident kernels
// (gpu.PackAlign) in the model's precision. Where the backend stores the
// model in fp16 the packs are fp16: the CUDA backend runs them on fp16
// tensor cores with fp32 accumulation (~5e-4 relative on the correction),
// the precision the model itself runs at. Otherwise they are fp32 and run
// in 3xTF32, within 1e-5 of PyTorch like the model. (H200, window 251:
// distilgpt2 10 + 8 µs a step in fp16, 46 + 30 in fp32, against 121 + 76
// for the unpacked kernel; SmolLM2 10 and 43 µs a network against 91.) A
// network shape no packed kernel takes keeps the unpacked path (fp32). The
// CPU backend runs the fp32 networks and ignores the packs.
func (p *Pair) Upload(be gpu.Backend, dt gpu.DType) (*Device, error) {
	return p.UploadAs(be, be.WeightDType(dt), true)
}

// UploadAs is Upload with the packs' dtype chosen by the caller (F16 or
// F32), or without packs (packed false: the kernels of the plain networks,
// for comparison).
func (p *Pair) UploadAs(be gpu.Backend, packDT gpu.DType, packed bool) (*Device, error) {
	d := &Device{be: be}
	var err error
	if d.keys, err = d.upload(p.Keys, packDT, packed); err == nil {
		d.values, err = d.upload(p.Values, packDT, packed)
	}
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("uploading the realignment networks: %w", err)
	}
	return d, be.Sync()
}

// Precision is the precision the networks' arithmetic keeps: F16 when both
// run from fp16 packs, else F32.
func (d *Device) Precision() gpu.DType {
	if d.keys.Pack != nil && d.values.Pack != nil && d.keys.Pack.DType == gpu.F16 && d.values.Pack.DType == gpu.F16 {
		return gpu.F16
	}
	return gpu.F32
}

// Packed says whether both networks have packs (the register-resident
// kernels run them where the backend has those).
func (d *Device) Packed() bool { return d.keys.Pack != nil && d.values.Pack != nil }

func (d *Device) upload(n *Network, packDT gpu.DType, packed bool) (gpu.AlignNet, error) {
	out := gpu.AlignNet{P: n.P, DP: n.DP, DL: n.DL, DH: n.DH, H1: n.H1, H2: n.H2}
	for _, t := range []struct {
		dst *gpu.Buf
		src []float32
	}{
		{&out.Pos, n.Pos}, {&out.Layer, n.Layer}, {&out.Head, n.Head},
		{&out.W1, n.W1}, {&out.B1, n.B1}, {&out.W2, n.W2}, {&out.B2, n.B2}, {&out.W3, n.W3}, {&out.B3, n.B3},
	} {
		b, err := d.be.Alloc(gpu.F32, len(t.src))
		if err != nil {
			return out, err
		}
		d.bufs = append(d.bufs, b)
		d.be.Upload(b, t.src)
		*t.dst = b
	}
	if !packed {
		return out, nil
	}
	if h, err := gpu.PackAlign(n.Ref(), packDT); err == nil { // else: a shape only the unpacked kernels take
		pk, err := h.Upload(d.be)
		if err != nil {
			return out, err
		}
		d.packs = append(d.packs, pk)
		out.Pack = pk
	}
	return out, nil
}

// Realign runs the key network over the K store and the value network over
// the V store, for every layer, listed entry and head: in one launch where
// the backend pairs them (gpu.AlignPairer), else one each.
func (d *Device) Realign(be gpu.Backend, K, V, slots, index gpu.Buf, p gpu.AlignParams) {
	if pr, ok := be.(gpu.AlignPairer); ok && pr.AlignPair(K, V, slots, index, &d.keys, &d.values, p) {
		return
	}
	be.Align(K, slots, index, &d.keys, p)
	be.Align(V, slots, index, &d.values, p)
}

// Close frees the networks. Safe to call twice.
func (d *Device) Close() {
	for _, b := range d.bufs {
		d.be.Free(b)
	}
	d.bufs = nil
	for _, p := range d.packs {
		p.Free(d.be)
	}
	d.packs = nil
}
