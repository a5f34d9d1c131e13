package transformer

// placement.go — where the one-token step's state sits in L2.
//
// A one-token step is a chain of kernels that each wait for the one before
// and read a few KB it wrote: the stream, the accumulators that every
// attention block and MLP block adds to with 64-bit atomics, the inputs.
// On an H100, where those lines sit moves SmolLM2's whole step by 3–4 µs
// with the same code (docs/PERF.md, version 34): moving the accumulators in
// steps of 64 KB, the step was fast or slow with the parity of address bits
// 16, 17 and 19 (a hash that picks where in L2 a line lives, together with
// the physical page's bits, which the driver chooses), and moving the
// stream and the buffers after it moved it as much. Which places are fast
// is not known before running, so the runner lays its state out in two
// arenas, each buffer in a slot of its own with 64 KB to spare, and when
// it is made times the step with each buffer in turn moved by 64 KB (bit
// 16 flips), keeping the moves that make the step faster and win against
// the layout as a whole. Results do not depend on the placement.

import (
	"fmt"
	"time"

	"github.com/kvalign/kvalign/gpu"
)

const (
	placeShift   = 64 << 10 // bytes a buffer moves; slots start on this boundary
	placeRounds  = 3        // interleaved batches a placement
	placeReplays = 16       // steps a batch
)

// stateSlot is one state buffer in its arena: n elements of dt at element
// off from the arena's first 64 KB boundary, or placeShift bytes later
// when moved.
type stateSlot struct {
	name  string
	dst   *gpu.Buf
	dt    gpu.DType
	n     int
	arena int // index into Runner.arenas
	off   int
	moved bool
}

// Placement is what placeState found: the buffers it moved by 64 KB and
// the one-token step's time (GPU, replayed back to back) as laid out and
// as placed, timed against each other (After ≤ Before: moves that do not
// win are undone); zero where nothing was timed (the CPU, the persistent
// kernel, batches above the one-token path's rows,
// RunnerOptions.FixedPlacement).
type Placement struct {
	Moved         []string
	Before, After time.Duration
}

// Placement reports where the runner put its state.
func (r *Runner) Placement() Placement { return r.placement }

// allocState allocates one arena a dtype and points each slot's buffer at
// its place in it.
func (r *Runner) allocState() error {
	var size []int // elements of each arena from its first 64 KB boundary
	var dts []gpu.DType
	for i := range r.slots {
		sl := &r.slots[i]
		sl.arena = -1
		for a, dt := range dts {
			if dt == sl.dt {
				sl.arena = a
			}
		}
		if sl.arena < 0 {
			sl.arena = len(dts)
			dts, size = append(dts, sl.dt), append(size, 0)
		}
		per := placeShift / sl.dt.Size()
		sl.off = size[sl.arena]
		size[sl.arena] += (sl.n+per-1)/per*per + per
	}
	for a, dt := range dts {
		size[a] += placeShift / dt.Size() // room to align the start
		b, err := r.be.Alloc(dt, size[a])
		if err != nil {
			return err
		}
		r.bufs = append(r.bufs, b)
		r.arenas = append(r.arenas, b)
	}
	for i := range r.slots {
		r.point(&r.slots[i])
	}
	// The accumulators start at zero, wherever they are (each step leaves
	// them so).
	for a, dt := range dts {
		if dt == gpu.I32 {
			r.be.UploadInts(r.arenas[a], make([]int32, size[a]))
		}
	}
	return nil
}

// point sets a slot's buffer to its place.
func (r *Runner) point(s *stateSlot) {
	a := r.arenas[s.arena]
	off := a.AlignedOffset(0, placeShift) + s.off
	if s.moved {
		off += placeShift / s.dt.Size()
	}
	*s.dst = a.View(off, s.n)
}

// placeState times a one-token step that samples as generation does (top
// 20) over a full cache (token 0 at each sequence's last slot; the entries
// it reads were never written, and a later step reads only entries written
// before it) as it is and with the next buffer moved, each graph replayed
// in interleaved batches, and keeps the move when its least batch was
// faster; every buffer in turn. The moves kept are then timed against the
// layout as it was, and undone unless they win there too.
func (r *Runner) placeState() error {
	o := r.opt
	if !r.fusedDecode() || !r.arenas[0].OnDevice() || r.Persistent() {
		return nil
	}
	s := &Step{T: 1, Tokens: make([]int32, o.B), Pos: make([]int32, o.B), Slots: make([]int32, o.B),
		Order: make([][]int32, o.B), Logits: LastRow, Graph: true,
		Sample: &Sampling{TopK: 20, Counter: make([]int32, o.B)}}
	for b := range s.Order {
		s.Order[b] = make([]int32, o.MaxLen)
		for i := range s.Order[b] {
			s.Order[b][i] = int32(b*o.MaxLen + i)
		}
		s.Pos[b], s.Slots[b] = int32(o.MaxLen-1), int32(b*o.MaxLen+o.MaxLen-1)
	}
	// capture runs the step once and takes its graph, which holds the
	// buffers' addresses as they are now: no later step may replay it.
	capture := func() (gpu.Replay, error) {
		if err := r.Run(s); err != nil {
			return nil, fmt.Errorf("placing the runner's state: %w", err)
		}
		g := r.graphs[r.last]
		delete(r.graphs, r.last)
		if err := r.sync(); err != nil {
			g.Close()
			return nil, err
		}
		return g, nil
	}
	orig, err := capture()
	if err != nil {
		return err
	}
	cur := orig
	defer func() {
		if cur != orig {
			cur.Close()
		}
		orig.Close()
		r.sampled = false // no step may take its tokens from these
	}()
	var moved []string
	for i := range r.slots {
		sl := &r.slots[i]
		sl.moved = true
		r.point(sl)
		alt, err := capture()
		if err != nil {
			return err
		}
		t, err := r.timeReplays(cur, alt)
		if err != nil {
			alt.Close()
			return err
		}
		if t[1] < t[0] {
			moved = append(moved, sl.name)
			cur, alt = alt, cur
		} else {
			sl.moved = false
			r.point(sl)
		}
		if alt != orig {
			alt.Close()
		}
	}
	// The moves against the layout, head to head: each was kept on one
	// comparison, and where they were noise they are undone.
	gs := []gpu.Replay{orig}
	if cur != orig {
		gs = append(gs, cur)
	}
	t, err := r.timeReplays(gs...)
	if err != nil {
		return err
	}
	r.placement = Placement{Before: t[0], After: t[0]}
	if len(t) == 2 && t[1] < t[0] {
		r.placement.Moved, r.placement.After = moved, t[1]
		return nil
	}
	for i := range r.slots {
		r.slots[i].moved = false
		r.point(&r.slots[i])
	}
	return nil
}

// timeReplays is each graph's least mean step time over interleaved
// batches.
func (r *Runner) timeReplays(gs ...gpu.Replay) ([]time.Duration, error) {
	best := make([]time.Duration, len(gs))
	for round := 0; round < placeRounds; round++ {
		for k, g := range gs {
			t0 := time.Now()
			for i := 0; i < placeReplays; i++ {
				g.Run()
			}
			if err := r.sync(); err != nil {
				return nil, err
			}
			if d := time.Since(t0) / placeReplays; round == 0 || d < best[k] {
				best[k] = d
			}
		}
	}
	return best, nil
}
