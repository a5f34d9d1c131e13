package transformer

import (
	"errors"
	"fmt"
	"math"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/gpu/ref"
)

// Realigner rewrites cache entries in place after an eviction (KV-Align's
// key and value networks, package align). K and V are the whole stores
// [L, Slots, NKV, HS]; slots and index list p.Rows entries.
type Realigner interface {
	Realign(be gpu.Backend, K, V, slots, index gpu.Buf, p gpu.AlignParams)
}

// RunnerOptions sizes a Runner.
type RunnerOptions struct {
	B      int // sequences
	MaxT   int // most new tokens per sequence in one step
	MaxLen int // most cache entries a sequence attends to
	// ShiftKeys caches Llama keys before RoPE and rotates key j at position
	// j when attention reads it (StreamingLLM's position shift); queries are
	// rotated at the position given with them.
	ShiftKeys bool
	MaxBan    int // most banned tokens per sequence when sampling
	DecodeKernel
}

// DecodeKernel picks how one-token steps run where the backend has a
// choice (the zero value: the fastest measured, the fused chain).
type DecodeKernel struct {
	// Persistent runs one-token steps as the backend's persistent decode
	// kernel where it has one that takes the model (gpu.Decoder: CUDA, fp16
	// weights). Opt-in: on an H100 it is still slower than the launch chain
	// of fused kernels (docs/PERF.md, version 7).
	Persistent bool
	// Unfolded keeps the attention output projection of one-token steps a
	// launch of its own where the backend could fold it into the attention
	// kernel (gpu.Fused.AttentionOutProj with MLPAccSum): for comparisons.
	Unfolded bool
	// Unblocked keeps the q|k|v product a launch of its own where the
	// backend could fold it into that attention (gpu.AttentionBlocker):
	// three launches a layer instead of two, for comparisons.
	Unblocked bool
	// ScreenHead runs the LM head and the sampling of a sampled one-token
	// step as one screened operation where the backend has it
	// (gpu.HeadSampler: the same tokens from about half the head's bytes,
	// computing only the logits that could be drawn; Logits then refuses).
	// Opt-in: on an H100 it is level with the full head for SmolLM2 and
	// slower for distilgpt2 (docs/PERF.md, version 28).
	ScreenHead bool
	// FixedPlacement keeps the step's state buffers where they were laid
	// out instead of timing the one-token step with each moved by 64 KB
	// (placeState): for measuring the placement itself.
	FixedPlacement bool
}

// Runner holds the state of B sequences of one Model: activations for up to
// B·MaxT rows, the K/V stores, and the per-step integers (token ids,
// positions, slots, logical order, lengths, …), staged in pinned host memory
// and sent to the device in one transfer per step, ahead of the step (a
// decode step is one CUDA graph that reads them from the device).
type Runner struct {
	m   *Model
	be  gpu.Backend
	opt RunnerOptions
	// Slots per layer of the K/V stores (B·MaxLen).
	Slots int
	K, V  gpu.Buf // [L, Slots, NKV, HS]

	x, xn, qkv, att, up, act, logits, nll gpu.Buf
	// acc: one-token steps' accumulators, each [B, C] int64 as I32 pairs
	// in fixed point, two for each parity of layers: the folded
	// attention's (gpu.Fused.AttentionOutProj), then the MLP's (MLPAcc);
	// zero between steps.
	acc gpu.Buf
	// x … acc and ints below are views into two arenas (F32, I32), each
	// at one of two places 64 KB apart, chosen by timing (placement.go).
	arenas    []gpu.Buf
	slots     []stateSlot
	placement Placement

	// stage is the host side of the int block, twice: steps take the two
	// in turn, so the host stages one step while the device may still be
	// reading the other's; ints holds the device side of both (block p at
	// p·lay.total), each copied ahead of the step that reads it
	// (Backend.CopyInAhead). A step that samples writes its picks into the
	// token slots of the other block, on both sides: the next step reads
	// them on the device when it is chained (Step.Chained), the host reads
	// them after waiting.
	stage [2]gpu.HostInts
	ints  gpu.Buf
	lay   intLayout
	// events[p] is recorded after each step that reads stage[p]; queued[p]:
	// that step has not been waited for, so stage[p] must not be restaged.
	events [2]gpu.Event
	queued [2]bool
	// par is the parity of the next step (last.par: of the last one).
	par int
	// sampled: the last step drew tokens; chained: it took as its tokens
	// those the step before drew.
	sampled, chained bool
	picks            []int32
	// succ is the 2-gram memory Sampling.NoRepeat bans from (zero until
	// ResetSuccessors); succBufs are its buffers.
	succ     gpu.Successors
	succBufs []gpu.Buf
	realign  Realigner
	// plan runs the layers of one-token steps as one persistent kernel
	// (gpu.Decoder), when asked for and the backend has one for the model:
	// one for each int block.
	plan   [2]gpu.DecodePlan
	graphs map[stepShape]gpu.Replay
	last   stepShape // the shape of the last step run
	bufs   []gpu.Buf
}

// intLayout is where each step input lives inside the int block.
type intLayout struct {
	tokens, pos, slots, targets, order, lens, counter, banned, alignSlots, alignIndex int
	total                                                                             int
}

