// head.cu — the LM head of a sampled one-token step, screened by an int8
// copy (gpu.HeadSampler, kv_head_sample): the same picks as the LM head's
// GEMV followed by kv_sample, from half the bytes.
//
// Why: the LM head is the largest weight a decode step streams (SmolLM2:
// 57 MB, ~19 µs on an H100), yet sampling needs only each row's K largest
// logits. An int8 copy of the head ranks the rows with a rigorous error
// bound; only the rows that could be among the K largest (~70–130 of 49k
// on random weights) are recomputed from the fp16 head, with the GEMV's
// own summation order, so the logits that decide the pick are the GEMV's
// bit for bit. (Measured, docs/PERF.md version 28: 5.8 µs faster than the
// GEMV and the chunk kernel replayed alone for SmolLM2, 7.3 for
// distilgpt2, where the int8 copy stays in L2; level or slower in the
// whole decode step: opt-in.)
//
// The copy (head_quantize_kernel, once per model). Row r of the fp16 head
// w is s_r·q_r + d_r, q_r int8 rounded to nearest with s_r = max|w_r|/127.
// Per row, in double and rounded up:
//   c1_r = ‖d_r‖₂ + γ·‖w_r‖₂   (γ = (C+1)u/(1 − (C+1)u), u = 2⁻²⁴)
//   c2_r = s_r·‖q_r‖₂
// The step (head_screen_kernel), for the input row x of a sequence:
//  1. x splits exactly into three int8 levels with power-of-two scales and
//     a remainder: x = s3·(2¹⁴·x1 + 2⁷·x2 + x3) + e, |e_i| ≤ s3/2.
//  2. Tensor cores (mma m16n8k32 s8, exact int32 sums, x1..x3 as three
//     columns of B) give T_r = q_r·(2¹⁴x1 + 2⁷x2 + x3) exactly, and
//     a_r = s_r·(s3·T_r) with two roundings.
//  3. The GEMV's fp32 logit l_r satisfies |l_r − w_r·x| ≤ γ‖w_r‖·‖x‖, and
//     w_r·x − s_r·s3·T_r = d_r·x + s_r·q_r·e, so
//       |l_r − a_r| ≤ c1_r·‖x‖₂ + c2_r·‖e‖₂ + 2.01u·|a_r|,
//     which B_r below covers with margins for its own roundings.
//  4. The threshold L: a block holds 512 rows and publishes its largest
//     a_r − B_r; once K blocks of the row have, L is the K-th largest
//     published value (K distinct rows reach it, so it is at most the
//     vocabulary's K-th largest logit). A row of the top K then has
//     a_r + B_r ≥ L: those rows (the candidates, ~1 a block on random
//     weights) are recomputed exactly and sorted, and the block writes its
//     top 64 keys where sample_chunks_kernel would (they are the true top K
//     of its rows among the top K of the vocabulary; the other entries are
//     real rows' keys below the K-th, which never enter the final top K).
//     sample_final_kernel then merges and picks as in kv_sample. A block
//     whose peers are not resident (the publication waits at most 200 µs)
//     takes its own threshold instead: the K-th largest of its warps'
//     ⌈K/8⌉ largest lower bounds.
// Non-finite inputs make every row a candidate (B = ∞): the exact path
// then decides, as the GEMV would.
#include "fused.cuh"
#include "sampling.cuh"
#include "stamps.cuh"

