//go:build !cuda

package transformer

import (
	"testing"

	"github.com/kvalign/kvalign/gpu"
)

// testBackends lists the backends model tests run on: the CPU here; the
// CUDA build adds the GPU in fp32 and fp16 (backends_cuda_test.go).
func testBackends(t *testing.T) []testBackend {
	return []testBackend{
		{name: "cpu", be: gpu.NewCPU(), dtype: gpu.F32, tol: 1e-4, exact: true},
		{name: "cpu-fused", be: gpu.NewCPUFused(), dtype: gpu.F32, tol: 1e-4, exact: true},
		{name: "cpu-fused-fold", be: foldingCPU{gpu.NewCPUFused()}, dtype: gpu.F32, tol: 1e-4, exact: true},
		{name: "cpu-fused-noblock", be: blocklessCPU{gpu.NewCPUFused()}, dtype: gpu.F32, tol: 1e-4, exact: true},
	}
}