// NewRunner allocates a Runner's buffers on the model's backend.
func NewRunner(m *Model, opt RunnerOptions) (*Runner, error) {
	if opt.B < 1 || opt.MaxT < 1 || opt.MaxLen < opt.MaxT {
		return nil, fmt.Errorf("runner: invalid sizes B=%d MaxT=%d MaxLen=%d", opt.B, opt.MaxT, opt.MaxLen)
	}
	if opt.MaxBan < 1 {
		opt.MaxBan = 1
	}
	if opt.ScreenHead {
		if err := m.screenHead(); err != nil {
			return nil, err
		}
	}
	cfg := m.Cfg
	r := &Runner{m: m, be: m.Be, opt: opt, graphs: map[stepShape]gpu.Replay{}}
	N := opt.B * opt.MaxT
	r.Slots = opt.B * opt.MaxLen
	kvSize := cfg.NLayer * r.Slots * cfg.NKV * cfg.HS
	alloc := func(dst *gpu.Buf, dt gpu.DType, n int) error {
		b, err := m.Be.Alloc(dt, n)
		if err != nil {
			return err
		}
		*dst = b
		r.bufs = append(r.bufs, b)
		return nil
	}
	L := &r.lay
	next := func(n int) int { o := L.total; L.total += n; return o }
	L.tokens, L.pos, L.slots, L.targets = next(N), next(N), next(N), next(N)
	L.order, L.lens, L.counter = next(opt.B*opt.MaxLen), next(opt.B), next(opt.B)
	L.banned = next(opt.B * opt.MaxBan)
	L.alignSlots, L.alignIndex = next(opt.B*opt.MaxLen), next(opt.B*opt.MaxLen)
	// The step's state, in the order placeState tries moving it (the
	// accumulators first: the largest effect measured).
	r.slots = []stateSlot{
		{name: "acc", dst: &r.acc, dt: gpu.I32, n: 4 * 2 * opt.B * cfg.C},
		{name: "x", dst: &r.x, dt: gpu.F32, n: N * cfg.C}, {name: "xn", dst: &r.xn, dt: gpu.F32, n: N * cfg.C},
		{name: "att", dst: &r.att, dt: gpu.F32, n: N * cfg.NH * cfg.HS},
		{name: "qkv", dst: &r.qkv, dt: gpu.F32, n: N * cfg.QKVWidth()},
		{name: "logits", dst: &r.logits, dt: gpu.F32, n: N * cfg.VocabSize},
		{name: "ints", dst: &r.ints, dt: gpu.I32, n: 2 * L.total},
		{name: "up", dst: &r.up, dt: gpu.F32, n: N * cfg.UpWidth()}, {name: "act", dst: &r.act, dt: gpu.F32, n: N * cfg.FFN},
		{name: "nll", dst: &r.nll, dt: gpu.F32, n: N},
	}
	err := alloc(&r.K, gpu.F32, kvSize)
	if err == nil {
		err = alloc(&r.V, gpu.F32, kvSize)
	}
	if err == nil {
		err = r.allocState()
	}
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("allocating runner state (B=%d, %d rows, %d cache slots): %w", opt.B, N, r.Slots, err)
	}
	for p := range r.stage {
		if r.stage[p], err = m.Be.NewHostInts(L.total); err != nil {
			r.Close()
			return nil, err
		}
		if r.events[p], err = m.Be.NewEvent(); err != nil {
			r.Close()
			return nil, err
		}
	}
	r.picks = make([]int32, opt.B)
	for p := range r.plan {
		if r.plan[p], err = r.newDecodePlan(p); err != nil {
			r.Close()
			return nil, err
		}
	}
	if !opt.FixedPlacement {
		if err := r.placeState(); err != nil {
			r.Close()
			return nil, err
		}
	}
	return r, nil
}

// newDecodePlan prepares the persistent decode kernel for one-token steps
// when asked for and the backend has one that takes this model (fp16
// weights); nil when not, and the layers then run one operation at a time.
func (r *Runner) newDecodePlan(par int) (gpu.DecodePlan, error) {
	dec, ok := r.be.(gpu.Decoder)
	cfg, o := r.m.Cfg, r.opt
	if !ok || !o.Persistent || r.m.all.DType() != gpu.F16 {
		return nil, nil
	}
	sh := gpu.DecodeShape{B: o.B, L: cfg.NLayer, C: cfg.C, NH: cfg.NH, NKV: cfg.NKV, HS: cfg.HS, FFN: cfg.FFN,
		Slots: r.Slots, MaxLen: o.MaxLen, Eps: cfg.Eps, Norm: r.normKind(), Act: gpu.GeluAct}
	if cfg.Family == Llama {
		sh.Act, sh.Theta, sh.ShiftKeys = gpu.SwiGLUAct, float32(cfg.RopeTheta), o.ShiftKeys
	}
	layerSize := r.Slots * cfg.NKV * cfg.HS
	layers := make([]gpu.DecodeLayer, cfg.NLayer)
	for l, lw := range r.m.w.layers {
		layers[l] = gpu.DecodeLayer{Norm1W: lw.norm1W, Norm1B: lw.norm1B, QKVW: lw.qkvW, QKVB: lw.qkvB, OW: lw.oW, OB: lw.oB,
			Norm2W: lw.norm2W, Norm2B: lw.norm2B, UpW: lw.upW, UpB: lw.upB, DownW: lw.downW, DownB: lw.downB,
			K: r.K.View(l*layerSize, layerSize), V: r.V.View(l*layerSize, layerSize)}
	}
	L := r.lay
	plan, err := dec.NewDecodePlan(sh, layers, gpu.DecodeBufs{
		X: r.x, QKV: r.qkv, Act: r.act, Pos: r.view(par, L.pos, o.B), Slots: r.view(par, L.slots, o.B),
		Order: r.view(par, L.order, o.B*o.MaxLen), Lens: r.view(par, L.lens, o.B)})
	if errors.Is(err, gpu.ErrNoDecodePlan) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("preparing the decode kernel: %w", err)
	}
	return plan, nil
}

