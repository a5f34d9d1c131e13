//go:build cuda

package transformer

import (
	"testing"

	"github.com/kvalign/kvalign/gpu"
)

func testBackends(t *testing.T) []testBackend {
	bs := []testBackend{
		{name: "cpu", be: gpu.NewCPU(), dtype: gpu.F32, tol: 1e-4, exact: true},
		{name: "cpu-fused", be: gpu.NewCPUFused(), dtype: gpu.F32, tol: 1e-4, exact: true},
		{name: "cpu-fused-fold", be: foldingCPU{gpu.NewCPUFused()}, dtype: gpu.F32, tol: 1e-4, exact: true},
		{name: "cpu-fused-noblock", be: blocklessCPU{gpu.NewCPUFused()}, dtype: gpu.F32, tol: 1e-4, exact: true},
	}
	for _, v := range []struct {
		name  string
		dt    gpu.DType
		tol   float64
		exact bool
	}{{"cuda-fp32", gpu.F32, 1e-4, true}, {"cuda-fp16", gpu.F16, 2e-2, false}} {
		be, err := gpu.NewCUDA(0)
		if err != nil {
			t.Fatalf("CUDA build but no GPU: %v", err)
		}
		t.Cleanup(func() { be.Close() })
		bs = append(bs, testBackend{name: v.name, be: be, dtype: v.dt, tol: v.tol, exact: v.exact})
	}
	return bs
}
