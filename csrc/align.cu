// align.cu — KV-Align realignment MLP over cache entries, in place
// (see gpu.AlignParams and ref.Align):
//
//   x' = x + W3·relu(W2·relu(W1·[x, Pos[index[i]], Layer[l], Head[h]] + b1) + b2) + b3
//
// for every layer l, list entry i and kv head h: L·rows·NKV independent head
// vectors (18,000 for distilgpt2, 22,500 for SmolLM2), all in one launch so
// the step stays one graph node. Rows are enumerated r = (l·rows + i)·NKV + h
// like the reference.
//
// A block takes kRows = 64 rows: it gathers each row's input [x, embeddings]
// into shared memory and runs the three layers as GEMMs over the block's
// rows, h1 and h2 staying in shared memory, the last layer adding into the
// cache. Each block reads all weights (≈190 KB for distilgpt2 keys) from L2.
// Variants (kv_align's argument), side by side:
//  - v1: fp32 SIMT, register-tiled (8 rows × up to 8 columns a thread), the
//    weights streamed through shared memory in k-chunks. Exact fp32, but
//    ~15 TFLOP/s: 1 block per SM (243 registers), barrier-bound.
//  - v2: tensor cores, mma.sync TF32 with each operand split in two
//    TF32 parts (3xTF32): fp32 accuracy.
//  - v3: tensor cores, plain TF32 (~1e-3 relative), fastest.
//  - v4, v5: v2, v3 with the input gather and the final `cache +=` issuing
//    their loads in batches (see gather_inputs_batched): the measured v1-v3
//    times (~80-125 µs whatever the arithmetic) point at these latency
//    chains. Measured (H200, distilgpt2 keys): v4 121 µs against v2's 124,
//    v5 75 against v3's 78: the gathers were not the bound. v4 is the
//    default of kv_align (v3/v5's TF32 misses the 1e-5 accuracy).
//  - v6-v9 (kv_align_packed, below): a warp per 16-row tile with the
//    activations in registers, from a network packed at upload
//    (gpu.PackAlign). The packed kernels are what gpu.CUDA.Align runs by
//    default: v6 (fp16) for fp16 models, v9 (3xTF32) for fp32 ones; v4 only
//    for networks without a pack (or one larger than the shared memory).
//    One launch may run both networks (keys over the K store, values over
//    the V store; gpu.CUDA.AlignPair), a block running one of them.
//
// fc1's input is [x, pos, layer, head], so W1·in = W1x·x + W1p·Pos[p] +
// W1l·Layer[l] + W1h·Head[h]: the embedding terms depend only on the weights
// and (p, l, h). v1-v5 gather the embeddings as extra input columns (no
// table: AlignNet has no place for it); the packed kernels take them from
// two tables made at upload (gpu.AlignPack), removing 44 of fc1's 108 input
// columns (≈25% of the FLOPs of distilgpt2's key network).
//
// Measured (H200, window 251 = 18,072 / 22,590 rows, graph-timed, µs a
// network: distilgpt2 keys / values / SmolLM2):
//   v4  121 / 76 / 91     v6  10.3 / 7.6 / 10.3    v8   9.7 / 7.6 / 10.4
//   v7   66 / 40 / 59     v9    46 /  30 /   43
// Prediction for v6 was ~4-5 µs (≈1.3 GFLOP on tensor cores ≈ 2 µs at the
// SMs' share, staging ~1 µs, the x loads and launch ~1-2). Outcome 10 µs:
// across the three shapes the time fits ≈ 4.2 µs + 21 ns per mma of a
// tile, i.e. each warp waits ~40 cycles per mma (a latency chain, not
// throughput: an SM sub-partition issues one every ~17 cycles). v8, which
// overlaps fc1 of the next chunk with fc2 of this one, gained only on the
// 8-chunk key network (5%), so the chain is not fc1 → fc2; the likelier
// bound is each B fragment's shared-memory load issued just before its mma
// (the 168-register cap of 12 warps leaves no room to load further ahead).
// v9 (v7 with the 3xTF32 passes round 4 accumulators instead of 12 chained
// on one) took 27-30% off v7: there the chain was the bound. Issuing v6's
// first k16 step of several tiles before their second (the same bits)
// traded its fixed-latency stalls for shared-memory waits and gained
// nothing (docs/PERF.md, version 21: Nsight Compute puts the tensor pipe at
// 27% of the cycles, 2.8 warps a scheduler, 0.44 of them eligible).
#include "common.cuh"

