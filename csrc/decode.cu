// decode.cu — the persistent decode kernel (kv_decode, see kvalign.h): every
// layer of a one-token step in one launch.
//
// Why: batch-1 decoding of small models is bound by latency, not bandwidth.
// A launch chain pays a kernel boundary (grid completion, memory flush, the
// next grid's start) five times a layer — about 3 µs each even as
// programmatic dependents, 0.45 ms for SmolLM2's 30 layers against a
// 0.09 ms weight-streaming floor. Here one block per SM runs the whole step
// and a phase boundary is a barrier on a counter in L2.
//
// Outcome (docs/PERF.md, version 7): on an H100 this is slower than the
// chain (SmolLM2 0.731 against 0.666 ms a token, distilgpt2 0.243 against
// 0.179): a grid barrier plus a phase's own serial latency costs ~4.5 µs,
// no less than a programmatic-dependent kernel boundary. So it is opt-in
// (RunnerOptions.Persistent), kept tested, with a per-phase trace
// (kv_decode's trace argument) to measure the next attempt against.
//
// Structure. A layer is five phases (kQKV, kAttn, kOut, kUp, kDown). Every
// block owns a fixed slice of each phase's work: rows [g·OC/G, (g+1)·OC/G)
// of a product, or one (sequence, kv head, key split) of the attention.
// Before a block waits for phase p's inputs it copies (cp.async) the
// constant data of its slice of phase p + kSlots − 1 — weight rows, norm
// weights, bias, the cached K/V rows of its key split — into a ring of
// kSlots shared-memory slots. The weights thus stream from HBM kSlots − 1
// phases ahead of use, overlapped with the barrier chain, and a phase only
// reads its small activations (x, q, the attention partials) from L2.
//
// Barriers. Phase p has its own counter; each block with work in p adds 1
// after writing its outputs, and a block with work in p + 1 waits until
// the counter reaches the number of blocks with work in p. Every producer
// of phase p waited for all producers of p − 1 first, so everything
// written in phases ≤ p is visible to a block that passed p's barrier, and
// every reader of a buffer in phase p has finished before anyone writes it
// again in a later phase (the read-after-write and write-after-read orders
// both follow the chain). A block with no work in a phase neither waits
// nor counts, so it runs ahead to its next slice's copies. Data written
// inside the kernel is read through L2 (ld.cg, cp.async.cg), never from a
// possibly stale L1 line. The last block to finish zeroes the counters for
// the next launch. A barrier that waits more than a second traps (the grid
// was not co-resident), so a misuse is an error, not a hang.
//
// Attention is split over keys: block (b, kv head, split) computes the
// softmax partial (max, sum, unnormalised output) of its keys for the
// kv head's query heads; kOut's blocks merge the partials while staging
// their input. The newest entry (from this step's q|k|v row) is taken by
// the last split, which also rotates and writes it to the cache. Older
// keys come from the slot ring (prefetched), and with the position shift
// they are rotated at their cache index before the barrier.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxB = 4;      // sequences a launch takes
constexpr int kSlots = 4;     // shared-memory slots: phases in flight
constexpr int kMaxSplit = 8;  // attention splits per (sequence, kv head)
constexpr int kPerLayer = 5;
// Key rows in shared memory are HS + kKeyPad floats apart, so that threads
// reading different keys' float4s do not collide on the same banks.
constexpr int kKeyPad = 4;
// Barrier counters 128 bytes apart: a phase's arrivals and the next
// phase's polls never share an L2 line with another phase's.
constexpr int kCounterStride = 32;
// Trace points per phase: ready (slot landed), released (barrier passed),
// staged (input in shared memory), computed (product or scores), done.
constexpr int kTracePoints = 5;
enum Phase { kQKV = 0, kAttn = 1, kOut = 2, kUp = 3, kDown = 4 };

// Geometry: everything the host derives from the shape, passed by value.
struct Geo {
  kv_decode_shape sh;
  int G;           // blocks (one per SM)
  int GQ, qkvw;    // query heads per kv head; q|k|v row width
  int nsplit, kps; // attention splits, most keys a split holds (max_len)
  int kin;         // widest staged input row (floats): max(C, NH·HS, F)
  int slot_bytes;  // one ring slot
  int red_floats;  // the GEMV's partial sums
  int phases;      // kPerLayer·L
  // dynamic shared memory offsets (bytes)
  int off_in, off_red, off_att, off_layers, off_freq, off_keys, off_xown, smem;
};

// rows_lo: block g's first row of OC rows over G blocks: balanced when
// every block gets one, else one each to blocks 0…OC−1 (producers()).
__host__ __device__ inline int rows_lo(int OC, int g, int G) {
  return OC >= G ? OC * g / G : min(g, OC);  // OC·G < 2^31 (geometry checks)
}
__host__ __device__ inline int max_rows(int OC, int G) { return (OC + G - 1) / G; }
__host__ __device__ inline int align16(int n) { return (n + 15) & ~15; }
// bias_bytes: the aligned 4-byte span of halves covering `rows` rows from any start.
__host__ __device__ inline int bias_bytes(int rows) { return align16(2 * (rows + 2)); }

