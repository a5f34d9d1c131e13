// fused.cu — the fused decode operations of gpu.Fused (reference
// compositions: gpu/ref/fused.go). Batch-1 decoding is bound by launch
// latency once the weights stream at full bandwidth, so each entry point does
// the work of several plain operations in one launch:
//
//  - kv_norm_matmul:   LayerNorm/RMSNorm → MatMul (+ bias, gelu_new, residual add)
//  - kv_swiglu_matmul: silu(gate)·up → MatMul (+ residual add)
//  - kv_rope_store:    RoPE on q|k → CacheStore(k) → CacheStore(v)
//  - kv_norm_matmul_store: kv_norm_matmul into q|k|v rows → kv_rope_store,
//    one kernel (the GEMV's blocks take rotation pairs of rows)
// and, through fused.cuh, plain decode products for matmul.cu (kPlain).
//
// Small N (decoding, N ≤ 8): one GEMV kernel (v1) that streams its weight
// rows like matmul.cu's gemv_kernel_v1 and computes its input itself: every
// block stages the input rows (≤ a few KB, read through L1) in shared memory
// and normalises them there, so no launch and no round trip through memory
// separate the norm from the product. The weights, which no earlier kernel
// writes, are loaded before the input is touched, so their fetch latency
// overlaps the normalisation. (v2, N = 1 with the input in registers, lost
// to v1 and is kept for comparison.) Products of more than kFusedMaxBlocks
// blocks (the LM head) take the two-step path below.
//
// Programmatic dependent launch (sm_90, variant 2 / default): a fused kernel
// launched as a programmatic dependent issues its weight loads before
// waiting for its predecessor (griddepcontrol.wait), then lets the next
// kernel of the stream launch (griddepcontrol.launch_dependents) — after the
// wait, so that at most one kernel prefetches ahead (triggering at the start
// let a whole chain of kernels launch at once and flood the memory system
// with far-ahead weight loads). Only constant data (weights) is read before
// the wait; every read of activations and every write comes after it, and
// each kernel completes only after its predecessor has, so stream order
// holds.
//
// Large N (prefill, scoring, recomputation) and shapes the GEMV cannot take
// (rows not 16-byte multiples, inputs too large for shared memory): the norm
// or activation writes a scratch buffer taken from the stream-ordered
// allocator (cudaMallocAsync/cudaFreeAsync: graph memory nodes under
// capture), then kv_matmul (and kv_gelu_new) run on it.
#include "common.cuh"
#include "fused.cuh"
#include "stamps.cuh"

namespace {

constexpr int kFusedThreads = 128;
constexpr int kFusedMaxN = 8;
// Dynamic shared memory of v1: 48 KB (a block's limit without an opt-in)
// less room for the kernel's static arrays.
constexpr int kFusedSmemMax = 46 * 1024;
// v1 launches at most this many blocks; above it (the LM head: 12–25k
// blocks) the two-step path is used: every block normalises the input
// itself, and at that count the redundant staging costs more than a second
// launch (H200, N = 1: distilgpt2 LM head 37.5 µs fused, 22.2 µs two-step;
// 3072 rows, 768 blocks: 4.4 µs fused, 6.1 µs two-step). Capping the grid
// at 1536 blocks that loop over the tiles (the norm once a block) was
// slower still on an H100: 31.0 µs against 29.0 two-step.
constexpr int kFusedMaxBlocks = 1536;
constexpr int kV2ChunksPerLane = 4;       // v2: 16-byte weight chunks a lane holds (a row ≤ 4·128 chunks)

// kPlain: the input as it is (a plain product, so that decode products with
// no norm — the attention output projection, GPT-2's MLP projection — also
// prefetch their weights as programmatic dependents).
enum InMode { kLayerNorm = 0, kRMSNorm = 1, kSwiGLU = 2, kPlain = 3 };
__host__ __device__ constexpr bool has_norm(int mode) { return mode == kLayerNorm || mode == kRMSNorm; }

// block_row is the output row of a block's k-th row (k = group·R + r, RB
// rows a block). Normally rows are consecutive; PAIRED (the q|k|v product
// with its RoPE and cache store fused in) gives a block RB/2 rotation pairs
// instead, rows (i, i + HS/2) of a head, pair p = tile·RB/2 + k mod RB/2 and
// k < RB/2 the first of each pair, so the block can rotate what it computed.
template <int RB>
__device__ __forceinline__ int block_row(bool paired, int tile, int k, int hs) {
  if (!paired) return tile * RB + k;
  constexpr int HP = RB / 2 > 0 ? RB / 2 : 1;  // RB = 1 is never paired (the host checks)
  const int pair = tile * HP + k % HP, hh = hs / 2;
  return pair / hh * hs + pair % hh + k / HP * hh;
}

// load_batch issues one batch of weight loads: for the R rows of (tile,
// group), chunks c0, c0+TPR, … (U of them). Rows past OC reread the last row
// (never stored), chunks past the row give zeros.
template <bool F16, int R, int U, int TPR, int GROUPS>
__device__ __forceinline__ void load_batch(uint4 (&wv)[R][U], const char *__restrict__ w, size_t row_bytes,
                                           int tile, int group, int c0, int chunks, int OC, bool paired, int hs) {
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int row = block_row<GROUPS * R>(paired, tile, group * R + r, hs);
    const uint4 *p = reinterpret_cast<const uint4 *>(w + (size_t)min(row, OC - 1) * row_bytes);
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int c = c0 + u * TPR;
      wv[r][u] = c < chunks ? kv_ld_stream16(p + c) : make_uint4(0, 0, 0, 0);
    }
  }
}

// fused_gemv_kernel_v1 (any N ≤ 8): out[N,OC] (+)= act(xform(in)[N,K]·w[OC,K]ᵀ + bias).
// xform (MODE): LayerNorm or RMSNorm of rows of K = C, or
// silu(gu[:, :K])·gu[:, K:2K] (rows 2K apart). The input rows (and the norm
// weights) are staged in shared memory by cp.async and transformed there by
// the whole block; then GROUPS groups of TPR lanes compute R output rows each
// for all N inputs (matmul.cu gemv_kernel_v1's weight stream, inputs from
// shared memory). The first batch of weights is loaded before the staging.
// The staging copies are L1-allocating (cp.async.ca): every block reads the
// same few KB, and with L1-bypassing copies (.cg) the blocks' requests for
// the same L2 lines serialised — a first version spent 2–3 µs there at 576
// blocks (distilgpt2 qkv), more than the whole product.
//
// Shared memory (dynamic): xs[N][K] floats (SwiGLU: + us[N][K] for the up
// half), then for the norms norm_w and norm_b as stored (half or float).
//
// With st.kc set (kv_norm_matmul_store; a run-time switch, not a template
// one, so as not to double the instantiations): out holds q|k|v rows (OC = (NH + 2·NKV)·HS);
// the block's rows are rotation pairs (block_row), and its epilogue rotates
// the pairs of heads below st.rope_heads at pos[n] (rope_store_kernel_v1's
// arithmetic) and writes key and value heads to slot slots[n] of the caches
// too, which saves the separate RoPE/store launch of every layer.
struct StoreArgs {
  float *kc, *vc;  // one layer's caches [S, NKV, HS]
  const int32_t *pos, *slots;
  int S, NH, NKV, HS, rope_heads;
  RopeFreqs freqs;  // rope_freqs(HS, θ)
};

// SumArgs: the residual stream after a folded attention (kv_attention_out),
// a run-time switch as StoreArgs.
//  - acc (norm modes): the input row n is in[n] + (pbias +
//    kv_unfix(acc[n])) (as ref.SumAcc); block 0 also writes it to sum
//    (kv_norm_matmul_sum).
//  - res (other modes): out = res + product, in place of accumulate's
//    out + product (kv_res_matmul: the MLP's output added to the residual
//    the norm kernel wrote, not to the stream it started from); clear, if
//    set, is zeroed at the rows the block writes (the accumulator, free
//    again once the norm kernel has read it).
struct SumArgs {
  const long long *acc;
  const void *pbias;
  int pbias_f16;
  float *sum;
  const float *res;
  long long *clear;
};

