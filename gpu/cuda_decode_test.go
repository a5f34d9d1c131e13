//go:build cuda && !nofused

package gpu

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"testing"
)

// decodeCase is one persistent-decode test: a model shape, its batch and
// the number of cache entries each sequence attends to (the new one last).
type decodeCase struct {
	name                         string
	llama, shift                 bool
	L, C, NH, NKV, HS, F, maxLen int
	lens                         []int
}

func (dc decodeCase) shape() DecodeShape {
	sh := DecodeShape{B: len(dc.lens), L: dc.L, C: dc.C, NH: dc.NH, NKV: dc.NKV, HS: dc.HS, FFN: dc.F,
		Slots: len(dc.lens) * dc.maxLen, MaxLen: dc.maxLen, Eps: 1e-5, Norm: LayerNormKind, Act: GeluAct}
	if dc.llama {
		sh.Norm, sh.Act, sh.Theta, sh.ShiftKeys = RMSNormKind, SwiGLUAct, 10000, dc.shift
	}
	return sh
}

// decodeData is a decode case's host data: fp16-rounded weights (Llama
// without biases), caches full of earlier entries, the step's integers.
type decodeData struct {
	sh                      DecodeShape
	layers                  [][14][]float32 // DecodeLayer's fields in order (nil: absent)
	x                       []float32
	pos, slots, order, lens []int32
}

func newDecodeData(rng *rand.Rand, dc decodeCase) *decodeData {
	sh := dc.shape()
	d := &decodeData{sh: sh, x: randNormal(rng, sh.B*sh.C, 1, 0)}
	qkvw, up := (sh.NH+2*sh.NKV)*sh.HS, sh.FFN
	if dc.llama {
		up = 2 * sh.FFN
	}
	w := func(n int, scale, shift float32) []float32 { return asWeight(F16, randNormal(rng, n, scale, shift)) }
	bias := func(n int) []float32 {
		if dc.llama {
			return nil
		}
		return w(n, 0.05, 0)
	}
	kv := sh.Slots * sh.NKV * sh.HS
	for l := 0; l < sh.L; l++ {
		d.layers = append(d.layers, [14][]float32{
			w(sh.C, 0.1, 1), bias(sh.C), w(qkvw*sh.C, 0.05, 0), bias(qkvw), w(sh.C*sh.NH*sh.HS, 0.05, 0), bias(sh.C),
			w(sh.C, 0.1, 1), bias(sh.C), w(up*sh.C, 0.05, 0), bias(up), w(sh.C*sh.FFN, 0.05, 0), bias(sh.C),
			randNormal(rng, kv, 1, 0), randNormal(rng, kv, 1, 0),
		})
	}
	d.order = make([]int32, sh.B*sh.MaxLen)
	for b, n := range dc.lens {
		perm := rng.Perm(sh.MaxLen)
		for j := 0; j < n; j++ {
			d.order[b*sh.MaxLen+j] = int32(b*sh.MaxLen + perm[j])
		}
		d.slots = append(d.slots, d.order[b*sh.MaxLen+n-1])
		d.pos = append(d.pos, int32(n-1+rng.IntN(3000)))
		d.lens = append(d.lens, int32(n))
	}
	return d
}

// upload puts the data on be: the plan's layers and buffers.
func (d *decodeData) upload(tb testing.TB, be Backend) ([]DecodeLayer, DecodeBufs) {
	tb.Helper()
	sh := d.sh
	put := func(dt DType, v []float32) Buf {
		if v == nil {
			return Buf{}
		}
		b, err := be.Alloc(be.WeightDType(dt), len(v))
		if err != nil {
			tb.Fatal(err)
		}
		be.Upload(b, v)
		return b
	}
	ints := func(v []int32) Buf {
		b, err := be.Alloc(I32, len(v))
		if err != nil {
			tb.Fatal(err)
		}
		be.UploadInts(b, v)
		return b
	}
	var layers []DecodeLayer
	for _, t := range d.layers {
		var b [14]Buf
		for i, v := range t {
			dt := F16
			if i >= 12 {
				dt = F32 // the caches
			}
			b[i] = put(dt, v)
		}
		layers = append(layers, DecodeLayer{b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13]})
	}
	qkvw := (sh.NH + 2*sh.NKV) * sh.HS
	bufs := DecodeBufs{
		X: put(F32, d.x), QKV: put(F32, make([]float32, sh.B*qkvw)), Act: put(F32, make([]float32, sh.B*sh.FFN)),
		Pos: ints(d.pos), Slots: ints(d.slots), Order: ints(d.order), Lens: ints(d.lens),
	}
	if err := be.Sync(); err != nil {
		tb.Fatal(err)
	}
	return layers, bufs
}

