// norm.cu — LayerNorm (GPT-2, torch.nn.LayerNorm: biased variance) and
// RMSNorm (HF LlamaRMSNorm) over rows of C. Weights and bias are half or
// float (w_f16); arithmetic is fp32.
#include "common.cuh"
#include "fused.cuh"

// Threads per row: about four elements each, a whole number of warps.
static int norm_threads(int C) {
  int t = (C / 4 + 31) / 32 * 32;
  return t < 32 ? 32 : t > 1024 ? 1024 : t;
}

// v1: one block per row, two passes (mean, then the sum of squared
// deviations), matching the float64 reference to ~1e-6 where the one-pass
// E[x²]−E[x]² form would cancel badly for rows with a large mean. The second
// and third reads of the row hit L1.
__global__ void layernorm_kernel_v1(float *__restrict__ out, const float *__restrict__ in,
                                    const void *__restrict__ w, const void *__restrict__ b,
                                    int w_f16, int C, float eps) {
  __shared__ float scratch[32];
  const float *x = in + (long long)blockIdx.x * C;
  float *o = out + (long long)blockIdx.x * C;
  float sum = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) sum += x[c];
  const float mean = kv_block_sum(sum, scratch) / (float)C;
  float ss = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float d = x[c] - mean;
    ss += d * d;
  }
  const float rstd = 1.f / sqrtf(kv_block_sum(ss, scratch) / (float)C + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float y = (x[c] - mean) * rstd * kv_load_w(w, w_f16, c);
    if (b != nullptr) y += kv_load_w(b, w_f16, c);
    o[c] = y;
  }
}

// v1: one block per row, sum of squares in fp32.
__global__ void rmsnorm_kernel_v1(float *__restrict__ out, const float *__restrict__ in,
                                  const void *__restrict__ w, int w_f16, int C, float eps) {
  __shared__ float scratch[32];
  const float *x = in + (long long)blockIdx.x * C;
  float *o = out + (long long)blockIdx.x * C;
  float ss = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) ss += x[c] * x[c];
  const float rstd = 1.f / sqrtf(kv_block_sum(ss, scratch) / (float)C + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) o[c] = x[c] * rstd * kv_load_w(w, w_f16, c);
}

// v2: one warp per row, the row held in registers (V4 float4 per lane, so
// C ≤ 128·V4): x, w and b are all loaded up front, so a row costs one
// memory round trip and two warp reductions, with no __syncthreads — for
// decode (N = 1) the kernel is pure latency, and v1's three dependent
// passes over global memory and block reductions cost twice as long. Needs
// C % 4 == 0 and 16-byte (8-byte for half weights) aligned rows.
// acc (kv_norm_sum; NULL otherwise): the row is in + unfix(acc), loaded
// together, and the warp then zeroes its row of acc (it alone reads it),
// and of clear (NULL or another [N, C] accumulator to leave zero).
template <int V4, bool RMS>
__global__ void __launch_bounds__(128)
    norm_kernel_v2(float *__restrict__ out, const float *__restrict__ in, const void *__restrict__ w,
                   const void *__restrict__ b, int w_f16, int N, int C, float eps, int pdl,
                   long long *__restrict__ acc, long long *__restrict__ clear) {
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= N) return;
  const int C4 = C >> 2;
  const float4 *x4 = reinterpret_cast<const float4 *>(in + (long long)r * C);
  float4 x[V4], wv[V4], bv[V4];
  // The weights first: a programmatic dependent (kv_launch with pdl) reads
  // them before its wait, and the row only after it.
