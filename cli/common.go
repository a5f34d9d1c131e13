package cli

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/kvalign/kvalign/align"
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

func decodeKernelFlag() *ucli.StringFlag {
	return &ucli.StringFlag{Name: "decode-kernel", Value: "chain", Usage: "one-token steps: chain (fused kernels, a few launches a layer; SmolLM2's q|k|v product and attention output projection inside its attention kernel: two a layer), chain3 (the q|k|v product a launch of its own), chain4 (the output projection too), or persistent (all layers in one launch, CUDA with fp16 weights; an experiment, slower so far)"}
}

func lmHeadFlag() *ucli.StringFlag {
	return &ucli.StringFlag{Name: "lm-head", Value: "full", Usage: "the LM head of sampled one-token steps: full (every logit) or screened (an int8 copy ranks the vocabulary and only the rows that could be drawn are computed exactly: the same tokens from about half the head's bytes; CUDA with fp16 weights; an experiment, not faster end to end yet)"}
}

func placementFlag() *ucli.StringFlag {
	return &ucli.StringFlag{Name: "placement", Value: "timed", Usage: "where a one-token step's state buffers sit (CUDA): timed (when a stream is made, its step is timed with each buffer moved by 64 KB, and moves that make it faster are kept: where those lines sit in L2 moves a SmolLM2 step by ~1%) or fixed (as laid out, for comparisons); results are the same bits either way"}
}

func alignKernelFlag() *ucli.StringFlag {
	return &ucli.StringFlag{Name: "align-kernel", Value: "auto", Usage: "KV-Align networks on the GPU: auto (packed, in the precision of --dtype), fp32 (packed, fp32 also for an fp16 model) or unpacked (the fp32 kernel of the plain networks)"}
}

// chosenDecodeKernel reads --decode-kernel and --lm-head.
func chosenDecodeKernel(c *ucli.Context) (transformer.DecodeKernel, error) {
	var k transformer.DecodeKernel
	switch name := c.String("decode-kernel"); name {
	case "chain":
	case "chain3":
		k.Unblocked = true
	case "chain4":
		k.Unfolded = true
	case "persistent":
		k.Persistent = true
	default:
		return k, usagef("unknown --decode-kernel %q (want chain, chain3, chain4 or persistent)", name)
	}
	switch head := c.String("lm-head"); head {
	case "full", "":
	case "screened":
		k.ScreenHead = true
	default:
		return k, usagef("unknown --lm-head %q (want screened or full)", head)
	}
	switch pl := c.String("placement"); pl {
	case "timed", "":
	case "fixed":
		k.FixedPlacement = true
	default:
		return k, usagef("unknown --placement %q (want timed or fixed)", pl)
	}
	return k, nil
}

func checkAlignKernel(c *ucli.Context) error {
	if k := c.String("align-kernel"); k != "auto" && k != "fp32" && k != "unpacked" {
		return usagef("unknown --align-kernel %q (want auto, fp32 or unpacked)", k)
	}
	return nil
}

// uploadNetworks puts the KV-Align networks on the backend as --align-kernel
// says.
func uploadNetworks(c *ucli.Context, pair *align.Pair, be gpu.Backend, dt gpu.DType) (*align.Device, error) {
	if err := checkAlignKernel(c); err != nil {
		return nil, err
	}
	if k := c.String("align-kernel"); k != "auto" {
		return pair.UploadAs(be, gpu.F32, k == "fp32")
	}
	return pair.Upload(be, dt)
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
