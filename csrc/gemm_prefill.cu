// gemm_prefill.cu — GEMM v3: out[N,OC] (+)= A[N,K]·w[OC,K]ᵀ (+ bias) with
// fp16 weights on tensor cores (mma.sync m16n8k16, fp32 accumulation), for
// the product sizes of prefill and of the `ar` mode (N = 33…1024 rows of
// 576–3072 channels), where matmul.cu's v2 left most of the GPU idle.
//
// Why: an `ar` step of SmolLM2 at cache 32 runs products of N = 33 rows; v2
// gives the down projection (1536 → 576) 18 blocks of 48 serial k-steps, each
// step waiting on a cp.async round trip (21.7 µs with its SiluMul kernel on
// an H200). v3, as template choices:
//  - 16-row tiles for short inputs (32 above), 4 pipeline stages;
//  - split-K over a thread block cluster (sm_90): S ∈ {2, 4, 8} blocks of a
//    cluster take a K range each, then reduce their partial tiles through
//    distributed shared memory in a fixed order (deterministic: no atomics),
//    each block finishing BM/S rows; chosen so that the grid has about two
//    blocks per SM and each split keeps ≥ 4 k-steps;
//  - the activations are staged fp32 (cp.async), then converted to fp16 once
//    per block and k-step into a second shared tile that the warps read with
//    ldmatrix (as are the weights). A first version converted while loading
//    each warp's fragments, as v2 does: every warp of a block row redid the
//    conversion, and with the fused input transforms below the inner loop
//    became instruction-bound (H200, T = 256: SmolLM2's gate|up with RMSNorm
//    19.6 µs against 14.2 for v2 plus a norm kernel);
//  - input transforms fused into that conversion: RMSNorm (A = x·w_norm;
//    each row's Σx² accumulates from the same staged tiles and the product
//    is scaled by 1/sqrt(Σx²/K + eps) in the epilogue) or SwiGLU (A =
//    silu(gate)·up from the two halves of a gate|up row);
//  - a SwiGLU epilogue (GLU): the block's 64 weight rows are 32 gate rows and
//    the 32 matching up rows, interleaved by 8, so each thread holds gate and
//    up of the same outputs and writes silu(gate)·up: Llama's MLP computes
//    its activation once per element instead of once per column tile of the
//    down projection (the A-tile SwiGLU above, 22.9 µs for SmolLM2's down
//    projection at T = 33, H200, in the first version);
//  - programmatic dependent launch (sm_90): the first stages' weight tiles
//    (and norm weights) are requested before waiting for the previous
//    kernel, which writes the activations.
// Tried and dropped: k-tiles of 64 in 58–82 KB of dynamic shared memory with
// the A ring a tile further ahead (1.7× the bytes in flight per SM, but 2–3
// blocks per SM instead of 4–5): slower at every T ≥ 65 on an H200 (SmolLM2
// `ar` at cache 255: 2.05 ms against 1.82), so these products are bound by
// the warps' instruction latency (barrier, conversion, ldmatrix→mma), not
// by the loads in flight; more resident warps matter more than deeper stages.
// The RMSNorm fusion rounds x·w_norm to fp16 and applies the row scale after
// the product, where the reference rounds x·rstd·w_norm: the same relative
// rounding per element (fp16 keeps 11 bits at any scale), but x·w_norm must
// stay below fp16's 65504 (residual streams of the models here stay far
// below; a row that overflowed would give inf/NaN outputs, not silently
// wrong ones).
// Needs K % 8 == 0 and 16-byte aligned operand rows (the dispatch checks).
#include <cooperative_groups.h>

#include "common.cuh"

namespace cg = cooperative_groups;