// Producers of each phase kind: blocks with a nonempty slice.
__host__ __device__ inline int producers(const Geo &g, int kind) {
  const kv_decode_shape &s = g.sh;
  switch (kind) {
    case kQKV: return min(g.G, g.qkvw);
    case kAttn: return s.B * s.NKV * g.nsplit;
    case kOut: return min(g.G, s.C);
    case kUp: return min(g.G, s.F);
    default: return min(g.G, s.C);
  }
}

// ---- slot layout of a product phase ----
// [weights: rows × K halves][norm w: C halves][norm b: C halves][bias span]
struct Slice {
  int r0, rows;  // first output row and count (SwiGLU: gate rows j0.., up rows F+j0..)
  int K;
  int off_nw, off_nb, off_bias;
};

__device__ inline Slice slice_of(const Geo &g, int kind, int blk) {
  const kv_decode_shape &s = g.sh;
  Slice sl{};
  int OC = s.C;
  sl.K = s.C;
  switch (kind) {
    case kQKV: OC = g.qkvw; break;
    case kOut: sl.K = s.NH * s.HS; break;
    case kUp: OC = s.F; break;
    case kDown: sl.K = s.F; break;
  }
  sl.r0 = rows_lo(OC, blk, g.G);
  sl.rows = rows_lo(OC, blk + 1, g.G) - sl.r0;
  const int wrows = (kind == kUp && s.swiglu) ? 2 * sl.rows : sl.rows;
  sl.off_nw = wrows * sl.K * 2;
  sl.off_nb = sl.off_nw + s.C * 2;
  sl.off_bias = sl.off_nb + s.C * 2;
  return sl;
}

// Own is what a block reads many times and that does not change during the
// kernel, kept in shared memory from the start: the step's integers, its
// attention item and its product slices. (Each of these read from global
// memory in a phase would be an L2 round trip on that phase's critical path.)
struct Own {
  int len[kMaxB], pos[kMaxB], slot[kMaxB];
  int b, kvh, sp, j0, n, nold;  // attention item: keys j0…j0+n−1, the first nold of them cached
  bool attends, owner;          // has an attention item; holds the new entry
  Slice sl[kPerLayer];          // product slices (kAttn unused)
};

// ---- copies into a slot (cp.async) ----

__device__ inline void copy16(unsigned char *dst, const void *src, int bytes) {
  const unsigned char *p = static_cast<const unsigned char *>(src);
  for (int i = threadIdx.x * 16; i < bytes; i += kThreads * 16) kv_cp_async16_cg(dst + i, p + i);
}

__device__ inline void cp_async4(void *smem, const void *gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(gmem) : "memory");
}

// copy_bias: halves [r0, r0+rows) of bias, as the aligned 4-byte words that
// cover them (element r0 lands at halves offset r0 & 1).
__device__ inline void copy_bias(unsigned char *dst, const void *bias, int r0, int rows) {
  if (bias == nullptr || rows == 0) return;
  const int a = r0 & ~1, words = (r0 + rows - a + 1) / 2;
  const uint32_t *src = reinterpret_cast<const uint32_t *>(static_cast<const __half *>(bias) + a);
  for (int i = threadIdx.x; i < words; i += kThreads) cp_async4(dst + 4 * i, src + i);
}

// issue starts the copies of the block's constant data for phase p into
// slot. keys: the cache slots of the block's attention keys.
__device__ void issue(const Geo &g, const kv_decode_layer *layers, const Own &own, const int *keys, int p,
                      unsigned char *slot) {
  const kv_decode_shape &s = g.sh;
  const int kind = p % kPerLayer;
  const kv_decode_layer &Lw = layers[p / kPerLayer];
  if (kind == kAttn) {
    if (!own.attends) return;
    const int row16 = s.HS / 4;  // 16-byte chunks of a head row
    float *K = reinterpret_cast<float *>(slot), *V = K + g.kps * (s.HS + kKeyPad);
    for (int i = threadIdx.x; i < own.nold * row16; i += kThreads) {
      const int t = i / row16, c = i % row16;
      const long long src = ((long long)keys[t] * s.NKV + own.kvh) * s.HS + 4 * c;
      kv_cp_async16_cg(K + t * (s.HS + kKeyPad) + 4 * c, Lw.kc + src);
      kv_cp_async16_cg(V + t * s.HS + 4 * c, Lw.vc + src);
    }
    return;
  }
  const Slice &sl = own.sl[kind];
  if (sl.rows == 0) return;
  const void *w = nullptr, *nw = nullptr, *nb = nullptr, *bias = nullptr;
  switch (kind) {
    case kQKV: w = Lw.qkv_w, nw = Lw.norm1_w, nb = Lw.norm1_b, bias = Lw.qkv_b; break;
    case kOut: w = Lw.o_w, bias = Lw.o_b; break;
    case kUp: w = Lw.up_w, nw = Lw.norm2_w, nb = Lw.norm2_b, bias = Lw.up_b; break;
    case kDown: w = Lw.down_w, bias = Lw.down_b; break;
  }
  const __half *wh = static_cast<const __half *>(w);
  copy16(slot, wh + (size_t)sl.r0 * sl.K, sl.rows * sl.K * 2);
  if (kind == kUp && s.swiglu) copy16(slot + sl.rows * sl.K * 2, wh + (size_t)(s.F + sl.r0) * sl.K, sl.rows * sl.K * 2);
  if (nw != nullptr) copy16(slot + sl.off_nw, nw, s.C * 2);
  if (nb != nullptr && !s.rms) copy16(slot + sl.off_nb, nb, s.C * 2);
  copy_bias(slot + sl.off_bias, bias, sl.r0, sl.rows);
}