// refDecode runs the step on be one operation at a time, as the runner
// does without a plan (what DecodePlan.Run must equal).
func refDecode(be Backend, sh DecodeShape, layers []DecodeLayer, b DecodeBufs) error {
	B, C, HS := sh.B, sh.C, sh.HS
	qkvw := (sh.NH + 2*sh.NKV) * HS
	alloc := func(n int) Buf {
		buf, _ := be.Alloc(F32, n)
		return buf
	}
	xn, att, up, act := alloc(B*C), alloc(B*sh.NH*HS), alloc(2*B*sh.FFN), alloc(B*sh.FFN)
	norm := func(w, nb Buf) {
		if sh.Norm == RMSNormKind {
			be.RMSNorm(xn, b.X, w, B, C, sh.Eps)
		} else {
			be.LayerNorm(xn, b.X, w, nb, B, C, sh.Eps)
		}
	}
	attn := AttnParams{B: B, T: 1, NH: sh.NH, NKV: sh.NKV, HS: HS, QStride: qkvw, MaxLen: sh.MaxLen}
	rot := sh.NH + sh.NKV
	if sh.ShiftKeys {
		attn.RopeTheta, rot = sh.Theta, sh.NH
	}
	for _, l := range layers {
		norm(l.Norm1W, l.Norm1B)
		be.MatMul(b.QKV, xn, l.QKVW, l.QKVB, B, C, qkvw, false)
		if sh.Theta != 0 {
			be.RoPE(b.QKV, b.Pos, B, rot, HS, qkvw, sh.Theta)
		}
		be.CacheStore(l.K, b.QKV.View(sh.NH*HS, B*qkvw-sh.NH*HS), b.Slots, B, sh.NKV*HS, qkvw)
		be.CacheStore(l.V, b.QKV.View((sh.NH+sh.NKV)*HS, B*qkvw-(sh.NH+sh.NKV)*HS), b.Slots, B, sh.NKV*HS, qkvw)
		be.Attention(att, b.QKV, l.K, l.V, b.Order, b.Lens, attn)
		be.MatMul(b.X, att, l.OW, l.OB, B, sh.NH*HS, C, true)
		norm(l.Norm2W, l.Norm2B)
		if sh.Act == SwiGLUAct {
			be.MatMul(up, xn, l.UpW, Buf{}, B, C, 2*sh.FFN, false)
			be.SiluMul(act, up, up.View(sh.FFN, 2*B*sh.FFN-sh.FFN), B, sh.FFN, 2*sh.FFN)
			be.MatMul(b.X, act, l.DownW, Buf{}, B, sh.FFN, C, true)
		} else {
			be.MatMul(up, xn, l.UpW, l.UpB, B, C, sh.FFN, false)
			be.GeluNew(up, B*sh.FFN)
			be.MatMul(b.X, up, l.DownW, l.DownB, B, sh.FFN, C, true)
		}
	}
	return be.Sync()
}

var decodeCases = []decodeCase{
	// Few output rows (qkv 128 < one block per SM): blocks without work.
	{name: "gpt2_tiny", L: 2, C: 64, NH: 4, NKV: 4, HS: 16, F: 256, maxLen: 40, lens: []int{40}},
	{name: "llama_tiny_gqa", llama: true, shift: true, L: 3, C: 64, NH: 4, NKV: 2, HS: 16, F: 96, maxLen: 33, lens: []int{7, 33}},
	// distilgpt2 and SmolLM2 layers: full cache, first token, mixed batches.
	// The GPT-2 fixture model's shape, as the runner uses it (cache 32).
	{name: "gpt2_fixture", L: 6, C: 256, NH: 4, NKV: 4, HS: 64, F: 1024, maxLen: 33, lens: []int{33}},
	{name: "distilgpt2_full", L: 6, C: 768, NH: 12, NKV: 12, HS: 64, F: 3072, maxLen: 256, lens: []int{256}},
	{name: "distilgpt2_b2", L: 2, C: 768, NH: 12, NKV: 12, HS: 64, F: 3072, maxLen: 256, lens: []int{1, 200}},
	{name: "distilgpt2_b4", L: 1, C: 768, NH: 12, NKV: 12, HS: 64, F: 3072, maxLen: 55, lens: []int{55, 3, 54, 20}},
	{name: "smollm2_shift", llama: true, shift: true, L: 30, C: 576, NH: 9, NKV: 3, HS: 64, F: 1536, maxLen: 256, lens: []int{256}},
	{name: "smollm2_noshift", llama: true, L: 4, C: 576, NH: 9, NKV: 3, HS: 64, F: 1536, maxLen: 256, lens: []int{129}},
	{name: "smollm2_b3_first", llama: true, shift: true, L: 2, C: 576, NH: 9, NKV: 3, HS: 64, F: 1536, maxLen: 64, lens: []int{1, 64, 9}},
}

