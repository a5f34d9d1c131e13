// sampling.cuh — the sampler's shared pieces (sampling.cu, head.cu): the
// counter-based uniform, candidate keys, the bitonic sorts and merges of
// 64- and 32-key lists, the pick, and the 2-gram memory.
#pragma once

#include "common.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)

// ref.Uniform, bit for bit: SplitMix64 of seed + counter·golden, top 24 bits.
__device__ __forceinline__ float kv_uniform(uint64_t seed, uint32_t counter) {
  uint64_t z = seed + (uint64_t)counter * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)(z >> 40) / 16777216.0f;
}

// A candidate as one 64-bit key whose unsigned order is the reference's
// order: the logit's bits made monotone in the high word, the complemented
// id in the low word (so equal logits put the lower id first). −0 is folded
// into +0 because the reference compares values, for which they tie; NaN
// sorts below everything. 0 never occurs and marks an empty list entry.
__device__ __forceinline__ uint64_t sample_key(float v, int id) {
  uint32_t hi;
  if (v != v) {
    hi = 0;
  } else {
    if (v == 0.f) v = 0.f;
    const uint32_t u = __float_as_uint(v);
    hi = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return ((uint64_t)hi << 32) | (uint32_t)(~(uint32_t)id);
}

__device__ __forceinline__ float sample_key_value(uint64_t key) {
  const uint32_t hi = (uint32_t)(key >> 32);
  return __uint_as_float((hi & 0x80000000u) ? (hi & 0x7fffffffu) : ~hi);
}

__device__ __forceinline__ int32_t sample_key_id(uint64_t key) { return (int32_t)(~(uint32_t)key); }

// Number of entries of the descending list L[0..K) greater than x.
__device__ __forceinline__ int sample_count_greater(const uint64_t *L, int K, uint64_t x) {
  int lo = 0, hi = K;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (L[mid] > x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// sample_pick (one warp): softmax over the K best keys of the sorted list L
// (0 = empty) and the cumulative pick into *out, as the reference does it:
// float32(exp(double(l − max))) per candidate in parallel, then lane 0 sums
// and scans sequentially in fp32, so the choice matches bit for bit. Lane 0
// also returns the pick (−1: every candidate banned), and writes it to
// *also too where that is not null (the next step's device copy).
__device__ __forceinline__ int32_t sample_pick(int32_t *out, int32_t *also, const uint64_t *L, float *probs, int K,
                                               uint64_t seed, uint32_t ctr, int lane) {
  const uint64_t k0 = lane < K ? L[lane] : 0;
  const uint64_t k1 = lane + 32 < K ? L[lane + 32] : 0;
  const int n = __popc(__ballot_sync(KV_FULL_MASK, k0 != 0)) + __popc(__ballot_sync(KV_FULL_MASK, k1 != 0));
  if (n == 0) {
    if (lane == 0) {
      *out = -1;
      if (also) *also = -1;
    }
    return -1;
  }
  const float m = sample_key_value(L[0]);
  if (k0 != 0) probs[lane] = (float)exp((double)(sample_key_value(k0) - m));
  if (k1 != 0) probs[lane + 32] = (float)exp((double)(sample_key_value(k1) - m));
  __syncwarp();
  if (lane == 0) {
    float sum = 0.f;
    for (int i = 0; i < n; i++) sum += probs[i];
    const float u = __fmul_rn(kv_uniform(seed, ctr), sum);
    float cum = 0.f;
    int32_t pick = sample_key_id(L[n - 1]);
    for (int i = 0; i < n; i++) {
      cum = __fadd_rn(cum, probs[i]);
      if (u < cum) {
        pick = sample_key_id(L[i]);
        break;
      }
    }
    *out = pick;
    if (also) *also = pick;
    return pick;
  }
  return -1;
}

// The 2-gram memory (kv_succ in kvalign.h, gpu.Successors, ref.Successors).

// succ_each calls mark(t) for every successor row b's memory keeps after the
// row's previous token, the block's threads sharing the ring (the order of
// calls is not defined; a ban set needs none).
template <class Mark>
__device__ __forceinline__ void succ_each(const kv_succ &m, int b, int V, Mark mark) {
  const int prev = m.prev[(long long)b * m.prev_stride];
  if (prev < 0 || prev >= V) return;
  const long long cell = (long long)b * V + prev;
  const int n = min(m.count[cell], m.keep);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int page = m.dir[cell * m.dirs + (i >> 5)];
    mark(m.pages[(long long)page * 32 + (i & 31)]);
  }
}

// succ_slot is where one row's pick will be recorded: its ring entry and
// the count to store after it (entry == nullptr: nothing to record).
struct succ_slot {
  int32_t *entry, *count;
  int next;
};

// succ_reserve (one thread) finds the slot for row b's pick after its
// previous token, taking a new ring page when the slot starts one. It needs
// nothing this step computes, so the kernels call it before their
// programmatic wait; the pick itself cannot already be in the ring (the
// sampler banned every entry), so recording is a plain append.
__device__ __forceinline__ succ_slot succ_reserve(const kv_succ &m, int b, int V) {
  succ_slot r = {nullptr, nullptr, 0};
  const int prev = m.prev[(long long)b * m.prev_stride];
  if (prev < 0 || prev >= V) return r;
  const long long cell = (long long)b * V + prev;
  const int j = m.count[cell], slot = j % m.keep;
  int32_t *d = &m.dir[cell * m.dirs + slot / 32];
  int page;
  if (j < m.keep && slot % 32 == 0) {
    page = atomicAdd(m.used, 1);
    if (page >= m.n_pages) return r;  // out of pages: *used > n_pages tells the host
    *d = page;                        // unread until the count passes the slot
  } else {
    page = *d;
  }
  r.entry = &m.pages[(long long)page * 32 + slot % 32];
  r.count = &m.count[cell];
  r.next = j + 1;
  return r;
}

__device__ __forceinline__ void succ_record(const succ_slot &r, int32_t pick) {
  if (r.entry != nullptr && pick >= 0) {
    *r.entry = pick;
    *r.count = r.next;
  }
}

// sample_bitonic_merge sorts (descending) a bitonic sequence of 64 keys
// held by one warp: element lane in x0, element lane+32 in x1.
__device__ __forceinline__ void sample_bitonic_merge(uint64_t &x0, uint64_t &x1, int lane) {
  const uint64_t hi = max(x0, x1);
  x1 = min(x0, x1);
  x0 = hi;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t p0 = __shfl_xor_sync(KV_FULL_MASK, x0, o);
    const uint64_t p1 = __shfl_xor_sync(KV_FULL_MASK, x1, o);
    const bool lower = (lane & o) == 0;
    x0 = lower ? max(x0, p0) : min(x0, p0);
    x1 = lower ? max(x1, p1) : min(x1, p1);
  }
}

// sample_sort64 sorts 64 keys held by one warp (x0: element lane, x1:
// element lane+32) descending with the bitonic network: element i of a
// stage (k, j) keeps the max when "i is the lower of its pair" equals "its
// k-block runs descending".
__device__ __forceinline__ void sample_sort64(uint64_t &x0, uint64_t &x1, int lane) {
#pragma unroll
  for (int k = 2; k <= 32; k <<= 1) {
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      const uint64_t p0 = __shfl_xor_sync(KV_FULL_MASK, x0, j);
      const uint64_t p1 = __shfl_xor_sync(KV_FULL_MASK, x1, j);
      const bool lower = (lane & j) == 0;
      const bool desc0 = (lane & k) == 0, desc1 = ((lane + 32) & k) == 0;
      x0 = lower == desc0 ? max(x0, p0) : min(x0, p0);
      x1 = lower == desc1 ? max(x1, p1) : min(x1, p1);
    }
  }
  sample_bitonic_merge(x0, x1, lane);  // k = 64: every block descending
}