namespace {

constexpr int kRows = 64;            // rows per block
constexpr int kThreads = 256;        // 8 warps; warp w owns rows 8w..8w+7
constexpr int kLdRows = kRows + 4;   // k-major activations: row stride, float4-aligned, spreads stores
constexpr int kKc = 16;              // k-chunk of a weight tile
constexpr int kMaxMt = 256;          // widest output tile (NJ = 8)

__host__ __device__ constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

// dense_v1 computes Ot[m][r] = act(W[m]·At[:, r] + bias[m]) for m < Mp (rows
// m ≥ M come out 0, padding for the next layer's k loop) or, FINAL, adds the
// result to the cache rows. At is k-major [Kp][kLdRows] with zero rows in
// [K, Kp). Thread (warp ty, lane tx) owns rows 8ty..8ty+7 and columns
// m0 + tx + 32j, j < NJ (lanes read consecutive columns: no bank conflicts,
// the row values are a broadcast).
template <int NJ, bool FINAL>
__device__ __forceinline__ void dense_v1(const float *At, int K, const float *__restrict__ W,
                                         const float *__restrict__ bias, int M, float *Ot, float *Ws,
                                         float *cache, const long long *rowoff) {
  constexpr int MT = 32 * NJ, MTP = MT + 1, PF = kKc * MT / kThreads;
  const int tid = threadIdx.x, tx = tid % 32, ty = tid / 32;
  const int Kp = round_up(K, kKc), Mp = round_up(M, kKc);
  for (int m0 = 0; m0 < Mp; m0 += MT) {
    float acc[8][NJ];
#pragma unroll
    for (int i = 0; i < 8; i++)
#pragma unroll
      for (int j = 0; j < NJ; j++) acc[i][j] = 0.f;
    float pf[PF];
    auto load = [&](int k0) {
#pragma unroll
      for (int p = 0; p < PF; p++) {
        const int idx = tid + p * kThreads, kk = idx % kKc, mm = idx / kKc;
        const int m = m0 + mm, k = k0 + kk;
        pf[p] = (m < M && k < K) ? __ldg(W + (size_t)m * K + k) : 0.f;
      }
    };
    load(0);
    for (int k0 = 0; k0 < Kp; k0 += kKc) {
      __syncthreads();  // Ws is free; on the first chunk, At is complete
#pragma unroll
      for (int p = 0; p < PF; p++) {
        const int idx = tid + p * kThreads;
        Ws[(idx % kKc) * MTP + idx / kKc] = pf[p];
      }
      __syncthreads();
      if (k0 + kKc < Kp) load(k0 + kKc);
#pragma unroll
      for (int kk = 0; kk < kKc; kk++) {
        const float4 a0 = *reinterpret_cast<const float4 *>(At + (k0 + kk) * kLdRows + ty * 8);
        const float4 a1 = *reinterpret_cast<const float4 *>(At + (k0 + kk) * kLdRows + ty * 8 + 4);
        const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        float w[NJ];
#pragma unroll
        for (int j = 0; j < NJ; j++) w[j] = Ws[kk * MTP + tx + 32 * j];
#pragma unroll
        for (int i = 0; i < 8; i++)
#pragma unroll
          for (int j = 0; j < NJ; j++) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int j = 0; j < NJ; j++) {
      const int m = m0 + tx + 32 * j;
      if (FINAL) {
        if (m >= M) continue;
        const float bm = __ldg(bias + m);
#pragma unroll
        for (int i = 0; i < 8; i++) {
          const long long off = rowoff[ty * 8 + i];
          // As PyTorch: fc3's output is a float32, then the residual add.
          if (off >= 0) cache[off + m] += acc[i][j] + bm;
        }
      } else {
        if (m >= Mp) continue;
        const float bm = m < M ? __ldg(bias + m) : 0.f;
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = fmaxf(acc[i][j] + bm, 0.f);
        *reinterpret_cast<float4 *>(Ot + m * kLdRows + ty * 8) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4 *>(Ot + m * kLdRows + ty * 8 + 4) = make_float4(v[4], v[5], v[6], v[7]);
      }
    }
  }
}

// dense picks the output tile width for M outputs (fewest idle lanes).
template <bool FINAL>
__device__ __forceinline__ void dense(const float *At, int K, const float *W, const float *bias, int M,
                                      float *Ot, float *Ws, float *cache, const long long *rowoff) {
  if (M > 128)
    dense_v1<8, FINAL>(At, K, W, bias, M, Ot, Ws, cache, rowoff);
  else if (M > 64)
    dense_v1<4, FINAL>(At, K, W, bias, M, Ot, Ws, cache, rowoff);
  else if (M > 32)
    dense_v1<2, FINAL>(At, K, W, bias, M, Ot, Ws, cache, rowoff);
  else
    dense_v1<1, FINAL>(At, K, W, bias, M, Ot, Ws, cache, rowoff);
}

struct AlignArgs {
  float *cache;
  const int32_t *slots, *index;
  int rows, L, NKV, HS;
  long long layer_stride;
  const float *pos, *layer, *head;
  int P, DP, DL, DH;
  const float *w1, *b1, *w2, *b2, *w3, *b3;
  int H1, H2;
};

// input_src: where input column k (< HS + DP + DL + DH) of a row comes
// from: its cache entry (x, at offset off ≥ 0) or its position p, layer l or
// head h embedding.
__device__ __forceinline__ const float *input_src(const AlignArgs &a, long long off, int p, int l, int h, int k) {
  if (k < a.HS) return a.cache + off + k;
  if (k < a.HS + a.DP) return a.pos + (size_t)p * a.DP + (k - a.HS);
  if (k < a.HS + a.DP + a.DL) return a.layer + (size_t)l * a.DL + (k - a.HS - a.DP);
  return a.head + (size_t)h * a.DH + (k - a.HS - a.DP - a.DL);
}

// Shared memory (floats): input/h2 region, h1 region, weight chunk.
__host__ __device__ inline int align_region0(const AlignArgs &a) {
  return round_up(max(a.HS + a.DP + a.DL + a.DH, a.H2), kKc) * kLdRows;
}
__host__ __device__ inline int align_region1(const AlignArgs &a) { return round_up(a.H1, kKc) * kLdRows; }
inline size_t align_smem_bytes(const AlignArgs &a) {
  return sizeof(float) * ((size_t)align_region0(a) + align_region1(a) + (size_t)kKc * (kMaxMt + 1));
}

// align_kernel_v1: fp32 SIMT, one block per kRows rows.
__global__ void __launch_bounds__(kThreads, 1) align_kernel_v1(AlignArgs a) {
  extern __shared__ __align__(16) float smem[];
  __shared__ long long rowoff[kRows];  // cache offset of the row's head vector; −1: not realigned
  __shared__ int rowl[kRows], rowh[kRows], rowp[kRows];
  float *in = smem;                        // [K0p][kLdRows]: x, pos, layer, head; later h2
  float *h1 = smem + align_region0(a);     // [H1p][kLdRows]
  float *ws = h1 + align_region1(a);       // [kKc][MT+1]
  const int tid = threadIdx.x;
  const int K0 = a.HS + a.DP + a.DL + a.DH, K0p = round_up(K0, kKc);
  const long long total = (long long)a.L * a.rows * a.NKV;

  if (tid < kRows) {
    const long long R = (long long)blockIdx.x * kRows + tid;
    long long off = -1;
    int l = 0, h = 0, p = 0;
    if (R < total) {
      h = (int)(R % a.NKV);
      const int i = (int)((R / a.NKV) % a.rows);
      l = (int)(R / ((long long)a.NKV * a.rows));
      const int slot = a.slots[i];
      p = a.index[i];
      if (slot >= 0 && p >= 0 && p < a.P)
        off = l * a.layer_stride + ((long long)slot * a.NKV + h) * a.HS;
    }
    rowoff[tid] = off;
    rowl[tid] = l;
    rowh[tid] = h;
    rowp[tid] = p;
  }
  __syncthreads();
  // Gather the inputs, k fastest (contiguous global reads per row).
  for (int idx = tid; idx < kRows * K0p; idx += kThreads) {
    const int r = idx / K0p, k = idx % K0p;
    const long long off = rowoff[r];
    in[k * kLdRows + r] = off >= 0 && k < K0 ? *input_src(a, off, rowp[r], rowl[r], rowh[r], k) : 0.f;
  }
  // (dense's first barrier orders the gather before the first reads.)
  dense<false>(in, K0, a.w1, a.b1, a.H1, h1, ws, nullptr, nullptr);
  // h2 overwrites the input region: every read of it finished before the
  // barrier at the top of layer 2's first k-chunk… which comes after these
  // writes. So order explicitly: all layer-1 reads of `in` are done here.
  __syncthreads();
  dense<false>(h1, a.H1, a.w2, a.b2, a.H2, in, ws, nullptr, nullptr);
  dense<true>(in, a.H2, a.w3, a.b3, a.HS, nullptr, ws, a.cache, rowoff);
}


// ---- tensor-core variants: mma.sync m16n8k8 TF32, 3xTF32 or 1xTF32 ----
//
// 3xTF32 (v2) splits every fp32 operand into a TF32 "big" part and the TF32
// rounding of the remainder, a = ab + as, and accumulates as·bb + ab·bs +
// ab·bb (the dropped as·bs is ~2^-22 relative): fp32-level accuracy (the
// tests hold it to the same 1e-5 as the SIMT kernel) at a third of the
// tensor-core rate. 1xTF32 (v3) uses ab·bb alone: 10-bit mantissas, ~1e-3.
//
// Layout: a block takes kRows = 64 rows; activations live in shared memory
// row-major [64][ld] (ld ≡ 8 mod 32: the 8-byte fragment loads below hit
// distinct banks). Warp w (of 8) owns n-tiles w and w+8 of each 128-output
// slab (8 outputs a tile) for all four 16-row m-tiles, so each weight is read
// by exactly one warp of the block, straight from global memory (L2) into
// registers, 3-4 k-steps ahead: no shared staging, no barrier inside a
// layer (the first version staged 8-wide weight chunks through shared memory
// with two barriers each and was bound by that latency chain).
//
// Within each k-step of 8 the mma's logical k = tg and tg + 4 are mapped to
// the physical columns 2tg and 2tg + 1 for both operands (any permutation of
// k shared by A and B leaves the product unchanged), so a thread's two A (and
// two B) values are adjacent: one 8-byte shared load per row.


__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// split_tf32: x ≈ big + small, both TF32.
__device__ __forceinline__ void split_tf32(float x, uint32_t &big, uint32_t &small) {
  big = to_tf32(x);
  small = to_tf32(x - __uint_as_float(big));
}

__device__ __forceinline__ void mma_tf32(float *c, const uint32_t *a, const uint32_t *b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// tc_ld: activation row stride for k inputs (≥ k rounded to 8, ≡ 8 mod 32).
__host__ __device__ constexpr int tc_ld(int k) { return round_up(k, 32) + 8; }

// dense_tc: O[r][m] = act(W[m]·A[r] + bias[m]) for m < round_up(M, 8) (zero
// padding columns for the next layer), or FINAL: cache row r += the same.
// A: [kRows][lda] with zero columns in [K, round_up(K, 8)). Every thread
// calls it; A must be complete (a barrier before the call).
template <int PASSES, bool FINAL, bool BATCHED>
__device__ __forceinline__ void dense_tc(const float *A, int lda, int K, const float *__restrict__ W,
                                         const float *__restrict__ bias, int M, float *O, int ldo,
                                         float *cache, const long long *rowoff) {
  // Weight prefetch distance in k-steps (3xTF32 needs more registers for its splits).
  constexpr int kPf = PASSES == 3 ? 3 : 4;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tg = lane % 4;
  const int steps = round_up(K, 8) / 8, Mp = round_up(M, 8);
  for (int n0 = 0; n0 < Mp; n0 += 128) {
    const int slab_tiles = min(128, Mp - n0) / 8;
    // This warp's weight rows (n) for its tiles j = 0, 1 of the slab.
    const float *wrow[2];
    bool wok[2];
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const int n = n0 + (warp + 8 * j) * 8 + g;
      wok[j] = warp + 8 * j < slab_tiles && n < M;
      wrow[j] = W + (size_t)(wok[j] ? n : 0) * K;
    }
    // Raw weights b0, b1 = W[n][k0 + 2tg], W[n][k0 + 2tg + 1] for k-step s,
    // kept kPf steps ahead in a ring indexed by s % kPf (compile-time below).
    auto fetch = [&](float(&dst)[2][2], int s) {
#pragma unroll
      for (int j = 0; j < 2; j++) {
        const int k = s * 8 + 2 * tg;
        dst[j][0] = (wok[j] && s < steps && k < K) ? __ldg(wrow[j] + k) : 0.f;
        dst[j][1] = (wok[j] && s < steps && k + 1 < K) ? __ldg(wrow[j] + k + 1) : 0.f;
      }
    };
    float ring[kPf][2][2];
#pragma unroll
    for (int p = 0; p < kPf; p++) fetch(ring[p], p);

    float acc[4][2][4];  // [m-tile][tile j][fragment]
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
      for (int b = 0; b < 2; b++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[a][b][c] = 0.f;

    for (int s0 = 0; s0 < steps; s0 += kPf) {
#pragma unroll
      for (int p = 0; p < kPf; p++) {
        const int s = s0 + p;
        if (s >= steps) break;  // uniform
        uint32_t bb[2][2], bs[2][2];
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
          for (int i = 0; i < 2; i++) {
            if (PASSES == 3)
              split_tf32(ring[p][j][i], bb[j][i], bs[j][i]);
            else
              bb[j][i] = to_tf32(ring[p][j][i]);
          }
        fetch(ring[p], s + kPf);
        const int k0 = s * 8 + 2 * tg;
#pragma unroll
        for (int mt = 0; mt < 4; mt++) {
          const float2 lo = *reinterpret_cast<const float2 *>(A + (mt * 16 + g) * lda + k0);
          const float2 hi = *reinterpret_cast<const float2 *>(A + (mt * 16 + g + 8) * lda + k0);
          // Fragment order: (g, k=tg), (g+8, tg), (g, tg+4), (g+8, tg+4).
          const float av[4] = {lo.x, hi.x, lo.y, hi.y};
          uint32_t ab[4], as[4];
#pragma unroll
          for (int i = 0; i < 4; i++) {
            if (PASSES == 3)
              split_tf32(av[i], ab[i], as[i]);
            else
              ab[i] = to_tf32(av[i]);
          }
#pragma unroll
          for (int j = 0; j < 2; j++) {
            if (warp + 8 * j >= slab_tiles) continue;  // warp-uniform
            if (PASSES == 3) {
              mma_tf32(acc[mt][j], as, bb[j]);  // small terms first
              mma_tf32(acc[mt][j], ab, bs[j]);
            }
            mma_tf32(acc[mt][j], ab, bb[j]);
          }
        }
      }
    }
    // Epilogue: acc[mt][j] = rows mt·16+g (c0, c1) and +8 (c2, c3), columns tile·8 + 2tg (+1).
#pragma unroll
    for (int j = 0; j < 2; j++) {
      if (warp + 8 * j >= slab_tiles) continue;
      const int col = n0 + (warp + 8 * j) * 8 + 2 * tg;
      if (FINAL && BATCHED) {
        // Read the tile's 16 cache values at once, then write: `cache +=`
        // element by element waits a round trip per element (the stores may
        // alias the next loads as far as the compiler knows).
        float x[4][2][2];
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
#pragma unroll
          for (int hf = 0; hf < 2; hf++) {
            const long long off = rowoff[mt * 16 + g + hf * 8];
            x[mt][hf][0] = off >= 0 && col < M ? cache[off + col] : 0.f;
            x[mt][hf][1] = off >= 0 && col + 1 < M ? cache[off + col + 1] : 0.f;
          }
        const float bias0 = col < M ? __ldg(bias + col) : 0.f, bias1 = col + 1 < M ? __ldg(bias + col + 1) : 0.f;
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
#pragma unroll
          for (int hf = 0; hf < 2; hf++) {
            const long long off = rowoff[mt * 16 + g + hf * 8];
            if (off < 0) continue;
            if (col < M) cache[off + col] = x[mt][hf][0] + (acc[mt][j][2 * hf] + bias0);
            if (col + 1 < M) cache[off + col + 1] = x[mt][hf][1] + (acc[mt][j][2 * hf + 1] + bias1);
          }
      } else {
#pragma unroll
        for (int mt = 0; mt < 4; mt++)
#pragma unroll
          for (int hf = 0; hf < 2; hf++) {
            const int r = mt * 16 + g + hf * 8;
            float v0 = acc[mt][j][2 * hf], v1 = acc[mt][j][2 * hf + 1];
            if (FINAL) {
              const long long off = rowoff[r];
              if (off < 0) continue;
              if (col < M) cache[off + col] += v0 + __ldg(bias + col);
              if (col + 1 < M) cache[off + col + 1] += v1 + __ldg(bias + col + 1);
            } else {
              v0 = col < M ? fmaxf(v0 + __ldg(bias + col), 0.f) : 0.f;
              v1 = col + 1 < M ? fmaxf(v1 + __ldg(bias + col + 1), 0.f) : 0.f;
              *reinterpret_cast<float2 *>(O + r * ldo + col) = make_float2(v0, v1);
            }
          }
      }
    }
  }
}

// Shared memory of the tensor-core kernels (floats): input/h2 region, h1 region.
__host__ __device__ inline int align_tc_region0(const AlignArgs &a) {
  return kRows * max(tc_ld(a.HS + a.DP + a.DL + a.DH), tc_ld(a.H2));
}
__host__ __device__ inline int align_tc_region1(const AlignArgs &a) { return kRows * tc_ld(a.H1); }
inline size_t align_tc_smem_bytes(const AlignArgs &a) {
  return sizeof(float) * ((size_t)align_tc_region0(a) + align_tc_region1(a));
}

// gather_inputs_batched writes row r's input [x, pos, layer, head] (zero
// past K0, up to K0p) to in[r·ld + k]. Each round issues a thread's kGatherBatch
// loads before any store: the plain loop (load, store, next) waits one memory
// round trip per element, ~28 of them a thread for distilgpt2 — its SASS
// shows it, and it bounded the first tensor-core kernels as much as v1.
constexpr int kGatherBatch = 16;
__device__ __forceinline__ void gather_inputs_batched(float *in, int ld, const AlignArgs &a, int K0, int K0p,
                                                      const long long *rowoff, const int *rowl, const int *rowh,
                                                      const int *rowp) {
  const int tid = threadIdx.x, total = kRows * K0p;
  for (int base = tid; base < total; base += kGatherBatch * kThreads) {
    float v[kGatherBatch];
#pragma unroll
    for (int u = 0; u < kGatherBatch; u++) {
      const int idx = base + u * kThreads, r = idx / K0p, k = idx % K0p;
      const float *src = nullptr;
      if (idx < total && k < K0) {
        const long long off = rowoff[r];
        if (off >= 0) src = input_src(a, off, rowp[r], rowl[r], rowh[r], k);
      }
      v[u] = src ? *src : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kGatherBatch; u++) {
      const int idx = base + u * kThreads;
      if (idx < total) in[(idx / K0p) * ld + idx % K0p] = v[u];
    }
  }
}

// align_kernel_tc: v2 (PASSES = 3) and v3 (PASSES = 1); v4 and v5 the same
// with the batched gather and final epilogue (BATCHED).
template <int PASSES, bool BATCHED>
__global__ void __launch_bounds__(kThreads, 2) align_kernel_tc(AlignArgs a) {
  extern __shared__ __align__(16) float smem[];
  __shared__ long long rowoff[kRows];
  __shared__ int rowl[kRows], rowh[kRows], rowp[kRows];
  const int K0 = a.HS + a.DP + a.DL + a.DH, ld0 = tc_ld(K0);
  const int ld2 = tc_ld(a.H2), ld1 = tc_ld(a.H1);
  float *in = smem;                         // [kRows][ld0]: x, pos, layer, head; later h2 [kRows][ld2]
  float *h1 = smem + align_tc_region0(a);   // [kRows][ld1]
  const int tid = threadIdx.x;
  const long long total = (long long)a.L * a.rows * a.NKV;

  if (tid < kRows) {
    const long long R = (long long)blockIdx.x * kRows + tid;
    long long off = -1;
    int l = 0, h = 0, p = 0;
    if (R < total) {
      h = (int)(R % a.NKV);
      const int i = (int)((R / a.NKV) % a.rows);
      l = (int)(R / ((long long)a.NKV * a.rows));
      const int slot = a.slots[i];
      p = a.index[i];
      if (slot >= 0 && p >= 0 && p < a.P) off = l * a.layer_stride + ((long long)slot * a.NKV + h) * a.HS;
    }
    rowoff[tid] = off;
    rowl[tid] = l;
    rowh[tid] = h;
    rowp[tid] = p;
  }
  __syncthreads();
  const int K0p = round_up(K0, 8);
  if (BATCHED) {
    gather_inputs_batched(in, ld0, a, K0, K0p, rowoff, rowl, rowh, rowp);
  } else {
    for (int idx = tid; idx < kRows * K0p; idx += kThreads) {
      const int r = idx / K0p, k = idx % K0p;
      const long long off = rowoff[r];
      in[r * ld0 + k] = off >= 0 && k < K0 ? *input_src(a, off, rowp[r], rowl[r], rowh[r], k) : 0.f;
    }
  }
  __syncthreads();  // inputs gathered
  dense_tc<PASSES, false, BATCHED>(in, ld0, K0, a.w1, a.b1, a.H1, h1, ld1, nullptr, nullptr);
  __syncthreads();  // h1 complete, and every read of `in` done before h2 overwrites it
  dense_tc<PASSES, false, BATCHED>(h1, ld1, a.H1, a.w2, a.b2, a.H2, in, ld2, nullptr, nullptr);
  __syncthreads();  // h2 complete
  dense_tc<PASSES, true, BATCHED>(in, ld2, a.H2, a.w3, a.b3, a.HS, nullptr, 0, a.cache, rowoff);
}


// ---- v6-v9: activations in registers, packed networks (gpu.AlignPack) ----
//
// v1-v5 stage each 64-row block's activations through shared memory between
// the layers, every block re-reads all weights from L2, and the layers are
// separated by block barriers: ~75-125 µs whatever the arithmetic. Here:
//  - a warp owns a 16-row tile (mma's M) and runs all three layers on it with
//    the activations in registers: with the packed row order (gpu.alignPsi) a
//    lane's accumulators of a 32-column block are 8 consecutive neurons per
//    row, which are exactly the k-slots it supplies to the next layer, so an
//    accumulator fragment (relu'd, rounded) is the next layer's A fragment,
//    no shuffle. fc1 is computed 32 outputs at a time and fed straight into
//    fc2's accumulators, so h1 never exists whole. No barrier after the
//    staging; warps never wait for one another.
//  - the weights (gpu.AlignPack.W: the shared-memory image) are staged once
//    per block with cp.async; the grid is one block per SM, its warps taking
//    tiles round-robin over the blocks, so every SM loads them once.
//  - fc1's embedding part is a table lookup (PosT[p] + LH[l, h], fp32 from
//    L2, prefetched one 32-output chunk ahead) instead of 44 more inputs.
//  - a tile is 16 consecutive list entries of one (layer, head), so the LH row
//    is the same for the whole warp.
// Two math policies:
//  - v6 (MathF16): fp16 weights, m16n8k16 on fp16 operands (x, h1, h2
//    rounded to fp16), fp32 accumulation, fp32 residual add. ~5e-4 relative
//    on the correction, ~1e-4 on the output.
//  - v7 (MathTF32x3): fp32 weights, m16n8k8 TF32 in three passes (both
//    operands split into big + small TF32 parts, as v2): fp32 accuracy
//    (~2e-6 relative on the correction).
// Variants 8 and 9 (TUNED) run the same arithmetic in another order, so
// their results are bitwise those of 6 and 7: v8 issues fc1 of chunk c+1
// before fc2 of chunk c (independent chains in flight together), v9 runs
// the 3xTF32 passes round 4 accumulators (MathTF32x3::mma_tiles). Timings:
// the comment at the top of this file.

template <int ESZ>
__host__ __device__ constexpr int packed_ld(int k) {  // = gpu.alignLd(k, dtype of ESZ bytes); k % 32 == 0
  return ESZ == 2 ? (k % 64 == 32 ? k : k + 32) : k + 16;
}

struct AlignPackedArgs {
  float *cache;
  const int32_t *slots, *index;
  int rows, NKV, HS;
  long long layer_stride;
  const uint4 *w;     // the shared-memory image of the weights
  const float *bias;  // b2 [H2p], b3 [HSp]
  const float *post;  // [P][H1p]
  const float *lh;    // [Ln·Hn][H1p]
  int P, Hn, H1p;
  int tiles_per_lh, tiles;
  int vec;  // 16-byte cache accesses (HS, layer_stride multiples of 4, aligned cache)
};


// h2pack: two floats as an fp16 pair, lo in the low half (the lower k or column).
__device__ __forceinline__ uint32_t h2pack(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t *>(&v);
}

// mma_f16 / mma_tf32_nv: c += A·B. Not volatile (unlike mma_tf32 above):
// they are pure functions of their operands, so the compiler may interleave
// the independent accumulators' chains.
__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_tf32_nv(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void unpack8(float (&v)[8], float4 lo, float4 hi) {
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}

// A math policy turns a lane's share of a 32-wide k block — v[r][p], rows g
// (r = 0) and g+8 (r = 1), k = 32c+8t+p for p < 8 — into A fragments
// (make), and multiplies them into one n-tile's accumulators by the 8
// weights W[n][32c+8t … +7] (mma; w 16-byte aligned in shared memory).
struct MathF16 {
  using W = __half;
  // k16 step σ: slots q = 0..3 are p = 4σ+q (low/high halves: q = 0, 1 in
  // registers 0 (row g) and 1 (row g+8), q = 2, 3 in registers 2 and 3).
  struct A {
    uint32_t r[2][4];
  };
  __device__ __forceinline__ static A make(const float (&v)[2][8]) {
    A a;
#pragma unroll
    for (int sg = 0; sg < 2; sg++) {
      a.r[sg][0] = h2pack(v[0][4 * sg], v[0][4 * sg + 1]);
      a.r[sg][1] = h2pack(v[1][4 * sg], v[1][4 * sg + 1]);
      a.r[sg][2] = h2pack(v[0][4 * sg + 2], v[0][4 * sg + 3]);
      a.r[sg][3] = h2pack(v[1][4 * sg + 2], v[1][4 * sg + 3]);
    }
    return a;
  }
  __device__ __forceinline__ static void mma(float (&acc)[4], const A &a, const W *w) {
    const uint4 b = *reinterpret_cast<const uint4 *>(w);  // W[n][p], p = 0..7: b.x = p 0,1 … b.w = p 6,7
    mma_f16(acc, a.r[0], b.x, b.y);
    mma_f16(acc, a.r[1], b.z, b.w);
  }
  // mma_tiles: mma over N n-tiles, tile n's weights at w + n·nstride. Two
  // mma per tile: the tiles already give independent chains.
  template <int N>
  __device__ __forceinline__ static void mma_tiles(float (*acc)[4], const A &a, const W *w, int nstride) {
#pragma unroll
    for (int n = 0; n < N; n++) mma(acc[n], a, w + n * nstride);
  }
  // The tuned kernel (v8) pipelines fc1 of the next chunk with fc2 of this
  // one: 8 more registers for the A fragments in flight.
  static constexpr bool kPipe = true;
};

struct MathTF32x3 {
  using W = float;
  // k8 step j: slot t is p = 2j, slot t+4 is p = 2j+1 (registers: a0 (g,
  // t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (t), b1 (t+4)).
  struct A {
    uint32_t big[4][4], small[4][4];
  };
  __device__ __forceinline__ static A make(const float (&v)[2][8]) {
    A a;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const float f[4] = {v[0][2 * j], v[1][2 * j], v[0][2 * j + 1], v[1][2 * j + 1]};
#pragma unroll
      for (int i = 0; i < 4; i++) split_tf32(f[i], a.big[j][i], a.small[j][i]);
    }
    return a;
  }
  __device__ __forceinline__ static void mma(float (&acc)[4], const A &a, const W *w) {
    const float4 lo = *reinterpret_cast<const float4 *>(w), hi = *reinterpret_cast<const float4 *>(w + 4);
    const float wv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
      uint32_t bb0, bs0, bb1, bs1;
      split_tf32(wv[2 * j], bb0, bs0);
      split_tf32(wv[2 * j + 1], bb1, bs1);
      mma_tf32_nv(acc, a.small[j], bb0, bb1);  // small terms first
      mma_tf32_nv(acc, a.big[j], bs0, bs1);
      mma_tf32_nv(acc, a.big[j], bb0, bb1);
    }
  }
  // mma_tiles: mma over N n-tiles (N % 4 == 0), tile n's weights at w +
  // n·nstride. mma alone chains 12 mma on one accumulator (4 k8 steps × 3
  // passes); here 4 tiles' weights are loaded at once and the passes go
  // round the 4 accumulators, so 4 chains are in flight. Each accumulator
  // sees the same sequence as in mma: the results are bitwise equal.
  template <int N>
  __device__ __forceinline__ static void mma_tiles(float (*acc)[4], const A &a, const W *w, int nstride) {
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += 4) {
      float wv[4][8];
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const float4 lo = *reinterpret_cast<const float4 *>(w + (n0 + i) * nstride);
        const float4 hi = *reinterpret_cast<const float4 *>(w + (n0 + i) * nstride + 4);
        unpack8(wv[i], lo, hi);
      }
#pragma unroll
      for (int j = 0; j < 4; j++) {
        uint32_t bb[4][2], bsm[4][2];
#pragma unroll
        for (int i = 0; i < 4; i++) {
          split_tf32(wv[i][2 * j], bb[i][0], bsm[i][0]);
          split_tf32(wv[i][2 * j + 1], bb[i][1], bsm[i][1]);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) mma_tf32_nv(acc[n0 + i], a.small[j], bb[i][0], bb[i][1]);
#pragma unroll
        for (int i = 0; i < 4; i++) mma_tf32_nv(acc[n0 + i], a.big[j], bsm[i][0], bsm[i][1]);
#pragma unroll
        for (int i = 0; i < 4; i++) mma_tf32_nv(acc[n0 + i], a.big[j], bb[i][0], bb[i][1]);
      }
    }
  }
  // No fc1/fc2 pipelining: its A fragments are 32 registers.
  static constexpr bool kPipe = false;
};