// ---- grid barriers ----

__device__ __forceinline__ unsigned ld_acquire(const unsigned *p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned ld_relaxed(const unsigned *p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// arrive: the block's writes of this phase are done; count it (a release:
// the block's writes, ordered before it by the block barrier, are visible
// to whoever acquires the count).
__device__ __forceinline__ void arrive(unsigned *ctr) {
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(ctr) : "memory");
}

// wait_for: until `need` blocks have arrived at ctr.
__device__ __forceinline__ void wait_for(const unsigned *ctr, unsigned need) {
  if (threadIdx.x == 0 && ld_acquire(ctr) < need) {
    const unsigned long long t0 = kv_global_ns();
    while (ld_relaxed(ctr) < need) {
      if (kv_global_ns() - t0 > 1000000000ull) __trap();  // not co-resident: fail rather than hang
    }
    asm volatile("fence.acq_rel.gpu;" ::: "memory");  // acquire what the producers released
  }
  __syncthreads();
}

// ---- phase arithmetic ----

// stage copies B rows of `width` floats (src rows `stride` apart, written in
// this kernel: through L2) into xs (rows `width` apart).
__device__ inline void stage(float *xs, const float *src, int B, int width, int stride) {
  const int n4 = width / 4;
  for (int i = threadIdx.x; i < B * n4; i += kThreads) {
    const int b = i / n4, c = i % n4;
    reinterpret_cast<float4 *>(xs + b * width)[c] = __ldcg(reinterpret_cast<const float4 *>(src + b * stride) + c);
  }
  __syncthreads();
}

// stage_norm stages the B rows of x (C wide) and normalises them in place:
// LayerNorm (with optional bias) or RMSNorm. The statistics are summed in
// double while the rows are staged (one pass, one block reduction), which
// keeps E[x²] − mean² exact enough for LayerNorm (gpu/ref sums in float64
// too). red: kWarps·2·kMaxB doubles, then 2·kMaxB floats.
__device__ void stage_norm(float *xs, const float *x, int B, int C, const __half *w, const __half *nb, bool rms,
                           float eps, double *red) {
  double s1[kMaxB] = {}, s2[kMaxB] = {};
  const int n4 = C / 4;
  for (int i = threadIdx.x; i < B * n4; i += kThreads) {
    const int b = i / n4, c = i % n4;
    const float4 v = __ldcg(reinterpret_cast<const float4 *>(x + b * C) + c);
    reinterpret_cast<float4 *>(xs + b * C)[c] = v;
#pragma unroll
    for (int k = 0; k < kMaxB; k++)
      if (k == b) {
        s1[k] += (double)v.x + (double)v.y + (double)v.z + (double)v.w;
        s2[k] += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
      }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kMaxB; k++)
    if (k < B) s1[k] = kv_warp_sum(s1[k]), s2[k] = kv_warp_sum(s2[k]);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < kMaxB; k++) red[warp * 2 * kMaxB + k] = s1[k], red[warp * 2 * kMaxB + kMaxB + k] = s2[k];
  __syncthreads();
  // Lane b of warp 0 turns row b's sums into its mean and 1/std (the only
  // double divide and square root), for everyone through shared memory.
  float *stats = reinterpret_cast<float *>(red + kWarps * 2 * kMaxB);  // [kMaxB][2]
  if (threadIdx.x < B) {
    const int k = threadIdx.x;
    double t1 = 0, t2 = 0;
    for (int q = 0; q < kWarps; q++) t1 += red[q * 2 * kMaxB + k], t2 += red[q * 2 * kMaxB + kMaxB + k];
    const double m = rms ? 0.0 : t1 / C;
    stats[2 * k] = (float)m;
    stats[2 * k + 1] = (float)(1.0 / sqrt(t2 / C - m * m + (double)eps));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < B * n4; i += kThreads) {
    const int b = i / n4, c = i % n4;
    float4 v = reinterpret_cast<float4 *>(xs + b * C)[c];
    const float mb = stats[2 * b], rs = stats[2 * b + 1];
    float *e = &v.x;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int cc = 4 * c + j;
      e[j] = fmaf((e[j] - mb) * rs, __half2float(w[cc]), nb != nullptr ? __half2float(nb[cc]) : 0.f);
    }
    reinterpret_cast<float4 *>(xs + b * C)[c] = v;
  }
  __syncthreads();
}

