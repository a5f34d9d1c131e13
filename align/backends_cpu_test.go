//go:build !cuda

package align

// gpuBackends are the GPU backends policy tests compare with the CPU: none
// in a build without CUDA.
func gpuBackends() []namedBackend { return nil }
