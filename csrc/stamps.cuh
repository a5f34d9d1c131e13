// stamps.cuh — in-kernel timestamps for measuring builds (make -C csrc
// STAMPS=1, i.e. nvcc -DKV_STAMPS; read with scripts/stamps.py).
//
// Thread 0 of each stamped block takes a record in its translation unit's
// ring (an atomic in the prologue, before the programmatic wait) and writes
// %globaltimer at checkpoints: where a kernel's time goes after its wait,
// and how long the hand-off from its predecessor took. Without KV_STAMPS
// everything here compiles to nothing. Record words: [0] kernel id, block;
// [1] start, [2] past the programmatic wait, [3..7] the kernel's
// checkpoints, [8] end of the prologue, [9..15] more checkpoints (ns,
// %globaltimer, 32 ns steps on an H100); [16 + k] clock64 at [k].
#pragma once

#ifdef KV_STAMPS
namespace {
constexpr unsigned kStampCap = 1u << 15;  // records a translation unit
constexpr int kStampWords = 32;            // [0] id·2^48 | y·2^24 | x, [1..15] ns, [16 + k] clock64 at k
__device__ unsigned long long kv_stamp_rec[(size_t)kStampCap * kStampWords];
__device__ unsigned int kv_stamp_n;

__device__ __forceinline__ unsigned long long kv_stamp_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
  return t;
}

struct KvStamp {
  unsigned long long *r = nullptr;
  __device__ __forceinline__ explicit KvStamp(int id) {
    if (threadIdx.x == 0) {
      const unsigned i = atomicAdd(&kv_stamp_n, 1u) % kStampCap;
      r = kv_stamp_rec + (size_t)i * kStampWords;
      r[0] = ((unsigned long long)id << 48) | ((unsigned long long)blockIdx.y << 24) | blockIdx.x;
#pragma unroll
      for (int k = 2; k < kStampWords; k++) r[k] = 0;
      r[17] = clock64();
      r[1] = kv_stamp_ns();
    }
  }
  __device__ __forceinline__ void at(int k) const {
    if (r) {
      r[16 + k] = clock64();
      r[k] = kv_stamp_ns();
    }
  }
};
}  // namespace

// KV_STAMP_TU(name): the host function that copies this unit's ring out
// (kv_stamps_<name>): up to cap records into dst, returns how many were
// taken in all (the ring keeps the newest kStampCap).
#define KV_STAMP_TU(name)                                                                        \
  extern "C" long long kv_stamps_##name(unsigned long long *dst, long long cap) {                \
    unsigned n = 0;                                                                               \
    if (cudaDeviceSynchronize() != cudaSuccess) return -1;                                        \
    if (cudaMemcpyFromSymbol(&n, kv_stamp_n, sizeof n) != cudaSuccess) return -1;                 \
    const long long words = (long long)(cap < (long long)kStampCap ? cap : kStampCap) * kStampWords; \
    if (cudaMemcpyFromSymbol(dst, kv_stamp_rec, words * 8) != cudaSuccess) return -1;            \
    return n;                                                                                     \
  }
#define KV_STAMP_DECL(var, id) KvStamp var(id)
#define KV_STAMP_AT(var, k) var.at(k)
#else
#define KV_STAMP_TU(name)
#define KV_STAMP_DECL(var, id)
#define KV_STAMP_AT(var, k)
#endif