namespace {

constexpr int kHeadTile = 512;                // rows a block: 8 warps × 4 m-tiles × 16
constexpr int kHeadThreads = 256;
constexpr int kHeadWarps = kHeadThreads / 32;
constexpr int kHeadMaxC = 1024;               // the GEMV sums a row in one warp pass up to 1024 (32 lanes × 4 chunks)
constexpr int kHeadStaticSmem = 8 * 1024;     // head_screen_kernel's static shared memory, with margin
// k-tiles of A fragments a warp keeps in flight: a ring of cp.async stages
// in shared memory (2 KB a warp a k-tile, 192 KB a block), issued before
// the programmatic wait and refilled as each is used. (Measured on an
// H100, SmolLM2's head: 12 stages end the weight loop 5.0 µs after the
// wait, 4 stages with the rest prefetched into L2 8.6 µs.)
constexpr int kHeadRing = 12;

// head_q_offset is where element (r, k) of the int8 copy lives: rows in
// tiles of 512, each tile in 32 m-tiles of 16 rows, each m-tile in k-tiles
// of 32, each (m-tile, k-tile) as the 32 lanes' A fragments of one mma
// m16n8k32 (16 bytes a lane: a0 row g k 4t..4t+3, a1 row g+8, a2 row g k
// 16+4t.., a3 row g+8 k 16+4t.., lane = 4g + t). A warp's loads of one
// fragment are 512 contiguous bytes, and a warp's m-tiles are contiguous.
__host__ __device__ __forceinline__ size_t head_q_offset(int r, int k, int KT) {
  const int t = r / kHeadTile, rt = r % kHeadTile, mt = rt / 16, rr = rt % 16;
  const int kt = k / 32, kk = k % 32;
  const int lane = (rr & 7) * 4 + ((kk & 15) >> 2), reg = (rr >> 3) + 2 * (kk >> 4);
  return ((((size_t)t * 32 + mt) * KT + kt) * 32 + lane) * 16 + reg * 4 + (kk & 3);
}

// head_quantize_kernel: one warp a row of the padded copy (rows past V are
// zero, with zero bounds).
__global__ void __launch_bounds__(256)
    head_quantize_kernel(int8_t *__restrict__ q, float4 *__restrict__ rows, const __half *__restrict__ w, int V,
                         int Vpad, int C) {
  const int r = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (r >= Vpad) return;
  const int KT = C / 32;
  const __half *wr = w + (size_t)r * C;
  float mx = 0.f;
  for (int i = lane; i < C; i += 32) mx = fmaxf(mx, r < V ? fabsf(__half2float(wr[i])) : 0.f);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(KV_FULL_MASK, mx, o));
  const float s = mx / 127.f;
  double dd = 0, ww = 0, qq = 0;
  for (int i = lane; i < C; i += 32) {
    const float v = r < V ? __half2float(wr[i]) : 0.f;
    const int qi = s > 0.f ? (int)fminf(fmaxf(rintf(v / s), -127.f), 127.f) : 0;
    const double d = (double)v - (double)s * qi;  // exact: a half minus a 24-bit × 8-bit product
    dd += d * d;
    ww += (double)v * v;
    qq += (double)qi * qi;
    q[head_q_offset(r, i, KT)] = (int8_t)qi;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    dd += __shfl_xor_sync(KV_FULL_MASK, dd, o);
    ww += __shfl_xor_sync(KV_FULL_MASK, ww, o);
    qq += __shfl_xor_sync(KV_FULL_MASK, qq, o);
  }
  if (lane == 0) {
    const double n1 = (double)(C + 1) * 0x1p-24, gamma = n1 / (1 - n1);
    // 1e-9 covers the double sums' roundings; _ru rounds the bound up.
    const float c1 = __double2float_ru((sqrt(dd) + gamma * sqrt(ww)) * (1 + 1e-9));
    const float c2 = __double2float_ru((double)s * sqrt(qq) * (1 + 1e-9));
    rows[r] = make_float4(s, c1, c2, 0.f);
  }
}

// pow2(e) = 2^e for -126 ≤ e ≤ 127 (a multiply by it is ldexpf without
// its range checks, exact wherever the product is normal).
__device__ __forceinline__ float pow2(int e) { return __uint_as_float((uint32_t)(e + 127) << 23); }

