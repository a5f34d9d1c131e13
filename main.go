// Command kvalign generates without end from a bounded KV cache and measures
// how well it does (StreamingLLM, KV-Align and attention recomputation).
package main

import (
	"os"

	"github.com/kvalign/kvalign/cli"
)

func main() {
	os.Exit(cli.Main(os.Args, os.Stdout, os.Stderr))
}
