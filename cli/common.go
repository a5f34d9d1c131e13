package cli

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/transformer"
	ucli "github.com/urfave/cli/v2"
)

func deviceFlag() *ucli.StringFlag {
	return &ucli.StringFlag{Name: "device", Value: "auto", Usage: "where to run: auto (CUDA if built in and a GPU is present, else CPU), cuda, cuda:N or cpu"}
}

func dtypeFlag() *ucli.StringFlag {
	return &ucli.StringFlag{Name: "dtype", Value: "fp16", Usage: "weight precision on the GPU: fp16 or fp32 (the CPU computes in fp32); activations are fp32"}
}

// openBackend opens --device and says on stderr which device runs.
func openBackend(c *ucli.Context) (gpu.Backend, gpu.DType, error) {
	dt, err := gpu.ParseDType(c.String("dtype"))
	if err != nil {
		return nil, 0, usagef("--dtype: %v", err)
	}
	be, note, err := gpu.Open(c.String("device"))
	if errors.Is(err, gpu.ErrInvalidDevice) {
		return nil, 0, usageError{err}
	}
	if err != nil {
		return nil, 0, err
	}
	fmt.Fprintln(c.App.ErrWriter, note)
	return be, dt, nil
}

// loadCheckpoint resolves --model and reads it.
func loadCheckpoint(name string) (*transformer.Checkpoint, error) {
	dir, err := transformer.ResolveModel(name)
	if err != nil {
		return nil, usageError{err}
	}
	ck, err := transformer.LoadCheckpoint(dir)
	if err != nil {
		return nil, err
	}
	ck.Name = name
	return ck, nil
}

// readInput reads the named file, or stdin when no file is given or it is "-".
func readInput(c *ucli.Context) ([]byte, error) {
	switch c.NArg() {
	case 0:
		return readAll(os.Stdin, "standard input")
	case 1:
		if c.Args().First() == "-" {
			return readAll(os.Stdin, "standard input")
		}
		b, err := os.ReadFile(c.Args().First())
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", c.Args().First(), err)
		}
		return b, nil
	}
	return nil, usagef("%s takes at most one FILE argument, got %d", c.Command.Name, c.NArg())
}

func readAll(f *os.File, name string) ([]byte, error) {
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", name, err)
	}
	return b, nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
