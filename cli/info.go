package cli

import (
	"fmt"
	"path/filepath"

	"github.com/kvalign/kvalign/transformer"
	ucli "github.com/urfave/cli/v2"
)

func infoCommand() *ucli.Command {
	return &ucli.Command{
		Name:         "info",
		Usage:        "describe a model: family, sizes, parameter count, dtype, tokenizer",
		ArgsUsage:    "MODEL_DIR",
		OnUsageError: onUsageError,
		Action: func(c *ucli.Context) error {
			if c.NArg() != 1 {
				return usagef("info takes one MODEL_DIR (or a known name: distilgpt2, smollm2)")
			}
			dir, err := transformer.ResolveModel(c.Args().First())
			if err != nil {
				return usageError{err}
			}
			cfg, err := transformer.LoadConfig(filepath.Join(dir, "config.json"))
			if err != nil {
				return err
			}
			st, err := transformer.OpenSafeTensors(dir)
			if err != nil {
				return err
			}
			defer st.Close()
			dtypes := map[string]int{}
			for _, n := range st.Names() {
				info, _ := st.Info(n)
				dtypes[info.DType]++
			}
			tok, err := transformer.LoadTokenizer(dir)
			if err != nil {
				return err
			}
			w := c.App.Writer
			fmt.Fprintf(w, "model       %s\n", dir)
			fmt.Fprintf(w, "family      %s\n", cfg.Family)
			fmt.Fprintf(w, "layers      %d\n", cfg.NLayer)
			fmt.Fprintf(w, "hidden      %d\n", cfg.C)
			fmt.Fprintf(w, "heads       %d query, %d key/value, head size %d\n", cfg.NH, cfg.NKV, cfg.HS)
			fmt.Fprintf(w, "mlp         %d\n", cfg.FFN)
			fmt.Fprintf(w, "positions   %d", cfg.MaxPos)
			if cfg.Family == transformer.Llama {
				fmt.Fprintf(w, " (RoPE θ=%g)", cfg.RopeTheta)
			} else {
				fmt.Fprintf(w, " (learned)")
			}
			fmt.Fprintln(w)
			fmt.Fprintf(w, "vocabulary  %d (tokenizer: %d tokens, <|endoftext|> = %d)\n", cfg.VocabSize, tok.VocabSize(), tok.EOS())
			fmt.Fprintf(w, "tied head   %v\n", cfg.TiedEmbeddings)
			fmt.Fprintf(w, "parameters  %d (%.2fM)\n", cfg.ParamCount(), float64(cfg.ParamCount())/1e6)
			fmt.Fprintf(w, "dtype       %v\n", dtypes)
			return nil
		},
	}
}
