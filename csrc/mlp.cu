// mlp.cu — a one-token MLP block in one launch (kv_mlp_acc).
//
// Batch-1 decoding is bound by the chain of dependent kernels, not by
// arithmetic: the MLP as two products (norm → gate|up, then SwiGLU → down)
// costs two kernel boundaries and a round trip of the F-wide activation
// through L2. Here each block owns FS columns of the activation instead:
// it stages its FS rows of the up weights (gate and up rows for SwiGLU) and
// the FS matching columns of the down weights in shared memory before its
// programmatic wait, then normalises the input, computes its FS activations
// and multiplies them by its down columns. Its predecessor, the attention
// output projection, is a kv_matmul_lead, so this kernel launches while the
// attention still runs and its weights are staged by the time it may go
// on (with the launch after the projection's wait, staging the down columns
// after the wait measured faster; docs/PERF.md, versions 13 and 17). The
// blocks' partial outputs meet in a fixed-point accumulator (kv_fix,
// atomics): integer sums do not depend on their order, so every run gives
// the same bits. The next layer's q|k|v product adds the accumulator to the
// residual stream (kv_norm_matmul_store_sum). Where the attention output
// projection is folded into the attention (kv_attention_out), this kernel
// is its consumer: it adds that accumulator to the stream first (in_acc),
// so a layer is three launches, or two where the q|k|v product is folded
// in as well (kv_attention_block; docs/PERF.md, versions 23 and 24).
//
// Its footprint is part of the design: at 32 registers a thread the next
// layer's attention clusters launch beside it ~6 µs before it ends. The
// weights held in registers instead (117 a thread) made its own phases
// shorter and delayed that launch, +145 µs a token (docs/PERF.md,
// version 27): a change here must not add per-thread state.
#include "common.cuh"
#include "fused.cuh"
#include "stamps.cuh"

#include <cuda_fp16.h>

