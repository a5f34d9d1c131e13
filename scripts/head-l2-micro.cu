// head-l2-micro.cu — can part of the LM head stay in L2 from step to step,
// and can a GEMV read it from there faster than from DRAM?
// (scripts/gpu-run.sh micro)
//
// A decode step streams ~212 MB of layer weights (evict-first in L2) and
// then the LM head (SmolLM2: 49152 × 576 fp16, 57 MB). This times the head
// alone after such a stream, with its first KEEP MB of rows read evict-last
// (so they may survive the next step's stream) and the rest evict-first,
// for two GEMVs: matmul.cu's gemv_kernel_v1 shape (a warp a row, 4 rows a
// block, 12,288 blocks) and a resident grid (a few blocks an SM, each warp
// looping over its block's rows with the next row's loads in flight).
//
// Measured (H100 80GB HBM3, docs/PERF.md version 33), µs a head: v1 19.6
// with nothing kept, 17.5 with 20 MB; the resident grid at 8 blocks of 256
// an SM 18.5 with nothing kept, 15.1 with 20 MB, 22–23 with 40 (the kept
// rows evict each other). 25 MB of rows read from L2 take 7.1 µs against
// 8.4 from DRAM: this GEMV's rate from L2 is ~3.5 TB/s. In the decode step
// none of it paid: the resident grid alone was +1.3 µs a token, and 20 MB
// kept +15 µs (the K/V caches no longer stay in L2). (After these runs the
// capture and the L2 rate's timing moved to micro-graph.cuh, same method,
// and the stream's bandwidth check became a graph of its one launch.)
#include <cuda_fp16.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>

#include "micro-graph.cuh"

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

__device__ __forceinline__ unsigned long long pol_first() {
  unsigned long long p;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ unsigned long long pol_last() {
  unsigned long long p;
  asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ uint4 ld16(const void *p, unsigned long long pol) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "l"(pol));
  return r;
}

// The layers' weight stream: every 16 bytes once, evict-first; plus the
// K/V caches (kv bytes, normal policy, read again every step).
__global__ void stream(const uint4 *w, size_t n16, const uint4 *kv, size_t kv16, unsigned *sink) {
  const unsigned long long pf = pol_first();
  unsigned acc = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
    const uint4 v = ld16(w + i, pf);
    acc ^= v.x ^ v.w;
  }
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < kv16; i += (size_t)gridDim.x * blockDim.x) {
    const uint4 v = kv[i];
    acc ^= v.y;
  }
  if (acc == 0x12345678u) *sink = acc;
}

// x read as two float4 through the read-only path, as gemv_kernel_v1 does
// (scalar loads at a 32-byte stride made the first version of this program
// L1-bound at twice the real kernel's time).
__device__ __forceinline__ float dot16(uint4 v, const float *x) {
  const __half2 *h = reinterpret_cast<const __half2 *>(&v);
  const float4 a = __ldg(reinterpret_cast<const float4 *>(x)), b = __ldg(reinterpret_cast<const float4 *>(x) + 1);
  const float2 f0 = __half22float2(h[0]), f1 = __half22float2(h[1]), f2 = __half22float2(h[2]),
               f3 = __half22float2(h[3]);
  return f0.x * a.x + f0.y * a.y + f1.x * a.z + f1.y * a.w + f2.x * b.x + f2.y * b.y + f3.x * b.z + f3.y * b.w;
}

// gemv_kernel_v1's shape for C = 576: 72 chunks a row, lane l takes l,
// l+32, l+64; a warp a row; 4 warps a block.
__global__ void __launch_bounds__(128) head_v1(float *out, const float *x, const __half *w, int C, int OC, int keep) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * 4 + warp;
  if (row >= OC) return;
  const unsigned long long pol = row < keep ? pol_last() : pol_first();
  const int chunks = C / 8;
  const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)row * C);
  uint4 v[3];
#pragma unroll
  for (int u = 0; u < 3; u++) v[u] = lane + 32 * u < chunks ? ld16(wr + lane + 32 * u, pol) : make_uint4(0, 0, 0, 0);
  float acc = 0.f;
#pragma unroll
  for (int u = 0; u < 3; u++)
    if (lane + 32 * u < chunks) acc += dot16(v[u], x + (lane + 32 * u) * 8);
  for (int o = 16; o; o /= 2) acc += __shfl_xor_sync(~0u, acc, o);
  if (lane == 0) out[row] = acc;
}