// ResetSuccessors sets the 2-gram memory that Sampling.NoRepeat bans from:
// for sequence b, the pairs of pairs[b] in order (a pair already kept is
// not added again), each token keeping its keep most recent successors,
// with room for records more picks. It replaces any earlier memory.
func (r *Runner) ResetSuccessors(keep int, pairs [][][2]int32, records int) error {
	B, V := r.opt.B, r.m.Cfg.VocabSize
	if keep < 1 || len(pairs) != B || records < 0 {
		return fmt.Errorf("runner: a 2-gram memory of %d successors a token for %d sequences (want ≥ 1 and %d)", keep, len(pairs), B)
	}
	if err := r.sync(); err != nil {
		return err
	}
	// A record takes a page at most, and no ring takes more than dirs.
	dirs := gpu.SuccessorDirs(keep)
	initial := 1
	for _, ps := range pairs {
		initial += len(ps)
	}
	n := min(initial+records, B*V*dirs)
	h := ref.Successors{Count: make([]int32, B*V), Dir: make([]int32, B*V*dirs), Pages: make([]int32, 32*min(initial, n)),
		Used: make([]int32, 1), Keep: keep, Dirs: dirs}
	for b, ps := range pairs {
		for _, p := range ps {
			if p[0] < 0 || int(p[0]) >= V || p[1] < 0 || int(p[1]) >= V {
				return fmt.Errorf("runner: 2-gram (%d, %d) outside the vocabulary of %d", p[0], p[1], V)
			}
			if !h.Contains(b, V, p[0], p[1]) {
				h.Record(b, V, p[0], p[1])
			}
		}
	}
	// New buffers when the sizes change; the captured steps that sample
	// from the old ones go with them.
	m := &r.succ
	if m.IsZero() || m.Keep != keep || m.Pages.Len() < 32*n {
		r.freeSuccessors()
		var err error
		for _, a := range []struct {
			dst *gpu.Buf
			n   int
		}{{&m.Count, len(h.Count)}, {&m.Dir, len(h.Dir)}, {&m.Pages, 32 * n}, {&m.Used, 1}} {
			if *a.dst, err = r.be.Alloc(gpu.I32, a.n); err != nil {
				r.freeSuccessors()
				return fmt.Errorf("allocating the 2-gram memory (%d successors a token, %d pages): %w", keep, n, err)
			}
			r.succBufs = append(r.succBufs, *a.dst)
		}
		m.Keep = keep
	}
	r.be.UploadInts(m.Count, h.Count)
	r.be.UploadInts(m.Dir, h.Dir)
	r.be.UploadInts(m.Pages, h.Pages) // the pages the pairs took; the rest are written before they are read
	r.be.UploadInts(m.Used, h.Used)
	return r.be.Err()
}

// freeSuccessors frees the 2-gram memory and the steps captured with it.
func (r *Runner) freeSuccessors() {
	if len(r.succBufs) == 0 {
		return
	}
	for k, g := range r.graphs {
		if k.noRepeat {
			g.Close()
			delete(r.graphs, k)
		}
	}
	for _, b := range r.succBufs {
		r.be.Free(b)
	}
	r.succBufs, r.succ = nil, gpu.Successors{}
}

// Persistent reports whether one-token steps run as one persistent kernel.
func (r *Runner) Persistent() bool { return r.plan[0] != nil }

// SetRealigner installs the networks Step.Align uses.
func (r *Runner) SetRealigner(a Realigner) { r.realign = a }

// Options returns the sizes the Runner was made with.
func (r *Runner) Options() RunnerOptions { return r.opt }

// Close frees the Runner's buffers and graphs. Safe to call twice.
func (r *Runner) Close() {
	for k, g := range r.graphs {
		g.Close()
		delete(r.graphs, k)
	}
	for p, plan := range r.plan {
		if plan != nil {
			plan.Close()
			r.plan[p] = nil
		}
	}
	r.freeSuccessors()
	for _, b := range r.bufs {
		r.be.Free(b)
	}
	r.bufs = nil
	for p := range r.stage {
		if r.stage[p] != nil {
			r.stage[p].Close()
			r.stage[p] = nil
		}
		if r.events[p] != nil {
			r.events[p].Close()
			r.events[p] = nil
		}
	}
}

// Logits selects which rows get logits.
type Logits int

const (
	LastRow Logits = iota // the last new row of each sequence: logits [B, V]
	AllRows               // every row: logits [B·T, V]
	NoLogits
)

// Sampling asks a step to draw the next token of each sequence on the device.
type Sampling struct {
	TopK    int
	Seed    uint64
	Counter []int32   // [B] random-stream position of each sequence
	Banned  [][]int32 // per sequence, tokens that must not be drawn
	// NoRepeat also bans every token that would repeat a 2-gram, from the
	// memory on the device (ResetSuccessors), which records each pick.
	NoRepeat bool
}

// Step is one forward pass over T new tokens of each of the B sequences.
type Step struct {
	T                  int
	Tokens, Pos, Slots []int32   // [B·T]: ids, positions, the slots their K/V go to
	Order              [][]int32 // per sequence: slots of all entries it attends to, in logical order, new ones last
	// AlignSlots/AlignIndex list entries to realign before the forward pass
	// (same rows for every layer and head); nil for none.
	AlignSlots, AlignIndex []int32
	Logits                 Logits
	Targets                []int32 // one per logits row: also compute each row's NLL of its target
	Sample                 *Sampling
	// Graph replays the step as a captured CUDA graph (decode steps whose
	// shape repeats); the first step of a shape captures it.
	Graph bool
	// Chained steps (T = 1) take as tokens those the previous step drew,
	// on the device: Tokens is not read, and the step can be queued before
	// the host has seen them.
	Chained bool
}

type stepShape struct {
	T, alignRows int
	logits       Logits
	nll          bool
	topK         int
	seed         uint64
	noRepeat     bool
	par          int // which stage block the step reads
}

