// cache.cu — KV-cache writes: row r of src (row_size elements, src_stride
// apart; e.g. the K or V part of a fused qkv row) goes to slot slots[r].
#include "common.cuh"

// v1: grid (N, ceil(row_size/256)), one element per thread. Slots outside
// [0, S) are skipped (the caller marks padding rows with −1), which also
// keeps a bad slot from writing outside the cache.
__global__ void cache_store_kernel_v1(float *__restrict__ cache, int S, const float *__restrict__ src,
                                      const int32_t *__restrict__ slots, int row_size,
                                      int src_stride) {
  const int r = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  const int slot = slots[r];
  if (c >= row_size || slot < 0 || slot >= S) return;
  cache[(long long)slot * row_size + c] = src[(long long)r * src_stride + c];
}

extern "C" kv_status kv_cache_store(kv_stream s, float *cache, int S, const float *src,
                                    const int32_t *slots, int N, int row_size, int src_stride) {
  if (N <= 0 || row_size <= 0) return 0;
  if (row_size > 65535 * 256) return (kv_status)cudaErrorInvalidValue;
  cache_store_kernel_v1<<<dim3(N, kv_ceil_div(row_size, 256)), 256, 0, s>>>(cache, S, src, slots,
                                                                              row_size, src_stride);
  return kv_launched();
}
