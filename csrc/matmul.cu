// matmul.cu — out[N,OC] (+)= in[N,C]·w[OC,C]ᵀ + bias (torch.nn.Linear).
//
// Two regimes, chosen by N:
//  - N ≤ kGemvMaxN (decoding): memory-bound. Every weight byte is read once,
//    so the kernel is a weight stream: 16-byte loads that skip L1, several
//    in flight per thread before the first use, a group of lanes per output
//    row (or rows) reducing with warp shuffles, all N inputs applied to each
//    loaded chunk. The floor is weight bytes / HBM bandwidth.
//  - larger N (prefill, attention recomputation, perplexity scoring):
//    compute-bound, a tiled GEMM; tensor cores (mma.sync m16n8k16, fp16
//    operands, fp32 accumulation) for fp16 weights, fp32 SIMT for fp32
//    weights (the fp32 mode must match the reference to ~1e-6, so no TF32).
#include "common.cuh"
#include "fused.cuh"

namespace {

constexpr int kGemvMaxN = 8;
constexpr int kGemvThreads = 128;

// gemv_kernel_v1: groups of TPR lanes; a group computes R consecutive output
// rows for all NB inputs. Each lane takes 16-byte chunks lane, lane+TPR, …
// of the rows, UNROLL chunks per row loaded before any is used (R·UNROLL = 4
// loads in flight per lane), then the group reduces (shuffles, and shared
// memory when TPR spans several warps).
//
// The inputs are read through L1 (__ldg) rather than staged in shared
// memory: they are tiny and shared by every block, L1 and shared memory are
// the same SRAM, and skipping the staging pass and its barrier lets the
// weight loads — the whole cost — issue at once.
template <bool F16, int NB, int R, int TPR>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel_v1(float *__restrict__ out, const float *__restrict__ in, const void *__restrict__ w,
                   const void *__restrict__ bias, int bias_f16, int C, int OC, int accumulate) {
  constexpr int VEC = F16 ? 8 : 4;  // elements per 16-byte chunk
  constexpr int UNROLL = 4 / R;
  constexpr int GROUPS = kGemvThreads / TPR;
  const int chunks = C / VEC;
  const int group = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  const int row0 = (blockIdx.x * GROUPS + group) * R;

  const uint4 *wr[R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int row = min(row0 + r, OC - 1);  // rows past OC reread the last row, never stored
    wr[r] = reinterpret_cast<const uint4 *>(static_cast<const char *>(w) +
                                            (size_t)row * C * (F16 ? 2 : 4));
  }
  float acc[R][NB];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int n = 0; n < NB; n++) acc[r][n] = 0.f;

  uint4 wv[R][UNROLL];
  auto load = [&](int c0) {
#pragma unroll
    for (int u = 0; u < UNROLL; u++)
#pragma unroll
      for (int r = 0; r < R; r++) {
        const int c = c0 + u * TPR;
        wv[r][u] = c < chunks ? kv_ld_stream16(wr[r] + c) : make_uint4(0, 0, 0, 0);
      }
  };
  // The first batch of weights is loaded before the programmatic wait (a
  // dependent launch: the input is read only after it), so the weight
  // stream starts while the predecessor finishes. No early trigger for the
  // kernel after it: with one, the LM head's sampling blocks launched early
  // and finished 6 µs later (H100 trace, docs/PERF.md version 15), so they
  // launch as this grid's blocks exit.
  load(lane);
  kv_pdl_wait();
  for (int c0 = lane; c0 < chunks; c0 += TPR * UNROLL) {
    if (c0 != lane) load(c0);
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const int c = c0 + u * TPR;
      if (c < chunks) {
        float wf[R][VEC];
#pragma unroll
        for (int r = 0; r < R; r++) kv_unpack16<F16>(wv[r][u], wf[r]);
#pragma unroll
        for (int n = 0; n < NB; n++) {
          const float4 *xp = reinterpret_cast<const float4 *>(in + (size_t)n * C + (size_t)c * VEC);
#pragma unroll
          for (int v4 = 0; v4 < VEC / 4; v4++) {
            kv_fma_x4(acc, n, wf, v4, __ldg(xp + v4));
          }
        }
      }
    }
  }

  // Reduce over the group's lanes.
  kv_group_sums<TPR, kGemvThreads>(acc);

  // Every lane holds the sums; lane k of the group writes output k.
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int n = 0; n < NB; n++) {
      const int row = row0 + r;
      if (lane == (r * NB + n) % TPR && row < OC) {
        float v = acc[r][n];
        if (bias) v += kv_load_w(bias, bias_f16, row);
        float *o = out + (size_t)n * OC + row;
        *o = accumulate ? *o + v : v;
      }
    }
}

