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
// A block takes kRows rows: it gathers each row's input [x, embeddings] into
// shared memory (k-major, so a thread reads its 8 rows as two float4), then
// runs the three layers as register-tiled SIMT GEMMs whose weight matrices
// stream through shared memory in k-chunks (prefetched into registers one
// chunk ahead); h1 and h2 stay in shared memory; the last layer adds into the
// cache. Each block reads all weights (≈190 KB for distilgpt2 keys) from
// L2; 64 rows per block keep that traffic a few tens of MB per call.
//
// fc1's input is [x, pos, layer, head], so W1·in = W1x·x + W1p·Pos[p] +
// W1l·Layer[l] + W1h·Head[h]: the embedding terms depend only on the weights
// and (p, l, h), so a precomputed table (P + L·NKV rows of H1) would replace
// 44 of fc1's 108 input columns by one gathered add (≈25% of all FLOPs for
// distilgpt2's key network). Kept out for now: the table is per network and
// AlignNet has no place for it; gathering the embeddings as extra input
// columns keeps the kernel one launch with no scratch. See the report.
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
    float v = 0.f;
    if (off >= 0 && k < K0) {
      if (k < a.HS)
        v = a.cache[off + k];
      else if (k < a.HS + a.DP)
        v = __ldg(a.pos + (size_t)rowp[r] * a.DP + (k - a.HS));
      else if (k < a.HS + a.DP + a.DL)
        v = __ldg(a.layer + (size_t)rowl[r] * a.DL + (k - a.HS - a.DP));
      else
        v = __ldg(a.head + (size_t)rowh[r] * a.DH + (k - a.HS - a.DP - a.DL));
    }
    in[k * kLdRows + r] = v;
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

}  // namespace

extern "C" kv_status kv_align(kv_stream s, float *cache, const int32_t *slots, const int32_t *index, int rows,
                              int L, int NKV, int HS, long long layer_stride, const float *pos, int P, int DP,
                              const float *layer, int DL, const float *head, int DH, const float *w1,
                              const float *b1, const float *w2, const float *b2, const float *w3,
                              const float *b3, int H1, int H2, int variant) {
  if (rows <= 0 || L <= 0 || NKV <= 0) return kv_launched();
  if (HS <= 0 || P <= 0 || DP < 0 || DL < 0 || DH < 0 || H1 <= 0 || H2 <= 0 ||
      HS + DP + DL + DH > KV_ALIGN_MAX_IN || (variant != 0 && variant != 1))
    return (kv_status)cudaErrorInvalidValue;
  const AlignArgs a{cache, slots, index, rows, L, NKV, HS, layer_stride, pos, layer, head, P, DP, DL, DH,
                    w1, b1, w2, b2, w3, b3, H1, H2};
  const size_t smem = align_smem_bytes(a);
  // Host-side attribute (no stream work): allowed while capturing.
  KV_TRY(cudaFuncSetAttribute(align_kernel_v1, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const long long total = (long long)L * rows * NKV;
  align_kernel_v1<<<kv_ceil_div(total, kRows), kThreads, smem, s>>>(a);
  return kv_launched();
}
