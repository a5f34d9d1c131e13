// attention.cu — softmax(q·kᵀ/sqrt(HS))·v over a sequence's cache entries
// (see gpu.AttnParams and ref.Attention).
//
// Entries are addressed through order[b·max_len + j] (slot numbers), so K/V
// rows are gathered, one head row (HS floats, contiguous) per entry. Query t
// of sequence b sees entries j ≤ lens[b] − T + t; lens is read on the device
// (the decode step is a captured graph), so grids are sized from max_len and
// blocks past a sequence's length exit early.
//
// Two kernels:
//  - decode (T·G query vectors per (b, kv head) small, G = NH/NKV): one block
//    per (key split, kv head, sequence) serves every query head of the kv
//    head, so each K/V row is read once per step; chunks of kDecCh entries go
//    through shared memory with an online softmax, and with a scratch buffer
//    the entries are split over many blocks (flash-decoding) whose partial
//    (max, sum, output) a second kernel combines. Decoding now defaults to
//    decode v4 (attn_decode_kernel_v4): K/V rows straight into registers, a
//    group of HS/4 lanes per key, one block (or a cluster of 4 or 8 on
//    sm_90) per (kv head, sequence) up to 1024 entries, launched as a
//    programmatic dependent that gathers the older entries' rows before
//    waiting for the kernel that stores this step's keys and values; the
//    split kernels take longer sequences.
//  - prefill (long T): flash-attention style tiles in fp32 SIMT, TQ queries of
//    one head per block, key/value tiles of TK entries in shared memory,
//    online softmax in registers.
// RoPE (StreamingLLM position shift) rotates key j at position j while the
// tile is staged: angle = float32(j)·inv_freq[i] in fp32 as ref.RopeRotate,
// then sincosf (full-range, not the fast intrinsic).
#include "common.cuh"
#include "fused.cuh"
#include "stamps.cuh"

#include <cooperative_groups.h>
#include <type_traits>
namespace cg = cooperative_groups;

