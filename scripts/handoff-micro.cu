// handoff-micro.cu — what one dependent phase of a decode step costs at the
// least, on the card at hand (docs/PERF.md, "The floor of a dependent
// phase"). A chain of N small kernels, each needing what the one before it
// wrote, captured in a CUDA graph and replayed; the cost of one hand-off is
// (time(N2) − time(N1)) / (N2 − N1), so the graph's fixed costs cancel.
//
// Hand-offs:
//  - serial: plain kernel nodes (the next kernel starts when the last ends);
//  - pdl:    programmatic dependent launch, griddepcontrol.wait before
//            reading (the next kernel is resident, waiting for the whole
//            grid before it to complete and flush), as csrc's decode kernels;
//  - flag:   programmatic launch, but instead of griddepcontrol.wait a block
//            polls an arrival counter the blocks before it bump (release /
//            acquire at gpu scope) once their output is written.
// Work per kernel:
//  - none: the block writes one float (the hand-off alone);
//  - vec:  every block reads the 576-float vector the previous kernel
//          wrote (one L2 round trip), sums it (a block reduction, as a
//          norm does), and writes its share of the next vector.
// Standalone, sm_90; on the GPU machine: scripts/gpu-run.sh micro.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(call)                                                                           \
  do {                                                                                        \
    const cudaError_t e = (call);                                                             \
    if (e != cudaSuccess) {                                                                   \
      printf("%s (line %d): %s\n", #call, __LINE__, cudaGetErrorString(e));                   \
      exit(1);                                                                                \
    }                                                                                         \
  } while (0)

constexpr int kC = 576;  // SmolLM2's hidden size
constexpr int kThreads = 256;

enum Mode { kSerial, kPdl, kFlag };

__device__ __forceinline__ void wait_for(int mode, const unsigned *arrived, unsigned expect) {
  if (mode == kPdl) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (mode == kFlag && arrived != nullptr) {
    if (threadIdx.x == 0) {
      unsigned seen;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(arrived) : "memory");
      } while (seen < expect);
    }
    __syncthreads();
  }
  if (mode != kSerial) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// step: link k of the chain; in = the vector link k−1 wrote, out = this
// link's; arrived[k] counts this link's finished blocks (flag mode).
__global__ void __launch_bounds__(kThreads)
    step(int mode, int vec, const float *in, float *out, unsigned *arrived, int k, unsigned expect) {
  wait_for(mode, k > 0 ? arrived + k - 1 : nullptr, expect);
  if (vec) {
    __shared__ float part[kThreads / 32];
    float s = 0.f;
    for (int i = threadIdx.x; i < kC; i += kThreads) s += __ldcg(in + i);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
    __syncthreads();
    float t = 0.f;
    for (int w = 0; w < kThreads / 32; w++) t += part[w];
    const int per = (kC + gridDim.x - 1) / gridDim.x;
    for (int i = blockIdx.x * per + threadIdx.x; i < min(kC, (blockIdx.x + 1) * per); i += kThreads)
      out[i] = __ldcg(in + i) * 0.5f + t * 1e-6f;
  } else if (threadIdx.x == 0) {
    out[blockIdx.x] = in[blockIdx.x] + 1.f;
  }
  if (mode == kFlag) {
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(arrived + k) : "memory");
  }
}

// chain_us: µs a replay of a graph of n links (after warm-up, median-free
// mean over reps replays).
float chain_us(int mode, int vec, int G, int n, float *buf, unsigned *arrived, cudaStream_t s) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  CHECK(cudaMemsetAsync(arrived, 0, n * sizeof(unsigned), s));
  for (int k = 0; k < n; k++) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(G);
    cfg.blockDim = dim3(kThreads);
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = mode != kSerial && k > 0 ? 1 : 0;
    const float *in = buf + (k % 2) * 1024;
    float *out = buf + (1 - k % 2) * 1024;
    CHECK(cudaLaunchKernelEx(&cfg, step, mode, vec, in, out, arrived, k, (unsigned)G));
  }
  CHECK(cudaStreamEndCapture(s, &g));
  CHECK(cudaGraphInstantiateWithFlags(&ge, g, 0));
  for (int i = 0; i < 20; i++) CHECK(cudaGraphLaunch(ge, s));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  const int reps = 200;
  CHECK(cudaEventRecord(a, s));
  for (int i = 0; i < reps; i++) CHECK(cudaGraphLaunch(ge, s));
  CHECK(cudaEventRecord(b, s));
  CHECK(cudaEventSynchronize(b));
  float ms;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  CHECK(cudaGraphExecDestroy(ge));
  CHECK(cudaGraphDestroy(g));
  return ms * 1000.f / reps;
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  float *buf;
  unsigned *arrived;
  CHECK(cudaMalloc(&buf, 2048 * sizeof(float)));
  CHECK(cudaMemset(buf, 0, 2048 * sizeof(float)));
  constexpr int kMaxN = 256;
  CHECK(cudaMalloc(&arrived, kMaxN * sizeof(unsigned)));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const char *names[] = {"serial", "pdl", "flag"};
  const int n1 = 64, n2 = 256;
  for (int vec = 0; vec < 2; vec++)
    for (int G : {1, 32, 96, 132})
      for (int mode = kSerial; mode <= kFlag; mode++) {
        // Two rounds each, to show the spread.
        float per[2];
        for (int r = 0; r < 2; r++) {
          const float t1 = chain_us(mode, vec, G, n1, buf, arrived, s);
          const float t2 = chain_us(mode, vec, G, n2, buf, arrived, s);
          per[r] = (t2 - t1) / (n2 - n1);
        }
        printf("hand-off %-6s work %-4s G=%3d: %.2f / %.2f us a link\n", names[mode], vec ? "vec" : "none", G,
               per[0], per[1]);
      }
  // Every hand-off must compute what the serial chain does.
  float want[kC], got[kC];
  for (int mode = kSerial; mode <= kFlag; mode++) {
    CHECK(cudaMemset(buf, 0, 2048 * sizeof(float)));
    const float one = 1.f;
    CHECK(cudaMemcpy(buf, &one, sizeof one, cudaMemcpyHostToDevice));
    chain_us(mode, 1, 132, n1, buf, arrived, s);  // 20 + 200 replays of n1 links
    CHECK(cudaMemcpy(mode == kSerial ? want : got, buf, sizeof want, cudaMemcpyDeviceToHost));
    if (mode == kSerial) continue;
    int bad = 0;
    for (int i = 0; i < kC; i++) bad += got[i] != want[i];
    printf("check %s: %d of %d values differ from serial\n", names[mode], bad, kC);
    if (bad) return 1;
  }
  return 0;
}
