package ref

// Successors is a 2-gram memory for B rows over a vocabulary of V tokens:
// for row b and token t (cell b·V + t), Count[cell] successors were
// recorded after t, and the most recent min(Count, Keep) of them sit in a
// ring of Keep slots. Slot i is Pages[Dir[cell·Dirs + i/32]·32 + i%32]: the
// ring's pages of 32 slots come from one pool as rings grow (Used of
// len(Pages)/32 handed out), so the memory costs V·Dirs ints per row plus
// what was recorded, not V·Keep. Prev[b·PrevStride] is the token row b
// follows this step. Sample bans every kept successor of it and records its
// pick there; the sampler never draws a kept successor, so recording is a
// plain append and the ring holds distinct tokens.
//
// The same arrays, on a device, are gpu.Successors and csrc's kv_succ; this
// is their reference.
type Successors struct {
	Prev                    []int32
	PrevStride              int
	Count, Dir, Pages, Used []int32 // Used: one int
	Keep, Dirs              int     // Dirs = ceil(Keep/32)
}

// cell is row b's memory of token t, or −1 for a token outside the vocabulary.
func (s *Successors) cell(b, V int, t int32) int {
	if t < 0 || int(t) >= V {
		return -1
	}
	return b*V + int(t)
}

// Each calls fn with every successor kept after token prev in row b.
func (s *Successors) Each(b, V int, prev int32, fn func(next int32)) {
	c := s.cell(b, V, prev)
	if c < 0 {
		return
	}
	n := min(int(s.Count[c]), s.Keep)
	for i := 0; i < n; i++ {
		fn(s.Pages[int(s.Dir[c*s.Dirs+i/32])*32+i%32])
	}
}

// Contains reports whether next is kept after prev in row b.
func (s *Successors) Contains(b, V int, prev, next int32) bool {
	found := false
	s.Each(b, V, prev, func(t int32) { found = found || t == next })
	return found
}

// Record appends next after prev in row b (the caller knows it is not kept
// there already), overwriting the oldest once Keep are kept. It reports
// false when the pool has no page left; Used then exceeds the pool, as on
// the device.
func (s *Successors) Record(b, V int, prev, next int32) bool {
	c := s.cell(b, V, prev)
	if c < 0 || next < 0 {
		return true
	}
	j := int(s.Count[c])
	slot := j % s.Keep
	d := &s.Dir[c*s.Dirs+slot/32]
	if j < s.Keep && slot%32 == 0 {
		page := s.Used[0]
		s.Used[0]++
		if int(page) >= len(s.Pages)/32 {
			return false
		}
		*d = page
	}
	s.Pages[int(*d)*32+slot%32] = next
	s.Count[c] = int32(j + 1)
	return true
}
