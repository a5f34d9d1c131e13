// sampling.cu — top-k sampling with banned tokens, one token per row
// (gpu.SampleParams, ref.Sample): among the non-banned ids keep the top_k
// largest logits (ties to the lower id), softmax them, and pick the first
// candidate, in descending order, whose cumulative probability exceeds
// Uniform(seed, counter[b])·Σp. The random number is counter-based
// (SplitMix64), computed here from the device counter, so a captured decode
// step replays with new randomness when the host bumps the counter.
#include <cuda_pipeline.h>

#include "sampling.cuh"

#define SAMPLE_UNROLL 8

// v1: one block of 1024 threads per row, one pass over the logits.
//  1. Banned ids go into a bitmap in shared memory (V bits), so checking one
//     is a shared load, whatever max_ban is.
//  2. Each warp keeps a sorted top-K list of keys in registers (lane holds
//     entries lane and lane+32) and scans its share of the row, 32·UNROLL
//     coalesced loads in flight per step; a warp ballot finds lanes that beat
//     the list's K-th key, and each of those is inserted with two ballots and
//     two shuffles. On a random row a warp inserts only ~K·ln(n/K) times.
//  3. The 32 lists are merged pairwise in shared memory (each entry's rank in
//     the merged list is its index plus a binary search in the other list).
//  4. Warp 0 computes the K probabilities in parallel (float32(exp(double(l −
//     max))) as the reference), lane 0 sums and picks sequentially in fp32,
//     so the choice matches the reference bit for bit.
// v1 is instruction-bound on its one SM: every element builds a 64-bit key,
// and with K = 40 the 32 warps insert ~6000 times (72 µs for V = 50k).
//
// v2 (PREFILTER) first reads the row once for each thread's best
// non-banned logit, and takes bound = the smallest over warps of the
// warp's r-th best thread maximum, r = ceil(K/32): 32·r ≥ K distinct
// elements are ≥ bound, so every top-K element is, and step 2 skips
// everything below it with one float compare. Only a few hundred elements
// of a random row survive, so the insertions nearly vanish.
// Both v1 and v2 measured 20 µs even for K = 1 at V = 50k: one SM reading
// 200 KB with a few loads in flight per thread is latency-bound.
//
// v3 (STAGED, on top of v2) first copies the whole row into shared memory
// with asynchronous copies (cp.async: all of it in flight at once, no
// registers held), overlapping the ban setup, so the two passes read
// shared memory. It needs V·4 bytes of shared memory (V ≤ ~50k on Hopper).
// Measured (H200, V = 50257, clock64 per phase): staging 3.6 µs, then the
// same scan, so memory was not the problem: the scan (11 µs) and merge (2.7
// µs at K = 1, 8.3 at K = 40) were instruction/latency-bound.
//
// v4 (FAST) fixes those two: a warp first screens its 8×32 elements
// against a float threshold (the list's K-th value, or the bound) with one
// vote and skips the per-element work when none can enter; and the lists
// merge with a bitonic step (max(A[i], B[63−i]) holds the top 64 of A ∪ B as
// a bitonic sequence, which 6 compare-exchange stages sort; lists keep all
// 64 entries sorted, so nothing but shuffles is needed). It uses the bound
// pass only for K > 8: below that, a list fills and its threshold rises
// fast enough that the insertions cost less than a second read of the row.
template <bool PREFILTER, bool STAGED, bool FAST>
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(int32_t *__restrict__ out, int32_t *__restrict__ also, const float *__restrict__ logits,
                  const int32_t *__restrict__ banned, const int32_t *__restrict__ counter, int V,
                  int K, int max_ban, uint64_t seed, kv_succ succ) {
  // Dynamic shared memory: the ban bitmap (ceil(V/32) words, padded to 16
  // bytes) when anything is banned, then the staged row when STAGED.
  extern __shared__ __align__(16) uint32_t dyn_smem[];
  __shared__ uint64_t lists[SAMPLE_WARPS][64];
  __shared__ float probs[64];
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool has_succ = succ.count != nullptr;
  const bool has_ban = max_ban > 0 || has_succ;
  uint32_t *ban_bits = dyn_smem;
  succ_slot slot = {nullptr, nullptr, 0};
  if (has_succ && threadIdx.x == 0) slot = succ_reserve(succ, b, V);
  const float *l = logits + (long long)b * V;
  const uint32_t ctr = threadIdx.x == 0 ? (uint32_t)counter[b] : 0u;  // fetched early, used last
  if (STAGED) {
    float *row = reinterpret_cast<float *>(dyn_smem + (has_ban ? ((V + 31) / 32 + 3) / 4 * 4 : 0));
    for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) __pipeline_memcpy_async(&row[i], &l[i], 4);
    __pipeline_commit();
    l = row;
  }

  if (has_ban) {
    const int words = (V + 31) >> 5;
    for (int i = threadIdx.x; i < words; i += blockDim.x) ban_bits[i] = 0;
    __syncthreads();
    if (warp == 0) {
      // The list ends at its first negative entry (later entries are ignored, as in the ref).
      for (int base = 0; base < max_ban; base += 32) {
        const int i = base + lane;
        const int t = i < max_ban ? banned[(long long)b * max_ban + i] : -1;
        const unsigned neg = __ballot_sync(KV_FULL_MASK, t < 0);
        const int limit = neg ? __ffs(neg) - 1 : 32;
        if (lane < limit && t < V) atomicOr(&ban_bits[t >> 5], 1u << (t & 31));
        if (neg) break;
      }
    }
    if (has_succ)
      succ_each(succ, b, V, [&](int t) {
        if (t >= 0 && t < V) atomicOr(&ban_bits[t >> 5], 1u << (t & 31));
      });
  }
  if (STAGED) __pipeline_wait_prior(0);
  if (STAGED || has_ban) __syncthreads();

  uint64_t bound = 0;  // keys below it cannot be in the top K; 0: no bound
  float bound_v = 0.f;
  if (PREFILTER) {
    __shared__ uint64_t warp_bound[SAMPLE_WARPS];
    // Thread maximum over its ids, lowest id on ties (ids rise along the
    // loop and only a strictly greater value replaces); NaN never counts.
    float best_v = -INFINITY;
    int best_id = -1;
#pragma unroll 8
    for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) {
      const float v = l[i];
      if ((v > best_v || (best_id < 0 && v == v)) &&
          !(has_ban && ((ban_bits[i >> 5] >> (i & 31)) & 1u))) {
        best_v = v;
        best_id = i;
      }
    }
    const uint64_t mine = best_id >= 0 ? sample_key(best_v, best_id) : 0;
    uint64_t rth = mine;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) rth = max(rth, __shfl_xor_sync(KV_FULL_MASK, rth, o));
    if (K > 32) {  // second best of the warp (keys are unique, or 0)
      uint64_t second = mine == rth ? 0 : mine;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) second = max(second, __shfl_xor_sync(KV_FULL_MASK, second, o));
      rth = second;
    }
    if (lane == 0) warp_bound[warp] = rth;
    __syncthreads();
    bound = warp_bound[0];
