package cli

import (
	"bufio"
	"fmt"

	"github.com/kvalign/kvalign/eval"
	"github.com/kvalign/kvalign/transformer"
	ucli "github.com/urfave/cli/v2"
)

func scoreCommand() *ucli.Command {
	return &ucli.Command{
		Name:  "score",
		Usage: "print the teacher-forced NLL of every token of a text (stdin by default) with full context, then the perplexity",
		Description: "Texts longer than the window are scored in consecutive non-overlapping windows; within a\n" +
			"window each token after the first is predicted from the tokens before it. Output: one\n" +
			"`id<TAB>nll` line per scored token, then `perplexity<TAB>P`.",
		ArgsUsage:    "[FILE]",
		OnUsageError: onUsageError,
		Flags: []ucli.Flag{
			&ucli.StringFlag{Name: "model", Required: true, Usage: "model directory or known name (distilgpt2, smollm2)"},
			&ucli.IntFlag{Name: "window", Usage: "tokens per window (default: the model's positions, at most 1024)"},
			deviceFlag(), dtypeFlag(),
		},
		Action: func(c *ucli.Context) error {
			ck, err := loadCheckpoint(c.String("model"))
			if err != nil {
				return err
			}
			text, err := readInput(c)
			if err != nil {
				return err
			}
			window := c.Int("window")
			if window == 0 {
				window = min(ck.Cfg.MaxPos, 1024)
			}
			if window < 2 {
				return usagef("--window %d: want at least 2", window)
			}
			be, dt, err := openBackend(c)
			if err != nil {
				return err
			}
			defer be.Close()
			m, err := transformer.NewModel(ck.Cfg, ck.Weights, be, dt)
			if err != nil {
				return err
			}
			defer m.Close()
			ids := toInt32(ck.Tok.Encode(string(text)))
			bar := eval.NewProgress(c.App.ErrWriter, "scoring", len(ids))
			nll, err := eval.ScoreFullContext(m, ids, window, bar.Add)
			bar.Done()
			if err != nil {
				return err
			}
			w := bufio.NewWriter(c.App.Writer)
			k := 0
			for start := 0; start < len(ids); start += window {
				end := min(start+window, len(ids))
				for i := start + 1; i < end; i++ {
					fmt.Fprintf(w, "%d\t%.6f\n", ids[i], nll[k])
					k++
				}
			}
			fmt.Fprintf(w, "perplexity\t%.4f\n", eval.Perplexity(nll))
			return w.Flush()
		},
	}
}

func toInt32(ids []int) []int32 {
	out := make([]int32, len(ids))
	for i, v := range ids {
		out[i] = int32(v)
	}
	return out
}
