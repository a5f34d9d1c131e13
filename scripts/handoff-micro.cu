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
//            acquire at gpu scope) once their output is written;
//  - ll:     programmatic launch, no wait and no counter: every value
//            travels with a tag in one 8-byte store (NCCL's low-latency
//            protocol), and a reader polls its own words until their tags
//            are this link's; no fence, one L2 round trip;
//  - ll-end: as ll, but each kernel executes griddepcontrol.wait after its
//            last store, before it exits, so that a kernel's completion
//            still implies its predecessors' (what a chain that mixes ll
//            and waits needs for its write-after-read hazards);
//  - ll-warp: as ll-end, but one warp polls (a word of every 18th) until
//            the input starts arriving, the others wait at a barrier, then
//            all read their words (still checking tags): fewer pollers;
//  - ll-sleep, ll-warp-sleep: as ll-end and ll-warp, with a 64 ns sleep
//            between a thread's polls (the pollers leave the issue slots
//            and the L2 to the blocks still producing).
// Work per kernel:
//  - none: the block writes one float (the hand-off alone);
//  - vec:  every block reads the 576-float vector the previous kernel
//          wrote (one L2 round trip), sums it (a block reduction, as a
//          norm does), and writes its share of the next vector.
// Standalone, sm_90; on the GPU machine: scripts/gpu-run.sh micro.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

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

enum Mode { kSerial, kPdl, kFlag, kLL, kLLEnd, kLLWarp, kLLSleep, kLLWarpSleep };

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

