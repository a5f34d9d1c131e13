//go:build cuda

package transformer

import (
	"fmt"
	"slices"
	"testing"
)

// Where the step's state sits changes no bit: both fixture models, sw and
// kv (identity networks), 350 teacher-forced steps through a 32-entry cache
// with the state as laid out, with every buffer moved by 64 KB, and as
// placed by timing give identical logits at every step. The timed runner
// reports a step no slower than as laid out, and moved buffers only where
// it is faster; every buffer lies inside its arena, on its own bytes.
func TestCUDAStatePlacement(t *testing.T) {
	forEachFixtureF16(t, func(name string, m *Model) {
		toks := testTokens(400, m.Cfg.VocabSize, 11)
		for _, mode := range []Mode{SlidingWindow, KVAlign} {
			t.Run(fmt.Sprintf("%s/%s", name, mode), func(t *testing.T) {
				open := func(fixed, moveAll bool) *Stream {
					s, err := NewStream(m, StreamOptions{Mode: mode, CacheSize: 32, StartSize: 4, Realigner: identityRealigner{}, MaxBan: 1,
						DecodeKernel: DecodeKernel{FixedPlacement: fixed}})
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(s.Close)
					if moveAll {
						for i := range s.r.slots {
							s.r.slots[i].moved = true
							s.r.point(&s.r.slots[i])
						}
					}
					return s
				}
				timed := open(false, false)
				streams := []*Stream{timed, open(true, false), open(true, true)}
				pl := timed.Runner().Placement()
				if pl.Before <= 0 || pl.After <= 0 || pl.After > pl.Before || (len(pl.Moved) > 0) != (pl.After < pl.Before) {
					t.Fatalf("placement %+v: want step times as laid out and as placed, buffers moved only where faster", pl)
				}
				for _, sl := range timed.r.slots {
					if sl.moved != slices.Contains(pl.Moved, sl.name) {
						t.Fatalf("slot %s: moved %v, but the placement says %v", sl.name, sl.moved, pl.Moved)
					}
				}
				if streams[1].Runner().Placement().Before != 0 {
					t.Fatalf("FixedPlacement: the runner timed its step anyway")
				}
				t.Logf("state placement: moved %v; step %v → %v", pl.Moved, pl.Before, pl.After)
				checkSlots(t, streams[2].r)
				same := func(step int, tokens []int32) {
					want := feedLogits(t, streams[0], tokens)
					for j, s := range streams[1:] {
						got := feedLogits(t, s, tokens)
						for v := range want {
							if got[v] != want[v] {
								t.Fatalf("step %d, stream %d: logit %d is %v, the timed stream's %v", step, j+1, v, got[v], want[v])
							}
						}
					}
				}
				same(0, toks[:50])
				for i := 50; i < len(toks); i++ {
					same(i, toks[i:i+1])
				}
			})
		}
	})
}

// checkSlots: each buffer is the view its slot says, inside its arena, and
// no two slots of an arena overlap, moved or not.
func checkSlots(t *testing.T, r *Runner) {
	t.Helper()
	for i, a := range r.slots {
		per := placeShift / a.dt.Size()
		if a.dst.Len() != a.n || a.off%per != 0 {
			t.Fatalf("slot %s: %d elements at %d, want %d on a 64 KB boundary", a.name, a.dst.Len(), a.off, a.n)
		}
		arena := r.arenas[a.arena]
		if end := arena.AlignedOffset(0, placeShift) + a.off + per + a.n; end > arena.Len() {
			t.Fatalf("slot %s ends at %d, past its arena's %d", a.name, end, arena.Len())
		}
		for _, b := range r.slots[i+1:] {
			if b.arena == a.arena && a.off < b.off+b.n+per && b.off < a.off+a.n+per {
				t.Fatalf("slots %s and %s overlap", a.name, b.name)
			}
		}
	}
}