// Run enqueues a step without waiting for it, once the step two before it,
// which read the same stage block, has run. Results are read with Logits,
// NLL and Sampled (which wait), or Drawn.
func (r *Runner) Run(s *Step) error {
	p := r.par
	if err := r.waitStage(p); err != nil {
		return err
	}
	// The last step's picks land in this block's token slots: tokens
	// given by the host go in after them.
	if r.sampled && !s.Chained {
		if err := r.waitStage(1 - p); err != nil {
			return err
		}
	}
	if err := r.stageInputs(s, r.stage[p].Ints()); err != nil {
		return err
	}
	// The inputs go to the device now, while the step before may still
	// run (its int block is the other one); a chained step's tokens are
	// there already, or will be: the step before writes them (the block
	// starts with the tokens).
	from := 0
	if s.Chained {
		from = r.lay.pos
	}
	r.be.CopyInAhead(r.ints.View(p*r.lay.total, r.lay.total), r.stage[p], from, r.lay.total-from)
	shape := stepShape{T: s.T, alignRows: len(s.AlignSlots), logits: s.Logits, nll: s.Targets != nil, par: p}
	if s.Sample != nil {
		shape.topK, shape.seed, shape.noRepeat = s.Sample.TopK, s.Sample.Seed, s.Sample.NoRepeat
	}
	if s.Graph {
		g, ok := r.graphs[shape]
		if !ok {
			var err error
			g, err = r.be.Capture(func() { r.enqueue(shape) })
			if err != nil {
				return fmt.Errorf("capturing the decode step: %w", err)
			}
			r.graphs[shape] = g
		}
		g.Run()
	} else {
		r.enqueue(shape)
	}
	r.events[p].Record()
	r.queued[p] = true
	r.last, r.par = shape, 1-p
	r.sampled, r.chained = s.Sample != nil, s.Chained
	return r.be.Err()
}

// waitStage waits for the step that last read stage block p.
func (r *Runner) waitStage(p int) error {
	if !r.queued[p] {
		return r.be.Err()
	}
	r.queued[p] = false
	return r.events[p].Wait()
}

// sync waits for every step.
func (r *Runner) sync() error {
	r.queued = [2]bool{}
	return r.be.Sync()
}

func (r *Runner) stageInputs(s *Step, in []int32) error {
	o := r.opt
	N := o.B * s.T
	if s.T < 1 || s.T > o.MaxT || !s.Chained && len(s.Tokens) != N || len(s.Pos) != N || len(s.Slots) != N || len(s.Order) != o.B {
		return fmt.Errorf("runner: step of T=%d with %d tokens, %d positions, %d slots, %d orders does not fit B=%d, MaxT=%d",
			s.T, len(s.Tokens), len(s.Pos), len(s.Slots), len(s.Order), o.B, o.MaxT)
	}
	L := r.lay
	if s.Chained {
		// The tokens are already in place, or on their way: the previous
		// step's sampler writes them into this block.
		if s.T != 1 || !r.sampled {
			return fmt.Errorf("runner: a chained step takes one token per sequence from a step that sampled")
		}
	} else {
		copy(in[L.tokens:], s.Tokens)
	}
	copy(in[L.pos:], s.Pos)
	copy(in[L.slots:], s.Slots)
	if s.Targets != nil {
		rows := o.B
		if s.Logits == AllRows {
			rows = N
		}
		if len(s.Targets) != rows || s.Logits == NoLogits {
			return fmt.Errorf("runner: %d targets for %d logits rows", len(s.Targets), rows)
		}
		copy(in[L.targets:], s.Targets)
	}
	for b, ord := range s.Order {
		if len(ord) < s.T || len(ord) > o.MaxLen {
			return fmt.Errorf("runner: sequence %d attends to %d entries (want %d…%d)", b, len(ord), s.T, o.MaxLen)
		}
		copy(in[L.order+b*o.MaxLen:], ord)
		in[L.lens+b] = int32(len(ord))
	}
	if len(s.AlignSlots) != len(s.AlignIndex) || len(s.AlignSlots) > o.B*o.MaxLen {
		return fmt.Errorf("runner: %d align slots, %d indices", len(s.AlignSlots), len(s.AlignIndex))
	}
	if len(s.AlignSlots) > 0 && r.realign == nil {
		return fmt.Errorf("runner: realignment asked for but no networks are set")
	}
	copy(in[L.alignSlots:], s.AlignSlots)
	copy(in[L.alignIndex:], s.AlignIndex)
	if s.Sample != nil {
		if s.Sample.NoRepeat && r.succ.IsZero() {
			return fmt.Errorf("runner: no repeated 2-grams asked for, but the 2-gram memory was never set (ResetSuccessors)")
		}
		if len(s.Sample.Counter) != o.B {
			return fmt.Errorf("runner: %d sample counters for %d sequences", len(s.Sample.Counter), o.B)
		}
		copy(in[L.counter:], s.Sample.Counter)
		for b := 0; b < o.B; b++ {
			ban := in[L.banned+b*o.MaxBan : L.banned+(b+1)*o.MaxBan]
			var list []int32
			if b < len(s.Sample.Banned) {
				list = s.Sample.Banned[b]
			}
			if len(list) > o.MaxBan {
				return fmt.Errorf("runner: %d banned tokens, at most %d", len(list), o.MaxBan)
			}
			n := copy(ban, list)
			for i := n; i < len(ban); i++ {
				ban[i] = -1
			}
		}
	}
	return nil
}

// view is the slice of device int block par for an input.
func (r *Runner) view(par, off, n int) gpu.Buf { return r.ints.View(par*r.lay.total+off, n) }

// gemvMaxRows: up to this many rows a step's products are weight-streaming
// GEMVs, above it tensor-core GEMMs (kv_matmul's threshold), where the
// Llama MLP takes its activation in the gate|up product.
const gemvMaxRows = 8