// TestCUDADecodePlan: the persistent kernel against the same step run one
// CPU operation at a time, on fresh random weights and caches: the layers'
// output and every cache entry (only the new ones change). It runs the plan
// twice (the barrier counters must be back at zero) and once replayed from
// a captured graph.
func TestCUDADecodePlan(t *testing.T) {
	c := newTestCUDA(t)
	for i, dc := range decodeCases {
		if testing.Short() && dc.L*dc.C > 2000 {
			continue // memcheck runs: the small shapes
		}
		t.Run(dc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(41+i), 42))
			d := newDecodeData(rng, dc)
			cpu := NewCPU()
			cl, cb := d.upload(t, cpu)
			if err := refDecode(cpu, d.sh, cl, cb); err != nil {
				t.Fatal(err)
			}
			wantX := make([]float32, cb.X.Len())
			cpu.Download(wantX, cb.X)

			gl, gb := d.upload(t, c)
			poison(t, c, gb.QKV)
			poison(t, c, gb.Act)
			plan, err := c.NewDecodePlan(d.sh, gl, gb)
			if err != nil {
				t.Fatal(err)
			}
			defer plan.Close()
			tol := func(name string, got, want []float32) { compare(t, name, got, want, 2e-4, 2e-3) }
			for run := 0; run < 3; run++ {
				if run > 0 {
					c.Upload(gb.X, d.x)
				}
				if run == 2 {
					g, err := c.Capture(plan.Run)
					if err != nil {
						t.Fatal(err)
					}
					g.Run()
					g.Close()
				} else {
					plan.Run()
				}
				checkOK(t, c)
				tol(fmt.Sprintf("run %d x", run), download(t, c, gb.X), wantX)
			}
			for l := range gl {
				want := make([]float32, cl[l].K.Len())
				cpu.Download(want, cl[l].K)
				tol(fmt.Sprintf("layer %d K", l), download(t, c, gl[l].K), want)
				cpu.Download(want, cl[l].V)
				tol(fmt.Sprintf("layer %d V", l), download(t, c, gl[l].V), want)
			}
		})
	}
}

// TestCUDADecodePlanRefuses: shapes outside the kernel give ErrNoDecodePlan
// (the runner then runs the layers one operation at a time); wrong buffers
// give an error naming them.
func TestCUDADecodePlanRefuses(t *testing.T) {
	c := newTestCUDA(t)
	rng := rand.New(rand.NewPCG(43, 44))
	for _, dc := range []decodeCase{
		{name: "batch5", L: 1, C: 64, NH: 4, NKV: 4, HS: 16, F: 64, maxLen: 8, lens: []int{1, 2, 3, 4, 5}},
		{name: "group16", llama: true, L: 1, C: 256, NH: 16, NKV: 1, HS: 16, F: 64, maxLen: 8, lens: []int{3}},
		{name: "longcache", llama: true, L: 1, C: 64, NH: 4, NKV: 2, HS: 64, F: 64, maxLen: 1 << 14, lens: []int{3}},
	} {
		d := newDecodeData(rng, dc)
		gl, gb := d.upload(t, c)
		if _, err := c.NewDecodePlan(d.sh, gl, gb); !errors.Is(err, ErrNoDecodePlan) {
			t.Errorf("%s: err = %v, want ErrNoDecodePlan", dc.name, err)
		}
		checkOK(t, c)
	}
	d := newDecodeData(rng, decodeCases[0])
	gl, gb := d.upload(t, c)
	gl[1].OW = gl[1].OW.View(0, 10)
	if _, err := c.NewDecodePlan(d.sh, gl, gb); err == nil || errors.Is(err, ErrNoDecodePlan) {
		t.Errorf("short OW: err = %v, want a buffer error", err)
	}
	checkOK(t, c)
}