// gemv: the block's rows (rows × K halves at ws) times the staged inputs
// (xs, B rows K apart). Lanes work in groups of TPR (a power of two ≤ 32,
// fewer the more rows there are, so that all rows run at once); a group
// takes a row, or a part of one when there are fewer rows than groups, and
// sums its lanes by shuffles. Returns parts: red[(r·parts + part)·kMaxB + b]
// holds the partial sums, which the caller adds in order (row_dot).
__device__ int gemv(const unsigned char *ws, int rows, int K, const float *xs, int B, float *red) {
  const int tpr = rows > 32 ? 4 : rows > 16 ? 8 : rows > 8 ? 16 : 32;
  const int groups = kThreads / tpr, gid = threadIdx.x / tpr, l = threadIdx.x % tpr;
  const int parts = max(1, groups / rows);
  const int chunks = K / 8, per = (chunks + parts - 1) / parts;
  // Whole warps go round the loop together (the shuffles need every lane).
  for (int base = 0; base < rows * parts; base += groups) {
    const int task = base + gid;
    const bool active = task < rows * parts;
    const int r = task / parts, part = task % parts;
    const int c1 = active ? min(chunks, (part + 1) * per) : 0;
    const uint4 *wr = reinterpret_cast<const uint4 *>(ws + (size_t)r * K * 2);
    float acc[kMaxB] = {};
    for (int c = part * per + l; c < c1; c += tpr) {
      float wf[8];
      kv_unpack16<true>(wr[c], wf);
#pragma unroll
      for (int b = 0; b < kMaxB; b++)
        if (b < B) {
          const float4 x0 = reinterpret_cast<const float4 *>(xs + b * K)[2 * c];
          const float4 x1 = reinterpret_cast<const float4 *>(xs + b * K)[2 * c + 1];
          float a = acc[b];
          a = fmaf(wf[0], x0.x, a), a = fmaf(wf[1], x0.y, a), a = fmaf(wf[2], x0.z, a), a = fmaf(wf[3], x0.w, a);
          a = fmaf(wf[4], x1.x, a), a = fmaf(wf[5], x1.y, a), a = fmaf(wf[6], x1.z, a), a = fmaf(wf[7], x1.w, a);
          acc[b] = a;
        }
    }
#pragma unroll
    for (int b = 0; b < kMaxB; b++)
      if (b < B)
        for (int o = tpr / 2; o > 0; o >>= 1) acc[b] += __shfl_xor_sync(KV_FULL_MASK, acc[b], o);
    if (active && l == 0)
#pragma unroll
      for (int b = 0; b < kMaxB; b++) red[task * kMaxB + b] = acc[b];
  }
  __syncthreads();
  return parts;
}

__device__ __forceinline__ float row_dot(const float *red, int parts, int r, int b) {
  float t = 0.f;
  for (int k = 0; k < parts; k++) t += red[(r * parts + k) * kMaxB + b];
  return t;
}

__device__ __forceinline__ float bias_at(const unsigned char *slot, const Slice &sl, const void *bias, int r) {
  if (bias == nullptr) return 0.f;
  return __half2float(reinterpret_cast<const __half *>(slot + sl.off_bias)[(sl.r0 & 1) + r]);
}