template <bool F16, int NB, int R, int TPR, int MODE, int U = 4 / R>
__global__ void __launch_bounds__(kFusedThreads)
    fused_gemv_kernel_v1(float *__restrict__ out, const float *__restrict__ in, const void *__restrict__ norm_w,
                         const void *__restrict__ norm_b, int norm_f16, const void *__restrict__ w,
                         const void *__restrict__ bias, int bias_f16, int N, int K, int OC, float eps, int gelu,
                         int accumulate, StoreArgs st, SumArgs sa, int lead) {
  constexpr int VEC = F16 ? 8 : 4;  // weights per 16-byte chunk
  constexpr bool kFoldRMS = MODE == kRMSNorm;  // see step 4
  // U: chunks per row per batch (R·U loads in flight a thread).
  constexpr int GROUPS = kFusedThreads / TPR;
  constexpr int NWARPS = kFusedThreads / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[2][NWARPS][NB];

  const int tid = threadIdx.x;
  const int group = tid / TPR, lane = tid % TPR;
  const int chunks = K / VEC;
  const size_t row_bytes = (size_t)K * (F16 ? 2 : 4);
  const char *wb = static_cast<const char *>(w);
  float *xs = reinterpret_cast<float *>(smem);
  const int K4 = K / 4;

  // Loops over run-time bounds stay rolled (unroll 1): instruction-cache
  // footprint, as mlp.cu (docs/PERF.md, version 20).
  // 1. Constant data first: the first batch of weights, and the norm
  // weights into shared memory (and when storing, the inverse frequency of
  // the pair this thread rotates, from the host's table, rope_freqs: the
  // double pow it replaces sat in the prologue; docs/PERF.md, version 19).
  constexpr int RB = GROUPS * R, HP = RB / 2 > 0 ? RB / 2 : 1;
  const bool store = has_norm(MODE) && st.kc != nullptr;  // the cache store follows a norm only
  KV_STAMP_DECL(stp, store ? 1 : (MODE == kPlain ? 3 : 4));
  float inv_freq = 0.f;
  if (store) {
    const int pair = blockIdx.x * HP + tid % HP;
    if (st.rope_heads > 0) inv_freq = st.freqs.v[pair % (st.HS / 2)];
  }
  // early: this thread's first (pair, row) of the epilogue has its cache
  // slot and position loaded before the product, not after it, where their
  // round trip to L2 held the whole store: before the wait when leading
  // (the kernel before this one passed its own wait before this one
  // launched, so the step's inputs, copied in at its start, are final; the
  // runner leads from the second layer), with the rotation factors too;
  // else beside the input's staging.
  const bool early = store && tid < HP * N;
  int pre_slot = -1;
  float pre_pos = 0.f, pre_sn = 0.f, pre_cs = 1.f;
  auto load_early = [&] {
    pre_slot = st.slots[tid / HP];
    pre_pos = (float)st.pos[tid / HP];
  };
  if (early && lead) {
    load_early();
    if (st.rope_heads > 0) {
      const float2 sc = kv_sincos(pre_pos * inv_freq);
      pre_sn = sc.x;
      pre_cs = sc.y;
    }
  }
  uint4 wv[R][U];
  load_batch<F16, R, U, TPR, GROUPS>(wv, wb, row_bytes, blockIdx.x, group, lane, chunks, OC, store, st.HS);
  // The bias of each row this group computes: constant data too. Loaded in
  // the epilogue, its round trip to L2 or DRAM sat on the critical path of
  // every GPT-2 product (≈ 5 µs a distilgpt2 step; docs/PERF.md, version 14).
  float bv[R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int row = min(block_row<RB>(store, blockIdx.x, group * R + r, st.HS), OC - 1);
    bv[r] = bias ? kv_load_w(bias, bias_f16, row) : 0.f;
  }
  const int nbytes = K * (norm_f16 ? 2 : 4);  // a multiple of 16 (host checks)
  unsigned char *nws = smem + (size_t)N * K * 4 * (MODE == kSwiGLU ? 2 : 1);
  unsigned char *nbs = nws + nbytes;
  if constexpr (has_norm(MODE)) {
#pragma unroll 1
    for (int i = tid; i < nbytes / 16; i += kFusedThreads) {
      kv_cp_async16_ca(nws + 16 * i, static_cast<const char *>(norm_w) + 16 * i);
      if (MODE == kLayerNorm && norm_b != nullptr) kv_cp_async16_ca(nbs + 16 * i, static_cast<const char *>(norm_b) + 16 * i);
    }
  }

  // 2. The input rows (written by the previous kernel).
  // lead (kv_matmul_lead): the next kernel may launch now, before this one
  // waits, because it reads only constant data before its own wait; its
  // weights then stage while this kernel's predecessor still runs.
  if (lead) kv_pdl_launch_dependents();
  KV_STAMP_AT(stp, 8);
  kv_pdl_wait();
  KV_STAMP_AT(stp, 2);
  if (!lead) kv_pdl_launch_dependents();
  if (early && !lead) load_early();
  if constexpr (MODE == kSwiGLU) {
    float *us = xs + N * K;
#pragma unroll 1
    for (int idx = tid; idx < N * K4; idx += kFusedThreads) {
      const int n = idx / K4, i = idx - n * K4;
      kv_cp_async16_ca(xs + 4 * idx, in + (size_t)n * 2 * K + 4 * i);
      kv_cp_async16_ca(us + 4 * idx, in + (size_t)n * 2 * K + K + 4 * i);
    }
  } else {
#pragma unroll 1
    for (int idx = tid; idx < N * K4; idx += kFusedThreads) kv_cp_async16_ca(xs + 4 * idx, in + 4 * (size_t)idx);
  }
  kv_cp_async_commit();
  // What the epilogue adds the product to (the residual rows sa.res, or the
  // output itself when accumulating): loaded now, beside the staging, by
  // the lanes that will write them, not after the product. After the wait,
  // because the previous kernel may have written them.
  // Lane (r·NB + n) mod TPR of a group writes output (row0 + r, n).
  const int row0 = (blockIdx.x * GROUPS + group) * R;
  auto writes = [&](int r, int n) { return n < N && lane == (r * NB + n) % TPR && row0 + r < OC; };
  constexpr bool kPreOut = NB <= 2;
  float prev[kPreOut ? R : 1][kPreOut ? NB : 1];
  if constexpr (kPreOut) {
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
      for (int n = 0; n < NB; n++) {
        const int row = row0 + r;
        prev[r][n] = 0.f;
        if (!store && writes(r, n)) {
          if (sa.res) prev[r][n] = sa.res[(size_t)n * OC + row];
          else if (accumulate) prev[r][n] = out[(size_t)n * OC + row];
        }
      }
  }
  // The accumulator the previous kernel filled (sa.acc): a thread's chunks
  // of each row (up to kAccChunks: all of them for rows of up to
  // kAccChunks·4·kFusedThreads, SmolLM2's 576 included) are loaded now,
  // beside the staging, instead of in a second round trip to L2 once the
  // rows have landed. (Only the first chunk used to be: the 16 threads with
  // a second one held the whole block for a round trip.)
  constexpr bool kPreAcc = has_norm(MODE) && NB <= 2;
  constexpr int kAccChunks = NB == 1 ? 2 : 1;
  longlong2 pa[kPreAcc ? NB : 1][kAccChunks][2];
  if constexpr (kPreAcc) {
    if (sa.acc) {
#pragma unroll
      for (int c = 0; c < kAccChunks; c++) {
        const int i = tid + c * kFusedThreads;
#pragma unroll
        for (int n = 0; n < NB; n++) {
          if (n < N && i < K4) {
            // Through L1, as the staging: the blocks of an SM read the same
            // lines (measured level with __ldcg; version 14).
            const longlong2 *ap = reinterpret_cast<const longlong2 *>(sa.acc + (size_t)n * K + 4 * i);
            pa[n][c][0] = __ldca(ap);
            pa[n][c][1] = __ldca(ap + 1);
          }
        }
      }
    }
  }
  kv_cp_async_wait_all();
  __syncthreads();
  KV_STAMP_AT(stp, 3);

  // 3. Transform in place; each thread owns the same float4s in every pass.
  float4 *xs4 = reinterpret_cast<float4 *>(xs);
  if constexpr (MODE == kSwiGLU) {
    // silu(g)·u as activation.cu's silu_mul_kernel_v1 (full-precision expf).
    const float4 *us4 = reinterpret_cast<const float4 *>(xs + N * K);
    for (int idx = tid; idx < N * K4; idx += kFusedThreads) {
      float4 g = xs4[idx];
      const float4 u = us4[idx];
      g.x = silu_mul(g.x, u.x);
      g.y = silu_mul(g.y, u.y);
      g.z = silu_mul(g.z, u.z);
      g.w = silu_mul(g.w, u.w);
      xs4[idx] = g;
    }
  } else if constexpr (has_norm(MODE)) {
    if (sa.acc) {  // the residual stream: + (pbias + unfix(acc))
      // add_acc: chunk i of row n, its accumulator words a0, a1.
      auto add_acc = [&](int n, int i, longlong2 a0, longlong2 a1) {
        float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
        if (sa.pbias) {
          t.x = kv_load_w(sa.pbias, sa.pbias_f16, 4 * i);
          t.y = kv_load_w(sa.pbias, sa.pbias_f16, 4 * i + 1);
          t.z = kv_load_w(sa.pbias, sa.pbias_f16, 4 * i + 2);
          t.w = kv_load_w(sa.pbias, sa.pbias_f16, 4 * i + 3);
        }
        t.x += kv_unfix(a0.x);
        t.y += kv_unfix(a0.y);
        t.z += kv_unfix(a1.x);
        t.w += kv_unfix(a1.y);
        float4 x = xs4[n * K4 + i];
        x.x += t.x;
        x.y += t.y;
        x.z += t.z;
        x.w += t.w;
        xs4[n * K4 + i] = x;
        if (blockIdx.x == 0 && sa.sum) reinterpret_cast<float4 *>(sa.sum)[n * K4 + i] = x;
      };
      const int pre = kPreAcc ? kAccChunks : 0;  // chunks a thread preloaded
      if constexpr (kPreAcc) {
#pragma unroll
        for (int c = 0; c < kAccChunks; c++) {
          const int i = tid + c * kFusedThreads;
#pragma unroll
          for (int n = 0; n < NB; n++)
            if (n < N && i < K4) add_acc(n, i, pa[n][c][0], pa[n][c][1]);
        }
      }
#pragma unroll 1
      for (int i = tid + pre * kFusedThreads; i < K4; i += kFusedThreads) {
#pragma unroll
        for (int n = 0; n < NB; n++) {
          if (n < N) {
            const longlong2 *ap = reinterpret_cast<const longlong2 *>(sa.acc + (size_t)n * K + 4 * i);
            add_acc(n, i, __ldca(ap), __ldca(ap + 1));
          }
        }
      }
    }
  }
  if constexpr (MODE == kLayerNorm) {
    // Row statistics in fp32, two passes (as norm.cu: the one-pass
    // E[x²]−E[x]² would cancel for rows with a large mean). RMSNorm needs
    // no pass of its own (kFoldRMS, step 4).
    float mean[NB], rstd[NB];
    float s[NB];
#pragma unroll
    for (int n = 0; n < NB; n++) s[n] = 0.f;
    for (int i = tid; i < K4; i += kFusedThreads) {
#pragma unroll
      for (int n = 0; n < NB; n++) {
        if (n < N) {
          const float4 v = xs4[n * K4 + i];
          s[n] += (v.x + v.y) + (v.z + v.w);
        }
      }
    }
    block_sum_rows<kFusedThreads / 32>(s, red[0]);
#pragma unroll
    for (int n = 0; n < NB; n++) {
      mean[n] = s[n] / (float)K;
      s[n] = 0.f;
    }
    for (int i = tid; i < K4; i += kFusedThreads) {
#pragma unroll
      for (int n = 0; n < NB; n++) {
        if (n < N) {
          const float4 v = xs4[n * K4 + i];
          const float a = v.x - mean[n], b = v.y - mean[n], c = v.z - mean[n], d = v.w - mean[n];
          s[n] += (a * a + b * b) + (c * c + d * d);
        }
      }
    }
    block_sum_rows<kFusedThreads / 32>(s, red[1]);
#pragma unroll
    for (int n = 0; n < NB; n++) rstd[n] = 1.f / sqrtf(s[n] / (float)K + eps);
    const bool has_b = norm_b != nullptr;
    for (int i = tid; i < K4; i += kFusedThreads) {
      float wn[4], bn[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int e = 0; e < 4; e++) {
        wn[e] = load_norm_w(nws, norm_f16, 4 * i + e);
        if (has_b) bn[e] = load_norm_w(nbs, norm_f16, 4 * i + e);
      }
#pragma unroll
      for (int n = 0; n < NB; n++) {
        if (n < N) {
          float4 v = xs4[n * K4 + i];
          v.x = (v.x - mean[n]) * rstd[n] * wn[0] + bn[0];
          v.y = (v.y - mean[n]) * rstd[n] * wn[1] + bn[1];
          v.z = (v.z - mean[n]) * rstd[n] * wn[2] + bn[2];
          v.w = (v.w - mean[n]) * rstd[n] * wn[3] + bn[3];
          xs4[n * K4 + i] = v;
        }
      }
    }
  }
  __syncthreads();
  KV_STAMP_AT(stp, 4);

  // 4. The weight stream (matmul.cu gemv_kernel_v1's loop, inputs from
  // shared memory); the first batch is already in wv.
  // kFoldRMS: RMSNorm needs no pass of its own. Each group reads the whole
  // input row for its product anyway, so it sums the squares as it goes,
  // multiplies by the norm weights there, and scales its sums by
  // 1/rms at the end: norm(x)·w = rstd·Σ w_i·(x_i·g_i). That takes a pass,
  // a block reduction, the normalising pass and two barriers off the
  // critical path after the wait (every group sums in the same order, so
  // every block gets the same rstd).
  float acc[R][NB], sq[1][NB];  // sq: kFoldRMS's sums of squares
#pragma unroll
  for (int n = 0; n < NB; n++) {
    sq[0][n] = 0.f;
#pragma unroll
    for (int r = 0; r < R; r++) acc[r][n] = 0.f;
  }
  const int nlast = N - 1;
#pragma unroll 1
  for (int c0 = lane; c0 < chunks; c0 += TPR * U) {
    if (c0 != lane) load_batch<F16, R, U, TPR, GROUPS>(wv, wb, row_bytes, blockIdx.x, group, c0, chunks, OC, store, st.HS);
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int c = c0 + u * TPR;
      if (c < chunks) {
        float wf[R][VEC];
#pragma unroll
        for (int r = 0; r < R; r++) kv_unpack16<F16>(wv[r][u], wf[r]);
        float4 g[kFoldRMS ? VEC / 4 : 1];
        if constexpr (kFoldRMS) {
#pragma unroll
          for (int v4 = 0; v4 < VEC / 4; v4++) g[v4] = load_norm_w4(nws, norm_f16, c * (VEC / 4) + v4);
        }
#pragma unroll
        for (int n = 0; n < NB; n++) {
          // Rows n ≥ N read row N−1 (a valid address); their sums are dropped.
          const float4 *xp = reinterpret_cast<const float4 *>(xs + (size_t)min(n, nlast) * K + (size_t)c * VEC);
#pragma unroll
          for (int v4 = 0; v4 < VEC / 4; v4++) {
            float4 x = xp[v4];
            if constexpr (kFoldRMS) {
              sq[0][n] += (x.x * x.x + x.y * x.y) + (x.z * x.z + x.w * x.w);
              x = make_float4(x.x * g[v4].x, x.y * g[v4].y, x.z * g[v4].z, x.w * g[v4].w);
            }
            kv_fma_x4(acc, n, wf, v4, x);
          }
        }
      }
    }
  }

  KV_STAMP_AT(stp, 9);
  // Reduce over the group's lanes (with kFoldRMS the squares too, in the
  // same reduction: one barrier for groups wider than a warp).
  if constexpr (kFoldRMS) {
    float t[R + 1][NB];
#pragma unroll
    for (int n = 0; n < NB; n++) {
      t[R][n] = sq[0][n];
#pragma unroll
      for (int r = 0; r < R; r++) t[r][n] = acc[r][n];
    }
    kv_group_sums<TPR, kFusedThreads>(t);
#pragma unroll
    for (int n = 0; n < NB; n++) {
      const float rstd = 1.f / sqrtf(t[R][n] / (float)K + eps);
#pragma unroll
      for (int r = 0; r < R; r++) acc[r][n] = t[r][n] * rstd;
    }
  } else {
    kv_group_sums<TPR, kFusedThreads>(acc);
  }
  KV_STAMP_AT(stp, 5);

  if (store) {
    // The block's RB rows through shared memory, then one thread per
    // (pair, input row): rotate, write q|k|v, store the key/value heads.
    __shared__ float res[RB][NB];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
      for (int n = 0; n < NB; n++) {
        const int k = group * R + r;
        if (n < N && lane == (r * NB + n) % TPR) {
          res[k][n] = acc[r][n] + bv[r];
        }
      }
    __syncthreads();
    KV_STAMP_AT(stp, 6);
    const int hh = st.HS / 2;
#pragma unroll 1
    for (int idx = tid; idx < HP * N; idx += kFusedThreads) {
      const int k = idx % HP, n = idx / HP;  // k = tid % HP: kFusedThreads is a multiple of HP
      const int pair = blockIdx.x * HP + k;
      if (pair >= OC / 2) continue;
      const int h = pair / hh, i = pair % hh;
      float x1 = res[k][n], x2 = res[k + HP][n];
      const bool mine = early && idx == tid;  // the (pair, row) loaded early
      if (h < st.rope_heads) {
        if (mine && lead) kv_rope_pair_sc(x1, x2, pre_sn, pre_cs);
        else kv_rope_pair(x1, x2, (mine ? pre_pos : (float)st.pos[n]) * inv_freq);
      }
      float *o = out + (size_t)n * OC + (size_t)h * st.HS + i;
      o[0] = x1;
      o[hh] = x2;
      const int slot = mine ? pre_slot : st.slots[n];
      if (h >= st.NH && slot >= 0 && slot < st.S) {
        const int kvh = h - st.NH;
        float *cache = kvh < st.NKV ? st.kc : st.vc;
        float *d = cache + ((size_t)slot * st.NKV + kvh % st.NKV) * st.HS + i;
        d[0] = x1;
        d[hh] = x2;
      }
    }
    KV_STAMP_AT(stp, 7);
    return;
  }

  // Epilogue.
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int n = 0; n < NB; n++) {
      const int row = row0 + r;
      if (writes(r, n)) {
        float v = acc[r][n] + bv[r];
        if (gelu) v = gelu_new(v);
        float *o = out + (size_t)n * OC + row;
        if constexpr (kPreOut) *o = sa.res || accumulate ? prev[r][n] + v : v;
        else if (sa.res) *o = sa.res[(size_t)n * OC + row] + v;
        else *o = accumulate ? *o + v : v;
        if (sa.clear) sa.clear[(size_t)n * OC + row] = 0;
      }
    }
  KV_STAMP_AT(stp, 7);
}

