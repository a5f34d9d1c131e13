// attention_prefill.cu — tensor-core prefill attention (kv_attention variant
// 12): softmax(q·kᵀ/sqrt(HS))·v for many queries per sequence, the `ar`
// mode's recomputation of cache+1 tokens every step and perplexity windows.
//
// Why a second prefill kernel: attention.cu's tiled prefill (variants 2/5/7)
// runs the two products in fp32 SIMT; at T = 256 it took ~40 µs per layer
// (SmolLM2 on an H200), ~1.2 ms of a 30-layer `ar` step whose arithmetic is a
// few µs on tensor cores. Here both products run on mma.sync m16n8k16 with
// fp16 operands and fp32 accumulation, which is what the fp16 models' GEMMs
// already do to their activations (kv_matmul rounds them to fp16), so the
// caller asks for it only then (KV_ATTN_F16); fp32 models keep the SIMT
// kernel and its 1e-5 agreement with the reference.
//
// Same contract as the other kernels (see attention.cu): entries gathered
// through order[b·max_len + j] (slots), lengths read on the device, query t
// of sequence b sees entries j ≤ min(lens[b], max_len) − T + t, GQA (query
// head h reads kv head h / (NH/NKV)), optional RoPE position shift of the
// keys (key j rotated at position j while it is staged, fp32 sincosf as
// ref.RopeRotate, then rounded to fp16). HS = 64 only; the dispatch leaves
// other sizes to the SIMT kernel.
//
// Layout: one block per (16 queries, query head, sequence), NW warps. Key
// tiles of 16·NW entries are gathered (fp32 global → registers → fp16 shared
// memory; no register prefetch of the next tile: it cost 64 registers a
// thread and with them the second block per SM, and in `ar` steps the rows
// come from L2, just written by the RoPE/store kernel); warp w takes entries 16w…16w+15 of every tile and keeps its own
// online softmax (max, sum, 16×64 output in registers), so a 256-entry
// prefill is two tiles deep instead of sixteen; the warps' partial results
// merge once at the end through shared memory. Q·Kᵀ and P·V: the score
// accumulators of two 8-key tiles are exactly the A fragment of the P·V
// product (FlashAttention-2's register reuse), V fragments come from
// ldmatrix.trans on [entry][dim] rows. Scores are kept in log2 units (q is
// pre-scaled by log2(e)/sqrt(HS)) so exponentials are exp2f.
//
// On sm_90 the kernel is launched as a programmatic dependent: it reads the
// lengths and slot numbers (written by copies before the step's kernels)
// before waiting for its predecessor, which writes q and the new entries.
#include "common.cuh"

