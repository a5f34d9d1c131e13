package ref

import (
	"math/rand/v2"
	"sort"
	"testing"
)

// Sample's streaming top-k equals a full sort (ties to the lower id) on
// random logits with ties and bans.
func TestSampleMatchesFullSort(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := 0; trial < 200; trial++ {
		V, k := 1+rng.IntN(300), 1+rng.IntN(25)
		l := make([]float32, V)
		for i := range l {
			l[i] = float32(rng.IntN(40)) / 4 // many ties
		}
		banned := []int32{int32(rng.IntN(V)), int32(rng.IntN(V)), -1, -1}
		ids := []int32{}
		for i := 0; i < V; i++ {
			if int32(i) != banned[0] && int32(i) != banned[1] {
				ids = append(ids, int32(i))
			}
		}
		sort.SliceStable(ids, func(a, b int) bool { return l[ids[a]] > l[ids[b]] })
		if len(ids) > k {
			ids = ids[:k]
		}
		// With a counter whose uniform is ~0 the first candidate wins; check
		// the whole candidate order through greedy and near-1 draws.
		out := make([]int32, 1)
		Sample(out, l, banned, []int32{int32(trial)}, 1, V, 1, 4, 0, nil)
		if len(ids) == 0 {
			if out[0] != -1 {
				t.Fatalf("all banned: got %d", out[0])
			}
			continue
		}
		if out[0] != ids[0] {
			t.Fatalf("trial %d: greedy %d, full sort %d", trial, out[0], ids[0])
		}
		Sample(out, l, banned, []int32{int32(trial)}, 1, V, k, 4, uint64(trial), nil)
		found := false
		for _, id := range ids {
			found = found || id == out[0]
		}
		if !found {
			t.Fatalf("trial %d: drew %d outside the top %d %v", trial, out[0], k, ids)
		}
	}
}
