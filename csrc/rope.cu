// rope.cu — rotary position embedding in HF's rotate-half convention
// (LlamaRotaryEmbedding + apply_rotary_pos_emb): for pair i < HS/2 of a head,
// x1' = x1·cos − x2·sin, x2' = x2·cos + x1·sin with x1 = x[i], x2 = x[i+HS/2]
// and the angle float32(pos)·inv_freq[i] (float32, as HF computes it).
#include "common.cuh"

// v1: one block per row. The row's HS/2 angles are shared by all its heads,
// so the block computes cos/sin once into shared memory (full-precision
// sincosf: positions reach 1e5 rad, where sin.approx would be useless), then
// rotates every pair of every head.
__global__ void rope_kernel_v1(float *__restrict__ x, const int32_t *__restrict__ pos, int n_heads,
                               int HS, int row_stride, float theta) {
  __shared__ float cs[512], sn[512];
  const int half = HS / 2;
  const float p = (float)pos[blockIdx.x];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    sincosf(p * kv_rope_inv_freq(i, HS, theta), &sn[i], &cs[i]);
  }
  __syncthreads();
  float *row = x + (long long)blockIdx.x * row_stride;
  for (int k = threadIdx.x; k < n_heads * half; k += blockDim.x) {
    const int h = k / half, i = k - h * half;
    float *head = row + h * HS;
    const float x1 = head[i], x2 = head[i + half];
    head[i] = fmaf(x1, cs[i], -x2 * sn[i]);
    head[i + half] = fmaf(x2, cs[i], x1 * sn[i]);
  }
}

// v2: one thread per rotated pair, grid (N, pairs/128): the x loads are
// issued first and overlap the position load and the angle math, and there
// is no __syncthreads. The pow and sincos are recomputed per head, which costs
// nothing next to the latency v1 pays for its two dependent phases.
__global__ void rope_kernel_v2(float *__restrict__ x, const int32_t *__restrict__ pos, int n_heads,
                               int HS, int row_stride, float theta) {
  const int half = HS / 2;
  const int k = blockIdx.y * blockDim.x + threadIdx.x;
  if (k >= n_heads * half) return;
  const int h = k / half, i = k - h * half;
  float *head = x + (long long)blockIdx.x * row_stride + h * HS;
  float x1 = head[i], x2 = head[i + half];
  kv_rope_pair(x1, x2, (float)pos[blockIdx.x] * kv_rope_inv_freq(i, HS, theta));
  head[i] = x1;
  head[i + half] = x2;
}

extern "C" kv_status kv_rope(kv_stream s, float *x, const int32_t *pos, int N, int n_heads, int HS,
                             int row_stride, float theta, int variant) {
  if (N <= 0 || n_heads <= 0) return 0;
  if (HS <= 0 || HS % 2 != 0 || HS > 1024) return (kv_status)cudaErrorInvalidValue;
  const int pairs = n_heads * HS / 2;
  // Measured on H200: v2 1.7 µs vs v1 2.1 µs per call at N = 1, but v1 4.6
  // µs vs v2 6.6 µs at N = 1024 (v2 redoes the double-precision pow per head).
  if (variant == 0) variant = N <= 64 ? 2 : 1;
  if (variant == 1) {
    int threads = (pairs + 31) / 32 * 32;
    if (threads > 256) threads = 256;
    rope_kernel_v1<<<N, threads, 0, s>>>(x, pos, n_heads, HS, row_stride, theta);
  } else {
    if (pairs > 65535 * 128) return (kv_status)cudaErrorInvalidValue;
    rope_kernel_v2<<<dim3(N, kv_ceil_div(pairs, 128)), 128, 0, s>>>(x, pos, n_heads, HS, row_stride,
                                                                     theta);
  }
  return kv_launched();
}
