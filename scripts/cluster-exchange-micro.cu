// cluster-exchange-micro.cu: what a data exchange inside a thread-block
// cluster costs on this GPU (scripts/gpu-run.sh micro; built with the
// machine's nvcc). 72 blocks of 128 threads in clusters of 8, as SmolLM2's
// attention block; each round every block sends 24 floats to every block
// of its cluster and waits until it holds all 192. Ways:
//   barrier: remote stores, then barrier.cluster arrive (release) + wait
//            (acquire): MEMBAR.ALL.GPU and CCTL.IVALL in the SASS;
//   tagged:  each value with a nonzero round tag in one 8-byte remote
//            store, polled in the receiver's own shared memory, then one
//            CTA barrier (what csrc/attention.cu's block does);
//   barrier alone: the arrive + wait without data;
//   relaxed: remote stores + barrier.cluster.arrive.relaxed (PTX 8.0, so
//            only with CUDA >= 12: no fence, not a correct exchange; the
//            barrier's own floor).
#include <cooperative_groups.h>
#include <cstdio>
namespace cg = cooperative_groups;
constexpr int CS = 8, NT = 128, R = 24;

__device__ __forceinline__ long long globaltimer() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

template <int WAY>
__global__ void __cluster_dims__(CS, 1, 1) __launch_bounds__(NT) exchange(int rounds, long long *out, float *sink) {
  __shared__ float buf[2][CS * R];
  __shared__ unsigned long long tagged[2][CS * R];
  cg::cluster_group cl = cg::this_cluster();
  const int rank = cl.block_rank(), tid = threadIdx.x;
  for (int i = tid; i < CS * R; i += NT) tagged[0][i] = tagged[1][i] = 0, buf[0][i] = buf[1][i] = 0.f;
  cl.sync();
  float acc = 0.f;
  const long long t0 = globaltimer();
  for (int it = 1; it <= rounds; it++) {
    const int p = it & 1;  // two buffers: a round's stores never meet the last round's reads
    for (int i = tid; i < CS * R; i += NT) {
      const int dst = i / R, k = i % R;
      const float v = acc + (float)(rank * R + k);
      if (WAY == 1) {
        *reinterpret_cast<volatile unsigned long long *>(cl.map_shared_rank(&tagged[p][rank * R + k], dst)) =
            ((unsigned long long)(unsigned)it << 32) | __float_as_uint(v);
      } else if (WAY != 2) {
        *cl.map_shared_rank(&buf[p][rank * R + k], dst) = v;
      }
    }
    float s = 0.f;
    if (WAY == 1) {
      for (int i = tid; i < CS * R; i += NT) {
        unsigned long long w;
        do w = *reinterpret_cast<volatile unsigned long long *>(&tagged[p][i]);
        while ((unsigned)(w >> 32) != (unsigned)it);
        s += __uint_as_float((unsigned)w);
      }
      __syncthreads();
    } else {
#if __CUDACC_VER_MAJOR__ >= 12
      if (WAY == 3) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
      else
#endif
        asm volatile("barrier.cluster.arrive.aligned;" ::: "memory");
      asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
      if (WAY != 2)
        for (int i = tid; i < CS * R; i += NT) s += buf[p][i];
    }
    acc += s * 1e-9f;
  }
  const long long t1 = globaltimer();
  cl.sync();
  if (tid == 0) out[blockIdx.x] = t1 - t0;
  if (acc == 12345.f) *sink = acc;
}

template <int WAY>
void run(const char *name, long long *out, float *sink) {
  const int rounds = 20000;
  exchange<WAY><<<72, NT>>>(rounds, out, sink);
  const cudaError_t e = cudaDeviceSynchronize();
  long long h[72];
  cudaMemcpy(h, out, sizeof h, cudaMemcpyDeviceToHost);
  long long worst = 0;
  for (long long v : h) worst = v > worst ? v : worst;
  printf("cluster exchange, %-14s %7.1f ns a round%s%s\n", name, (double)worst / rounds,
         e == cudaSuccess ? "" : ": ", e == cudaSuccess ? "" : cudaGetErrorString(e));
}

int main() {
  long long *out;
  float *sink;
  cudaMalloc(&out, 72 * sizeof(long long));
  cudaMalloc(&sink, sizeof(float));
  run<0>("barrier:", out, sink);
  run<1>("tagged:", out, sink);
  run<2>("barrier alone:", out, sink);
#if __CUDACC_VER_MAJOR__ >= 12
  run<3>("relaxed:", out, sink);
#endif
  return 0;
}