// group_sum: the sum of v over the TPR lanes of this thread's group, in
// every lane (shuffles, then shared memory across the group's warps).
// scratch: this call site's own __shared__ float[kFusedThreads/32]; every
// thread of the block must call it (it has a barrier when TPR > 32).
template <int TPR>
__device__ __forceinline__ float group_sum(float v, float *scratch) {
  constexpr int SPAN = TPR < 32 ? TPR : 32;
#pragma unroll
  for (int o = SPAN / 2; o > 0; o >>= 1) v += __shfl_xor_sync(KV_FULL_MASK, v, o);
  if constexpr (TPR > 32) {
    constexpr int WPG = TPR / 32;
    const int warp = threadIdx.x / 32;
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    const int g0 = warp / WPG * WPG;
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < WPG; k++) t += scratch[g0 + k];
    v = t;
  }
  return v;
}

// ldg_vec loads VEC consecutive weight-like values at element off of p
// (half or float per f16) through the read-only cache.
template <int VEC>
__device__ __forceinline__ void ldg_vec(const void *p, int f16, int off, float (&f)[VEC]) {
  if (f16) {
    const __half *h = static_cast<const __half *>(p) + off;
    if constexpr (VEC == 8) {
      const uint4 v = __ldg(reinterpret_cast<const uint4 *>(h));
      kv_unpack16<true>(v, f);
    } else {
      const uint2 v = __ldg(reinterpret_cast<const uint2 *>(h));
      const float2 a = __half22float2(*reinterpret_cast<const __half2 *>(&v.x));
      const float2 b = __half22float2(*reinterpret_cast<const __half2 *>(&v.y));
      f[0] = a.x;
      f[1] = a.y;
      f[2] = b.x;
      f[3] = b.y;
    }
  } else {
    const float4 *q = reinterpret_cast<const float4 *>(static_cast<const float *>(p) + off);
#pragma unroll
    for (int i = 0; i < VEC / 4; i++) {
      const float4 t = __ldg(q + i);
      f[4 * i] = t.x;
      f[4 * i + 1] = t.y;
      f[4 * i + 2] = t.z;
      f[4 * i + 3] = t.w;
    }
  }
}

