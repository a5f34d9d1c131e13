//go:build cuda && !nofused

package gpu

// #include "kvalign.h"
import "C"

import (
	"errors"
	"fmt"
	"unsafe"
)

// The CUDA backend's persistent decode kernel (gpu.Decoder, csrc/decode.cu).

var _ Decoder = (*CUDA)(nil)

// cudaDecodePlan holds what one kv_decode launch reads: the shape, the
// device table of layer pointers, the attention partials and the barrier
// counters (zero between launches).
type cudaDecodePlan struct {
	c                 *CUDA
	sh                C.kv_decode_shape
	table, part, sync Buf
	b                 DecodeBufs
}

// layerPointers is the number of pointers of a kv_decode_layer, in order.
const layerPointers = 14

func (c *CUDA) NewDecodePlan(sh DecodeShape, layers []DecodeLayer, b DecodeBufs) (DecodePlan, error) {
	const op = "decode"
	if c.failed() {
		return nil, c.err
	}
	if sh.B < 1 || sh.L < 1 || len(layers) != sh.L || sh.NKV < 1 || sh.NH%sh.NKV != 0 || sh.HS%2 != 0 {
		return nil, &Error{Op: op, Msg: fmt.Sprintf("invalid shape %+v with %d layers", sh, len(layers))}
	}
	if sh.Act != GeluAct && sh.Act != SwiGLUAct || sh.Norm != LayerNormKind && sh.Norm != RMSNormKind {
		return nil, &Error{Op: op, Msg: fmt.Sprintf("activation %d / norm %d not supported", sh.Act, sh.Norm)}
	}
	qkvw := (sh.NH + 2*sh.NKV) * sh.HS
	up := sh.FFN
	if sh.Act == SwiGLUAct {
		up = 2 * sh.FFN
	}
	kv := sh.Slots * sh.NKV * sh.HS
	check := func(name string, buf Buf, n int, optional bool, dts ...DType) error {
		if optional && buf.IsZero() {
			return nil
		}
		ok := buf.n >= n && buf.ptr != 0
		for _, d := range dts {
			if ok && buf.dt == d {
				return nil
			}
		}
		return &Error{Op: op, Msg: fmt.Sprintf("%s is a %v buffer of %d, want %v of %d", name, buf.dt, buf.n, dts, n)}
	}
	errs := []error{
		check("X", b.X, sh.B*sh.C, false, F32), check("QKV", b.QKV, sh.B*qkvw, false, F32),
		check("Act", b.Act, sh.B*sh.FFN, false, F32), check("Pos", b.Pos, sh.B, false, I32),
		check("Slots", b.Slots, sh.B, false, I32), check("Order", b.Order, sh.B*sh.MaxLen, false, I32),
		check("Lens", b.Lens, sh.B, false, I32),
	}
	ptrs := make([]uint64, 0, layerPointers*len(layers))
	for i, l := range layers {
		name := func(s string) string { return fmt.Sprintf("layer %d %s", i, s) }
		errs = append(errs,
			check(name("Norm1W"), l.Norm1W, sh.C, false, F16), check(name("Norm1B"), l.Norm1B, sh.C, true, F16),
			check(name("QKVW"), l.QKVW, qkvw*sh.C, false, F16), check(name("QKVB"), l.QKVB, qkvw, true, F16),
			check(name("OW"), l.OW, sh.C*sh.NH*sh.HS, false, F16), check(name("OB"), l.OB, sh.C, true, F16),
			check(name("Norm2W"), l.Norm2W, sh.C, false, F16), check(name("Norm2B"), l.Norm2B, sh.C, true, F16),
			check(name("UpW"), l.UpW, up*sh.C, false, F16), check(name("UpB"), l.UpB, up, true, F16),
			check(name("DownW"), l.DownW, sh.C*sh.FFN, false, F16), check(name("DownB"), l.DownB, sh.C, true, F16),
			check(name("K"), l.K, kv, false, F32), check(name("V"), l.V, kv, false, F32))
		for _, p := range []Buf{l.Norm1W, l.Norm1B, l.QKVW, l.QKVB, l.OW, l.OB, l.Norm2W, l.Norm2B, l.UpW, l.UpB, l.DownW, l.DownB, l.K, l.V} {
			ptrs = append(ptrs, uint64(p.ptr))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	p := &cudaDecodePlan{c: c, b: b, sh: C.kv_decode_shape{
		B: C.int(sh.B), L: C.int(sh.L), C: C.int(sh.C), NH: C.int(sh.NH), NKV: C.int(sh.NKV), HS: C.int(sh.HS),
		F: C.int(sh.FFN), S: C.int(sh.Slots), max_len: C.int(sh.MaxLen), eps: C.float(sh.Eps),
		rms: cFlag(sh.Norm == RMSNormKind), swiglu: cFlag(sh.Act == SwiGLUAct), theta: C.float(sh.Theta),
		shift: cFlag(sh.ShiftKeys && sh.Theta != 0),
	}}
	var partFloats, syncWords C.size_t
	var st C.kv_status
	c.run(op, func() C.kv_status {
		st = C.kv_decode_prepare(&p.sh, &partFloats, &syncWords)
		if st == C.kv_status(801) { // cudaErrorNotSupported: not an error of the backend
			return 0
		}
		return st
	})
	if c.err != nil {
		return nil, c.err
	}
	if st != 0 {
		return nil, ErrNoDecodePlan
	}
	var err error
	alloc := func(dst *Buf, dt DType, n int) {
		if err == nil {
			*dst, err = c.Alloc(dt, n)
		}
	}
	alloc(&p.table, I32, 2*len(ptrs))
	alloc(&p.part, F32, int(partFloats))
	alloc(&p.sync, I32, int(syncWords))
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("allocating the decode plan: %w", err)
	}
	c.UploadInts(p.table, unsafe.Slice((*int32)(unsafe.Pointer(&ptrs[0])), 2*len(ptrs)))
	c.UploadInts(p.sync, make([]int32, syncWords))
	if err := c.Sync(); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

func (p *cudaDecodePlan) Run() { p.run(Buf{}) }

// run enqueues the step; trace, when present, receives kv_decode's
// per-block phase timestamps (tests and benchmarks: decodeTrace).
func (p *cudaDecodePlan) run(trace Buf) {
	c, b := p.c, p.b
	c.run("decode", func() C.kv_status {
		return C.kv_decode(c.stream, &p.sh, (*C.kv_decode_layer)(dev(p.table)), devF32(b.X), devF32(b.QKV),
			devF32(b.Act), devF32(p.part), (*C.uint)(dev(p.sync)), devI32(b.Pos), devI32(b.Slots),
			devI32(b.Order), devI32(b.Lens), (*C.ulonglong)(dev(trace)))
	})
}

func (p *cudaDecodePlan) Close() error {
	for _, b := range []*Buf{&p.table, &p.part, &p.sync} {
		if !b.IsZero() {
			p.c.Free(*b)
			*b = Buf{}
		}
	}
	return nil
}