namespace {

// The two halves of a cluster barrier (sm_90): arrive releases this
// thread's earlier writes, wait acquires those of every thread that
// arrived; a thread that exits after arriving no longer holds the others.
__device__ __forceinline__ void kv_cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.aligned;" ::: "memory");
#endif
}
[[maybe_unused]] __device__ __forceinline__ void kv_cluster_wait() {  // unused before sm_90
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

// Tagged words: a value and a nonzero tag in one 8-byte word, stored into
// another block's shared memory (distributed shared memory) by one 64-bit
// store, so a reader that sees the tag sees the value (a naturally aligned
// 64-bit scalar access is one memory operation: the reader gets the old
// word or the new one, never half of each; NCCL's low-latency protocol
// rests on the same). A cluster exchange then needs no barrier:
// each reader polls its own zeroed words until every one it expects has
// landed. barrier.cluster's release and acquire compile to MEMBAR.ALL.GPU
// and CCTL.IVALL with this toolchain's ptxas (its relaxed form is PTX 8.0),
// ~0.8 µs an exchange through the barrier on an H100 against ~0.4 µs
// tagged (scripts/cluster-exchange-micro.cu; docs/PERF.md, version 29).
[[maybe_unused]] __device__ __forceinline__ void kv_tag_store(float *remote_word, float v) {
  *reinterpret_cast<volatile unsigned long long *>(remote_word) = (1ull << 32) | __float_as_uint(v);
}
[[maybe_unused]] __device__ __forceinline__ float kv_tag_load(const unsigned long long *word) {
  unsigned long long w = *reinterpret_cast<const volatile unsigned long long *>(word);
  while ((w >> 32) == 0) w = *reinterpret_cast<const volatile unsigned long long *>(word);
  return __uint_as_float(static_cast<unsigned>(w));
}

constexpr int kDecThreads = 128;
constexpr int kDecCh = 32;                // entries per staged chunk
constexpr int kDecMaxQ = KV_ATTN_DECODE_MAX_Q;
constexpr int kMaxHS = KV_ATTN_MAX_HS;
constexpr int kDecTargetBlocks = 512;     // split until about this many blocks (≈ 4 per SM)
constexpr int kDecMaxSplit = 128;
// The scratch starts with kDecCounters int counters (one per sequence and kv
// head), the partials follow: at fixed offsets, so calls of different shapes
// sharing one scratch never write partials over each other's counters (which
// must stay zero between launches). More sequence × kv-head pairs than this
// fill the GPU unsplit anyway.
constexpr int kDecCounters = 1024;

struct DecodeSplit {
  int chunks_per_split, nsplit;
};

// decode_split: how the entries [0, max_len) are cut into nsplit ranges of
// chunks_per_split chunks. Depends only on shapes, so the workspace size and
// the launch agree, and a captured graph keeps working as lengths change.
DecodeSplit decode_split(int B, int NKV, int max_len) {
  const int chunks = kv_ceil_div(max(max_len, 1), kDecCh);
  const long long want = (long long)chunks * B * NKV;
  int cps = (int)((want + kDecTargetBlocks - 1) / kDecTargetBlocks);
  // At most kDecMaxSplit splits: the v2 combine stages QV·nsplit weights in
  // the block's key buffer.
  cps = max(max(cps, 1), kv_ceil_div(chunks, kDecMaxSplit));
  return {cps, kv_ceil_div(chunks, cps)};
}

// stage_rows copies cnt ≤ ROWS gathered head rows (slots sl[e], kv head kh)
// of a cache into dst[e·ld + d], rotating keys (inv != nullptr) at position
// j0+e. All of a thread's loads are issued before its first store (a loop of
// load-then-store waits one memory round trip per iteration: that was most
// of the first decode kernel's time).
template <int NT, int ROWS, int HSMAX>
__device__ __forceinline__ void stage_rows(float *dst, int ld, const float *__restrict__ cache, const int *sl,
                                           int cnt, int j0, int NKV, int kh, int HS, const float *inv, int tid) {
  if (inv) {
    constexpr int PER = (ROWS * HSMAX / 2 + NT - 1) / NT;
    const int h = HS / 2, n = cnt * h;
    float x1[PER], x2[PER];
#pragma unroll
    for (int p = 0; p < PER; p++) {
      const int idx = tid + p * NT, e = idx / h, i = idx % h;
      const float *row = cache + ((size_t)(idx < n ? sl[e] : 0) * NKV + kh) * HS;
      x1[p] = idx < n ? row[i] : 0.f;
      x2[p] = idx < n ? row[i + h] : 0.f;
    }
#pragma unroll
    for (int p = 0; p < PER; p++) {
      const int idx = tid + p * NT, e = idx / h, i = idx % h;
      if (idx < n) {
        float sn, cs;
        sincosf((float)(j0 + e) * inv[i], &sn, &cs);
        dst[e * ld + i] = x1[p] * cs - x2[p] * sn;
        dst[e * ld + i + h] = x2[p] * cs + x1[p] * sn;
      }
    }
  } else {
    constexpr int PER = (ROWS * HSMAX + NT - 1) / NT;
    const int n = cnt * HS;
    float v[PER];
#pragma unroll
    for (int p = 0; p < PER; p++) {
      const int idx = tid + p * NT, e = idx / HS, d = idx % HS;
      v[p] = idx < n ? cache[((size_t)sl[e] * NKV + kh) * HS + d] : 0.f;
    }
#pragma unroll
    for (int p = 0; p < PER; p++) {
      const int idx = tid + p * NT, e = idx / HS, d = idx % HS;
      if (idx < n) dst[e * ld + d] = v[p];
    }
  }
}

// stage_q copies the block's query rows to shared memory, loads first.
template <int NT, int ROWS, int HSMAX>
__device__ __forceinline__ void stage_q(float *dst, int ld, int nrows, int HS, const float *__restrict__ q,
                                        size_t row0, int q_stride, int h_off, int G, int T, int tid,
                                        bool heads_in_rows) {
  constexpr int PER = (ROWS * HSMAX + NT - 1) / NT;
  float v[PER];
#pragma unroll
  for (int p = 0; p < PER; p++) {
    const int idx = tid + p * NT, r = idx / HS, d = idx % HS;
    float x = 0.f;
    if (idx < nrows * HS) {
      // Decode: row r = (t, g) of query head h_off + g; prefill: row r = query t of head h_off.
      const int t = heads_in_rows ? r / G : r, g = heads_in_rows ? r % G : 0;
      if (t < T) x = q[(row0 + t) * q_stride + (size_t)(h_off + g) * HS + d];
    }
    v[p] = x;
  }
#pragma unroll
  for (int p = 0; p < PER; p++) {
    const int idx = tid + p * NT, r = idx / HS, d = idx % HS;
    if (idx < nrows * HS) dst[r * ld + d] = v[p];
  }
}

// attn_decode_kernel_v1: grid (split, kv head, sequence). QV = T·G query
// vectors (t, g) share the block; qv = t·G + g, query head kh·G + g.
// Without a workspace (gridDim.x == 1) it writes the normalised output;
// otherwise the unnormalised partial o, running max m and sum l of its split
// to work[((b·T + t)·NH + h)·nsplit + split][HS + 2].
template <int HSMAX>
__global__ void __launch_bounds__(kDecThreads)
    attn_decode_kernel_v1(float *__restrict__ out, const float *__restrict__ q, const float *__restrict__ kc,
                          const float *__restrict__ vc, const int32_t *__restrict__ order,
                          const int32_t *__restrict__ lens, int T, int NH, int NKV, int HS, int q_stride,
                          int max_len, float rope_theta, RopeFreqs freqs, float scale, int chunks_per_split,
                          float *__restrict__ work) {
  constexpr int OPT = kDecMaxQ * HSMAX / kDecThreads;  // output elements per thread
  __shared__ float qs[kDecMaxQ][HSMAX];
  __shared__ float ks[kDecCh][HSMAX + 1];  // +1: the per-entry dot products read rows conflict-free
  __shared__ float vs[kDecCh][HSMAX];
  __shared__ float ps[kDecMaxQ][kDecCh];
  __shared__ float m_run[kDecMaxQ], l_run[kDecMaxQ], alpha[kDecMaxQ];
  __shared__ float inv_s[HSMAX / 2];
  __shared__ int sl[kDecCh];

  const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int G = NH / NKV, QV = T * G;
  const int n_total = min(lens[b], max_len);  // the last query sees entries [0, n_total)
  const int j_begin = split * chunks_per_split * kDecCh;
  const int j_end = min(n_total, j_begin + chunks_per_split * kDecCh);
  const bool partial = gridDim.x > 1;
  // Splits past the sequence's length do nothing: the combine kernel reads
  // only the splits below lens[b]. Unsplit, the block must still write zeros.
  if (partial && j_begin >= n_total) return;

  for (int idx = tid; idx < QV * HS; idx += kDecThreads) {
    const int qv = idx / HS, d = idx % HS, t = qv / G, g = qv % G;
    qs[qv][d] = q[((size_t)b * T + t) * q_stride + (size_t)(kh * G + g) * HS + d];
  }
  if (rope_theta != 0.f)
    for (int i = tid; i < HS / 2; i += kDecThreads) inv_s[i] = freqs.v[i];
  if (tid < kDecMaxQ) {
    m_run[tid] = -INFINITY;
    l_run[tid] = 0.f;
  }
  float o[OPT];
#pragma unroll
  for (int k = 0; k < OPT; k++) o[k] = 0.f;
  const float *inv = rope_theta != 0.f ? inv_s : nullptr;

  for (int j0 = j_begin; j0 < j_end; j0 += kDecCh) {
    const int cnt = min(kDecCh, j_end - j0);
    __syncthreads();  // previous chunk fully consumed (and q/inv staged on the first pass)
    if (tid < cnt) sl[tid] = order[(size_t)b * max_len + j0 + tid];
    __syncthreads();
    stage_rows<kDecThreads, kDecCh, HSMAX>(&ks[0][0], HSMAX + 1, kc, sl, cnt, j0, NKV, kh, HS, inv, tid);
    stage_rows<kDecThreads, kDecCh, HSMAX>(&vs[0][0], HSMAX, vc, sl, cnt, j0, NKV, kh, HS, nullptr, tid);
    __syncthreads();

    // Scores: one (query vector, entry) pair per thread and step.
    for (int idx = tid; idx < QV * kDecCh; idx += kDecThreads) {
      const int qv = idx / kDecCh, e = idx % kDecCh, t = qv / G;
      float s = -INFINITY;
      if (e < cnt && j0 + e <= n_total - T + t) {
        float acc = 0.f;
        for (int d = 0; d < HS; d++) acc = fmaf(qs[qv][d], ks[e][d], acc);
        s = acc * scale;
      }
      ps[qv][e] = s;
    }
    __syncthreads();

    // Online softmax, one warp per query vector.
    for (int qv = tid / 32; qv < QV; qv += kDecThreads / 32) {
      const int lane = tid % 32;
      const float s = lane < kDecCh ? ps[qv][lane] : -INFINITY;
      const float m_new = fmaxf(m_run[qv], kv_warp_max(s));
      const float p = (s == -INFINITY) ? 0.f : expf(s - m_new);
      const float sum = kv_warp_sum(p);
      if (lane < kDecCh) ps[qv][lane] = p;
      if (lane == 0) {
        // m_run = −∞ means nothing seen yet (l and o are 0): any factor works, avoid ∞−∞.
        const float a = m_run[qv] == -INFINITY ? 0.f : expf(m_run[qv] - m_new);
        alpha[qv] = a;
        l_run[qv] = l_run[qv] * a + sum;
        m_run[qv] = m_new;
      }
    }
    __syncthreads();

#pragma unroll
    for (int k = 0; k < OPT; k++) {
      const int idx = tid + k * kDecThreads, qv = idx / HS, d = idx % HS;
      if (qv < QV) {
        float acc = o[k] * alpha[qv];
        for (int e = 0; e < cnt; e++) acc = fmaf(ps[qv][e], vs[e][d], acc);
        o[k] = acc;
      }
    }
  }
  __syncthreads();  // m_run/l_run final

#pragma unroll
  for (int k = 0; k < OPT; k++) {
    const int idx = tid + k * kDecThreads, qv = idx / HS, d = idx % HS;
    if (qv >= QV) continue;
    const int t = qv / G, h = kh * G + qv % G;
    const size_t row = (size_t)b * T + t;
    if (!partial) {
      const float l = l_run[qv];
      out[row * NH * HS + (size_t)h * HS + d] = l > 0.f ? o[k] / l : 0.f;
    } else {
      float *w = work + ((row * NH + h) * gridDim.x + split) * (HS + 2);
      w[d] = o[k];
      if (d == 0) {
        w[HS] = m_run[qv];
        w[HS + 1] = l_run[qv];
      }
    }
  }
}

// attn_decode_kernel_v2: v1 with the combine fused in (one launch per
// attention instead of two: at these sizes a launch costs more than the
// work) and the latency chain shortened:
//  - the chunk's slot numbers load together with lens (order is in bounds for
//    every j < max_len; only the K/V gathers need the length), so a chunk
//    costs two dependent memory round trips, not three;
//  - dot products unrolled over independent partial sums;
//  - splits publish (o, m, l) to work, count themselves on a per-(b, kv head)
//    counter, and the last one merges every split's partials (all loads
//    issued at once, not a loop of dependent ones as v1's combine) and
//    resets the counter for the next launch (work must start zeroed).
template <int HSMAX>
__global__ void __launch_bounds__(kDecThreads)
    attn_decode_kernel_v2(float *__restrict__ out, const float *__restrict__ q, const float *__restrict__ kc,
                          const float *__restrict__ vc, const int32_t *__restrict__ order,
                          const int32_t *__restrict__ lens, int T, int NH, int NKV, int HS, int q_stride,
                          int max_len, float rope_theta, RopeFreqs freqs, float scale, int chunks_per_split,
                          float *__restrict__ work, int *__restrict__ counters) {
  constexpr int OPT = kDecMaxQ * HSMAX / kDecThreads;
  __shared__ float qs[kDecMaxQ][HSMAX];
  __shared__ float ks[kDecCh][HSMAX + 1];
  __shared__ float vs[kDecCh][HSMAX];
  __shared__ float ps[kDecMaxQ][kDecCh];
  __shared__ float m_run[kDecMaxQ], l_run[kDecMaxQ], alpha[kDecMaxQ];
  __shared__ float inv_s[HSMAX / 2];
  __shared__ int sl[kDecCh];
  __shared__ int is_last;
  static_assert(kDecMaxQ * kDecMaxSplit <= kDecCh * HSMAX, "combine staging must fit the key/value buffers");

  const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int G = NH / NKV, QV = T * G;
  const int split_len = chunks_per_split * kDecCh;
  const int j_begin = split * split_len;
  // Speculative: slots of the first chunk, before the length is known.
  if (tid < kDecCh && j_begin + tid < max_len) sl[tid] = order[(size_t)b * max_len + j_begin + tid];
  const int n_total = max(0, min(lens[b], max_len));  // the last query sees entries [0, n_total)
  const int j_end = min(n_total, j_begin + split_len);
  const bool partial = gridDim.x > 1;
  // Splits that run: those starting below n_total, and split 0 always (so
  // that an empty sequence still writes its zeros).
  const int used = max(1, min((int)gridDim.x, (n_total + split_len - 1) / split_len));
  if (split >= used) return;

  stage_q<kDecThreads, kDecMaxQ, HSMAX>(&qs[0][0], HSMAX, QV, HS, q, (size_t)b * T, q_stride, kh * G, G, T, tid,
                                        true);
  if (rope_theta != 0.f)
    for (int i = tid; i < HS / 2; i += kDecThreads) inv_s[i] = freqs.v[i];
  if (tid < kDecMaxQ) {
    m_run[tid] = -INFINITY;
    l_run[tid] = 0.f;
  }
  float o[OPT];
#pragma unroll
  for (int k = 0; k < OPT; k++) o[k] = 0.f;
  const float *inv = rope_theta != 0.f ? inv_s : nullptr;

  for (int j0 = j_begin; j0 < j_end; j0 += kDecCh) {
    const int cnt = min(kDecCh, j_end - j0);
    if (j0 != j_begin) {
      __syncthreads();  // previous chunk consumed
      if (tid < cnt) sl[tid] = order[(size_t)b * max_len + j0 + tid];
    }
    __syncthreads();
    stage_rows<kDecThreads, kDecCh, HSMAX>(&ks[0][0], HSMAX + 1, kc, sl, cnt, j0, NKV, kh, HS, inv, tid);
    stage_rows<kDecThreads, kDecCh, HSMAX>(&vs[0][0], HSMAX, vc, sl, cnt, j0, NKV, kh, HS, nullptr, tid);
    __syncthreads();

    for (int idx = tid; idx < QV * kDecCh; idx += kDecThreads) {
      const int qv = idx / kDecCh, e = idx % kDecCh, t = qv / G;
      float s = -INFINITY;
      if (e < cnt && j0 + e <= n_total - T + t) {
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        int d = 0;
        for (; d + 4 <= HS; d += 4) {
          a0 = fmaf(qs[qv][d], ks[e][d], a0);
          a1 = fmaf(qs[qv][d + 1], ks[e][d + 1], a1);
          a2 = fmaf(qs[qv][d + 2], ks[e][d + 2], a2);
          a3 = fmaf(qs[qv][d + 3], ks[e][d + 3], a3);
        }
        for (; d < HS; d++) a0 = fmaf(qs[qv][d], ks[e][d], a0);
        s = ((a0 + a1) + (a2 + a3)) * scale;
      }
      ps[qv][e] = s;
    }
    __syncthreads();

    for (int qv = tid / 32; qv < QV; qv += kDecThreads / 32) {
      const int lane = tid % 32;
      const float s = ps[qv][lane];
      const float m_new = fmaxf(m_run[qv], kv_warp_max(s));
      const float p = (s == -INFINITY) ? 0.f : expf(s - m_new);
      const float sum = kv_warp_sum(p);
      ps[qv][lane] = p;
      if (lane == 0) {
        const float a = m_run[qv] == -INFINITY ? 0.f : expf(m_run[qv] - m_new);
        alpha[qv] = a;
        l_run[qv] = l_run[qv] * a + sum;
        m_run[qv] = m_new;
      }
    }
    __syncthreads();

#pragma unroll
    for (int k = 0; k < OPT; k++) {
      const int idx = tid + k * kDecThreads, qv = idx / HS, d = idx % HS;
      if (qv < QV) {
        float a0 = 0.f, a1 = 0.f;
        int e = 0;
        for (; e + 2 <= cnt; e += 2) {
          a0 = fmaf(ps[qv][e], vs[e][d], a0);
          a1 = fmaf(ps[qv][e + 1], vs[e + 1][d], a1);
        }
        if (e < cnt) a0 = fmaf(ps[qv][e], vs[e][d], a0);
        o[k] = o[k] * alpha[qv] + (a0 + a1);
      }
    }
  }
  __syncthreads();  // m_run/l_run final

  if (!partial) {
#pragma unroll
    for (int k = 0; k < OPT; k++) {
      const int idx = tid + k * kDecThreads, qv = idx / HS, d = idx % HS;
      if (qv >= QV) continue;
      const int t = qv / G, h = kh * G + qv % G;
      const float l = l_run[qv];
      out[((size_t)b * T + t) * NH * HS + (size_t)h * HS + d] = l > 0.f ? o[k] / l : 0.f;
    }
    return;
  }

  // Publish this split's partials: work[((b·T + t)·NH + h)·nsplit + split][HS + 2].
  const int nsplit = gridDim.x;
#pragma unroll
  for (int k = 0; k < OPT; k++) {
    const int idx = tid + k * kDecThreads, qv = idx / HS, d = idx % HS;
    if (qv >= QV) continue;
    const int t = qv / G, h = kh * G + qv % G;
    float *w = work + ((((size_t)b * T + t) * NH + h) * nsplit + split) * (HS + 2);
    w[d] = o[k];
    if (d == 0) {
      w[HS] = m_run[qv];
      w[HS + 1] = l_run[qv];
    }
  }
  __threadfence();  // partials visible device-wide before the count
  __syncthreads();
  int *counter = counters + (size_t)b * NKV + kh;
  if (tid == 0) is_last = atomicAdd(counter, 1) == used - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // Last split: merge. Weights exp(m_s − M) per (query vector, split) go in
  // the key buffer, the partial sums l_s in the value buffer.
  float *wt = &ks[0][0], *ls = &vs[0][0];
  {
    constexpr int PER = kDecMaxQ * kDecMaxSplit / kDecThreads;
    float mv[PER], lv[PER];
#pragma unroll
    for (int p = 0; p < PER; p++) {  // all loads first, then the stores
      const int idx = tid + p * kDecThreads, qv = idx / used, sp = idx % used, t = qv / G, h = kh * G + qv % G;
      const float *w = work + ((((size_t)b * T + t) * NH + h) * nsplit + sp) * (HS + 2);
      mv[p] = idx < QV * used ? __ldcg(w + HS) : 0.f;
      lv[p] = idx < QV * used ? __ldcg(w + HS + 1) : 0.f;
    }
#pragma unroll
    for (int p = 0; p < PER; p++) {
      const int idx = tid + p * kDecThreads;
      if (idx < QV * used) {
        wt[idx] = mv[p];
        ls[idx] = lv[p];
      }
    }
  }
  __syncthreads();
  for (int qv = tid / 32; qv < QV; qv += kDecThreads / 32) {
    const int lane = tid % 32;
    float m = -INFINITY;
    for (int sp = lane; sp < used; sp += 32) m = fmaxf(m, wt[qv * used + sp]);
    m = kv_warp_max(m);
    float l = 0.f;
    for (int sp = lane; sp < used; sp += 32) {
      const float ms = wt[qv * used + sp];
      const float f = (ms == -INFINITY) ? 0.f : expf(ms - m);  // −∞: no visible entry in that split
      wt[qv * used + sp] = f;
      l += f * ls[qv * used + sp];
    }
    l = kv_warp_sum(l);
    if (lane == 0) l_run[qv] = l;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < OPT; k++) {
    const int idx = tid + k * kDecThreads, qv = idx / HS, d = idx % HS;
    if (qv >= QV) continue;
    const int t = qv / G, h = kh * G + qv % G;
    const size_t row = (size_t)b * T + t;
    const float *w = work + (row * NH + h) * nsplit * (HS + 2) + d;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int sp = 0;
    for (; sp + 4 <= used; sp += 4) {
      a0 = fmaf(wt[qv * used + sp], __ldcg(w + (size_t)sp * (HS + 2)), a0);
      a1 = fmaf(wt[qv * used + sp + 1], __ldcg(w + (size_t)(sp + 1) * (HS + 2)), a1);
      a2 = fmaf(wt[qv * used + sp + 2], __ldcg(w + (size_t)(sp + 2) * (HS + 2)), a2);
      a3 = fmaf(wt[qv * used + sp + 3], __ldcg(w + (size_t)(sp + 3) * (HS + 2)), a3);
    }
    for (; sp < used; sp++) a0 = fmaf(wt[qv * used + sp], __ldcg(w + (size_t)sp * (HS + 2)), a0);
    const float l = l_run[qv];
    out[row * NH * HS + (size_t)h * HS + d] = l > 0.f ? ((a0 + a1) + (a2 + a3)) / l : 0.f;
  }
  if (tid == 0) *counter = 0;  // ready for the next launch (a captured graph replays it)
}

// attn_combine_kernel_v1: one block per (row, head) merges the partials of
// the splits that ran (those starting below lens[b]).
__global__ void __launch_bounds__(kMaxHS)
    attn_combine_kernel_v1(float *__restrict__ out, const float *__restrict__ work,
                           const int32_t *__restrict__ lens, int T, int NH, int HS, int max_len, int nsplit,
                           int split_len) {
  const int rh = blockIdx.x, h = rh % NH, row = rh / NH, b = row / T, d = threadIdx.x;
  const int n_total = min(lens[b], max_len);
  const int used = min(nsplit, (max(n_total, 0) + split_len - 1) / split_len);
  const float *w = work + (size_t)rh * nsplit * (HS + 2);
  float m = -INFINITY;
  for (int s = 0; s < used; s++) m = fmaxf(m, w[s * (HS + 2) + HS]);
  float l = 0.f, acc = 0.f;
  if (m != -INFINITY) {
    for (int s = 0; s < used; s++) {
      const float ms = w[s * (HS + 2) + HS];
      if (ms == -INFINITY) continue;  // no visible entry in that split
      const float f = expf(ms - m);
      l += w[s * (HS + 2) + HS + 1] * f;
      if (d < HS) acc += w[s * (HS + 2) + d] * f;
    }
  }
  if (d < HS) out[(size_t)row * NH * HS + (size_t)h * HS + d] = l > 0.f ? acc / l : 0.f;
}

// ---- decode kernel v3 (variant 4, the default for decoding) ----
//
// attn_decode_kernel_v3: v2's structure (one block per key split, kv head and
// sequence; the last split merges) with the per-chunk latency chain cut
// further and all 256 threads busy:
//  - chunks of CH = 64 entries (32 for HS > 64), one chunk per split at the
//    usual lengths (≤ 256: 4 splits × NKV × B blocks), so a block does one
//    pass: slots (loaded together with lens and q) → K/V rows → scores →
//    softmax → P·V → partials;
//  - K/V rows gathered with 16-byte loads, all of a thread's loads issued
//    before the first store (keys rotated as they land, pairs (i, i+HS/2)
//    loaded as two float4);
//  - scores: 4 lanes per (query vector, entry) pair, interleaved dims
//    (key rows padded by 4 floats: the 8 entries × 4 lanes of a warp hit 32
//    distinct banks), two shuffles to finish;
//  - P·V: NSUB = 256 / (QV·HS) threads per output (the entries dealt
//    round-robin), summed through shared memory at the end.
// VEC: HS % 8 == 0 and 16-byte aligned caches; else the scalar staging.
constexpr int kD3Threads = 256;
constexpr int kD3TargetBlocks = 264;  // ≈ 2 per SM

__host__ __device__ constexpr int d3_chunk(int hsmax) { return hsmax > 64 ? 32 : 64; }

DecodeSplit decode_split_v3(int B, int NKV, int max_len, int HS) {
  const int ch = d3_chunk(HS > 64 ? kMaxHS : 64);
  const int chunks = kv_ceil_div(max(max_len, 1), ch);
  const long long want = (long long)chunks * B * NKV;
  int cps = (int)((want + kD3TargetBlocks - 1) / kD3TargetBlocks);
  cps = max(max(cps, 1), kv_ceil_div(chunks, kDecMaxSplit));
  return {cps, kv_ceil_div(chunks, cps)};
}

template <int NT, int CH, int HSMAX>
__device__ __forceinline__ void stage_rows_vec(float *ks, int ldk, float *vs, int ldv, const float *__restrict__ kc,
                                               const float *__restrict__ vc, const int *sl, int cnt, int j0, int NKV,
                                               int kh, int HS, const float *inv, int tid) {
  const int q4 = HS / 4;  // float4s per row
  constexpr int PV = CH * HSMAX / 4 / NT;
  float4 v[PV];
#pragma unroll
  for (int p = 0; p < PV; p++) {
    const int idx = tid + p * NT, e = idx / q4, c = idx % q4;
    v[p] = idx < cnt * q4
               ? __ldcg(reinterpret_cast<const float4 *>(vc + ((size_t)sl[e] * NKV + kh) * HS) + c)
               : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (inv) {
    const int h4 = HS / 8;  // float4s per half row
    constexpr int PK = CH * HSMAX / 8 / NT;
    float4 x1[PK], x2[PK];
#pragma unroll
    for (int p = 0; p < PK; p++) {
      const int idx = tid + p * NT, e = idx / h4, c = idx % h4;
      const float4 *row = reinterpret_cast<const float4 *>(kc + ((size_t)(idx < cnt * h4 ? sl[e] : 0) * NKV + kh) * HS);
      x1[p] = idx < cnt * h4 ? __ldcg(row + c) : make_float4(0.f, 0.f, 0.f, 0.f);
      x2[p] = idx < cnt * h4 ? __ldcg(row + c + h4) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int p = 0; p < PK; p++) {
      const int idx = tid + p * NT, e = idx / h4, c = idx % h4;
      if (idx < cnt * h4) {
        const float a1[4] = {x1[p].x, x1[p].y, x1[p].z, x1[p].w}, a2[4] = {x2[p].x, x2[p].y, x2[p].z, x2[p].w};
        float r1[4], r2[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
          float sn, cs;
          sincosf((float)(j0 + e) * inv[c * 4 + u], &sn, &cs);
          r1[u] = a1[u] * cs - a2[u] * sn;
          r2[u] = a2[u] * cs + a1[u] * sn;
        }
        *reinterpret_cast<float4 *>(ks + e * ldk + c * 4) = make_float4(r1[0], r1[1], r1[2], r1[3]);
        *reinterpret_cast<float4 *>(ks + e * ldk + HS / 2 + c * 4) = make_float4(r2[0], r2[1], r2[2], r2[3]);
      }
    }
  } else {
    constexpr int PK = CH * HSMAX / 4 / NT;
    float4 x[PK];
#pragma unroll
    for (int p = 0; p < PK; p++) {
      const int idx = tid + p * NT, e = idx / q4, c = idx % q4;
      x[p] = idx < cnt * q4
                 ? __ldcg(reinterpret_cast<const float4 *>(kc + ((size_t)sl[e] * NKV + kh) * HS) + c)
                 : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int p = 0; p < PK; p++) {
      const int idx = tid + p * NT, e = idx / q4, c = idx % q4;
      if (idx < cnt * q4) *reinterpret_cast<float4 *>(ks + e * ldk + c * 4) = x[p];
    }
  }
#pragma unroll
  for (int p = 0; p < PV; p++) {
    const int idx = tid + p * NT, e = idx / q4, c = idx % q4;
    if (idx < cnt * q4) *reinterpret_cast<float4 *>(vs + e * ldv + c * 4) = v[p];
  }
}

template <int HSMAX, bool VEC>
__global__ void __launch_bounds__(kD3Threads)
    attn_decode_kernel_v3(float *__restrict__ out, const float *__restrict__ q, const float *__restrict__ kc,
                          const float *__restrict__ vc, const int32_t *__restrict__ order,
                          const int32_t *__restrict__ lens, int T, int NH, int NKV, int HS, int q_stride,
                          int max_len, float rope_theta, RopeFreqs freqs, float scale, int chunks_per_split,
                          float *__restrict__ work, int *__restrict__ counters) {
  constexpr int NT = kD3Threads, CH = d3_chunk(HSMAX), LDK = HSMAX + 4, LDV = HSMAX + 4;
  constexpr int OPT = kDecMaxQ * HSMAX / NT;  // (output, sub) pairs per thread at most
  static_assert(kDecMaxQ * HSMAX <= CH * LDK, "the sub reduction reuses the key buffer");
  static_assert(kDecMaxQ * kDecMaxSplit <= CH * LDK && kDecMaxQ * kDecMaxSplit <= CH * LDV,
                "the merge stages its weights in K/V");
  __shared__ __align__(16) float qs[kDecMaxQ][HSMAX];
  __shared__ __align__(16) float ks[CH * LDK];
  __shared__ __align__(16) float vs[CH * LDV];
  __shared__ float ps[kDecMaxQ][CH];
  __shared__ float m_run[kDecMaxQ], l_run[kDecMaxQ], alpha[kDecMaxQ];
  __shared__ float inv_s[HSMAX / 2];
  __shared__ int sl[CH];
  __shared__ int is_last;

  const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int G = NH / NKV, QV = T * G, QVHS = QV * HS;
  const int NSUB = max(1, NT / QVHS);
  const int split_len = chunks_per_split * CH;
  const int j_begin = split * split_len;
  // Speculative: slots of the first chunk, before the length is known.
  if (tid < CH && j_begin + tid < max_len) sl[tid] = order[(size_t)b * max_len + j_begin + tid];
  const int n_total = max(0, min(lens[b], max_len));
  const int j_end = min(n_total, j_begin + split_len);
  const bool partial = gridDim.x > 1;
  const int used = max(1, min((int)gridDim.x, (n_total + split_len - 1) / split_len));
  if (split >= used) return;

  stage_q<NT, kDecMaxQ, HSMAX>(&qs[0][0], HSMAX, QV, HS, q, (size_t)b * T, q_stride, kh * G, G, T, tid, true);
  if (rope_theta != 0.f)
    for (int i = tid; i < HS / 2; i += NT) inv_s[i] = freqs.v[i];
  if (tid < kDecMaxQ) {
    m_run[tid] = -INFINITY;
    l_run[tid] = 0.f;
  }
  float o[OPT];
#pragma unroll
  for (int k = 0; k < OPT; k++) o[k] = 0.f;
  const float *inv = rope_theta != 0.f ? inv_s : nullptr;

  for (int j0 = j_begin; j0 < j_end; j0 += CH) {
    const int cnt = min(CH, j_end - j0);
    if (j0 != j_begin) {
      __syncthreads();  // previous chunk consumed
      if (tid < cnt) sl[tid] = order[(size_t)b * max_len + j0 + tid];
    }
    __syncthreads();  // slots (and q, inv on the first pass) staged
    if (VEC)
      stage_rows_vec<NT, CH, HSMAX>(ks, LDK, vs, LDV, kc, vc, sl, cnt, j0, NKV, kh, HS, inv, tid);
    else {
      stage_rows<NT, CH, HSMAX>(ks, LDK, kc, sl, cnt, j0, NKV, kh, HS, inv, tid);
      stage_rows<NT, CH, HSMAX>(vs, LDV, vc, sl, cnt, j0, NKV, kh, HS, nullptr, tid);
    }
    __syncthreads();

    // Scores: 4 lanes per (qv, e), lane sub takes dims sub, sub+4, ….
    {
      const int sub = tid & 3;
      for (int pr = tid >> 2; pr < QV * CH; pr += NT / 4) {
        const int qv = pr / CH, e = pr % CH, t = qv / G;
        const float *kr = ks + e * LDK, *qr = qs[qv];
        float a0 = 0.f, a1 = 0.f;
        int d = sub;
        for (; d + 4 < HS; d += 8) {
          a0 = fmaf(qr[d], kr[d], a0);
          a1 = fmaf(qr[d + 4], kr[d + 4], a1);
        }
        if (d < HS) a0 = fmaf(qr[d], kr[d], a0);
        float s = a0 + a1;
        s += __shfl_xor_sync(KV_FULL_MASK, s, 1);
        s += __shfl_xor_sync(KV_FULL_MASK, s, 2);
        if (sub == 0) ps[qv][e] = (e < cnt && j0 + e <= n_total - T + t) ? s * scale : -INFINITY;
      }
    }
    __syncthreads();

    for (int qv = tid / 32; qv < QV; qv += NT / 32) {
      const int lane = tid % 32;
      float s[CH / 32];
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < CH / 32; u++) {
        s[u] = ps[qv][lane + 32 * u];
        mx = fmaxf(mx, s[u]);
      }
      const float m_old = m_run[qv];
      const float m_new = fmaxf(m_old, kv_warp_max(mx));
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < CH / 32; u++) {
        const float p = s[u] == -INFINITY ? 0.f : expf(s[u] - m_new);
        ps[qv][lane + 32 * u] = p;
        sum += p;
      }
      sum = kv_warp_sum(sum);
      if (lane == 0) {
        const float a = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
        alpha[qv] = a;
        l_run[qv] = l_run[qv] * a + sum;
        m_run[qv] = m_new;
      }
    }
    __syncthreads();

#pragma unroll
    for (int k = 0; k < OPT; k++) {
      const int idx = tid + k * NT;
      if (idx < NSUB * QVHS) {
        const int oi = idx % QVHS, sub = idx / QVHS, qv = oi / HS, d = oi % HS;
        float a0 = 0.f, a1 = 0.f;
        int e = sub;
        for (; e + NSUB < cnt; e += 2 * NSUB) {
          a0 = fmaf(ps[qv][e], vs[e * LDV + d], a0);
          a1 = fmaf(ps[qv][e + NSUB], vs[(e + NSUB) * LDV + d], a1);
        }
        if (e < cnt) a0 = fmaf(ps[qv][e], vs[e * LDV + d], a0);
        o[k] = o[k] * alpha[qv] + (a0 + a1);
      }
    }
  }
  __syncthreads();  // K/V consumed, m_run/l_run final

  // Sum the subs' partial outputs: red[sub·QVHS + oi].
  float *red = ks;
#pragma unroll
  for (int k = 0; k < OPT; k++) {
    const int idx = tid + k * NT;
    if (idx < NSUB * QVHS) red[idx] = o[k];
  }
  __syncthreads();

  if (!partial) {
    for (int oi = tid; oi < QVHS; oi += NT) {
      float v = 0.f;
      for (int sb = 0; sb < NSUB; sb++) v += red[sb * QVHS + oi];
      const int qv = oi / HS, d = oi % HS, t = qv / G, h = kh * G + qv % G;
      const float l = l_run[qv];
      out[((size_t)b * T + t) * NH * HS + (size_t)h * HS + d] = l > 0.f ? v / l : 0.f;
    }
    return;
  }

  // Publish this split's partials: work[((b·T + t)·NH + h)·nsplit + split][HS + 2].
  const int nsplit = gridDim.x;
  for (int oi = tid; oi < QVHS; oi += NT) {
    float v = 0.f;
    for (int sb = 0; sb < NSUB; sb++) v += red[sb * QVHS + oi];
    const int qv = oi / HS, d = oi % HS, t = qv / G, h = kh * G + qv % G;
    float *w = work + ((((size_t)b * T + t) * NH + h) * nsplit + split) * (HS + 2);
    w[d] = v;
    if (d == 0) {
      w[HS] = m_run[qv];
      w[HS + 1] = l_run[qv];
    }
  }
  __threadfence();
  __syncthreads();
  int *counter = counters + (size_t)b * NKV + kh;
  if (tid == 0) is_last = atomicAdd(counter, 1) == used - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // Last split: merge (weights exp(m_s − M) in ks, partial sums l_s in vs).
  float *wt = ks, *ls = vs;
  {
    constexpr int PER = kDecMaxQ * kDecMaxSplit / NT;
    float mv[PER], lv[PER];
#pragma unroll
    for (int p = 0; p < PER; p++) {
      const int idx = tid + p * NT, qv = idx / used, sp = idx % used, t = qv / G, h = kh * G + qv % G;
      const bool ok = idx < QV * used;
      const float *w = work + ((((size_t)b * T + t) * NH + h) * nsplit + (ok ? sp : 0)) * (HS + 2);
      mv[p] = ok ? __ldcg(w + HS) : 0.f;
      lv[p] = ok ? __ldcg(w + HS + 1) : 0.f;
    }
#pragma unroll
    for (int p = 0; p < PER; p++) {
      const int idx = tid + p * NT;
      if (idx < QV * used) {
        wt[idx] = mv[p];
        ls[idx] = lv[p];
      }
    }
  }
  __syncthreads();
  for (int qv = tid / 32; qv < QV; qv += NT / 32) {
    const int lane = tid % 32;
    float m = -INFINITY;
    for (int sp = lane; sp < used; sp += 32) m = fmaxf(m, wt[qv * used + sp]);
    m = kv_warp_max(m);
    float l = 0.f;
    for (int sp = lane; sp < used; sp += 32) {
      const float ms = wt[qv * used + sp];
      const float f = (ms == -INFINITY) ? 0.f : expf(ms - m);
      wt[qv * used + sp] = f;
      l += f * ls[qv * used + sp];
    }
    l = kv_warp_sum(l);
    if (lane == 0) l_run[qv] = l;
  }
  __syncthreads();
  for (int oi = tid; oi < QVHS; oi += NT) {
    const int qv = oi / HS, d = oi % HS, t = qv / G, h = kh * G + qv % G;
    const size_t row = (size_t)b * T + t;
    const float *w = work + (row * NH + h) * nsplit * (HS + 2) + d;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int sp = 0;
    for (; sp + 4 <= used; sp += 4) {
      a0 = fmaf(wt[qv * used + sp], __ldcg(w + (size_t)sp * (HS + 2)), a0);
      a1 = fmaf(wt[qv * used + sp + 1], __ldcg(w + (size_t)(sp + 1) * (HS + 2)), a1);
      a2 = fmaf(wt[qv * used + sp + 2], __ldcg(w + (size_t)(sp + 2) * (HS + 2)), a2);
      a3 = fmaf(wt[qv * used + sp + 3], __ldcg(w + (size_t)(sp + 3) * (HS + 2)), a3);
    }
    for (; sp < used; sp++) a0 = fmaf(wt[qv * used + sp], __ldcg(w + (size_t)sp * (HS + 2)), a0);
    const float l = l_run[qv];
    out[row * NH * HS + (size_t)h * HS + d] = l > 0.f ? ((a0 + a1) + (a2 + a3)) / l : 0.f;
  }
  if (tid == 0) *counter = 0;
}