// fused_gemv1_kernel_v2 (N = 1; variant 4 only: slower than v1 on an H200 at
// every decode shape, kept for comparison): one output row
// per group of TPR lanes, every lane holding all its chunks of the row
// (≤ kV2ChunksPerLane) — weights, and the matching input values. The weight
// loads go first; then (after the wait) each lane loads only the input
// elements its chunks multiply, through L1 (as gemv_kernel_v1 does: blocks
// on one SM share them), and the group computes the row statistics with
// shuffles. No shared-memory staging and, for TPR = 32, no barrier: the
// normalisation adds two warp reductions to the GEMV.
// At most 64 registers (8 blocks, 32 warps an SM; LayerNorm, holding norm
// weight and bias chunks, 80 and 6 blocks so as not to spill): enough weight
// loads in flight per SM for the LM head to stream at bandwidth.
template <bool F16, int TPR, int MODE>
__global__ void __launch_bounds__(kFusedThreads, MODE == kLayerNorm ? 6 : 8)
    fused_gemv1_kernel_v2(float *__restrict__ out, const float *__restrict__ in, const void *__restrict__ norm_w,
                          const void *__restrict__ norm_b, int norm_f16, const void *__restrict__ w,
                          const void *__restrict__ bias, int bias_f16, int K, int OC, float eps, int gelu,
                          int accumulate) {
  constexpr int VEC = F16 ? 8 : 4;
  constexpr int GROUPS = kFusedThreads / TPR;
  constexpr int CPL = kV2ChunksPerLane;
  __shared__ float red[3][kFusedThreads / 32];
  const int group = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  const int chunks = K / VEC;
  const int row = blockIdx.x * GROUPS + group;
  const uint4 *wr =
      reinterpret_cast<const uint4 *>(static_cast<const char *>(w) + (size_t)min(row, OC - 1) * K * (F16 ? 2 : 4));
  uint4 wv[CPL];
#pragma unroll
  for (int j = 0; j < CPL; j++) {
    const int c = lane + j * TPR;
    wv[j] = c < chunks ? kv_ld_stream16(wr + c) : make_uint4(0, 0, 0, 0);
  }
  const float bv = bias && lane == 0 && row < OC ? kv_load_w(bias, bias_f16, row) : 0.f;  // as v1

  kv_pdl_wait();
  kv_pdl_launch_dependents();
  float xv[CPL][VEC];
#pragma unroll
  for (int j = 0; j < CPL; j++) {
    const int c = lane + j * TPR;
#pragma unroll
    for (int e = 0; e < VEC; e++) xv[j][e] = 0.f;
    if (c < chunks) {
      const float4 *xp = reinterpret_cast<const float4 *>(in + (size_t)c * VEC);
#pragma unroll
      for (int v4 = 0; v4 < VEC / 4; v4++) {
        float4 x = __ldg(xp + v4);
        if constexpr (MODE == kSwiGLU) {
          const float4 u = __ldg(reinterpret_cast<const float4 *>(in + K + (size_t)c * VEC) + v4);
          x.x = silu_mul(x.x, u.x);
          x.y = silu_mul(x.y, u.y);
          x.z = silu_mul(x.z, u.z);
          x.w = silu_mul(x.w, u.w);
        }
        xv[j][4 * v4] = x.x;
        xv[j][4 * v4 + 1] = x.y;
        xv[j][4 * v4 + 2] = x.z;
        xv[j][4 * v4 + 3] = x.w;
      }
    }
  }
  if constexpr (has_norm(MODE)) {
    float mean = 0.f, ss = 0.f;
    if constexpr (MODE == kLayerNorm) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < CPL; j++)
#pragma unroll
        for (int e = 0; e < VEC; e++) s += xv[j][e];  // padding chunks hold 0
      mean = group_sum<TPR>(s, red[0]) / (float)K;
#pragma unroll
      for (int j = 0; j < CPL; j++) {
        if (lane + j * TPR < chunks) {
#pragma unroll
          for (int e = 0; e < VEC; e++) {
            const float d = xv[j][e] - mean;
            ss += d * d;
          }
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < CPL; j++)
#pragma unroll
        for (int e = 0; e < VEC; e++) ss += xv[j][e] * xv[j][e];
    }
    const float rstd = 1.f / sqrtf(group_sum<TPR>(ss, red[1]) / (float)K + eps);
    const bool has_b = MODE == kLayerNorm && norm_b != nullptr;
#pragma unroll
    for (int j = 0; j < CPL; j++) {
      const int c = lane + j * TPR;
      if (c < chunks) {
        float wn[VEC], bn[VEC];
        ldg_vec<VEC>(norm_w, norm_f16, c * VEC, wn);
        if (has_b) {
          ldg_vec<VEC>(norm_b, norm_f16, c * VEC, bn);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; e++) bn[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < VEC; e++) xv[j][e] = (xv[j][e] - mean) * rstd * wn[e] + bn[e];
      }
    }
  }

  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < CPL; j++) {
    float wf[VEC];
    kv_unpack16<F16>(wv[j], wf);  // padding chunks: zero weights and zero inputs
#pragma unroll
    for (int e = 0; e < VEC; e++) acc = fmaf(wf[e], xv[j][e], acc);
  }
  acc = group_sum<TPR>(acc, red[2]);
  if (lane == 0 && row < OC) {
    float v = acc + bv;
    if (gelu) v = gelu_new(v);
    float *o = out + row;
    *o = accumulate ? *o + v : v;
  }
}

