package align

import (
	"path/filepath"
	"strconv"
	"testing"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/kvalign/kvalign/internal/testenv"
	"github.com/kvalign/kvalign/kvcache"
	"github.com/kvalign/kvalign/transformer"
)

func tinyModel(t *testing.T, name string, be gpu.Backend) *transformer.Model {
	t.Helper()
	dir := testenv.Testdata(t, "models", name)
	cfg, err := transformer.LoadConfig(filepath.Join(dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	w, err := transformer.LoadWeights(dir, cfg)
	if err != nil {
		t.Fatal(err)
	}
	m, err := transformer.NewModel(cfg, w, be, gpu.F32)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// manualEviction replays sw bookkeeping with a plain Runner: keys rotated
// once at the position they were computed at (no position shift), the
// incoming token at the cache length.
func manualEviction(t *testing.T, m *transformer.Model, toks []int32, size, start int) [][]float32 {
	c, _ := kvcache.New(size, start, 0)
	r, err := transformer.NewRunner(m, transformer.RunnerOptions{B: 1, MaxT: 1, MaxLen: c.Slots()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var out [][]float32
	for _, tok := range toks {
		if c.Full() {
			c.Evict()
		}
		pos := c.Len()
		slot, _ := c.Append(pos)
		if err := r.Run(&transformer.Step{T: 1, Tokens: []int32{tok}, Pos: []int32{int32(pos)}, Slots: []int32{slot},
			Order: [][]int32{c.Order()}, Logits: transformer.LastRow}); err != nil {
			t.Fatal(err)
		}
		l, _ := r.Logits(1)
		out = append(out, l)
	}
	return out
}

// KV-Align with networks whose last layer is zero (x' = x) is sw on the
// GPT-2 family and eviction without position shift on the Llama family,
// through the real realignment operation.
func TestKVAlignWithZeroLastLayer(t *testing.T) {
	for _, name := range []string{"tiny-gpt2", "tiny-llama"} {
		t.Run(name, func(t *testing.T) {
			be := gpu.NewCPU()
			m := tinyModel(t, name, be)
			cfg := m.Cfg
			const size, start = 10, 2
			pair := &Pair{}
			for i, dst := range []**Network{&pair.Keys, &pair.Values} {
				n := NewRandomNetwork(cfg.NLayer, cfg.NKV, cfg.HS, 256, 32, 16, int64(i+1))
				clear(n.W3)
				clear(n.B3)
				*dst = n
			}
			dev, err := pair.Upload(be, gpu.F32)
			if err != nil {
				t.Fatal(err)
			}
			defer dev.Close()
			kv, err := transformer.NewStream(m, transformer.StreamOptions{Mode: transformer.KVAlign, CacheSize: size, StartSize: start, Realigner: dev})
			if err != nil {
				t.Fatal(err)
			}
			defer kv.Close()
			sw, err := transformer.NewStream(m, transformer.StreamOptions{Mode: transformer.SlidingWindow, CacheSize: size, StartSize: start})
			if err != nil {
				t.Fatal(err)
			}
			defer sw.Close()
			toks := make([]int32, 40)
			for i := range toks {
				toks[i] = int32(ref.Uniform(3, uint32(i)) * float32(cfg.VocabSize))
			}
			want := manualEviction(t, m, toks, size, start)
			for i, tok := range toks {
				if err := kv.Feed([]int32{tok}, transformer.FeedOptions{}); err != nil {
					t.Fatal(err)
				}
				got, _ := kv.Logits()
				if e := testenv.RelErr(got, want[i]); e > 1e-6 {
					t.Fatalf("kv step %d vs eviction without shift: %.3g", i, e)
				}
				if cfg.Family == transformer.GPT2 {
					sw.Feed([]int32{tok}, transformer.FeedOptions{})
					swl, _ := sw.Logits()
					if e := testenv.RelErr(got, swl); e > 1e-6 {
						t.Fatalf("kv step %d vs sw: %.3g", i, e)
					}
				}
			}
		})
	}
}

// With live networks, KV-Align really rewrites the window: its logits leave
// those of plain eviction once the first eviction has happened.
func TestKVAlignRewritesTheWindow(t *testing.T) {
	be := gpu.NewCPU()
	m := tinyModel(t, "tiny-gpt2", be)
	cfg := m.Cfg
	pair := &Pair{Keys: NewRandomNetwork(cfg.NLayer, cfg.NKV, cfg.HS, 256, 32, 16, 1), Values: NewRandomNetwork(cfg.NLayer, cfg.NKV, cfg.HS, 256, 32, 16, 2)}
	dev, err := pair.Upload(be, gpu.F32)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	const size, start = 10, 2
	kv, err := transformer.NewStream(m, transformer.StreamOptions{Mode: transformer.KVAlign, CacheSize: size, StartSize: start, Realigner: dev})
	if err != nil {
		t.Fatal(err)
	}
	defer kv.Close()
	toks := make([]int32, size+3)
	for i := range toks {
		toks[i] = int32(i * 7 % cfg.VocabSize)
	}
	want := manualEviction(t, m, toks, size, start)
	for i, tok := range toks {
		kv.Feed([]int32{tok}, transformer.FeedOptions{})
		got, _ := kv.Logits()
		e := testenv.RelErr(got, want[i])
		if i <= size && e > 1e-6 {
			t.Fatalf("step %d (before any eviction) differs: %.3g", i, e)
		}
		if i > size && e < 1e-4 {
			t.Fatalf("step %d (after an eviction) is unchanged by the networks: %.3g", i, e)
		}
		t.Log("step", strconv.Itoa(i), e)
	}
}