// gemv_scalar_kernel_v1: any alignment (C not a multiple of the 16-byte
// vector, or misaligned base pointers): one warp per output row, scalar loads.
__global__ void __launch_bounds__(kGemvThreads)
    gemv_scalar_kernel_v1(float *__restrict__ out, const float *__restrict__ in, const void *__restrict__ w,
                          int w_f16, const void *__restrict__ bias, int bias_f16, int N, int C, int OC,
                          int accumulate) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (kGemvThreads / 32) + threadIdx.x / 32;
  if (row >= OC) return;
  float acc[kGemvMaxN];
#pragma unroll
  for (int n = 0; n < kGemvMaxN; n++) acc[n] = 0.f;
  for (int c = lane; c < C; c += 32) {
    const float wv = kv_load_w(w, w_f16, (long long)row * C + c);
#pragma unroll
    for (int n = 0; n < kGemvMaxN; n++)
      if (n < N) acc[n] = fmaf(wv, __ldg(in + (size_t)n * C + c), acc[n]);
  }
#pragma unroll
  for (int n = 0; n < kGemvMaxN; n++) {
    if (n >= N) break;
    float v = kv_warp_sum(acc[n]);
    if (lane == n) {
      if (bias) v += kv_load_w(bias, bias_f16, row);
      float *o = out + (size_t)n * OC + row;
      *o = accumulate ? *o + v : v;
    }
  }
}

// ---- tensor-core GEMM (fp16 weights) ----

constexpr int kTcBM = 64, kTcBN = 64, kTcBK = 32;
constexpr int kTcThreads = 128;       // 4 warps, 2×2, each a 32×32 tile of out
constexpr int kTcLd = kTcBK + 8;      // smem row stride in halves: 80 bytes, conflict-free fragment loads