#pragma unroll
    for (int w = 1; w < SAMPLE_WARPS; w++) bound = min(bound, warp_bound[w]);
    bound_v = sample_key_value(bound);
  }

  // 2. Per-warp top-K lists; thr is the key an element must beat, thr_v
  // (FAST) a float no candidate is below.
  const uint64_t thr0 = bound != 0 ? bound - 1 : 0;
  uint64_t e0 = 0, e1 = 0, thr = thr0;
  float thr_v = bound != 0 ? bound_v : -INFINITY;
  for (int base = warp * 32 * SAMPLE_UNROLL; base < V; base += 32 * SAMPLE_UNROLL * SAMPLE_WARPS) {
    float v[SAMPLE_UNROLL];
#pragma unroll
    for (int j = 0; j < SAMPLE_UNROLL; j++) {
      const int id = base + j * 32 + lane;
      v[j] = id < V ? l[id] : 0.f;
    }
    if (FAST) {
      // !(v < thr_v) also lets NaN through to the exact key test.
      bool any = false;
#pragma unroll
      for (int j = 0; j < SAMPLE_UNROLL; j++) any |= base + j * 32 + lane < V && !(v[j] < thr_v);
      if (!__any_sync(KV_FULL_MASK, any)) continue;
    }
#pragma unroll
    for (int j = 0; j < SAMPLE_UNROLL; j++) {
      const int id = base + j * 32 + lane;
      bool pass = id < V && (FAST ? !(v[j] < thr_v) : (!PREFILTER || bound == 0 || v[j] >= bound_v));
      const uint64_t key = pass ? sample_key(v[j], id) : 0;
      pass = pass && key > thr;
      if (pass && has_ban) pass = !((ban_bits[id >> 5] >> (id & 31)) & 1u);
      unsigned mask = __ballot_sync(KV_FULL_MASK, pass);
      while (mask) {
        const int src = __ffs(mask) - 1;
        mask &= mask - 1;
        const uint64_t x = __shfl_sync(KV_FULL_MASK, key, src);
        if (x <= thr) continue;  // warp-uniform: the list moved on since the ballot
        // Insert x at position p = number of entries greater than x.
        const int p = __popc(__ballot_sync(KV_FULL_MASK, e0 > x)) +
                      __popc(__ballot_sync(KV_FULL_MASK, e1 > x));
        const uint64_t up0 = __shfl_up_sync(KV_FULL_MASK, e0, 1);
        const uint64_t up1 = __shfl_up_sync(KV_FULL_MASK, e1, 1);
        const uint64_t last0 = __shfl_sync(KV_FULL_MASK, e0, 31);
        const uint64_t prev1 = lane == 0 ? last0 : up1;
        e0 = lane < p ? e0 : (lane == p ? x : up0);
        e1 = lane + 32 < p ? e1 : (lane + 32 == p ? x : prev1);
        thr = max(thr0, K <= 32 ? __shfl_sync(KV_FULL_MASK, e0, K - 1) : __shfl_sync(KV_FULL_MASK, e1, K - 33));
        if (FAST && thr > thr0 && (thr >> 32) != 0) thr_v = sample_key_value(thr);
      }
    }
  }
  lists[warp][lane] = e0;
  lists[warp][lane + 32] = e1;
  __syncthreads();

  // 3. Pairwise merge, keeping the top K of each pair in the left list.
  if (FAST) sample_merge_lists(lists, SAMPLE_WARPS, warp, lane);
  for (int st = 1; !FAST && st < SAMPLE_WARPS; st *= 2) {
    if (warp % (2 * st) == 0) {
      uint64_t *A = lists[warp];
      const uint64_t *B = lists[warp + st];
      uint64_t val[4];
      int rank[4];
#pragma unroll
      for (int q = 0; q < 4; q++) {
        const int i = lane + 32 * (q & 1);
        rank[q] = K;  // not written
        val[q] = 0;
        if (i < K) {
          val[q] = q < 2 ? A[i] : B[i];
          rank[q] = i + sample_count_greater(q < 2 ? B : A, K, val[q]);
        }
      }
      __syncwarp();
#pragma unroll
      for (int q = 0; q < 4; q++)
        if (rank[q] < K) A[rank[q]] = val[q];
    }
    __syncthreads();
  }

  // 4. Softmax over the candidates and the cumulative pick.
  if (warp == 0) {
    const int32_t pick = sample_pick(out + b, also ? also + b : nullptr, lists[0], probs, K, seed, ctr, lane);
    if (lane == 0) succ_record(slot, pick);
  }
}

