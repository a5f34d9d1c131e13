// acc-placement-micro.cu — does where the fixed-point accumulators land in
// L2 change how long a chain of kernels that add to them takes?
// (scripts/gpu-run.sh micro)
//
// SmolLM2's decode step moved by 4–5 µs with the placement of its 18 KB of
// accumulators alone (docs/PERF.md, version 33). This mimics their traffic
// without the rest of the step: a graph of 30 "layers", each an attention-
// like kernel (72 blocks, each adding 72 of the 576 outputs) and an MLP-
// like kernel (96 blocks, each adding all 576), every kernel first reading
// the accumulator the kernel before it wrote, all 64-bit atomics, for the
// same four accumulators at many offsets inside one allocation.
//
// Run in session 26 (docs/PERF.md, version 34): it does not reproduce the
// step's pattern (546–566 µs a chain at every offset from 128 KB to 2 MB,
// no alternation; slower only inside the pool's first 64–128 KB). Where the
// state sits matters in the step itself, so the runner places it by
// timing the step (transformer/placement.go).
#include <cstdio>
#include <vector>

#include "micro-graph.cuh"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

constexpr int C = 576;

// Reads in (the accumulator the kernel before wrote), adds a share to out.
// per: outputs a block adds (576: all; 72: the attention's share).
__global__ void add_kernel(unsigned long long *out, const unsigned long long *in, int per) {
  __shared__ unsigned long long s;
  if (threadIdx.x == 0) s = 0;
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) atomicAdd(&s, in[c] & 1);  // a dependent read of in
  __syncthreads();
  const int c0 = (blockIdx.x * per) % C;
  for (int c = threadIdx.x; c < per; c += blockDim.x)
    atomicAdd(&out[(c0 + c) % C], (unsigned long long)(blockIdx.x + c) + s);
}

int main() {
  const size_t pool_bytes = 4u << 20;
  char *pool;
  CK(cudaMalloc(&pool, pool_bytes));
  CK(cudaMemset(pool, 0, pool_bytes));
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  std::vector<size_t> offs;
  for (size_t o = 0; o < 64 * 1024; o += 4096) offs.push_back(o);
  for (size_t o = 64 * 1024; o <= 2u << 20; o += 64 * 1024) offs.push_back(o);
  printf("30 layers × (72-block + 96-block kernels adding to 576 int64), µs a chain (median of 20), by offset:\n");
  for (int round = 0; round < 2; round++) {
    for (size_t off : offs) {
      auto *acc = reinterpret_cast<unsigned long long *>(pool + off);  // four vectors of C
      cudaGraphExec_t ex;
      float us;
      CK(micro_capture(s, &ex, [&] {
        for (int l = 0; l < 30; l++) {
          add_kernel<<<72, 128, 0, s>>>(acc + (size_t)(l % 2) * C, acc + (size_t)(2 + (l + 1) % 2) * C, 72);
          add_kernel<<<96, 256, 0, s>>>(acc + (size_t)(2 + l % 2) * C, acc + (size_t)(l % 2) * C, C);
        }
      }));
      CK(micro_replay_us(s, ex, 5, 20, &us));
      CK(cudaGraphExecDestroy(ex));
      printf("%s%zuK=%.1f", off ? " " : (round ? "round 2:" : "round 1:"), off >> 10, us);
    }
    printf("\n");
  }
  return 0;
}