__device__ __forceinline__ void mma_16816(float *c, const uint32_t *a, const uint32_t *b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// gemm_f16_tc_kernel_v1: 64×64 output tile per block, k-steps of 32;
// registers prefetch the next k-tile from global while the tensor cores work
// on the current one in shared memory (two shared buffers, one barrier per
// step). Activations become fp16 as they are staged (the "fp16 inputs" of
// mma.sync); VEC: C % 8 == 0 and 16-byte aligned rows, else guarded scalar
// loads.
template <bool VEC>
__global__ void __launch_bounds__(kTcThreads)
    gemm_f16_tc_kernel_v1(float *__restrict__ out, const float *__restrict__ in, const __half *__restrict__ w,
                          const void *__restrict__ bias, int bias_f16, int N, int C, int OC, int accumulate) {
  __shared__ __align__(16) __half As[2][kTcBM][kTcLd];
  __shared__ __align__(16) __half Bs[2][kTcBN][kTcLd];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tg = lane % 4;
  const int wm = warp / 2, wn = warp % 2;
  const int m0 = blockIdx.y * kTcBM, n0 = blockIdx.x * kTcBN;

  // Staging registers: A 64×32 floats = 4 float4 per thread, B 64×32 halves = 2 uint4.
  float4 ra[4];
  uint4 rb[2];
  auto load_tile = [&](int k0) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int idx = tid + i * kTcThreads, row = idx / 8, kq = (idx % 8) * 4;
      const int m = m0 + row, k = k0 + kq;
      if (VEC) {
        ra[i] = (m < N && k < C) ? __ldg(reinterpret_cast<const float4 *>(in + (size_t)m * C + k))
                                 : make_float4(0.f, 0.f, 0.f, 0.f);
      } else {
        float t[4];
#pragma unroll
        for (int e = 0; e < 4; e++) t[e] = (m < N && k + e < C) ? __ldg(in + (size_t)m * C + k + e) : 0.f;
        ra[i] = make_float4(t[0], t[1], t[2], t[3]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int idx = tid + i * kTcThreads, row = idx / 4, kc = (idx % 4) * 8;
      const int n = n0 + row, k = k0 + kc;
      if (VEC) {
        rb[i] = (n < OC && k < C) ? __ldg(reinterpret_cast<const uint4 *>(w + (size_t)n * C + k))
                                  : make_uint4(0, 0, 0, 0);
      } else {
        __align__(16) __half t[8];
#pragma unroll
        for (int e = 0; e < 8; e++) t[e] = (n < OC && k + e < C) ? w[(size_t)n * C + k + e] : __float2half(0.f);
        rb[i] = *reinterpret_cast<uint4 *>(t);
      }
    }
  };
  auto store_tile = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int idx = tid + i * kTcThreads, row = idx / 8, kq = (idx % 8) * 4;
      __half2 *d = reinterpret_cast<__half2 *>(&As[buf][row][kq]);
      d[0] = __floats2half2_rn(ra[i].x, ra[i].y);
      d[1] = __floats2half2_rn(ra[i].z, ra[i].w);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int idx = tid + i * kTcThreads, row = idx / 4, kc = (idx % 4) * 8;
      *reinterpret_cast<uint4 *>(&Bs[buf][row][kc]) = rb[i];
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int a = 0; a < 2; a++)
#pragma unroll
    for (int b = 0; b < 4; b++)
#pragma unroll
      for (int c = 0; c < 4; c++) acc[a][b][c] = 0.f;

  const int ktiles = (C + kTcBK - 1) / kTcBK;
  load_tile(0);
  store_tile(0);
  __syncthreads();
  for (int kt = 0; kt < ktiles; kt++) {
    const int buf = kt & 1;
    if (kt + 1 < ktiles) load_tile((kt + 1) * kTcBK);
#pragma unroll
    for (int ks = 0; ks < kTcBK; ks += 16) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 2; mt++) {
        const int r = wm * 32 + mt * 16 + g;
        af[mt][0] = *reinterpret_cast<const uint32_t *>(&As[buf][r][ks + tg * 2]);
        af[mt][1] = *reinterpret_cast<const uint32_t *>(&As[buf][r + 8][ks + tg * 2]);
        af[mt][2] = *reinterpret_cast<const uint32_t *>(&As[buf][r][ks + tg * 2 + 8]);
        af[mt][3] = *reinterpret_cast<const uint32_t *>(&As[buf][r + 8][ks + tg * 2 + 8]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; nt++) {
        const int cidx = wn * 32 + nt * 8 + g;
        bf[nt][0] = *reinterpret_cast<const uint32_t *>(&Bs[buf][cidx][ks + tg * 2]);
        bf[nt][1] = *reinterpret_cast<const uint32_t *>(&Bs[buf][cidx][ks + tg * 2 + 8]);
      }
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++) mma_16816(acc[mt][nt], af[mt], bf[nt]);
    }
    if (kt + 1 < ktiles) store_tile(buf ^ 1);  // the other buffer: last read before the previous barrier
    __syncthreads();
  }

  // Epilogue: c0,c1 at (row g, cols 2tg, 2tg+1), c2,c3 at row g+8.
#pragma unroll
  for (int mt = 0; mt < 2; mt++)
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
      for (int hlf = 0; hlf < 2; hlf++) {
        const int m = m0 + wm * 32 + mt * 16 + g + hlf * 8;
        if (m >= N) continue;
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int n = n0 + wn * 32 + nt * 8 + tg * 2 + e;
          if (n >= OC) continue;
          float v = acc[mt][nt][hlf * 2 + e];
          if (bias) v += kv_load_w(bias, bias_f16, n);
          float *o = out + (size_t)m * OC + n;
          *o = accumulate ? *o + v : v;
        }
      }
}