// sample_merge_lists merges nlists (a power of two, ≤ warps in the block)
// sorted 64-key lists in shared memory pairwise into lists[0]: max(A[i],
// B[63−i]) holds the top 64 of A ∪ B as a bitonic sequence. All threads of
// the block must call it.
__device__ __forceinline__ void sample_merge_lists(uint64_t (*lists)[64], int nlists, int warp, int lane) {
  for (int st = 1; st < nlists; st *= 2) {
    if (warp % (2 * st) == 0 && warp + st < nlists) {
      uint64_t *A = lists[warp];
      const uint64_t *B = lists[warp + st];
      uint64_t x0 = max(A[lane], B[63 - lane]);
      uint64_t x1 = max(A[lane + 32], B[31 - lane]);
      sample_bitonic_merge(x0, x1, lane);
      __syncwarp();
      A[lane] = x0;
      A[lane + 32] = x1;
    }
    __syncthreads();
  }
}

// sample_bitonic_merge32 sorts (descending) a bitonic sequence of 32 keys,
// one a lane.
__device__ __forceinline__ uint64_t sample_bitonic_merge32(uint64_t x, int lane) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t p = __shfl_xor_sync(KV_FULL_MASK, x, o);
    x = (lane & o) == 0 ? max(x, p) : min(x, p);
  }
  return x;
}

// sample_merge_lists32: sample_merge_lists for sorted 32-key lists.
__device__ __forceinline__ void sample_merge_lists32(uint64_t (*lists)[32], int nlists, int warp, int lane) {
  for (int st = 1; st < nlists; st *= 2) {
    if (warp % (2 * st) == 0 && warp + st < nlists) {
      const uint64_t x = max(lists[warp][lane], lists[warp + st][31 - lane]);
      __syncwarp();
      lists[warp][lane] = sample_bitonic_merge32(x, lane);
    }
    __syncthreads();
  }
}


// kv_sample_final launches sample_final_kernel (sampling.cu) for B rows of
// G sorted 64-key lists in scratch, as a programmatic dependent where the
// device has it: the merge and the pick of kv_sample's two-kernel path.
// It also zeroes clear[0..nclear) once the kernel before it has finished
// (head.cu's threshold slots; NULL: nothing). also (NULL: none): a second
// place for the picks, as out.
cudaError_t kv_sample_final(cudaStream_t s, int32_t *out, int32_t *also, const uint64_t *scratch, const int32_t *counter, int B,
                            int V, int G, int K, uint64_t seed, kv_succ succ, unsigned *clear, int nclear);

// kv_head_init (head.cu) sets head_screen_kernel's shared memory limit;
// kv_sample_init calls it once per device.
cudaError_t kv_head_init(int smem_optin);