namespace {

constexpr int kG3Threads = 128;  // 4 warps
constexpr int kG3BN = 64, kG3BK = 32;
constexpr int kG3LdA = kG3BK + 4;  // floats: 16-byte aligned rows for cp.async and float4 reads
constexpr int kG3LdH = kG3BK + 8;  // halves (80 B): conflict-free ldmatrix rows
constexpr int kG3LdP = kG3BN + 4;  // floats: the split-K partial tile

enum G3Mode { kG3Plain = 0, kG3RMS = 1, kG3SwiGLU = 2 };

struct G3Params {
  float *out;
  const float *in;  // plain/RMS: rows of K; SwiGLU: rows of 2K (gate | up)
  const __half *w;
  const void *bias;
  int bias_f16;
  const void *norm_w;  // RMS: K weights of dtype norm_f16
  int norm_f16;
  float eps;
  int N, K, OC, lda, accumulate;
  int kps;  // k-tiles per split
  int F;    // GLU: outputs per row (OC/2); weight rows f and F + f pair up
};

// Shared memory: per pipeline stage the fp32 A tile (SwiGLU: gate and up),
// the fp16 B tile and the norm weights (RMS); two fp16 A tiles (converted,
// read by ldmatrix); each row's Σx². The split-K partial tile reuses the
// stages. Static, within the 48 KB a block gets without an opt-in.
template <int BM, int MODE>
struct G3Smem {
  static constexpr int A_BYTES = BM * kG3LdA * 4 * (MODE == kG3SwiGLU ? 2 : 1);
  static constexpr int B_BYTES = kG3BN * kG3LdH * 2;
  static constexpr int NW_BYTES = MODE == kG3RMS ? kG3BK * 4 : 0;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + NW_BYTES;
  static constexpr int AH_BYTES = 2 * BM * kG3LdH * 2;
  static constexpr int SS_BYTES = BM * 4;
  static constexpr int FIXED = AH_BYTES + SS_BYTES;
  static constexpr int STAGES = 4 * STAGE_BYTES + FIXED <= 47 * 1024 ? 4 : 3;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int RED_BYTES = BM * kG3LdP * 4 + BM * 4;  // split-K: partial tile + Σx² per row
  static constexpr int BIG = PIPE_BYTES > RED_BYTES ? PIPE_BYTES : RED_BYTES;
  static constexpr int BYTES = BIG + FIXED;
  static_assert(BYTES <= 48 * 1024, "static shared memory limit");
};

__device__ __forceinline__ void g3_mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void g3_ldsm_x4(uint32_t *r, const void *p) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ uint32_t g3_pack(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t *>(&h);
}

// silu(g)·u exactly as activation.cu's kernel (full-precision expf).
__device__ __forceinline__ float g3_swiglu(float g, float u) { return g / (1.f + expf(-g)) * u; }

// g3_wrow: the weight row behind row r (0…63) of column tile `tile`'s B
// tile. Plain: tile·64 + r. GLU: rows in groups of 16, 8 gate rows then the
// 8 matching up rows, so n-tiles 2t and 2t+1 of a warp hold gate and up of
// the same 8 outputs; -1 past the outputs.
template <bool GLU>
__device__ __forceinline__ int g3_wrow(int tile, int r, int OC, int F) {
  if (!GLU) {
    const int n = tile * kG3BN + r;
    return n < OC ? n : -1;
  }
  const int f = tile * (kG3BN / 2) + (r / 16) * 8 + r % 8;
  return f < F ? f + ((r / 8) % 2) * F : -1;
}

// gemm_f16_tc_kernel_v3: grid (column tiles·S, ceil(N/BM)); block x is split
// x % S of column tile x / S, and with S > 1 the S splits of a tile form one
// cluster (cluster rank = split). 4 warps as WARPS_M × WARPS_N, each one
// 16-row m-tile × WN columns of the 64-row B tile.
template <int BM, int MODE, bool GLU>
__global__ void __launch_bounds__(kG3Threads) gemm_f16_tc_kernel_v3(G3Params p, int S) {
  using L = G3Smem<BM, MODE>;
  constexpr int STAGES = L::STAGES;
  constexpr int WARPS_M = BM / 16, WARPS_N = 4 / WARPS_M, WN = kG3BN / WARPS_N, NTL = WN / 8;
  constexpr int ACH = BM * 8 / kG3Threads;  // 16-byte A chunks a thread stages (and converts) per k-tile
  static_assert(WARPS_M * WARPS_N == 4 && NTL % 2 == 0, "4 warps, n-tiles in pairs");
  __shared__ __align__(16) unsigned char smem[L::BYTES];
  auto As = [&](int st) { return reinterpret_cast<float(*)[kG3LdA]>(smem + st * L::STAGE_BYTES); };
  auto Us = [&](int st) {
    return reinterpret_cast<float(*)[kG3LdA]>(smem + st * L::STAGE_BYTES + BM * kG3LdA * 4);
  };
  auto Bs = [&](int st) { return reinterpret_cast<__half(*)[kG3LdH]>(smem + st * L::STAGE_BYTES + L::A_BYTES); };
  auto NWs = [&](int st) { return smem + st * L::STAGE_BYTES + L::A_BYTES + L::B_BYTES; };
  auto Ah = [&](int b) { return reinterpret_cast<__half(*)[kG3LdH]>(smem + L::BIG + b * BM * kG3LdH * 2); };
  float *SS = reinterpret_cast<float *>(smem + L::BIG + L::AH_BYTES);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tg = lane % 4;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int split = blockIdx.x % S, tile = blockIdx.x / S, m0 = blockIdx.y * BM;
  const int K = p.K, N = p.N;
  const int ktiles = (K + kG3BK - 1) / kG3BK;
  const int kt0 = split * p.kps, nk = max(0, min(ktiles, kt0 + p.kps) - kt0);

  // This thread's two B rows per k-tile (64 rows × 4 chunks of 8 halves).
  int wrow[2];
#pragma unroll
  for (int i = 0; i < 2; i++) wrow[i] = g3_wrow<GLU>(tile, (tid + i * kG3Threads) / 4, p.OC, p.F);

  auto load_B = [&](int stage, int kt) {
    const int k0 = kt * kG3BK;
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int idx = tid + i * kG3Threads, row = idx / 4, kc = (idx % 4) * 8, k = k0 + kc;
      const bool ok = wrow[i] >= 0 && k < K;
      kv_cp_async16_cg(&Bs(stage)[row][kc], ok ? p.w + (size_t)wrow[i] * K + k : p.w, ok);
    }
    if (MODE == kG3RMS) {
      if (p.norm_f16) {
        if (tid < kG3BK / 8) {
          const int k = k0 + tid * 8;
          const __half *src = static_cast<const __half *>(p.norm_w);
          kv_cp_async16_cg(NWs(stage) + tid * 16, k < K ? src + k : src, k < K);
        }
      } else if (tid < kG3BK / 4) {
        const int k = k0 + tid * 4;
        const float *src = static_cast<const float *>(p.norm_w);
        kv_cp_async16_cg(NWs(stage) + tid * 16, k < K ? src + k : src, k < K);
      }
    }
  };
  auto load_A = [&](int stage, int kt) {
    const int k0 = kt * kG3BK;
#pragma unroll
    for (int i = 0; i < ACH; i++) {  // BM rows × 8 chunks of 4 floats
      const int idx = tid + i * kG3Threads, row = idx / 8, kq = (idx % 8) * 4;
      const int m = m0 + row, k = k0 + kq;
      const bool ok = m < N && k < K;
      const float *src = p.in + (size_t)m * p.lda + k;
      kv_cp_async16_cg(&As(stage)[row][kq], ok ? src : p.in, ok);
      if (MODE == kG3SwiGLU) kv_cp_async16_cg(&Us(stage)[row][kq], ok ? src + K : p.in, ok);
    }
  };
  // convert: fp32 stage → fp16 tile Ah(b), the input transform applied once
  // per element. A thread always converts the same ACH rows (row tid/8 +
  // 16i) at columns 4·(tid % 8)…+3, so it can sum their squares itself.
  float ss[ACH];
#pragma unroll
  for (int i = 0; i < ACH; i++) ss[i] = 0.f;
  auto convert = [&](int stage, int b) {
    const int kq = (tid % 8) * 4;
    float4 wv = make_float4(1.f, 1.f, 1.f, 1.f);
    if (MODE == kG3RMS) {
      if (p.norm_f16) {
        const uint2 h = *reinterpret_cast<const uint2 *>(NWs(stage) + kq * 2);
        const float2 lo = __half22float2(*reinterpret_cast<const __half2 *>(&h.x));
        const float2 hi = __half22float2(*reinterpret_cast<const __half2 *>(&h.y));
        wv = make_float4(lo.x, lo.y, hi.x, hi.y);
      } else {
        wv = *reinterpret_cast<const float4 *>(NWs(stage) + kq * 4);
      }
    }
#pragma unroll
    for (int i = 0; i < ACH; i++) {
      const int row = tid / 8 + i * (kG3Threads / 8);
      float4 x = *reinterpret_cast<const float4 *>(&As(stage)[row][kq]);
      if (MODE == kG3RMS) {
        ss[i] += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
        x = make_float4(x.x * wv.x, x.y * wv.y, x.z * wv.z, x.w * wv.w);
      } else if (MODE == kG3SwiGLU) {
        const float4 u = *reinterpret_cast<const float4 *>(&Us(stage)[row][kq]);
        x = make_float4(g3_swiglu(x.x, u.x), g3_swiglu(x.y, u.y), g3_swiglu(x.z, u.z), g3_swiglu(x.w, u.w));
      }
      *reinterpret_cast<uint2 *>(&Ah(b)[row][kq]) = make_uint2(g3_pack(x.x, x.y), g3_pack(x.z, x.w));
    }
  };