// ---- tensor-core GEMM v2 (fp16 weights): cp.async pipeline ----
//
// gemm_f16_tc_kernel_v2: v1 waited one global round trip per k-step (its
// register prefetch ran one step ahead, and a step's math is far shorter
// than a load): N = 256, C = 3072 → 768 ran at 26 TFLOP/s with 48 blocks.
// Here cp.async keeps kStages − 1 k-tiles in flight, the activations stay
// fp32 in shared memory (rounded to fp16 as fragments load, as v1 did when
// staging), and BM = 32 rows per block when 64 would leave SMs idle.
// Needs C % 8 == 0 and 16-byte aligned in and w (the dispatch checks).
constexpr int kT2BN = 64, kT2BK = 32, kT2Stages = 3, kT2Threads = 128;
constexpr int kT2LdA = kT2BK + 8;  // floats: 8-byte fragment loads conflict-free
constexpr int kT2LdB = kT2BK + 8;  // halves

template <int BM>
__global__ void __launch_bounds__(kT2Threads)
    gemm_f16_tc_kernel_v2(float *__restrict__ out, const float *__restrict__ in, const __half *__restrict__ w,
                          const void *__restrict__ bias, int bias_f16, int N, int C, int OC, int accumulate) {
  constexpr int WARPS_M = BM / 32, WARPS_N = 4 / WARPS_M, WN = kT2BN / WARPS_N, NTL = WN / 8;
  __shared__ __align__(16) float As[kT2Stages][BM][kT2LdA];
  __shared__ __align__(16) __half Bs[kT2Stages][kT2BN][kT2LdB];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tg = lane % 4;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * kT2BN;
  const int ktiles = (C + kT2BK - 1) / kT2BK;

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kT2BK;
#pragma unroll
    for (int i = 0; i < BM * 8 / kT2Threads; i++) {  // A: BM rows × 8 chunks of 4 floats
      const int idx = tid + i * kT2Threads, row = idx / 8, kq = (idx % 8) * 4;
      const int m = m0 + row, k = k0 + kq;
      const bool ok = m < N && k < C;
      kv_cp_async16_cg(&As[stage][row][kq], ok ? in + (size_t)m * C + k : in, ok);
    }
#pragma unroll
    for (int i = 0; i < kT2BN * 4 / kT2Threads; i++) {  // B: 64 rows × 4 chunks of 8 halves
      const int idx = tid + i * kT2Threads, row = idx / 4, kc = (idx % 4) * 8;
      const int n = n0 + row, k = k0 + kc;
      const bool ok = n < OC && k < C;
      kv_cp_async16_cg(&Bs[stage][row][kc], ok ? w + (size_t)n * C + k : w, ok);
    }
  };

  float acc[2][NTL][4];
#pragma unroll
  for (int a = 0; a < 2; a++)
#pragma unroll
    for (int b = 0; b < NTL; b++)
#pragma unroll
      for (int c = 0; c < 4; c++) acc[a][b][c] = 0.f;

