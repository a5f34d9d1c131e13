// hopper-micro.cu — the numbers a persistent decode design rests on
// (docs/PERF.md, version 8), measured on the card at hand:
//  - streaming bandwidth of G blocks (one per SM: each takes most of the
//    shared memory) copying disjoint regions through a cp.async ring (8 ×
//    16 KB in flight a block), spread or as thread-block clusters of 8 / 16,
//    and with plain 16-byte loads (8 in flight a thread);
//  - the cp.async ring again on L2-resident data;
//  - a cluster barrier (barrier.cluster arrive + wait), a DSMEM exchange
//    (write, cluster sync, read a neighbour's shared memory, sync), and a
//    grid barrier on an L2 counter (red.release + ld.acquire polling).
// Standalone, sm_90; on the GPU machine: scripts/gpu-run.sh micro.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace cg = cooperative_groups;

#define CHECK(call)                                                                           \
  do {                                                                                        \
    const cudaError_t e = (call);                                                             \
    if (e != cudaSuccess) {                                                                   \
      printf("%s (line %d): %s\n", #call, __LINE__, cudaGetErrorString(e));                   \
      exit(1);                                                                                \
    }                                                                                         \
  } while (0)

constexpr int kStages = 8;          // ring slots: kStages − 1 chunks in flight
constexpr int kChunkBytes = 16384;  // one slot

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ring_stream: block g copies its region (per_block 16-byte words from
// src + g·per_block) into a ring of kStages slots, one chunk per slot, as a
// decode kernel streams its weights; it touches one word of each landed
// chunk so that nothing is optimised away.
__global__ void ring_stream(const uint4 *src, size_t per_block, float *sink) {
  extern __shared__ uint4 ring[];
  constexpr int words = kChunkBytes / 16;
  const uint4 *p = src + blockIdx.x * per_block;
  const size_t chunks = per_block / words;
  auto issue = [&](size_t c) {
    if (c < chunks)
      for (int i = threadIdx.x; i < words; i += blockDim.x) cp_async16(&ring[c % kStages * words + i], p + c * words + i);
    cp_async_commit();
  };
  for (int c = 0; c < kStages - 1; c++) issue(c);
  float acc = 0.f;
  for (size_t c = 0; c < chunks; c++) {
    issue(c + kStages - 1);
    cp_async_wait<kStages - 1>();  // chunk c has landed
    __syncthreads();
    acc += __int_as_float(ring[c % kStages * words + threadIdx.x].x);
    __syncthreads();  // slot c is refilled next round
  }
  if (acc == 12345.f) sink[0] = acc;
}

// load_stream: the same regions read into registers, 8 loads in flight a thread.
__global__ void load_stream(const uint4 *src, size_t per_block, float *sink) {
  const uint4 *p = src + blockIdx.x * per_block;
  unsigned acc = 0;
  for (size_t i = threadIdx.x; i + 7 * blockDim.x < per_block; i += 8 * blockDim.x) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; u++)
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                   : "l"(p + i + u * blockDim.x));
#pragma unroll
    for (int u = 0; u < 8; u++) acc ^= v[u].x ^ v[u].w;
  }
  if (acc == 12345) sink[0] = acc;
}

// cluster_barrier: iters hardware cluster barriers; block 0's cycles out.
__global__ void cluster_barrier(int iters, long long *cycles) {
  const long long t0 = clock64();
  for (int i = 0; i < iters; i++) asm volatile("barrier.cluster.arrive;\nbarrier.cluster.wait;" ::: "memory");
  if (threadIdx.x == 0 && blockIdx.x == 0) cycles[0] = clock64() - t0;
}

// dsmem_exchange: each round a block writes 64 floats to its shared memory,
// syncs the cluster, reads its neighbour's, and syncs again.
__global__ void dsmem_exchange(int iters, long long *cycles, float *sink) {
  __shared__ float v[64];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), n = cluster.num_blocks();
  float a = rank;
  const long long t0 = clock64();
  for (int i = 0; i < iters; i++) {
    if (threadIdx.x < 64) v[threadIdx.x] = a + threadIdx.x;
    cluster.sync();
    const float *next = cluster.map_shared_rank(v, (rank + 1) % n);
    if (threadIdx.x < 64) a += next[threadIdx.x] * 0.5f;
    cluster.sync();
  }
  if (threadIdx.x == 0 && blockIdx.x == 0) cycles[0] = clock64() - t0;
  if (a == 1.2345f) sink[0] = a;
}

// grid_barrier: iters barriers on one L2 counter (arrive: red.release;
// wait: ld.acquire polling), all blocks resident; block 0's cycles out.
__global__ void grid_barrier(int iters, unsigned *counter, long long *cycles) {
  const long long t0 = clock64();
  for (int i = 0; i < iters; i++) {
    __syncthreads();
    if (threadIdx.x == 0) {
      const unsigned target = (i + 1) * gridDim.x;
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
      unsigned seen;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
      } while (seen < target);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0 && blockIdx.x == 0) cycles[0] = clock64() - t0;
}