// ---- decode kernel v4 (variant 6, the default for short decodes) ----
//
// attn_decode_kernel_v4: measured, v3's split + last-block merge costs six
// dependent memory round trips (slots, K/V, partials + fence, counter,
// partial (m, l), partial outputs), ~8 µs whatever the length. Here one
// block of 512 threads per (kv head, sequence) takes every entry (lengths up
// to a few hundred), with two round trips: slots, then K/V rows straight
// into registers (no shared staging, no barrier until the end).
// A group of LPK = HS/4 lanes takes one key at a time, lane li holding dims
// 4li..4li+3 of the key, the value and each query vector; the group's
// shuffles finish the dot products. Each group runs its own online softmax
// over the keys gi, gi + NG, … (U keys per batch, all loads first), and one
// barrier-separated pass merges the NG groups' (m, l, o) in shared memory.
// Keys are rotated in registers (the partner half comes by one shuffle).
// Needs HS/4 ∈ {4, 8, 16, 32}, 16-byte aligned caches, T·G ≤ QVM.
constexpr int kD4Threads = 512;

// CS > 1 (variant 8): a thread block cluster of CS blocks shares a (kv head,
// sequence), block r taking the keys of groups r·NG + gi: each SM pulls 1/CS
// of the K/V (one SM's L2 bandwidth bound v4: ~1 µs per 128 KB), and the
// blocks' partials merge through distributed shared memory, no global round
// trip. sm_90 only (the host launches it there). With one query vector a
// cluster a block merges its groups by shuffles within each warp, then its
// warps after one barrier (kWarpMerge; docs/PERF.md, version 22).
//
// NT < 512 (variant 9: 128 threads, clusters of 8): more, smaller blocks,
// each SM taking fewer keys, and the first batch's rotation factors
// (sincosf, ~40 instructions each) computed before the programmatic wait,
// with the K/V gathers, instead of on the critical path after it (512
// threads have no registers to spare for them).
//
// GS > 1 (variant 14: variant 9 with GS = NH/NKV): a kv head's query heads
// are split into GS groups, a block (or cluster) each, so that a block
// carries NH/NKV/GS query vectors instead of all of them; the kv head's
// keys and values are then read GS times (the repeats from L2).
//
// OP (kv_attention_out; T = 1, a cluster per query head, G = 1): the output
// projection folded in. Each block stages the head's slice of its share of
// wo's rows (OutProj) in dynamic shared memory before the programmatic
// wait; every block stores its partial into every block of the cluster as
// tagged words (kv_tag_store; without OP: into rank 0, then a cluster
// barrier), merges them all once they have landed, and adds its rows'
// products, in fixed point, into acc.
struct OutProj {
  const __half *wo;  // [C, NH·HS] fp16, kv_matmul's weight layout
  long long *acc;    // [B, C] += kv_fix(Σ_d wo[c, h·HS + d]·attn(b, h)[d]) for every head h
  int C;
};

