// norm.cu — LayerNorm (GPT-2, torch.nn.LayerNorm: biased variance) and
// RMSNorm (HF LlamaRMSNorm) over rows of C. Weights and bias are half or
// float (w_f16); arithmetic is fp32.
#include "common.cuh"

// Threads per row: about four elements each, a whole number of warps.
static int norm_threads(int C) {
  int t = (C / 4 + 31) / 32 * 32;
  return t < 32 ? 32 : t > 1024 ? 1024 : t;
}

// v1: one block per row, two passes (mean, then the sum of squared
// deviations), matching the float64 reference to ~1e-6 where the one-pass
// E[x²]−E[x]² form would cancel badly for rows with a large mean. The second
// and third reads of the row hit L1.
__global__ void layernorm_kernel_v1(float *__restrict__ out, const float *__restrict__ in,
                                    const void *__restrict__ w, const void *__restrict__ b,
                                    int w_f16, int C, float eps) {
  __shared__ float scratch[32];
  const float *x = in + (long long)blockIdx.x * C;
  float *o = out + (long long)blockIdx.x * C;
  float sum = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) sum += x[c];
  const float mean = kv_block_sum(sum, scratch) / (float)C;
  float ss = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float d = x[c] - mean;
    ss += d * d;
  }
  const float rstd = 1.f / sqrtf(kv_block_sum(ss, scratch) / (float)C + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float y = (x[c] - mean) * rstd * kv_load_w(w, w_f16, c);
    if (b != nullptr) y += kv_load_w(b, w_f16, c);
    o[c] = y;
  }
}

// v1: one block per row, sum of squares in fp32.
__global__ void rmsnorm_kernel_v1(float *__restrict__ out, const float *__restrict__ in,
                                  const void *__restrict__ w, int w_f16, int C, float eps) {
  __shared__ float scratch[32];
  const float *x = in + (long long)blockIdx.x * C;
  float *o = out + (long long)blockIdx.x * C;
  float ss = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) ss += x[c] * x[c];
  const float rstd = 1.f / sqrtf(kv_block_sum(ss, scratch) / (float)C + eps);
  for (int c = threadIdx.x; c < C; c += blockDim.x) o[c] = x[c] * rstd * kv_load_w(w, w_f16, c);
}

extern "C" kv_status kv_layernorm(kv_stream s, float *out, const float *in, const void *w,
                                  const void *b, int w_f16, int N, int C, float eps) {
  if (N <= 0 || C <= 0) return 0;
  layernorm_kernel_v1<<<N, norm_threads(C), 0, s>>>(out, in, w, b, w_f16, C, eps);
  return kv_launched();
}

extern "C" kv_status kv_rmsnorm(kv_stream s, float *out, const float *in, const void *w,
                                int w_f16, int N, int C, float eps) {
  if (N <= 0 || C <= 0) return 0;
  rmsnorm_kernel_v1<<<N, norm_threads(C), 0, s>>>(out, in, w, w_f16, C, eps);
  return kv_launched();
}