// rope_store_kernel_v1: grid (N, ceil(pairs/128)), one thread per rotated
// pair (i, i+HS/2) of heads h0..NH+2·NKV−1 of row r (h0 = NH when nothing is
// rotated: the queries are then untouched). Heads below rope_heads are
// rotated in place (rope.cu rope_kernel_v2's arithmetic); key and value
// heads are then written to slot slots[r] of kc / vc (skipped for slots
// outside [0, S), as cache.cu does). The inverse frequency (a double pow)
// depends on no earlier kernel and is computed before the wait.
__global__ void __launch_bounds__(128)
    rope_store_kernel_v1(float *__restrict__ qkv, float *__restrict__ kc, float *__restrict__ vc, int S,
                         const int32_t *__restrict__ pos, const int32_t *__restrict__ slots, int NH, int NKV,
                         int HS, int row_stride, int rope_heads, int h0, float theta) {
  const int half = HS / 2;
  const int p = blockIdx.y * blockDim.x + threadIdx.x;
  if (p >= (NH + 2 * NKV - h0) * half) return;
  const int h = h0 + p / half, i = p % half;
  const bool rotate = h < rope_heads;
  const float inv = rotate ? kv_rope_inv_freq(i, HS, theta) : 0.f;
  kv_pdl_wait();
  kv_pdl_launch_dependents();
  const int r = blockIdx.x;
  float *head = qkv + (long long)r * row_stride + h * HS;
  float x1 = head[i], x2 = head[i + half];
  if (rotate) {
    kv_rope_pair(x1, x2, (float)pos[r] * inv);
    head[i] = x1;
    head[i + half] = x2;
  }
  if (h >= NH) {
    const int slot = slots[r];
    if (slot >= 0 && slot < S) {
      int kh = h - NH;
      float *cache = kc;
      if (kh >= NKV) {
        kh -= NKV;
        cache = vc;
      }
      float *d = cache + ((long long)slot * NKV + kh) * HS;
      d[i] = x1;
      d[i + half] = x2;
    }
  }
}

// ---- host side ----

struct GemvArgs {
  float *out;
  const float *in;
  const void *norm_w, *norm_b;
  int norm_f16;
  const void *w;
  const void *bias;
  int bias_f16;
  int N, K, OC;
  float eps;
  int gelu, accumulate;
  StoreArgs st;  // st.kc == nullptr: a plain product
  SumArgs sa;    // all null: no folded attention before this product
  int lead;      // let the next kernel launch before this one's wait (kv_matmul_lead)
};

// fused_smem is the dynamic shared memory of fused_gemv_kernel_v1.
size_t fused_smem(int mode, int N, int K, int norm_f16) {
  size_t b = (size_t)N * K * 4 * (mode == kSwiGLU ? 2 : 1);
  if (has_norm(mode)) b += 2 * (size_t)K * (norm_f16 ? 2 : 4);
  return b;
}

template <bool F16, int NB, int R, int TPR, int MODE, int U = 4 / R>
cudaError_t launch_fused_gemv_k(cudaStream_t s, bool pdl, const GemvArgs &a) {
  constexpr int GROUPS = kFusedThreads / TPR;
  return kv_launch(fused_gemv_kernel_v1<F16, NB, R, TPR, MODE, U>, dim3(kv_ceil_div(a.OC, GROUPS * R)),
                dim3(kFusedThreads), fused_smem(MODE, a.N, a.K, a.norm_f16), s, pdl, a.out, a.in, a.norm_w,
                a.norm_b, a.norm_f16, a.w, a.bias, a.bias_f16, a.N, a.K, a.OC, a.eps, a.gelu, a.accumulate, a.st, a.sa,
                a.lead);
}

// wide_rows: one-row plain products with long rows (distilgpt2's MLP
// projection, K = 3072) take warps of kWideU chunks a lane, all loaded
// before the wait, instead of 128 lanes a row. The 128-lane rule gives such
// a product a block a row, and each of its 768 blocks stages the whole
// 12 KB input (9.4 MB of L2 reads a layer); four rows a block cut that to
// a quarter (docs/PERF.md, version 14).
constexpr int kWideU = 12;
bool wide_rows(int chunks) { return chunks > 4 * 32 && chunks <= kWideU * 32; }

// gemv_tpr: lanes per row group, matmul.cu launch_gemv_r's rule: a width
// that gives every lane the same number of chunks (at most per_lane) comes
// first, else the fewest lanes ≥ a warp that cover a row in one round.
int gemv_tpr(int chunks, int per_lane) {
  for (int t = 32; t <= kFusedThreads; t *= 2)
    if (chunks % t == 0 && chunks / t <= per_lane) return t;
  int t = 32;
  while (t < kFusedThreads && t * per_lane < chunks) t *= 2;
  return t;
}