  // Weights first: no earlier kernel writes them, so their fetch overlaps
  // the previous kernel's tail. Group s then holds A of stage s (and, in
  // group 0, the first stages' weights): waits stay in order.
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++)
    if (s < nk) load_B(s, kt0 + s);
  kv_pdl_wait();
  kv_pdl_launch_dependents();
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < nk) load_A(s, kt0 + s);
    kv_cp_async_commit();
  }

  float acc[NTL][4];
#pragma unroll
  for (int i = 0; i < NTL; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  // Iteration i multiplies tile i (converted during iteration i − 1) while
  // converting tile i + 1: one barrier per k-step.
  if (nk > 0) {
    kv_cp_async_wait<STAGES - 2>();
    __syncthreads();
    convert(0, 0);
  }
  for (int i = 0; i < nk; i++) {
    kv_cp_async_wait<STAGES - 3>();  // tile i + 1 landed (this thread's part)
    __syncthreads();  // …everyone's; Ah(i % 2) complete; tile i − 1's stage and Ah((i + 1) % 2) free
    const int nx = i + STAGES - 1;
    if (nx < nk) {
      load_B(nx % STAGES, kt0 + nx);
      load_A(nx % STAGES, kt0 + nx);
    }
    kv_cp_async_commit();
    if (i + 1 < nk) convert((i + 1) % STAGES, (i + 1) % 2);
    __half(*a)[kG3LdH] = Ah(i % 2);
    __half(*bs)[kG3LdH] = Bs(i % STAGES);
#pragma unroll
    for (int ks = 0; ks < kG3BK; ks += 16) {
      uint32_t af[4];
      g3_ldsm_x4(af, &a[wm * 16 + ((lane / 8) % 2) * 8 + lane % 8][ks + (lane / 16) * 8]);
#pragma unroll
      for (int nt = 0; nt < NTL; nt += 2) {  // n-tiles nt, nt + 1: rows wn·WN + 8nt…+15
        uint32_t bf[4];
        g3_ldsm_x4(bf, &bs[wn * WN + nt * 8 + (lane / 16) * 8 + lane % 8][ks + ((lane / 8) % 2) * 8]);
        g3_mma(acc[nt], af, bf[0], bf[1]);
        g3_mma(acc[nt + 1], af, bf[2], bf[3]);
      }
    }
  }
  kv_cp_async_wait<0>();
  if (MODE == kG3RMS) {  // a row's 8 converting threads are consecutive lanes
#pragma unroll
    for (int i = 0; i < ACH; i++) {
      ss[i] += __shfl_xor_sync(KV_FULL_MASK, ss[i], 1);
      ss[i] += __shfl_xor_sync(KV_FULL_MASK, ss[i], 2);
      ss[i] += __shfl_xor_sync(KV_FULL_MASK, ss[i], 4);
      if (tid % 8 == 0) SS[tid / 8 + i * (kG3Threads / 8)] = ss[i];
    }
  }
  __syncthreads();  // SS written; every warp is past its last read of the stages

  const int r = wm * 16 + g;  // this thread's rows r and r + 8 of the tile
  // Output column of B-tile row c (even c: a GLU pair's gate row).
  auto out_col = [&](int c) { return GLU ? tile * (kG3BN / 2) + (c / 16) * 8 + c % 8 : tile * kG3BN + c; };
  auto bias_of = [&](int c) {
    if (!p.bias) return 0.f;
    const int n = g3_wrow<GLU>(tile, c, p.OC, p.F);
    return kv_load_w(p.bias, p.bias_f16, n);
  };
  auto rscale = [&](float s) { return MODE == kG3RMS ? 1.f / sqrtf(s / (float)K + p.eps) : 1.f; };  // norm.cu's rstd
  auto store = [&](int m, int n, float v) {
    const int width = GLU ? p.F : p.OC;
    float *o = p.out + (size_t)m * width + n;
    *o = p.accumulate ? *o + v : v;
  };

  if (S == 1) {
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      const int rr = r + hf * 8, m = m0 + rr;
      if (m >= N) continue;
      const float rs = rscale(SS[rr]);
#pragma unroll
      for (int nt = 0; nt < NTL; nt += GLU ? 2 : 1)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int c = wn * WN + nt * 8 + tg * 2 + e, n = out_col(c);
          if (GLU) {
            if (n >= p.F) continue;
            const float gt = acc[nt][hf * 2 + e] * rs + bias_of(c);
            const float up = acc[nt + 1][hf * 2 + e] * rs + bias_of(c + 8);
            store(m, n, g3_swiglu(gt, up));
          } else {
            if (n >= p.OC) continue;
            store(m, n, acc[nt][hf * 2 + e] * rs + bias_of(c));
          }
        }
    }
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Split-K: partial tiles into shared memory, then rank q of the cluster
  // sums rows [q·BM/S, (q+1)·BM/S) over ranks 0…S−1 in order.
  float(*P)[kG3LdP] = reinterpret_cast<float(*)[kG3LdP]>(smem);
  float *PS = reinterpret_cast<float *>(smem + BM * kG3LdP * 4);