// enqueue is the step itself: every operation reads its sizes from shape and
// its data from device buffers, so it can be captured and replayed.
func (r *Runner) enqueue(sh stepShape) {
	be, cfg, o, L := r.be, r.m.Cfg, r.opt, r.lay
	w := &r.m.w
	N := o.B * sh.T
	C, HS, NH, NKV := cfg.C, cfg.HS, cfg.NH, cfg.NKV
	qkvW := cfg.QKVWidth()
	view := func(off, n int) gpu.Buf { return r.view(sh.par, off, n) }
	tokens, pos, slots := view(L.tokens, N), view(L.pos, N), view(L.slots, N)
	order, lens := view(L.order, o.B*o.MaxLen), view(L.lens, o.B)
	layerSize := r.Slots * NKV * HS
	fused, _ := be.(gpu.Fused)
	x, xn := r.x.View(0, N*C), r.xn.View(0, N*C)
	layers := w.layers
	// One-token steps: the MLPs' accumulators (MLPAcc), the accumulator the
	// stream still owes (zero Buf: none), and the pair of stream buffers.
	decode := sh.T == 1 && r.fusedDecode()
	mlpAcc := decode // until the backend says it has no kernel for the shapes
	// fold: the attention output projection inside the attention kernel
	// (AttentionOutProj), its product meeting the stream in the MLP kernel
	// (MLPAccSum), until the backend has no folded kernel for the shapes.
	// Only where the step ends in the final norm (NormSum), which adds the
	// last MLP's output and clears what is left: the step ends with every
	// accumulator zero.
	fold := mlpAcc && sh.logits == LastRow && !o.Unfolded
	var plan gpu.DecodePlan // every layer of a one-token step in one launch, below
	if sh.T == 1 {
		plan = r.plan[sh.par]
	}
	if plan != nil {
		layers = nil
	}
	blocker, _ := be.(gpu.AttentionBlocker)
	// useBlock: every layer, the first (st.Lead false: it starts after the
	// realignment has completed) and the last (its accumulator cleared by
	// the final norm) too: two launches a layer (docs/PERF.md version 30).
	useBlock := func(l int) bool {
		if blocker == nil || !fold || l >= len(layers) || o.Unblocked || r.normKind() != gpu.RMSNormKind {
			return false
		}
		lw := &w.layers[l]
		return lw.oB.IsZero() && lw.qkvB.IsZero()
	}

	// The embedding (the first layer's block embeds the token itself where
	// there are no learned positions), then the realignment, which needs
	// the inputs but not the embedding.
	embedInBlock := useBlock(0) && w.wpe.IsZero()
	if !embedInBlock {
		be.Embed(x, w.wte, w.wpe, tokens, pos, N, C)
	}
	if sh.alignRows > 0 {
		r.realign.Realign(be, r.K, r.V, view(L.alignSlots, sh.alignRows), view(L.alignIndex, sh.alignRows),
			gpu.AlignParams{Rows: sh.alignRows, L: cfg.NLayer, NKV: NKV, HS: HS, LayerStride: layerSize})
	}
	// fp16 weights: attention may round its operands to half too (the
	// tensor-core prefill), as the products already round activations.
	attn := gpu.AttnParams{B: o.B, T: sh.T, NH: NH, NKV: NKV, HS: HS, QStride: qkvW, MaxLen: o.MaxLen,
		F16: r.m.all.DType() == gpu.F16}
	rotHeads := NH + NKV // Llama: queries and keys rotated before the keys are cached
	if cfg.Family == GPT2 {
		rotHeads = 0
	} else if o.ShiftKeys {
		attn.RopeTheta = float32(cfg.RopeTheta)
		rotHeads = NH // keys cached unrotated, rotated at their cache index when read
	}
	// Layer l's accumulators: attnAcc[l%2], mlpAccs[l%2]; its MLP clears
	// both of the other parity (read by the kernels before it), pairAcc.
	var attnAcc, mlpAccs, pairAcc [2]gpu.Buf
	if decode {
		for p := range pairAcc {
			pairAcc[p] = r.acc.View(p*4*N*C, 4*N*C)
			attnAcc[p], mlpAccs[p] = pairAcc[p].View(0, 2*N*C), pairAcc[p].View(2*N*C, 2*N*C)
		}
	}
	// pending: the accumulator holding the last MLP's output, if any;
	// lastAttn: the last layer's attention accumulator, which its MLP read
	// and the final norm clears, where that layer was a block.
	var pending, lastAttn gpu.Buf
	pair, cur := [2]gpu.Buf{x, xn}, 0
	swap := func() gpu.Buf { cur = 1 - cur; return pair[cur] } // the other stream buffer, now current
	if plan != nil {
		plan.Run()
	}
	for l := range layers {
		lw := &w.layers[l]
		K, V := r.K.View(l*layerSize, layerSize), r.V.View(l*layerSize, layerSize)
		qkv := r.qkv.View(0, N*qkvW)
		att := r.att.View(0, N*NH*HS)
		F := cfg.FFN
		theta := float32(0)
		if cfg.Family == Llama {
			theta = float32(cfg.RopeTheta)
		}
		if fused != nil {
			// Five launches a layer, down to two for SmolLM2's one-token
			// steps (below): the norms, RoPE, cache writes and activations
			// ride along with the products.
			nk := r.normKind()
			// Lead: the attention may start (and gather its older K/V rows)
			// while this product waits for the previous layer's MLP, which
			// writes nothing the attention reads before its wait; not the
			// first layer, which may follow the realignment, and whose
			// token the step before wrote.
			st := gpu.QKVStore{K: K, V: V, Pos: pos, Slots: slots, NH: NH, NKV: NKV, HS: HS, RopeHeads: rotHeads, Theta: theta,
				Lead: l > 0}
			act := gpu.SwiGLUAct
			if cfg.Family == GPT2 {
				act = gpu.GeluAct
			}
			// Two launches a layer: the q|k|v product inside the folded
			// attention (AttentionBlock), then the MLP kernel, where
			// useBlock. mlp is the MLP kernel, leading where the next layer
			// starts with a block (whose prologue then overlaps the MLP).
			mlp := fused.MLPAccSum
			if useBlock(l + 1) {
				mlp = blocker.MLPAccLead
			}
			// foldedLayerMLP: the MLP kernel after a folded attention whose
			// heads' products are in a, the stream plus a going to the
			// other buffer of the pair; where the backend has no kernel for
			// the shapes (known at the first layer, which reads no
			// accumulator: its criteria do not depend on the layer), the
			// products.
			foldedLayerMLP := func(a gpu.Buf) {
				sum := pair[1-cur]
				if mlp(mlpAccs[l%2], pairAcc[1-l%2], sum, x, a, lw.norm2W, lw.norm2B, lw.upW, lw.upB, lw.downW, lw.downB, N, C, F, cfg.Eps, nk, act) {
					swap()
					x, pending = sum, mlpAccs[l%2]
					return
				}
				mlpAcc, fold = false, false
				r.foldedMLP(x, sum, a, lw, N, nk)
				pending = gpu.Buf{}
			}
			if l == 0 && embedInBlock {
				st.Tokens, st.Wte = tokens, w.wte
			}
			if useBlock(l) && (l == 0 || !pending.IsZero()) {
				a, sum := attnAcc[l%2], pair[1-cur]
				if blocker.AttentionBlock(a, sum, x, pending, lw.norm1W, lw.qkvW, st, order, lens, attn, lw.oW, C, cfg.Eps) {
					x = swap()
					foldedLayerMLP(a)
					if l == len(layers)-1 {
						lastAttn = a
					}
					continue
				}
			}
			if l == 0 && embedInBlock { // the block did not apply after all
				be.Embed(x, w.wte, w.wpe, tokens, pos, N, C)
				embedInBlock, st.Tokens, st.Wte = false, gpu.Buf{}, gpu.Buf{}
			}
			// read: the accumulator this layer's q|k|v product adds to the
			// stream, free again (for this layer's MLP to clear) once it
			// has run.
			read := pending
			if pending.IsZero() {
				fused.NormMatMulStore(qkv, x, lw.norm1W, lw.norm1B, lw.qkvW, lw.qkvB, N, C, cfg.Eps, nk, st)
			} else {
				// The previous layer's MLP output waits in an accumulator:
				// the sum goes to the other buffer of the pair.
				sum := swap()
				fused.NormMatMulStoreSum(qkv, sum, x, pending, lw.norm1W, lw.norm1B, lw.qkvW, lw.qkvB, N, C, cfg.Eps, nk, st)
				x, pending = sum, gpu.Buf{}
			}
			// Three launches a layer: q|k|v, the attention with its output
			// projection folded in (its heads' products meet in an
			// accumulator), and the MLP kernel, which adds them to the
			// stream (writing the sum to the other buffer of the pair).
			if fold && l < len(layers)-1 && lw.oB.IsZero() {
				if a := attnAcc[l%2]; fused.AttentionOutProj(a, qkv, K, V, order, lens, attn, lw.oW, C) {
					foldedLayerMLP(a)
					continue
				}
				fold = false
			}
			// Without MLPAcc (known once the first layer has tried it),
			// one-token steps where the backend can fold the attention
			// output projection into the attention kernel: the heads'
			// partial products meet in an accumulator, which the MLP's
			// norm product adds to the stream (writing the sum to the
			// other buffer) and the MLP's output product clears (adding
			// its result to that sum into x).
			if decode && !mlpAcc {
				if a := attnAcc[0]; fused.AttentionOutProj(a, qkv, K, V, order, lens, attn, lw.oW, C) {
					r.foldedMLP(x, pair[1-cur], a, lw, N, nk)
					continue
				}
			}
			be.Attention(att, qkv, K, V, order, lens, attn)
			// One-token steps where the backend has the MLP in one
			// launch: its output goes to an accumulator that the next
			// layer's q|k|v product adds to the stream (the layers take
			// the accumulators by parity; each MLP clears those of the
			// other parity, which the kernels before it have read). The
			// last layer's goes there too when the step ends in the last
			// row's logits, whose norm (NormSum) adds and clears it;
			// otherwise that MLP adds into the stream itself. Either way a
			// step ends with every accumulator zero.
			if mlpAcc && (l < len(layers)-1 || sh.logits == LastRow) {
				// The MLP kernel reads only weights before its input is
				// ready: it may start (and load them) while the attention
				// still runs.
				fused.MatMulLead(x, att, lw.oW, lw.oB, N, NH*HS, C)
				a := mlpAccs[l%2]
				if fused.MLPAccSum(a, pairAcc[1-l%2], gpu.Buf{}, x, gpu.Buf{}, lw.norm2W, lw.norm2B, lw.upW, lw.upB, lw.downW, lw.downB, N, C, F, cfg.Eps, nk, act) {
					pending = a
					continue
				}
				mlpAcc = false // not for these shapes: the plain MLP from now on
			} else {
				be.MatMul(x, att, lw.oW, lw.oB, N, NH*HS, C, true)
			}
			if !read.IsZero() {
				out := swap()
				if cfg.Family == GPT2 {
					up := r.up.View(0, N*F)
					fused.NormMatMul(up, x, lw.norm2W, lw.norm2B, lw.upW, lw.upB, N, C, F, cfg.Eps, nk, gpu.GeluAct, false)
					fused.ResMatMul(out, x, up, lw.downW, lw.downB, read, N, F, C, gpu.NoAct)
				} else {
					up := r.up.View(0, N*2*F)
					fused.NormMatMul(up, x, lw.norm2W, gpu.Buf{}, lw.upW, gpu.Buf{}, N, C, 2*F, cfg.Eps, nk, gpu.NoAct, false)
					fused.ResMatMul(out, x, up, lw.downW, gpu.Buf{}, read, N, F, C, gpu.SwiGLUAct)
				}
				x = out
				continue
			}
			if cfg.Family == GPT2 {
				up := r.up.View(0, N*F)
				fused.NormMatMul(up, x, lw.norm2W, lw.norm2B, lw.upW, lw.upB, N, C, F, cfg.Eps, nk, gpu.GeluAct, false)
				be.MatMul(x, up, lw.downW, lw.downB, N, F, C, true)
			} else if N > gemvMaxRows {
				// Prefill-size products: SwiGLU rides in the gate|up GEMM's
				// epilogue, once per element (in the down product's input
				// it would be redone by every column tile).
				act := r.act.View(0, N*F)
				fused.NormMatMul(act, x, lw.norm2W, gpu.Buf{}, lw.upW, gpu.Buf{}, N, C, 2*F, cfg.Eps, nk, gpu.SwiGLUAct, false)
				be.MatMul(x, act, lw.downW, gpu.Buf{}, N, F, C, true)
			} else {
				up := r.up.View(0, N*2*F)
				fused.NormMatMul(up, x, lw.norm2W, gpu.Buf{}, lw.upW, gpu.Buf{}, N, C, 2*F, cfg.Eps, nk, gpu.NoAct, false)
				fused.SwiGLUMatMul(x, up, lw.downW, N, F, C, true)
			}
			continue
		}
		r.norm(xn, x, lw.norm1W, lw.norm1B, N)
		be.MatMul(qkv, xn, lw.qkvW, lw.qkvB, N, C, qkvW, false)
		if cfg.Family == Llama {
			be.RoPE(qkv, pos, N, rotHeads, HS, qkvW, theta)
		}
		be.CacheStore(K, qkv.View(NH*HS, N*qkvW-NH*HS), slots, N, NKV*HS, qkvW)
		be.CacheStore(V, qkv.View((NH+NKV)*HS, N*qkvW-(NH+NKV)*HS), slots, N, NKV*HS, qkvW)
		be.Attention(att, qkv, K, V, order, lens, attn)
		be.MatMul(x, att, lw.oW, lw.oB, N, NH*HS, C, true)
		r.norm(xn, x, lw.norm2W, lw.norm2B, N)
		if cfg.Family == GPT2 {
			up := r.up.View(0, N*F)
			be.MatMul(up, xn, lw.upW, lw.upB, N, C, F, false)
			be.GeluNew(up, N*F)
			be.MatMul(x, up, lw.downW, lw.downB, N, F, C, true)
		} else {
			up := r.up.View(0, N*2*F)
			be.MatMul(up, xn, lw.upW, gpu.Buf{}, N, C, 2*F, false)
			act := r.act.View(0, N*F)
			be.SiluMul(act, up, up.View(F, N*2*F-F), N, F, 2*F)
			be.MatMul(x, act, lw.downW, gpu.Buf{}, N, F, C, true)
		}
	}

	V := cfg.VocabSize
	switch sh.logits {
	case NoLogits:
		return
	case AllRows:
		if fused != nil {
			fused.NormMatMul(r.logits.View(0, N*V), x, w.normFW, w.normFB, w.lmHead, gpu.Buf{}, N, C, V, cfg.Eps, r.normKind(), gpu.NoAct, false)
		} else {
			r.norm(xn, x, w.normFW, w.normFB, N)
			be.MatMul(r.logits.View(0, N*V), xn, w.lmHead, gpu.Buf{}, N, C, V, false)
		}
		if sh.nll {
			be.NLL(r.nll.View(0, N), r.logits.View(0, N*V), view(L.targets, N), N, V)
		}
	case LastRow:
		// A sampled one-token step may screen its LM head (decode, as
		// screens checks): the head's product and the sampling are then one
		// operation, below.
		screen := r.screens(sh)
		var headIn gpu.Buf
		if decode {
			// One-token steps: the final norm into the free stream buffer,
			// then the LM head, as two programmatic launches (CUDA: the
			// head's first weights stream while the norm runs). The fused
			// product would have each of the head's ~12k blocks normalise
			// the row, and its two-step fallback takes scratch from the
			// graph's allocator, whose memory nodes stop that overlap.
			xs := pair[1-cur].View(0, N*C)
			if !pending.IsZero() { // the last layer's MLP output, in an accumulator
				fused.NormSum(xs, x, pending, lastAttn, w.normFW, w.normFB, N, C, cfg.Eps, r.normKind())
			} else {
				r.norm(xs, x, w.normFW, w.normFB, N)
			}
			if screen {
				headIn = xs
			} else {
				be.MatMul(r.logits.View(0, N*V), xs, w.lmHead, gpu.Buf{}, N, C, V, false)
			}
		} else if fused != nil && sh.T == 1 {
			fused.NormMatMul(r.logits.View(0, o.B*V), x, w.normFW, w.normFB, w.lmHead, gpu.Buf{}, o.B, C, V, cfg.Eps, r.normKind(), gpu.NoAct, false)
		} else {
			for b := 0; b < o.B; b++ {
				last := b*sh.T + sh.T - 1
				r.norm(xn.View(b*C, C), x.View(last*C, C), w.normFW, w.normFB, 1)
			}
			be.MatMul(r.logits.View(0, o.B*V), xn.View(0, o.B*C), w.lmHead, gpu.Buf{}, o.B, C, V, false)
		}
		if sh.nll {
			be.NLL(r.nll.View(0, o.B), r.logits.View(0, o.B*V), view(L.targets, o.B), o.B, V)
		}
		if sh.topK > 0 {
			// The picks go straight into the token slots of the other int
			// block (row b of a one-token step), on both sides: the host
			// reads the pinned one without a copy node after the sampling
			// kernel, and a chained next step finds its tokens on the
			// device.
			picks := r.stage[1-sh.par].Buf().View(L.tokens, o.B)
			p := gpu.SampleParams{B: o.B, V: V, TopK: sh.topK, MaxBan: o.MaxBan, Seed: sh.seed,
				Also: r.view(1-sh.par, L.tokens, o.B)}
			if sh.noRepeat {
				// Each row follows its last new token.
				p.Succ = r.succ
				p.Succ.Prev, p.Succ.PrevStride = view(L.tokens+sh.T-1, N-sh.T+1), sh.T
			}
			if screen {
				r.be.(gpu.HeadSampler).HeadSample(picks, r.logits.View(0, o.B*V), headIn, r.m.head, view(L.banned, o.B*o.MaxBan), view(L.counter, o.B), p)
			} else {
				be.Sample(picks, r.logits.View(0, o.B*V), view(L.banned, o.B*o.MaxBan), view(L.counter, o.B), p)
			}
		}
	}
}

