//go:build cuda

package align

import (
	"github.com/kvalign/kvalign/gpu"
)

// gpuBackends are the GPU backends policy tests compare with the CPU.
func gpuBackends() []namedBackend {
	return []namedBackend{{"cuda-fp32", gpu.F32, true}, {"cuda-fp16", gpu.F16, false}}
}