namespace {

constexpr int kMlpThreads = 256;
constexpr int kMlpWarps = kMlpThreads / 32;
constexpr int kMlpFS = 16;  // activation columns a block
// Variant 0 takes MLPs of at most this many weight bytes. SmolLM2's 5.3 MB
// gained (H100, bench decode, cache 255: 0.528–0.543 ms a token against
// 0.589–0.593 for the two-product chain with the fold); distilgpt2's 9.4 MB
// lost (0.190–0.204 against 0.173) with every block width tried (8, 16, 32
// columns) and with the down columns staged before or after the wait. Its
// atomics cost ~9 µs a step (192 blocks add into each output), and at cache
// 255 it loses ~16 µs more for a reason still open (docs/PERF.md, versions
// 13 and 14).
#ifndef KV_MLP_MAX_MIB  // an experiment build may move the limit (nvcc -DKV_MLP_MAX_MIB=n)
#define KV_MLP_MAX_MIB 8
#endif
constexpr size_t kMlpMaxBytes = (size_t)KV_MLP_MAX_MIB << 20;

// mlp_smem: the dynamic shared memory of mlp_acc_kernel_v1: the up rows
// [G·FS][C] and down columns [C][FS] (half), the input rows [N][C] (float),
// the down bias [C] (float), the norm weights and bias as stored.
size_t mlp_smem(int N, int C, int swiglu, int norm_f16) {
  const size_t g = swiglu ? 2 : 1;
  return g * kMlpFS * C * 2 + (size_t)C * kMlpFS * 2 + (size_t)N * C * 4 + (size_t)C * 4 +
         2 * (size_t)C * (norm_f16 ? 2 : 4);
}

// mlp_acc_kernel_v1: acc[n] += fix(act(norm(in[n])·upᵀ + up_b)[f0:f0+FS] ·
// down[:, f0:f0+FS]ᵀ) (+ fix(down_b) from block 0), f0 = blockIdx.x·FS.
// RMS: RMSNorm (no norm bias), else LayerNorm. SWIGLU: up holds gate rows
// [0, F) then up rows [F, 2F), act = silu(gate)·up; else act = gelu_new.
// clear (optional, clear_len int64) is zeroed: the other accumulators,
// whose readers have run. in_acc (optional): the input row is in[n] +
// unfix(in_acc[n]) (ref.SumAcc; the heads' products of a folded attention,
// kv_attention_out), which block 0 writes to sum for the next layer.
template <int NB, bool RMS, bool SWIGLU, bool SUM>
__global__ void __launch_bounds__(kMlpThreads)
    mlp_acc_kernel_v1(long long *__restrict__ acc, long long *__restrict__ clear, long long clear_len,
                      const float *__restrict__ in, const long long *__restrict__ in_acc, float *__restrict__ sum,
                      const void *__restrict__ norm_w, const void *__restrict__ norm_b, int norm_f16,
                      const __half *__restrict__ up_w, const void *__restrict__ up_b, int up_b_f16,
                      const __half *__restrict__ down_w, const void *__restrict__ down_b, int down_b_f16, int N,
                      int C, int F, float eps, int lead) {
  constexpr int FS = kMlpFS, G = SWIGLU ? 2 : 1;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[2][kMlpWarps][NB];
  __shared__ float h[NB][FS];
  __shared__ float ub[G * FS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int f0 = blockIdx.x * FS;
  KV_STAMP_DECL(stp, 5);
  __half *wup = reinterpret_cast<__half *>(smem);
  __half *wdn = wup + (size_t)G * FS * C;
  float *xs = reinterpret_cast<float *>(wdn + (size_t)C * FS);
  float *db = xs + (size_t)N * C;
  unsigned char *nws = reinterpret_cast<unsigned char *>(db + C);
  const int nbytes = C * (norm_f16 ? 2 : 4);
  unsigned char *nbs = nws + nbytes;

  // Loops over run-time bounds stay rolled (unroll 1) here and below: the
  // decode kernels' time went to instruction-cache misses more than to
  // loop overhead (the unrolled copies nearly doubled this kernel's code;
  // docs/PERF.md, version 20).
  // 1. Constant data before the wait: this block's up rows and down columns
  // (read once: L2 only), the norm weights and the biases (loaded after the
  // wait, a bias is a round trip to L2 or DRAM on the critical path).
  const int c8 = C / 8;
#pragma unroll 1
  for (int i = tid; i < G * FS * c8; i += kMlpThreads) {
    const int r = i / c8, k = i - r * c8;
    const int row = SWIGLU && r >= FS ? F + f0 + (r - FS) : f0 + r;
    kv_cp_async16_w(wup + (size_t)r * C + 8 * k, up_w + (size_t)row * C + 8 * k);
  }
#pragma unroll 1
  for (int i = tid; i < nbytes / 16; i += kMlpThreads) {
    kv_cp_async16_ca(nws + 16 * i, static_cast<const char *>(norm_w) + 16 * i);
    if (!RMS && norm_b) kv_cp_async16_ca(nbs + 16 * i, static_cast<const char *>(norm_b) + 16 * i);
  }
  kv_cp_async_commit();
  if (up_b && tid < G * FS) {
    const int row = SWIGLU && tid >= FS ? F + f0 + (tid - FS) : f0 + tid;
    ub[tid] = kv_load_w(up_b, up_b_f16, row);
  }
  if (blockIdx.x == 0) {
#pragma unroll 1
    for (int c = tid; c < C; c += kMlpThreads) db[c] = down_b ? kv_load_w(down_b, down_b_f16, c) : 0.f;
  }

  constexpr int FS8 = FS / 8;
#pragma unroll 1
  for (int i = tid; i < C * FS8; i += kMlpThreads) {
    const int c = i / FS8, j = i - c * FS8;
    kv_cp_async16_w(wdn + (size_t)c * FS + 8 * j, down_w + (size_t)c * F + f0 + 8 * j);
  }
  kv_cp_async_commit();

  // 2. The input rows, written by the previous kernel.
  // lead: the next kernel reads nothing this one or its predecessor writes
  // before its own wait, so it may launch now (kv_attention_block).
  if (lead) kv_pdl_launch_dependents();
  KV_STAMP_AT(stp, 8);
  kv_pdl_wait();
  KV_STAMP_AT(stp, 2);
  if (!lead) kv_pdl_launch_dependents();
  const int C4 = C / 4;
  // The norm's sums (RMSNorm: of squares). SUM (always RMSNorm) adds them
  // up as the row lands, so the barrier that publishes the row also
  // carries the warps' sums: no statistics pass, one barrier fewer
  // (docs/PERF.md, version 27). For one row a thread adds the same
  // elements in the same order as the pass.
  float s[NB];
#pragma unroll
  for (int n = 0; n < NB; n++) s[n] = 0.f;
  [[maybe_unused]] auto add_square = [&](int i, float v) {
#pragma unroll
    for (int n = 0; n < NB; n++)
      if (i >= n * C && i < (n + 1) * C) s[n] += v * v;
  };
  if constexpr (SUM) {
    static_assert(RMS, "the stream plus an accumulator is the Llama pairing");
    // The row and the accumulator in one round trip (kAccPre elements a
    // thread in flight at once), summed as ref.SumAcc.
    constexpr int kAccPre = 4;
    const int NC = N * C;
    float iv[kAccPre];
    long long av[kAccPre];
#pragma unroll
    for (int k = 0; k < kAccPre; k++) {
      const int i = tid + k * kMlpThreads;
      if (i < NC) {
        iv[k] = __ldcg(in + i);
        av[k] = __ldcg(in_acc + i);
      }
    }
#pragma unroll
    for (int k = 0; k < kAccPre; k++) {
      const int i = tid + k * kMlpThreads;
      if (i < NC) {
        const float v = iv[k] + kv_unfix(av[k]);
        xs[i] = v;
        if (blockIdx.x == 0) sum[i] = v;
        add_square(i, v);
      }
    }
#pragma unroll 1
    for (int i = tid + kAccPre * kMlpThreads; i < NC; i += kMlpThreads) {
      const float v = __ldcg(in + i) + kv_unfix(__ldcg(in_acc + i));
      xs[i] = v;
      if (blockIdx.x == 0) sum[i] = v;
      add_square(i, v);
    }
  } else {
#pragma unroll 1
    for (int idx = tid; idx < N * C4; idx += kMlpThreads) kv_cp_async16_ca(xs + 4 * idx, in + 4 * (size_t)idx);
    kv_cp_async_commit();
  }
  if (clear) {
#pragma unroll 1
    for (long long i = blockIdx.x * kMlpThreads + tid; i < clear_len; i += gridDim.x * kMlpThreads) clear[i] = 0;
  }
  kv_cp_async_wait_all();
  // 3. The norm's statistics, in fp32 (two passes for LayerNorm, as
  // fused.cu); the up rows apply it as they read the input (version 27).
  float mean[NB], rstd[NB];
  if constexpr (SUM) {
    block_sum_rows<kMlpWarps>(s, red[0]);  // its barrier also publishes the row
    KV_STAMP_AT(stp, 3);
  } else {
    __syncthreads();
    KV_STAMP_AT(stp, 3);
#pragma unroll 1
    for (int i = tid; i < C; i += kMlpThreads) {
#pragma unroll
      for (int n = 0; n < NB; n++)
        if (n < N) {
          const float v = xs[n * C + i];
          s[n] += RMS ? v * v : v;
        }
    }
    block_sum_rows<kMlpWarps>(s, red[0]);
  }
  if constexpr (!RMS) {
#pragma unroll
    for (int n = 0; n < NB; n++) {
      mean[n] = s[n] / (float)C;
      s[n] = 0.f;
    }
#pragma unroll 1
    for (int i = tid; i < C; i += kMlpThreads) {
#pragma unroll
      for (int n = 0; n < NB; n++)
        if (n < N) {
          const float d = xs[n * C + i] - mean[n];
          s[n] += d * d;
        }
    }
    block_sum_rows<kMlpWarps>(s, red[1]);
  } else {
#pragma unroll
    for (int n = 0; n < NB; n++) mean[n] = 0.f;
  }
#pragma unroll
  for (int n = 0; n < NB; n++) rstd[n] = 1.f / sqrtf(s[n] / (float)C + eps);
  KV_STAMP_AT(stp, 4);

  // 4. The block's G·FS up rows: a warp takes RPW rows (warp + kMlpWarps·j)
  // at once, lanes over C in pairs, so that the rows' loads and their
  // reductions overlap (one row after another put RPW serial reductions on
  // the critical path).
  constexpr int RPW = G * FS / kMlpWarps;
  static_assert(RPW * kMlpWarps == G * FS, "whole rows a warp");
  {
    float a[RPW][NB];
#pragma unroll
    for (int j = 0; j < RPW; j++)
#pragma unroll
      for (int n = 0; n < NB; n++) a[j][n] = 0.f;
    const __half2 *w2 = reinterpret_cast<const __half2 *>(wup) + (size_t)warp * (C / 2);
    for (int k = lane; k < C / 2; k += 32) {
      float2 w[RPW];
#pragma unroll
      for (int j = 0; j < RPW; j++) w[j] = __half22float2(w2[(size_t)j * kMlpWarps * (C / 2) + k]);
#pragma unroll
      for (int n = 0; n < NB; n++)
        if (n < N) {
          // The norm applied as the rows read their input, in the expression
          // a normalising pass would use (that pass and its barrier cost
          // more). The norm weights are loaded here, per row n: hoisted out
          // of this loop they made nvcc unroll the k loop (+540
          // instructions).
          const float2 xr = reinterpret_cast<const float2 *>(xs + n * C)[k];
          const float2 wn = make_float2(load_norm_w(nws, norm_f16, 2 * k), load_norm_w(nws, norm_f16, 2 * k + 1));
          const float2 bn = !RMS && norm_b ? make_float2(load_norm_w(nbs, norm_f16, 2 * k), load_norm_w(nbs, norm_f16, 2 * k + 1))
                                           : make_float2(0.f, 0.f);
          const float2 x = make_float2((xr.x - mean[n]) * rstd[n] * wn.x + bn.x, (xr.y - mean[n]) * rstd[n] * wn.y + bn.y);
#pragma unroll
          for (int j = 0; j < RPW; j++) a[j][n] += w[j].x * x.x + w[j].y * x.y;
        }
    }
    KV_STAMP_AT(stp, 9);
#pragma unroll
    for (int j = 0; j < RPW; j++)
#pragma unroll
      for (int n = 0; n < NB; n++) a[j][n] = kv_warp_sum(a[j][n]);
    // The activations straight from the sums: with SwiGLU a warp's rows
    // pair up (gate row f = warp + kMlpWarps·j, up row FS + f = warp +
    // kMlpWarps·(j + RPW/2)), so no other warp's sum is needed.
    // Every lane holds the sums; lane j·NB + n computes activation j of row n.
    constexpr int HPW = SWIGLU ? RPW / 2 : RPW;  // activations a warp
    static_assert(!SWIGLU || FS == kMlpWarps * (RPW / 2), "gate and up rows in one warp");
#pragma unroll
    for (int j = 0; j < HPW; j++) {
      const int f = warp + j * kMlpWarps;
#pragma unroll
      for (int n = 0; n < NB; n++) {
        if (lane == (j * NB + n) % 32 && n < N) {
          if constexpr (SWIGLU) h[n][f] = silu_mul(a[j][n], a[j + HPW][n]);  // SwiGLU has no up bias
          else h[n][f] = gelu_new(a[j][n] + (up_b ? ub[f] : 0.f));
        }
      }
    }
  }

  // 5. The down columns: a thread per output, the partial sum into the
  // accumulator (block 0 adds the bias).
  KV_STAMP_AT(stp, 5);
  __syncthreads();  // h
  KV_STAMP_AT(stp, 6);
#pragma unroll 1
  for (int c = tid; c < C; c += kMlpThreads) {
    float wd[FS];
    const uint4 *wp = reinterpret_cast<const uint4 *>(wdn + (size_t)c * FS);
#pragma unroll
    for (int j = 0; j < FS / 8; j++) kv_unpack16<true>(wp[j], wd + 8 * j);
    const float b = blockIdx.x == 0 ? db[c] : 0.f;
#pragma unroll
    for (int n = 0; n < NB; n++)
      if (n < N) {
        float p = 0.f;
#pragma unroll
        for (int j = 0; j < FS; j++) p += wd[j] * h[n][j];
        atomicAdd(reinterpret_cast<unsigned long long *>(acc + (size_t)n * C + c),
                  (unsigned long long)kv_fix(p + b));
      }
  }
  KV_STAMP_AT(stp, 7);
}

template <int NB>
cudaError_t launch_mlp_acc(cudaStream_t s, bool pdl, bool rms, bool swiglu, size_t smem, long long *acc,
                           long long *clear, long long clear_len, const float *in, const long long *in_acc,
                           float *sum, const void *norm_w, const void *norm_b, int norm_f16,
                           const __half *up_w, const void *up_b, int up_b_f16, const __half *down_w,
                           const void *down_b, int down_b_f16, int N, int C, int F, float eps, int lead) {
  // SUM (in_acc) is its own instantiation: code the other paths would
  // carry costs them instruction-cache misses (docs/PERF.md, version 23).
  auto kernel = !(rms && swiglu) ? mlp_acc_kernel_v1<NB, false, false, false>
                : in_acc        ? mlp_acc_kernel_v1<NB, true, true, true>
                                : mlp_acc_kernel_v1<NB, true, true, false>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  // The largest carveout, as every measurement of this kernel ran it
  // (docs/PERF.md, version 13).
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (e != cudaSuccess) return e;
  return kv_launch(kernel, dim3(F / kMlpFS), dim3(kMlpThreads), smem, s, pdl, acc, clear, clear_len, in, in_acc, sum,
                   norm_w, norm_b, norm_f16, up_w, up_b, up_b_f16, down_w, down_b, down_b_f16, N, C, F, eps, lead);
}

}  // namespace

extern "C" kv_status kv_mlp_acc(kv_stream s, long long *acc, long long *clear, long long clear_len, const float *in,
                                const long long *in_acc, float *sum, const void *norm_w,
                                const void *norm_b, int norm_f16, const void *up_w, int up_f16, const void *up_b,
                                int up_b_f16, const void *down_w, int down_f16, const void *down_b, int down_b_f16,
                                int N, int C, int F, float eps, int rms, int swiglu, int variant, int lead, int *launched) {
  *launched = 0;
  if (N <= 0) return kv_launched();
  if (C <= 0 || F <= 0 || !acc || !in || !norm_w || !up_w || !down_w || (swiglu && (up_b || !rms)) ||
      (variant != 0 && variant != 1) || (in_acc && !sum) || (clear && clear_len < 0))
    return (kv_status)cudaErrorInvalidValue;
  if (rms) norm_b = nullptr;
  // The kernel's shapes: the two pairings of the models (Llama: RMSNorm and
  // SwiGLU; GPT-2: LayerNorm and gelu), fp16 weights, whole 16-byte chunks
  // of rows and of a block's down columns. Variant 0 also wants
  // programmatic launches (sm_90): the point is the weights staged before
  // the wait.
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return kv_launched();
  const size_t smem = mlp_smem(N, C, swiglu, norm_f16);
  const size_t bytes = (size_t)(swiglu ? 3 : 2) * F * C * 2;
  if (variant == 0 && bytes > kMlpMaxBytes) return kv_launched();
  if (rms != swiglu || (in_acc && !rms) || !up_f16 || !down_f16 || N > 8 || C % 8 != 0 || F % kMlpFS != 0 ||
      smem > (size_t)optin ||
      (C * (norm_f16 ? 2 : 4)) % 16 != 0 || !kv_aligned16(in) || !kv_aligned16(up_w) || !kv_aligned16(down_w) ||
      !kv_aligned16(norm_w) || (norm_b && !kv_aligned16(norm_b)) || (variant == 0 && !kv_pdl_supported()))
    return kv_launched();
  const bool pdl = kv_pdl_supported();
  const __half *uw = static_cast<const __half *>(up_w), *dw = static_cast<const __half *>(down_w);
  cudaError_t e;
#define KV_MLP(NB)                                                                                          \
  launch_mlp_acc<NB>(s, pdl, rms, swiglu, smem, acc, clear, clear_len, in, in_acc, sum, norm_w, norm_b, norm_f16, \
                     uw, up_b, up_b_f16, dw, down_b, down_b_f16, N, C, F, eps, lead)
  if (N <= 1) e = KV_MLP(1);
  else if (N <= 2) e = KV_MLP(2);
  else if (N <= 4) e = KV_MLP(4);
  else e = KV_MLP(8);
#undef KV_MLP
  KV_TRY(e);
  *launched = 1;
  return kv_launched();
}

KV_STAMP_TU(mlp)
