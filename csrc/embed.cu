// embed.cu — token (+ learned position) embedding, GPT-2's wte/wpe and
// Llama's embed_tokens: out[N,C] = wte[tokens[r]] + wpe[pos[r]].
#include "common.cuh"

// v1: grid (N, ceil(C/256)), one element per thread; embedding rows are
// short (C ≤ a few thousand), so this is bound by launch latency, not
// bandwidth, and needs no vector loads. An id outside the table gives a NaN
// row rather than a wild read that would poison the CUDA context. It lets
// its programmatic dependent (the first layer's q|k|v product) launch at
// once, so that the product's weight prefetch overlaps this kernel; the
// dependent reads the embeddings only after its wait. It is itself a
// programmatic dependent where the device has them: it launches while the
// step's input copy (copy_in_kernel) runs and waits for it before reading
// the ids.
__global__ void embed_kernel_v1(float *__restrict__ out, const void *__restrict__ wte, int wte_f16,
                                int V, const void *__restrict__ wpe, int wpe_f16, int P,
                                const int32_t *__restrict__ tokens, const int32_t *__restrict__ pos,
                                int C) {
  kv_pdl_launch_dependents();
  kv_pdl_wait();  // the ids (a decode step's inputs, copied in by the kernel before)
  const int r = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int t = tokens[r];
  float v;
  if (t < 0 || t >= V) {
    v = __int_as_float(0x7fffffff);
  } else {
    v = kv_load_w(wte, wte_f16, (long long)t * C + c);
    if (wpe != nullptr) {
      const int p = pos[r];
      v = (p < 0 || p >= P) ? __int_as_float(0x7fffffff)
                            : v + kv_load_w(wpe, wpe_f16, (long long)p * C + c);
    }
  }
  out[(long long)r * C + c] = v;
}

extern "C" kv_status kv_embed(kv_stream s, float *out, const void *wte, int wte_f16, int V,
                              const void *wpe, int wpe_f16, int P, const int32_t *tokens,
                              const int32_t *pos, int N, int C) {
  if (N <= 0 || C <= 0) return 0;
  if (C > 65535 * 256) return (kv_status)cudaErrorInvalidValue;
  dim3 grid(N, kv_ceil_div(C, 256));
  KV_TRY(kv_launch(embed_kernel_v1, grid, dim3(256), 0, s, kv_pdl_supported(), out, wte, wte_f16, V, wpe, wpe_f16, P,
                   tokens, pos, C));
  return kv_launched();
}