// BenchmarkCUDADecodePlan times one persistent decode step of the
// distilgpt2 and SmolLM2 layer stacks (caches of 255 entries + the new one)
// as a replayed graph, with each layer's weights its own (streamed from
// memory, not L2).
func BenchmarkCUDADecodePlan(b *testing.B) {
	c := newTestCUDA(b)
	var cases []decodeCase
	for _, dc := range decodeCases {
		if dc.name == "distilgpt2_full" || dc.name == "smollm2_shift" {
			cases = append(cases, dc)
		}
	}
	cases = append(cases, decodeCase{name: "smollm2_noshift", llama: true, L: 30, C: 576, NH: 9, NKV: 3, HS: 64, F: 1536, maxLen: 256, lens: []int{256}})
	for _, dc := range cases {
		b.Run(dc.name, func(b *testing.B) {
			d := newDecodeData(rand.New(rand.NewPCG(45, 46)), dc)
			gl, gb := d.upload(b, c)
			plan, err := c.NewDecodePlan(d.sh, gl, gb)
			if err != nil {
				b.Fatal(err)
			}
			defer plan.Close()
			sec := graphTime(b, c, 200, func(int) { plan.Run() })
			b.ReportMetric(sec*1e6, "µs/step")
			decodeTrace(b, c, plan.(*cudaDecodePlan), 5*dc.L)
		})
	}
}

// decodeTrace runs the plan once with kv_decode's trace and logs where a
// step's time goes, per phase kind averaged over the layers: the phase's
// length (from the previous phase's last arrival to its own), the barrier
// latency (last arrival → a waiting block released, median), the work
// split into staging the input, the product (attention: the scores) and
// the rest (medians; and the slowest block's whole work), and the blocks
// that were not yet waiting when released (their own copies or earlier
// work held them), with how late they were on average (µs).
func decodeTrace(b *testing.B, c *CUDA, p *cudaDecodePlan, phases int) {
	const maxBlocks = 1024
	const points = 5 // kv_decode's trace points of a phase
	words := maxBlocks * phases * points * 2
	buf := uploadInts(b, c, make([]int32, words))
	p.run(buf)
	raw := downloadInts(b, c, buf)
	c.Free(buf)
	ts := func(g, ph, k int) int64 {
		i := ((g*phases+ph)*points + k) * 2
		return int64(uint32(raw[i])) | int64(raw[i+1])<<32
	}
	G := 0
	for g := 0; g < maxBlocks; g++ {
		for ph := 0; ph < phases; ph++ {
			if ts(g, ph, 4) != 0 {
				G = g + 1
			}
		}
	}
	release := make([]int64, phases) // last arrival of each phase
	for ph := range release {
		for g := 0; g < G; g++ {
			release[ph] = max(release[ph], ts(g, ph, 4))
		}
	}
	type agg struct {
		n, late, layers                            int
		span, bar, stage, prod, tail, slow, lateNs float64
	}
	kinds := []string{"qkv", "attn", "out", "up", "down"}
	sum := make([]agg, 5)
	for ph := 1; ph < phases; ph++ {
		var bars, works, stages, prods, tails []float64
		a := &sum[ph%5]
		a.layers++
		a.span += float64(release[ph] - release[ph-1])
		for g := 0; g < G; g++ {
			if ts(g, ph, 4) == 0 {
				continue
			}
			bars = append(bars, float64(ts(g, ph, 1)-release[ph-1]))
			works = append(works, float64(ts(g, ph, 4)-ts(g, ph, 1)))
			stages = append(stages, float64(ts(g, ph, 2)-ts(g, ph, 1)))
			prods = append(prods, float64(ts(g, ph, 3)-ts(g, ph, 2)))
			tails = append(tails, float64(ts(g, ph, 4)-ts(g, ph, 3)))
			if late := ts(g, ph, 0) - release[ph-1]; late > 0 {
				a.late++
				a.lateNs += float64(late)
			}
		}
		for _, v := range [][]float64{bars, works, stages, prods, tails} {
			sort.Float64s(v)
		}
		med := func(v []float64) float64 { return v[len(v)/2] }
		a.n += len(works)
		a.bar += med(bars)
		a.stage += med(stages)
		a.prod += med(prods)
		a.tail += med(tails)
		a.slow += works[len(works)-1]
	}
	for k, a := range sum {
		if a.layers == 0 {
			continue
		}
		l := float64(a.layers)
		b.Logf("%-5s phase %.2f µs: barrier %.2f, stage %.2f, product %.2f, epilogue %.2f (slowest work %.2f); %.1f of %d blocks late by %.2f",
			kinds[k], a.span/l/1e3, a.bar/l/1e3, a.stage/l/1e3, a.prod/l/1e3, a.tail/l/1e3, a.slow/l/1e3,
			float64(a.late)/l, a.n/a.layers, a.lateNs/max(1, float64(a.late))/1e3)
	}
	b.Logf("step (first phase's release → last arrival): %.1f µs over %d blocks", float64(release[phases-1]-release[0])/1e3, G)
}
