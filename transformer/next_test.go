package transformer

import (
	"fmt"
	"slices"
	"testing"
)

// Stream.Next queues each step before the host has the token it feeds
// (sw and kv chain it on the device; ar takes it through the host). On every
// backend, both tiny models and all three modes, a run of Next must draw
// exactly the tokens that feeding each drawn token back by hand draws, with
// the 2-gram memory on (a small one, so its rings wrap) and a ban list,
// through the first evictions and on into the captured steps. The drawn
// text must never repeat a 2-gram the memory still keeps.
func TestNextMatchesFeedingBack(t *testing.T) {
	const steps, keep, banned = 90, 5, 3
	for _, tb := range testBackends(t) {
		for _, name := range []string{"tiny-gpt2", "tiny-llama"} {
			m := tinyModel(t, name, tb.be)
			prompt := testTokens(12, m.Cfg.VocabSize, 3)
			for _, mode := range []Mode{SlidingWindow, KVAlign, Recompute} {
				t.Run(fmt.Sprintf("%s/%s/%s", tb.name, name, mode), func(t *testing.T) {
					run := func(chained bool) []int32 {
						s, err := NewStream(m, StreamOptions{Mode: mode, CacheSize: 16, StartSize: 4, Realigner: identityRealigner{}, MaxBan: 2})
						if err != nil {
							t.Fatal(err)
						}
						defer s.Close()
						var pairs [][2]int32
						for i := 1; i < len(prompt); i++ {
							pairs = append(pairs, [2]int32{prompt[i-1], prompt[i]})
						}
						if err := s.ResetSuccessors(keep, pairs, steps); err != nil {
							t.Fatal(err)
						}
						counter := []int32{0}
						samp := &Sampling{TopK: 20, Seed: 9, Counter: counter, Banned: [][]int32{{banned}}, NoRepeat: true}
						if err := s.Feed(prompt, FeedOptions{Sample: samp}); err != nil {
							t.Fatal(err)
						}
						var out []int32
						for i := 1; i < steps; i++ {
							counter[0] = int32(i)
							var tok int32
							if chained {
								tok, err = s.Next(FeedOptions{Sample: samp})
							} else if tok, err = s.Sampled(); err == nil {
								err = s.Feed([]int32{tok}, FeedOptions{Sample: samp})
							}
							if err != nil {
								t.Fatal(err)
							}
							out = append(out, tok)
						}
						tok, err := s.Sampled()
						if err != nil {
							t.Fatal(err)
						}
						return append(out, tok)
					}
					want, got := run(false), run(true)
					if !slices.Equal(got, want) {
						t.Fatalf("chained steps drew\n%v\nfeeding back drew\n%v", got, want)
					}
					// The rule itself, from plain slices: each token's keep
					// most recent distinct successors are banned after it.
					kept := map[int32][]int32{}
					text := append(slices.Clone(prompt), got...)
					for i := 1; i < len(text); i++ {
						prev, next := text[i-1], text[i]
						if i >= len(prompt) && (next == banned || slices.Contains(kept[prev], next)) {
							t.Fatalf("token %d (%d after %d) is banned", i, next, prev)
						}
						if !slices.Contains(kept[prev], next) {
							if kept[prev] = append(kept[prev], next); len(kept[prev]) > keep {
								kept[prev] = kept[prev][1:]
							}
						}
					}
				})
			}
			m.Close()
		}
	}
}
