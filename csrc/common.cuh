// common.cuh — device helpers shared by every csrc/*.cu file: status
// handling, warp/block reductions, fp16/fp32 weight loads, RoPE frequency.
// Header-only; everything is static/inline so each .cu gets its own copy.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <utility>

#include "kvalign.h"

// KV_TRY returns the status of a failed runtime call from the enclosing
// kv_status function. It also clears the thread's "last error" (for errors
// that are not sticky, e.g. an out-of-memory cudaMalloc): otherwise the next
// operation's cudaGetLastError() would report this old failure as its own.
#define KV_TRY(call)                                   \
  do {                                                 \
    cudaError_t kv_err_ = (call);                      \
    if (kv_err_ != cudaSuccess) {                      \
      (void)cudaGetLastError();                        \
      return (kv_status)kv_err_;                       \
    }                                                  \
  } while (0)

// kv_launched is what an entry point returns after its launches.
static inline kv_status kv_launched(void) { return (kv_status)cudaGetLastError(); }

static inline int kv_ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

#define KV_FULL_MASK 0xffffffffu

__device__ __forceinline__ float kv_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(KV_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ double kv_warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(KV_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float kv_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(KV_FULL_MASK, v, o));
  return v;
}

// kv_block_sum / kv_block_max: every thread of the block gets the result.
// blockDim.x must be a multiple of 32 (≤ 1024); all threads must call it.
// scratch: __shared__ T[32]; the function syncs before reuse, so it may be
// called repeatedly with the same scratch.
template <typename T>
__device__ __forceinline__ T kv_block_sum(T v, T *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = kv_warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : (T)0;
  return kv_warp_sum(v);
}

__device__ __forceinline__ float kv_block_max(float v, float *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = kv_warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : -INFINITY;
  return kv_warp_max(v);
}

// kv_load_w reads element i of a weight-like operand stored as half (f16 = 1)
// or float (f16 = 0).
__device__ __forceinline__ float kv_load_w(const void *w, int f16, long long i) {
  return f16 ? __half2float(static_cast<const __half *>(w)[i]) : static_cast<const float *>(w)[i];
}

// kv_embedding: element c of row t of an embedding table of V rows of C
// (wte, wpe), a NaN for an id outside the table rather than a wild read
// that would poison the CUDA context.
__device__ __forceinline__ float kv_embedding(const void *table, int f16, int V, int C, int t, int c) {
  return t < 0 || t >= V ? __int_as_float(0x7fffffff) : kv_load_w(table, f16, (long long)t * C + c);
}

// kv_fix / kv_unfix: fixed point with 32 fraction bits (gpu/ref Fix,
// Unfix). Integer sums do not depend on the order of their terms, so many
// blocks can add partial results into one value with atomics and still get
// the same bits every run (the folded attention output projection). fix
// clamps to ±2^62 (NaN to −2^62) as ref.Fix does.
__device__ __forceinline__ long long kv_fix(float v) {
  return __float2ll_rn(fminf(fmaxf(v * 0x1p32f, -0x1p62f), 0x1p62f));
}
__device__ __forceinline__ float kv_unfix(long long s) { return __ll2float_rn(s) * 0x1p-32f; }

// Weight streaming shared by the GEMV kernels (matmul.cu, fused.cu).

// kv_l2_evict_first: the L2 policy of weights, which a decode step reads
// once. A step streams every weight through L2 (269 MB for SmolLM2, five
// times its 50 MB); marked evict-first, they leave the lines that are read
// again step after step (the K/V caches, the stream, the accumulators) in
// L2 instead of evicting them.
__device__ __forceinline__ unsigned long long kv_l2_evict_first() {
  unsigned long long p;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}

// kv_ld_stream16 loads 16 bytes of weights, used once: read-only path, no
// L1 allocation (the streamed weights do not evict inputs staged for
// reuse), evict-first in L2.
__device__ __forceinline__ uint4 kv_ld_stream16(const void *p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p), "l"(kv_l2_evict_first()));
  return r;
}