__device__ __forceinline__ void mma_s8(int (&d)[4], uint4 a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

struct HeadArgs {
  uint64_t *scratch;   // [B, G, 64] sorted keys, sample_final_kernel's input
  float *logits;       // [B, V]: the candidates' exact logits (NULL: none)
  const float *x;      // [B, C] the normalised rows
  const uint4 *q;      // the int8 copy, head_q_offset's layout
  const float4 *rows;  // [Vpad] (s, c1, c2, 0)
  const __half *w;     // [V, C] the head
  const int32_t *banned;
  int V, C, max_ban, K, G;
  kv_succ succ;
  float2 *debug;       // [B, Vpad] (a_r, B_r) for tests; NULL: none
  int *stats;          // += candidates (NULL: none)
  // The grid's threshold (NULL: each block its own): per row, each
  // block's largest lower bound (a key's high word; 0 = not published).
  unsigned *sync;
};

// head_screen_kernel: one block a (512-row tile, sequence); see the top.
// Warp w owns rows 64w..64w+63 of the tile (m-tiles 4w..4w+3) from the
// weight stream to the exact logits: it splits x itself, keeps its ring
// of A fragments, and recomputes its own candidates, so the block meets
// only to agree on the threshold and to gather its candidates' keys.
__global__ void __launch_bounds__(kHeadThreads, 1) head_screen_kernel(HeadArgs a) {
  constexpr int RING = kHeadRing;
  // Dynamic shared memory: each warp's ring of A fragments (RING k-tiles of
  // its 4 m-tiles, 2 KB each), later its staged candidate rows; then each
  // warp's split of x (3 levels × C bytes).
  extern __shared__ __align__(16) uint4 dyn[];
  __shared__ float fw[kHeadWarps][64];               // s3·T of each warp's rows
  __shared__ uint64_t tops[kHeadWarps][8];           // each warp's ⌈K/8⌉ largest lower bounds
  __shared__ uint64_t lists[kHeadWarps][64];
  __shared__ uint32_t ban_bits[kHeadTile / 32];
  __shared__ int ban_end;

  const int t = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int C = a.C, KT = C / 32, V = a.V, base = t * kHeadTile;
  const int g = lane >> 2, tq = lane & 3;
  constexpr int kRingWarp = RING * 4 * 32;  // uint4 a warp's ring holds
  uint4 *ring = dyn + warp * kRingWarp;
  uint32_t *xq = reinterpret_cast<uint32_t *>(dyn + kHeadWarps * kRingWarp) + warp * 3 * (C / 4);

  // Before the wait: the head's copy and row bounds, the bans and the
  // 2-gram memory (written before this step's predecessor, as
  // sample_chunks_kernel reads them).
#ifdef KV_STAMPS
  const KvStamp stamp(8);
#endif
  // Lane l copies, and later reads back itself, the 16 bytes of its A
  // fragment of the warp's 4 m-tiles: cp.async group kt is k-tile kt.
  const uint4 *qw = a.q + ((size_t)t * 32 + warp * 4) * KT * 32 + lane;
  auto issue = [&](int kt) {
#pragma unroll
    for (int m = 0; m < 4; m++)
      kv_cp_async16_cg(ring + ((kt % RING) * 4 + m) * 32 + lane, qw + (m * KT + kt) * 32);
  };
#pragma unroll
  for (int kt = 0; kt < RING; kt++) {
    if (kt < KT) issue(kt);
    kv_cp_async_commit();
  }
  const int row0 = warp * 64 + lane;  // the lane's rows: row0 and row0 + 32 of the tile
  const float4 rp[2] = {__ldg(a.rows + base + row0), __ldg(a.rows + base + row0 + 32)};
  if (tid < kHeadTile / 32) ban_bits[tid] = 0;
  if (tid == 0) ban_end = a.max_ban;
  __syncthreads();
  if (a.max_ban > 0 || a.succ.count != nullptr) {
    const int32_t *bl = a.banned + (long long)b * a.max_ban;
    for (int i = tid; i < a.max_ban; i += kHeadThreads)
      if (bl[i] < 0) atomicMin(&ban_end, i);  // the list ends at its first negative entry
    __syncthreads();
    const int end = ban_end;
    auto mark = [&](int id) {
      const int r = id - base;
      if (r >= 0 && r < kHeadTile) atomicOr(&ban_bits[r >> 5], 1u << (r & 31));
    };
    for (int i = tid; i < end; i += kHeadThreads) mark(bl[i]);
    if (a.succ.count != nullptr) succ_each(a.succ, b, V, mark);
  }
#ifdef KV_STAMPS
  stamp.at(8);
#endif
  kv_pdl_wait();  // x
#ifdef KV_STAMPS
  stamp.at(2);
#endif

  // 1. The warp reads x once (lane l: float4s l, l+32, …), takes max|x|,
  // ‖x‖₂ and the split from those registers.
  const float *x = a.x + (size_t)b * C;
  const float4 *x4 = reinterpret_cast<const float4 *>(x);
  constexpr int kXPerLane = kHeadMaxC / 4 / 32;
  float4 xv[kXPerLane];
  float mx = 0.f;
#pragma unroll
  for (int j = 0; j < kXPerLane; j++) {
    const int i = lane + 32 * j;
    xv[j] = i < C / 4 ? __ldg(x4 + i) : make_float4(0.f, 0.f, 0.f, 0.f);
    mx = fmaxf(mx, fmaxf(fmaxf(fabsf(xv[j].x), fabsf(xv[j].y)), fmaxf(fabsf(xv[j].z), fabsf(xv[j].w))));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(KV_FULL_MASK, mx, o));
  // s1 = 2^k, the least power of two with 127·s1 ≥ max|x|; s2 = s1/2⁷,
  // s3 = s1/2¹⁴. Rows with max|x| outside [2⁻⁹³, 2¹⁰⁶] (|k| > 100, where
  // the scales below leave the normal range) take the exact path whole.
  bool finite = mx <= 3.4e38f;  // fmaxf skips NaN: the norm below catches it
  int k = 0;
  if (finite && mx > 0.f) {
    k = (int)((__float_as_uint(mx) >> 23) & 0xffu) - 126 - 7;  // mx = f·2^(k+7), f in [1/2, 1)
    finite = k >= -100 && k < 100;
    if (finite && 127.f * pow2(k) < mx) k++;
  }
  if (!finite) k = 0;  // every row is a candidate; k only has to keep the scales finite
  // ‖x‖₂ from x·2⁻ᵏ (|x_i·2⁻ᵏ| ≤ 127: no overflow, and no underflow that
  // matters), H ≥ it: the fp32 sum is within γ_C of Σ.
  const float down = pow2(-k);
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kXPerLane; j++) {
    const float e[4] = {xv[j].x * down, xv[j].y * down, xv[j].z * down, xv[j].w * down};
#pragma unroll
    for (int i = 0; i < 4; i++) sq = fmaf(e[i], e[i], sq);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(KV_FULL_MASK, sq, o);
  const float H = sqrtf(sq) * pow2(k) * (1.f + (float)(C + 4) * 0x1p-23f);
  finite = finite && H <= 3.4e38f;  // false for NaN
  const float s1 = pow2(k), s2 = pow2(k - 7), s3 = pow2(k - 14);
  const float d1 = down, d2 = pow2(7 - k), d3 = pow2(14 - k);
#pragma unroll
  for (int j = 0; j < kXPerLane; j++) {
    const int i = lane + 32 * j;
    if (i >= C / 4) break;
    const float v[4] = {xv[j].x, xv[j].y, xv[j].z, xv[j].w};
    uint32_t w1 = 0, w2 = 0, w3 = 0;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      // Each level's remainder is exact (a power-of-two multiple subtracted
      // from a float within half of it), |q1| ≤ 127, |q2|, |q3| ≤ 64.
      float r = finite ? v[e] : 0.f;
      const float q1 = rintf(r * d1);
      r -= q1 * s1;
      const float q2 = rintf(r * d2);
      r -= q2 * s2;
      const float q3 = rintf(r * d3);
      w1 |= ((uint32_t)(int)q1 & 0xffu) << (8 * e);
      w2 |= ((uint32_t)(int)q2 & 0xffu) << (8 * e);
      w3 |= ((uint32_t)(int)q3 & 0xffu) << (8 * e);
    }
    xq[i] = w1;
    xq[C / 4 + i] = w2;
    xq[C / 2 + i] = w3;
  }
  // ‖e‖₂ ≤ √C·s3/2 (sqrtf within 1 ulp; 1.0001 covers it).
  const float E = sqrtf((float)C) * 1.0001f * pow2(k - 15);
  __syncwarp();
#ifdef KV_STAMPS
  stamp.at(3);
#endif

  // 2. T for the warp's 4 m-tiles: B's column g < 3 is level g, the rest 0.
  int acc[4][4];
#pragma unroll
  for (int m = 0; m < 4; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0;
  const uint32_t *xb = xq + min(g, 2) * (C / 4);
  for (int kt = 0; kt < KT; kt++) {
    kv_cp_async_wait<RING - 1>();  // k-tile kt (group kt) has landed
    const uint32_t b0 = g < 3 ? xb[kt * 8 + tq] : 0u, b1 = g < 3 ? xb[kt * 8 + 4 + tq] : 0u;
#pragma unroll
    for (int m = 0; m < 4; m++) mma_s8(acc[m], ring[((kt % RING) * 4 + m) * 32 + lane], b0, b1);
    // The mma took the fragments into registers: the stage can be refilled.
    if (kt + RING < KT) issue(kt + RING);
    kv_cp_async_commit();
  }
#ifdef KV_STAMPS
  stamp.at(4);
#endif
  // Lane (g, 0) holds columns 0 and 1 of rows g and g+8, lane (g, 1)
  // column 2: s3·T of each of the warp's rows to fw (T exact in int64,
  // one rounding to float, s3 a power of two).
  auto f = [&](int p1, int p2, int p3) {
    return s3 * __ll2float_rn(((long long)p1 << 14) + ((long long)p2 << 7) + p3);
  };
#pragma unroll
  for (int m = 0; m < 4; m++) {
    const int p3a = __shfl_down_sync(KV_FULL_MASK, acc[m][0], 1);
    const int p3b = __shfl_down_sync(KV_FULL_MASK, acc[m][2], 1);
    if (tq == 0) {
      fw[warp][m * 16 + g] = f(acc[m][0], acc[m][1], p3a);
      fw[warp][m * 16 + g + 8] = f(acc[m][2], acc[m][3], p3b);
    }
  }
  __syncwarp();

  // 3. Each lane's two rows: approximation, bound, and the lower bound's
  // key.
  float av[2], up[2];
  uint64_t lk[2];
  bool ok[2];
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const int i = row0 + 32 * j, id = base + i;
    av[j] = rp[j].x * fw[warp][lane + 32 * j];
    // The 2⁻¹⁰ margin covers the roundings of c1·H + c2·E and of av ± B
    // relative to B, 2⁻²⁰·|av| av's own (2.01u) and theirs relative to
    // av, 2⁻¹²⁰ those of subnormal products (C·2⁻¹⁴⁹ at most in the
    // GEMV's sum, 2⁻¹⁴⁹ in av).
    const float B = finite ? fmaf(rp[j].y, H, rp[j].z * E) * (1.f + 0x1p-10f) + fabsf(av[j]) * 0x1p-20f + 0x1p-120f
                           : INFINITY;
    ok[j] = id < V && !((ban_bits[i >> 5] >> (i & 31)) & 1u);
    up[j] = av[j] + B;
    lk[j] = ok[j] ? sample_key(av[j] - B, id) : 0;
    if (a.debug != nullptr && id < V) a.debug[(size_t)b * a.G * kHeadTile + id] = make_float2(av[j], B);
  }
  // 4. The threshold L, at most the K-th largest lower bound of the
  // vocabulary (a row the K largest could be in reaches it): the K-th
  // largest of the blocks' largest lower bounds published so far, once K
  // blocks of the row have published (K distinct rows reach it); a block
  // that waits too long (its peers not resident) takes the block's own:
  // the K-th largest of its warps' r = ⌈K/8⌉ largest.
  __shared__ int use_grid;
  __shared__ float grid_L;
  uint64_t wbest = max(lk[0], lk[1]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) wbest = max(wbest, __shfl_xor_sync(KV_FULL_MASK, wbest, o));
  if (lane == 0) tops[warp][0] = wbest;
  __syncthreads();
  if (warp == 0) {
    // Publish the block's largest lower key (its high word, monotone in
    // the value; 0 = not yet), then poll the row's slots until K are
    // published: L = the largest published v with K of them ≥ v. Lane l
    // reads blocks l, l + 32, …; sample_final_kernel zeroes the slots for
    // the next launch once every block has finished.
    int ok_grid = 0;
    float gl = -INFINITY;
    if (a.sync != nullptr) {
      uint32_t *slots = reinterpret_cast<uint32_t *>(a.sync) + (size_t)b * a.G;
      if (lane == 0) {
        uint64_t best = tops[0][0];
        for (int w = 1; w < kHeadWarps; w++) best = max(best, tops[w][0]);
        __stcg(slots + t, max((uint32_t)(best >> 32), 1u));  // an empty block publishes the lowest value
      }
      constexpr int kMaxG = 4;  // G ≤ 128 (kv_head_sample)
      uint32_t gk[kMaxG];
      const unsigned long long t0 = kv_global_ns();
      int seen;
      for (;;) {
        seen = 0;
#pragma unroll
        for (int i = 0; i < kMaxG; i++) {
          const int blk = lane + 32 * i;
          gk[i] = blk < a.G ? __ldcg(slots + blk) : 0u;
          seen += __popc(__ballot_sync(KV_FULL_MASK, gk[i] != 0));
        }
        if (seen >= a.K) break;
        if (kv_global_ns() - t0 > 200000) break;  // peers not resident: the block's own threshold
        __nanosleep(32);
      }
      int ge[kMaxG] = {};
#pragma unroll
      for (int j = 0; j < kMaxG; j++) {
        if (32 * j >= a.G) continue;
        for (int sl = 0; sl < 32; sl++) {
          const uint32_t v = __shfl_sync(KV_FULL_MASK, gk[j], sl);
#pragma unroll
          for (int i = 0; i < kMaxG; i++) ge[i] += v >= gk[i];
        }
      }
      if (seen >= a.K) {
        uint32_t best = 0;
#pragma unroll
        for (int i = 0; i < kMaxG; i++)
          if (gk[i] != 0 && ge[i] >= a.K) best = max(best, gk[i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(KV_FULL_MASK, best, o));
        ok_grid = 1;
        gl = best > 1u ? sample_key_value((uint64_t)best << 32) : -INFINITY;
      }
    }
    if (lane == 0) use_grid = ok_grid, grid_L = gl;
  }
  __syncthreads();
  float L;
  if (use_grid) {
    L = grid_L;
  } else {
    const int r = (a.K + kHeadWarps - 1) / kHeadWarps;
    uint64_t k0 = lk[0], k1 = lk[1];
    for (int i = 0; i < r; i++) {
      uint64_t best = max(k0, k1);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(KV_FULL_MASK, best, o));
      if (lane == 0) tops[warp][i] = best;
      if (k0 == best) k0 = 0;  // keys are unique (or 0)
      if (k1 == best) k1 = 0;
    }
    __syncthreads();
    // Every warp sorts the tops itself (no second barrier).
    const int n = kHeadWarps * r;
    uint64_t x0 = lane < n ? tops[lane / r][lane % r] : 0, x1 = lane + 32 < n ? tops[(lane + 32) / r][(lane + 32) % r] : 0;
    sample_sort64(x0, x1, lane);
    const uint64_t kth = __shfl_sync(KV_FULL_MASK, a.K <= 32 ? x0 : x1, (a.K - 1) & 31);
    L = kth != 0 ? sample_key_value(kth) : -INFINITY;
  }
#ifdef KV_STAMPS
  stamp.at(5);
#endif
  // 5. The warp's candidates (rows whose upper bound reaches L), staged
  // into its ring and recomputed as gemv_kernel_v1<F16, 1, 1, 32>
  // (matmul.cu) sums a row: lane l takes 16-byte chunks l, l+32, … in
  // order, 8 fmaf each, then a butterfly over the warp.
  const unsigned m0 = __ballot_sync(KV_FULL_MASK, ok[0] && !(up[0] < L));
  const unsigned m1 = __ballot_sync(KV_FULL_MASK, ok[1] && !(up[1] < L));
  const int n0 = __popc(m0), n = n0 + __popc(m1);
  if (a.stats != nullptr && lane == 0 && n > 0) atomicAdd(a.stats, n);
  // Candidate j's row in the tile: the j-th set bit of m0, then of m1.
  auto cand_row = [&](int j) {
    const unsigned m = j < n0 ? m0 : m1;
    int rank = j < n0 ? j : j - n0;
    unsigned mm = m;
    for (; rank > 0; rank--) mm &= mm - 1;
    return warp * 64 + (__ffs(mm) - 1) + (j < n0 ? 0 : 32);
  };
  const int CW = C / 8;                 // 16-byte chunks of a row
  const int cap = kRingWarp / CW;       // rows the ring holds
  uint64_t key0 = 0, key1 = 0;          // candidate lane's and lane + 32's exact keys
  for (int j0 = 0; j0 < n; j0 += cap) {
    const int nr = min(cap, n - j0);
    __syncwarp();
    for (int rr = 0; rr < nr; rr++) {
      const __half *src = a.w + (size_t)(base + cand_row(j0 + rr)) * C;
      for (int c = lane; c < CW; c += 32) kv_cp_async16_cg(ring + rr * CW + c, src + c * 8);
    }
    kv_cp_async_commit();
    kv_cp_async_wait<0>();
    __syncwarp();
    for (int rr = 0; rr < nr; rr++) {
      float s[1][1] = {{0.f}};
      for (int c = lane; c < CW; c += 32) {
        float wf[1][8];
        kv_unpack16<true>(ring[rr * CW + c], wf[0]);
        const float4 *xp = reinterpret_cast<const float4 *>(x + c * 8);
        kv_fma_x4(s, 0, wf, 0, __ldg(xp));
        kv_fma_x4(s, 0, wf, 1, __ldg(xp + 1));
      }
      kv_group_sums<32, kHeadThreads>(s);
      const int j = j0 + rr, id = base + cand_row(j);
      if (lane == (j & 31)) {
        const uint64_t key = sample_key(s[0][0], id);
        if (j < 32) key0 = key; else key1 = key;
        if (a.logits != nullptr) a.logits[(size_t)b * V + id] = s[0][0];
      }
    }
  }
#ifdef KV_STAMPS
  stamp.at(7);
#endif
  // 6. The block's top 64 keys to scratch: with at most 64 candidates
  // (the rule with the grid's threshold) gathered and sorted by one warp,
  // else each warp's sorted and merged.
  __shared__ int n_blk;
  if (tid == 0) n_blk = 0;
  __syncthreads();
  int off = 0;
  if (lane == 0 && n > 0) off = atomicAdd(&n_blk, n);
  off = __shfl_sync(KV_FULL_MASK, off, 0);
  uint64_t *gather = &lists[0][0];
  if (lane < n && off + lane < 64) gather[off + lane] = key0;
  if (lane + 32 < n && off + lane + 32 < 64) gather[off + lane + 32] = key1;
  __syncthreads();
  kv_pdl_launch_dependents();  // the final kernel's block may take its place
  uint64_t *dst = a.scratch + ((size_t)b * a.G + t) * 64;
  const int total = n_blk;
  if (total <= 64) {
    if (warp == 0) {
      uint64_t x0 = lane < total ? gather[lane] : 0, x1 = lane + 32 < total ? gather[lane + 32] : 0;
      sample_sort64(x0, x1, lane);
      dst[lane] = x0;
      dst[lane + 32] = x1;
#ifdef KV_STAMPS
      stamp.at(9);
#endif
    }
    return;
  }
  __syncthreads();  // gather overlapped the lists
  sample_sort64(key0, key1, lane);
  lists[warp][lane] = key0;
  lists[warp][lane + 32] = key1;
  __syncthreads();
  sample_merge_lists(lists, kHeadWarps, warp, lane);
  if (tid < 64) dst[tid] = lists[0][tid];
#ifdef KV_STAMPS
  stamp.at(9);
#endif
}

