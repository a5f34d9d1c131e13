package eval

import (
	"fmt"
	"slices"
	"time"

	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/kvalign/kvalign/transformer"
)

// Latency is the distribution of per-token decode times once the cache is full.
type Latency struct {
	Steps            int
	Median, P10, P90 time.Duration
	// Device is the mean time of a step replayed back to back without
	// waiting for each token: the GPU's share of Median. The rest is what
	// the host adds per token (staging, launching, reading the token),
	// ≈ 0 when each step is queued before the host reads the last token.
	Device time.Duration
}

// MeasureDecode fills the stream's cache with a prompt of random tokens,
// warms up, then times steps decode steps as generation runs them (each
// step feeds the token the one before drew and draws the next, on the
// device; Stream.Next): the time between tokens reaching the host, which
// is what a user streaming text waits per token.
func MeasureDecode(s *transformer.Stream, vocab, warmup, steps int) (Latency, error) {
	size := s.Cache().Size()
	prompt := make([]int32, size+1)
	for i := range prompt {
		prompt[i] = int32(ref.Uniform(7, uint32(i)) * float32(vocab))
	}
	counter := []int32{0}
	samp := &transformer.Sampling{TopK: 20, Seed: 1, Counter: counter}
	if err := s.Feed(prompt, transformer.FeedOptions{Sample: samp}); err != nil {
		return Latency{}, err
	}
	times := make([]time.Duration, 0, steps)
	last := time.Now()
	for i := 1; i <= warmup+steps; i++ {
		counter[0] = int32(i)
		if _, err := s.Next(transformer.FeedOptions{Sample: samp}); err != nil {
			return Latency{}, err
		}
		now := time.Now()
		if i > warmup {
			times = append(times, now.Sub(last))
		}
		last = now
	}
	if _, err := s.Sampled(); err != nil {
		return Latency{}, err
	}
	if len(times) == 0 {
		return Latency{}, fmt.Errorf("no timed steps")
	}
	slices.Sort(times)
	q := func(p float64) time.Duration { return times[min(len(times)-1, int(p*float64(len(times))))] }
	lat := Latency{Steps: len(times), Median: q(0.5), P10: q(0.1), P90: q(0.9)}
	start := time.Now()
	if err := s.Runner().ReplayLast(steps); err == nil {
		lat.Device = time.Since(start) / time.Duration(steps)
	}
	return lat, nil
}

// Ms is a duration in milliseconds.
func Ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }
