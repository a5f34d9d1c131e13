package gpu

import (
	"errors"
	"fmt"
)

// ErrInvalidDevice is a --device value that names no backend.
var ErrInvalidDevice = errors.New("invalid --device")

// Open chooses a backend for a --device value: "cpu", "cuda" (or "cuda:N"),
// or "auto" — CUDA when this build has it and a GPU answers, else the CPU.
// The second result says which was chosen and why, for the user.
func Open(device string) (Backend, string, error) {
	switch {
	case device == "cpu":
		return NewCPU(), "device: cpu", nil
	case device == "cuda" || len(device) > 5 && device[:5] == "cuda:":
		n := 0
		if device != "cuda" {
			if _, err := fmt.Sscanf(device[5:], "%d", &n); err != nil || n < 0 {
				return nil, "", fmt.Errorf("%w %q (want auto, cpu, cuda or cuda:N)", ErrInvalidDevice, device)
			}
		}
		be, err := NewCUDA(n)
		if err != nil {
			return nil, "", err
		}
		return be, "device: " + be.Name(), nil
	case device == "auto" || device == "":
		be, err := NewCUDA(0)
		if err != nil {
			return NewCPU(), fmt.Sprintf("device: cpu (no CUDA: %v)", err), nil
		}
		return be, "device: " + be.Name(), nil
	}
	return nil, "", fmt.Errorf("%w %q (want auto, cpu, cuda or cuda:N)", ErrInvalidDevice, device)
}