// head_smem: the dynamic shared memory of a block, the warps' rings and
// their splits of x (more than 48 KB: kv_head_init).
size_t head_smem(int C) { return (size_t)kHeadRing * kHeadWarps * 4 * 32 * 16 + (size_t)kHeadWarps * 3 * C; }
static_assert(kHeadRing * kHeadWarps * 4 * 32 * 16 + kHeadWarps * 3 * kHeadMaxC + kHeadStaticSmem <= 227 * 1024,
              "a block fits an sm_90 multiprocessor");

}  // namespace

extern "C" int kv_head_applies(int V, int C, int smem_optin) {
  return V >= 1 && C >= 32 && C % 32 == 0 && C <= kHeadMaxC && (int)head_smem(C) + kHeadStaticSmem <= smem_optin;
}

// The small heads fused.cu's GEMV takes sum in another order.
extern "C" int kv_head_sums_as_matmul(int V, int C) { return !kv_gemv_fused_takes(1, 1, C, V); }

extern "C" long long kv_head_rows(int V) { return (long long)kv_ceil_div(V, kHeadTile) * kHeadTile; }

extern "C" kv_status kv_head_quantize(kv_stream s, void *q, float *rows, const void *w, int V, int C) {
  if (V < 1 || C < 32 || C % 32 != 0 || C > kHeadMaxC || !q || !rows || !w) return (kv_status)cudaErrorInvalidValue;
  const int Vpad = (int)kv_head_rows(V);
  head_quantize_kernel<<<kv_ceil_div(Vpad, 8), 256, 0, s>>>(static_cast<int8_t *>(q), reinterpret_cast<float4 *>(rows),
                                                             static_cast<const __half *>(w), V, Vpad, C);
  return kv_launched();
}

