// stamps.cu — writes the in-kernel timestamps of a measuring build
// (make -C csrc STAMPS=1: nvcc -DKV_STAMPS, stamps.cuh) to a file: per
// translation unit its record count and ring size (two u64), then its ring
// (kStampCap records of kStampWords u64). scripts/stamps.py reads it.
#include <cstdio>
#include <vector>

#include "common.cuh"
#include "kvalign.h"
#include "stamps.cuh"

#ifdef KV_STAMPS
extern "C" long long kv_stamps_fused(unsigned long long *dst, long long cap);
extern "C" long long kv_stamps_mlp(unsigned long long *dst, long long cap);
extern "C" long long kv_stamps_attention(unsigned long long *dst, long long cap);
extern "C" long long kv_stamps_head(unsigned long long *dst, long long cap);

extern "C" int kv_stamps_write(const char *path) {
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  std::vector<unsigned long long> buf((size_t)kStampCap * kStampWords);
  long long (*units[])(unsigned long long *, long long) = {kv_stamps_fused, kv_stamps_attention, kv_stamps_mlp, kv_stamps_head};
  for (auto u : units) {
    const long long n = u(buf.data(), kStampCap);
    const unsigned long long hdr[2] = {(unsigned long long)n, kStampCap};
    fwrite(hdr, 8, 2, f);
    fwrite(buf.data(), 8, buf.size(), f);
  }
  return fclose(f);
}
#else
extern "C" int kv_stamps_write(const char *) { return -1; }
#endif