#pragma unroll
  for (int nt = 0; nt < NTL; nt++) {
    const int c = wn * WN + nt * 8 + tg * 2;
    *reinterpret_cast<float2 *>(&P[r][c]) = make_float2(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<float2 *>(&P[r + 8][c]) = make_float2(acc[nt][2], acc[nt][3]);
  }
  if (tid < BM) PS[tid] = SS[tid];
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every split's partial visible cluster-wide
  const int rows = BM / S;
  constexpr int COLS = GLU ? kG3BN / 2 : kG3BN;  // outputs per tile row
  for (int idx = tid; idx < rows * COLS; idx += kG3Threads) {
    const int rr = split * rows + idx / COLS, j = idx % COLS, m = m0 + rr;
    const int c = GLU ? (j / 8) * 16 + j % 8 : j, n = out_col(c);
    float v = 0.f, u = 0.f, s = 0.f;
    for (int q = 0; q < S; q++) {
      const float *Pq = cluster.map_shared_rank(&P[rr][0], q);
      v += Pq[c];
      if (GLU) u += Pq[c + 8];
      if (MODE == kG3RMS) s += *cluster.map_shared_rank(&PS[rr], q);
    }
    if (m >= N || n >= (GLU ? p.F : p.OC)) continue;
    const float rs = rscale(s);
    if (GLU)
      store(m, n, g3_swiglu(v * rs + bias_of(c), u * rs + bias_of(c + 8)));
    else
      store(m, n, v * rs + bias_of(c));
  }
  cluster.sync();  // no block leaves while others read its shared memory
#endif
}

