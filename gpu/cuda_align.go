//go:build cuda

package gpu

/*
#include "kvalign.h"
*/
import "C"

// Align realigns cache entries in place with a KV-Align network (see
// Backend, AlignParams, ref.Align): every layer × listed slot × kv head in
// one launch of csrc/align.cu. With a pack (net.Pack, set by
// align.Pair.Upload) it runs the register-resident kernels: variant 6 for
// an fp16 pack (fp16 tensor cores, fp32 accumulation, ~5e-4 relative on the
// correction), variant 9 for an fp32 pack (3xTF32 tensor cores: each fp32
// operand split in two TF32 parts, ~2e-6 of the fp32 reference). Without a
// pack, or when the pack exceeds the device's shared memory, variant 4:
// 3xTF32 over 64-row blocks staged through shared memory, ~1e-6 too.
// Entries whose index lies outside [0, net.P) or whose slot is negative are
// left as they are; slots must be distinct and inside the cache (they are
// device data, so this is not checked here).
func (c *CUDA) Align(cache, slots, index Buf, net *AlignNet, p AlignParams) {
	c.align(cache, slots, index, net, p, 0)
}

// align runs one kernel variant (see kv_align, kv_align_packed): 0 the
// default (packedVariant of the pack's dtype when the network has a pack
// that fits the device's shared memory, else 4), 1 fp32 SIMT, 2 tensor
// cores 3xTF32 (fp32 accuracy), 3 tensor cores TF32 (~1e-4), 4 and 5 = 2
// and 3 with batched cache gathers (a few % faster), 6 and 7 the
// register-resident kernels over net.Pack (6: its dtype must be F16; 7:
// F32), 8 and 9 = 6 and 7 with the instructions reordered for more
// independent work per warp (bitwise the same results).
func (c *CUDA) align(cache, slots, index Buf, net *AlignNet, p AlignParams, variant int) {
	const op = "align"
	if variant == 0 {
		variant = 4
		if net != nil && net.Pack != nil && net.Pack.SmemBytes() <= c.smemOptin {
			variant = packedVariant(net.Pack.DType)
		}
	}
	switch variant {
	case 6, 8:
		c.alignPacked(cache, slots, index, net, p, F16, variant == 8)
		return
	case 7, 9:
		c.alignPacked(cache, slots, index, net, p, F32, variant == 9)
		return
	}
	if !c.need(op, net != nil, "no network") ||
		!c.need(op, p.Rows >= 0 && p.L >= 0 && p.NKV >= 0 && p.HS > 0 && p.LayerStride >= 0,
			"invalid shape Rows=%d L=%d NKV=%d HS=%d LayerStride=%d", p.Rows, p.L, p.NKV, p.HS, p.LayerStride) ||
		!c.need(op, net.P > 0 && net.DP >= 0 && net.DL >= 0 && net.DH >= 0 && net.H1 > 0 && net.H2 > 0,
			"invalid network shape P=%d DP=%d DL=%d DH=%d H1=%d H2=%d", net.P, net.DP, net.DL, net.DH, net.H1, net.H2) {
		return
	}
	in := p.HS + net.DP + net.DL + net.DH
	if !c.need(op, in <= C.KV_ALIGN_MAX_IN, "network input of %d values (HS+DP+DL+DH), the kernel takes at most %d", in, C.KV_ALIGN_MAX_IN) ||
		!c.needBuf(op, "slots", slots, p.Rows, I32) ||
		!c.needBuf(op, "index", index, p.Rows, I32) ||
		!c.needBuf(op, "net.Pos", net.Pos, net.P*net.DP, F32) ||
		!c.needBuf(op, "net.Layer", net.Layer, p.L*net.DL, F32) ||
		!c.needBuf(op, "net.Head", net.Head, p.NKV*net.DH, F32) ||
		!c.needBuf(op, "net.W1", net.W1, net.H1*in, F32) ||
		!c.needBuf(op, "net.B1", net.B1, net.H1, F32) ||
		!c.needBuf(op, "net.W2", net.W2, net.H2*net.H1, F32) ||
		!c.needBuf(op, "net.B2", net.B2, net.H2, F32) ||
		!c.needBuf(op, "net.W3", net.W3, p.HS*net.H2, F32) ||
		!c.needBuf(op, "net.B3", net.B3, p.HS, F32) {
		return
	}
	if !c.alignWork(op, cache, p) {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_align(c.stream, devF32(cache), devI32(slots), devI32(index),
			C.int(p.Rows), C.int(p.L), C.int(p.NKV), C.int(p.HS), C.longlong(p.LayerStride),
			devF32(net.Pos), C.int(net.P), C.int(net.DP), devF32(net.Layer), C.int(net.DL),
			devF32(net.Head), C.int(net.DH), devF32(net.W1), devF32(net.B1), devF32(net.W2),
			devF32(net.B2), devF32(net.W3), devF32(net.B3), C.int(net.H1), C.int(net.H2), C.int(variant))
	})
}