#pragma unroll
  for (int s = 0; s < kT2Stages - 1; s++) {
    if (s < ktiles) load_stage(s, s);
    kv_cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; kt++) {
    kv_cp_async_wait<kT2Stages - 2>();
    __syncthreads();  // tile kt landed for everyone; tile kt−1's stage is free
    if (kt + kT2Stages - 1 < ktiles) load_stage((kt + kT2Stages - 1) % kT2Stages, kt + kT2Stages - 1);
    kv_cp_async_commit();
    const int st = kt % kT2Stages;
#pragma unroll
    for (int ks = 0; ks < kT2BK; ks += 16) {
      uint32_t af[2][4], bf[NTL][2];
#pragma unroll
      for (int mt = 0; mt < 2; mt++) {
        const int r = wm * 32 + mt * 16 + g;
        const float2 x0 = *reinterpret_cast<const float2 *>(&As[st][r][ks + tg * 2]);
        const float2 x1 = *reinterpret_cast<const float2 *>(&As[st][r + 8][ks + tg * 2]);
        const float2 x2 = *reinterpret_cast<const float2 *>(&As[st][r][ks + tg * 2 + 8]);
        const float2 x3 = *reinterpret_cast<const float2 *>(&As[st][r + 8][ks + tg * 2 + 8]);
        const __half2 h0 = __floats2half2_rn(x0.x, x0.y), h1 = __floats2half2_rn(x1.x, x1.y);
        const __half2 h2 = __floats2half2_rn(x2.x, x2.y), h3 = __floats2half2_rn(x3.x, x3.y);
        af[mt][0] = *reinterpret_cast<const uint32_t *>(&h0);
        af[mt][1] = *reinterpret_cast<const uint32_t *>(&h1);
        af[mt][2] = *reinterpret_cast<const uint32_t *>(&h2);
        af[mt][3] = *reinterpret_cast<const uint32_t *>(&h3);
      }
#pragma unroll
      for (int nt = 0; nt < NTL; nt++) {
        const int cidx = wn * WN + nt * 8 + g;
        bf[nt][0] = *reinterpret_cast<const uint32_t *>(&Bs[st][cidx][ks + tg * 2]);
        bf[nt][1] = *reinterpret_cast<const uint32_t *>(&Bs[st][cidx][ks + tg * 2 + 8]);
      }
#pragma unroll
      for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < NTL; nt++) mma_16816(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  kv_cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < 2; mt++)
#pragma unroll
    for (int nt = 0; nt < NTL; nt++)
#pragma unroll
      for (int hlf = 0; hlf < 2; hlf++) {
        const int m = m0 + wm * 32 + mt * 16 + g + hlf * 8;
        if (m >= N) continue;
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int n = n0 + wn * WN + nt * 8 + tg * 2 + e;
          if (n >= OC) continue;
          float v = acc[mt][nt][hlf * 2 + e];
          if (bias) v += kv_load_w(bias, bias_f16, n);
          float *o = out + (size_t)m * OC + n;
          *o = accumulate ? *o + v : v;
        }
      }
}

// ---- fp32 SIMT GEMM (fp32 weights) ----

constexpr int kSgBM = 64, kSgBN = 64, kSgBK = 16, kSgThreads = 256;
constexpr int kSgLd = kSgBM + 4;  // keeps float4 alignment, spreads the transposing stores

// gemm_f32_kernel_v1: classic register-tiled SGEMM, 64×64 tile per block,
// 4×4 outputs per thread, k-major shared tiles read as float4; scalar guarded
// global loads (any C), prefetched into registers one k-step ahead.
// Each output accumulates in k order in fp32 (the reference uses float64:
// differences stay near 1e-7 relative for these sizes).
__global__ void __launch_bounds__(kSgThreads)
    gemm_f32_kernel_v1(float *__restrict__ out, const float *__restrict__ in, const float *__restrict__ w,
                       const void *__restrict__ bias, int bias_f16, int N, int C, int OC, int accumulate) {
  __shared__ __align__(16) float As[kSgBK][kSgLd];
  __shared__ __align__(16) float Bs[kSgBK][kSgLd];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int m0 = blockIdx.y * kSgBM, n0 = blockIdx.x * kSgBN;
  float ra[4], rb[4];
  auto load = [&](int k0) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int idx = tid + i * kSgThreads, row = idx / kSgBK, k = k0 + idx % kSgBK;
      ra[i] = (m0 + row < N && k < C) ? __ldg(in + (size_t)(m0 + row) * C + k) : 0.f;
      rb[i] = (n0 + row < OC && k < C) ? __ldg(w + (size_t)(n0 + row) * C + k) : 0.f;
    }
  };
  float acc[4][4] = {};
  load(0);
  for (int k0 = 0; k0 < C; k0 += kSgBK) {
    __syncthreads();  // the previous step's reads are done
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int idx = tid + i * kSgThreads, row = idx / kSgBK, k = idx % kSgBK;
      As[k][row] = ra[i];
      Bs[k][row] = rb[i];
    }
    __syncthreads();
    if (k0 + kSgBK < C) load(k0 + kSgBK);
#pragma unroll
    for (int k = 0; k < kSgBK; k++) {
      const float4 a = *reinterpret_cast<const float4 *>(&As[k][ty * 4]);
      const float4 b = *reinterpret_cast<const float4 *>(&Bs[k][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int m = m0 + ty * 4 + i;
    if (m >= N) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int n = n0 + tx * 4 + j;
      if (n >= OC) continue;
      float v = acc[i][j];
      if (bias) v += kv_load_w(bias, bias_f16, n);
      float *o = out + (size_t)m * OC + n;
      *o = accumulate ? *o + v : v;
    }
  }
}

