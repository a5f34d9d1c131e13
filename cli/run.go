package cli

import (
	ucli "github.com/urfave/cli/v2"
)

func runCommand() *ucli.Command {
	return &ucli.Command{Name: "run", Usage: "stream text without end from a bounded KV cache", Action: func(c *ucli.Context) error { return usagef("run: not yet implemented") }}
}

func benchCommand() *ucli.Command {
	return &ucli.Command{Name: "bench", Usage: "benchmarks", Action: func(c *ucli.Context) error { return usagef("bench: not yet implemented") }}
}
