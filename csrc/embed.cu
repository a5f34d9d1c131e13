// embed.cu — token (+ learned position) embedding, GPT-2's wte/wpe and
// Llama's embed_tokens: out[N,C] = wte[tokens[r]] + wpe[pos[r]].
#include "common.cuh"

// embed_value: element c of wte[t] + wpe[p] (wte[t] alone without wpe), a
// NaN for an id outside its table; pos() gives p, called only where wpe is
// read (embed_kernel_v1 loads it there; copy_in_embed_kernel has it already).
template <typename Pos>
__device__ __forceinline__ float embed_value(const void *__restrict__ wte, int wte_f16, int V,
                                             const void *__restrict__ wpe, int wpe_f16, int P, int C, int c, int t,
                                             Pos pos) {
  if (t < 0 || t >= V) return __int_as_float(0x7fffffff);
  const float v = kv_load_w(wte, wte_f16, (long long)t * C + c);
  if (wpe == nullptr) return v;
  const int p = pos();
  return (p < 0 || p >= P) ? __int_as_float(0x7fffffff) : v + kv_load_w(wpe, wpe_f16, (long long)p * C + c);
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

// copy_in_embed_kernel is kv_copy_in's copy and embed_kernel_v1 in one
// launch, a decode step's first: it reads the pinned block itself over the
// bus (host memory at its device address), the ids at offsets tok_off and
// pos_off (pos_off < 0: no wpe) together with the rest, instead of a graph
// memcpy node and then the embedding (docs/PERF.md, version 15: the node
// took 2.6 µs and the embedding started after it). Every block copies its
// share of the n ints to dst. Like embed_kernel_v1 it lets the next kernel
// launch at once; that kernel reads dst (and out) only after its
// programmatic wait, when this kernel has completed (kvalign.h).
__global__ void __launch_bounds__(256)
    copy_in_embed_kernel(float *__restrict__ out, const void *__restrict__ wte, int wte_f16, int V,
                         const void *__restrict__ wpe, int wpe_f16, int P, int32_t *__restrict__ dst,
                         const int32_t *__restrict__ src, int n, int vec, int tok_off, int pos_off, int C) {
  kv_pdl_launch_dependents();
  // Every read over the bus is issued before any result is used: the ids
  // and this thread's first kCopyInBatch 16-byte chunks of the copy (all of
  // it for a decode step's few KB), one trip over the bus in all. (A first
  // version that copied in a loop before the embedding waited for two.)
  constexpr int kCopyInBatch = 2;
  const int r = blockIdx.x;
  const int t = src[tok_off + r], p = pos_off >= 0 ? src[pos_off + r] : 0;
  const int stride = gridDim.x * gridDim.y * blockDim.x;
  const int i0 = (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  const int n4 = vec ? n / 4 : 0;
  int4 batch[kCopyInBatch];
#pragma unroll
  for (int k = 0; k < kCopyInBatch; k++)
    if (i0 + k * stride < n4) batch[k] = reinterpret_cast<const int4 *>(src)[i0 + k * stride];
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c < C) out[(long long)r * C + c] = embed_value(wte, wte_f16, V, wpe, wpe_f16, P, C, c, t, [&] { return p; });
#pragma unroll
  for (int k = 0; k < kCopyInBatch; k++)
    if (i0 + k * stride < n4) reinterpret_cast<int4 *>(dst)[i0 + k * stride] = batch[k];
  for (int i = i0 + kCopyInBatch * stride; i < n4; i += stride)
    reinterpret_cast<int4 *>(dst)[i] = reinterpret_cast<const int4 *>(src)[i];
  for (int i = 4 * n4 + i0; i < n; i += stride) dst[i] = src[i];
}

extern "C" kv_status kv_copy_in_embed(kv_stream s, int32_t *dst, const int32_t *pinned, int n, float *out,
                                      const void *wte, int wte_f16, int V, const void *wpe, int wpe_f16, int P,
                                      int tok_off, int pos_off, int N, int C) {
  if (n < 0 || N < 0 || C < 0 || tok_off < 0 || tok_off + N > n || (wpe && (pos_off < 0 || pos_off + N > n)))
    return (kv_status)cudaErrorInvalidValue;
  // Decode-size steps only: every block reads its row's ids over the bus,
  // and beyond a few rows those reads multiply while a memcpy node costs
  // nothing next to the step. Memory the device cannot address goes through
  // the copy engine too.
  const void *mapped = nullptr;
  if (N > 0 && N <= 8 && C > 0 && C <= 65535 * 256) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, pinned) == cudaSuccess) {
      if (a.type == cudaMemoryTypeHost) mapped = a.devicePointer;
    } else {
      (void)cudaGetLastError();  // a failed query is not this call's error
    }
  }
  if (mapped) {
    const int vec = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(mapped)) & 15) == 0;
    copy_in_embed_kernel<<<dim3(N, kv_ceil_div(C, 256)), 256, 0, s>>>(out, wte, wte_f16, V, wpe, wpe_f16, P, dst,
                                                                      static_cast<const int32_t *>(mapped), n, vec,
                                                                      tok_off, wpe ? pos_off : -1, C);
    return kv_launched();
  }
  const kv_status st = kv_copy_in(s, dst, pinned, (size_t)n * 4);
  if (st != 0) return st;
  return kv_embed(s, out, wte, wte_f16, V, wpe, wpe_f16, P, dst + tok_off, wpe ? dst + pos_off : nullptr, N, C);
}