// gemm_f32_kernel_v2: v1 with RM rows a thread (BM = 16·RM): RM = 2 halves the
// tile so that small-N shapes (N = 256, OC = 768: 48 blocks of 64×64) fill the SMs.
template <int RM>
__global__ void __launch_bounds__(kSgThreads)
    gemm_f32_kernel_v2(float *__restrict__ out, const float *__restrict__ in, const float *__restrict__ w,
                       const void *__restrict__ bias, int bias_f16, int N, int C, int OC, int accumulate) {
  __shared__ __align__(16) float As[kSgBK][kSgLd];
  __shared__ __align__(16) float Bs[kSgBK][kSgLd];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  constexpr int BM = 16 * RM;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * kSgBN;
  float ra[RM], rb[4];
  auto load = [&](int k0) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int idx = tid + i * kSgThreads, row = idx / kSgBK, k = k0 + idx % kSgBK;
      if (i < RM) ra[i] = (m0 + row < N && k < C) ? __ldg(in + (size_t)(m0 + row) * C + k) : 0.f;
      rb[i] = (n0 + row < OC && k < C) ? __ldg(w + (size_t)(n0 + row) * C + k) : 0.f;
    }
  };
  float acc[RM][4] = {};
  load(0);
  for (int k0 = 0; k0 < C; k0 += kSgBK) {
    __syncthreads();  // the previous step's reads are done
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int idx = tid + i * kSgThreads, row = idx / kSgBK, k = idx % kSgBK;
      if (i < RM) As[k][row] = ra[i];
      Bs[k][row] = rb[i];
    }
    __syncthreads();
    if (k0 + kSgBK < C) load(k0 + kSgBK);
#pragma unroll
    for (int k = 0; k < kSgBK; k++) {
      float av[RM];
      if (RM == 4) {
        const float4 a = *reinterpret_cast<const float4 *>(&As[k][ty * 4]);
        av[0] = a.x, av[1] = a.y, av[RM > 2 ? 2 : 0] = a.z, av[RM > 3 ? 3 : 0] = a.w;
      } else {
        const float2 a = *reinterpret_cast<const float2 *>(&As[k][ty * 2]);
        av[0] = a.x, av[1] = a.y;
      }
      const float4 b = *reinterpret_cast<const float4 *>(&Bs[k][tx * 4]);
      const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < RM; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < RM; i++) {
    const int m = m0 + ty * RM + i;
    if (m >= N) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int n = n0 + tx * 4 + j;
      if (n >= OC) continue;
      float v = acc[i][j];
      if (bias) v += kv_load_w(bias, bias_f16, n);
      float *o = out + (size_t)m * OC + n;
      *o = accumulate ? *o + v : v;
    }
  }
}

// ---- dispatch ----

template <bool F16, int NB, int R>
cudaError_t launch_gemv_r(cudaStream_t st, float *out, const float *in, const void *w, const void *bias,
                          int bias_f16, int C, int OC, int accumulate) {
  // Threads per row group: the fewest (≥ a warp) that cover a row's chunks
  // with one round of UNROLL loads each; wider rows use up to 128 lanes so
  // that small-OC matrices still spread over many SMs.
  // A width that gives every lane the same number of chunks (at most 4)
  // comes first: with C = 768 and N = 4, 32 lanes × 3 chunks beat 64 lanes
  // with 2 or 1 (LM head 35 µs against 44 µs on an H200).
  constexpr int VEC = F16 ? 8 : 4, UNROLL = 4 / R;
  const int chunks = C / VEC;
  int tpr = 0;
  for (int t = 32; t <= kGemvThreads && !tpr; t *= 2)
    if (chunks % t == 0 && chunks / t <= 4) tpr = t;
  if (!tpr) {
    tpr = 32;
    while (tpr < kGemvThreads && tpr * UNROLL < chunks) tpr *= 2;
  }
  const int groups = kGemvThreads / tpr;
  const dim3 blocks(kv_ceil_div(kv_ceil_div(OC, R), groups)), threads(kGemvThreads);
  // A programmatic dependent where the device has it (the LM head: its
  // first weights stream while the final norm runs).
  const bool pdl = kv_pdl_supported();
  switch (tpr) {
    case 32:
      return kv_launch(gemv_kernel_v1<F16, NB, R, 32>, blocks, threads, 0, st, pdl, out, in, w, bias, bias_f16, C, OC,
                       accumulate);
    case 64:
      return kv_launch(gemv_kernel_v1<F16, NB, R, 64>, blocks, threads, 0, st, pdl, out, in, w, bias, bias_f16, C, OC,
                       accumulate);
    default:
      return kv_launch(gemv_kernel_v1<F16, NB, R, 128>, blocks, threads, 0, st, pdl, out, in, w, bias, bias_f16, C,
                       OC, accumulate);
  }
}

