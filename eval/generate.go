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
	EOS          int32  // end-of-text id, never drawn (-1: none; needs a stream MaxBan ≥ 1)
	Newline      int32  // id of "\n": the "\n\n" 2-gram is banned from the start (-1: none)
	// Keep is how many distinct successors of each token the 2-gram memory
	// keeps (the most recent): a token that has followed another more
	// than Keep tokens ago may follow it again. The original keeps all.
	Keep int
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

// Generate feeds the prompt and draws NumTokens tokens, calling emit with
// each as soon as the host has it. Sampling happens on the device, with
// end-of-text and every token that would repeat a 2-gram banned
// beforehand (the 2-gram memory lives on the device too, and each pick is
// recorded there): the same distribution as the original's
// ban-and-resample loop, without a round trip per retry. Under sw and kv
// each step is queued before the host reads the token of the step before
// (Stream.Next), so the device never waits for the host.
func Generate(s *transformer.Stream, prompt []int32, o GenerateOptions, emit func(id int32) error) (GenStats, error) {
	st := GenStats{PromptTokens: len(prompt)}
	if len(prompt) == 0 {
		return st, fmt.Errorf("generate: empty prompt")
	}
	if o.NumTokens < 1 {
		return st, fmt.Errorf("generate: %d tokens asked for", o.NumTokens)
	}
	var counter [1]int32
	var bans [1][]int32
	if o.EOS >= 0 {
		bans[0] = []int32{o.EOS}
	}
	samp := &transformer.Sampling{Seed: o.Seed, Counter: counter[:], Banned: bans[:], NoRepeat: !o.AllowRepeats}
	if !o.AllowRepeats {
		var pairs [][2]int32
		if o.Newline >= 0 {
			pairs = append(pairs, [2]int32{o.Newline, o.Newline})
		}
		for i := 1; i < len(prompt); i++ {
			pairs = append(pairs, [2]int32{prompt[i-1], prompt[i]})
		}
		if err := s.ResetSuccessors(o.Keep, pairs, o.NumTokens); err != nil {
			return st, err
		}
	}
	start := time.Now()
	samp.TopK = o.FirstTopK
	if err := s.Feed(prompt, transformer.FeedOptions{Sample: samp}); err != nil {
		return st, err
	}
	var firstDone time.Time
	for i := 1; i <= o.NumTokens; i++ {
		// Queue step i (it feeds token i−1 and draws token i), then take
		// token i−1; the last token needs no step after it.
		var next int32
		var err error
		if i < o.NumTokens {
			counter[0], samp.TopK = int32(i), o.TopK
			next, err = s.Next(transformer.FeedOptions{Sample: samp})
		} else {
			next, err = s.Sampled()
		}
		if err != nil {
			return st, err
		}
		if next < 0 {
			return st, fmt.Errorf("generate: every candidate token is banned at step %d", i-1)
		}
		st.Generated++
		if i == 1 {
			firstDone = time.Now()
			st.FirstToken = firstDone.Sub(start)
		}
		if err := emit(next); err != nil {
			return st, err
		}
	}
	if st.Generated > 1 {
		st.After = time.Since(firstDone)
	}
	return st, nil
}