// The resident grid: block b owns the rows [b·per, (b+1)·per); its warps take
// rows base + warp + 8·i, D of them in flight a warp (so the rows being read
// at once are neighbours, as in v1).
template <int D>
__global__ void __launch_bounds__(256) head_p(float *out, const float *x, const __half *w, int C, int OC, int keep) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int per = (OC + gridDim.x - 1) / gridDim.x;
  const int lo = blockIdx.x * per, hi = min(OC, lo + per);
  const int chunks = C / 8;
  const unsigned long long pl = pol_last(), pf = pol_first();
  uint4 v[D][3];
  auto load = [&](int d, int row) {
    const unsigned long long pol = row < keep ? pl : pf;
    const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)min(row, OC - 1) * C);
#pragma unroll
    for (int u = 0; u < 3; u++) v[d][u] = lane + 32 * u < chunks ? ld16(wr + lane + 32 * u, pol) : make_uint4(0, 0, 0, 0);
  };
#pragma unroll
  for (int d = 0; d < D; d++) load(d, lo + warp + 8 * d);
  for (int r0 = lo + warp; r0 < hi; r0 += 8 * D) {
#pragma unroll
    for (int d = 0; d < D; d++) {
      const int row = r0 + 8 * d;
      float acc = 0.f;
#pragma unroll
      for (int u = 0; u < 3; u++)
        if (lane + 32 * u < chunks) acc += dot16(v[d][u], x + (lane + 32 * u) * 8);
      const int nxt = row + 8 * D;
      if (nxt < hi) load(d, nxt);
      for (int o = 16; o; o /= 2) acc += __shfl_xor_sync(~0u, acc, o);
      if (lane == 0 && row < hi) out[row] = acc;
    }
  }
}

