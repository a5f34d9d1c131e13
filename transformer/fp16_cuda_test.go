//go:build cuda

package transformer

import (
	"os"
	"testing"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/internal/testenv"
)

// teacherForcedArgmax is the top-1 prediction at every position of ids,
// in one prefill per 1024-token window.
func teacherForcedArgmax(t *testing.T, ck *Checkpoint, dt gpu.DType, ids []int32) []int {
	be, err := gpu.NewCUDA(0)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	m, err := NewModel(ck.Cfg, ck.Weights, be, dt)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	const window = 1024
	r, err := NewRunner(m, RunnerOptions{B: 1, MaxT: window, MaxLen: window})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	idx := make([]int32, window)
	for i := range idx {
		idx[i] = int32(i)
	}
	V := ck.Cfg.VocabSize
	var out []int
	for start := 0; start < len(ids); start += window {
		w := ids[start:min(start+window, len(ids))]
		T := len(w)
		if err := r.Run(&Step{T: T, Tokens: w, Pos: idx[:T], Slots: idx[:T], Order: [][]int32{idx[:T]}, Logits: AllRows}); err != nil {
			t.Fatal(err)
		}
		l, err := r.Logits(T)
		if err != nil {
			t.Fatal(err)
		}
		for p := 0; p < T; p++ {
			out = append(out, Argmax(l[p*V:p*V+V]))
		}
	}
	return out
}

// fp16 weights predict the same next token as fp32 at ≥ 99% of 2,000
// teacher-forced WikiText positions, for both fixture models.
func TestFP16TopOneAgreement(t *testing.T) {
	text, err := os.ReadFile(testenv.Shared(t, "data", "wikitext-test.txt"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"gutenberg-gpt2-7m", "gutenberg-llama-7m"} {
		t.Run(name, func(t *testing.T) {
			ck, err := LoadCheckpoint(testenv.Shared(t, "models", name))
			if err != nil {
				t.Fatal(err)
			}
			all := ck.Tok.Encode(string(text[:40000]))
			if len(all) < 2000 {
				t.Fatalf("only %d tokens", len(all))
			}
			ids := make([]int32, 2000)
			for i := range ids {
				ids[i] = int32(all[i])
			}
			a := teacherForcedArgmax(t, ck, gpu.F32, ids)
			b := teacherForcedArgmax(t, ck, gpu.F16, ids)
			same := 0
			for i := range a {
				if a[i] == b[i] {
					same++
				}
			}
			frac := float64(same) / float64(len(a))
			t.Logf("fp16 vs fp32 top-1 agreement: %d/%d = %.2f%%", same, len(a), 100*frac)
			if frac < 0.99 {
				t.Fatalf("fp16 vs fp32 top-1 agreement %.2f%% < 99%%", 100*frac)
			}
		})
	}
}
