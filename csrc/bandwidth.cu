// bandwidth.cu: the card's device-to-device copy bandwidth, measured the way
// METHOD.md asks: a large copy (bytes read + bytes written) timed with
// events after a warm-up. It is the floor memory-bound decoding is compared
// with (`kvalign bench decode`).
#include "kvalign.h"

#include <cuda_runtime.h>

extern "C" kv_status kv_copy_bandwidth(kv_stream s, long long bytes, int reps, float *gbps) {
    void *a = nullptr, *b = nullptr;
    cudaEvent_t start = nullptr, stop = nullptr;
    cudaError_t err = cudaMalloc(&a, bytes);
    if (err == cudaSuccess) err = cudaMalloc(&b, bytes);
    if (err == cudaSuccess) err = cudaMemsetAsync(a, 1, bytes, s);
    if (err == cudaSuccess) err = cudaEventCreate(&start);
    if (err == cudaSuccess) err = cudaEventCreate(&stop);
    for (int i = 0; i < 3 && err == cudaSuccess; i++) err = cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s);
    if (err == cudaSuccess) err = cudaEventRecord(start, s);
    // Alternate directions so neither buffer stays cache-resident.
    for (int i = 0; i < reps && err == cudaSuccess; i++)
        err = cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice, s);
    if (err == cudaSuccess) err = cudaEventRecord(stop, s);
    if (err == cudaSuccess) err = cudaEventSynchronize(stop);
    float ms = 0;
    if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, start, stop);
    if (err == cudaSuccess) *gbps = (float)(2.0 * (double)bytes * reps / (ms * 1e-3) / 1e9);
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    if (a) cudaFree(a);
    if (b) cudaFree(b);
    return (kv_status)err;
}