#pragma unroll
  for (int j = 0; j < V4; j++) {
    const int i = lane + 32 * j;
    wv[j] = bv[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i < C4) {
      if (w_f16) {
        const uint2 h = reinterpret_cast<const uint2 *>(w)[i];
        const float2 lo = __half22float2(*reinterpret_cast<const __half2 *>(&h.x));
        const float2 hi = __half22float2(*reinterpret_cast<const __half2 *>(&h.y));
        wv[j] = make_float4(lo.x, lo.y, hi.x, hi.y);
        if (!RMS && b != nullptr) {
          const uint2 g = reinterpret_cast<const uint2 *>(b)[i];
          const float2 blo = __half22float2(*reinterpret_cast<const __half2 *>(&g.x));
          const float2 bhi = __half22float2(*reinterpret_cast<const __half2 *>(&g.y));
          bv[j] = make_float4(blo.x, blo.y, bhi.x, bhi.y);
        }
      } else {
        wv[j] = reinterpret_cast<const float4 *>(w)[i];
        if (!RMS && b != nullptr) bv[j] = reinterpret_cast<const float4 *>(b)[i];
      }
    }
  }
  // The wait is unconditional (a no-op for a normal launch): inside a branch
  // the compiler may move the row's loads above it (docs/PERF.md version 15:
  // stale rows in the tiny models' decode steps). Only the trigger depends
  // on pdl.
  kv_pdl_wait();
  if (pdl) kv_pdl_launch_dependents();
#pragma unroll
  for (int j = 0; j < V4; j++) x[j] = lane + 32 * j < C4 ? x4[lane + 32 * j] : make_float4(0.f, 0.f, 0.f, 0.f);
  if (acc != nullptr) {
    longlong2 *a2 = reinterpret_cast<longlong2 *>(acc + (long long)r * C);
    longlong2 a[V4][2];
#pragma unroll
    for (int j = 0; j < V4; j++) {
      const int i = lane + 32 * j;
      if (i < C4) {
        a[j][0] = a2[2 * i];
        a[j][1] = a2[2 * i + 1];
      }
    }
#pragma unroll
    for (int j = 0; j < V4; j++) {
      const int i = lane + 32 * j;
      if (i < C4) {  // in + unfix(acc), as ref.SumAcc
        x[j].x += kv_unfix(a[j][0].x);
        x[j].y += kv_unfix(a[j][0].y);
        x[j].z += kv_unfix(a[j][1].x);
        x[j].w += kv_unfix(a[j][1].y);
        a2[2 * i] = a2[2 * i + 1] = make_longlong2(0, 0);
      }
    }
    if (clear != nullptr) {
      longlong2 *c2 = reinterpret_cast<longlong2 *>(clear + (long long)r * C);
#pragma unroll
      for (int j = 0; j < V4; j++) {
        const int i = lane + 32 * j;
        if (i < C4) c2[2 * i] = c2[2 * i + 1] = make_longlong2(0, 0);
      }
    }
  }
  float mean = 0.f;
  if (!RMS) {
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < V4; j++) sum += (x[j].x + x[j].y) + (x[j].z + x[j].w);
    mean = kv_warp_sum(sum) / (float)C;
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < V4; j++) {
    if (lane + 32 * j < C4) {  // padding lanes hold 0, which is not 0 − mean
      const float a = x[j].x - mean, bb = x[j].y - mean, c = x[j].z - mean, d = x[j].w - mean;
      ss += (a * a + bb * bb) + (c * c + d * d);
    }
  }
  const float rstd = 1.f / sqrtf(kv_warp_sum(ss) / (float)C + eps);
  float4 *o4 = reinterpret_cast<float4 *>(out + (long long)r * C);
#pragma unroll
  for (int j = 0; j < V4; j++) {
    const int i = lane + 32 * j;
    if (i < C4) {
      float4 y;
      y.x = (x[j].x - mean) * rstd * wv[j].x + bv[j].x;
      y.y = (x[j].y - mean) * rstd * wv[j].y + bv[j].y;
      y.z = (x[j].z - mean) * rstd * wv[j].z + bv[j].z;
      y.w = (x[j].w - mean) * rstd * wv[j].w + bv[j].w;
      o4[i] = y;
    }
  }
}

static bool aligned(const void *p, int n) { return ((uintptr_t)p % n) == 0; }