template <bool F16, int NB, int MODE>
cudaError_t launch_fused_gemv_n(cudaStream_t s, bool pdl, const GemvArgs &a) {
  constexpr int R = NB <= 2 ? 1 : (NB <= 4 ? 2 : 4);
  constexpr int VEC = F16 ? 8 : 4, U = 4 / R;
  if constexpr (NB == 1 && MODE == kPlain) {
    if (wide_rows(a.K / VEC)) return launch_fused_gemv_k<F16, 1, 1, 32, MODE, kWideU>(s, pdl, a);
  }
  switch (gemv_tpr(a.K / VEC, U)) {
    case 32: return launch_fused_gemv_k<F16, NB, R, 32, MODE>(s, pdl, a);
    case 64: return launch_fused_gemv_k<F16, NB, R, 64, MODE>(s, pdl, a);
    default: return launch_fused_gemv_k<F16, NB, R, 128, MODE>(s, pdl, a);
  }
}

template <bool F16, int MODE>
cudaError_t launch_fused_gemv_f(cudaStream_t s, bool pdl, const GemvArgs &a) {
  if (a.N <= 1) return launch_fused_gemv_n<F16, 1, MODE>(s, pdl, a);
  if (a.N <= 2) return launch_fused_gemv_n<F16, 2, MODE>(s, pdl, a);
  if (a.N <= 4) return launch_fused_gemv_n<F16, 4, MODE>(s, pdl, a);
  return launch_fused_gemv_n<F16, 8, MODE>(s, pdl, a);
}

template <int MODE>
cudaError_t launch_fused_gemv(cudaStream_t s, bool pdl, int w_f16, const GemvArgs &a) {
  return w_f16 ? launch_fused_gemv_f<true, MODE>(s, pdl, a) : launch_fused_gemv_f<false, MODE>(s, pdl, a);
}

template <bool F16, int MODE>
cudaError_t launch_fused_gemv1_f(cudaStream_t s, bool pdl, const GemvArgs &a) {
  constexpr int VEC = F16 ? 8 : 4;
  const int tpr = gemv_tpr(a.K / VEC, kV2ChunksPerLane);
#define KV_FUSED_V2(T)                                                                                         \
  return kv_launch(fused_gemv1_kernel_v2<F16, T, MODE>, dim3(kv_ceil_div(a.OC, kFusedThreads / T)),             \
                dim3(kFusedThreads), 0, s, pdl, a.out, a.in, a.norm_w, a.norm_b, a.norm_f16, a.w, a.bias,      \
                a.bias_f16, a.K, a.OC, a.eps, a.gelu, a.accumulate)
  switch (tpr) {
    case 32: KV_FUSED_V2(32);
    case 64: KV_FUSED_V2(64);
    default: KV_FUSED_V2(128);
  }
#undef KV_FUSED_V2
}

template <int MODE>
cudaError_t launch_fused_gemv1(cudaStream_t s, bool pdl, int w_f16, const GemvArgs &a) {
  return w_f16 ? launch_fused_gemv1_f<true, MODE>(s, pdl, a) : launch_fused_gemv1_f<false, MODE>(s, pdl, a);
}

// fused_gemv_applies: the single-kernel paths need 16-byte weight rows and
// aligned operands (16-byte loads, cp.async); v1 needs N ≤ 8 and its staged
// input within the shared memory a block gets without an opt-in, v2 N = 1
// and a row of at most kV2ChunksPerLane·128 chunks.
bool fused_gemv_applies(int version, int mode, const float *in, const void *norm_w, const void *norm_b,
                        int norm_f16, const void *w, int w_f16, int N, int K) {
  const int vec = w_f16 ? 8 : 4;
  if (K % vec != 0 || K % 4 != 0 || !kv_aligned16(w) || !kv_aligned16(in)) return false;
  if (has_norm(mode)) {
    if ((K * (norm_f16 ? 2 : 4)) % 16 != 0 || !kv_aligned16(norm_w) || (norm_b && !kv_aligned16(norm_b))) return false;
  }
  if (version == 2) return N == 1 && K / vec <= kV2ChunksPerLane * kFusedThreads;
  return N <= kFusedMaxN && fused_smem(mode, N, K, norm_f16) <= (size_t)kFusedSmemMax;
}

// v1_rows: the output rows a block of fused_gemv_kernel_v1 computes for
// these shapes (as launch_fused_gemv_n chooses them); v1_blocks its grid.
int v1_rows(int mode, int w_f16, int N, int K) {
  if (N <= 1 && mode == kPlain && wide_rows(K / (w_f16 ? 8 : 4))) return kFusedThreads / 32;
  const int R = N <= 2 ? 1 : (N <= 4 ? 2 : 4);
  const int tpr = gemv_tpr(K / (w_f16 ? 8 : 4), 4 / R);
  return kFusedThreads / tpr * R;
}
int v1_blocks(int mode, int w_f16, int N, int K, int OC) { return kv_ceil_div(OC, v1_rows(mode, w_f16, N, K)); }

// fused_launch runs the single-kernel path the variant asks for, returning
// false (nothing launched) where it does not apply. Variant 0 takes v1
// (measured faster than v2 at every decode shape on an H200, e.g. SmolLM2's
// qkv 1.97 against 2.32 µs and the 30-layer chain 387 against 401 µs: one
// staged copy of the input per block beats every group reading it through
// L1) up to kFusedMaxBlocks blocks.
template <int MODE>
bool fused_launch(int variant, int w_f16, const GemvArgs &a, cudaStream_t s, cudaError_t *err) {
  if (variant == 3) return false;
  const bool pdl = variant == 2 || variant == 4 || (variant == 0 && kv_pdl_supported());
  if (variant == 4 && fused_gemv_applies(2, MODE, a.in, a.norm_w, a.norm_b, a.norm_f16, a.w, w_f16, a.N, a.K)) {
    *err = launch_fused_gemv1<MODE>(s, pdl, w_f16, a);
    return true;
  }
  if (variant == 0 && v1_blocks(MODE, w_f16, a.N, a.K, a.OC) > kFusedMaxBlocks) return false;
  if (fused_gemv_applies(1, MODE, a.in, a.norm_w, a.norm_b, a.norm_f16, a.w, w_f16, a.N, a.K)) {
    *err = launch_fused_gemv<MODE>(s, pdl, w_f16, a);
    return true;
  }
  return false;
}

// The two-step path: scratch from the stream-ordered allocator, the plain
// kernels, scratch freed in stream order (a graph memory node pair when
// captured).
template <typename Fill>
kv_status with_scratch(cudaStream_t s, size_t bytes, Fill fill) {
  void *scratch = nullptr;
  KV_TRY(cudaMallocAsync(&scratch, bytes, s));
  const kv_status st = fill(static_cast<float *>(scratch));
  const cudaError_t fe = cudaFreeAsync(scratch, s);
  if (st != 0) return st;
  KV_TRY(fe);
  return kv_launched();
}

}  // namespace

bool kv_gemv_fused_takes(int w_f16, int N, int K, int OC) {
  if (N <= 0 || OC <= 0 || !kv_pdl_supported() || v1_blocks(kPlain, w_f16, N, K, OC) > kFusedMaxBlocks) return false;
  const float *aligned = reinterpret_cast<const float *>(uintptr_t{256});  // any 16-byte aligned operand
  return fused_gemv_applies(1, kPlain, aligned, nullptr, nullptr, 0, aligned, w_f16, N, K);
}