// kv_unpack16 widens 16 bytes of weights to VEC floats (8 halves or 4 floats).
template <bool F16>
__device__ __forceinline__ void kv_unpack16(uint4 v, float *f) {
  if constexpr (F16) {
    const __half2 *h = reinterpret_cast<const __half2 *>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const float2 t = __half22float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  } else {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
}

// kv_rope_inv_freq is HF's default RoPE inverse frequency for pair i of a
// head of HS: float32(1/θ^(float32(2i)/float32(HS))), the exponent rounded
// to float32 first and the power taken in double, exactly as
// ref.RopeInvFreq (HF computes it from an int64 arange in float32).
__host__ __device__ __forceinline__ float kv_rope_inv_freq(int i, int HS, float theta) {
  const float e = (float)(2 * i) / (float)HS;
  return (float)(1.0 / pow((double)theta, (double)e));
}

// RopeFreqs carries the RoPE inverse frequencies of heads of up to
// KV_ATTN_MAX_HS into the kernels by value (kernel parameters, so a captured
// graph keeps them): kv_rope_inv_freq computed once on the host, instead of
// per thread on the device, where the double pow and division run
// slow-path subroutines (≈2 µs of a decode attention).
struct RopeFreqs {
  float v[KV_ATTN_MAX_HS / 2];
};

static inline RopeFreqs rope_freqs(int HS, float theta) {
  RopeFreqs r{};
  if (theta != 0.f)
    for (int i = 0; i < HS / 2 && i < KV_ATTN_MAX_HS / 2; i++)
      r.v[i] = kv_rope_inv_freq(i, HS, theta);
  return r;
}

// kv_rope_pair rotates the pair (x1, x2) = (x[i], x[i + HS/2]) of a head by
// angle = position · inverse frequency (HF's rotate-half RoPE; full-range
// sincosf, as the reference).
// kv_rope_pair_sc: the same rotation by an angle's sine and cosine
// computed earlier.
__device__ __forceinline__ void kv_rope_pair_sc(float &x1, float &x2, float sn, float cs) {
  const float y1 = fmaf(x1, cs, -x2 * sn), y2 = fmaf(x2, cs, x1 * sn);
  x1 = y1;
  x2 = y2;
}
// kv_sincos: sincosf(x) as (sin, cos), behind a call. Full-range sincosf
// inlines a slow path for huge arguments at every call site; the decode
// kernels call it up to 32 times, and the copies spread their hot paths
// over more instruction-cache lines than the rest of the kernel (the
// attention's top stall in Nsight Compute was "no instruction"). One copy
// a kernel, the same bits.
static __device__ __noinline__ float2 kv_sincos(float x) {
  float sn, cs;
  sincosf(x, &sn, &cs);
  return make_float2(sn, cs);
}
__device__ __forceinline__ void kv_rope_pair(float &x1, float &x2, float angle) {
  const float2 sc = kv_sincos(angle);
  kv_rope_pair_sc(x1, x2, sc.x, sc.y);
}

// ---- asynchronous copies global → shared (cp.async, sm_80+) ----

// kv_cp_async16_cg copies 16 bytes past L1 (.cg: data a block reads once);
// with ok false it reads nothing and zero-fills (gmem must still be a valid
// address expression, not dereferenced).
__device__ __forceinline__ void kv_cp_async16_cg(void *smem, const void *gmem, bool ok = true) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(ok ? 16 : 0) : "memory");
}
// kv_cp_async16_w copies 16 bytes of weights (read once a step) past L1,
// evict-first in L2 (kv_l2_evict_first), as kv_ld_stream16 loads them.
__device__ __forceinline__ void kv_cp_async16_w(void *smem, const void *gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem),
               "l"(kv_l2_evict_first())
               : "memory");
}
// kv_cp_async16_ca copies 16 bytes allocating in L1 (.ca: data every block
// of an SM reads, such as a decode product's input row).
__device__ __forceinline__ void kv_cp_async16_ca(void *smem, const void *gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void kv_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void kv_cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
// kv_cp_async_wait waits until at most N committed groups are in flight.
template <int N>
__device__ __forceinline__ void kv_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---- the GEMVs' arithmetic (matmul.cu gemv_kernel_v1, fused.cu v1) ----

// kv_fma_x4: acc[r][n] += wf[r][4·v4 .. 4·v4+3] · x for every row r (n and
// v4 are compile-time constants once the callers' loops unroll).
template <int R, int NB, int VEC>
__device__ __forceinline__ void kv_fma_x4(float (&acc)[R][NB], int n, const float (&wf)[R][VEC], int v4, float4 x) {
#pragma unroll
  for (int r = 0; r < R; r++) {
    acc[r][n] = fmaf(wf[r][4 * v4 + 0], x.x, acc[r][n]);
    acc[r][n] = fmaf(wf[r][4 * v4 + 1], x.y, acc[r][n]);
    acc[r][n] = fmaf(wf[r][4 * v4 + 2], x.z, acc[r][n]);
    acc[r][n] = fmaf(wf[r][4 * v4 + 3], x.w, acc[r][n]);
  }
}

// kv_group_sums: every lane of each group of TPR consecutive threads (NT a
// block) gets its group's sums of acc[r][n]: shuffles within each warp,
// then, for groups wider than a warp, shared memory across the group's
// warps (a barrier: every thread of the block must call it).
template <int TPR, int NT, int R, int NB>
__device__ __forceinline__ void kv_group_sums(float (&acc)[R][NB]) {
  constexpr int SPAN = TPR < 32 ? TPR : 32, WPG = TPR > 32 ? TPR / 32 : 1;
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int n = 0; n < NB; n++)
#pragma unroll
      for (int o = SPAN / 2; o > 0; o >>= 1) acc[r][n] += __shfl_xor_sync(KV_FULL_MASK, acc[r][n], o);
  if constexpr (WPG > 1) {
    __shared__ float part[NT / 32][R * NB];
    const int warp = threadIdx.x / 32, group = threadIdx.x / TPR;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int r = 0; r < R; r++)
#pragma unroll
        for (int n = 0; n < NB; n++) part[warp][r * NB + n] = acc[r][n];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
      for (int n = 0; n < NB; n++) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < WPG; k++) t += part[group * WPG + k][r * NB + n];
        acc[r][n] = t;
      }
  }
}