__device__ __forceinline__ unsigned long long ll_load(const unsigned long long *p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void ll_store(unsigned long long *p, float x, unsigned tag) {
  const unsigned long long v = (unsigned long long)tag << 32 | __float_as_uint(x);
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// ll_read: the value at p once its tag is `tag` (any tag for link 0, whose
// input the previous replay wrote before the epoch kernel).
__device__ __forceinline__ float ll_read(const unsigned long long *p, unsigned tag, bool any, bool nap = false) {
  unsigned long long v = ll_load(p);
  while (!any && (unsigned)(v >> 32) != tag) {
    if (nap) __nanosleep(64);
    v = ll_load(p);
  }
  return __uint_as_float((unsigned)v);
}

// block_total: the sum of every thread's s, in every thread (a norm's
// block reduction).
__device__ __forceinline__ float block_total(float s) {
  __shared__ float part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < kThreads / 32; w++) t += part[w];
  return t;
}

// The low-latency variants' switches (step_ll's flags).
constexpr int kEndWait = 1;   // griddepcontrol.wait before exiting
constexpr int kWarpPoll = 2;  // one warp polls first
constexpr int kNap = 4;       // 64 ns between a thread's polls
int ll_flags(int mode) {
  switch (mode) {
    case kLLEnd: return kEndWait;
    case kLLWarp: return kEndWait | kWarpPoll;
    case kLLSleep: return kEndWait | kNap;
    case kLLWarpSleep: return kEndWait | kWarpPoll | kNap;
    default: return 0;
  }
}

// step_ll: step's work in the low-latency protocol; tags are epoch·512 + k.
__global__ void __launch_bounds__(kThreads)
    step_ll(int flags, int vec, const unsigned long long *in, unsigned long long *out, const unsigned *epoch, int k) {
  // Launching the next link only once this one has its input keeps one
  // kernel polling at a time (launched at the start, every resident link
  // polls the same lines and a link costs 3.1–3.6 µs at G ≥ 32).
  const unsigned base = __ldcg(epoch) * 512u;
  const unsigned want = base + k - 1, mine = base + k;
  const bool nap = flags & kNap;
  if (vec) {
    float s = 0.f, own[3] = {0.f, 0.f, 0.f};
    if (flags & kWarpPoll) {
      // One warp waits for the input to start arriving (a word from each
      // of 32 places in it), then every thread reads its own words, still
      // checking their tags: 1/8 of the polling traffic.
      if (threadIdx.x < 32) (void)ll_read(in + threadIdx.x * (kC / 32), want, k == 0, nap);
      __syncthreads();
      for (int i = threadIdx.x, j = 0; i < kC; i += kThreads, j++) s += own[j] = ll_read(in + i, want, k == 0, nap);
    } else {
      for (int i = threadIdx.x, j = 0; i < kC; i += kThreads, j++) s += own[j] = ll_read(in + i, want, k == 0, nap);
    }
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const float t = block_total(s);
    const int per = (kC + gridDim.x - 1) / gridDim.x;
    for (int i = blockIdx.x * per + threadIdx.x; i < min(kC, (blockIdx.x + 1) * per); i += kThreads)
      ll_store(out + i, (i % kThreads == threadIdx.x ? own[i / kThreads] : ll_read(in + i, want, true)) * 0.5f + t * 1e-6f,
               mine);
  } else {
    if (threadIdx.x == 0) ll_store(out + blockIdx.x, ll_read(in + blockIdx.x, want, k == 0) + 1.f, mine);
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
  if (flags & kEndWait) asm volatile("griddepcontrol.wait;" ::: "memory");
}

__global__ void bump(unsigned *epoch) { *epoch += 1; }

// step: link k of the chain; in = the vector link k−1 wrote, out = this
// link's; arrived[k] counts this link's finished blocks (flag mode).
__global__ void __launch_bounds__(kThreads)
    step(int mode, int vec, const float *in, float *out, unsigned *arrived, int k, unsigned expect) {
  wait_for(mode, k > 0 ? arrived + k - 1 : nullptr, expect);
  if (vec) {
    float s = 0.f;
    for (int i = threadIdx.x; i < kC; i += kThreads) s += __ldcg(in + i);
    const float t = block_total(s);
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
  unsigned long long *llbuf = reinterpret_cast<unsigned long long *>(buf + 2048);
  unsigned *epoch = arrived + 256;
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  CHECK(cudaMemsetAsync(arrived, 0, n * sizeof(unsigned), s));
  if (mode >= kLL) bump<<<1, 1, 0, s>>>(epoch);
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
    if (mode >= kLL)
      CHECK(cudaLaunchKernelEx(&cfg, step_ll, ll_flags(mode), vec, llbuf + (k % 2) * 1024,
                               llbuf + (1 - k % 2) * 1024, (const unsigned *)epoch, k));
    else
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
  CHECK(cudaMalloc(&buf, 6144 * sizeof(float)));  // 2 float vectors, then 2 tagged ones
  CHECK(cudaMemset(buf, 0, 6144 * sizeof(float)));
  constexpr int kMaxN = 256;
  CHECK(cudaMalloc(&arrived, (kMaxN + 1) * sizeof(unsigned)));  // then the epoch
  CHECK(cudaMemset(arrived, 0, (kMaxN + 1) * sizeof(unsigned)));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const char *names[] = {"serial", "pdl", "flag", "ll", "ll-end", "ll-warp", "ll-sleep", "ll-warp-sleep"};
  const int n1 = 64, n2 = 256;
  for (int vec = 0; vec < 2; vec++)
    for (int G : {1, 32, 96, 132})
      for (int mode = kSerial; mode <= kLLWarpSleep; mode++) {
        // Two rounds each, to show the spread.
        float per[2];
        for (int r = 0; r < 2; r++) {
          const float t1 = chain_us(mode, vec, G, n1, buf, arrived, s);
          const float t2 = chain_us(mode, vec, G, n2, buf, arrived, s);
          per[r] = (t2 - t1) / (n2 - n1);
        }
        printf("hand-off %-13s work %-4s G=%3d: %.2f / %.2f us a link\n", names[mode], vec ? "vec" : "none", G,
               per[0], per[1]);
      }
  // Every hand-off must compute what the serial chain does.
  float want[kC], got[kC];
  for (int mode = kSerial; mode <= kLLWarpSleep; mode++) {
    CHECK(cudaMemset(buf, 0, 6144 * sizeof(float)));
    const float one = 1.f;
    CHECK(cudaMemcpy(buf, &one, sizeof one, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(buf + 2048, &one, sizeof one, cudaMemcpyHostToDevice));  // tagged 0: the low word
    chain_us(mode, 1, 132, n1, buf, arrived, s);  // 20 + 200 replays of n1 links
    if (mode >= kLL) {
      unsigned long long w[kC];
      CHECK(cudaMemcpy(w, buf + 2048, sizeof w, cudaMemcpyDeviceToHost));
      for (int i = 0; i < kC; i++) { const unsigned lo = (unsigned)w[i]; memcpy(&got[i], &lo, 4); }
    } else {
      CHECK(cudaMemcpy(mode == kSerial ? want : got, buf, sizeof want, cudaMemcpyDeviceToHost));
    }
    if (mode == kSerial) continue;
    int bad = 0;
    for (int i = 0; i < kC; i++) bad += got[i] != want[i];
    printf("check %s: %d of %d values differ from serial\n", names[mode], bad, kC);
    if (bad) return 1;
  }
  return 0;
}