// v5: many blocks per row, two kernels, for few rows (decode is B = 1):
// v1–v4 give a row one SM, which reads 200 KB at only 25–45 GB/s (measured:
// 4.6 µs for the bound pass, ~10 µs for the scan), so their floor is ~15
// µs. Here sample_chunks_kernel gives each 512-element chunk a block of 8
// warps; each warp sorts its 64 keys with a bitonic network (2 per lane),
// the block merges the 8 lists, and writes its sorted top 64 to scratch
// (B × G × 64 keys). sample_final_kernel merges a row's G lists (each warp
// folds every 32nd list in registers, then the 32 warp lists merge in
// shared memory) and picks. Bans: each chunk block marks the banned ids that
// fall in its chunk in a 512-bit bitmap. Both launch as programmatic
// dependents (sm_90): the chunk blocks start while the LM head finishes and
// build their ban bitmaps (the ban lists and previous tokens were copied in
// at the step's start, the 2-gram memory written by earlier steps) before
// they wait for its logits; the final block starts while the chunks finish,
// and finds where its pick goes in the memory before its wait too.
#define SAMPLE_CHUNK 512

__global__ void __launch_bounds__(256)
    sample_chunks_kernel(uint64_t *__restrict__ scratch, const float *__restrict__ logits,
                         const int32_t *__restrict__ banned, int V, int max_ban, int G, kv_succ succ) {
  __shared__ uint64_t lists[8][64];
  __shared__ uint32_t ban_bits[SAMPLE_CHUNK / 32];
  __shared__ int ban_end;
  const int c = blockIdx.x, b = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int base = c * SAMPLE_CHUNK;
  const float *l = logits + (long long)b * V;
  const int i0 = base + warp * 64 + lane, i1 = i0 + 32;
  bool ban0 = false, ban1 = false;
  if (max_ban > 0 || succ.count != nullptr) {
    const int32_t *bl = banned + (long long)b * max_ban;
    if (threadIdx.x < SAMPLE_CHUNK / 32) ban_bits[threadIdx.x] = 0;
    if (threadIdx.x == 0) ban_end = max_ban;
    __syncthreads();
    // The list ends at its first negative entry.
    for (int i = threadIdx.x; i < max_ban; i += blockDim.x)
      if (bl[i] < 0) atomicMin(&ban_end, i);
    __syncthreads();
    const int end = ban_end;
    auto mark = [&](int id) {
      const int t = id - base;
      if (t >= 0 && t < SAMPLE_CHUNK) atomicOr(&ban_bits[t >> 5], 1u << (t & 31));
    };
    for (int i = threadIdx.x; i < end; i += blockDim.x) mark(bl[i]);
    if (succ.count != nullptr) succ_each(succ, b, V, mark);  // the memory was written by earlier steps
    __syncthreads();
    ban0 = (ban_bits[(i0 - base) >> 5] >> ((i0 - base) & 31)) & 1u;
    ban1 = (ban_bits[(i1 - base) >> 5] >> ((i1 - base) & 31)) & 1u;
  }
  kv_pdl_wait();  // the logits
  kv_pdl_launch_dependents();
  const float v0 = i0 < V ? l[i0] : 0.f, v1 = i1 < V ? l[i1] : 0.f;
  uint64_t x0 = i0 < V && !ban0 ? sample_key(v0, i0) : 0;
  uint64_t x1 = i1 < V && !ban1 ? sample_key(v1, i1) : 0;
  sample_sort64(x0, x1, lane);
  lists[warp][lane] = x0;
  lists[warp][lane + 32] = x1;
  __syncthreads();
  sample_merge_lists(lists, 8, warp, lane);
  if (threadIdx.x < 64) scratch[((long long)b * G + c) * 64 + threadIdx.x] = lists[0][threadIdx.x];
}

