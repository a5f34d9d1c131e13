//go:build !cuda

package gpu

// NewCUDA would open CUDA device number device; this build has no CUDA
// backend (it was built without the cuda tag), so it always fails and callers
// such as Open fall back to the CPU.
func NewCUDA(device int) (Backend, error) {
	return nil, &Error{Op: "cuda", Msg: "kvalign was built without CUDA (build with make, which uses nvcc)"}
}
