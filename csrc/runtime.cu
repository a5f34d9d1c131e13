// runtime.cu — device, stream, memory, transfer and CUDA-graph entry points.
// Thin wrappers over the CUDA runtime that return a kv_status instead of
// printing or aborting, so Go decides what an error means.
#include <string.h>

#include "common.cuh"

extern "C" {

const char *kv_error_string(kv_status s) { return cudaGetErrorString((cudaError_t)s); }
const char *kv_error_name(kv_status s) { return cudaGetErrorName((cudaError_t)s); }

// kv_set_device makes device's primary context current on the calling OS
// thread. The runtime keeps the current device per host thread (a new thread
// starts on device 0), and Go moves goroutines between threads, so the Go side
// calls this (with the goroutine locked to its thread) before each batch of
// work. When the device is already current it only reads thread-local state.
kv_status kv_set_device(int device) {
  KV_TRY(cudaSetDevice(device));
  return 0;
}

kv_status kv_device_info(int device, char *name, int name_len, size_t *total_mem, int *sm,
                         int *num_sms, int *smem_optin) {
  cudaDeviceProp p;
  KV_TRY(cudaGetDeviceProperties(&p, device));
  if (name_len > 0) {
    strncpy(name, p.name, (size_t)name_len - 1);
    name[name_len - 1] = 0;
  }
  *total_mem = p.totalGlobalMem;
  *sm = p.major * 10 + p.minor;
  *num_sms = p.multiProcessorCount;
  *smem_optin = (int)p.sharedMemPerBlockOptin;
  return 0;
}

kv_status kv_mem_info(size_t *free_bytes, size_t *total_bytes) {
  KV_TRY(cudaMemGetInfo(free_bytes, total_bytes));
  return 0;
}

// Non-blocking: the stream does not synchronise with the legacy default
// stream, so nothing else in the process (another backend, a library using
// stream 0) serialises with our work. Transfers therefore go through this
// stream too, never through plain cudaMemcpy.
kv_status kv_stream_create(kv_stream *s) {
  cudaStream_t st;
  KV_TRY(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  *s = st;
  return 0;
}

kv_status kv_stream_destroy(kv_stream s) {
  KV_TRY(cudaStreamDestroy(s));
  return 0;
}

kv_status kv_stream_sync(kv_stream s) {
  KV_TRY(cudaStreamSynchronize(s));
  return kv_launched();
}

kv_status kv_event_create(kv_event *e) {
  cudaEvent_t ev;
  KV_TRY(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  *e = ev;
  return 0;
}

kv_status kv_event_destroy(kv_event e) {
  KV_TRY(cudaEventDestroy(e));
  return 0;
}

kv_status kv_event_record(kv_event e, kv_stream s) {
  KV_TRY(cudaEventRecord(e, s));
  return 0;
}

kv_status kv_event_sync(kv_event e) {
  KV_TRY(cudaEventSynchronize(e));
  return kv_launched();
}

kv_status kv_peek_error(void) { return (kv_status)cudaPeekAtLastError(); }

kv_status kv_malloc(void **p, size_t bytes) {
  *p = NULL;
  KV_TRY(cudaMalloc(p, bytes));
  return 0;
}

kv_status kv_free(void *p) {
  KV_TRY(cudaFree(p));
  return 0;
}

kv_status kv_malloc_host(void **p, size_t bytes) {
  *p = NULL;
  KV_TRY(cudaMallocHost(p, bytes));
  return 0;
}

kv_status kv_free_host(void *p) {
  KV_TRY(cudaFreeHost(p));
  return 0;
}

// kv_upload / kv_download enqueue on s, then wait, so they are ordered after
// the work already queued (a plain cudaMemcpy runs on the legacy stream,
// which a non-blocking stream does not wait for) and the host buffer — Go
// memory, pinned only for the duration of this call — is no longer used when
// they return.
kv_status kv_upload(kv_stream s, void *dst, const void *host, size_t bytes) {
  KV_TRY(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, s));
  KV_TRY(cudaStreamSynchronize(s));
  return 0;
}

kv_status kv_download(kv_stream s, void *host, const void *src, size_t bytes) {
  KV_TRY(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, s));
  KV_TRY(cudaStreamSynchronize(s));
  return 0;
}

kv_status kv_copy_in(kv_stream s, void *dst, const void *pinned, size_t bytes) {
  KV_TRY(cudaMemcpyAsync(dst, pinned, bytes, cudaMemcpyHostToDevice, s));
  return 0;
}

// The copy runs on side, which waits for nothing: the caller has made sure
// no queued work still reads dst. s then waits for it (an event wait the
// device resolves at once when the copy is long done, as it is when the
// host stages a step while the one before runs).
kv_status kv_copy_in_ahead(kv_stream s, kv_stream side, kv_event done, void *dst, const void *pinned, size_t bytes) {
  KV_TRY(cudaMemcpyAsync(dst, pinned, bytes, cudaMemcpyHostToDevice, side));
  KV_TRY(cudaEventRecord(done, side));
  KV_TRY(cudaStreamWaitEvent(s, done, 0));
  return 0;
}

kv_status kv_copy_out(kv_stream s, void *pinned, const void *src, size_t bytes) {
  KV_TRY(cudaMemcpyAsync(pinned, src, bytes, cudaMemcpyDeviceToHost, s));
  return 0;
}

kv_status kv_copy_d2d(kv_stream s, void *dst, const void *src, size_t bytes) {
  KV_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s));
  return 0;
}

kv_status kv_memset(kv_stream s, void *dst, int value, size_t bytes) {
  KV_TRY(cudaMemsetAsync(dst, value, bytes, s));
  return 0;
}

// Thread-local capture mode: only this thread is barred from calls that are
// unsafe while capturing (cudaMalloc, synchronous copies, syncs), and such a
// call fails (and invalidates the capture) instead of silently escaping the
// graph. It needs begin and end on the same OS thread, which the Go side
// guarantees by locking the capturing goroutine to its thread
// (runtime.LockOSThread) for the whole Capture; relaxed mode would work
// without the lock but would let a stray cudaMalloc inside the step pass.
kv_status kv_capture_begin(kv_stream s) {
  KV_TRY(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  return 0;
}

kv_status kv_capture_end(kv_stream s, kv_graph *g) {
  *g = NULL;
  cudaGraph_t graph = NULL;
  cudaError_t e = cudaStreamEndCapture(s, &graph);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    if (graph) cudaGraphDestroy(graph);
    return (kv_status)e;
  }
  cudaGraphExec_t exec = NULL;
  e = cudaGraphInstantiateWithFlags(&exec, graph, 0);
  cudaGraphDestroy(graph);  // the executable graph keeps what it needs
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return (kv_status)e;
  }
  *g = exec;
  return 0;
}

kv_status kv_graph_launch(kv_stream s, kv_graph g) {
  KV_TRY(cudaGraphLaunch(g, s));
  return 0;
}

kv_status kv_graph_destroy(kv_graph g) {
  KV_TRY(cudaGraphExecDestroy(g));
  return 0;
}

}  // extern "C"