bool kv_gemv_as_dependent(cudaStream_t s, float *out, const float *in, const void *w, int w_f16, const void *bias,
                          int bias_f16, int N, int K, int OC, int accumulate, int lead, cudaError_t *err) {
  if (N <= 0 || OC <= 0 || !kv_pdl_supported()) return false;
  GemvArgs a{out, in, nullptr, nullptr, 0, w, bias, bias_f16, N, K, OC, 0.f, 0, accumulate};
  a.lead = lead;
  return fused_launch<kPlain>(0, w_f16, a, s, err);
}

// gemm_prefill.cu: GEMM v3 with the RMSNorm (mode 1) or SwiGLU (mode 2) input fused.
bool kv_gemm_prefill(cudaStream_t s, float *out, const float *in, const void *w, const void *bias, int bias_f16,
                     const void *norm_w, int norm_f16, float eps, int N, int K, int OC, int accumulate, int mode,
                     bool glu, bool pdl, kv_status *st);

extern "C" kv_status kv_norm_matmul(kv_stream s, float *out, const float *in, const void *norm_w,
                                    const void *norm_b, int norm_f16, const void *w, int w_f16,
                                    const void *bias, int bias_f16, int N, int C, int OC, float eps, int rms,
                                    int gelu, int accumulate, int variant) {
  if (N <= 0 || OC <= 0) return kv_launched();
  if (C <= 0 || !out || !in || !w || !norm_w || (gelu && accumulate)) return (kv_status)cudaErrorInvalidValue;
  if (rms) norm_b = nullptr;
  // Variant 5 (and 0 above kFusedMaxN rows): GEMM v3 with the norm in its A
  // tiles, one launch instead of norm + scratch + GEMM; else two steps.
  if ((variant == 5 || (variant == 0 && N > kFusedMaxN)) && w_f16 && rms && !gelu) {
    kv_status pst;
    if (kv_gemm_prefill(s, out, in, w, bias, bias_f16, norm_w, norm_f16, eps, N, C, OC, accumulate, 1, false, true,
                        &pst))
      return pst;
  }
  if (variant == 5) variant = 3;
  const GemvArgs a{out, in, norm_w, norm_b, norm_f16, w, bias, bias_f16, N, C, OC, eps, gelu, accumulate};
  cudaError_t e = cudaSuccess;
  if (rms ? fused_launch<kRMSNorm>(variant, w_f16, a, s, &e) : fused_launch<kLayerNorm>(variant, w_f16, a, s, &e)) {
    KV_TRY(e);
    return kv_launched();
  }
  return with_scratch(s, (size_t)N * C * sizeof(float), [&](float *xn) -> kv_status {
    kv_status st = rms ? kv_rmsnorm(s, xn, in, norm_w, norm_f16, N, C, eps, 0)
                       : kv_layernorm(s, xn, in, norm_w, norm_b, norm_f16, N, C, eps, 0);
    if (st == 0) st = kv_matmul(s, out, xn, w, w_f16, bias, bias_f16, N, C, OC, accumulate);
    if (st == 0 && gelu) st = kv_gelu_new(s, out, (long long)N * OC);
    return st;
  });
}

// sum_acc_kernel_v1 (the fallback of kv_norm_matmul_sum): sum[n·K + k] =
// in[n·K + k] + (pbias[k] + kv_unfix(acc[n·K + k])), ref.SumAcc.
__global__ void sum_acc_kernel_v1(float *__restrict__ sum, const float *__restrict__ in,
                                  const long long *__restrict__ acc, const void *__restrict__ pbias, int pbias_f16,
                                  int N, int K) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)N * K) return;
  float t = pbias ? kv_load_w(pbias, pbias_f16, i % K) : 0.f;
  t += kv_unfix(acc[i]);
  sum[i] = in[i] + t;
}

extern "C" kv_status kv_norm_sum(kv_stream s, float *out, const float *in, long long *acc, long long *clear,
                                 const void *w, const void *b, int w_f16, int N, int C, float eps, int rms) {
  if (N <= 0 || C <= 0) return kv_launched();
  if (!out || !in || !acc || !w || out == in || clear == acc) return (kv_status)cudaErrorInvalidValue;
  if (rms) b = nullptr;
  cudaError_t e = cudaSuccess;
  if (kv_norm_v2(s, out, in, w, b, w_f16, N, C, eps, rms, acc, clear, &e)) {
    KV_TRY(e);
    return kv_launched();
  }
  // Rows the one-warp norm cannot hold: the sum into scratch, acc cleared,
  // then the norm.
  return with_scratch(s, (size_t)N * C * sizeof(float), [&](float *sum) -> kv_status {
    const long long n = (long long)N * C;
    sum_acc_kernel_v1<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(sum, in, acc, nullptr, 0, N, C);
    KV_TRY(cudaGetLastError());
    KV_TRY(cudaMemsetAsync(acc, 0, n * sizeof(long long), s));
    if (clear) KV_TRY(cudaMemsetAsync(clear, 0, n * sizeof(long long), s));
    return rms ? kv_rmsnorm(s, out, sum, w, w_f16, N, C, eps, 0) : kv_layernorm(s, out, sum, w, b, w_f16, N, C, eps, 0);
  });
}

extern "C" kv_status kv_norm_matmul_sum(kv_stream s, float *out, float *sum, const float *in, const long long *acc,
                                        const void *acc_bias, int acc_bias_f16, const void *norm_w,
                                        const void *norm_b, int norm_f16, const void *w, int w_f16, const void *bias,
                                        int bias_f16, int N, int C, int OC, float eps, int rms, int gelu) {
  if (N <= 0 || OC <= 0) return kv_launched();
  if (C <= 0 || !out || !sum || !in || !acc || !w || !norm_w || sum == in) return (kv_status)cudaErrorInvalidValue;
  if (rms) norm_b = nullptr;
  const bool al = ((reinterpret_cast<uintptr_t>(acc) | reinterpret_cast<uintptr_t>(sum)) & 15) == 0;
  if (al && C % 4 == 0) {
    GemvArgs a{out, in, norm_w, norm_b, norm_f16, w, bias, bias_f16, N, C, OC, eps, gelu, 0};
    a.sa = SumArgs{acc, acc_bias, acc_bias_f16, sum, nullptr, nullptr};
    cudaError_t e = cudaSuccess;
    if (rms ? fused_launch<kRMSNorm>(0, w_f16, a, s, &e) : fused_launch<kLayerNorm>(0, w_f16, a, s, &e)) {
      KV_TRY(e);
      return kv_launched();
    }
  }
  // Two steps: the residual first, then the product of it.
  const long long n = (long long)N * C;
  sum_acc_kernel_v1<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(sum, in, acc, acc_bias, acc_bias_f16, N, C);
  KV_TRY(cudaGetLastError());
  return kv_norm_matmul(s, out, sum, norm_w, norm_b, norm_f16, w, w_f16, bias, bias_f16, N, C, OC, eps, rms, gelu, 0,
                        0);
}

extern "C" kv_status kv_res_matmul(kv_stream s, float *out, const float *res, const float *in, const void *w,
                                   int w_f16, const void *bias, int bias_f16, int N, int K, int OC, int swiglu,
                                   long long *clear) {
  if (N <= 0 || OC <= 0) return kv_launched();
  if (K <= 0 || !out || !res || !in || !w || res == out || (swiglu && bias)) return (kv_status)cudaErrorInvalidValue;
  GemvArgs a{out, in, nullptr, nullptr, 0, w, bias, bias_f16, N, K, OC, 0.f, 0, 0};
  a.sa.res = res;
  a.sa.clear = clear;
  cudaError_t e = cudaSuccess;
  if (swiglu ? fused_launch<kSwiGLU>(0, w_f16, a, s, &e) : fused_launch<kPlain>(0, w_f16, a, s, &e)) {
    KV_TRY(e);
    return kv_launched();
  }
  // Two steps: out = res, then the product accumulated onto it.
  KV_TRY(cudaMemcpyAsync(out, res, (size_t)N * OC * sizeof(float), cudaMemcpyDeviceToDevice, s));
  if (clear) KV_TRY(cudaMemsetAsync(clear, 0, (size_t)N * OC * sizeof(long long), s));
  return swiglu ? kv_swiglu_matmul(s, out, in, w, w_f16, N, K, OC, 1, 0)
                : kv_matmul(s, out, in, w, w_f16, bias, bias_f16, N, K, OC, 1);
}

