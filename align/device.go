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
// dtype asked of be.WeightDType). The fp32 networks always go: they are
// small, and the realignment of an fp32 model must stay within 1e-5 of
// PyTorch. Where the backend stores the model in fp16 the networks also go
// as fp16 packs (gpu.PackAlign): the CUDA backend then runs them on fp16
// tensor cores (~1e-3 relative on the correction, far faster), the
// precision the model itself runs at. A network shape the packed kernel
// does not take keeps the fp32 path.
func (p *Pair) Upload(be gpu.Backend, dt gpu.DType) (*Device, error) {
	d := &Device{be: be}
	half := be.WeightDType(dt) == gpu.F16
	var err error
	if d.keys, err = d.upload(p.Keys, half); err == nil {
		d.values, err = d.upload(p.Values, half)
	}
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("uploading the realignment networks: %w", err)
	}
	return d, be.Sync()
}

// Precision is the dtype the networks run in: F16 when both have a pack.
func (d *Device) Precision() gpu.DType {
	if d.keys.Pack != nil && d.values.Pack != nil {
		return gpu.F16
	}
	return gpu.F32
}

func (d *Device) upload(n *Network, half bool) (gpu.AlignNet, error) {
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
	if half {
		if h, err := gpu.PackAlign(n.Ref(), gpu.F16); err == nil { // else: a shape only the fp32 kernels take
			pk, err := h.Upload(d.be)
			if err != nil {
				return out, err
			}
			d.packs = append(d.packs, pk)
			out.Pack = pk
		}
	}
	return out, nil
}

// Realign runs the key network over the K store and the value network over
// the V store, for every layer, listed entry and head, in one launch each.
func (d *Device) Realign(be gpu.Backend, K, V, slots, index gpu.Buf, p gpu.AlignParams) {
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