// As fused.cu (full-precision expf/tanhf, as the reference activations).
__device__ __forceinline__ float gelu_new(float v) {
  return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

struct Args {
  const kv_decode_layer *layers;
  float *x, *qkv, *act, *part;
  unsigned *sync;
  unsigned long long *trace;  // optional: [G][phases][3] ns (ready, released, done)
  const int32_t *pos, *slots, *order, *lens;
};

// mark records trace point k of the block's current phase (thread 0).
__device__ __forceinline__ void mark(unsigned long long *tr, int k) {
  if (tr != nullptr && threadIdx.x == 0) tr[k] = kv_global_ns();
}

// product_phase: kQKV, kOut, kUp or kDown for a block with rows in it.
// xown [kMaxB][rows]: the residual rows the block owns (kOut and kDown
// have the same slices), kept here so their update needs no load.
__device__ void product_phase(const Geo &g, const Args &a, const kv_decode_layer &Lw, int kind, const Own &own,
                              const unsigned char *slot, float *xs, float *red, float *xown,
                              unsigned long long *tr) {
  const kv_decode_shape &s = g.sh;
  const Slice &sl = own.sl[kind];
  const int B = s.B;
  // 1. The input rows.
  if (kind == kQKV || kind == kUp) {
    stage_norm(xs, a.x, B, s.C, reinterpret_cast<const __half *>(slot + sl.off_nw),
               (s.rms || (kind == kQKV ? Lw.norm1_b : Lw.norm2_b) == nullptr)
                   ? nullptr
                   : reinterpret_cast<const __half *>(slot + sl.off_nb),
               s.rms, s.eps, reinterpret_cast<double *>(red));
  } else if (kind == kDown) {
    stage(xs, a.act, B, s.F, s.F);
  } else {
    // kOut: merge the attention partials of each (b, query head): split s
    // holds (m_s, l_s, o_s) = (max score, Σ exp(score − m_s), Σ exp(score
    // − m_s)·v); att = Σ o_s·e_s / Σ l_s·e_s with e_s = exp(m_s − M), M the
    // largest m_s (empty splits have l_s = 0 and o_s = 0).
    // Every thread issues the loads of its output elements first (kE at a
    // time); meanwhile B·NH threads turn each (b, head)'s (m_s, l_s) into
    // the splits' weights e_s/L in shared memory (mw). One round trip.
    constexpr int kE = 4;
    const int HS = s.HS, D = HS + 2, BH = B * s.NH, total = BH * HS;
    float *mw = red;  // [BH][kMaxSplit]
    float o[kE][kMaxSplit];
    auto load = [&](int i0) {
#pragma unroll
      for (int e = 0; e < kE; e++) {
        const int i = i0 + e * kThreads;
        const float *pp = a.part + (size_t)(i / HS) * g.nsplit * D + 2 + i % HS;
#pragma unroll
        for (int sp = 0; sp < kMaxSplit; sp++) o[e][sp] = i < total && sp < g.nsplit ? __ldcg(pp + sp * D) : 0.f;
      }
    };
    load(threadIdx.x);
    for (int bh = threadIdx.x; bh < BH; bh += kThreads) {
      const float *pp = a.part + (size_t)bh * g.nsplit * D;
      float m[kMaxSplit], l[kMaxSplit], M = -INFINITY, L = 0.f;
#pragma unroll
      for (int sp = 0; sp < kMaxSplit; sp++) {
        const bool ok = sp < g.nsplit;
        m[sp] = ok ? __ldcg(pp + sp * D) : -INFINITY;
        l[sp] = ok ? __ldcg(pp + sp * D + 1) : 0.f;
        M = fmaxf(M, m[sp]);
      }
#pragma unroll
      for (int sp = 0; sp < kMaxSplit; sp++) {
        m[sp] = l[sp] > 0.f ? expf(m[sp] - M) : 0.f;
        L = fmaf(l[sp], m[sp], L);
      }
#pragma unroll
      for (int sp = 0; sp < kMaxSplit; sp++) mw[bh * kMaxSplit + sp] = m[sp] / L;
    }
    __syncthreads();
    for (int i0 = threadIdx.x; i0 < total; i0 += kE * kThreads) {
      if (i0 != threadIdx.x) load(i0);  // more elements than one batch (large B)
#pragma unroll
      for (int e = 0; e < kE; e++) {
        const int i = i0 + e * kThreads;
        if (i >= total) break;
        const float *w = mw + (i / HS) * kMaxSplit;
        float acc = 0.f;
#pragma unroll
        for (int sp = 0; sp < kMaxSplit; sp++) acc = fmaf(o[e][sp], w[sp], acc);
        xs[i] = acc;
      }
    }
    __syncthreads();
  }
  mark(tr, 2);
  // 2. The product.
  const int wrows = (kind == kUp && s.swiglu) ? 2 * sl.rows : sl.rows;
  const int parts = gemv(slot, wrows, sl.K, xs, B, red);
  mark(tr, 3);
  // 3. The epilogue.
  const void *bias = kind == kQKV ? Lw.qkv_b : kind == kOut ? Lw.o_b : kind == kUp ? Lw.up_b : Lw.down_b;
  for (int i = threadIdx.x; i < sl.rows * B; i += kThreads) {
    const int r = i / B, b = i % B, row = sl.r0 + r;
    const float v = row_dot(red, parts, r, b) + bias_at(slot, sl, bias, r);
    switch (kind) {
      case kQKV: __stcg(a.qkv + b * g.qkvw + row, v); break;
      case kUp:
        __stcg(a.act + b * s.F + row, s.swiglu ? silu_mul(v, row_dot(red, parts, sl.rows + r, b)) : gelu_new(v));
        break;
      default: {  // kOut, kDown: the residual add (this block owns the row)
        const float x = xown[b * sl.rows + r] + v;
        xown[b * sl.rows + r] = x;
        __stcg(a.x + b * s.C + row, x);
      }
    }
  }
}

// rotate_keys: with the position shift, key t of the split (cache index
// j0 + t) is rotated at its index; done on the prefetched rows before the
// barrier. inv: inverse frequencies [HS/2].
__device__ void rotate_keys(float *K, int n, int j0, int HS, const float *inv) {
  const int hh = HS / 2;
  for (int i = threadIdx.x; i < n * hh; i += kThreads) {
    const int t = i / hh, k = i % hh;
    kv_rope_pair(K[t * (HS + kKeyPad) + k], K[t * (HS + kKeyPad) + k + hh], (float)(j0 + t) * inv[k]);
  }
  __syncthreads();
}

// attention_phase: the block's item (b, kv head, split) computes its partial.
__device__ void attention_phase(const Geo &g, const Args &a, const kv_decode_layer &Lw, const Own &own,
                                float *slotK, float *scr, const float *inv, unsigned long long *tr) {
  const kv_decode_shape &s = g.sh;
  const int HS = s.HS, hh = HS / 2, GQ = g.GQ, D = HS + 2;
  const int b = own.b, kvh = own.kvh, sp = own.sp, n = own.n, nold = own.nold, len = own.len[b];
  const bool owner = own.owner;
  const float *slotV = slotK + g.kps * (HS + kKeyPad);
  float *q = scr, *knew = q + GQ * HS, *vnew = knew + HS, *sc = vnew + HS;  // sc [GQ][kps]
  const float *row = a.qkv + b * g.qkvw;
  const int pos = own.pos[b];
  // 1. This step's query heads (rotated at the position given) and, for the
  // owner, the new key and value (the key rotated at its position: pos, or
  // its cache index len − 1 with the shift; cached rotated only without).
  for (int i = threadIdx.x; i < (GQ + 1) * hh; i += kThreads) {
    const int h = i / hh, k = i % hh;
    if (h < GQ) {
      const float *src = row + (kvh * GQ + h) * HS;
      float x1 = __ldcg(src + k), x2 = __ldcg(src + k + hh);
      if (s.theta != 0.f) kv_rope_pair(x1, x2, (float)pos * inv[k]);
      q[h * HS + k] = x1, q[h * HS + k + hh] = x2;
    } else if (owner) {
      const float *ks = row + (s.NH + kvh) * HS, *vs = row + (s.NH + s.NKV + kvh) * HS;
      float x1 = __ldcg(ks + k), x2 = __ldcg(ks + k + hh);
      const float v1 = __ldcg(vs + k), v2 = __ldcg(vs + k + hh);
      const long long dst = ((long long)own.slot[b] * s.NKV + kvh) * HS;
      if (s.theta != 0.f && !s.shift) kv_rope_pair(x1, x2, (float)pos * inv[k]);
      Lw.kc[dst + k] = x1, Lw.kc[dst + k + hh] = x2;
      Lw.vc[dst + k] = v1, Lw.vc[dst + k + hh] = v2;
      if (s.theta != 0.f && s.shift) kv_rope_pair(x1, x2, (float)(len - 1) * inv[k]);
      knew[k] = x1, knew[k + hh] = x2, vnew[k] = v1, vnew[k + hh] = v2;
    }
  }
  __syncthreads();
  mark(tr, 2);
  // 2. Scores: a thread per (query head, key), the key's row against the
  // head's (float4s: HS + kKeyPad keeps a warp's rows on different banks).
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float scale = 1.f / sqrtf((float)HS);
  const int KS = HS + kKeyPad;
  for (int i = threadIdx.x; i < GQ * n; i += kThreads) {
    const int h = i / n, t = i % n;
    const float4 *k = reinterpret_cast<const float4 *>(t < nold ? slotK + t * KS : knew);
    const float4 *qh = reinterpret_cast<const float4 *>(q + h * HS);
    float d0 = 0.f, d1 = 0.f;
    for (int e = 0; e < HS / 4; e += 2) {
      const float4 k0 = k[e], q0 = qh[e], k1 = k[e + 1], q1 = qh[e + 1];
      d0 = fmaf(k0.x, q0.x, d0), d0 = fmaf(k0.y, q0.y, d0), d0 = fmaf(k0.z, q0.z, d0), d0 = fmaf(k0.w, q0.w, d0);
      d1 = fmaf(k1.x, q1.x, d1), d1 = fmaf(k1.y, q1.y, d1), d1 = fmaf(k1.z, q1.z, d1), d1 = fmaf(k1.w, q1.w, d1);
    }
    sc[h * g.kps + t] = (d0 + d1) * scale;
  }
  __syncthreads();
  mark(tr, 3);
  // 3. Per query head (a warp each): max, probabilities, their sum.
  float *ml = sc + GQ * g.kps;  // [GQ][2]
  for (int h = warp; h < GQ; h += kWarps) {
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, sc[h * g.kps + t]);
    m = kv_warp_max(m);
    float l = 0.f;
    for (int t = lane; t < n; t += 32) {
      const float p = expf(sc[h * g.kps + t] - m);
      sc[h * g.kps + t] = p;
      l += p;
    }
    l = kv_warp_sum(l);
    if (lane == 0) ml[2 * h] = m, ml[2 * h + 1] = l;
  }
  __syncthreads();
  // 4. The unnormalised output and the partial record (m, l, o[HS]).
  for (int i = threadIdx.x; i < GQ * HS; i += kThreads) {
    const int h = i / HS, e = i % HS;
    const float *p = sc + h * g.kps;
    float o0 = 0.f, o1 = 0.f;
    int t = 0;
    for (; t + 1 < nold; t += 2) o0 = fmaf(p[t], slotV[t * HS + e], o0), o1 = fmaf(p[t + 1], slotV[(t + 1) * HS + e], o1);
    for (; t < n; t++) o0 = fmaf(p[t], t < nold ? slotV[t * HS + e] : vnew[e], o0);
    float *rec = a.part + ((size_t)(b * s.NH + kvh * GQ + h) * g.nsplit + sp) * D;
    __stcg(rec + 2 + e, o0 + o1);
    if (e == 0) __stcg(rec, n > 0 ? ml[2 * h] : -INFINITY), __stcg(rec + 1, n > 0 ? ml[2 * h + 1] : 0.f);
  }
}