// kv_head_init lets head_screen_kernel use the device's opt-in shared
// memory (called once per device, from kv_sample_init, so that launches
// inside a capture need no attribute call).
cudaError_t kv_head_init(int smem_optin) {
  const int dyn = (int)head_smem(kHeadMaxC);
  if (dyn + kHeadStaticSmem > smem_optin) return cudaSuccess;  // kv_head_applies refuses every shape
  return cudaFuncSetAttribute(head_screen_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dyn);
}

extern "C" kv_status kv_head_sample(kv_stream s, int32_t *out, int32_t *also, float *logits, const float *x, const void *q,
                                    const float *rows, const void *w, const int32_t *banned,
                                    const int32_t *counter, int B, int V, int C, int top_k, int max_ban,
                                    uint64_t seed, kv_succ succ, int smem_optin, int sms, uint64_t *scratch,
                                    long long scratch_keys, void *sync, int sync_rows, float *debug, int *stats) {
  if (B <= 0) return kv_launched();
  const int G = kv_ceil_div(V, kHeadTile);
  if (!kv_head_applies(V, C, smem_optin) || top_k < 1 || top_k > KV_SAMPLE_MAX_TOPK || max_ban < 0 ||
      (max_ban > 0 && banned == nullptr) || !out || !x || !q || !rows || !w || !counter || !scratch ||
      (long long)B * G * 64 > scratch_keys || B > 65535 || !kv_aligned16(x) || !kv_aligned16(q) ||
      !kv_aligned16(rows) || !kv_aligned16(w))
    return (kv_status)cudaErrorInvalidValue;
  HeadArgs a{scratch, logits, x, static_cast<const uint4 *>(q), reinterpret_cast<const float4 *>(rows),
             static_cast<const __half *>(w), banned, V, C, max_ban, top_k, G, succ,
             reinterpret_cast<float2 *>(debug), stats, nullptr};
  // The grid's threshold needs every block resident at once (one a
  // multiprocessor) and at least K blocks; the wait has a timeout anyway.
  if (sync != nullptr && B <= sync_rows && G * B <= sms && G >= top_k && G <= 128) a.sync = static_cast<unsigned *>(sync);
  KV_TRY(kv_launch(head_screen_kernel, dim3(G, B), dim3(kHeadThreads), head_smem(C), s, kv_pdl_supported(), a));
  KV_TRY(kv_sample_final(s, out, also, scratch, counter, B, V, G, top_k, seed, succ, a.sync, a.sync ? B * G : 0));
  return kv_launched();
}

KV_STAMP_TU(head)
