package eval

import (
	"fmt"
	"time"

	"github.com/kvalign/kvalign/transformer"
)

// GenerateOptions are the sampling rules of the original generation.py.
type GenerateOptions struct {
	NumTokens    int
	FirstTopK    int    // the first token is drawn from the top FirstTopK (5)
	TopK         int    // later tokens from the top TopK (20)
	Seed         uint64 // the random stream; same seed, same device → same text
	AllowRepeats bool   // false: never repeat a 2-gram
	EOS          int32  // end-of-text id, never drawn (-1: none)
	Newline      int32  // id of "\n": the "\n\n" 2-gram is banned from the start (-1: none)
	MaxBan       int    // most tokens banned at one step (the stream's MaxBan)
}

// GenStats are the timings of one generation.
type GenStats struct {
	PromptTokens, Generated int
	FirstToken              time.Duration // from the start to the first generated token
	After                   time.Duration // total time of the tokens after the first
}

// MsPerToken is the mean latency after the first token.
func (g GenStats) MsPerToken() float64 {
	if g.Generated < 2 {
		return 0
	}
	return float64(g.After.Microseconds()) / 1000 / float64(g.Generated-1)
}

// bigrams remembers every 2-gram seen, as successor lists per token.
type bigrams map[int32][]int32

func (b bigrams) add(prev, next int32) {
	for _, t := range b[prev] {
		if t == next {
			return
		}
	}
	b[prev] = append(b[prev], next)
}

// Generate feeds the prompt and draws NumTokens tokens, calling emit with
// each as soon as it is drawn. Sampling happens on the device: the step
// that feeds a token also draws the next, with the tokens that would repeat
// a 2-gram (and end-of-text) banned beforehand — the same distribution as
// the original's ban-and-resample loop, without a round trip per retry.
func Generate(s *transformer.Stream, prompt []int32, o GenerateOptions, emit func(id int32) error) (GenStats, error) {
	st := GenStats{PromptTokens: len(prompt)}
	if len(prompt) == 0 {
		return st, fmt.Errorf("generate: empty prompt")
	}
	seen := bigrams{}
	if o.Newline >= 0 && !o.AllowRepeats {
		seen.add(o.Newline, o.Newline)
	}
	for i := 1; i < len(prompt); i++ {
		if !o.AllowRepeats {
			seen.add(prompt[i-1], prompt[i])
		}
	}
	var ban []int32
	banned := func(prev int32) []int32 {
		ban = ban[:0]
		if o.EOS >= 0 {
			ban = append(ban, o.EOS)
		}
		if !o.AllowRepeats {
			succ := seen[prev]
			if room := o.MaxBan - len(ban); len(succ) > room {
				succ = succ[len(succ)-room:] // keep the most recent: documented limit of MaxBan
			}
			ban = append(ban, succ...)
		}
		return ban
	}
	start := time.Now()
	last := prompt[len(prompt)-1]
	feed := prompt
	var firstDone time.Time
	var counter, one [1]int32
	var bans [1][]int32
	samp := &transformer.Sampling{Seed: o.Seed, Counter: counter[:], Banned: bans[:]}
	for i := 0; i < o.NumTokens; i++ {
		samp.TopK = o.TopK
		if i == 0 {
			samp.TopK = o.FirstTopK
		}
		counter[0], bans[0] = int32(i), banned(last)
		if err := s.Feed(feed, transformer.FeedOptions{Sample: samp}); err != nil {
			return st, err
		}
		next, err := s.Sampled()
		if err != nil {
			return st, err
		}
		if next < 0 {
			return st, fmt.Errorf("generate: every candidate token is banned at step %d", i)
		}
		if !o.AllowRepeats {
			seen.add(last, next)
		}
		st.Generated++
		if i == 0 {
			firstDone = time.Now()
			st.FirstToken = firstDone.Sub(start)
		}
		if err := emit(next); err != nil {
			return st, err
		}
		last = next
		one[0] = next
		feed = one[:]
	}
	if st.Generated > 1 {
		st.After = time.Since(firstDone)
	}
	return st, nil
}