// sample_final_kernel: LK = 64 merges the chunks' whole lists; LK = 32
// (K ≤ 32, decode's top-5 and top-20) only their first 32 keys, a key a
// lane: the top K ≤ 32 of a row is among its chunks' top 32, and a merge of
// 32-key lists is 5 shuffle stages on one register instead of 6 on two,
// which is what the one-block kernel is made of (docs/PERF.md, version 14:
// ~22 k warp instructions, ~8 µs of a decode step at LK = 64).
template <int LK>
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_final_kernel(int32_t *__restrict__ out, int32_t *__restrict__ also, const uint64_t *__restrict__ scratch,
                        const int32_t *__restrict__ counter, int V, int G, int K, uint64_t seed,
                        kv_succ succ, unsigned *__restrict__ clear, int nclear) {
  __shared__ uint64_t lists[SAMPLE_WARPS][LK];
  __shared__ float probs[64];
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t ctr = threadIdx.x == 0 ? (uint32_t)counter[b] : 0u;  // copied in at the step's start
  // Where the pick goes in the 2-gram memory, found before the wait so that
  // recording it costs two stores after the pick.
  succ_slot slot = {nullptr, nullptr, 0};
  if (succ.count != nullptr && threadIdx.x == 0) slot = succ_reserve(succ, b, V);
  const uint64_t *src = scratch + (long long)b * G * 64;
  kv_pdl_wait();  // the chunks' lists
  if (b == 0)
    for (int i = threadIdx.x; i < nclear; i += blockDim.x) clear[i] = 0;
  // A warp folds lists warp, warp + 32, …: the first kSampleFoldLoads of
  // them are all loaded before any merge, one round of loads instead of one
  // a list.
  constexpr int kSampleFoldLoads = 4;
  if constexpr (LK == 32) {
    uint64_t y[kSampleFoldLoads];
#pragma unroll
    for (int i = 0; i < kSampleFoldLoads; i++) {
      const int g = warp + i * SAMPLE_WARPS;
      y[i] = g < G ? src[g * 64 + (i == 0 ? lane : 31 - lane)] : 0;
    }
    uint64_t x = y[0];
#pragma unroll
    for (int i = 1; i < kSampleFoldLoads; i++)
      if (warp + i * SAMPLE_WARPS < G) x = sample_bitonic_merge32(max(x, y[i]), lane);
    for (int g = warp + kSampleFoldLoads * SAMPLE_WARPS; g < G; g += SAMPLE_WARPS)
      x = sample_bitonic_merge32(max(x, src[(long long)g * 64 + 31 - lane]), lane);
    lists[warp][lane] = x;
    __syncthreads();
    sample_merge_lists32(lists, SAMPLE_WARPS, warp, lane);
  } else {
    uint64_t y0[kSampleFoldLoads], y1[kSampleFoldLoads];
#pragma unroll
    for (int i = 0; i < kSampleFoldLoads; i++) {
      const int g = warp + i * SAMPLE_WARPS;
      const bool ok = g < G;
      y0[i] = ok ? src[g * 64 + (i == 0 ? lane : 63 - lane)] : 0;
      y1[i] = ok ? src[g * 64 + (i == 0 ? lane + 32 : 31 - lane)] : 0;
    }
    uint64_t x0 = y0[0], x1 = y1[0];
#pragma unroll
    for (int i = 1; i < kSampleFoldLoads; i++) {
      if (warp + i * SAMPLE_WARPS < G) {
        x0 = max(x0, y0[i]);
        x1 = max(x1, y1[i]);
        sample_bitonic_merge(x0, x1, lane);
      }
    }
    for (int g = warp + kSampleFoldLoads * SAMPLE_WARPS; g < G; g += SAMPLE_WARPS) {
      const uint64_t *L = src + (long long)g * 64;
      x0 = max(x0, L[63 - lane]);
      x1 = max(x1, L[31 - lane]);
      sample_bitonic_merge(x0, x1, lane);
    }
    lists[warp][lane] = x0;
    lists[warp][lane + 32] = x1;
    __syncthreads();
    sample_merge_lists(lists, SAMPLE_WARPS, warp, lane);
  }
  // sample_pick reads entries at or above 32 only for K > 32.
  if (warp == 0) {
    const int32_t pick = sample_pick(out + b, also ? also + b : nullptr, lists[0], probs, K, seed, ctr, lane);
    if (lane == 0) succ_record(slot, pick);
  }
}

