// activation.cu — GPT-2's gelu_new (HF NewGELUActivation) in place and
// SwiGLU's silu(gate)·up (HF LlamaMLP).
#include "common.cuh"

// v1: grid-stride, one element per thread per step. Full-precision tanhf
// (no tanh.approx, no fast math): the tanh form as HF writes it, so fp32
// rounding matches torch's.
__global__ void gelu_new_kernel_v1(float *__restrict__ x, long long n) {
  const float k = 0.7978845608028654f;  // sqrt(2/π)
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.f + tanhf(k * (v + 0.044715f * v * v * v)));
  }
}

// v1: grid (N, ceil(F/256)); gate and up rows row_stride apart (one fused
// gate|up matmul output feeds it), out rows F apart. Full-precision expf.
__global__ void silu_mul_kernel_v1(float *__restrict__ out, const float *__restrict__ gate,
                                   const float *__restrict__ up, int F, int row_stride) {
  const int r = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= F) return;
  const float g = gate[(long long)r * row_stride + i];
  out[(long long)r * F + i] = g / (1.f + expf(-g)) * up[(long long)r * row_stride + i];
}

extern "C" kv_status kv_gelu_new(kv_stream s, float *x, long long n) {
  if (n <= 0) return 0;
  long long blocks = (n + 255) / 256;
  if (blocks > 132 * 32) blocks = 132 * 32;  // enough to fill any current GPU; the rest loops
  gelu_new_kernel_v1<<<(int)blocks, 256, 0, s>>>(x, n);
  return kv_launched();
}

extern "C" kv_status kv_silu_mul(kv_stream s, float *out, const float *gate, const float *up,
                                 int N, int F, int row_stride) {
  if (N <= 0 || F <= 0) return 0;
  if (F > 65535 * 256) return (kv_status)cudaErrorInvalidValue;
  silu_mul_kernel_v1<<<dim3(N, kv_ceil_div(F, 256)), 256, 0, s>>>(out, gate, up, F, row_stride);
  return kv_launched();
}