// mma_row: acc[n] += a·(tile n of w) for N tiles nstride apart: the math's
// mma_tiles in the tuned kernels, one mma at a time in the plain ones.
template <class M, bool TUNED, int N>
__device__ __forceinline__ void mma_row(float (*acc)[4], const typename M::A &a, const typename M::W *w,
                                        int nstride) {
  if constexpr (TUNED) {
    M::template mma_tiles<N>(acc, a, w, nstride);
  } else {
#pragma unroll
    for (int n = 0; n < N; n++) M::mma(acc[n], a, w + n * nstride);
  }
}

// block_relu: a lane's 8 neurons of the 32-wide block whose accumulators are
// acc[0..3] (tile j = p/2, e = p%2; row g+8 in elements 2, 3), plus add[p],
// relu'd: the next layer's v[r][p].
__device__ __forceinline__ void block_relu(float (&v)[2][8], const float (*acc)[4], const float (&add)[8]) {
#pragma unroll
  for (int r2 = 0; r2 < 2; r2++)
#pragma unroll
    for (int p = 0; p < 8; p++) v[r2][p] = fmaxf(acc[p / 2][2 * r2 + p % 2] + add[p], 0.f);
}

// align_kernel_packed: see above. NX = HSp/32, NH2 = H2p/32 (compile-time:
// they size register arrays); fc1's width H1p is a loop bound. Lane (g, t)
// of a warp (g = lane/4, t = lane%4) holds tile rows g and g+8.
// Blocks with blockIdx.y = 1 run the second network (n1) over its cache,
// those with 0 the first (n0): keys and values in one launch, each block
// staging one network.
template <class M, int NX, int NH2, int WARPS, bool TUNED>
__global__ void __launch_bounds__(WARPS * 32, 1) align_kernel_packed(AlignPackedArgs n0, AlignPackedArgs n1) {
  const AlignPackedArgs a = blockIdx.y ? n1 : n0;
  using W = typename M::W;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int ESZ = sizeof(W), HSp = 32 * NX, H2p = 32 * NH2;
  constexpr int ld1 = packed_ld<ESZ>(HSp), ld3 = packed_ld<ESZ>(H2p);
  const int H1p = a.H1p, ld2 = packed_ld<ESZ>(H1p), nc1 = H1p / 32;
  const W *w1s = reinterpret_cast<const W *>(smem_raw);  // [H1p][ld1]: fc1's x columns
  const W *w2s = w1s + H1p * ld1;                        // [H2p][ld2]
  const W *w3s = w2s + H2p * ld2;                        // [HSp][ld3]
  float *bs = reinterpret_cast<float *>(smem_raw + (size_t)(H1p * ld1 + H2p * ld2 + HSp * ld3) * ESZ);
  {
    const int wunits = (H1p * ld1 + H2p * ld2 + HSp * ld3) * ESZ / 16, bunits = (H2p + HSp) / 4;
    for (int u = threadIdx.x; u < wunits; u += WARPS * 32)
      kv_cp_async16_cg(reinterpret_cast<uint4 *>(smem_raw) + u, a.w + u);
    for (int u = threadIdx.x; u < bunits; u += WARPS * 32)
      kv_cp_async16_cg(reinterpret_cast<float4 *>(bs) + u, reinterpret_cast<const float4 *>(a.bias) + u);
    kv_cp_async_commit();
  }
  // A programmatic dependent (sm_90): the networks' image (constant) streams
  // in while the kernel before (the step's embedding, where there is one)
  // still runs; the rows' slots and indices were copied in ahead of the
  // step. The next kernel (the first q|k|v product, which reads only
  // weights before its own wait) may launch once those are in.
  kv_pdl_wait();
  kv_pdl_launch_dependents();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int stride = gridDim.x * WARPS;

  // The tile's state: rows g and g+8 (r2 = 0, 1). x is kept as fc1's A
  // fragments only; the residual add re-reads the fp32 values (an L1 hit:
  // this lane loaded them), which keeps the 12-warp fp16 instances within
  // 168 registers.
  typename M::A xa[NX];
  long long off[2];
  const float *pe[2], *pl;
  float4 e[3][2];  // fc1 table values of the next chunk: PosT rows g, g+8; LH

  // load_x reads the rows' head vectors x[r2][s][p] = x_row[32s+8t+p]
  // (zero past HS and for skipped rows).
  auto load_x = [&](float(&x)[2][NX][8]) {
#pragma unroll
    for (int r2 = 0; r2 < 2; r2++)
#pragma unroll
      for (int s = 0; s < NX; s++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
          const int col = 32 * s + 8 * t + 4 * u;
          float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
          if (off[r2] >= 0) {
            const float *src = a.cache + off[r2] + col;
            if (a.vec) {
              if (col < a.HS) v = *reinterpret_cast<const float4 *>(src);  // HS % 4 == 0
            } else {
              v.x = col < a.HS ? src[0] : 0.f;
              v.y = col + 1 < a.HS ? src[1] : 0.f;
              v.z = col + 2 < a.HS ? src[2] : 0.f;
              v.w = col + 3 < a.HS ? src[3] : 0.f;
            }
          }
          x[r2][s][4 * u] = v.x, x[r2][s][4 * u + 1] = v.y, x[r2][s][4 * u + 2] = v.z, x[r2][s][4 * u + 3] = v.w;
        }
  };
  auto load_e = [&](int c) {
#pragma unroll
    for (int r2 = 0; r2 < 2; r2++) {
      e[r2][0] = __ldg(reinterpret_cast<const float4 *>(pe[r2] + 32 * c));
      e[r2][1] = __ldg(reinterpret_cast<const float4 *>(pe[r2] + 32 * c + 4));
    }
    e[2][0] = __ldg(reinterpret_cast<const float4 *>(pl + 32 * c));
    e[2][1] = __ldg(reinterpret_cast<const float4 *>(pl + 32 * c + 4));
  };
  auto load_tile = [&](int T) {
    const int lhi = T / a.tiles_per_lh, i0 = (T - lhi * a.tiles_per_lh) * 16;
    const int l = lhi / a.NKV, h = lhi - l * a.NKV;
    pl = a.lh + (size_t)(l * a.Hn + h) * H1p + 8 * t;
#pragma unroll
    for (int r2 = 0; r2 < 2; r2++) {
      const int i = i0 + g + 8 * r2;
      long long o = -1;
      int p = 0;
      if (i < a.rows) {
        const int slot = a.slots[i], pi = a.index[i];
        if (slot >= 0 && pi >= 0 && pi < a.P) {
          o = l * a.layer_stride + ((long long)slot * a.NKV + h) * a.HS;
          p = pi;
        }
      }
      off[r2] = o;
      pe[r2] = a.post + (size_t)p * H1p + 8 * t;
    }
    float x[2][NX][8];
    load_x(x);
#pragma unroll
    for (int s = 0; s < NX; s++) {
      float v[2][8];
#pragma unroll
      for (int p = 0; p < 8; p++) v[0][p] = x[0][s][p], v[1][p] = x[1][s][p];
      xa[s] = M::make(v);
    }
    load_e(0);
  };

  int T = warp * gridDim.x + blockIdx.x;  // round-robin over blocks: every SM gets its share
  if (T < a.tiles) load_tile(T);          // the first tile's loads overlap the staging
  kv_cp_async_wait_all();
  __syncthreads();

  for (; T < a.tiles; T += stride) {
    if (T >= stride) load_tile(T);
    float acc2[4 * NH2][4];
#pragma unroll
    for (int j = 0; j < 4 * NH2; j++) acc2[j][0] = acc2[j][1] = acc2[j][2] = acc2[j][3] = 0.f;

    // fc1 outputs 32c … 32c+31 (logical), started at their table values
    // (e: this chunk's): accumulator (tile j, e) of row g holds neuron
    // 32c+8t+2j+e.
    auto init_acc1 = [&](float(&acc1)[4][4]) {
      float p0[8], p1[8], lv[8];
      unpack8(p0, e[0][0], e[0][1]);
      unpack8(p1, e[1][0], e[1][1]);
      unpack8(lv, e[2][0], e[2][1]);
#pragma unroll
      for (int j = 0; j < 4; j++)
#pragma unroll
        for (int ee = 0; ee < 2; ee++) {
          acc1[j][ee] = p0[2 * j + ee] + lv[2 * j + ee];
          acc1[j][2 + ee] = p1[2 * j + ee] + lv[2 * j + ee];
        }
    };
    auto layer1 = [&](float(&acc1)[4][4], int c) {
#pragma unroll
      for (int s = 0; s < NX; s++) {
        mma_row<M, TUNED, 4>(acc1, xa[s], w1s + (32 * c + g) * ld1 + 32 * s + 8 * t, 8 * ld1);
      }
    };
    auto relu_make = [&](const float(&acc1)[4][4]) {
      float v[2][8];
      const float zero[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      block_relu(v, acc1, zero);
      return M::make(v);
    };
    auto layer2 = [&](const typename M::A &ha, int c) {
      mma_row<M, TUNED, 4 * NH2>(acc2, ha, w2s + g * ld2 + 32 * c + 8 * t, 8 * ld2);
    };
    // (Not for the instances with the most accumulators: they would spill.)
    if (TUNED && M::kPipe && NX * NH2 <= 8) {
      // fc1 of chunk c+1 is issued before fc2 of chunk c: the two chains are
      // independent, so each warp keeps both in flight (the tables are then
      // loaded two chunks ahead).
      typename M::A ha;
      {
        float acc1[4][4];
        init_acc1(acc1);
        if (nc1 > 1) load_e(1);
        layer1(acc1, 0);
        ha = relu_make(acc1);
      }
      for (int c = 0; c < nc1; c++) {
        const bool more = c + 1 < nc1;
        float acc1[4][4];
        if (more) {
          init_acc1(acc1);
          if (c + 2 < nc1) load_e(c + 2);
          layer1(acc1, c + 1);
        }
        layer2(ha, c);
        if (more) ha = relu_make(acc1);
      }
    } else {
      for (int c = 0; c < nc1; c++) {
        float acc1[4][4];
        init_acc1(acc1);
        if (c + 1 < nc1) load_e(c + 1);
        layer1(acc1, c);
        layer2(relu_make(acc1), c);
      }
    }

    float acc3[4 * NX][4];
#pragma unroll
    for (int j = 0; j < 4 * NX; j++) acc3[j][0] = acc3[j][1] = acc3[j][2] = acc3[j][3] = 0.f;
#pragma unroll
    for (int c = 0; c < NH2; c++) {
      float bv[8], v[2][8];
      unpack8(bv, *reinterpret_cast<const float4 *>(bs + 32 * c + 8 * t),
              *reinterpret_cast<const float4 *>(bs + 32 * c + 8 * t + 4));
      block_relu(v, acc2 + 4 * c, bv);
      const typename M::A ha = M::make(v);
      mma_row<M, TUNED, 4 * NX>(acc3, ha, w3s + g * ld3 + 32 * c + 8 * t, 8 * ld3);
    }

    // Residual: fc3's output (j = 4s + p/2, e = p%2) is head value 32s+8t+p,
    // exactly the x values this lane loaded (read again here, after fc3:
    // earlier they would be live across fc3 along with acc2 and acc3).
    float x[2][NX][8];
    load_x(x);
#pragma unroll
    for (int s = 0; s < NX; s++) {
      float bv[8];
      unpack8(bv, *reinterpret_cast<const float4 *>(bs + H2p + 32 * s + 8 * t),
              *reinterpret_cast<const float4 *>(bs + H2p + 32 * s + 8 * t + 4));
#pragma unroll
      for (int r2 = 0; r2 < 2; r2++) {
        if (off[r2] < 0) continue;
        float y[8];
        // As PyTorch: fc3's output is a float32, then the residual add.
#pragma unroll
        for (int q = 0; q < 8; q++) y[q] = x[r2][s][q] + (acc3[4 * s + q / 2][2 * r2 + q % 2] + bv[q]);
        float *dst = a.cache + off[r2] + 32 * s + 8 * t;
#pragma unroll
        for (int u = 0; u < 2; u++) {
          const int col = 32 * s + 8 * t + 4 * u;
          if (a.vec) {
            if (col < a.HS)
              *reinterpret_cast<float4 *>(dst + 4 * u) = make_float4(y[4 * u], y[4 * u + 1], y[4 * u + 2], y[4 * u + 3]);
          } else {
#pragma unroll
            for (int q = 0; q < 4; q++)
              if (col + q < a.HS) dst[4 * u + q] = y[4 * u + q];
          }
        }
      }
    }
  }
}

template <class M, int NX, int NH2, int WARPS, bool TUNED>
kv_status launch_align_packed(kv_stream s, const AlignPackedArgs *a, int nets) {
  constexpr int ESZ = sizeof(typename M::W), HSp = 32 * NX, H2p = 32 * NH2;
  const int H1p = max(a[0].H1p, a[nets - 1].H1p);
  const size_t smem =
      (size_t)(H1p * packed_ld<ESZ>(HSp) + H2p * packed_ld<ESZ>(H1p) + HSp * packed_ld<ESZ>(H2p)) * ESZ +
      4 * (H2p + HSp);
  int dev = 0, sms = 0;
  KV_TRY(cudaGetDevice(&dev));
  KV_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  // Blocks a network: the SMs shared between the networks (a block fills an
  // SM's registers), never more than the tiles.
  const int blocks = min(max(1, sms / nets), a[0].tiles);
  // Host-side attribute (no stream work): allowed while capturing.
  KV_TRY(cudaFuncSetAttribute(align_kernel_packed<M, NX, NH2, WARPS, TUNED>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  KV_TRY(kv_launch(align_kernel_packed<M, NX, NH2, WARPS, TUNED>, dim3(blocks, nets), dim3(WARPS * 32), smem, s,
                   kv_pdl_supported(), a[0], a[nets - 1]));
  return kv_launched();
}

// dispatch_packed picks the instance. Warps per block: the SM's share of a
// step's tiles (distilgpt2 1,152 and SmolLM2 1,440 tiles of 16 rows at
// window 251 over 132 SMs: 9-11), while the registers allow (ptxas, sm_90:
// the 12-warp fp16 instances ≤ 168 registers, no spills); the larger
// instances hold more per lane.
template <bool TUNED>
kv_status dispatch_packed(kv_stream s, const AlignPackedArgs *a, int nets, int w_f16, int HSp, int H2p) {
  if (w_f16) {
    // (Tuned, these two spill 20 and 80 bytes at 168 registers; 11 warps
    // would not help: 3 warps on one SM sub-partition cap them at 168 too.)
    if (HSp == 64 && H2p == 64) return launch_align_packed<MathF16, 2, 2, 12, TUNED>(s, a, nets);
    if (HSp == 64 && H2p == 128) return launch_align_packed<MathF16, 2, 4, 12, TUNED>(s, a, nets);
    if (HSp == 64 && H2p == 256) return launch_align_packed<MathF16, 2, 8, 8, TUNED>(s, a, nets);
    if (HSp == 128 && H2p == 64) return launch_align_packed<MathF16, 4, 2, 8, TUNED>(s, a, nets);
    if (HSp == 128 && H2p == 128) return launch_align_packed<MathF16, 4, 4, 8, TUNED>(s, a, nets);
  } else {
    if (HSp == 64 && H2p == 64) return launch_align_packed<MathTF32x3, 2, 2, 8, TUNED>(s, a, nets);
    if (HSp == 64 && H2p == 128) return launch_align_packed<MathTF32x3, 2, 4, 8, TUNED>(s, a, nets);
  }
  return (kv_status)cudaErrorInvalidValue;
}

}  // namespace

extern "C" kv_status kv_align(kv_stream s, float *cache, const int32_t *slots, const int32_t *index, int rows,
                              int L, int NKV, int HS, long long layer_stride, const float *pos, int P, int DP,
                              const float *layer, int DL, const float *head, int DH, const float *w1,
                              const float *b1, const float *w2, const float *b2, const float *w3,
                              const float *b3, int H1, int H2, int variant) {
  if (rows <= 0 || L <= 0 || NKV <= 0) return kv_launched();
  if (HS <= 0 || P <= 0 || DP < 0 || DL < 0 || DH < 0 || H1 <= 0 || H2 <= 0 ||
      HS + DP + DL + DH > KV_ALIGN_MAX_IN || variant < 0 || variant > 5)
    return (kv_status)cudaErrorInvalidValue;
  const AlignArgs a{cache, slots, index, rows, L, NKV, HS, layer_stride, pos, layer, head, P, DP, DL, DH,
                    w1, b1, w2, b2, w3, b3, H1, H2};
  const long long total = (long long)L * rows * NKV;
  const int blocks = kv_ceil_div(total, kRows);
  if (variant == 0) variant = 4;  // v4: fp32-accurate and the fastest such (H200: 121 against 124 µs)
  if (variant == 1) {
    const size_t smem = align_smem_bytes(a);
    // Host-side attribute (no stream work): allowed while capturing.
    KV_TRY(cudaFuncSetAttribute(align_kernel_v1, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    align_kernel_v1<<<blocks, kThreads, smem, s>>>(a);
    return kv_launched();
  }
  const size_t smem = align_tc_smem_bytes(a);
  // Host-side attributes (no stream work): allowed while capturing.
  switch (variant) {
    case 2:
      KV_TRY(cudaFuncSetAttribute(align_kernel_tc<3, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      align_kernel_tc<3, false><<<blocks, kThreads, smem, s>>>(a);
      break;
    case 3:
      KV_TRY(cudaFuncSetAttribute(align_kernel_tc<1, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      align_kernel_tc<1, false><<<blocks, kThreads, smem, s>>>(a);
      break;
    case 4:
      KV_TRY(cudaFuncSetAttribute(align_kernel_tc<3, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      align_kernel_tc<3, true><<<blocks, kThreads, smem, s>>>(a);
      break;
    default:
      KV_TRY(cudaFuncSetAttribute(align_kernel_tc<1, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      align_kernel_tc<1, true><<<blocks, kThreads, smem, s>>>(a);
      break;
  }
  return kv_launched();
}


extern "C" kv_status kv_align_packed(kv_stream s, const kv_align_net *nets, int n_nets, const int32_t *slots,
                                     const int32_t *index, int rows, int L, int NKV, int HS, long long layer_stride,
                                     int tuned) {
  if (n_nets < 1 || n_nets > 2) return (kv_status)cudaErrorInvalidValue;
  if (rows <= 0 || L <= 0 || NKV <= 0) return kv_launched();
  const int tiles_per_lh = kv_ceil_div(rows, 16);
  const long long tiles = (long long)L * NKV * tiles_per_lh;
  if (HS <= 0 || tiles > INT32_MAX) return (kv_status)cudaErrorInvalidValue;
  AlignPackedArgs a[2];
  for (int n = 0; n < n_nets; n++) {
    const kv_align_net &k = nets[n];
    // One instance runs both networks: the same dtype and padded sizes but
    // fc1's width (a loop bound).
    if (HS > k.HSp || k.P <= 0 || k.H1p <= 0 || k.H1p % 32 != 0 || L > k.Ln || NKV > k.Hn ||
        k.w_f16 != nets[0].w_f16 || k.HSp != nets[0].HSp || k.H2p != nets[0].H2p)
      return (kv_status)cudaErrorInvalidValue;
    const int vec = HS % 4 == 0 && layer_stride % 4 == 0 && reinterpret_cast<uintptr_t>(k.cache) % 16 == 0;
    a[n] = AlignPackedArgs{k.cache, slots, index, rows, NKV, HS, layer_stride, static_cast<const uint4 *>(k.w),
                           k.bias, k.post, k.lh, k.P, k.Hn, k.H1p, tiles_per_lh, (int)tiles, vec};
  }
  const int f16 = nets[0].w_f16, HSp = nets[0].HSp, H2p = nets[0].H2p;
  return tuned ? dispatch_packed<true>(s, a, n_nets, f16, HSp, H2p) : dispatch_packed<false>(s, a, n_nets, f16, HSp, H2p);
}