// Rows per group grow with N so that each loaded input float4 feeds R rows
// (keeps L1 reads of the inputs below the weight stream's rate).
template <bool F16, int NB>
cudaError_t launch_gemv_n(cudaStream_t st, float *out, const float *in, const void *w, const void *bias,
                          int bias_f16, int C, int OC, int accumulate) {
  constexpr int R = NB <= 2 ? 1 : (NB <= 4 ? 2 : 4);
  return launch_gemv_r<F16, NB, R>(st, out, in, w, bias, bias_f16, C, OC, accumulate);
}

template <bool F16>
cudaError_t launch_gemv(cudaStream_t st, float *out, const float *in, const void *w, const void *bias,
                        int bias_f16, int N, int C, int OC, int accumulate) {
  switch (N) {
    case 1: return launch_gemv_n<F16, 1>(st, out, in, w, bias, bias_f16, C, OC, accumulate);
    case 2: return launch_gemv_n<F16, 2>(st, out, in, w, bias, bias_f16, C, OC, accumulate);
    case 3: return launch_gemv_n<F16, 3>(st, out, in, w, bias, bias_f16, C, OC, accumulate);
    case 4: return launch_gemv_n<F16, 4>(st, out, in, w, bias, bias_f16, C, OC, accumulate);
    case 5: return launch_gemv_n<F16, 5>(st, out, in, w, bias, bias_f16, C, OC, accumulate);
    case 6: return launch_gemv_n<F16, 6>(st, out, in, w, bias, bias_f16, C, OC, accumulate);
    case 7: return launch_gemv_n<F16, 7>(st, out, in, w, bias, bias_f16, C, OC, accumulate);
    default: return launch_gemv_n<F16, 8>(st, out, in, w, bias, bias_f16, C, OC, accumulate);
  }
}

}  // namespace

// gemm_prefill.cu: GEMM v3 (split-K clusters, fused input transforms, PDL).
bool kv_gemm_prefill(cudaStream_t s, float *out, const float *in, const void *w, const void *bias, int bias_f16,
                     const void *norm_w, int norm_f16, float eps, int N, int K, int OC, int accumulate, int mode,
                     bool glu, bool pdl, kv_status *st);