// norm_launch_v2 launches v2 when the shape and alignment allow it
// (C ≤ 2048), returning false otherwise (the launch's error in *err).
template <bool RMS>
static bool norm_launch_v2(kv_stream s, float *out, const float *in, const void *w, const void *b,
                           int w_f16, int N, int C, float eps, cudaError_t *err, long long *acc = nullptr,
                           long long *clear = nullptr) {
  const int wa = w_f16 ? 8 : 16;
  if (C % 4 != 0 || !aligned(out, 16) || !aligned(in, 16) || !aligned(w, wa) ||
      (b != nullptr && !aligned(b, wa)) || !aligned(acc, 16) || !aligned(clear, 16))
    return false;
  const int need = (C + 127) / 128;  // float4 per lane
  const dim3 grid(kv_ceil_div(N, 4)), block(128);
  // Decode-size norms (decode's final norm, before the LM head) launch as
  // programmatic dependents, their weights loading while the predecessor
  // finishes, and let the next kernel launch once they have waited. Not
  // prefill-size ones: with their trigger, the GEMM after each of GPT-2's
  // prefill norms launched early and took 2.5–3.5 µs longer (ar at cache
  // 255: +52 µs a step; H100, docs/PERF.md version 15).
  const bool pdl = N <= 8 && kv_pdl_supported();
#define KV_NORM_V2(n)                                                                      \
  case n:                                                                                  \
    *err = kv_launch(norm_kernel_v2<n, RMS>, grid, block, 0, s, pdl, out, in, w, b, w_f16, N, C, eps, (int)pdl, acc, clear); \
    return true;
  switch (need) {
    KV_NORM_V2(1)
    KV_NORM_V2(2)
    KV_NORM_V2(3)
    KV_NORM_V2(4)
    KV_NORM_V2(5)
    KV_NORM_V2(6)
    KV_NORM_V2(7)
    KV_NORM_V2(8)
    case 9: case 10: case 11:
    KV_NORM_V2(12)
    case 13: case 14: case 15:
    KV_NORM_V2(16)
  }
#undef KV_NORM_V2
  return false;
}

// variant: 0 chooses (v2 where it applies, else v1), 1 or 2 forces one (2
// falls back to v1 when it does not apply).
extern "C" kv_status kv_layernorm(kv_stream s, float *out, const float *in, const void *w,
                                  const void *b, int w_f16, int N, int C, float eps, int variant) {
  if (N <= 0 || C <= 0) return 0;
  cudaError_t e = cudaSuccess;
  if (variant == 1 || !norm_launch_v2<false>(s, out, in, w, b, w_f16, N, C, eps, &e))
    layernorm_kernel_v1<<<N, norm_threads(C), 0, s>>>(out, in, w, b, w_f16, C, eps);
  KV_TRY(e);
  return kv_launched();
}

extern "C" kv_status kv_rmsnorm(kv_stream s, float *out, const float *in, const void *w,
                                int w_f16, int N, int C, float eps, int variant) {
  if (N <= 0 || C <= 0) return 0;
  cudaError_t e = cudaSuccess;
  if (variant == 1 || !norm_launch_v2<true>(s, out, in, w, nullptr, w_f16, N, C, eps, &e))
    rmsnorm_kernel_v1<<<N, norm_threads(C), 0, s>>>(out, in, w, w_f16, C, eps);
  KV_TRY(e);
  return kv_launched();
}

// kv_norm_v2: norm_launch_v2 for fused.cu's kv_norm_sum (see fused.cuh).
bool kv_norm_v2(cudaStream_t s, float *out, const float *in, const void *w, const void *b, int w_f16, int N, int C,
                float eps, int rms, long long *acc, long long *clear, cudaError_t *err) {
  return rms ? norm_launch_v2<true>(s, out, in, w, b, w_f16, N, C, eps, err, acc, clear)
             : norm_launch_v2<false>(s, out, in, w, b, w_f16, N, C, eps, err, acc, clear);
}