// QKV (kv_attention_block; with OP): the layer's q|k|v product inside the
// clusters too. Each block stages QR = HS/CS rows each of the head's query,
// its kv head's key and value weights before the wait (whole rotation
// pairs: see the staging); after it the block sums the stream and the
// MLP's accumulator, takes its 3·QR products (RMSNorm from each warp's own
// squares), rotates its query pairs (and key pairs when rope_heads > NH)
// at pos and stores them into every block of the cluster as tagged words;
// once they have landed each block holds the head's q and the newest k
// and v, and the newest entry comes from there instead of the cache (one
// cluster per kv head stores it).
struct QKVIn {
  const float *in;       // [B, C] the stream
  const long long *acc;  // [B, C] the previous MLP's accumulator (or null)
  float *sum;            // [B, C] in + unfix(acc), written by one block
  const void *norm_w;
  int norm_f16;
  const __half *w;  // [(NH + 2·NKV)·HS, C]
  const int32_t *pos, *slots;
  float *kc, *vc;   // the caches the newest entry goes to
  int rope_heads;   // heads rotated at pos: NH (keys shifted at attention) or NH + NKV
  float eps;
  int C;
  RopeFreqs pf;  // the frequencies of the rotation at pos
  // EMB: the stream is the embedding wte[tok[b]] (V rows; an id outside
  // them gives NaNs, as kv_embed) instead of in, read before the wait: the
  // first layer's block, a plain launch, embeds the step's token itself.
  const int32_t *tok;
  const void *wte;
  int wte_f16, V;
};

// shfl_xor4: __shfl_xor_sync of each component (the whole warp).
__device__ __forceinline__ float4 shfl_xor4(float4 v, int off) {
  return make_float4(__shfl_xor_sync(KV_FULL_MASK, v.x, off), __shfl_xor_sync(KV_FULL_MASK, v.y, off),
                     __shfl_xor_sync(KV_FULL_MASK, v.z, off), __shfl_xor_sync(KV_FULL_MASK, v.w, off));
}

template <int LPK, int QVM, int U, int CS = 1, int NT = kD4Threads, bool OP = false, bool QKV = false,
          bool EMB = false>
__global__ void __launch_bounds__(NT)
    attn_decode_kernel_v4(float *__restrict__ out, const float *__restrict__ q, const float *__restrict__ kc,
                          const float *__restrict__ vc, const int32_t *__restrict__ order,
                          const int32_t *__restrict__ lens, int T, int NH, int NKV, int q_stride, int max_len,
                          float rope_theta, RopeFreqs freqs, float scale, int GS, OutProj op, QKVIn qi) {
  constexpr int HS = LPK * 4, NG = NT / LPK;
  constexpr bool kPreRot = NT <= 256;  // rotation factors held in registers
  constexpr bool kWarpMerge = CS > 1 && QVM == 1 && NT / 32 <= NG;  // see the merge below
  static_assert(!OP || (CS > 1 && QVM == 1), "the fold takes one query vector a cluster");
  static_assert(!EMB || QKV, "the embedding is the q|k|v product's input");
  __shared__ __align__(16) float so[QVM][NG][HS];
  __shared__ float sm[QVM][NG], sl_[QVM][NG];
  __shared__ float sL[QVM], sMx[QVM];
  const int unit = blockIdx.x / CS, rank = blockIdx.x % CS, b = blockIdx.y, tid = threadIdx.x;
  KV_STAMP_DECL(stp, OP ? 7 : (CS > 1 ? 2 : 6));
  const int kh = unit / GS;  // the kv head; this block takes its query heads h0 … h0 + G − 1
  const int gi = tid / LPK, li = tid % LPK;
  const int gk = rank * NG + gi;  // this group's first key
  constexpr int STEP = NG * CS;   // keys per group step
  const int G = NH / NKV / GS, QV = T * G, h0 = kh * (NH / NKV) + unit % GS * G;
  const int32_t *ord = order + (size_t)b * max_len;

  // Clusters push their partials into rank 0 (below); this barrier phase,
  // arrived at here and waited for before the first remote store, makes
  // sure rank 0 is running by then, off the critical path. OP: the tagged
  // words this block receives (kv_tag_store): QKV, the head's q, k and v
  // rows; every block's partial (o, max, sum), zeroed before the arrive,
  // which every sender waits for before its first store. The arrive comes
  // before any global load: its release is a MEMBAR.ALL.GPU, which at the
  // end of the prologue seemed to wait for the K/V gathers (moved here:
  // −1.6 to −2.1 µs a token at cache 255, docs/PERF.md version 29).
  constexpr int kXQ = QKV ? 3 * HS : 1, kXP = OP ? CS * (HS + 2) : 1;
  __shared__ __align__(8) unsigned long long xq[kXQ], xp[kXP];
  if constexpr (OP) {
#pragma unroll 1
    for (int i = tid; i < kXQ + kXP; i += NT) (i < kXQ ? xq[i] : xp[i - kXQ]) = 0;
  }
  if constexpr (CS > 1) kv_cluster_arrive();
  // OP without QKV (the folded attention after a q|k|v product of its own:
  // the first layer's in decoding before every layer became a block, and
  // --decode-kernel chain3): its only dependent is the MLP kernel, which
  // reads nothing but weights before its wait and lets a next layer's
  // block launch at once. Triggered here, the two launch while this kernel
  // still waits for its q|k|v product (the second layer's block, exposed
  // when triggered after the wait, cost 2.8 µs more than the others;
  // docs/PERF.md version 30).
  constexpr bool kEarlyTrigger = OP && !QKV;
  if constexpr (kEarlyTrigger) kv_pdl_launch_dependents();

  // Round trip 1: the first batch's slots (speculative) and lens, both
  // written by no kernel (copied in before the step).
  int slot[U];
#pragma unroll
  for (int u = 0; u < U; u++) {
    const int j = gk + STEP * u;
    slot[u] = j < max_len ? __ldg(ord + j) : 0;
  }
  const int n_total = max(0, min(lens[b], max_len));
  // Round trip 2 for the first batch, before the programmatic wait (see
  // kv_attention in kvalign.h): the rows of entries before the newest T,
  // which the previous kernel (the one storing this step's keys and values)
  // does not write.
  const int fresh = max(0, n_total - T);
  float4 kr[U], vr[U];
  // QKV: the newest entry's raw q, k and v (3·HS), exchanged in the cluster.
  __shared__ __align__(16) float qkvs[QKV ? 3 * HS : 4];
  auto load_kv = [&](int base, int lo, int hi) {
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int j = base + gk + STEP * u;
      if (j >= lo && j < hi) {
        bool newest = false;  // QKV: the newest entry comes from qkvs
        if constexpr (QKV) {  // (compiled only where qkvs holds it)
          if (j == n_total - 1) {
            kr[u] = *reinterpret_cast<const float4 *>(qkvs + HS + 4 * li);
            vr[u] = *reinterpret_cast<const float4 *>(qkvs + 2 * HS + 4 * li);
            newest = true;
          }
        }
        if (!newest) {
          const size_t off = ((size_t)slot[u] * NKV + kh) * HS + 4 * li;
          kr[u] = __ldcg(reinterpret_cast<const float4 *>(kc + off));
          vr[u] = __ldcg(reinterpret_cast<const float4 *>(vc + off));
        }
      }
    }
  };
#pragma unroll
  for (int u = 0; u < U; u++) kr[u] = vr[u] = make_float4(0.f, 0.f, 0.f, 0.f);
  load_kv(0, 0, fresh);
  // RoPE: this lane's four frequencies (dims 4·(li mod LPK/2) + c of the half).
  const bool rope = rope_theta != 0.f, upper = li >= LPK / 2;
  float inv[4];
