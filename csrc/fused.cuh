// fused.cuh — fused.cu's entry points and the fused kernels' device helpers
// for the other csrc files, and norm.cu's for fused.cu (C++ linkage, not
// part of the C interface in kvalign.h).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

// Device helpers of the fused kernels (fused.cu, mlp.cu).

// load_norm_w: element c of norm weights staged in shared memory as stored.
__device__ __forceinline__ float load_norm_w(const unsigned char *s, int f16, int c) {
  return f16 ? __half2float(reinterpret_cast<const __half *>(s)[c]) : reinterpret_cast<const float *>(s)[c];
}

// load_norm_w4: elements 4·i … 4·i+3 of norm weights staged in shared memory.
__device__ __forceinline__ float4 load_norm_w4(const unsigned char *s, int f16, int i) {
  if (!f16) return reinterpret_cast<const float4 *>(s)[i];
  const uint2 u = reinterpret_cast<const uint2 *>(s)[i];
  const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&u.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

// silu(g)·u as activation.cu's silu_mul_kernel_v1 (full-precision expf).
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

__device__ __forceinline__ float gelu_new(float v) {
  // As activation.cu's gelu_new_kernel_v1: full-precision tanhf.
  return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

// block_sum_rows: v[n] becomes the block-wide sum for every n < NB, in every
// thread of a block of WARPS warps. red is this call's own scratch (each
// call site passes a different one, so no barrier is needed before reuse).
template <int WARPS, int NB>
__device__ __forceinline__ void block_sum_rows(float (&v)[NB], float (*red)[NB]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int n = 0; n < NB; n++) v[n] = kv_warp_sum(v[n]);
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < NB; n++) red[warp][n] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < NB; n++) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < WARPS; k++) t += red[k][n];
    v[n] = t;
  }
}

// kv_aligned16: p is 16-byte aligned (16-byte loads, cp.async).
inline bool kv_aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// kv_gemv_fused_takes: whether kv_matmul's default one-token path
// (variant 0) runs fused.cu's GEMV for these shapes and 16-byte aligned
// operands, rather than matmul.cu's gemv_kernel_v1 (whose sums head.cu's
// screened LM head repeats).
bool kv_gemv_fused_takes(int w_f16, int N, int K, int OC);
// kv_gemv_as_dependent enqueues out[N,K→OC] (+)= in·wᵀ + bias as fused.cu's
// GEMV (input staged in shared memory, no transform) launched as a
// programmatic dependent, so that its weight loads overlap the previous
// kernel. Returns false, launching nothing, where that does not apply
// (before sm_90, N > 8, shapes the kernel cannot take, more blocks than the
// single-kernel path allows); *err holds the launch status otherwise.
// lead: let the next kernel launch at once (kv_matmul_lead).
bool kv_gemv_as_dependent(cudaStream_t s, float *out, const float *in, const void *w, int w_f16, const void *bias,
                          int bias_f16, int N, int K, int OC, int accumulate, int lead, cudaError_t *err);

// kv_norm_v2 (norm.cu) launches the one-warp-a-row norm (RMSNorm where rms,
// else LayerNorm with b) where its shape and alignment allow (C ≤ 2048),
// returning false otherwise; with acc the row is in + unfix(acc) and acc
// (and clear, if not NULL) is zeroed (kv_norm_sum). *err holds the launch
// status.
bool kv_norm_v2(cudaStream_t s, float *out, const float *in, const void *w, const void *b, int w_f16, int N, int C,
                float eps, int rms, long long *acc, long long *clear, cudaError_t *err);
