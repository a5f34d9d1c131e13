// Package kvcache keeps the bookkeeping of a bounded key/value cache: which
// slot of the K/V store holds each logical entry, at which position each entry
// was computed, and which entry goes when the cache is full.
//
// Layout (StreamingLLM, Xiao et al. 2024): Start "attention sink" entries that
// are never evicted, then a recent window. The cache keeps Size entries between
// steps; a step adds one, and when that leaves Size+1 entries the oldest
// window entry (logical index Start) is evicted. Eviction moves no K/V data:
// the entry's slot goes back to the free list and the logical order (a list
// of slot numbers the attention kernel reads) closes the gap. The same
// bookkeeping drives the CPU and the GPU stores, so their layouts agree.
//
// The package holds no tensors; the model reads Order, Positions and the slot
// of each new entry, and a position fix-up (RoPE re-rotation or KV-Align
// networks) runs on the window after each eviction.
package kvcache

import "fmt"

// Cache is the bookkeeping of one sequence's bounded cache.
type Cache struct {
	size, start int
	base        int32   // first slot of this sequence in a shared store
	order       []int32 // logical index → slot
	pos         []int32 // logical index → position it was computed at
	free        []int32 // free slots, used last-in first-out
}

// New returns an empty cache of size entries (plus one in flight) with start
// sink entries, owning slots base … base+size of a shared store.
func New(size, start int, base int) (*Cache, error) {
	if start < 0 {
		return nil, fmt.Errorf("start size %d is negative", start)
	}
	if size < start+2 {
		return nil, fmt.Errorf("cache size %d must exceed start size %d by at least 2 (one window entry to evict, one to keep)", size, start)
	}
	c := &Cache{size: size, start: start, base: int32(base)}
	c.order = make([]int32, 0, size+1)
	c.pos = make([]int32, 0, size+1)
	c.free = make([]int32, 0, size+1)
	c.Reset()
	return c, nil
}

// Reset empties the cache.
func (c *Cache) Reset() {
	c.order = c.order[:0]
	c.pos = c.pos[:0]
	c.free = c.free[:0]
	for s := int32(c.size); s >= 0; s-- {
		c.free = append(c.free, c.base+s)
	}
}

// Size is the number of entries kept between steps.
func (c *Cache) Size() int { return c.size }

// Start is the number of sink entries.
func (c *Cache) Start() int { return c.start }

// Slots is the number of slots the cache needs in a store: Size + 1.
func (c *Cache) Slots() int { return c.size + 1 }

// Len is the number of entries held.
func (c *Cache) Len() int { return len(c.order) }

// Full reports whether the next Append needs an eviction first.
func (c *Cache) Full() bool { return len(c.order) > c.size }

// Order is the slot of every entry in logical order (read-only view).
func (c *Cache) Order() []int32 { return c.order }

// Positions is the position every entry was computed at (read-only view).
func (c *Cache) Positions() []int32 { return c.pos }

// Append adds an entry computed at position pos and returns its slot.
func (c *Cache) Append(pos int) (slot int32, err error) {
	if len(c.free) == 0 {
		return 0, fmt.Errorf("kvcache: append to a cache holding %d entries (capacity %d): evict first", len(c.order), c.size+1)
	}
	slot = c.free[len(c.free)-1]
	c.free = c.free[:len(c.free)-1]
	c.order = append(c.order, slot)
	c.pos = append(c.pos, int32(pos))
	return slot, nil
}

// Evict removes the oldest window entry (logical index Start) and returns
// its slot. Only the small order/position lists shift; no K/V data moves.
func (c *Cache) Evict() (slot int32, err error) {
	if len(c.order) <= c.start {
		return 0, fmt.Errorf("kvcache: evict from a cache holding only %d entries (%d sinks)", len(c.order), c.start)
	}
	slot = c.order[c.start]
	c.order = append(c.order[:c.start], c.order[c.start+1:]...)
	c.pos = append(c.pos[:c.start], c.pos[c.start+1:]...)
	c.free = append(c.free, slot)
	return slot, nil
}

// Window is the slots of the recent window (logical indices Start …), in order.
func (c *Cache) Window() []int32 {
	if len(c.order) <= c.start {
		return nil
	}
	return c.order[c.start:]
}

// SetPositions records that every entry now stands for its logical index
// (after a realignment).
func (c *Cache) SetPositions() {
	for i := range c.pos {
		c.pos[i] = int32(i)
	}
}