// kv_global_ns is the device's %globaltimer in ns (32 ns steps on an
// H100): for timeouts of kernels that wait on other blocks.
__device__ __forceinline__ unsigned long long kv_global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---- programmatic dependent launch (PTX griddepcontrol, sm_90) ----
//
// A kernel launched with the programmatic-stream-serialization attribute
// may start while its predecessor in the stream still runs, once every
// block of the predecessor has called kv_pdl_launch_dependents (or exited).
// Before kv_pdl_wait it may read only what the predecessor does not write
// (weights, and data written by kernels before it: when it starts, its
// predecessor has passed its own wait, so every earlier kernel is complete);
// kv_pdl_wait returns once the predecessor has completed and its writes are
// visible. Without the attribute both are no-ops in effect.

// kv_pdl_launch_dependents lets the next kernel in the stream start
// launching; called after this kernel's own wait, so that at most one kernel
// prefetches ahead (triggering at the start let a whole chain of kernels
// launch at once and flood the memory system with far-ahead weight loads).
__device__ __forceinline__ void kv_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kv_pdl_wait blocks until the grids this one depends on have completed and
// their writes are visible; a no-op for a kernel launched normally.
__device__ __forceinline__ void kv_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// kv_pdl_supported: programmatic dependent launch needs compute capability 9.0.
static inline bool kv_pdl_supported() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major >= 9;
}

// kv_launch_clustered enqueues kernel<<<grid, block, smem, s>>>(args…), as a
// programmatic dependent when pdl is set, in thread block clusters of
// cluster blocks (along x) when cluster > 1 (sm_90).
template <typename... Exp, typename... Act>
cudaError_t kv_launch_clustered(void (*kernel)(Exp...), int cluster, dim3 grid, dim3 block, size_t smem,
                                cudaStream_t s, bool pdl, Act &&...args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    n++;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    n++;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Act>(args)...);
}

// kv_launch: kv_launch_clustered without clusters.
template <typename... Exp, typename... Act>
cudaError_t kv_launch(void (*kernel)(Exp...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, bool pdl,
                      Act &&...args) {
  return kv_launch_clustered(kernel, 1, grid, block, smem, s, pdl, std::forward<Act>(args)...);
}