#pragma unroll
  for (int c = 0; c < 4; c++) inv[c] = rope ? freqs.v[4 * (li % (LPK / 2)) + c] : 0.f;
  // kPreRot: a batch's rotation factors, for key j = base + gk + STEP·u.
  float rsn[kPreRot ? U : 1][4], rcs[kPreRot ? U : 1][4];
  auto rot_factors = [&](int base) {
    if constexpr (kPreRot) {
      if (rope) {
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
          for (int c = 0; c < 4; c++) {
            const float2 sc = kv_sincos((float)(base + gk + STEP * u) * inv[c]);
            rsn[u][c] = sc.x;
            rcs[u][c] = sc.y;
          }
      }
    }
  };
  rot_factors(0);
  // OP: this block's rows [r0, r0 + nrows) of wo, the head's HS columns,
  // 16-byte chunks (CPR a row), chunk c of row i at i·CPR + (c ^ i mod CPR):
  // the projection's lanes take a row each, and the swizzle spreads a chunk
  // column over the banks.
  extern __shared__ __align__(16) unsigned char wos[];
  constexpr int CPR = HS / 8;
  const int rows_per = OP ? (op.C + CS - 1) / CS : 0;
  const int r0 = rank * rows_per, nrows = OP ? max(0, min(op.C, r0 + rows_per) - r0) : 0;
  if constexpr (OP) {
    const size_t ld = (size_t)NH * HS;
#pragma unroll 1
    for (int i = tid; i < nrows * CPR; i += NT) {
      const int r = i / CPR, c = i % CPR;
      kv_cp_async16_w(wos + 16 * (r * CPR + (c ^ (r & (CPR - 1)))),
                      op.wo + (size_t)(r0 + r) * ld + (size_t)h0 * HS + 8 * c);
    }
    kv_cp_async_commit();
  }
  // QKV: this block's 3·QR rows, in 3·QR/2 pairs: query pair p < QR/2 is
  // dims (r·QR/2 + p, HS/2 + r·QR/2 + p) of the head (r = rank: a rotation
  // pair's two rows in one block, so it rotates them itself), key pairs
  // alike, value pairs any two dims (r·QR + 2p', +1). Local row 2·pair +
  // {0, 1}; a warp takes whole pairs. After wo's rows, then the norm
  // weights as stored.
  constexpr int QR = HS / (CS > 1 ? CS : 1), QH = QR / 2;
  __half *wqs = reinterpret_cast<__half *>(wos + (size_t)rows_per * HS * 2);
  [[maybe_unused]] unsigned char *qnw = reinterpret_cast<unsigned char *>(wqs + (size_t)3 * QR * qi.C);
  // pair_dim: the head dim of local row i (within its section's HS).
  [[maybe_unused]] auto pair_dim = [&](int i) {
    const int pr = i / 2, hi = i % 2;
    if (pr < QR) {  // query or key pair
      const int p = pr % QH;
      return hi * (HS / 2) + rank * QH + p;
    }
    return rank * QR + 2 * (pr - QR) + hi;  // value
  };
  [[maybe_unused]] int pos0 = 0, slot0 = 0;
  if constexpr (QKV) {
    const int c8 = qi.C / 8;
#pragma unroll 1
    for (int i = tid; i < 3 * QR * c8; i += NT) {
      const int r = i / c8, k = i - r * c8, pr = r / 2;
      const int sec = pr < QH ? 0 : pr < QR ? 1 : 2;
      const int row = (sec == 0 ? h0 * HS : (NH + (sec - 1) * NKV + kh) * HS) + pair_dim(r);
      kv_cp_async16_w(wqs + (size_t)r * qi.C + 8 * k, qi.w + (size_t)row * qi.C + 8 * k);
    }
    const int nb = qi.C * (qi.norm_f16 ? 2 : 4);
#pragma unroll 1
    for (int i = tid; i < nb / 16; i += NT) kv_cp_async16_ca(qnw + 16 * i, static_cast<const char *>(qi.norm_w) + 16 * i);
    kv_cp_async_commit();
    pos0 = qi.pos[b];
    slot0 = qi.slots[b];
  }
  // EMB: this thread's elements of the stream row (tid + k·NT), the
  // token's embedding, loaded here with the weights (a plain launch: its
  // token was written by the step before).
  constexpr int kStreamPer = 8;  // elements a thread: C ≤ kStreamPer·NT
  [[maybe_unused]] float emb[EMB ? kStreamPer : 1];
  if constexpr (EMB) {
    const int t = qi.tok[b];
#pragma unroll
    for (int k = 0; k < kStreamPer; k++) {
      const int i = tid + k * NT;
      emb[k] = i < qi.C ? kv_embedding(qi.wte, qi.wte_f16, qi.V, qi.C, t, i) : 0.f;
    }
  }
  // QKV: the rotation factors of this warp's query and key pairs at pos (a
  // step input), before the wait: off the critical path.
  constexpr int kQNW = NT / 32, kQPPW = QKV ? 3 * QH / kQNW : 1;  // warps, pairs a warp
  [[maybe_unused]] float2 qsc[kQPPW];
  if constexpr (QKV) {
    const bool rot_k = qi.rope_heads > NH;
#pragma unroll
    for (int j = 0; j < kQPPW; j++) {
      const int pr = tid / 32 * kQPPW + j;
      qsc[j] = make_float2(0.f, 1.f);
      if (pr < QH || (rot_k && pr < QR)) qsc[j] = kv_sincos((float)pos0 * qi.pf.v[rank * QH + pr % QH]);
    }
  }
  // The prologue's barrier phase is waited for here, before the
  // programmatic wait: the cluster's blocks start together, so this costs
  // nothing, and no cluster barrier (nor its L1 invalidation) is left after
  // the wait on the OP path.
  if constexpr (CS > 1) kv_cluster_wait();
  KV_STAMP_AT(stp, 8);
  kv_pdl_wait();
  KV_STAMP_AT(stp, 2);
  if constexpr (!kEarlyTrigger) kv_pdl_launch_dependents();
  float4 qr[QVM];
  if constexpr (QKV) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr int NW = kQNW, PPW = kQPPW;  // warps, pairs a warp (as the factors before the wait)
    static_assert(OP && PPW * NW == 3 * QH, "QKV: the fold's shapes");
    cg::cluster_group cluster = cg::this_cluster();
    const int C = qi.C, lane = tid % 32, warp = tid / 32;
    __shared__ __align__(16) float qxs[1024];  // the stream row (C ≤ 1024)
    // The stream and the accumulator in one round trip (EMB: loaded).
    constexpr int kPre = kStreamPer;
    float iv[kPre];
    long long av[kPre];
    const float *inb = qi.in + (size_t)b * C;
    const long long *accb = qi.acc ? qi.acc + (size_t)b * C : nullptr;
#pragma unroll
    for (int k = 0; k < kPre; k++) {
      const int i = tid + k * NT;
      if constexpr (EMB) {
        iv[k] = emb[k];
        av[k] = 0;
      } else {
        iv[k] = i < C ? __ldcg(inb + i) : 0.f;
        av[k] = i < C && accb ? __ldcg(accb + i) : 0;
      }
    }
    kv_cp_async_wait_all();
    const bool writer = unit == 0 && rank == 0;
#pragma unroll
    for (int k = 0; k < kPre; k++) {
      const int i = tid + k * NT;
      if (i < C) {
        const float v = iv[k] + kv_unfix(av[k]);
        if (writer) qi.sum[(size_t)b * C + i] = v;
        qxs[i] = v;
      }
    }
    __syncthreads();
    KV_STAMP_AT(stp, 10);
    // The warp's 2·PPW rows over all of C: its lanes' squares give the
    // norm's sum too (no block reduction).
    float a[2 * PPW], ss = 0.f;
#pragma unroll
    for (int j = 0; j < 2 * PPW; j++) a[j] = 0.f;
    const __half2 *w2 = reinterpret_cast<const __half2 *>(wqs);
    // Unrolled by 3 (C/64 = 9 trips for SmolLM2): −1.7 µs a token at cache 32
    // (docs/PERF.md, version 29); by 9, +1 µs.
#pragma unroll 3
    for (int k = lane; k < C / 2; k += 32) {
      const float2 x = reinterpret_cast<const float2 *>(qxs)[k];
      const float2 nw = make_float2(load_norm_w(qnw, qi.norm_f16, 2 * k), load_norm_w(qnw, qi.norm_f16, 2 * k + 1));
      ss = fmaf(x.x, x.x, fmaf(x.y, x.y, ss));
      const float xa = x.x * nw.x, xb = x.y * nw.y;
#pragma unroll
      for (int j = 0; j < 2 * PPW; j++) {
        const float2 w = __half22float2(w2[(size_t)(warp * 2 * PPW + j) * (C / 2) + k]);
        a[j] = fmaf(w.x, xa, fmaf(w.y, xb, a[j]));
      }
    }
    ss = kv_warp_sum(ss);
#pragma unroll
    for (int j = 0; j < 2 * PPW; j++) a[j] = kv_warp_sum(a[j]);
    const float rstd = 1.f / sqrtf(ss / (float)C + qi.eps);
    KV_STAMP_AT(stp, 11);
    // Rotate the pairs at the position (lower: x1·cos − x2·sin, upper:
    // x2·cos + x1·sin) and store them into every block of the cluster.
    if (lane < CS) {  // (every block is running, its words zeroed: the prologue's phase)
      float *xqf = reinterpret_cast<float *>(xq);
#pragma unroll
      for (int j = 0; j < PPW; j++) {
        const int pr = warp * PPW + j, sec = pr < QH ? 0 : pr < QR ? 1 : 2;
        const float lo = a[2 * j] * rstd, hi = a[2 * j + 1] * rstd;
        const float rl = lo * qsc[j].y - hi * qsc[j].x, rh = hi * qsc[j].y + lo * qsc[j].x;
        kv_tag_store(cluster.map_shared_rank(xqf + 2 * (sec * HS + pair_dim(2 * (warp * PPW + j))), lane), rl);
        kv_tag_store(cluster.map_shared_rank(xqf + 2 * (sec * HS + pair_dim(2 * (warp * PPW + j) + 1)), lane), rh);
      }
    }
    // Every thread polls (one warp polling all the words: +40 µs a token).
#pragma unroll 1
    for (int i = tid; i < 3 * HS; i += NT) qkvs[i] = kv_tag_load(xq + i);
    __syncthreads();
    KV_STAMP_AT(stp, 12);
    if (unit % GS == 0 && rank == 0 && tid < HS) {  // one cluster per kv head stores the entry
      const size_t off = ((size_t)slot0 * NKV + kh) * HS + tid;
      qi.kc[off] = qkvs[HS + tid];
      qi.vc[off] = qkvs[2 * HS + tid];
    }
    qr[0] = *reinterpret_cast<const float4 *>(qkvs + 4 * li);
    load_kv(0, fresh, n_total);
