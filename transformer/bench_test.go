package transformer

import (
	"testing"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/internal/testenv"
)

// BenchmarkDecodeCPU is batch-1 decoding on the CPU backend with a full
// cache of 255 entries (sw), for both fixture models; it reports tokens/s.
func BenchmarkDecodeCPU(b *testing.B) {
	for _, name := range []string{"gutenberg-gpt2-7m", "gutenberg-llama-7m"} {
		b.Run(name, func(b *testing.B) {
			ck, err := LoadCheckpoint(testenv.Shared(b, "models", name))
			if err != nil {
				b.Fatal(err)
			}
			m, err := NewModel(ck.Cfg, ck.Weights, gpu.NewCPU(), gpu.F32)
			if err != nil {
				b.Fatal(err)
			}
			s, err := NewStream(m, StreamOptions{Mode: SlidingWindow, CacheSize: 255, StartSize: 4, MaxBan: 1})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			if err := s.Feed(testTokens(256, ck.Cfg.VocabSize, 1), FeedOptions{}); err != nil {
				b.Fatal(err)
			}
			tok := []int32{1}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if err := s.Feed(tok, FeedOptions{Sample: &Sampling{TopK: 20, Seed: 1, Counter: []int32{int32(i)}}}); err != nil {
					b.Fatal(err)
				}
				next, err := s.Sampled()
				if err != nil {
					b.Fatal(err)
				}
				tok[0] = next
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}
