package eval

import (
	"math"
	"strconv"
	"testing"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/internal/testenv"
	"github.com/kvalign/kvalign/transformer"
)

// The per-token NLL of `kvalign score` agrees with HF (float64 golden,
// scripts/reference/hf_golden.py --parts score) within 1e-3 on 3,000
// WikiText tokens in 1024-token windows, for both fixture models.
func TestScoreMatchesHF(t *testing.T) {
	for _, name := range []string{"gutenberg-gpt2-7m", "gutenberg-llama-7m"} {
		t.Run(name, func(t *testing.T) {
			ck, err := transformer.LoadCheckpoint(testenv.Shared(t, "models", name))
			if err != nil {
				t.Fatal(err)
			}
			st, err := transformer.OpenSafeTensors(testenv.Testdata(t, "golden", "score-"+name+".safetensors"))
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			ids64, _, err := st.Int64("ids")
			if err != nil {
				t.Fatal(err)
			}
			want, _, err := st.Float32("nll")
			if err != nil {
				t.Fatal(err)
			}
			window, err := strconv.Atoi(st.Metadata()["window"])
			if err != nil {
				t.Fatalf("golden window: %v", err)
			}
			ids := make([]int32, len(ids64))
			for i, v := range ids64 {
				ids[i] = int32(v)
			}
			m, err := transformer.NewModel(ck.Cfg, ck.Weights, gpu.NewCPU(), gpu.F32)
			if err != nil {
				t.Fatal(err)
			}
			got, err := ScoreFullContext(m, ids, window, nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(want) {
				t.Fatalf("%d NLLs, HF has %d", len(got), len(want))
			}
			worst := 0.0
			for i := range want {
				d := math.Abs(float64(got[i]) - float64(want[i]))
				worst = math.Max(worst, d)
				if d > 1e-3 {
					t.Fatalf("token %d: nll %.6f, HF %.6f (|Δ| %.2g > 1e-3)", i, got[i], want[i], d)
				}
			}
			ppl, _ := strconv.ParseFloat(st.Metadata()["perplexity"], 64)
			t.Logf("worst |Δnll| %.2g over %d tokens; perplexity %.4f (HF %.4f)", worst, len(want), Perplexity(got), ppl)
		})
	}
}