// screens reports whether a step of this shape screens its LM head
// (gpu.HeadSampler): asked for, a sampled one-token step without NLL, on a
// model whose head the backend prepared.
func (r *Runner) screens(sh stepShape) bool {
	_, screener := r.be.(gpu.HeadSampler)
	return r.opt.ScreenHead && screener && sh.T == 1 && r.fusedDecode() && sh.logits == LastRow &&
		sh.topK > 0 && !sh.nll && r.m.head != nil
}

// fusedDecode reports whether this runner's one-token steps take the fused
// path (enqueue's decode): a backend with fused operations and rows few
// enough for its weight-streaming GEMVs.
func (r *Runner) fusedDecode() bool {
	_, fused := r.be.(gpu.Fused)
	return fused && r.opt.B <= gemvMaxRows
}

// foldedMLP is a one-token MLP block after AttentionOutProj as two
// products: the first adds acc (and the projection's bias) to the stream x
// into sum, the second adds its output to sum into x and clears acc.
func (r *Runner) foldedMLP(x, sum, acc gpu.Buf, lw *deviceLayer, N int, nk gpu.NormKind) {
	cfg, fused := r.m.Cfg, r.be.(gpu.Fused)
	C, F := cfg.C, cfg.FFN
	if cfg.Family == GPT2 {
		up := r.up.View(0, N*F)
		fused.NormMatMulSum(up, sum, x, acc, lw.oB, lw.norm2W, lw.norm2B, lw.upW, lw.upB, N, C, F, cfg.Eps, nk, gpu.GeluAct)
		fused.ResMatMul(x, sum, up, lw.downW, lw.downB, acc, N, F, C, gpu.NoAct)
	} else {
		up := r.up.View(0, N*2*F)
		fused.NormMatMulSum(up, sum, x, acc, gpu.Buf{}, lw.norm2W, gpu.Buf{}, lw.upW, gpu.Buf{}, N, C, 2*F, cfg.Eps, nk, gpu.NoAct)
		fused.ResMatMul(x, sum, up, lw.downW, gpu.Buf{}, acc, N, F, C, gpu.SwiGLUAct)
	}
}

