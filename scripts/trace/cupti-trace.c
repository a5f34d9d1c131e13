// cupti-trace.c — a CUPTI injection library that writes every kernel's GPU
// start and end time (ns), and every memory copy's (named memcpy-KIND-BYTES),
// to a CSV file, for seeing where a decode step's time goes on machines with
// no Nsight Systems. The CUDA driver loads it when CUDA_INJECTION64_PATH
// names it; KV_TRACE_OUT names the file (default /tmp/kvalign-trace.csv). Kernels inside CUDA graphs are traced
// too (CUPTI's concurrent-kernel records keep programmatic launches
// overlapping). Built by scripts/trace/trace.sh on the GPU machine, against
// that machine's CUPTI (KREC, MREC: the newest kernel and memcpy record types
// of its headers).
//
// Records reach the file a buffer (256 KB, ~1300 kernels) at a time, when
// one fills: the flush period asked for below did not deliver any on the
// H100 machine, and a Go program exits without running atexit handlers, so
// the last buffer's kernels are lost. Trace a run longer than what you
// analyse (analyze.py drops a cut-off last step).
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef KREC
#define KREC CUpti_ActivityKernel9
#endif
#ifndef MREC
#define MREC CUpti_ActivityMemcpy5
#endif

static FILE *out;

static void CUPTIAPI buffer_requested(uint8_t **buf, size_t *size, size_t *max_records) {
  *size = 256u << 10;
  *buf = (uint8_t *)aligned_alloc(8, *size);
  *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid) {
  (void)ctx, (void)stream, (void)size;
  CUpti_Activity *rec = NULL;
  while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
    if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const MREC *m = (const MREC *)rec;
      fprintf(out, "%llu,%llu,%u,0,0,0,0,memcpy-%d-%llu\n", (unsigned long long)m->start, (unsigned long long)m->end,
              m->streamId, (int)m->copyKind, (unsigned long long)m->bytes);
      continue;
    }
    if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && rec->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
    const KREC *k = (const KREC *)rec;
    fprintf(out, "%llu,%llu,%u,%d,%d,%d,%d,%s\n", (unsigned long long)k->start, (unsigned long long)k->end,
            k->streamId, k->gridX * k->gridY * k->gridZ, k->blockX * k->blockY * k->blockZ,
            k->staticSharedMemory + k->dynamicSharedMemory, k->registersPerThread, k->name);
  }
  fflush(out);
  free(buf);
}

static void finish(void) {
  cuptiActivityFlushAll(1);
  if (out) fclose(out);
}

int InitializeInjection(void) {
  const char *path = getenv("KV_TRACE_OUT");
  out = fopen(path ? path : "/tmp/kvalign-trace.csv", "w");
  if (!out) return 0;
  fprintf(out, "start,end,stream,blocks,threads,smem,regs,name\n");
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) return 0;
  if (cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) return 0;
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);  // optional: kernels are traced without it
  cuptiActivityFlushPeriod(50);
  atexit(finish);
  return 1;
}
