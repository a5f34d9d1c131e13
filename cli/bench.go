package cli

import (
	ucli "github.com/urfave/cli/v2"
)

func benchCommand() *ucli.Command {
	return &ucli.Command{Name: "bench", Usage: "benchmarks", Action: func(c *ucli.Context) error { return usagef("bench: not yet implemented") }}
}