template <int BM, int MODE, bool GLU>
cudaError_t g3_launch(cudaStream_t s, const G3Params &p, int tiles, int S, bool pdl) {
  return kv_launch_clustered(gemm_f16_tc_kernel_v3<BM, MODE, GLU>, S, dim3(tiles * S, kv_ceil_div(p.N, BM)),
                             dim3(kG3Threads), 0, s, pdl, p, S);
}

bool g3_aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

// kv_gemm_prefill (C++ linkage; matmul.cu, fused.cu and kv_norm_matmul_swiglu
// dispatch to it): out (+)= A·w[OC,K]ᵀ + bias with fp16 weights, A = in
// (mode 0), x·w_norm with RMSNorm's row scale (mode 1: norm_w of dtype
// norm_f16, eps), or silu(in[:, :K])·in[:, K:2K] (mode 2, rows 2K apart).
// glu: out[N, OC/2] = silu(p[:, :OC/2])·p[:, OC/2:] of the product p (OC
// even). pdl: launch as a programmatic dependent (ignored before sm_90).
// Returns false, launching nothing, where v3 does not apply (K % 8 ≠ 0,
// misaligned operands, N < 1); *st holds the status otherwise.
bool kv_gemm_prefill(cudaStream_t s, float *out, const float *in, const void *w, const void *bias, int bias_f16,
                     const void *norm_w, int norm_f16, float eps, int N, int K, int OC, int accumulate, int mode,
                     bool glu, bool pdl, kv_status *st) {
  if (N < 1 || OC < 1 || K < 8 || K % 8 != 0 || !g3_aligned16(in) || !g3_aligned16(w) ||
      (mode == kG3RMS && !g3_aligned16(norm_w)) || (glu && OC % 2 != 0) || kv_ceil_div(N, 16) > 65535)
    return false;
  G3Params p{out, in, static_cast<const __half *>(w), bias, bias_f16, norm_w, norm_f16, eps,
             N, K, OC, mode == kG3SwiGLU ? 2 * K : K, accumulate, 0, OC / 2};
  const bool sm90 = kv_pdl_supported();  // sm_90: clusters and programmatic dependent launch
  // Tile rows: 16 for short inputs (an `ar` step at cache 32 or 64 has 33 or
  // 65 rows), else 32. The A-tile SwiGLU doubles the staged A: 16 rows only
  // (it is kept for comparison; Llama's MLP takes the GLU epilogue).
  const int tiles = glu ? kv_ceil_div(OC / 2, kG3BN / 2) : kv_ceil_div(OC, kG3BN), ktiles = kv_ceil_div(K, kG3BK);
  const int BM = N <= 80 || mode == kG3SwiGLU ? 16 : 32;
  // Split K over a cluster until there are ~2 blocks per SM, keeping ≥ 4
  // k-steps per split (fewer leave the pipeline nothing to overlap).
  const long long blocks = (long long)tiles * kv_ceil_div(N, BM);
  int S = 1;
  while (sm90 && S < 8 && blocks * S < 264 && ktiles >= 8 * S) S *= 2;
  p.kps = kv_ceil_div(ktiles, S);
  pdl = pdl && sm90;
  cudaError_t e = cudaSuccess;
#define KV_G3(BMV, MODEV)                                                                     \
  e = glu ? g3_launch<BMV, MODEV, true>(s, p, tiles, S, pdl) : g3_launch<BMV, MODEV, false>(s, p, tiles, S, pdl)
  switch (mode) {
    case kG3Plain:
      if (BM == 16) KV_G3(16, kG3Plain);
      else KV_G3(32, kG3Plain);
      break;
    case kG3RMS:
      if (BM == 16) KV_G3(16, kG3RMS);
      else KV_G3(32, kG3RMS);
      break;
    default:
      KV_G3(16, kG3SwiGLU);
      break;
  }
#undef KV_G3
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    *st = (kv_status)e;
    return true;
  }
  *st = kv_launched();
  return true;
}

