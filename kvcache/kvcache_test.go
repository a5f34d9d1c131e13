package kvcache

import (
	"slices"
	"testing"
)

func TestEvictKeepsSinksAndOrder(t *testing.T) {
	c, err := New(6, 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	for p := 0; p < 7; p++ {
		if _, err := c.Append(p); err != nil {
			t.Fatal(err)
		}
	}
	if !c.Full() {
		t.Fatalf("7 entries in a cache of 6 should be full")
	}
	if _, err := c.Append(7); err == nil {
		t.Fatal("append beyond Size+1 accepted")
	}
	first := c.Order()[2]
	ev, err := c.Evict()
	if err != nil || ev != first {
		t.Fatalf("evicted slot %d (%v), want %d", ev, err, first)
	}
	if got, want := c.Positions(), []int32{0, 1, 3, 4, 5, 6}; !slices.Equal(got, want) {
		t.Fatalf("positions %v, want %v", got, want)
	}
	s, _ := c.Append(7)
	if s != ev {
		t.Fatalf("new entry took slot %d, want the freed slot %d", s, ev)
	}
	if got := len(c.Window()); got != 5 {
		t.Fatalf("window holds %d entries, want 5", got)
	}
}

// Over many steps the slots stay a permutation of the store's slots: no slot
// is lost or shared, whatever the eviction sequence.
func TestSlotsStayAPermutation(t *testing.T) {
	c, _ := New(10, 4, 100)
	for p := 0; p < 1000; p++ {
		if c.Full() {
			if _, err := c.Evict(); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := c.Append(p); err != nil {
			t.Fatal(err)
		}
		seen := map[int32]bool{}
		for _, s := range append(slices.Clone(c.Order()), c.free...) {
			if s < 100 || s > 110 || seen[s] {
				t.Fatalf("step %d: slot %d out of range or repeated", p, s)
			}
			seen[s] = true
		}
		if len(seen) != c.Slots() {
			t.Fatalf("step %d: %d slots accounted for, want %d", p, len(seen), c.Slots())
		}
	}
	// Sinks keep positions 0..3; the window holds the most recent tokens.
	if got := c.Positions(); !slices.Equal(got[:4], []int32{0, 1, 2, 3}) || got[len(got)-1] != 999 {
		t.Fatalf("positions %v", got)
	}
}

func TestNewRefusesTinyCaches(t *testing.T) {
	if _, err := New(5, 4, 0); err == nil {
		t.Fatal("cache size 5 with 4 sinks accepted")
	}
	if _, err := New(6, 4, 0); err != nil {
		t.Fatal(err)
	}
}