// init_own fills the block's Own, its attention keys' cache slots and its
// residual rows (x as the kernel found it).
__device__ void init_own(const Geo &g, const Args &a, Own &own, int *keys, float *xown) {
  const kv_decode_shape &s = g.sh;
  const int blk = blockIdx.x;
  if (threadIdx.x == 0) {
    for (int b = 0; b < s.B; b++) own.len[b] = a.lens[b], own.pos[b] = a.pos[b], own.slot[b] = a.slots[b];
    for (int k = 0; k < kPerLayer; k++) own.sl[k] = slice_of(g, k, blk);
    own.attends = blk < producers(g, kAttn);
    own.b = blk / (s.NKV * g.nsplit), own.kvh = blk / g.nsplit % s.NKV, own.sp = blk % g.nsplit;
    own.n = own.nold = own.j0 = 0, own.owner = false;
    if (own.attends) {
      const int len = own.len[own.b], per = (len + g.nsplit - 1) / g.nsplit;
      own.j0 = own.sp * per;
      const int jend = min(len, own.j0 + per);
      own.n = max(0, jend - own.j0);
      own.owner = own.n > 0 && jend == len;
      own.nold = own.owner ? own.n - 1 : own.n;
    }
  }
  __syncthreads();
  if (own.attends)
    for (int t = threadIdx.x; t < own.nold; t += kThreads) keys[t] = a.order[own.b * s.max_len + own.j0 + t];
  const Slice &sl = own.sl[kOut];
  for (int i = threadIdx.x; i < s.B * sl.rows; i += kThreads)
    xown[i] = a.x[i / sl.rows * s.C + sl.r0 + i % sl.rows];
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads, 1) decode_kernel(Geo g, Args a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ Own own;
  const kv_decode_shape &s = g.sh;
  const int blk = blockIdx.x;
  float *xs = reinterpret_cast<float *>(smem + g.off_in);
  float *red = reinterpret_cast<float *>(smem + g.off_red);
  float *scr = reinterpret_cast<float *>(smem + g.off_att);
  kv_decode_layer *layers = reinterpret_cast<kv_decode_layer *>(smem + g.off_layers);
  float *inv = reinterpret_cast<float *>(smem + g.off_freq);
  int *keys = reinterpret_cast<int *>(smem + g.off_keys);
  float *xown = reinterpret_cast<float *>(smem + g.off_xown);

  // The layer table and the block's constants, once.
  for (int i = threadIdx.x; i < s.L * (int)sizeof(kv_decode_layer) / 8; i += kThreads)
    reinterpret_cast<uint64_t *>(layers)[i] = reinterpret_cast<const uint64_t *>(a.layers)[i];
  init_own(g, a, own, keys, xown);

  auto slot_of = [&](int p) { return smem + (size_t)(p % kSlots) * g.slot_bytes; };
  for (int p = 0; p < kSlots - 1; p++) {
    if (p < g.phases) issue(g, layers, own, keys, p, slot_of(p));
    kv_cp_async_commit();
  }
  // The RoPE inverse frequencies (a double pow each) while those copies fly.
  if (s.theta != 0.f)
    for (int k = threadIdx.x; k < s.HS / 2; k += kThreads) inv[k] = kv_rope_inv_freq(k, s.HS, s.theta);
  __syncthreads();
  for (int p = 0; p < g.phases; p++) {
    if (p + kSlots - 1 < g.phases) issue(g, layers, own, keys, p + kSlots - 1, slot_of(p + kSlots - 1));
    kv_cp_async_commit();
    const int kind = p % kPerLayer;
    if (kind == kAttn ? !own.attends : own.sl[kind].rows == 0) continue;  // nothing to do: run ahead
    kv_cp_async_wait<kSlots - 1>();  // this phase's slot has landed
    __syncthreads();
    const kv_decode_layer &Lw = layers[p / kPerLayer];
    unsigned char *slot = slot_of(p);
    if (kind == kAttn && s.theta != 0.f && s.shift) rotate_keys(reinterpret_cast<float *>(slot), own.nold, own.j0, s.HS, inv);
    unsigned long long *tr = a.trace != nullptr ? a.trace + ((size_t)blk * g.phases + p) * kTracePoints : nullptr;
    mark(tr, 0);
    if (p > 0) wait_for(a.sync + (p - 1) * kCounterStride, producers(g, (p - 1) % kPerLayer));
    mark(tr, 1);
    if (kind == kAttn) {
      attention_phase(g, a, Lw, own, reinterpret_cast<float *>(slot), scr, inv, tr);
    } else {
      product_phase(g, a, Lw, kind, own, slot, xs, red, xown, tr);
    }
    if (tr != nullptr) {
      __syncthreads();
      mark(tr, 4);
    }
    if (p + 1 < g.phases) arrive(a.sync + p * kCounterStride);
  }
  kv_cp_async_wait_all();
  // The last block out zeroes the counters for the next launch: every
  // block has passed all its waits before it counts itself here.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(a.sync + g.phases * kCounterStride, 1u) == (unsigned)g.G - 1) {
      for (int p = 0; p <= g.phases; p++) a.sync[p * kCounterStride] = 0;
      __threadfence();
    }
  }
}