#endif
  } else {
    load_kv(0, fresh, n_total);
#pragma unroll
    for (int v = 0; v < QVM; v++) {
      const int t = v / G, g = v % G;
      qr[v] = v < QV ? *reinterpret_cast<const float4 *>(q + ((size_t)b * T + t) * q_stride + (size_t)(h0 + g) * HS + 4 * li)
                     : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }

  float m[QVM], l[QVM];
  float4 o[QVM];
#pragma unroll
  for (int v = 0; v < QVM; v++) {
    m[v] = -INFINITY;
    l[v] = 0.f;
    o[v] = make_float4(0.f, 0.f, 0.f, 0.f);
  }

  for (int base = 0; base < n_total; base += STEP * U) {
    if (base > 0) {  // round trip 2 of the later batches: this batch's key and value rows
#pragma unroll
      for (int u = 0; u < U; u++) kr[u] = vr[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      load_kv(base, 0, n_total);
      rot_factors(base);
    }
    // The next batch's slots, in flight while this one computes.
    if (base + STEP * U < n_total) {
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int j = base + STEP * U + gk + STEP * u;
        slot[u] = j < n_total ? __ldg(ord + j) : 0;
      }
    }
    float s[U][QVM];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int j = base + gk + STEP * u;
      float4 k = kr[u];
      if (rope) {
        const float4 p = shfl_xor4(k, LPK / 2);
        float sn[4], cs[4];
#pragma unroll
        for (int c = 0; c < 4; c++) {
          if constexpr (kPreRot) {
            sn[c] = rsn[u][c];
            cs[c] = rcs[u][c];
          } else {
            const float2 sc = kv_sincos((float)j * inv[c]);
            sn[c] = sc.x;
            cs[c] = sc.y;
          }
        }
        // Lower half: x1·cos − x2·sin; upper half: x2·cos + x1·sin.
        const float sg = upper ? 1.f : -1.f;
        k.x = k.x * cs[0] + sg * (p.x * sn[0]);
        k.y = k.y * cs[1] + sg * (p.y * sn[1]);
        k.z = k.z * cs[2] + sg * (p.z * sn[2]);
        k.w = k.w * cs[3] + sg * (p.w * sn[3]);
      }
#pragma unroll
      for (int v = 0; v < QVM; v++)
        s[u][v] = fmaf(qr[v].x, k.x, fmaf(qr[v].y, k.y, fmaf(qr[v].z, k.z, qr[v].w * k.w)));
    }
#pragma unroll
    for (int off = LPK / 2; off > 0; off >>= 1)
#pragma unroll
      for (int u = 0; u < U; u++)
#pragma unroll
        for (int v = 0; v < QVM; v++) s[u][v] += __shfl_xor_sync(KV_FULL_MASK, s[u][v], off);
#pragma unroll
    for (int v = 0; v < QVM; v++) {
      if (v >= QV) break;
      const int t = v / G;
      const int last = n_total - T + t;  // query vector v sees j ≤ last
      float bm = -INFINITY;
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int j = base + gk + STEP * u;
        s[u][v] = (j < n_total && j <= last) ? s[u][v] * scale : -INFINITY;
        bm = fmaxf(bm, s[u][v]);
      }
      const float m_new = fmaxf(m[v], bm);
      if (m_new == -INFINITY) continue;  // nothing visible yet
      const float a = m[v] == -INFINITY ? 0.f : expf(m[v] - m_new);
      float4 acc = make_float4(o[v].x * a, o[v].y * a, o[v].z * a, o[v].w * a);
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < U; u++) {
        const float p = s[u][v] == -INFINITY ? 0.f : expf(s[u][v] - m_new);
        sum += p;
        acc.x = fmaf(p, vr[u].x, acc.x);
        acc.y = fmaf(p, vr[u].y, acc.y);
        acc.z = fmaf(p, vr[u].z, acc.z);
        acc.w = fmaf(p, vr[u].w, acc.w);
      }
      o[v] = acc;
      l[v] = l[v] * a + sum;
      m[v] = m_new;
    }
  }

  KV_STAMP_AT(stp, 3);
  // kWarpMerge: the groups of a warp merge by shuffles, then the warps'
  // partials after one barrier, each output dim's thread weighting them
  // itself (no factor pass, no second barrier); the block's partial then
  // goes to rank 0 as below. This thread's dim of it: wacc (unnormalised),
  // its max wM and sum wL.
  [[maybe_unused]] float wacc = 0.f, wM = -INFINITY, wL = 0.f;
  if constexpr (kWarpMerge) {
    constexpr int NW = NT / 32;
    static_assert(HS <= NT, "a thread an output dim");
    float mm = m[0], ll = l[0];
    float4 oo = o[0];
#pragma unroll
    for (int off = LPK; off < 32; off <<= 1) {
      const float m2 = __shfl_xor_sync(KV_FULL_MASK, mm, off), l2 = __shfl_xor_sync(KV_FULL_MASK, ll, off);
      const float4 o2 = shfl_xor4(oo, off);
      const float mn = fmaxf(mm, m2);
      const float fa = mm == -INFINITY ? 0.f : expf(mm - mn), fb = m2 == -INFINITY ? 0.f : expf(m2 - mn);
      oo = make_float4(fmaf(fa, oo.x, fb * o2.x), fmaf(fa, oo.y, fb * o2.y), fmaf(fa, oo.z, fb * o2.z),
                       fmaf(fa, oo.w, fb * o2.w));
      ll = fmaf(fa, ll, fb * l2);
      mm = mn;
    }
    const int warp = tid / 32, lane = tid % 32;
    if (lane < LPK) {  // lane = li: dims 4·lane … 4·lane + 3
      *reinterpret_cast<float4 *>(&so[0][warp][4 * lane]) = oo;
      if (lane == 0) {
        sm[0][warp] = mm;
        sl_[0][warp] = ll;
      }
    }
    __syncthreads();
    if (tid < HS) {
#pragma unroll
      for (int w = 0; w < NW; w++) wM = fmaxf(wM, sm[0][w]);
#pragma unroll
      for (int w = 0; w < NW; w++) {
        const float f = sm[0][w] == -INFINITY ? 0.f : expf(sm[0][w] - wM);
        wL = fmaf(f, sl_[0][w], wL);
        wacc = fmaf(f, so[0][w][tid], wacc);
      }
    }
    KV_STAMP_AT(stp, 4);
  } else {
    // Merge the NG groups. Loops over run-time bounds below stay rolled
    // (unroll 1): instruction-cache footprint (docs/PERF.md, version 20).
#pragma unroll
    for (int v = 0; v < QVM; v++) {
      if (v >= QV) break;
      *reinterpret_cast<float4 *>(&so[v][gi][4 * li]) = o[v];
      if (li == 0) {
        sm[v][gi] = m[v];
        sl_[v][gi] = l[v];
      }
    }
    __syncthreads();
    KV_STAMP_AT(stp, 9);
    {
      const int warp = tid / 32, lane = tid % 32;
      if (warp < QV) {  // warp v: the factors exp(m_g − M) and the total sum
        const int v = warp;
        float mx = -INFINITY;
#pragma unroll 1
        for (int g = lane; g < NG; g += 32) mx = fmaxf(mx, sm[v][g]);
        mx = kv_warp_max(mx);
        float L = 0.f;
#pragma unroll 1
        for (int g = lane; g < NG; g += 32) {
          const float f = sm[v][g] == -INFINITY ? 0.f : expf(sm[v][g] - mx);
          sm[v][g] = f;
          L += f * sl_[v][g];
        }
        L = kv_warp_sum(L);
        if (lane == 0) {
          sL[v] = L;
          sMx[v] = mx;
        }
      }
    }
    __syncthreads();
    KV_STAMP_AT(stp, 4);
  }
  // OP: the block's rows of wo times the head's output ho, a thread a row,
  // each row's sum added to acc (every head adds to the same rows; integer
  // sums do not depend on their order).
  __shared__ __align__(16) float ho[OP ? HS : 4];
  [[maybe_unused]] auto out_proj = [&]() {
    kv_cp_async_wait_all();
    unsigned long long *dst = reinterpret_cast<unsigned long long *>(op.acc) + (size_t)b * op.C + r0;
    const float4 *h4 = reinterpret_cast<const float4 *>(ho);
#pragma unroll 1
    for (int r = tid; r < nrows; r += NT) {
      float a0 = 0.f, a1 = 0.f;
#pragma unroll
      for (int c = 0; c < CPR; c++) {
        float w[8];
        kv_unpack16<true>(*reinterpret_cast<const uint4 *>(wos + 16 * (r * CPR + (c ^ (r & (CPR - 1))))), w);
        const float4 x0 = h4[2 * c], x1 = h4[2 * c + 1];
        a0 = fmaf(w[0], x0.x, fmaf(w[1], x0.y, fmaf(w[2], x0.z, fmaf(w[3], x0.w, a0))));
        a1 = fmaf(w[4], x1.x, fmaf(w[5], x1.y, fmaf(w[6], x1.z, fmaf(w[7], x1.w, a1))));
      }
      // Two's complement: unsigned adds are the signed sum.
      atomicAdd(dst + r, (unsigned long long)kv_fix(a0 + a1));
    }
  };
  // The block's unnormalised output for query vector v, dim d: its groups'
  // partials weighted by sm (exp(m_g − M_b), M_b = sMx).
  auto block_out = [&](int v, int d) {
    float a0 = 0.f, a1 = 0.f;
#pragma unroll 4
    for (int g = 0; g < NG; g += 2) {
      a0 = fmaf(sm[v][g], so[v][g][d], a0);
      a1 = fmaf(sm[v][g + 1], so[v][g + 1][d], a1);
    }
    return a0 + a1;
  };
  if constexpr (CS == 1) {
#pragma unroll 1
    for (int oi = tid; oi < QV * HS; oi += NT) {
      const int v = oi / HS, d = oi % HS, t = v / G, h = h0 + v % G;
      const float L = sL[v];
      out[((size_t)b * T + t) * NH * HS + (size_t)h * HS + d] = L > 0.f ? block_out(v, d) / L : 0.f;
    }
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    {
      // Every block stores its partial (unnormalised o, its max M_b, sum
      // L_b) straight into rank 0's shared memory and arrives; the others
      // then exit, and rank 0 alone waits, merges from its own shared memory
      // and writes the output. Pulling the partials instead cost a second
      // cluster barrier (nobody may exit while its partial can still be
      // read) and a remote read on the critical path. OP: into every
      // block's shared memory, below.
      __shared__ float po[CS][QVM][HS], pm[CS][QVM], pl[CS][QVM];
      // cluster_merge: the head's output for query vector v, dim d, from
      // the CS blocks' partials (unnormalised po, max pm, sum pl).
      auto cluster_merge = [&](int v, int d) {
        float M = -INFINITY;
#pragma unroll
        for (int r = 0; r < CS; r++) M = fmaxf(M, pm[r][v]);
        float L = 0.f, acc = 0.f;
#pragma unroll
        for (int r = 0; r < CS; r++) {
          const float f = pm[r][v] == -INFINITY ? 0.f : expf(pm[r][v] - M);
          L = fmaf(f, pl[r][v], L);
          acc = fmaf(f, po[r][v][d], acc);
        }
        return L > 0.f ? acc / L : 0.f;
      };
      if constexpr (OP) {
        // Every block stores its partial into every block's shared memory
        // as tagged words (stores need no reply) and merges them itself once
        // they have landed: no serial merge on rank 0 and no barrier.
        static_assert(!OP || kWarpMerge, "the fold merges by warps");
        float *xpf = reinterpret_cast<float *>(xp) + 2 * rank * (HS + 2);
#pragma unroll
        for (int r = 0; r < CS; r++) {
          if (tid < HS) kv_tag_store(cluster.map_shared_rank(xpf + 2 * tid, r), wacc);
          if (tid == 0) {
            kv_tag_store(cluster.map_shared_rank(xpf + 2 * HS, r), wM);
            kv_tag_store(cluster.map_shared_rank(xpf + 2 * (HS + 1), r), wL);
          }
        }
#pragma unroll 1
        for (int i = tid; i < CS * (HS + 2); i += NT) {
          const int r = i / (HS + 2), k = i - r * (HS + 2);
          const float v = kv_tag_load(xp + i);
          if (k < HS) po[r][0][k] = v;
          else if (k == HS) pm[r][0] = v;
          else pl[r][0] = v;
        }
        __syncthreads();
        KV_STAMP_AT(stp, 5);
        if (tid < HS) ho[tid] = cluster_merge(0, tid);
        __syncthreads();
        KV_STAMP_AT(stp, 6);
        out_proj();
        KV_STAMP_AT(stp, 7);
        return;
      }
      float *to = cluster.map_shared_rank(&po[rank][0][0], 0);
      if constexpr (kWarpMerge) {
        if (tid < HS) to[tid] = wacc;
        if (tid == 0) {
          *cluster.map_shared_rank(&pm[rank][0], 0) = wM;
          *cluster.map_shared_rank(&pl[rank][0], 0) = wL;
        }
      } else {
#pragma unroll 1
        for (int oi = tid; oi < QV * HS; oi += NT) to[oi] = block_out(oi / HS, oi % HS);
        if (tid < QV) {
          *cluster.map_shared_rank(&pm[rank][tid], 0) = sMx[tid];
          *cluster.map_shared_rank(&pl[rank][tid], 0) = sL[tid];
        }
      }
      kv_cluster_arrive();  // release: this block's stores above
      KV_STAMP_AT(stp, 5);
      if (rank != 0) return;
      kv_cluster_wait();  // acquire: every block's partial
      KV_STAMP_AT(stp, 6);
#pragma unroll 1
      for (int oi = tid; oi < QV * HS; oi += NT) {
        const int v = oi / HS, d = oi % HS, t = v / G, h = h0 + v % G;
        out[((size_t)b * T + t) * NH * HS + (size_t)h * HS + d] = cluster_merge(v, d);
      }
      KV_STAMP_AT(stp, 7);
    }
#endif
  }
}

// launch_decode_v4_cluster (variant 8: CS = 4, NT = 512; variant 9: CS = 8,
// NT = 128; variant 14: 9 with a cluster per query head, GS = NH/NKV): false
// when the shapes do not fit or the device has no clusters (before sm_90).
// OP (kv_attention_out): the kernel with the output projection folded in,
// op its operands (out unused); it needs one query vector a cluster (QV = 1)
// and a block's rows of wo within the default 48 KB of shared memory.
template <int CS, int NT, bool OP = false, bool QKV = false, bool EMB = false>
bool launch_decode_v4_cluster(cudaStream_t st, float *out, const float *q, const float *kc, const float *vc,
                              const int32_t *order, const int32_t *lens, int B, int T, int NH, int NKV, int HS,
                              int q_stride, int max_len, float rope_theta, const RopeFreqs &freqs, float scale,
                              bool pdl = true, int GS = 1, const OutProj &op = OutProj{}, const QKVIn &qi = QKVIn{}) {
  if (GS < 1 || (NH / NKV) % GS != 0) return false;
  const int QV = T * (NH / NKV / GS);
  const bool al = ((reinterpret_cast<uintptr_t>(kc) | reinterpret_cast<uintptr_t>(vc) |
                    reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(op.wo)) & 15) == 0;
  if (!al || q_stride % 4 != 0 || QV > 4 || !(HS == 16 || HS == 32 || HS == 64 || HS == 128)) return false;
  // OP: one head's output a cluster; wo's rows (NH·HS halves) 16-byte aligned.
  size_t smem = OP ? (size_t)(op.C + CS - 1) / CS * HS * 2 : 0;  // a block's rows of wo
  if constexpr (QKV) {  // the block's q|k|v rows and the norm weights
    if (qi.C % 8 != 0 || qi.C > 1024 || T != 1 || ((reinterpret_cast<uintptr_t>(qi.w) | reinterpret_cast<uintptr_t>(qi.norm_w)) & 15))
      return false;
    smem += (size_t)3 * (HS / CS) * qi.C * 2 + (size_t)qi.C * (qi.norm_f16 ? 2 : 4);
  }
  if (OP && (QV != 1 || (NH * HS) % 8 != 0 || op.C <= 0 || smem > 48 * 1024)) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9) {
    cudaGetLastError();
    return false;
  }
  const dim3 grid(NKV * GS * CS, B);
  // OP: the tagged words take the static shared memory past 48 KB with
  // the dynamic rows, which then need the opt-in.
#define KV_D4C(LPK, QVM, U)                                                                                             \
  do {                                                                                                                   \
    auto kern = attn_decode_kernel_v4<LPK, QVM, U, CS, NT, OP, QKV, EMB>;                                               \
    if (OP && cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {       \
      cudaGetLastError();                                                                                                \
      return false;                                                                                                      \
    }                                                                                                                    \
    kv_launch_clustered(kern, CS, grid, dim3(NT), smem, st, pdl, out, q, kc, vc, order, lens, T, NH, NKV, q_stride,      \
                        max_len, rope_theta, freqs, scale, GS, op, qi);                                                  \
  } while (0)
#define KV_D4C_Q(LPK)                         \
  if constexpr (QKV && (LPK < 16 || NT != 128)) return false; \
  else if constexpr (OP) KV_D4C(LPK, 1, NT == 512 ? 8 : 4); \
  else if (QV == 1) KV_D4C(LPK, 1, NT == 512 ? 8 : 4); \
  else KV_D4C(LPK, 4, 4)
  switch (HS) {
    case 16: KV_D4C_Q(4); break;
    case 32: KV_D4C_Q(8); break;
    case 64: KV_D4C_Q(16); break;
    default: KV_D4C_Q(32); break;
  }
#undef KV_D4C_Q
#undef KV_D4C
  return true;
}

// launch_decode_v4: false when the shapes do not fit the kernel.
bool launch_decode_v4(cudaStream_t st, float *out, const float *q, const float *kc, const float *vc,
                      const int32_t *order, const int32_t *lens, int B, int T, int NH, int NKV, int HS, int q_stride,
                      int max_len, float rope_theta, const RopeFreqs &freqs, float scale) {
  const int QV = T * (NH / NKV);
  const bool al = ((reinterpret_cast<uintptr_t>(kc) | reinterpret_cast<uintptr_t>(vc) |
                    reinterpret_cast<uintptr_t>(q)) & 15) == 0;
  if (!al || q_stride % 4 != 0 || QV > 4 || !(HS == 16 || HS == 32 || HS == 64 || HS == 128)) return false;
  const dim3 grid(NKV, B);
  const bool pdl = kv_pdl_supported();
#define KV_D4(LPK, QVM, U)                                                                                  \
  kv_launch(attn_decode_kernel_v4<LPK, QVM, U>, grid, dim3(kD4Threads), 0, st, pdl, out, q, kc, vc, order, lens, T, \
            NH, NKV, q_stride, max_len, rope_theta, freqs, scale, 1, OutProj{}, QKVIn{})
#define KV_D4_Q(LPK) \
  if (QV == 1) KV_D4(LPK, 1, 8); else KV_D4(LPK, 4, 4)
  switch (HS) {
    case 16: KV_D4_Q(4); break;
    case 32: KV_D4_Q(8); break;
    case 64: KV_D4_Q(16); break;
    default: KV_D4_Q(32); break;
  }
#undef KV_D4_Q
#undef KV_D4
  return true;
}