int main() {
  const int C = 576, OC = 49152;
  const size_t layers = 212ull << 20, kvb = 6ull << 20;
  int nsm;
  CK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, 0));
  __half *w;
  float *x, *out, *ref;
  uint4 *lw, *kv;
  unsigned *sink;
  CK(cudaMalloc(&w, (size_t)OC * C * 2));
  CK(cudaMalloc(&x, C * 4));
  CK(cudaMalloc(&out, OC * 4));
  CK(cudaMalloc(&ref, OC * 4));
  CK(cudaMalloc(&lw, layers));
  CK(cudaMalloc(&kv, kvb));
  CK(cudaMalloc(&sink, 4));
  {
    std::vector<__half> hw((size_t)OC * C);
    for (size_t i = 0; i < hw.size(); i++) hw[i] = __float2half(((i * 2654435761u) % 2001) / 1000.f - 1.f);
    CK(cudaMemcpy(w, hw.data(), hw.size() * 2, cudaMemcpyHostToDevice));
    std::vector<float> hx(C);
    for (int i = 0; i < C; i++) hx[i] = ((i * 40503u) % 997) / 500.f - 1.f;
    CK(cudaMemcpy(x, hx.data(), C * 4, cudaMemcpyHostToDevice));
  }
  CK(cudaMemset(lw, 1, layers));
  CK(cudaMemset(kv, 2, kvb));
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  const size_t row_bytes = C * 2;
  head_v1<<<OC / 4, 128, 0, s>>>(ref, x, w, C, OC, 0);
  CK(cudaStreamSynchronize(s));
  std::vector<float> hr(OC), ho(OC);
  CK(cudaMemcpy(hr.data(), ref, OC * 4, cudaMemcpyDeviceToHost));

  struct V { const char *name; int kind; int blocks; };
  std::vector<V> vs = {{"v1 (4 rows a block)", 0, OC / 4},
                       {"resident D=1, 4 blocks/SM x 256", 1, nsm * 4},
                       {"resident D=1, 8 blocks/SM x 256", 1, nsm * 8},
                       {"resident D=2, 4 blocks/SM x 256", 2, nsm * 4},
                       {"resident D=2, 2 blocks/SM x 256", 2, nsm * 2},
                       {"resident D=3, 2 blocks/SM x 256", 3, nsm * 2},
                       {"resident D=4, 2 blocks/SM x 256", 4, nsm * 2}};
  const int keeps_mb[] = {0, 12, 20, 28, 40};
  printf("head %d x %d fp16 (%.1f MB), after a %zu MB evict-first stream + %zu MB K/V; us a head (graphs of 10, minus the stream alone)\n", OC, C,
         OC * row_bytes / 1e6, layers >> 20, kvb >> 20);
  printf("%-38s", "variant \\ keep MB");
  for (int k : keeps_mb) printf("%8d", k);
  printf("%10s\n", "no stream");
  for (const V &v : vs) {
    printf("%-38s", v.name);
    for (int ki = 0; ki <= 5; ki++) {
      const int kmb = ki < 5 ? keeps_mb[ki] : 0;
      const int keep = (int)std::min<size_t>(OC, ((size_t)kmb << 20) / row_bytes);
      auto launch = [&]() {
        if (v.kind == 0) head_v1<<<v.blocks, 128, 0, s>>>(out, x, w, C, OC, keep);
        if (v.kind == 1) head_p<1><<<v.blocks, 256, 0, s>>>(out, x, w, C, OC, keep);
        if (v.kind == 2) head_p<2><<<v.blocks, 256, 0, s>>>(out, x, w, C, OC, keep);
        if (v.kind == 3) head_p<3><<<v.blocks, 256, 0, s>>>(out, x, w, C, OC, keep);
        if (v.kind == 4) head_p<4><<<v.blocks, 256, 0, s>>>(out, x, w, C, OC, keep);
      };
      // Graphs of 10 × [stream, head] and 10 × [stream]: the head's time is
      // the difference / 10 (no event or launch gaps).
      auto graph = [&](bool head, cudaGraphExec_t *ex) {
        return micro_capture(s, ex, [&] {
          for (int i = 0; i < 10; i++) {
            if (ki < 5) stream<<<nsm * 4, 512, 0, s>>>(lw, layers / 16, kv, kvb / 16, sink);
            if (head) launch();
          }
        });
      };
      cudaGraphExec_t ga, gb;
      CK(graph(true, &ga));
      CK(graph(false, &gb));
      // The two graphs alternate, so that both medians see the same state
      // of the machine.
      std::vector<float> ta, tb;
      for (int it = 0; it < 12; it++) {
        for (int k = 0; k < 2; k++) {
          CK(cudaEventRecord(e0, s));
          CK(cudaGraphLaunch(k ? gb : ga, s));
          CK(cudaEventRecord(e1, s));
          CK(cudaEventSynchronize(e1));
          float ms;
          CK(cudaEventElapsedTime(&ms, e0, e1));
          if (it >= 2) (k ? tb : ta).push_back(ms * 100.f);
        }
      }
      std::sort(ta.begin(), ta.end());
      std::sort(tb.begin(), tb.end());
      CK(cudaGraphExecDestroy(ga));
      CK(cudaGraphExecDestroy(gb));
      CK(cudaGetLastError());
      printf(ki < 5 ? "%8.1f" : "%10.1f", ki < 5 ? ta[5] - tb[5] : ta[5]);
      CK(cudaMemcpy(ho.data(), out, OC * 4, cudaMemcpyDeviceToHost));
      for (int i = 0; i < OC; i++)
        if (fabsf(ho[i] - hr[i]) > 1e-3f * (1.f + fabsf(hr[i]))) {
          printf("\nMISMATCH row %d: %f vs %f\n", i, ho[i], hr[i]);
          return 1;
        }
    }
    printf("\n");
  }
  // The GEMV's rate from L2: the first 24 MB of rows, all evict-last,
  // back to back (they stay in L2), against the same rows, evict-first,
  // after the stream (minus the stream alone).
  {
    const int rows = (24 << 20) / (int)row_bytes / 4 * 4;
    float res[3];
    for (int mode = 0; mode < 3; mode++) {  // 0: back to back, 1: stream + head, 2: stream
      cudaGraphExec_t ex;
      CK(micro_capture(s, &ex, [&] {
        for (int i = 0; i < 10; i++) {
          if (mode) stream<<<nsm * 4, 512, 0, s>>>(lw, layers / 16, kv, kvb / 16, sink);
          if (mode < 2) head_v1<<<rows / 4, 128, 0, s>>>(out, x, w, C, rows, mode ? 0 : rows);
        }
      }));
      CK(micro_replay_us(s, ex, 2, 10, &res[mode]));
      CK(cudaGraphExecDestroy(ex));
      res[mode] /= 10;  // a graph is ten calls
    }
    printf("v1 over %d rows (%.1f MB): %.1f us a call from L2 (back to back, evict-last), %.1f from DRAM (after the stream)\n",
           rows, rows * row_bytes / 1e6, res[0], res[1] - res[2]);
  }
  // The stream alone: how long the simulated layers take (bandwidth check).
  {
    cudaGraphExec_t ex;
    float us;
    CK(micro_capture(s, &ex, [&] { stream<<<nsm * 4, 512, 0, s>>>(lw, layers / 16, kv, kvb / 16, sink); }));
    CK(micro_replay_us(s, ex, 0, 10, &us));
    CK(cudaGraphExecDestroy(ex));
    printf("the stream alone: %.1f us (%.2f TB/s)\n", us, (layers + kvb) / (us * 1e-6) / 1e12);
  }
  return 0;
}
