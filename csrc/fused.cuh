// fused.cuh — fused.cu's entry points for the other csrc files (C++ linkage,
// not part of the C interface in kvalign.h).
#pragma once

#include <cuda_runtime.h>

// kv_gemv_as_dependent enqueues out[N,K→OC] (+)= in·wᵀ + bias as fused.cu's
// GEMV (input staged in shared memory, no transform) launched as a
// programmatic dependent, so that its weight loads overlap the previous
// kernel. Returns false, launching nothing, where that does not apply
// (before sm_90, N > 8, shapes the kernel cannot take, more blocks than the
// single-kernel path allows); *err holds the launch status otherwise.
// carve: KV_SHARED_CARVEOUT's largest-carveout copy where it exists.
bool kv_gemv_as_dependent(cudaStream_t s, float *out, const float *in, const void *w, int w_f16, const void *bias,
                          int bias_f16, int N, int K, int OC, int accumulate, bool carve, cudaError_t *err);
