// micro-graph.cuh — what the micro programs time with: a captured graph and
// the median of its replays (scripts/head-l2-micro.cu, acc-placement-micro.cu).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

// micro_capture captures what body enqueues on s into *ex.
template <class Body>
cudaError_t micro_capture(cudaStream_t s, cudaGraphExec_t *ex, Body body) {
  cudaGraph_t g;
  cudaError_t e = cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
  if (e != cudaSuccess) return e;
  body();
  if ((e = cudaStreamEndCapture(s, &g)) != cudaSuccess) return e;
  e = cudaGraphInstantiateWithFlags(ex, g, 0);
  cudaGraphDestroy(g);
  return e;
}

// micro_replay_us launches ex warm + n times, each timed alone by events,
// and sets *us to the median of the last n (µs a launch).
inline cudaError_t micro_replay_us(cudaStream_t s, cudaGraphExec_t ex, int warm, int n, float *us) {
  cudaEvent_t e0, e1;
  cudaError_t e = cudaEventCreate(&e0);
  if (e == cudaSuccess) e = cudaEventCreate(&e1);
  std::vector<float> t;
  for (int it = 0; it < warm + n && e == cudaSuccess; it++) {
    float ms = 0.f;
    if ((e = cudaEventRecord(e0, s)) == cudaSuccess && (e = cudaGraphLaunch(ex, s)) == cudaSuccess &&
        (e = cudaEventRecord(e1, s)) == cudaSuccess && (e = cudaEventSynchronize(e1)) == cudaSuccess &&
        (e = cudaEventElapsedTime(&ms, e0, e1)) == cudaSuccess && it >= warm)
      t.push_back(ms * 1000.f);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  if (e != cudaSuccess) return e;
  std::sort(t.begin(), t.end());
  *us = t[t.size() / 2];
  return cudaSuccess;
}