// Register staging for the pipelined prefill (PIPE): a tile's raw key rows
// as (x[i], x[i + HS/2]) pairs (rotated when stored) and value rows, loaded
// a tile ahead so that their latency hides behind the current tile's math.
template <int NT, int ROWS, int HSMAX>
struct TileRegs {
  static constexpr int PK = (ROWS * HSMAX / 2 + NT - 1) / NT, PV = (ROWS * HSMAX + NT - 1) / NT;
  float k1[PK], k2[PK], v[PV];
  __device__ __forceinline__ void load(const float *__restrict__ kc, const float *__restrict__ vc, const int *sl,
                                       int cnt, int NKV, int kh, int HS, int tid) {
    const int h = HS / 2;
#pragma unroll
    for (int p = 0; p < PK; p++) {
      const int idx = tid + p * NT, e = idx / h, i = idx % h;
      const bool ok = idx < cnt * h;
      const float *row = kc + ((size_t)(ok ? sl[e] : 0) * NKV + kh) * HS;
      k1[p] = ok ? __ldcg(row + i) : 0.f;
      k2[p] = ok ? __ldcg(row + i + h) : 0.f;
    }
#pragma unroll
    for (int p = 0; p < PV; p++) {
      const int idx = tid + p * NT, e = idx / HS, d = idx % HS;
      v[p] = idx < cnt * HS ? __ldcg(vc + ((size_t)sl[e] * NKV + kh) * HS + d) : 0.f;
    }
  }
  __device__ __forceinline__ void store(float *ks, int ldk, float *vs, int ldv, int cnt, int j0, int HS,
                                        const float *inv, int tid) const {
    const int h = HS / 2;
#pragma unroll
    for (int p = 0; p < PK; p++) {
      const int idx = tid + p * NT, e = idx / h, i = idx % h;
      if (idx < cnt * h) {
        float a = k1[p], c = k2[p];
        if (inv) {
          float sn, cs;
          sincosf((float)(j0 + e) * inv[i], &sn, &cs);
          a = k1[p] * cs - k2[p] * sn;
          c = k2[p] * cs + k1[p] * sn;
        }
        ks[e * ldk + i] = a;
        ks[e * ldk + i + h] = c;
      }
    }
#pragma unroll
    for (int p = 0; p < PV; p++) {
      const int idx = tid + p * NT, e = idx / HS, d = idx % HS;
      if (idx < cnt * HS) vs[e * ldv + d] = v[p];
    }
  }
};

// attn_prefill_kernel_v1: grid (query tile, head, sequence), 256 threads as
// 16×16 (ty, tx). Thread (ty, tx) owns query rows ty·RQ + i (i < RQ),
// entries tx + 16k of each key tile (k < RK) for the scores and head dims
// tx + 16j for the output; a row's 16 threads form one half-warp, so row
// max/sum are half-warp shuffles and P needs only a warp barrier.
// PIPE (variant 7): key/value tiles loaded into registers one tile ahead
// and slots two tiles ahead, so a tile costs its math, not two memory round
// trips (T = 256 ran 42 µs, mostly those round trips).
template <int HSMAX, int RQ, int RK, bool PIPE = false>
__global__ void __launch_bounds__(256)
    attn_prefill_kernel_v1(float *__restrict__ out, const float *__restrict__ q, const float *__restrict__ kc,
                           const float *__restrict__ vc, const int32_t *__restrict__ order,
                           const int32_t *__restrict__ lens, int T, int NH, int NKV, int HS, int q_stride,
                           int max_len, float rope_theta, RopeFreqs freqs, float scale) {
  constexpr int TQ = 16 * RQ, TK = 16 * RK, RD = HSMAX / 16;
  __shared__ float Qs[TQ][HSMAX + 1];
  __shared__ float Ks[TK][HSMAX + 1];
  __shared__ float Vs[TK][HSMAX];
  __shared__ float Ps[TQ][TK + 1];
  __shared__ float inv_s[HSMAX / 2];
  __shared__ int sl[TK];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int t0 = blockIdx.x * TQ, h = blockIdx.y, b = blockIdx.z;
  const int kh = h / (NH / NKV);
  const int n_total = min(lens[b], max_len);
  const int n0 = n_total - T;  // query t sees entries j ≤ n0 + t

  // Rows past T stay zero (their scores are computed, never written).
  stage_q<256, TQ, HSMAX>(&Qs[0][0], HSMAX + 1, TQ, HS, q, (size_t)b * T + t0, q_stride, h, 1, T - t0, tid, false);
  if (rope_theta != 0.f)
    for (int i = tid; i < HS / 2; i += 256) inv_s[i] = freqs.v[i];
  const float *inv = rope_theta != 0.f ? inv_s : nullptr;

  float m[RQ], l[RQ], o[RQ][RD];
#pragma unroll
  for (int i = 0; i < RQ; i++) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < RD; j++) o[i][j] = 0.f;
  }

  // Entries any row of this tile can see.
  const int j_end = max(0, min(n_total, n0 + min(t0 + TQ, T)));
  __shared__ int slp[PIPE ? 2 : 1][TK];
  TileRegs<256, TK, HSMAX> regs;
  if (PIPE) {
    if (tid < TK) {
      const int32_t *ord = order + (size_t)b * max_len;
      slp[0][tid] = tid < j_end ? ord[tid] : 0;
      slp[PIPE ? 1 : 0][tid] = TK + tid < j_end ? ord[TK + tid] : 0;
    }
    __syncthreads();  // slots, Qs, inv
    if (j_end > 0) regs.load(kc, vc, slp[0], min(TK, j_end), NKV, kh, HS, tid);
  }
  for (int j0 = 0, it = 0; j0 < j_end; j0 += TK, it++) {
    const int cnt = min(TK, j_end - j0);
    if (PIPE) {
      regs.store(&Ks[0][0], HSMAX + 1, &Vs[0][0], HSMAX, cnt, j0, HS, inv, tid);
      __syncthreads();  // tile it staged; slp[it & 1] no longer read
      if (tid < TK) {
        const int j = j0 + 2 * TK + tid;
        slp[it & 1][tid] = j < j_end ? order[(size_t)b * max_len + j] : 0;
      }
      if (j0 + TK < j_end)
        regs.load(kc, vc, slp[(it + 1) & (PIPE ? 1 : 0)], min(TK, j_end - j0 - TK), NKV, kh, HS, tid);
    } else {
      __syncthreads();  // previous tile consumed; Qs/inv staged on the first pass
      if (tid < cnt) sl[tid] = order[(size_t)b * max_len + j0 + tid];
      __syncthreads();
      stage_rows<256, TK, HSMAX>(&Ks[0][0], HSMAX + 1, kc, sl, cnt, j0, NKV, kh, HS, inv, tid);
      stage_rows<256, TK, HSMAX>(&Vs[0][0], HSMAX, vc, sl, cnt, j0, NKV, kh, HS, nullptr, tid);
      __syncthreads();
    }

    float s[RQ][RK];
#pragma unroll
    for (int i = 0; i < RQ; i++)
#pragma unroll
      for (int k = 0; k < RK; k++) s[i][k] = 0.f;
    for (int d = 0; d < HS; d++) {
      float qv[RQ], kv[RK];
#pragma unroll
      for (int i = 0; i < RQ; i++) qv[i] = Qs[ty * RQ + i][d];
#pragma unroll
      for (int k = 0; k < RK; k++) kv[k] = Ks[tx + 16 * k][d];
#pragma unroll
      for (int i = 0; i < RQ; i++)
#pragma unroll
        for (int k = 0; k < RK; k++) s[i][k] = fmaf(qv[i], kv[k], s[i][k]);
    }

    float alpha[RQ];
#pragma unroll
    for (int i = 0; i < RQ; i++) {
      const int t = t0 + ty * RQ + i;
      float mx = -INFINITY;
#pragma unroll
      for (int k = 0; k < RK; k++) {
        const int e = tx + 16 * k;
        s[i][k] = (e < cnt && j0 + e <= n0 + t) ? s[i][k] * scale : -INFINITY;
        mx = fmaxf(mx, s[i][k]);
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(KV_FULL_MASK, mx, off));
      const float m_new = fmaxf(m[i], mx);
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < RK; k++) {
        const float p = s[i][k] == -INFINITY ? 0.f : expf(s[i][k] - m_new);
        Ps[ty * RQ + i][tx + 16 * k] = p;
        sum += p;
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(KV_FULL_MASK, sum, off);
      alpha[i] = m[i] == -INFINITY ? 0.f : expf(m[i] - m_new);
      l[i] = l[i] * alpha[i] + sum;
      m[i] = m_new;
    }
    __syncwarp();  // a row's P is written and read by its own half-warp

#pragma unroll
    for (int i = 0; i < RQ; i++)
#pragma unroll
      for (int j = 0; j < RD; j++) o[i][j] *= alpha[i];
    for (int e = 0; e < cnt; e++) {
      float vv[RD];
#pragma unroll
      for (int j = 0; j < RD; j++) vv[j] = Vs[e][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < RQ; i++) {
        const float p = Ps[ty * RQ + i][e];
#pragma unroll
        for (int j = 0; j < RD; j++) o[i][j] = fmaf(p, vv[j], o[i][j]);
      }
    }
    if (PIPE) __syncthreads();  // Ks/Vs/Ps consumed before the next tile is stored
  }

#pragma unroll
  for (int i = 0; i < RQ; i++) {
    const int t = t0 + ty * RQ + i;
    if (t >= T) continue;
    float *orow = out + ((size_t)b * T + t) * NH * HS + (size_t)h * HS;
#pragma unroll
    for (int j = 0; j < RD; j++) {
      const int d = tx + 16 * j;
      if (d < HS) orow[d] = l[i] > 0.f ? o[i][j] / l[i] : 0.f;
    }
  }
}

}  // namespace

// Split scratch: kDecCounters int counters (v2), then partials
// [B·T·NH][nsplit][HS + 2] floats (both decode kernels).
extern "C" long long kv_attention_work_floats(int B, int T, int NH, int NKV, int HS, int max_len) {
  if (B <= 0 || T <= 0 || NKV <= 0 || NH % NKV != 0 || (long long)B * NKV > kDecCounters) return 0;
  // Enough for either split decode kernel (v2: variant 1, v3: variant 4).
  const int nsplit = max(decode_split(B, NKV, max_len).nsplit, decode_split_v3(B, NKV, max_len, HS).nsplit);
  if (nsplit <= 1) return 0;
  return kDecCounters + (long long)B * T * NH * nsplit * (HS + 2);
}

// attention_prefill.cu: the tensor-core prefill (variants 12, 13; 0 with KV_ATTN_F16).
bool kv_attention_prefill_tc(cudaStream_t s, float *out, const float *q, const float *kc, const float *vc,
                             const int32_t *order, const int32_t *lens, int B, int T, int NH, int NKV, int HS,
                             int q_stride, int max_len, float rope_theta, int variant, int f16, kv_status *st);

extern "C" kv_status kv_attention_out(kv_stream s, long long *acc, const float *q, const float *kc, const float *vc,
                                      const int32_t *order, const int32_t *lens, int B, int NH, int NKV, int HS,
                                      int q_stride, int max_len, float rope_theta, const void *wo, int wo_f16, int C,
                                      int variant, int *launched) {
  *launched = 0;
  if (B <= 0 || NH <= 0) return kv_launched();
  if (NKV <= 0 || NH % NKV != 0 || HS <= 0 || HS % 2 != 0 || HS > kMaxHS || q_stride < NH * HS || max_len < 0 ||
      !acc || !wo)
    return (kv_status)cudaErrorInvalidValue;
  // fp16 weights only, entries within v4's one-pass reach.
  if (!wo_f16 || (long long)max_len * HS > 1024 * 64) return kv_launched();
  const float scale = 1.0f / sqrtf((float)HS);
  const RopeFreqs freqs = rope_freqs(HS, rope_theta);
  const __half *w = static_cast<const __half *>(wo);
  // Variant 0 folds where kv_attention's default takes v14 (few sequences
  // and several query heads a kv head: SmolLM2), the one shape where the
  // fold measured faster (H100, BenchmarkCUDAFusedDecodeChain: SmolLM2 555
  // against 571 µs a step; distilgpt2, whose attention is a block per kv
  // head, 171 against 160). With the MLP kernel as its consumer (three
  // launches a layer): SmolLM2 0.362 against 0.380 ms a token (docs/PERF.md,
  // version 23).
  if (variant == 0 && !(NH > NKV && (long long)B * NH * 8 <= 132)) return kv_launched();
  if (variant != 0 && variant != 1) return (kv_status)cudaErrorInvalidValue;
  // A cluster of 8 blocks of 128 threads per (query head, sequence), as v14.
  const bool ok = launch_decode_v4_cluster<8, 128, true>(s, nullptr, q, kc, vc, order, lens, B, 1, NH, NKV, HS,
                                                         q_stride, max_len, rope_theta, freqs, scale, true, NH / NKV,
                                                         OutProj{w, acc, C});
  *launched = ok;
  return kv_launched();
}