// launch runs kernel on G blocks of `threads` in clusters of `cluster`
// blocks; false (and a line) when the GPU cannot place them.
template <typename... Exp, typename... Act>
bool launch(void (*kernel)(Exp...), int G, int threads, size_t smem, int cluster, Act... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(G);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr, cfg.numAttrs = 1;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (e != cudaSuccess) {
    printf("G=%d cluster=%d: %s\n", G, cluster, cudaGetErrorString(e));
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int khz = 0;  // (cudaDeviceProp::clockRate is gone in CUDA 13)
  CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
  printf("%s, %d SMs, clock %d kHz\n", prop.name, prop.multiProcessorCount, khz);
  const size_t total = size_t(2) << 30;  // 2 GiB: far beyond L2
  uint4 *buf;
  float *sink;
  long long *cycles;
  unsigned *counter;
  CHECK(cudaMalloc(&buf, total));
  CHECK(cudaMemset(buf, 1, total));
  CHECK(cudaMalloc(&sink, 64));
  CHECK(cudaMalloc(&cycles, 8));
  CHECK(cudaMalloc(&counter, 4));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  const size_t ring_bytes = size_t(kStages) * kChunkBytes;
  CHECK(cudaFuncSetAttribute(ring_stream, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)ring_bytes));
  CHECK(cudaFuncSetAttribute(ring_stream, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CHECK(cudaFuncSetAttribute(cluster_barrier, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  CHECK(cudaFuncSetAttribute(dsmem_exchange, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  // timed: ms of one launch after a warm-up launch.
  auto timed = [&](auto run) {
    run();
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaEventRecord(e0));
    run();
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    return ms;
  };
  const int blocks[] = {1, 2, 4, 8, 16, 32, 66, 132};

  for (int threads : {256, 512})
    for (int G : blocks)
      for (int cluster : {1, 8, 16}) {
        if (cluster > 1 && (G % cluster != 0 || G > 32)) continue;
        size_t per = total / G;  // bytes a block, whole chunks, at most 256 MB
        if (per > (size_t(256) << 20)) per = size_t(256) << 20;
        per = per / kChunkBytes * kChunkBytes;
        bool ok = true;
        const float ms = timed([&] { ok = ok && launch(ring_stream, G, threads, ring_bytes, cluster, (const uint4 *)buf, per / 16, sink); });
        if (!ok) continue;
        const double gbs = double(per) * G / (ms * 1e-3) / 1e9;
        printf("cp.async ring, %d threads, G=%3d, cluster %2d: %5.0f GB/s in all, %5.1f a block\n", threads, G,
               cluster, gbs, gbs / G);
      }

  // L2-resident: 1 MiB a block, read by 20 launches (their launch cost included).
  for (int G : {16, 32})
    for (int cluster : {1, 16})
      for (int threads : {256, 512}) {
        const size_t per = size_t(1) << 20;
        bool ok = true;
        const float ms = timed([&] {
          for (int r = 0; r < 20; r++)
            ok = ok && launch(ring_stream, G, threads, ring_bytes, cluster, (const uint4 *)buf, per / 16, sink);
        });
        if (!ok) continue;
        const double gbs = double(per) * G * 20 / (ms * 1e-3) / 1e9;
        printf("cp.async ring from L2, %d threads, G=%d, cluster %d: %5.0f GB/s in all, %5.1f a block\n", threads,
               G, cluster, gbs, gbs / G);
      }

  for (int G : blocks) {
    const int threads = 512;
    size_t per = total / G;
    if (per > (size_t(256) << 20)) per = size_t(256) << 20;
    per = per / (16 * 8 * threads) * (16 * 8 * threads);
    const float ms = timed([&] { load_stream<<<G, threads>>>(buf, per / 16, sink); });
    CHECK(cudaGetLastError());
    const double gbs = double(per) * G / (ms * 1e-3) / 1e9;
    printf("16-byte loads, %d threads, G=%3d: %5.0f GB/s in all, %5.1f a block\n", threads, G, gbs, gbs / G);
  }

  const int iters = 10000;
  long long c = 0;
  for (int cluster : {2, 4, 8, 16}) {
    if (!launch(cluster_barrier, cluster, 256, 0, cluster, iters, cycles)) continue;
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(&c, cycles, 8, cudaMemcpyDeviceToHost));
    printf("cluster barrier, %2d blocks: %.0f cycles (%.0f ns at %d kHz)\n", cluster, double(c) / iters,
           double(c) / iters / (khz * 1e-6), khz);
    if (!launch(dsmem_exchange, cluster, 256, 0, cluster, iters, cycles, sink)) continue;
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(&c, cycles, 8, cudaMemcpyDeviceToHost));
    printf("DSMEM write, sync, read, sync, %2d blocks: %.0f cycles\n", cluster, double(c) / iters);
  }
  for (int G : {16, 66, 132}) {  // all resident: one block an SM at most
    const int rounds = 2000;
    CHECK(cudaMemset(counter, 0, 4));
    grid_barrier<<<G, 256>>>(rounds, counter, cycles);
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(&c, cycles, 8, cudaMemcpyDeviceToHost));
    printf("grid barrier, %3d blocks: %.0f cycles\n", G, double(c) / rounds);
  }
  return 0;
}
