package eval

import (
	"slices"
	"testing"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/internal/testenv"
	"github.com/kvalign/kvalign/transformer"
)

// hostBanGenerate is generation as the host drove it before the 2-gram
// memory moved to the device: after each token the host finds every
// successor the previous token has had (prompt, "\n\n" and drawn text) and
// sends them as the step's ban list, then waits for the pick. With a memory
// large enough to keep every successor, Generate must draw the same text.
func hostBanGenerate(t *testing.T, s *transformer.Stream, prompt []int32, o GenerateOptions) []int32 {
	t.Helper()
	seen := map[int32][]int32{}
	add := func(a, b int32) {
		if !o.AllowRepeats && !slices.Contains(seen[a], b) {
			seen[a] = append(seen[a], b)
		}
	}
	if o.Newline >= 0 {
		add(o.Newline, o.Newline)
	}
	for i := 1; i < len(prompt); i++ {
		add(prompt[i-1], prompt[i])
	}
	var out []int32
	feed, last := prompt, prompt[len(prompt)-1]
	for i := 0; i < o.NumTokens; i++ {
		ban := append([]int32{o.EOS}, seen[last]...)
		k := o.TopK
		if i == 0 {
			k = o.FirstTopK
		}
		samp := &transformer.Sampling{TopK: k, Seed: o.Seed, Counter: []int32{int32(i)}, Banned: [][]int32{ban}}
		if err := s.Feed(feed, transformer.FeedOptions{Sample: samp}); err != nil {
			t.Fatal(err)
		}
		next, err := s.Sampled()
		if err != nil {
			t.Fatal(err)
		}
		add(last, next)
		out = append(out, next)
		feed, last = []int32{next}, next
	}
	return out
}

// Generate (device-side 2-gram memory, steps queued ahead) against the
// host-driven loop, on the GPT-2 fixture model and the CPU: the same text
// in sw and ar, with and without repeats allowed.
func TestGenerateMatchesHostBans(t *testing.T) {
	ck, err := transformer.LoadCheckpoint(testenv.Shared(t, "models", "gutenberg-gpt2-7m"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := transformer.NewModel(ck.Cfg, ck.Weights, gpu.NewCPU(), gpu.F32)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	prompt := make([]int32, 0, 24)
	for _, id := range ck.Tok.Encode("It was a dark and stormy night; the rain fell in torrents, except at occasional intervals.") {
		prompt = append(prompt, int32(id))
	}
	nl := ck.Tok.Encode("\n")
	for _, mode := range []transformer.Mode{transformer.SlidingWindow, transformer.Recompute} {
		for _, repeats := range []bool{false, true} {
			o := GenerateOptions{NumTokens: 80, FirstTopK: 5, TopK: 20, Seed: 11, AllowRepeats: repeats,
				EOS: int32(ck.Tok.EOS()), Newline: int32(nl[0]), Keep: 1024}
			open := func(maxBan int) *transformer.Stream {
				s, err := transformer.NewStream(m, transformer.StreamOptions{Mode: mode, CacheSize: 24, StartSize: 4, MaxBan: maxBan})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(s.Close)
				return s
			}
			want := hostBanGenerate(t, open(256), prompt, o)
			var got []int32
			st, err := Generate(open(1), prompt, o, func(id int32) error { got = append(got, id); return nil })
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("%s, repeats %v: Generate drew\n%v\nthe host-driven loop\n%v", mode, repeats, got, want)
			}
			if st.Generated != o.NumTokens || st.PromptTokens != len(prompt) {
				t.Errorf("%s: stats %+v", mode, st)
			}
		}
	}
}