// geometry derives the launch from the shape; false when the kernel cannot take it.
bool geometry(const kv_decode_shape &s, int num_sms, int smem_optin, Geo *out) {
  Geo g{};
  g.sh = s;
  if (s.B < 1 || s.B > kMaxB || s.L < 1 || s.C < 8 || s.C % 8 || s.F < 8 || s.F % 8 || s.HS < 8 || s.HS % 8 ||
      s.NKV < 1 || s.NH % s.NKV || s.NH * s.HS % 8 || s.S < 1 || s.max_len < 1)
    return false;
  if (s.swiglu && (!s.rms || s.theta == 0.f)) return false;  // SwiGLU only in the Llama family (no biases)
  g.G = num_sms;
  g.GQ = s.NH / s.NKV;
  if (g.GQ > kWarps || s.B * s.NKV > g.G) return false;
  g.qkvw = (s.NH + 2 * s.NKV) * s.HS;
  if ((long long)max(g.qkvw, max(s.C, s.F)) * g.G >= (1ll << 31)) return false;  // rows_lo's int products
  g.nsplit = min(kMaxSplit, g.G / (s.B * s.NKV));
  g.kps = (s.max_len + g.nsplit - 1) / g.nsplit;
  g.kin = max(s.C, max(s.NH * s.HS, s.F));
  g.phases = kPerLayer * s.L;
  const int uprows = max_rows(s.F, g.G) * (s.swiglu ? 2 : 1);
  int slot = g.kps * (2 * s.HS + kKeyPad) * 4;  // attention: K (padded) and V rows
  slot = max(slot, max_rows(g.qkvw, g.G) * s.C * 2 + 4 * s.C + bias_bytes(max_rows(g.qkvw, g.G)));
  slot = max(slot, max_rows(s.C, g.G) * s.NH * s.HS * 2 + 4 * s.C + bias_bytes(max_rows(s.C, g.G)));
  slot = max(slot, uprows * s.C * 2 + 4 * s.C + bias_bytes(max_rows(s.F, g.G)));
  slot = max(slot, max_rows(s.C, g.G) * s.F * 2 + 4 * s.C + bias_bytes(max_rows(s.C, g.G)));
  g.slot_bytes = align16(slot);
  // The GEMV's partial sums (≤ max(rows, 8) tasks), stage_norm's 2·kMaxB
  // doubles a warp and statistics, or the merge's split weights.
  g.red_floats = max(max(uprows, max(kWarps, max_rows(g.qkvw, g.G))) * kMaxB,
                     max(kWarps * 2 * kMaxB * 2 + 2 * kMaxB, s.B * s.NH * kMaxSplit));
  int off = kSlots * g.slot_bytes;
  g.off_in = off, off += align16(s.B * g.kin * 4);
  g.off_red = off, off += align16(g.red_floats * 4);
  g.off_att = off, off += align16(((g.GQ + 2) * s.HS + g.GQ * g.kps + 2 * g.GQ) * 4);
  g.off_layers = off, off += align16(s.L * (int)sizeof(kv_decode_layer));
  g.off_freq = off, off += align16(s.HS / 2 * 4);
  g.off_keys = off, off += align16(g.kps * 4);
  g.off_xown = off, off += align16(kMaxB * max_rows(s.C, g.G) * 4);
  g.smem = off;
  if (g.smem + (int)sizeof(Own) > smem_optin) return false;
  *out = g;
  return true;
}