// norm_matmul_store is kv_norm_matmul_store, and with acc (and sum)
// kv_norm_matmul_store_sum.
static kv_status norm_matmul_store(cudaStream_t s, float *qkv, float *sum, const float *in, const long long *acc,
                                   const void *norm_w, const void *norm_b, int norm_f16, const void *w, int w_f16,
                                   const void *bias, int bias_f16, int N, int C, float eps, int rms, float *kc,
                                   float *vc, int S, const int32_t *pos, const int32_t *slots, int NH, int NKV, int HS,
                                   int rope_heads, float theta, int variant, int lead) {
  if (N <= 0) return kv_launched();
  if (C <= 0 || !qkv || !in || !w || !norm_w || !kc || !vc || !pos || !slots || HS <= 0 || HS % 2 != 0 || NH < 0 ||
      NKV <= 0 || rope_heads < 0 || rope_heads > NH + 2 * NKV)
    return (kv_status)cudaErrorInvalidValue;
  if (theta == 0.f) rope_heads = 0;
  if (rms) norm_b = nullptr;
  const int OC = (NH + 2 * NKV) * HS;
  // The kernel pairs rows within a block: it needs an even row count (and
  // the frequency table heads of at most KV_ATTN_MAX_HS when rotating).
  if (variant != 3 && v1_rows(rms ? kRMSNorm : kLayerNorm, w_f16, N, C) % 2 == 0 &&
      (rope_heads == 0 || HS <= KV_ATTN_MAX_HS)) {
    const StoreArgs st{kc, vc, pos, slots, S, NH, NKV, HS, rope_heads, rope_freqs(HS, theta)};
    GemvArgs a{qkv, in, norm_w, norm_b, norm_f16, w, bias, bias_f16, N, C, OC, eps, 0, 0, st};
    a.sa.acc = acc;
    a.sa.sum = sum;
    a.lead = lead;
    const int v = variant == 4 ? 2 : variant;  // the register kernel (v2) cannot store
    cudaError_t e = cudaSuccess;
    if (rms ? fused_launch<kRMSNorm>(v, w_f16, a, s, &e) : fused_launch<kLayerNorm>(v, w_f16, a, s, &e)) {
      KV_TRY(e);
      return kv_launched();
    }
  }
  if (acc) {  // the sum first, then the product on it
    const long long n = (long long)N * C;
    sum_acc_kernel_v1<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(sum, in, acc, nullptr, 0, N, C);
    KV_TRY(cudaGetLastError());
    return norm_matmul_store(s, qkv, nullptr, sum, nullptr, norm_w, norm_b, norm_f16, w, w_f16, bias, bias_f16, N, C,
                             eps, rms, kc, vc, S, pos, slots, NH, NKV, HS, rope_heads, theta, variant == 3 ? 3 : 0,
                             0);
  }
  const kv_status st = kv_norm_matmul(s, qkv, in, norm_w, norm_b, norm_f16, w, w_f16, bias, bias_f16, N, C, OC, eps,
                                      rms, 0, 0, 0);
  if (st != 0) return st;
  return kv_rope_store(s, qkv, kc, vc, S, pos, slots, N, NH, NKV, HS, OC, rope_heads, theta, 0);
}

extern "C" kv_status kv_norm_matmul_store(kv_stream s, float *qkv, const float *in, const void *norm_w,
                                          const void *norm_b, int norm_f16, const void *w, int w_f16,
                                          const void *bias, int bias_f16, int N, int C, float eps, int rms, float *kc,
                                          float *vc, int S, const int32_t *pos, const int32_t *slots, int NH, int NKV,
                                          int HS, int rope_heads, float theta, int variant, int lead) {
  return norm_matmul_store(s, qkv, nullptr, in, nullptr, norm_w, norm_b, norm_f16, w, w_f16, bias, bias_f16, N, C,
                           eps, rms, kc, vc, S, pos, slots, NH, NKV, HS, rope_heads, theta, variant, lead);
}

extern "C" kv_status kv_norm_matmul_store_sum(kv_stream s, float *qkv, float *sum, const float *in,
                                              const long long *acc, const void *norm_w, const void *norm_b,
                                              int norm_f16, const void *w, int w_f16, const void *bias, int bias_f16,
                                              int N, int C, float eps, int rms, float *kc, float *vc, int S,
                                              const int32_t *pos, const int32_t *slots, int NH, int NKV, int HS,
                                              int rope_heads, float theta, int variant, int lead) {
  if (N > 0 && (!sum || !acc || sum == in)) return (kv_status)cudaErrorInvalidValue;
  return norm_matmul_store(s, qkv, sum, in, acc, norm_w, norm_b, norm_f16, w, w_f16, bias, bias_f16, N, C, eps, rms,
                           kc, vc, S, pos, slots, NH, NKV, HS, rope_heads, theta, variant, lead);
}

extern "C" kv_status kv_swiglu_matmul(kv_stream s, float *out, const float *gu, const void *w, int w_f16, int N,
                                      int F, int OC, int accumulate, int variant) {
  if (N <= 0 || OC <= 0) return kv_launched();
  if (F <= 0 || !out || !gu || !w) return (kv_status)cudaErrorInvalidValue;
  // Variant 5: GEMM v3 with silu(gate)·up computed in its A tiles. Not the
  // default: every column tile recomputes the activation (H200, SmolLM2's
  // down projection at T = 256: 18.5 µs against 13.7 for SiluMul + v3).
  if (variant == 5 && w_f16) {
    kv_status pst;
    if (kv_gemm_prefill(s, out, gu, w, nullptr, 0, nullptr, 0, 0.f, N, F, OC, accumulate, 2, false, true, &pst))
      return pst;
  }
  if (variant == 5) variant = 3;
  const GemvArgs a{out, gu, nullptr, nullptr, 0, w, nullptr, 0, N, F, OC, 0.f, 0, accumulate};
  cudaError_t e = cudaSuccess;
  if (fused_launch<kSwiGLU>(variant, w_f16, a, s, &e)) {
    KV_TRY(e);
    return kv_launched();
  }
  return with_scratch(s, (size_t)N * F * sizeof(float), [&](float *act) -> kv_status {
    kv_status st = kv_silu_mul(s, act, gu, gu + F, N, F, 2 * F);
    if (st == 0) st = kv_matmul(s, out, act, w, w_f16, nullptr, 0, N, F, OC, accumulate);
    return st;
  });
}

extern "C" kv_status kv_rope_store(kv_stream s, float *qkv, float *kc, float *vc, int S, const int32_t *pos,
                                   const int32_t *slots, int N, int NH, int NKV, int HS, int row_stride,
                                   int rope_heads, float theta, int variant) {
  if (N <= 0) return kv_launched();
  if (HS <= 0 || HS % 2 != 0 || NH < 0 || NKV < 0 || rope_heads < 0 || rope_heads > NH + 2 * NKV)
    return (kv_status)cudaErrorInvalidValue;
  if (theta == 0.f) rope_heads = 0;
  const int h0 = rope_heads > 0 ? 0 : NH;
  const long long pairs = (long long)(NH + 2 * NKV - h0) * (HS / 2);
  if (pairs == 0) return kv_launched();
  if (pairs > 65535LL * 128) return (kv_status)cudaErrorInvalidValue;
  const bool pdl = variant == 2 || variant == 4 || (variant == 0 && kv_pdl_supported());
  KV_TRY(kv_launch(rope_store_kernel_v1, dim3(N, kv_ceil_div(pairs, 128)), dim3(128), 0, s, pdl, qkv, kc, vc, S, pos,
                slots, NH, NKV, HS, row_stride, rope_heads, h0, theta));
  return kv_launched();
}

KV_STAMP_TU(fused)
