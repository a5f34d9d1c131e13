package eval

import (
	"fmt"
	"math"

	"github.com/kvalign/kvalign/transformer"
)

// ScoreFullContext is the teacher-forced NLL of every token after the first
// of each consecutive non-overlapping window of ids (the model sees the
// window's earlier tokens, as HF does with a sliding evaluation of stride =
// window). The first token of every window is not scored. progress may be
// nil.
func ScoreFullContext(m *transformer.Model, ids []int32, window int, progress func(n int)) ([]float32, error) {
	if window < 2 {
		return nil, fmt.Errorf("score window %d is too small", window)
	}
	if m.Cfg.Family == transformer.GPT2 && window > m.Cfg.MaxPos {
		return nil, fmt.Errorf("score window %d exceeds the model's %d positions", window, m.Cfg.MaxPos)
	}
	r, err := transformer.NewRunner(m, transformer.RunnerOptions{B: 1, MaxT: window, MaxLen: window})
	if err != nil {
		return nil, err
	}
	defer r.Close()
	idx := make([]int32, window)
	for i := range idx {
		idx[i] = int32(i)
	}
	var out []float32
	for start := 0; start < len(ids); start += window {
		w := ids[start:min(start+window, len(ids))]
		T := len(w)
		if T < 2 {
			break
		}
		targets := make([]int32, T)
		copy(targets, w[1:]) // the last row's target is unused
		err := r.Run(&transformer.Step{T: T, Tokens: w, Pos: idx[:T], Slots: idx[:T], Order: [][]int32{idx[:T]},
			Logits: transformer.AllRows, Targets: targets})
		if err != nil {
			return nil, err
		}
		nll, err := r.NLL(T)
		if err != nil {
			return nil, err
		}
		out = append(out, nll[:T-1]...)
		if progress != nil {
			progress(T)
		}
	}
	return out, nil
}

// Perplexity is exp(mean NLL).
func Perplexity(nll []float32) float64 {
	if len(nll) == 0 {
		return math.NaN()
	}
	var s float64
	for _, v := range nll {
		s += float64(v)
	}
	return math.Exp(s / float64(len(nll)))
}