func (r *Runner) normKind() gpu.NormKind {
	if r.m.Cfg.Family == GPT2 {
		return gpu.LayerNormKind
	}
	return gpu.RMSNormKind
}

func (r *Runner) norm(out, in, w, b gpu.Buf, N int) {
	cfg := r.m.Cfg
	if cfg.Family == GPT2 {
		r.be.LayerNorm(out, in, w, b, N, cfg.C, cfg.Eps)
	} else {
		r.be.RMSNorm(out, in, w, N, cfg.C, cfg.Eps)
	}
}

// ReplayLast runs the last captured step n more times back to back and
// waits: the device time of a step without the host's per-token round trip
// (a benchmark tool: it repeats the step's cache writes, so the stream's
// state is not meaningful afterwards).
func (r *Runner) ReplayLast(n int) error {
	g, ok := r.graphs[r.last]
	if !ok {
		return fmt.Errorf("runner: the last step was not captured")
	}
	for i := 0; i < n; i++ {
		g.Run()
	}
	return r.sync()
}

// Logits downloads the logits of the last step: rows × V.
func (r *Runner) Logits(rows int) ([]float32, error) {
	if r.screens(r.last) {
		return nil, fmt.Errorf("runner: the last step sampled from the screened LM head, which computes only the logits that could be drawn (DecodeKernel.ScreenHead)")
	}
	out := make([]float32, rows*r.m.Cfg.VocabSize)
	r.be.Download(out, r.logits.View(0, len(out)))
	return out, r.sync()
}

