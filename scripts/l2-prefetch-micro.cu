// l2-prefetch-micro.cu — does prefetching part of the LM head into L2 while
// the last layer runs shorten the LM head? (scripts/gpu-run.sh micro)
//
// The decode step's layers leave DRAM mostly idle (latency-bound launches),
// while the LM head (distilgpt2: 77 MB fp16) is bandwidth-bound. This times
// the LM head's GEMV from a cold L2, and after X MB of its rows were
// prefetched (prefetch.global.L2, normal or evict_last), optionally followed
// by a 12 MB weight stream (a layer's products, read as the kernels read
// weights) that competes for L2 before the GEMV runs.
//
// Measured (H100 80GB HBM3, docs/PERF.md version 12): not usefully. After
// the 12 MB stream the GEMV took 24.7–27.0 µs with 8 to 40 MB prefetched
// (any stride, either hint) against 29.5 without, but the gain did not grow
// with the amount: 8 MB gave as much as 40. So it is not L2 hits on the
// prefetched rows (a warm-up the decode step already has, perhaps); with
// all 77 MB prefetched and no stream, 26.6 µs. At 4 loads in flight a lane
// the GEMV streams ~3 TB/s, near the bus, whether its rows hit L2 or not.
#include <cuda_fp16.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

__device__ __forceinline__ uint4 ld_stream16(const void *p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// A GEMV like matmul.cu's v1 for fp16, N = 1: a warp takes 4 rows, each
// lane one 16-byte chunk of each of them per step (4 loads in flight).
__global__ void __launch_bounds__(128) gemv(float *out, const float *x, const __half *w, int C, int OC) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * 4 + warp) * 4;
  const int chunks = C / 8;
  float acc[4] = {0, 0, 0, 0};
  for (int c = lane; c < chunks; c += 32) {
    uint4 v[4];
#pragma unroll
    for (int r = 0; r < 4; r++) v[r] = ld_stream16(w + (size_t)min(row0 + r, OC - 1) * C + c * 8);
#pragma unroll
    for (int r = 0; r < 4; r++) {
      const __half2 *h = reinterpret_cast<const __half2 *>(&v[r]);
#pragma unroll
      for (int k = 0; k < 4; k++) {
        float2 f = __half22float2(h[k]);
        acc[r] += f.x * __ldg(x + c * 8 + 2 * k) + f.y * __ldg(x + c * 8 + 2 * k + 1);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 4; r++) {
    float s = acc[r];
    for (int o = 16; o; o /= 2) s += __shfl_xor_sync(~0u, s, o);
    if (lane == 0 && row0 + r < OC) out[row0 + r] = s;
  }
}

// prefetch: every thread prefetches lines stride apart.
template <int HINT>
__global__ void prefetch(const char *p, size_t bytes, int stride) {
  const size_t n = bytes / stride;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const char *a = p + i * stride;
    if (HINT == 0)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
    else
      asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(a));
  }
}

// stream: read bytes as the decode kernels read weights; sums to out.
__global__ void stream(float *out, const char *p, size_t bytes) {
  const size_t n = bytes / 16;
  unsigned s = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint4 v = ld_stream16(p + i * 16);
    s += v.x ^ v.y ^ v.z ^ v.w;
  }
  if (s == 0x12345678) out[0] = 1;
}

int main() {
  const int C = 768, V = 50257;
  const size_t wbytes = (size_t)V * C * 2;
  __half *w;
  float *x, *out;
  char *flush, *layer;
  CK(cudaMalloc(&w, wbytes));
  CK(cudaMalloc(&x, C * 4));
  CK(cudaMalloc(&out, V * 4));
  CK(cudaMalloc(&flush, 256 << 20));
  CK(cudaMalloc(&layer, 12 << 20));
  CK(cudaMemset(w, 0, wbytes));
  CK(cudaMemset(x, 0, C * 4));
  CK(cudaMemset(flush, 1, 256 << 20));
  CK(cudaMemset(layer, 1, 12 << 20));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("== l2-prefetch micro: %s, L2 %d MB, LM head %.1f MB\n", prop.name, prop.l2CacheSize >> 20, wbytes / 1e6);
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  const int blocks = (V + 15) / 16;
  // median_us: iters runs of setup() then timed() between two events; the
  // median µs of timed() over the runs after the first warm ones.
  auto median_us = [&](int iters, int warm, auto setup, auto timed) -> float {
    std::vector<float> ts;
    for (int it = 0; it < iters; it++) {
      setup();
      cudaEventRecord(t0);
      timed();
      cudaEventRecord(t1);
      cudaDeviceSynchronize();
      float t;
      cudaEventElapsedTime(&t, t0, t1);
      if (it >= warm) ts.push_back(t * 1e3f);
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
  };
  auto flush_l2 = [&]() { stream<<<1024, 256>>>(out, flush, 256 << 20); };
  auto launch_prefetch = [&](size_t pbytes, int hint, int stride, int pgrid) {
    if (hint) prefetch<1><<<pgrid, 256>>>((const char *)w, pbytes, stride);
    else prefetch<0><<<pgrid, 256>>>((const char *)w, pbytes, stride);
  };
  // One measurement: flush L2, prefetch X MB (hint, stride) and let it
  // land, optionally a 12 MB stream, then time the GEMV: its median µs.
  auto run = [&](size_t pbytes, int hint, int stride, bool interfere, int pgrid) -> float {
    return median_us(
        15, 3,
        [&]() {
          flush_l2();
          if (pbytes) launch_prefetch(pbytes, hint, stride, pgrid);
          cudaDeviceSynchronize();  // every prefetch lands (the step would give it ~15 µs)
          if (interfere) stream<<<264, 256>>>(out, layer, 12 << 20);
        },
        [&]() { gemv<<<blocks, 128>>>(out, x, w, C, V); });
  };
  // The prefetch alone (how fast it brings lines in).
  auto time_prefetch = [&](size_t pbytes, int hint, int stride, int pgrid) -> float {
    return median_us(12, 2, flush_l2, [&]() { launch_prefetch(pbytes, hint, stride, pgrid); });
  };
  printf("cold GEMV (no prefetch): %.1f us\n", run(0, 0, 128, false, 132));
  printf("cold GEMV after a 12 MB stream: %.1f us\n", run(0, 0, 128, true, 132));
  printf("GEMV after prefetching all of it (warm where it fits): %.1f us\n", run(wbytes, 0, 128, false, 132));
  for (int stride : {32, 64, 128, 256}) {
    for (int hint : {0, 1}) {
      for (size_t mb : {8, 16, 24, 32, 40}) {
        const float g0 = run(mb << 20, hint, stride, false, 264), g1 = run(mb << 20, hint, stride, true, 264);
        float tp = time_prefetch(mb << 20, hint, stride, 264);
        printf("stride %3d hint %-10s %2zu MB: prefetch kernel %.1f us (%.0f GB/s issue); GEMV %.1f us, after a 12 MB stream %.1f us\n",
               stride, hint ? "evict_last" : "normal", mb, tp, (mb << 20) / (tp * 1e3), g0, g1);
      }
    }
  }
  // Prefetch from few blocks (as a side branch would run, on spare SMs).
  for (int pg : {8, 16, 32}) {
    float tp = time_prefetch(24 << 20, 1, 128, pg);
    const float g = run(24 << 20, 1, 128, true, pg);
    printf("24 MB evict_last stride 128 from %d blocks: prefetch %.1f us; GEMV after a 12 MB stream %.1f us\n", pg, tp, g);
  }
  return 0;
}
