package ref

import (
	"slices"
	"testing"
)

// newSuccessors is an empty memory for B rows over V tokens with room for
// pages ring pages.
func newSuccessors(B, V, keep, pages int) *Successors {
	dirs := (keep + 31) / 32
	return &Successors{Count: make([]int32, B*V), Dir: make([]int32, B*V*dirs), Pages: make([]int32, 32*pages),
		Used: make([]int32, 1), Keep: keep, Dirs: dirs}
}

// The ring keeps each token's keep most recent distinct successors: checked
// against plain slices over random records (only new successors are
// recorded, as the sampler guarantees), with keep below, at and above a
// page of 32, and a row whose memory must not touch another's.
func TestSuccessorsKeepTheMostRecent(t *testing.T) {
	const B, V = 2, 40
	for _, keep := range []int{1, 3, 32, 45} {
		s := newSuccessors(B, V, keep, 4000)
		want := map[[2]int32][]int32{} // (row, prev) → kept successors, oldest first
		for i := 0; i < 3000; i++ {
			b := int(Uniform(1, uint32(3*i)) * B)
			prev := int32(Uniform(2, uint32(3*i+1)) * 6) // few tokens: long rings
			next := int32(Uniform(3, uint32(3*i+2)) * V)
			k := [2]int32{int32(b), prev}
			if slices.Contains(want[k], next) {
				continue
			}
			if !s.Record(b, V, prev, next) {
				t.Fatalf("keep %d: out of pages after %d records", keep, i)
			}
			want[k] = append(want[k], next)
			if len(want[k]) > keep {
				want[k] = want[k][1:]
			}
		}
		for b := 0; b < B; b++ {
			for prev := int32(0); prev < V; prev++ {
				var got []int32
				s.Each(b, V, prev, func(t int32) { got = append(got, t) })
				w := slices.Clone(want[[2]int32{int32(b), prev}])
				slices.Sort(got)
				slices.Sort(w)
				if !slices.Equal(got, w) {
					t.Fatalf("keep %d, row %d, token %d: kept %v, want %v", keep, b, prev, got, w)
				}
				for _, n := range w {
					if !s.Contains(b, V, prev, n) {
						t.Fatalf("keep %d: Contains(%d, %d) false", keep, prev, n)
					}
				}
			}
		}
		// A ring never takes more pages than it can hold.
		if limit := int32(B * 6 * ((keep + 31) / 32)); s.Used[0] > limit {
			t.Errorf("keep %d: %d pages used, at most %d", keep, s.Used[0], limit)
		}
	}
}

// Out of pages, Record says so and Used tells how many were asked for.
func TestSuccessorsOutOfPages(t *testing.T) {
	s := newSuccessors(1, 10, 4, 1)
	if !s.Record(0, 10, 1, 2) || !s.Record(0, 10, 1, 3) {
		t.Fatal("the first page was refused")
	}
	if s.Record(0, 10, 2, 3) {
		t.Fatal("a second page was handed out of a pool of one")
	}
	if s.Used[0] != 2 {
		t.Fatalf("Used %d, want 2", s.Used[0])
	}
	if s.Contains(0, 10, 2, 3) {
		t.Fatal("a refused record is kept")
	}
}

// Sample with a memory bans the kept successors of the row's previous token
// (and only those) and records its pick after it.
func TestSampleWithSuccessors(t *testing.T) {
	const V = 8
	s := newSuccessors(1, V, 4, 8)
	prev := []int32{5}
	s.Prev, s.PrevStride = prev, 1
	l := []float32{0, 1, 2, 3, 4, 5, 6, 7} // greedy takes the largest allowed
	s.Record(0, V, 5, 7)
	s.Record(0, V, 6, 6) // another token's successor: not banned after 5
	out := []int32{0}
	// Keep 4: once 6, 5, 4 joined 7, drawing 3 pushes 7 out, so 7 may
	// follow 5 again, which pushes 6 out.
	for i, want := range []int32{6, 5, 4, 3, 7, 6} {
		Sample(out, l, nil, []int32{0}, 1, V, 1, 0, 0, s)
		if out[0] != want {
			t.Fatalf("draw %d: %d, want %d", i, out[0], want)
		}
	}
	// A ban list and the memory together: kept {4, 3, 7, 6}, listed 5.
	Sample(out, l, []int32{5, -1}, []int32{0}, 1, V, 1, 2, 0, s)
	if out[0] != 2 {
		t.Fatalf("with 5 listed: drew %d, want 2", out[0])
	}
}