kv_status device_geometry(const kv_decode_shape *sh, Geo *g) {
  int dev = 0, sms = 0, optin = 0, major = 0;
  KV_TRY(cudaGetDevice(&dev));
  KV_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  KV_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  KV_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (major < 8 || !geometry(*sh, sms, optin, g)) return (kv_status)cudaErrorNotSupported;
  return 0;
}

}  // namespace

extern "C" kv_status kv_decode_prepare(const kv_decode_shape *sh, size_t *part_floats, size_t *sync_words) {
  Geo g;
  const kv_status st = device_geometry(sh, &g);
  if (st != 0) return st;
  KV_TRY(cudaFuncSetAttribute(decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, g.smem));
  int per_sm = 0;
  KV_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_kernel, kThreads, g.smem));
  if (per_sm < 1) return (kv_status)cudaErrorNotSupported;
  *part_floats = (size_t)sh->B * sh->NH * g.nsplit * (sh->HS + 2);
  *sync_words = ((size_t)g.phases + 1) * kCounterStride;
  return 0;
}

extern "C" kv_status kv_decode(kv_stream s, const kv_decode_shape *sh, const kv_decode_layer *layers, float *x,
                               float *qkv, float *act, float *part, unsigned *sync, const int32_t *pos,
                               const int32_t *slots, const int32_t *order, const int32_t *lens,
                               unsigned long long *trace) {
  Geo g;
  const kv_status st = device_geometry(sh, &g);
  if (st != 0) return st;
  Args a{layers, x, qkv, act, part, sync, trace, pos, slots, order, lens};
  decode_kernel<<<g.G, kThreads, g.smem, s>>>(g, a);
  return kv_launched();
}
