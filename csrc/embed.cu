// embed.cu — token (+ learned position) embedding, GPT-2's wte/wpe and
// Llama's embed_tokens: out[N,C] = wte[tokens[r]] + wpe[pos[r]].
#include "common.cuh"

// embed_value: element c of wte[t] + wpe[p] (wte[t] alone without wpe), a
// NaN for an id outside its table (kv_embedding); pos() gives p, called
// only where wpe is read.
template <typename Pos>
__device__ __forceinline__ float embed_value(const void *__restrict__ wte, int wte_f16, int V,
                                             const void *__restrict__ wpe, int wpe_f16, int P, int C, int c, int t,
                                             Pos pos) {
  const float v = kv_embedding(wte, wte_f16, V, C, t, c);
  return wpe == nullptr ? v : v + kv_embedding(wpe, wpe_f16, P, C, pos(), c);
}

// v1: grid (N, ceil(C/256)), one element per thread; embedding rows are
// short (C ≤ a few thousand), so this is bound by launch latency, not
// bandwidth, and needs no vector loads. An id outside the table gives a NaN
// row rather than a wild read that would poison the CUDA context. It lets
// its programmatic dependent (the first layer's q|k|v product) launch at
// once, so that the product's weight prefetch overlaps this kernel; the
// dependent reads the embeddings only after its wait. (Launched normally,
// this kernel starts when everything before it has completed.)
__global__ void embed_kernel_v1(float *__restrict__ out, const void *__restrict__ wte, int wte_f16,
                                int V, const void *__restrict__ wpe, int wpe_f16, int P,
                                const int32_t *__restrict__ tokens, const int32_t *__restrict__ pos,
                                int C) {
  kv_pdl_launch_dependents();
  const int r = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= C) return;
  out[(long long)r * C + c] =
      embed_value(wte, wte_f16, V, wpe, wpe_f16, P, C, c, tokens[r], [&] { return pos[r]; });
}

extern "C" kv_status kv_embed(kv_stream s, float *out, const void *wte, int wte_f16, int V,
                              const void *wpe, int wpe_f16, int P, const int32_t *tokens,
                              const int32_t *pos, int N, int C) {
  if (N <= 0 || C <= 0) return 0;
  if (C > 65535 * 256) return (kv_status)cudaErrorInvalidValue;
  dim3 grid(N, kv_ceil_div(C, 256));
  embed_kernel_v1<<<grid, 256, 0, s>>>(out, wte, wte_f16, V, wpe, wpe_f16, P, tokens, pos, C);
  return kv_launched();
}
