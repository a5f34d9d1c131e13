// Package cli wires kvalign's commands to the packages that do the work:
// flags, help texts and error reporting, nothing else.
package cli

import (
	"errors"
	"fmt"
	"io"
	"strings"

	ucli "github.com/urfave/cli/v2"
)

// usageError marks a mistake in the command line (exit status 2).
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// Main runs the command line and returns the process exit status: 0, 1 for
// a failure, 2 for a usage error. Errors are one line on stderr.
func Main(args []string, stdout, stderr io.Writer) int {
	app := App(stdout, stderr)
	err := app.Run(args)
	if err == nil {
		return 0
	}
	var ue usageError
	fmt.Fprintf(stderr, "kvalign: %s\n", strings.TrimSpace(err.Error()))
	if errors.As(err, &ue) || isFlagError(err) {
		return 2
	}
	return 1
}

// isFlagError recognises urfave/cli's own parse errors (unknown flag, bad
// value), which it returns as plain errors.
func isFlagError(err error) bool {
	s := err.Error()
	for _, p := range []string{"flag provided but not defined", "invalid value", "flag needs an argument", "Required flag", "No help topic"} {
		if strings.Contains(s, p) {
			return true
		}
	}
	return false
}

// App is the command tree.
func App(stdout, stderr io.Writer) *ucli.App {
	return &ucli.App{
		Name:  "kvalign",
		Usage: "generate without end from a fixed-size KV cache, and measure how well it does",
		Description: "Three policies keep the cache bounded: sw (StreamingLLM: attention sinks plus a sliding window),\n" +
			"kv (KV-Align: learned networks realign the window after every eviction) and ar (recompute the\n" +
			"window every step). Models: GPT-2 and Llama families in Hugging Face format.",
		Writer:          stdout,
		ErrWriter:       stderr,
		HideHelpCommand: true,
		Commands: []*ucli.Command{
			infoCommand(), tokenizeCommand(), scoreCommand(), runCommand(), benchCommand(),
		},
		OnUsageError:   func(c *ucli.Context, err error, isSub bool) error { return usageError{err} },
		ExitErrHandler: func(c *ucli.Context, err error) {},
	}
}

// onUsageError makes a command's flag mistakes usage errors (exit status 2).
func onUsageError(c *ucli.Context, err error, isSub bool) error { return usageError{err} }
