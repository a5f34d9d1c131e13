package cli

import (
	"bufio"
	"strconv"

	"github.com/kvalign/kvalign/transformer"
	ucli "github.com/urfave/cli/v2"
)

func tokenizeCommand() *ucli.Command {
	return &ucli.Command{
		Name:         "tokenize",
		Usage:        "print the token ids of a text (stdin by default), one line of space-separated ids",
		ArgsUsage:    "[FILE]",
		OnUsageError: onUsageError,
		Flags: []ucli.Flag{
			&ucli.StringFlag{Name: "model", Required: true, Usage: "a model directory, or a directory holding only tokenizer.json or vocab.json+merges.txt"},
		},
		Action: func(c *ucli.Context) error {
			tok, err := transformer.LoadTokenizer(c.String("model"))
			if err != nil {
				return err
			}
			text, err := readInput(c)
			if err != nil {
				return err
			}
			w := bufio.NewWriter(c.App.Writer)
			buf := make([]byte, 0, 16)
			for i, id := range tok.Encode(string(text)) {
				if i > 0 {
					w.WriteByte(' ')
				}
				w.Write(strconv.AppendInt(buf[:0], int64(id), 10))
			}
			w.WriteByte('\n')
			return w.Flush()
		},
	}
}