namespace {

constexpr int kPfHS = 64;          // the head size this kernel takes
constexpr int kPfRows = 16;        // query rows per block: one mma m-tile
constexpr int kPfLd = kPfHS + 8;   // shared row stride in halves (144 B): conflict-free ldmatrix rows
constexpr int kPfLdO = kPfHS + 8;  // floats: conflict-free float2 stores of the partial outputs

__device__ __forceinline__ uint32_t pf_pack(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t *>(&h);
}

__device__ __forceinline__ void pf_mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void pf_ldsm_x4(uint32_t *r, const void *p) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void pf_ldsm_x4_trans(uint32_t *r, const void *p) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void pf_store4h(__half *dst, float4 v) {
  uint2 u;
  u.x = pf_pack(v.x, v.y);
  u.y = pf_pack(v.z, v.w);
  *reinterpret_cast<uint2 *>(dst) = u;
}

// Shared memory: the staged K/V tile during the loop; the warps' partial
// (max, sum, output) afterwards.
template <int NW>
struct PfSmem {
  static constexpr int TK = 16 * NW;
  static constexpr int KV_BYTES = 2 * TK * kPfLd * 2;
  static constexpr int MERGE_BYTES = NW * kPfRows * kPfLdO * 4 + 2 * NW * kPfRows * 4;
  static constexpr int BYTES = KV_BYTES > MERGE_BYTES ? KV_BYTES : MERGE_BYTES;
};

// attn_prefill_tc_kernel: grid (ceil(T/16), NH, B), NW·32 threads. Query
// tiles run last-first (blockIdx.x 0 is the last tile, which sees the most
// entries), so the longest blocks start first.
//
// Staging: a tile is TK = 16·NW entries × 64 dims of K and V (fp32). Thread
// unit u = tid + i·NT (i < 4) is entry u/8, dims 4c…4c+3 and 32+4c…32+4c+3
// (c = u % 8): the two halves a RoPE pair needs, one 16-byte load each, 8
// lanes per 256-byte row.
template <int NW, bool ROPE>
__global__ void __launch_bounds__(NW * 32, 16 / NW)
    attn_prefill_tc_kernel(float *__restrict__ out, const float *__restrict__ q, const float *__restrict__ kc,
                           const float *__restrict__ vc, const int32_t *__restrict__ order,
                           const int32_t *__restrict__ lens, int T, int NH, int NKV, int q_stride, int max_len,
                           RopeFreqs freqs, float qscale) {
  constexpr int NT = NW * 32, TK = 16 * NW, UNITS = TK * 8 / NT;  // UNITS = 4
  static_assert(UNITS == 4, "4 staging units per thread");
  using L = PfSmem<NW>;
  __shared__ __align__(16) unsigned char smem[L::BYTES];
  __shared__ float inv_s[kPfHS / 2];
  __shared__ __align__(16) __half Qs[kPfRows][kPfLd];
  __half(*Ks)[kPfLd] = reinterpret_cast<__half(*)[kPfLd]>(smem);
  __half(*Vs)[kPfLd] = reinterpret_cast<__half(*)[kPfLd]>(smem + TK * kPfLd * 2);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tg = lane % 4;
  const int t0 = (gridDim.x - 1 - blockIdx.x) * kPfRows, h = blockIdx.y, b = blockIdx.z;
  const int kh = h / (NH / NKV);

  // Before the wait: lengths and slots (copied in before the step's kernels).
  const int n_total = min(lens[b], max_len);
  const int n0 = n_total - T;  // query t sees entries j ≤ n0 + t
  const int last_row = min(t0 + kPfRows, T) - 1;
  const int j_end = max(0, min(n_total, n0 + last_row + 1));  // entries any row of the tile sees
  const int ntiles = (j_end + TK - 1) / TK;
  const int32_t *ord = order + (size_t)b * max_len;
  int sl[UNITS];  // slots of this thread's entries in the next tile
#pragma unroll
  for (int i = 0; i < UNITS; i++) {
    const int e = (tid + i * NT) / 8;
    sl[i] = e < j_end ? __ldg(ord + e) : 0;
  }
  if (ROPE && tid == 0) {  // constant indices: a dynamic one copies the parameter struct to local memory
#pragma unroll
    for (int i = 0; i < kPfHS / 2; i++) inv_s[i] = freqs.v[i];
  }

  kv_pdl_wait();
  kv_pdl_launch_dependents();

  float4 rk[UNITS][2], rv[UNITS][2];
  auto load_tile = [&](int j0, const int *slots) {
#pragma unroll
    for (int i = 0; i < UNITS; i++) {
      const int u = tid + i * NT, e = u / 8, c = u % 8;
      if (j0 + e < j_end) {
        const size_t row = ((size_t)slots[i] * NKV + kh) * kPfHS;
        rk[i][0] = __ldcg(reinterpret_cast<const float4 *>(kc + row) + c);
        rk[i][1] = __ldcg(reinterpret_cast<const float4 *>(kc + row) + 8 + c);
        rv[i][0] = __ldcg(reinterpret_cast<const float4 *>(vc + row) + c);
        rv[i][1] = __ldcg(reinterpret_cast<const float4 *>(vc + row) + 8 + c);
      } else {
        rk[i][0] = rk[i][1] = rv[i][0] = rv[i][1] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
  };
  auto store_tile = [&](int j0) {
#pragma unroll
    for (int i = 0; i < UNITS; i++) {
      const int u = tid + i * NT, e = u / 8, c = u % 8;
      float4 x1 = rk[i][0], x2 = rk[i][1];
      if (ROPE) {
        float *a = &x1.x, *bb = &x2.x;
#pragma unroll
        for (int k = 0; k < 4; k++) {
          float sn, cs;
          sincosf((float)(j0 + e) * inv_s[4 * c + k], &sn, &cs);
          const float y1 = a[k] * cs - bb[k] * sn, y2 = bb[k] * cs + a[k] * sn;
          a[k] = y1;
          bb[k] = y2;
        }
      }
      pf_store4h(&Ks[e][4 * c], x1);
      pf_store4h(&Ks[e][32 + 4 * c], x2);
      pf_store4h(&Vs[e][4 * c], rv[i][0]);
      pf_store4h(&Vs[e][32 + 4 * c], rv[i][1]);
    }
  };

  // The 16 query rows, pre-scaled, as fp16 in shared memory (A fragments are
  // re-read per tile with ldmatrix: 16 registers fewer than holding them).
  for (int u = tid; u < kPfRows * kPfHS / 4; u += NT) {
    const int rr = u / (kPfHS / 4), c = u % (kPfHS / 4), t = t0 + rr;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (t < T) {
      const float *src = q + ((size_t)b * T + t) * q_stride + (size_t)h * kPfHS + 4 * c;
      const float2 lo = *reinterpret_cast<const float2 *>(src), hi = *reinterpret_cast<const float2 *>(src + 2);
      v = make_float4(lo.x * qscale, lo.y * qscale, hi.x * qscale, hi.y * qscale);
    }
    pf_store4h(&Qs[rr][4 * c], v);
  }

  float o[8][4];
#pragma unroll
  for (int i = 0; i < 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows g and g + 8
  const int row_g = t0 + g, row_g8 = t0 + g + 8;

  for (int it = 0; it < ntiles; it++) {
    const int j0 = it * TK;
    // This tile's rows into registers (slots were read a tile ahead), the
    // next tile's slots behind them; the loads' latency overlaps the barrier
    // wait for the other warps' previous tile.
    load_tile(j0, sl);
#pragma unroll
    for (int i = 0; i < UNITS; i++) {
      const int e = j0 + TK + (tid + i * NT) / 8;
      sl[i] = e < j_end ? __ldg(ord + e) : 0;
    }
    __syncthreads();  // the previous tile's shared rows are no longer read
    store_tile(j0);
    __syncthreads();

    const int kb = j0 + 16 * warp;  // this warp's first entry
    if (kb >= j_end || kb > n0 + last_row) continue;  // nothing here any row sees

    // S = Q·Kᵀ for 16 rows × 16 entries (two n-tiles of 8).
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < 4; ks++) {
      uint32_t qf[4], kf[4];
      pf_ldsm_x4(qf, &Qs[((lane / 8) % 2) * 8 + lane % 8][16 * ks + (lane / 16) * 8]);
      pf_ldsm_x4(kf, &Ks[16 * warp + (lane / 16) * 8 + lane % 8][16 * ks + ((lane / 8) % 2) * 8]);
      pf_mma(s[0], qf, kf[0], kf[1]);
      pf_mma(s[1], qf, kf[2], kf[3]);
    }
    // Mask: entry j is visible to row t when j < j_end and j ≤ n0 + t.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int j = kb + nt * 8 + 2 * tg + (e & 1);
        const int t = e < 2 ? row_g : row_g8;
        if (!(j < j_end && j <= n0 + t)) s[nt][e] = -INFINITY;
      }
    mx0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    mx1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
    mx0 = fmaxf(mx0, __shfl_xor_sync(KV_FULL_MASK, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(KV_FULL_MASK, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(KV_FULL_MASK, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(KV_FULL_MASK, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float al0 = mn0 == -INFINITY ? 1.f : exp2f(m0 - mn0);  // m0 = −inf, mn0 finite: 0
    const float al1 = mn1 == -INFINITY ? 1.f : exp2f(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    float p[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const float mm = e < 2 ? mn0 : mn1;
        p[nt][e] = s[nt][e] == -INFINITY ? 0.f : exp2f(s[nt][e] - mm);
      }
    // Per-thread partial sums; the four lanes of a row add up at the end.
    l0 = l0 * al0 + (p[0][0] + p[0][1] + p[1][0] + p[1][1]);
    l1 = l1 * al1 + (p[0][2] + p[0][3] + p[1][2] + p[1][3]);
#pragma unroll
    for (int i = 0; i < 8; i++) {
      o[i][0] *= al0;
      o[i][1] *= al0;
      o[i][2] *= al1;
      o[i][3] *= al1;
    }
    // P as the A fragment of P·V (entries 0–7: n-tile 0, 8–15: n-tile 1).
    uint32_t pf[4] = {pf_pack(p[0][0], p[0][1]), pf_pack(p[0][2], p[0][3]), pf_pack(p[1][0], p[1][1]),
                      pf_pack(p[1][2], p[1][3])};
#pragma unroll
    for (int d = 0; d < 4; d++) {  // dims 16d…16d+15: output n-tiles 2d, 2d+1
      uint32_t vf[4];
      pf_ldsm_x4_trans(vf, &Vs[16 * warp + ((lane / 8) % 2) * 8 + lane % 8][16 * d + (lane / 16) * 8]);
      pf_mma(o[2 * d], pf, vf[0], vf[1]);
      pf_mma(o[2 * d + 1], pf, vf[2], vf[3]);
    }
  }

  // Merge the warps' partials: out = Σ_w 2^(m_w − M)·o_w / Σ_w 2^(m_w − M)·l_w.
  l0 += __shfl_xor_sync(KV_FULL_MASK, l0, 1);
  l0 += __shfl_xor_sync(KV_FULL_MASK, l0, 2);
  l1 += __shfl_xor_sync(KV_FULL_MASK, l1, 1);
  l1 += __shfl_xor_sync(KV_FULL_MASK, l1, 2);
  __syncthreads();  // every warp is done with Ks/Vs
  float(*Os)[kPfRows][kPfLdO] = reinterpret_cast<float(*)[kPfRows][kPfLdO]>(smem);
  float *Ms = reinterpret_cast<float *>(smem + NW * kPfRows * kPfLdO * 4);
  float *Ls = Ms + NW * kPfRows;
#pragma unroll
  for (int i = 0; i < 8; i++) {
    *reinterpret_cast<float2 *>(&Os[warp][g][8 * i + 2 * tg]) = make_float2(o[i][0], o[i][1]);
    *reinterpret_cast<float2 *>(&Os[warp][g + 8][8 * i + 2 * tg]) = make_float2(o[i][2], o[i][3]);
  }
  if (tg == 0) {
    Ms[warp * kPfRows + g] = m0;
    Ms[warp * kPfRows + g + 8] = m1;
    Ls[warp * kPfRows + g] = l0;
    Ls[warp * kPfRows + g + 8] = l1;
  }
  __syncthreads();
  for (int idx = tid; idx < kPfRows * kPfHS; idx += NT) {
    const int r = idx / kPfHS, d = idx % kPfHS, t = t0 + r;
    if (t >= T) continue;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; w++) M = fmaxf(M, Ms[w * kPfRows + r]);
    float Lsum = 0.f, acc = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NW; w++) {
        const float mw = Ms[w * kPfRows + r];
        const float f = mw == -INFINITY ? 0.f : exp2f(mw - M);
        Lsum = fmaf(f, Ls[w * kPfRows + r], Lsum);
        acc = fmaf(f, Os[w][r][d], acc);
      }
    }
    out[((size_t)b * T + t) * NH * kPfHS + (size_t)h * kPfHS + d] = Lsum > 0.f ? acc / Lsum : 0.f;
  }
}

}  // namespace

// kv_attention_prefill_tc is kv_attention's hook for this kernel (declared
// there). It launches when variant is 12 (the tensor-core prefill, HS = 64,
// fp16 operands) or 13 (the same launched normally, not as a programmatic
// dependent), or variant is 0 with f16 set, HS = 64 and more than
// KV_ATTN_DECODE_MAX_Q query vectors per kv head (the decode kernels take
// fewer). Returns false, launching nothing, otherwise; *st holds the status
// when it returns true (cudaErrorInvalidValue for variant 12/13 with shapes
// it cannot take).
bool kv_attention_prefill_tc(cudaStream_t s, float *out, const float *q, const float *kc, const float *vc,
                             const int32_t *order, const int32_t *lens, int B, int T, int NH, int NKV, int HS,
                             int q_stride, int max_len, float rope_theta, int variant, int f16, kv_status *st) {
  const bool fits = HS == kPfHS && q_stride % 2 == 0 && ((reinterpret_cast<uintptr_t>(q) & 7) == 0) &&
                    ((reinterpret_cast<uintptr_t>(kc) | reinterpret_cast<uintptr_t>(vc)) & 15) == 0 &&
                    (long long)kv_ceil_div(T, kPfRows) <= 0x7fffffff && NH <= 65535 && B <= 65535;
  if (variant == 0) {
    if (!f16 || !fits || T * (NH / NKV) <= KV_ATTN_DECODE_MAX_Q) return false;
  } else if (variant == 12 || variant == 13) {
    if (!fits) {
      *st = (kv_status)cudaErrorInvalidValue;
      return true;
    }
  } else {
    return false;
  }
  const RopeFreqs fr = rope_freqs(kPfHS, rope_theta);
  const float qscale = 1.4426950408889634f / sqrtf((float)kPfHS);
  const bool pdl = variant != 13 && kv_pdl_supported();
  const dim3 grid(kv_ceil_div(T, kPfRows), NH, B);
  const int rope = rope_theta != 0.f;
  // Up to 64 entries a tile of 4 warps covers them; longer sequences take
  // 8 warps (128-entry tiles): a 256-entry prefill is then two tiles deep.
  cudaError_t e;
#define KV_PF(NW, ROPE)                                                                                         \
  e = kv_launch(attn_prefill_tc_kernel<NW, ROPE>, grid, dim3(NW * 32), 0, s, pdl, out, q, kc, vc, order, lens, T, NH, \
                NKV, q_stride, max_len, fr, qscale)
  if (max_len <= 64) {
    if (rope) KV_PF(4, true); else KV_PF(4, false);
  } else {
    if (rope) KV_PF(8, true); else KV_PF(8, false);
  }
#undef KV_PF
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    *st = (kv_status)e;
    return true;
  }
  *st = kv_launched();
  return true;
}