// kv_norm_matmul_swiglu: see kvalign.h.
extern "C" kv_status kv_norm_matmul_swiglu(kv_stream s, float *out, const float *in, const void *norm_w,
                                           const void *norm_b, int norm_f16, const void *w, int w_f16,
                                           const void *bias, int bias_f16, int N, int C, int OC, float eps, int rms,
                                           int variant) {
  if (N <= 0 || OC <= 0) return kv_launched();
  if (C <= 0 || OC % 2 != 0 || !out || !in || !w || !norm_w) return (kv_status)cudaErrorInvalidValue;
  if ((variant == 0 || variant == 5) && w_f16 && rms) {
    kv_status st;
    if (kv_gemm_prefill(s, out, in, w, bias, bias_f16, norm_w, norm_f16, eps, N, C, OC, 0, kG3RMS, true, true, &st))
      return st;
  }
  // Three steps: the norm and the product into stream-ordered scratch, then
  // SiluMul.
  float *scratch = nullptr;
  KV_TRY(cudaMallocAsync(reinterpret_cast<void **>(&scratch), (size_t)N * (C + OC) * sizeof(float), s));
  float *xn = scratch, *prod = scratch + (size_t)N * C;
  kv_status st = rms ? kv_rmsnorm(s, xn, in, norm_w, norm_f16, N, C, eps, 0)
                     : kv_layernorm(s, xn, in, norm_w, norm_b, norm_f16, N, C, eps, 0);
  if (st == 0) st = kv_matmul(s, prod, xn, w, w_f16, bias, bias_f16, N, C, OC, 0);
  if (st == 0) st = kv_silu_mul(s, out, prod, prod + OC / 2, N, OC / 2, OC);
  const cudaError_t fe = cudaFreeAsync(scratch, s);
  if (st != 0) return st;
  KV_TRY(fe);
  return kv_launched();
}