extern "C" kv_status kv_attention_block(kv_stream s, long long *acc, float *sum, const float *in,
                                        const long long *mlp_acc, const void *norm_w, int norm_f16, const void *w,
                                        int w_f16, float *kc, float *vc, const int32_t *pos, const int32_t *slots,
                                        const int32_t *order, const int32_t *lens, int B, int NH, int NKV, int HS,
                                        int max_len, float rope_theta, float theta, int rope_heads, float eps, int C,
                                        const void *wo, int wo_f16, const int32_t *tok, const void *wte, int wte_f16,
                                        int V, int pdl, int *launched) {
  *launched = 0;
  if (B <= 0 || NH <= 0) return kv_launched();
  if (NKV <= 0 || NH % NKV != 0 || HS <= 0 || HS % 2 != 0 || HS > kMaxHS || max_len < 0 || !acc || !wo ||
      !(tok ? wte && V > 0 && !pdl && !mlp_acc : in != nullptr) || !sum || !norm_w || !w || !kc || !vc || !pos || !slots)
    return (kv_status)cudaErrorInvalidValue;
  if (!wo_f16 || !w_f16 || (long long)max_len * HS > 1024 * 64 || !(NH > NKV && (long long)B * NH * 8 <= 132))
    return kv_launched();
  const float scale = 1.0f / sqrtf((float)HS);
  const QKVIn qi{in, mlp_acc, sum, norm_w, norm_f16, static_cast<const __half *>(w), pos, slots, kc, vc, rope_heads,
                 eps, C, rope_freqs(HS, theta), tok, wte, wte_f16, V};
  const OutProj op{static_cast<const __half *>(wo), acc, C};
  // The block with or without its embedding (EMB: a plain launch).
  auto launch = [&](auto emb, bool lead) {
    return launch_decode_v4_cluster<8, 128, true, true, decltype(emb)::value>(
        s, nullptr, nullptr, kc, vc, order, lens, B, 1, NH, NKV, HS, (NH + 2 * NKV) * HS, max_len, rope_theta,
        rope_freqs(HS, rope_theta), scale, lead, NH / NKV, op, qi);
  };
  const bool ok = tok ? launch(std::true_type{}, false) : launch(std::false_type{}, pdl != 0 && kv_pdl_supported());
  *launched = ok;
  return kv_launched();
}

extern "C" kv_status kv_attention(kv_stream s, float *out, const float *q, const float *kc, const float *vc,
                                  const int32_t *order, const int32_t *lens, int B, int T, int NH, int NKV,
                                  int HS, int q_stride, int max_len, float rope_theta, float *work,
                                  long long work_floats, int variant) {
  const int f16 = (variant & KV_ATTN_F16) != 0;
  variant &= ~KV_ATTN_F16;
  if (B <= 0 || T <= 0 || NH <= 0) return kv_launched();
  if (NKV <= 0 || NH % NKV != 0 || HS <= 0 || HS % 2 != 0 || HS > kMaxHS || q_stride < NH * HS ||
      max_len < 0)
    return (kv_status)cudaErrorInvalidValue;
  cudaStream_t st = s;
  kv_status pst;
  if (kv_attention_prefill_tc(st, out, q, kc, vc, order, lens, B, T, NH, NKV, HS, q_stride, max_len, rope_theta,
                              variant, f16, &pst))
    return pst;
  const float scale = 1.0f / sqrtf((float)HS);
  const RopeFreqs freqs = rope_freqs(HS, rope_theta);
  const int QV = T * (NH / NKV);
  if (variant == 0) {
    // Up to 1024 entries of 64 dims, the one-pass v4; longer, the split v3.
    // With few (sequence, kv head) pairs, v4 in clusters of 8 smaller blocks (v9):
    // in the decode layer chain (BenchmarkCUDAFusedDecodeChain, H200)
    // SmolLM2's attention (B·NKV = 3) costs 8.1 µs a layer against 8.2 (v8)
    // and 12.5 (v6), and launching it as a programmatic dependent saves 2.2
    // µs (v10: 10.4). With 8 or more pairs every SM already has its own (kv
    // head, sequence), and one block each is best: distilgpt2 (B·NKV = 12)
    // 3.7 µs a layer with v6 against 4.9 with v9 (H100, same chain).
    // Fewer pairs still, with several query heads a kv head (SmolLM2: 3): a
    // cluster per query head (v14), 4.1 µs alone against v9's 5.7, and the
    // chain 564 against 639 µs a step (H100, BenchmarkCUDAFusedDecodeChain).
    if (QV <= 4 && (long long)max_len * HS <= 1024 * 64 && (long long)B * NKV >= 8 &&
        launch_decode_v4(st, out, q, kc, vc, order, lens, B, T, NH, NKV, HS, q_stride, max_len, rope_theta, freqs, scale))
      return kv_launched();
    if (NH > NKV && QV <= 4 && (long long)max_len * HS <= 1024 * 64 && (long long)B * NH * 8 <= 132 &&
        launch_decode_v4_cluster<8, 128>(st, out, q, kc, vc, order, lens, B, T, NH, NKV, HS, q_stride, max_len,
                                         rope_theta, freqs, scale, true, NH / NKV))
      return kv_launched();
    if (QV <= 4 && (long long)max_len * HS <= 1024 * 64 && (long long)B * NKV * 8 <= 132 &&
        launch_decode_v4_cluster<8, 128>(st, out, q, kc, vc, order, lens, B, T, NH, NKV, HS, q_stride, max_len,
                                         rope_theta, freqs, scale))
      return kv_launched();
    if (QV <= 4 && (long long)max_len * HS <= 1024 * 64 &&
        launch_decode_v4(st, out, q, kc, vc, order, lens, B, T, NH, NKV, HS, q_stride, max_len, rope_theta, freqs, scale))
      return kv_launched();
    variant = QV <= kDecMaxQ ? 4 : 7;
  }
  if (variant == 14) {
    if (!launch_decode_v4_cluster<8, 128>(st, out, q, kc, vc, order, lens, B, T, NH, NKV, HS, q_stride, max_len,
                                          rope_theta, freqs, scale, true, NH / NKV))
      return (kv_status)cudaErrorInvalidValue;
    return kv_launched();
  }
  if (variant == 8 || variant == 9 || variant == 10 || variant == 11) {
    const bool pdl = variant <= 9;  // 10, 11: 9, 8 launched normally
    const bool ok = variant == 8 || variant == 11
                        ? launch_decode_v4_cluster<4, kD4Threads>(st, out, q, kc, vc, order, lens, B, T, NH, NKV, HS,
                                                                  q_stride, max_len, rope_theta, freqs, scale, pdl)
                        : launch_decode_v4_cluster<8, 128>(st, out, q, kc, vc, order, lens, B, T, NH, NKV, HS,
                                                           q_stride, max_len, rope_theta, freqs, scale, pdl);
    if (!ok) return (kv_status)cudaErrorInvalidValue;
    return kv_launched();
  }
  if (variant == 6) {
    if (!launch_decode_v4(st, out, q, kc, vc, order, lens, B, T, NH, NKV, HS, q_stride, max_len, rope_theta, freqs,
                          scale))
      return (kv_status)cudaErrorInvalidValue;
    return kv_launched();
  }
  if (variant == 4) {
    if (QV > kDecMaxQ) return (kv_status)cudaErrorInvalidValue;
    DecodeSplit sp = decode_split_v3(B, NKV, max_len, HS);
    const long long need = kv_attention_work_floats(B, T, NH, NKV, HS, max_len);
    if (sp.nsplit <= 1 || need == 0 || !work || work_floats < need)
      sp = {kv_ceil_div(max(max_len, 1), d3_chunk(HS > 64 ? kMaxHS : 64)), 1};
    const dim3 grid(sp.nsplit, NKV, B);
    int *counters = sp.nsplit > 1 ? reinterpret_cast<int *>(work) : nullptr;
    float *partials = sp.nsplit > 1 ? work + kDecCounters : nullptr;
    const bool vec = HS % 8 == 0 && (reinterpret_cast<uintptr_t>(kc) & 15) == 0 &&
                     (reinterpret_cast<uintptr_t>(vc) & 15) == 0;
#define KV_D3(HSM, V)                                                                                         \
  attn_decode_kernel_v3<HSM, V><<<grid, kD3Threads, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS, q_stride, \
                                                            max_len, rope_theta, freqs, scale, sp.chunks_per_split, \
                                                            partials, counters)
    if (HS <= 64) {
      if (vec) KV_D3(64, true); else KV_D3(64, false);
    } else {
      if (vec) KV_D3(kMaxHS, true); else KV_D3(kMaxHS, false);
    }
#undef KV_D3
    return kv_launched();
  }
  if (variant == 1 || variant == 3) {
    if (QV > kDecMaxQ) return (kv_status)cudaErrorInvalidValue;
    DecodeSplit sp = decode_split(B, NKV, max_len);
    const long long need = kv_attention_work_floats(B, T, NH, NKV, HS, max_len);
    if (need == 0 || !work || work_floats < need) sp = {kv_ceil_div(max(max_len, 1), kDecCh), 1};
    const dim3 grid(sp.nsplit, NKV, B);
    int *counters = sp.nsplit > 1 ? reinterpret_cast<int *>(work) : nullptr;
    float *partials = sp.nsplit > 1 ? work + kDecCounters : nullptr;
    if (variant == 1) {
      if (HS <= 64)
        attn_decode_kernel_v2<64><<<grid, kDecThreads, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                               q_stride, max_len, rope_theta, freqs, scale,
                                                               sp.chunks_per_split, partials, counters);
      else
        attn_decode_kernel_v2<kMaxHS><<<grid, kDecThreads, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                                   q_stride, max_len, rope_theta, freqs, scale,
                                                                   sp.chunks_per_split, partials, counters);
      return kv_launched();
    }
    if (HS <= 64)
      attn_decode_kernel_v1<64><<<grid, kDecThreads, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS, q_stride,
                                                             max_len, rope_theta, freqs, scale, sp.chunks_per_split, partials);
    else
      attn_decode_kernel_v1<kMaxHS><<<grid, kDecThreads, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                                 q_stride, max_len, rope_theta, freqs, scale,
                                                                 sp.chunks_per_split, partials);
    if (sp.nsplit > 1) {
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return (kv_status)e;
      attn_combine_kernel_v1<<<B * T * NH, kMaxHS, 0, st>>>(out, partials, lens, T, NH, HS, max_len, sp.nsplit,
                                                            sp.chunks_per_split * kDecCh);
    }
    return kv_launched();
  }
  if (variant == 0) variant = 7;
  if (variant != 2 && variant != 5 && variant != 7) return (kv_status)cudaErrorInvalidValue;
  if (variant == 7) {
    const int sms = 132;  // as variant 5, pipelined
    if (HS <= 64) {
      if ((long long)kv_ceil_div(T, 64) * NH * B >= 2 * sms) {
        const dim3 grid(kv_ceil_div(T, 64), NH, B);
        attn_prefill_kernel_v1<64, 4, 2, true><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                                    q_stride, max_len, rope_theta, freqs, scale);
      } else if ((long long)kv_ceil_div(T, 32) * NH * B >= sms) {
        const dim3 grid(kv_ceil_div(T, 32), NH, B);
        attn_prefill_kernel_v1<64, 2, 2, true><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                                    q_stride, max_len, rope_theta, freqs, scale);
      } else {
        const dim3 grid(kv_ceil_div(T, 16), NH, B);
        attn_prefill_kernel_v1<64, 1, 2, true><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                                    q_stride, max_len, rope_theta, freqs, scale);
      }
    } else {
      const dim3 grid(kv_ceil_div(T, 16), NH, B);
      attn_prefill_kernel_v1<kMaxHS, 1, 1, true><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                                      q_stride, max_len, rope_theta, freqs, scale);
    }
    return kv_launched();
  }
  if (variant == 5) {
    // Query tiles sized to the grid: the `ar` mode's prefills (T ≤ 257, 9-12
    // heads) give 36-48 blocks of 64 queries, a third of the SMs; smaller
    // tiles (same kernel) fill them.
    const int sms = 132;
    if (HS <= 64) {
      if ((long long)kv_ceil_div(T, 64) * NH * B >= 2 * sms) {
        const dim3 grid(kv_ceil_div(T, 64), NH, B);
        attn_prefill_kernel_v1<64, 4, 2><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS, q_stride,
                                                              max_len, rope_theta, freqs, scale);
      } else if ((long long)kv_ceil_div(T, 32) * NH * B >= sms) {
        const dim3 grid(kv_ceil_div(T, 32), NH, B);
        attn_prefill_kernel_v1<64, 2, 2><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS, q_stride,
                                                              max_len, rope_theta, freqs, scale);
      } else {
        const dim3 grid(kv_ceil_div(T, 16), NH, B);
        attn_prefill_kernel_v1<64, 1, 2><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS, q_stride,
                                                              max_len, rope_theta, freqs, scale);
      }
    } else {
      if ((long long)kv_ceil_div(T, 32) * NH * B >= sms) {
        const dim3 grid(kv_ceil_div(T, 32), NH, B);
        attn_prefill_kernel_v1<kMaxHS, 2, 1><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                                  q_stride, max_len, rope_theta, freqs, scale);
      } else {
        const dim3 grid(kv_ceil_div(T, 16), NH, B);
        attn_prefill_kernel_v1<kMaxHS, 1, 1><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                                  q_stride, max_len, rope_theta, freqs, scale);
      }
    }
    return kv_launched();
  }
  if (HS <= 64) {
    const dim3 grid(kv_ceil_div(T, 64), NH, B);
    attn_prefill_kernel_v1<64, 4, 2><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS, q_stride,
                                                          max_len, rope_theta, freqs, scale);
  } else {
    const dim3 grid(kv_ceil_div(T, 32), NH, B);
    attn_prefill_kernel_v1<kMaxHS, 2, 1><<<grid, 256, 0, st>>>(out, q, kc, vc, order, lens, T, NH, NKV, HS,
                                                              q_stride, max_len, rope_theta, freqs, scale);
  }
  return kv_launched();
}

KV_STAMP_TU(attention)
