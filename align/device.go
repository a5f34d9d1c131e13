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
	be           gpu.Backend
}

// Upload copies both networks to be (fp32: they are small and the
// realignment must stay within 1e-5 of PyTorch).
func (p *Pair) Upload(be gpu.Backend) (*Device, error) {
	d := &Device{be: be}
	var err error
	if d.keys, err = d.upload(p.Keys); err == nil {
		d.values, err = d.upload(p.Values)
	}
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("uploading the realignment networks: %w", err)
	}
	return d, be.Sync()
}

func (d *Device) upload(n *Network) (gpu.AlignNet, error) {
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
}