cudaError_t kv_sample_final(cudaStream_t s, int32_t *out, int32_t *also, const uint64_t *scratch, const int32_t *counter, int B,
                            int V, int G, int K, uint64_t seed, kv_succ succ, unsigned *clear, int nclear) {
  return kv_launch_clustered(K <= 32 ? sample_final_kernel<32> : sample_final_kernel<64>, 1, dim3(B),
                             dim3(SAMPLE_THREADS), 0, s, kv_pdl_supported(), out, also, scratch, counter, V, G, K, seed,
                             succ, clear, nclear);
}

// Static shared memory of sample_kernel (lists, probs, warp bounds), with margin.
#define SAMPLE_STATIC_SMEM (17 * 1024)

// kv_sample_init lets the sampling kernels (and head.cu's) use the device's opt-in shared
// memory (smem_optin bytes per block; cudaDevAttrMaxSharedMemoryPerBlockOptin).
// Called once per device when a backend opens, so launches (possibly inside
// a graph capture) need no attribute calls.
extern "C" kv_status kv_sample_init(int smem_optin) {
  KV_TRY(kv_head_init(smem_optin));
  const int dyn = smem_optin - SAMPLE_STATIC_SMEM;
  if (dyn <= 48 * 1024) return 0;
  const cudaFuncAttribute a = cudaFuncAttributeMaxDynamicSharedMemorySize;
  KV_TRY(cudaFuncSetAttribute(sample_kernel<false, false, false>, a, dyn));
  KV_TRY(cudaFuncSetAttribute(sample_kernel<true, false, false>, a, dyn));
  KV_TRY(cudaFuncSetAttribute(sample_kernel<true, true, false>, a, dyn));
  KV_TRY(cudaFuncSetAttribute(sample_kernel<false, false, true>, a, dyn));
  KV_TRY(cudaFuncSetAttribute(sample_kernel<true, false, true>, a, dyn));
  return 0;
}