// matmul: kv_matmul_variant, and with lead the one-token product that lets
// the next kernel launch at once (kv_matmul_lead; only fused.cu's GEMV
// launched as a programmatic dependent does, the other kernels ignore it).
static kv_status matmul(kv_stream s, float *out, const float *in, const void *w, int w_f16, const void *bias,
                        int bias_f16, int N, int C, int OC, int accumulate, int gemm_variant, int lead) {
  if (N <= 0 || OC <= 0) return kv_launched();
  if (C < 0 || !out || !w || (!in && C > 0)) return (kv_status)cudaErrorInvalidValue;
  cudaStream_t st = s;
  if (N <= kGemvMaxN) {
    cudaError_t e = cudaSuccess;
    if (gemm_variant == 0 &&
        kv_gemv_as_dependent(st, out, in, w, w_f16, bias, bias_f16, N, C, OC, accumulate, lead, &e)) {
      KV_TRY(e);
      return kv_launched();
    }
    const int vec = w_f16 ? 8 : 4;
    if (C % vec == 0 && kv_aligned16(w) && kv_aligned16(in)) {
      KV_TRY(w_f16 ? launch_gemv<true>(st, out, in, w, bias, bias_f16, N, C, OC, accumulate)
                   : launch_gemv<false>(st, out, in, w, bias, bias_f16, N, C, OC, accumulate));
      return kv_launched();
    }
    gemv_scalar_kernel_v1<<<kv_ceil_div(OC, kGemvThreads / 32), kGemvThreads, 0, st>>>(
        out, in, w, w_f16, bias, bias_f16, N, C, OC, accumulate);
    return kv_launched();
  }
  if (w_f16 && (gemm_variant == 0 || gemm_variant == 3 || gemm_variant == 4)) {
    kv_status pst;  // v3 (gemm_prefill.cu); 4: without programmatic dependent launch
    if (kv_gemm_prefill(st, out, in, w, bias, bias_f16, nullptr, 0, 0.f, N, C, OC, accumulate, 0, false,
                        gemm_variant != 4, &pst))
      return pst;
  }
  if (w_f16) {
    const dim3 grid(kv_ceil_div(OC, kTcBN), kv_ceil_div(N, kTcBM));
    const __half *wh = static_cast<const __half *>(w);
    if (C % 8 == 0 && kv_aligned16(w) && kv_aligned16(in) && gemm_variant != 1) {
      // v2; 32-row tiles when 64-row ones would not give every SM two blocks.
      const int tiles_n = kv_ceil_div(OC, kT2BN);
      if ((long long)tiles_n * kv_ceil_div(N, 64) >= 264)
        gemm_f16_tc_kernel_v2<64><<<dim3(tiles_n, kv_ceil_div(N, 64)), kT2Threads, 0, st>>>(out, in, wh, bias, bias_f16, N, C, OC, accumulate);
      else
        gemm_f16_tc_kernel_v2<32><<<dim3(tiles_n, kv_ceil_div(N, 32)), kT2Threads, 0, st>>>(out, in, wh, bias, bias_f16, N, C, OC, accumulate);
    } else if (C % 8 == 0 && kv_aligned16(w) && kv_aligned16(in))
      gemm_f16_tc_kernel_v1<true><<<grid, kTcThreads, 0, st>>>(out, in, wh, bias, bias_f16, N, C, OC, accumulate);
    else
      gemm_f16_tc_kernel_v1<false><<<grid, kTcThreads, 0, st>>>(out, in, wh, bias, bias_f16, N, C, OC, accumulate);
  } else {
    const dim3 grid(kv_ceil_div(OC, kSgBN), kv_ceil_div(N, kSgBM));
    if (gemm_variant != 1 && (long long)grid.x * grid.y < 264) {
      gemm_f32_kernel_v2<2><<<dim3(grid.x, kv_ceil_div(N, 32)), kSgThreads, 0, st>>>(
          out, in, static_cast<const float *>(w), bias, bias_f16, N, C, OC, accumulate);
      return kv_launched();
    }
    gemm_f32_kernel_v1<<<grid, kSgThreads, 0, st>>>(out, in, static_cast<const float *>(w), bias, bias_f16, N,
                                                    C, OC, accumulate);
  }
  return kv_launched();
}

extern "C" kv_status kv_matmul_variant(kv_stream s, float *out, const float *in, const void *w, int w_f16,
                                       const void *bias, int bias_f16, int N, int C, int OC, int accumulate,
                                       int gemm_variant) {
  return matmul(s, out, in, w, w_f16, bias, bias_f16, N, C, OC, accumulate, gemm_variant, 0);
}

extern "C" kv_status kv_matmul(kv_stream s, float *out, const float *in, const void *w, int w_f16,
                               const void *bias, int bias_f16, int N, int C, int OC, int accumulate) {
  return kv_matmul_variant(s, out, in, w, w_f16, bias, bias_f16, N, C, OC, accumulate, 0);
}

extern "C" kv_status kv_matmul_lead(kv_stream s, float *out, const float *in, const void *w, int w_f16,
                                    const void *bias, int bias_f16, int N, int C, int OC) {
  return matmul(s, out, in, w, w_f16, bias, bias_f16, N, C, OC, 1, 0, 1);
}