// packedVariant is the default variant for a pack of dtype dt. Measured on
// an H200 (window 251, graph-timed, µs for distilgpt2 keys / values /
// SmolLM2): v6 10.3 / 7.6 / 10.3, v8 9.7 / 7.6 / 10.4 (its gain is on the
// 8-chunk key network only, and it spills at 12 warps: v6 stays); v7 65.7 /
// 39.6 / 58.7, v9 46.1 / 30.0 / 42.8 (v4: 121 / 76 / 91).
func packedVariant(dt DType) int {
	if dt == F16 {
		return 6
	}
	return 9
}

// alignPacked is variants 6-9: kv_align_packed over net.Pack (dt F16: 6,
// tuned 8; F32: 7, tuned 9).
func (c *CUDA) alignPacked(cache, slots, index Buf, net *AlignNet, p AlignParams, dt DType, tuned bool) {
	const op = "align"
	if !c.need(op, net != nil && net.Pack != nil && net.Pack.DType == dt, "this variant needs an %v AlignPack (gpu.PackAlign)", dt) {
		return
	}
	c.alignPacks(op, []Buf{cache}, []*AlignPack{net.Pack}, slots, index, p, tuned)
}

// AlignPair realigns the K store with the key network and the V store with
// the value network in one launch, each thread block running one of them,
// where both have packs that one kernel instance takes (the same dtype and
// padded sizes but fc1's width) and the default variants would run them;
// otherwise it enqueues nothing and returns false (two Align calls do the
// same).
func (c *CUDA) AlignPair(K, V, slots, index Buf, keys, values *AlignNet, p AlignParams) bool {
	if keys == nil || values == nil || keys.Pack == nil || values.Pack == nil {
		return false
	}
	kp, vp := keys.Pack, values.Pack
	if kp.DType != vp.DType || kp.HSp != vp.HSp || kp.H2p != vp.H2p ||
		kp.SmemBytes() > c.smemOptin || vp.SmemBytes() > c.smemOptin {
		return false
	}
	c.alignPacks("align", []Buf{K, V}, []*AlignPack{kp, vp}, slots, index, p, packedVariant(kp.DType) == 9)
	return true
}

// alignPacks checks and launches kv_align_packed for network packs[n] over
// cache[n].
func (c *CUDA) alignPacks(op string, cache []Buf, packs []*AlignPack, slots, index Buf, p AlignParams, tuned bool) {
	if !c.need(op, p.Rows >= 0 && p.L >= 0 && p.NKV >= 0 && p.LayerStride >= 0,
		"invalid shape Rows=%d L=%d NKV=%d LayerStride=%d", p.Rows, p.L, p.NKV, p.LayerStride) ||
		!c.needBuf(op, "slots", slots, p.Rows, I32) ||
		!c.needBuf(op, "index", index, p.Rows, I32) {
		return
	}
	var nets [2]C.kv_align_net // one or two: no allocation per call
	for n, k := range packs {
		dt := k.DType
		if !c.need(op, p.HS == k.HS, "head size %d for a pack of head size %d", p.HS, k.HS) ||
			!c.need(op, p.L <= k.Ln && p.NKV <= k.Hn, "%d layers × %d heads, the pack has tables for %d × %d", p.L, p.NKV, k.Ln, k.Hn) ||
			!c.need(op, k.SmemBytes() <= c.smemOptin, "the pack needs %d bytes of shared memory, the device has %d", k.SmemBytes(), c.smemOptin) ||
			!c.needBuf(op, "pack.W", k.W, alignPackWLen(k.HSp, k.H1p, k.H2p, dt), dt) ||
			!c.needBuf(op, "pack.Bias", k.Bias, k.H2p+k.HSp, F32) ||
			!c.needBuf(op, "pack.PosT", k.PosT, k.P*k.H1p, F32) ||
			!c.needBuf(op, "pack.LH", k.LH, k.Ln*k.Hn*k.H1p, F32) {
			return
		}
		if !c.alignWork(op, cache[n], p) {
			return
		}
		nets[n] = C.kv_align_net{cache: devF32(cache[n]), w: dev(k.W), w_f16: cFlag(dt == F16), bias: devF32(k.Bias),
			post: devF32(k.PosT), lh: devF32(k.LH), P: C.int(k.P), Ln: C.int(k.Ln), Hn: C.int(k.Hn),
			HSp: C.int(k.HSp), H1p: C.int(k.H1p), H2p: C.int(k.H2p)}
	}
	c.run(op, func() C.kv_status {
		return C.kv_align_packed(c.stream, &nets[0], C.int(len(packs)), devI32(slots), devI32(index),
			C.int(p.Rows), C.int(p.L), C.int(p.NKV), C.int(p.HS), C.longlong(p.LayerStride), cFlag(tuned))
	})
}

// alignWork says whether an align call with valid arguments has rows to
// rewrite, checking that the cache holds them: the last layer's view must at
// least hold one head row per kv head.
func (c *CUDA) alignWork(op string, cache Buf, p AlignParams) bool {
	if p.Rows == 0 || p.L == 0 || p.NKV == 0 {
		return false
	}
	return c.needBuf(op, "cache", cache, (p.L-1)*p.LayerStride+p.NKV*p.HS, F32)
}