extern "C" kv_status kv_sample(kv_stream s, int32_t *out, int32_t *also, const float *logits,
                               const int32_t *banned, const int32_t *counter, int B, int V,
                               int top_k, int max_ban, uint64_t seed, kv_succ succ, int smem_optin,
                               uint64_t *scratch, long long scratch_keys, int variant) {
  if (B <= 0) return 0;
  const bool has_succ = succ.count != nullptr;
  if (V <= 0 || top_k < 1 || top_k > KV_SAMPLE_MAX_TOPK || max_ban < 0 ||
      (max_ban > 0 && banned == nullptr))
    return (kv_status)cudaErrorInvalidValue;
  if (has_succ && (succ.prev == nullptr || succ.dir == nullptr || succ.pages == nullptr || succ.used == nullptr ||
                   succ.prev_stride < 1 || succ.keep < 1 || succ.dirs != (succ.keep + 31) / 32 || succ.n_pages < 0))
    return (kv_status)cudaErrorInvalidValue;
  const size_t ban_bytes = max_ban > 0 || has_succ ? (size_t)((V + 31) / 32 + 3) / 4 * 16 : 0;
  const size_t staged_bytes = ban_bytes + (size_t)V * 4;
  // The dynamic limit kv_sample_init set (48 KB without it).
  const size_t limit = smem_optin - SAMPLE_STATIC_SMEM > 48 * 1024 ? (size_t)(smem_optin - SAMPLE_STATIC_SMEM)
                                                                    : 48 * 1024;
  if (ban_bytes > limit) return (kv_status)cudaErrorInvalidValue;
  const int G = (V + SAMPLE_CHUNK - 1) / SAMPLE_CHUNK;
  const bool v5_fits = scratch != nullptr && (long long)B * G * 64 <= scratch_keys && B <= 65535;
  // Measured (H200, V = 50257, graph-timed): B = 1: v5 10.5 µs vs v4 16.9
  // (K = 1) and 10.8 vs 24.9 (K = 40); B = 16: equal (24.8); B = 64: v5 65
  // µs vs v4 27 — with many rows one block per row already fills the GPU.
  if (((variant == 0 && B <= 16) || variant == 5) && v5_fits) {
    const bool pdl = kv_pdl_supported();
    KV_TRY(kv_launch_clustered(sample_chunks_kernel, 1, dim3(G, B), dim3(256), 0, s, pdl, scratch, logits, banned, V,
                               max_ban, G, succ));
    KV_TRY(kv_sample_final(s, out, also, scratch, counter, B, V, G, top_k, seed, succ, nullptr, 0));
    return kv_launched();
  }
  const dim3 grid(B), block(SAMPLE_THREADS);
  if (variant == 1) {
    sample_kernel<false, false, false><<<grid, block, ban_bytes, s>>>(out, also, logits, banned, counter, V,
                                                                      top_k, max_ban, seed, succ);
  } else if (variant == 2 || (variant == 3 && staged_bytes > limit)) {
    sample_kernel<true, false, false><<<grid, block, ban_bytes, s>>>(out, also, logits, banned, counter, V,
                                                                     top_k, max_ban, seed, succ);
  } else if (variant == 3) {
    sample_kernel<true, true, false><<<grid, block, staged_bytes, s>>>(out, also, logits, banned, counter,
                                                                       V, top_k, max_ban, seed, succ);
  } else if (top_k > 8) {  // v4 (the default when v5 has no scratch)
    sample_kernel<true, false, true><<<grid, block, ban_bytes, s>>>(out, also, logits, banned, counter, V,
                                                                    top_k, max_ban, seed, succ);
  } else {
    sample_kernel<false, false, true><<<grid, block, ban_bytes, s>>>(out, also, logits, banned, counter, V,
                                                                     top_k, max_ban, seed, succ);
  }
  return kv_launched();
}