// NLL downloads the per-row NLL of the last step.
func (r *Runner) NLL(rows int) ([]float32, error) {
	out := make([]float32, rows)
	r.be.Download(out, r.nll.View(0, rows))
	return out, r.sync()
}

// Sampled waits for the last step and returns the token drawn for each
// sequence (valid until the next Run).
func (r *Runner) Sampled() ([]int32, error) {
	if !r.sampled {
		return nil, fmt.Errorf("runner: the last step drew no tokens")
	}
	return r.picks, r.readPicks(1 - r.par)
}

// Drawn waits for the step before the last and returns the tokens it drew,
// which the last step, chained, took as its input: a decode loop queues
// step i+1 before it reads step i's tokens, so the device never waits for
// the host (valid until the next Run).
func (r *Runner) Drawn() ([]int32, error) {
	if !r.chained {
		return nil, fmt.Errorf("runner: the last step was not chained to the one before it")
	}
	return r.picks, r.readPicks(r.par)
}

// readPicks waits for the step of parity p and copies the tokens it drew
// (into the other stage block) to picks.
func (r *Runner) readPicks(p int) error {
	if err := r.waitStage(p); err != nil {
		return err
	}
	copy(r.picks, r.stage[1-p].Ints()[r.lay.tokens:])
	return nil
}

// KV downloads layer l's cached K and V of the given slots: [len(slots), NKV·HS] each.
func (r *Runner) KV(l int, slots []int32) (k, v []float32, err error) {
	cfg := r.m.Cfg
	row := cfg.NKV * cfg.HS
	layerSize := r.Slots * row
	allK := make([]float32, layerSize)
	allV := make([]float32, layerSize)
	r.be.Download(allK, r.K.View(l*layerSize, layerSize))
	r.be.Download(allV, r.V.View(l*layerSize, layerSize))
	if err := r.sync(); err != nil {
		return nil, nil, err
	}
	for _, s := range slots {
		k = append(k, allK[int(s)*row:int(s)*row+row]...)
		v = append(v, allV[int(s)*row:int(s)*row+row]...)
	}
	return k, v, nil
}

// Argmax is the index of the largest value of a logits row (lowest on ties).
func Argmax(row []float32) int {
	best, bi := float32(math.Inf(-1)), 0
	for i, v := range row {
		if v > best {
			best, bi = v, i
		}
	}
	return bi
}
