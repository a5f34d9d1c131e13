/*
 * kvalign.h — the only C interface of libkvalign.a (the .cu files of csrc), called from
 * Go through cgo (package gpu, build tag cuda).
 *
 * Conventions (every entry point follows them):
 *  - kv_status is 0 on success, else the cudaError_t value; kv_error_string
 *    turns it into a message. Nothing here prints, exits or aborts: the Go
 *    process owns error handling.
 *  - Operations take the stream first, enqueue their kernels on it and return
 *    cudaGetLastError() after the launches. They never allocate, synchronise
 *    or read host memory, so a decode step can be captured as a CUDA graph;
 *    per-step data (tokens, positions, lengths, counters) is read from device
 *    buffers.
 *  - Device pointers are typed: float* activations, const int32_t* ids,
 *    const void* for weight-like operands of either dtype with an int flag
 *    (w_f16 = 1: IEEE half, 0: float32). Arithmetic is fp32.
 *  - Shapes: B sequences, T tokens, N rows, C channels, NH/NKV query/key-value
 *    heads, HS head size, V vocabulary, S cache slots (as in gpu/ref).
 *  - The caller makes the right device current on the calling thread (the Go
 *    side locks its goroutine to the OS thread and calls kv_set_device first,
 *    see gpu/cuda.go).
 */
#ifndef KVALIGN_H
#define KVALIGN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *kv_stream;
typedef struct CUgraphExec_st *kv_graph;
typedef struct CUevent_st *kv_event;
typedef int kv_status;

/* ---- errors and runtime (cuda-core, runtime.cu) ---- */

const char *kv_error_string(kv_status s);
const char *kv_error_name(kv_status s);

/* Device selection: makes device current on the calling OS thread. */
kv_status kv_set_device(int device);
/* name: at least 256 bytes; total_mem in bytes; sm = major*10+minor;
 * smem_optin: shared memory per block with opt-in (bytes). */
kv_status kv_device_info(int device, char *name, int name_len, size_t *total_mem, int *sm, int *num_sms,
                         int *smem_optin);
kv_status kv_mem_info(size_t *free_bytes, size_t *total_bytes);

kv_status kv_stream_create(kv_stream *s);   /* non-blocking stream */
kv_status kv_stream_destroy(kv_stream s);
kv_status kv_stream_sync(kv_stream s);
/* Events (no timing): record marks the work enqueued on s so far; sync waits
 * for the marked work (the host thread spins or yields, as the runtime
 * chooses) and returns its first asynchronous error. */
kv_status kv_event_create(kv_event *e);
kv_status kv_event_destroy(kv_event e);
kv_status kv_event_record(kv_event e, kv_stream s);
kv_status kv_event_sync(kv_event e);
/* The stream's pending asynchronous error, if any (cudaStreamQuery without waiting: 0 when busy). */
kv_status kv_peek_error(void);

kv_status kv_malloc(void **p, size_t bytes);
kv_status kv_free(void *p);
kv_status kv_malloc_host(void **p, size_t bytes);   /* pinned */
kv_status kv_free_host(void *p);

/* Synchronous transfers ordered after the work already on s (they
 * enqueue on s and wait for it). host may be pageable. */
kv_status kv_upload(kv_stream s, void *dst, const void *host, size_t bytes);
kv_status kv_download(kv_stream s, void *host, const void *src, size_t bytes);
/* Asynchronous transfers on s; host must be pinned (capturable). */
kv_status kv_copy_in(kv_stream s, void *dst, const void *pinned, size_t bytes);
kv_status kv_copy_out(kv_stream s, void *pinned, const void *src, size_t bytes);
/* kv_copy_in_ahead: kv_copy_in on the stream side, at once (not after the
 * work queued on s, none of which may still read dst); work enqueued on s
 * afterwards waits for it (through done). Not while capturing. */
kv_status kv_copy_in_ahead(kv_stream s, kv_stream side, kv_event done, void *dst, const void *pinned, size_t bytes);
/* Device-to-device copy on s. */
kv_status kv_copy_d2d(kv_stream s, void *dst, const void *src, size_t bytes);
kv_status kv_memset(kv_stream s, void *dst, int value, size_t bytes);

/* CUDA graphs: begin capturing s (thread-local mode), end it and instantiate. */
kv_status kv_capture_begin(kv_stream s);
kv_status kv_capture_end(kv_stream s, kv_graph *g);
kv_status kv_graph_launch(kv_stream s, kv_graph g);
kv_status kv_graph_destroy(kv_graph g);

/* ---- elementwise and row operations (cuda-core) ---- */

/* embed.cu: out[N,C] = wte[tokens[r]] + wpe[pos[r]] (wpe may be NULL).
 * V, P: rows of wte and wpe; an id outside them writes a NaN row. */
kv_status kv_embed(kv_stream s, float *out, const void *wte, int wte_f16, int V,
                   const void *wpe, int wpe_f16, int P, const int32_t *tokens,
                   const int32_t *pos, int N, int C);

/* norm.cu: fp32 mean/variance (two-pass for LayerNorm); b may be NULL.
 * variant: 0 chooses, 1 = v1 (block per row), 2 = v2 (warp per row, row in
 * registers; needs C % 4 == 0, C ≤ 2048 and aligned rows, else v1). */
kv_status kv_layernorm(kv_stream s, float *out, const float *in, const void *w,
                       const void *b, int w_f16, int N, int C, float eps, int variant);
kv_status kv_rmsnorm(kv_stream s, float *out, const float *in, const void *w,
                     int w_f16, int N, int C, float eps, int variant);
/* kv_norm_sum (fused.cu): out = norm(in + unfix(acc)) (ref.SumAcc, then
 * RMSNorm (rms) or LayerNorm with b), acc ([N, C] int64, fixed point as
 * kv_mlp_acc's) set to zero: the final norm of a one-token step whose last
 * MLP left its output in an accumulator. clear (NULL, or another [N, C]
 * int64 accumulator, not acc) is set to zero too: the last layer's
 * attention accumulator, which that MLP read. One kernel (norm v2) for rows
 * of up to 2048, else the sum into scratch and the norm. out must not be
 * in. */
kv_status kv_norm_sum(kv_stream s, float *out, const float *in, long long *acc, long long *clear, const void *w,
                      const void *b, int w_f16, int N, int C, float eps, int rms);

/* activation.cu: x = gelu_new(x) in place over n elements; out[N,F] =
 * silu(gate)*up with gate/up rows row_stride apart. */
kv_status kv_gelu_new(kv_stream s, float *x, long long n);
kv_status kv_silu_mul(kv_stream s, float *out, const float *gate, const float *up,
                      int N, int F, int row_stride);

/* rope.cu: rotate heads 0..n_heads-1 of each of N rows (row_stride apart,
 * heads HS apart) at position pos[r], HF rotate-half. HS even, ≤ 1024.
 * variant: 0 chooses (v2 for N ≤ 64, else v1), 1 = block per row (angles
 * shared by the heads), 2 = thread per pair (lowest latency). */
kv_status kv_rope(kv_stream s, float *x, const int32_t *pos, int N, int n_heads,
                  int HS, int row_stride, float theta, int variant);

/* cache.cu: cache[slots[r]·row_size …] = src[r·src_stride …]; slots
 * outside [0, S) are skipped. */
kv_status kv_cache_store(kv_stream s, float *cache, int S, const float *src,
                         const int32_t *slots, int N, int row_size, int src_stride);

/* loss.cu: nll[r] = logsumexp(logits[r]) − logits[r, targets[r]]; one block
 * per row; a target outside [0,V) gives NaN. */
kv_status kv_nll(kv_stream s, float *nll, const float *logits, const int32_t *targets,
                 int N, int V);

/* sampling.cu: out[b] (and also[b] where also is not NULL) for b < B,
 * see gpu.SampleParams. 1 ≤ top_k ≤
 * KV_SAMPLE_MAX_TOPK; banned may be NULL when max_ban = 0; succ, when
 * its count is set, adds the bans of a 2-gram memory (below). smem_optin: the
 * device's opt-in shared memory per block (bytes), passed to kv_sample_init
 * once per device before any launch. scratch: device memory of scratch_keys
 * 64-bit keys for v5 (B·ceil(V/512)·64 are used; NULL or too small: v4).
 * variant: 0 chooses (v5 for B ≤ 16, else v4);
 *   1 = one block per row, one pass, per-warp top-K lists;
 *   2 = v1 after a pass that bounds the K-th logit, so few elements compete;
 *   3 = v2 on a row staged in shared memory;
 *   4 = v2 for K > 8 else v1, with a per-warp vote that skips hopeless
 *       elements and a bitonic merge of the lists;
 *   5 = 512-element chunks in parallel blocks, then one block per row
 *       merges their lists and picks (two kernels). */
#define KV_SAMPLE_MAX_TOPK 64
/* kv_succ: a 2-gram memory per row (gpu.Successors). For row b and token t
 * (cell b·V + t), count[cell] successors were recorded after t; the most
 * recent min(count, keep) sit in a ring of keep slots, slot i at
 * pages[dir[cell·dirs + i/32]·32 + i%32] (dirs = ceil(keep/32)). The
 * sampler bans row b's kept successors of prev[b·prev_stride] and records
 * its pick there; a new ring page comes from *used (pages run out at
 * n_pages: the pick is then not recorded, and *used tells the host).
 * count == NULL: no memory. */
typedef struct {
  const int32_t *prev;
  int32_t *count, *dir, *pages, *used;
  int prev_stride, keep, dirs, n_pages;
} kv_succ;
kv_status kv_sample_init(int smem_optin);
kv_status kv_sample(kv_stream s, int32_t *out, int32_t *also, const float *logits, const int32_t *banned,
                    const int32_t *counter, int B, int V, int top_k, int max_ban,
                    uint64_t seed, kv_succ succ, int smem_optin, uint64_t *scratch,
                    long long scratch_keys, int variant);

/* head.cu: the LM head and the sampler's first stage of a one-token step,
 * screened by an int8 copy of the head (gpu.HeadSampler): the same picks
 * as kv_matmul(x, w) then kv_sample, from about half the bytes.
 * kv_head_applies: C a multiple of 32, at most 1024, and a device with
 * smem_optin bytes of opt-in shared memory per block (152 KB: Ampere and
 * Hopper data-center parts). kv_head_sums_as_matmul: the exact rows sum
 * as kv_matmul's one-row product of the head does (matmul.cu's GEMV, which
 * it runs for heads of more than ~6,000 rows of 576), so the picks are
 * those of kv_matmul then kv_sample. kv_head_rows: the
 * copy's rows (V padded to 512). kv_head_quantize makes the copy of the
 * fp16 head w [V, C]: q (kv_head_rows(V)·C bytes, 16-byte aligned) and
 * rows (4 floats a row: scale and two error bounds). kv_head_sample: out,
 * also, banned, counter, top_k, max_ban, seed, succ, smem_optin and scratch
 * (B·ceil(V/512)·64 keys) as kv_sample; sms: the device's multiprocessors;
 * sync (NULL: none): zeroed device memory of 4·sync_rows·ceil(V/512)
 * bytes, through which the blocks of up to sync_rows rows share one
 * threshold (fewer rows to recompute; each launch leaves it zeroed);
 * logits (NULL: none) receives the
 * exact logit of every row that could be among a row's top_k, the others
 * are not written; debug (NULL: none) receives (approximation, bound) for
 * each of B·kv_head_rows(V) rows and stats (NULL: none) the number of rows
 * recomputed, for tests and benchmarks. */
int kv_head_applies(int V, int C, int smem_optin);
int kv_head_sums_as_matmul(int V, int C);
long long kv_head_rows(int V);
kv_status kv_head_quantize(kv_stream s, void *q, float *rows, const void *w, int V, int C);
kv_status kv_head_sample(kv_stream s, int32_t *out, int32_t *also, float *logits, const float *x, const void *q,
                         const float *rows, const void *w, const int32_t *banned,
                         const int32_t *counter, int B, int V, int C, int top_k, int max_ban,
                         uint64_t seed, kv_succ succ, int smem_optin, int sms, uint64_t *scratch,
                         long long scratch_keys, void *sync, int sync_rows, float *debug, int *stats);

/* ---- matmul, attention, align (cuda-compute) ---- */

/* matmul.cu: out[N,OC] = in[N,C]·w[OC,C]ᵀ + bias; with accumulate,
 * out += the same (a fused residual add). in/out float32; w and bias half
 * (w_f16/bias_f16 = 1) or float32; bias may be NULL. N ≤ 8 takes the GEMV
 * path (weights streamed once with 16-byte loads when rows are 16-byte
 * aligned), larger N a tiled GEMM: tensor cores (fp16 operands, the
 * activations rounded to fp16 as tiles load, fp32 accumulation) for half
 * weights, fp32 SIMT (no TF32) for float weights. out must not alias in. */
kv_status kv_matmul(kv_stream s, float *out, const float *in, const void *w, int w_f16,
                    const void *bias, int bias_f16, int N, int C, int OC, int accumulate);
/* kv_matmul_variant: kv_matmul with the kernel chosen. N > 8: 0 the
 * default (fp16 weights: v3 where it applies, else v2; fp32 weights: 32-row
 * tiles when 64 leave SMs idle), 1 the first kernels (one k-step register
 * prefetch, 64×64 tiles), kept for comparison; 2 = v2 (fp16 weights through
 * a cp.async pipeline, 32- or 64-row tiles); 3 = v3 (gemm_prefill.cu: 16-row
 * tiles for short inputs, split-K over thread block clusters on sm_90,
 * launched as a programmatic dependent; needs C % 8 == 0 and 16-byte aligned
 * in and w, else as 2); 4 = 3 launched normally. For fp32 weights 2–4 are 0.
 * N ≤ 8: 0 = fused.cu's GEMV launched as a programmatic dependent (sm_90,
 * weight loads before the wait) where it applies, else 1 = matmul.cu's GEMV. */
kv_status kv_matmul_variant(kv_stream s, float *out, const float *in, const void *w, int w_f16,
                            const void *bias, int bias_f16, int N, int C, int OC, int accumulate,
                            int gemm_variant);
/* kv_matmul_lead: kv_matmul accumulating (out += in·wᵀ + bias), the results
 * bit for bit the same; one-token products let the next kernel launch at
 * once rather than after their own wait, so that its weights stage while
 * this product's predecessor still runs (docs/PERF.md, version 17). The
 * caller must make sure that the next kernel in the stream reads nothing
 * but constant data (weights) before its programmatic wait, as kv_mlp_acc
 * and the fused products do: the kernel before this one may still run. */
kv_status kv_matmul_lead(kv_stream s, float *out, const float *in, const void *w, int w_f16,
                         const void *bias, int bias_f16, int N, int C, int OC);

/* attention.cu: see gpu.AttnParams and ref.Attention. q rows q_stride apart,
 * out [B·T, NH·HS], caches [S, NKV, HS] (one layer), order [B·max_len]
 * slot numbers, lens [B] on the device. rope_theta ≠ 0 rotates key j at
 * position j as it is read. HS even, ≤ KV_ATTN_MAX_HS; NH a multiple of NKV.
 * work/work_floats: scratch for split-K decoding (partial softmax results
 * and per-(sequence, kv head) counters); kv_attention_work_floats says how
 * much the split path needs for these shapes. It must be zero-filled before
 * its first use (the kernels leave the counters at zero again). With less
 * (or NULL) the decode kernel runs unsplit: correct, slower at long lengths.
 * variant: 0 chooses (6, 4 or 5); 1 the decode kernel (one block per sequence, kv head
 * and key split, serving all T·(NH/NKV) queries together, the last split
 * merging the others' partials; needs T·NH/NKV ≤ KV_ATTN_DECODE_MAX_Q);
 * 2 the tiled prefill kernel (flash-attention style online softmax, key
 * tiles in shared memory); 3 the first decode kernel (a second launch merges
 * the splits), kept for comparison; 4 (default for decoding) decode v3: 256
 * threads, 64-entry chunks gathered with 16-byte loads, one chunk per split
 * at usual lengths; 5 (default above) 2 with query tiles of 16-64 rows,
 * chosen so that the grid fills the GPU; 6 decode v4: one 512-thread block
 * per (sequence, kv head), K/V rows straight into registers, two memory
 * round trips (needs HS ∈ {16, 32, 64, 128}, T·NH/NKV ≤ 4, 16-byte
 * aligned q, caches and q_stride % 4 == 0); 7 (default above) 5 with the
 * key/value tiles loaded a tile ahead into registers; 8 = 6 in thread block
 * clusters of 4 (sm_90: each block takes a quarter of the entries, the
 * partials merge in distributed shared memory); 9 = 6 in clusters of 8
 * blocks of 128 threads (sm_90), the first keys' rotation factors computed
 * before the programmatic wait; 10, 11 = 9, 8 launched normally (for
 * comparison); 14 = 9 with a cluster per query head instead of per kv head
 * (each kv head's keys and values read NH/NKV times). 0: for max_len·HS ≤
 * 1024·64, 6 when B·NKV ≥ 8, else 14 when NH > NKV and B·NH·8 ≤ 132
 * blocks, else 9 (B·NKV·8 ≤ 132 blocks); longer, 4 (decoding) or 7.
 * On sm_90, 6, 8, 9 and 14 launch as programmatic dependents and gather the rows of
 * every entry but each sequence's newest T before waiting for the previous
 * kernel: that kernel may write q and the newest T entries (this step's
 * keys and values), nothing else the call reads (order, lens and older
 * entries must come from earlier kernels or copies).
 * 12 (attention_prefill.cu) the tensor-core prefill: fp16 operands (q, k, v
 * and the probabilities rounded to half), fp32 accumulation and softmax,
 * HS = 64 only, 16 queries per block, launched as a programmatic dependent
 * on sm_90 (reads lens and order before waiting: they must come from copies
 * or kernels before the previous one); 13 = 12 launched normally.
 * KV_ATTN_F16 or'ed into variant 0 says fp16 operands are acceptable (the
 * model's weights are fp16): then prefills (more than KV_ATTN_DECODE_MAX_Q
 * query vectors per kv head) with HS = 64 take 12. */
#define KV_ATTN_F16 0x100
#define KV_ATTN_MAX_HS 128
#define KV_ATTN_DECODE_MAX_Q 16
long long kv_attention_work_floats(int B, int T, int NH, int NKV, int HS, int max_len);
kv_status kv_attention(kv_stream s, float *out, const float *q, const float *kc, const float *vc,
                       const int32_t *order, const int32_t *lens, int B, int T, int NH, int NKV,
                       int HS, int q_stride, int max_len, float rope_theta, float *work,
                       long long work_floats, int variant);
/* kv_attention_out: decode attention (T = 1; arguments as kv_attention's)
 * with the attention output projection folded in: for each query head h
 * and row c, the head's share of the product, Σ_d wo[c·NH·HS + h·HS + d]·
 * attn(b, h)[d] (wo [C, NH·HS], kv_matmul's weight layout, fp16; no bias),
 * is added to acc[b·C + c] (int64) in fixed point with 32 fraction bits
 * (atomics; integer sums do not depend on their order, so the result is
 * the same every run); kv_norm_matmul_sum or kv_mlp_acc (in_acc) reads it,
 * kv_res_matmul or kv_mlp_acc (clear) clears it. Each block stages its
 * rows of wo's head slice in shared memory before its programmatic wait,
 * merges the cluster's partials (every block pushes its own to all) and
 * multiplies the head's output by its rows. *launched = 0 (nothing
 * enqueued, not an error) where it does not apply: fp32 wo, more than 1024
 * entries of 64 dims, unaligned operands, HS ∉ {16, 32, 64, 128}, no
 * clusters (before sm_90), C·HS/4 > 48 KB.
 * variant: 0 folds where kv_attention's default takes v14 (NH > NKV and
 * B·NH·8 ≤ 132: where the fold measured faster), else launches nothing;
 * 1 = always (where it applies): a cluster of 8 blocks of 128 threads per
 * (query head, sequence). */
kv_status kv_attention_out(kv_stream s, long long *acc, const float *q, const float *kc, const float *vc,
                           const int32_t *order, const int32_t *lens, int B, int NH, int NKV, int HS,
                           int q_stride, int max_len, float rope_theta, const void *wo, int wo_f16, int C,
                           int variant, int *launched);

/* kv_attention_block: kv_norm_matmul_store_sum's q|k|v product (RMSNorm
 * of in + unfix(mlp_acc), mlp_acc optional, the sum written to sum;
 * rotation at pos of the first rope_heads heads with theta; the newest key
 * and value stored at slots) inside kv_attention_out's clusters (its
 * arguments as there; rope_theta rotates keys at their index when read),
 * one launch: each block multiplies its share of the head's query and key
 * rotation pairs and value rows and stores them into every block of its
 * cluster. The cluster's prologue reads the caches' older rows, order,
 * lens, pos and slots before its programmatic wait: with pdl the kernel
 * before must write none of them (a layer's MLP; not the realignment);
 * without, it is a plain launch, which starts once everything before it
 * has completed (the first layer's). *launched = 0
 * where it does not apply: kv_attention_out's conditions, fp32 weights,
 * HS ∉ {64, 128}, C % 8 ≠ 0, C > 1024. With tok (then neither pdl nor
 * mlp_acc, and in unused), the stream is the embedding of the token tok[b]
 * in wte (V rows, fp16 with wte_f16; an id outside them gives NaNs, as
 * kv_embed): the first layer embeds the step's token itself. */
kv_status kv_attention_block(kv_stream s, long long *acc, float *sum, const float *in, const long long *mlp_acc,
                             const void *norm_w, int norm_f16, const void *w, int w_f16, float *kc, float *vc,
                             const int32_t *pos, const int32_t *slots, const int32_t *order, const int32_t *lens,
                             int B, int NH, int NKV, int HS, int max_len, float rope_theta, float theta,
                             int rope_heads, float eps, int C, const void *wo, int wo_f16, const int32_t *tok,
                             const void *wte, int wte_f16, int V, int pdl, int *launched);

/* align.cu: KV-Align realignment in place (see gpu.AlignParams, ref.Align):
 * for every layer l < L, list entry i < rows and kv head h < NKV, the head
 * vector x = cache[l·layer_stride + slots[i]·NKV·HS + h·HS …] becomes
 * x + W3·relu(W2·relu(W1·[x, pos[index[i]], layer[l], head[h]] + b1) + b2) + b3,
 * all layers and rows in one launch. Network weights float32, row-major
 * [out, in]. A row whose index lies outside [0, P) or whose slot is negative
 * is left unchanged. HS ≤ KV_ALIGN_MAX_IN in total with the embeddings.
 * variant: 1 = fp32 SIMT; 2 = tensor cores, 3xTF32 (operands split into two
 * TF32 parts: fp32-level accuracy, ~1e-6 relative like v1); 3 = tensor
 * cores, plain TF32 (~1e-3 relative, fastest); 4, 5 = 2, 3 with batched
 * cache gathers (measured on an H200: v4 3% faster than v2, same
 * accuracy; v5 5-7% faster than v3); 0 = 4. */
#define KV_ALIGN_MAX_IN 512
kv_status kv_align(kv_stream s, float *cache, const int32_t *slots, const int32_t *index,
                   int rows, int L, int NKV, int HS, long long layer_stride,
                   const float *pos, int P, int DP, const float *layer, int DL,
                   const float *head, int DH, const float *w1, const float *b1,
                   const float *w2, const float *b2, const float *w3, const float *b3,
                   int H1, int H2, int variant);

/* kv_align_net: a network packed by gpu.PackAlign (weights w in the
 * kernel's shared-memory layout, fp16 when w_f16 = 1, else float32; fc1's
 * embedding part as the tables post [P][H1p] and lh [Ln*Hn][H1p]; biases b2
 * [H2p] then b3 [HSp]) and the K or V store it rewrites. */
typedef struct {
  float *cache;
  const void *w;
  int w_f16;
  const float *bias, *post, *lh;
  int P, Ln, Hn, HSp, H1p, H2p;
} kv_align_net;

/* kv_align_packed: kv_align's realignment by one or two packed networks in
 * one launch (n_nets = 2: keys and values, each over its own store, the SMs
 * shared between them), a warp per 16 rows with the activations in
 * registers. w_f16 = 1: fp16 tensor cores, fp32 accumulation, the residual
 * add in fp32 (~5e-4 relative on the correction; gpu's variant 6, 8
 * tuned); 0: 3xTF32 tensor cores, fp32 accuracy (variant 7, 9 tuned).
 * tuned = 1: the same arithmetic in another instruction order (bitwise
 * equal results): fp16 issues fc1 of the next 32 outputs before fc2 of the
 * current ones, 3xTF32 runs its passes round 4 accumulators.
 * gpu.CUDA.Align's defaults: 6 and 9 (H200, distilgpt2 keys: 10 and 46 µs
 * against kv_align's 121). (HSp, H2p): fp16 one of (64, 64), (64, 128),
 * (64, 256), (128, 64), (128, 128); fp32 (64, 64) or (64, 128); both
 * networks of one dtype, HSp and H2p (H1p may differ). H1p a multiple of
 * 32; HS <= HSp, L <= Ln, NKV <= Hn. Rows are skipped as by kv_align. */
kv_status kv_align_packed(kv_stream s, const kv_align_net *nets, int n_nets, const int32_t *slots,
                          const int32_t *index, int rows, int L, int NKV, int HS, long long layer_stride,
                          int tuned);

/* bandwidth.cu: device-to-device copy bandwidth in GB/s (bytes read plus
 * written per second) over reps copies of a buffer of `bytes`; synchronous. */
kv_status kv_copy_bandwidth(kv_stream s, long long bytes, int reps, float *gbps);

/* ---- fused decode ops (decode-perf) ---- */

/* fused.cu: the operations of gpu.Fused (reference compositions in
 * gpu/ref/fused.go), each one launch for decoding.
 *
 * kv_norm_matmul: out[N,OC] (+)= act(norm(in[N,C])·w[OC,C]ᵀ + bias), norm =
 * LayerNorm (rms = 0; norm_b may be NULL) or RMSNorm (rms = 1; norm_b
 * ignored), norm_w/norm_b of dtype norm_f16, act = gelu_new when gelu = 1
 * (not with accumulate). out must not overlap in.
 * kv_swiglu_matmul: out[N,OC] (+)= (silu(gu[:, :F])·gu[:, F:2F])·w[OC,F]ᵀ,
 * gu rows 2F apart.
 * kv_rope_store: qkv rows (row_stride apart) hold NH query heads, NKV key
 * heads, NKV value heads (HS each, HS even): with theta ≠ 0, heads
 * 0..rope_heads-1 (≤ NH+2·NKV) are rotated in place at pos[r] (HF
 * rotate-half, as kv_rope), then the key and value heads go to slot slots[r]
 * of kc and vc ([S, NKV, HS]; slots outside [0, S) skipped).
 *
 * variant: 0 chooses; 1 the single fused kernel v1 (N ≤ 8, 16-byte weight
 * rows, aligned operands, input staged in shared memory ≤ 46 KB; else as 3);
 * 2 = 1 launched as a programmatic dependent (sm_90: the weight loads
 * overlap the previous kernel); 3 two steps, the norm or activation into a
 * scratch buffer from the stream-ordered allocator (cudaMallocAsync/
 * cudaFreeAsync, capturable as graph memory nodes) then kv_matmul
 * (+ kv_gelu_new); 4 = the N = 1 kernel v2 (input in registers; for
 * comparison) as a programmatic dependent, else as 2. 0 = 2 on sm_90 (1
 * before) up to 1536 blocks (every block normalises the input: above that,
 * the LM head, 3 is faster), else 3; 5 = GEMM v3 (kv_matmul variant 3)
 * with the RMSNorm or SwiGLU applied to its A tiles (fp16 weights; RMSNorm
 * rounds x·norm_w to fp16 and scales the product by the row's 1/rms; not
 * with LayerNorm or gelu), else 3. Above 8 rows kv_norm_matmul's 0 = 5
 * where it applies; kv_swiglu_matmul's stays 3 (the A-tile SwiGLU is redone
 * by every column tile: slower than SiluMul + GEMM v3).
 * For kv_rope_store (always one kernel) 1 = normal launch, 2 and 4 = programmatic dependent, 0 = 2 on sm_90. */
kv_status kv_norm_matmul(kv_stream s, float *out, const float *in, const void *norm_w,
                         const void *norm_b, int norm_f16, const void *w, int w_f16,
                         const void *bias, int bias_f16, int N, int C, int OC, float eps, int rms,
                         int gelu, int accumulate, int variant);
/* kv_norm_matmul_store: kv_norm_matmul into qkv rows of OC = (NH+2·NKV)·HS
 * (no activation, no accumulation), then kv_rope_store on them (row_stride
 * OC), as one kernel: the product's blocks take rotation pairs (i, i+HS/2)
 * of a head, rotate them and store the key and value heads themselves.
 * variant: 0 chooses (the single kernel where v1 applies, as a
 * programmatic dependent on sm_90); 1, 2 as kv_norm_matmul's (4 = 2);
 * 3 the two launches kv_norm_matmul + kv_rope_store (the defaults).
 * lead ≠ 0 lets the next kernel in the stream launch before this one waits
 * for its input (the single kernel, as kv_matmul_lead), so that the decode
 * attention after it gathers its older K/V rows early (docs/PERF.md,
 * version 18). The caller must make sure that what the next kernel reads
 * before its programmatic wait (the attention: the order, the lengths and
 * the cache rows but this step's) is not written by the kernel before this
 * one, which may still run; and that the kernel before this one passed its
 * own programmatic wait before it let this one launch (every decode kernel
 * but a leading one does), for with lead this kernel reads pos and slots
 * before its wait. */
kv_status kv_norm_matmul_store(kv_stream s, float *qkv, const float *in, const void *norm_w,
                               const void *norm_b, int norm_f16, const void *w, int w_f16,
                               const void *bias, int bias_f16, int N, int C, float eps, int rms, float *kc,
                               float *vc, int S, const int32_t *pos, const int32_t *slots, int NH, int NKV,
                               int HS, int rope_heads, float theta, int variant, int lead);
/* kv_norm_matmul_store_sum: kv_norm_matmul_store on the residual stream
 * that a one-token MLP left in an accumulator (kv_mlp_acc): its input row n
 * is in[n] + unfix(acc[n]) (ref.SumAcc, no bias), which block 0 also writes
 * to sum (not in) for the layer's later kernels; one kernel where the
 * single fused kernel applies (variants and lead as kv_norm_matmul_store's),
 * else the sum and then kv_norm_matmul_store. */
kv_status kv_norm_matmul_store_sum(kv_stream s, float *qkv, float *sum, const float *in, const long long *acc,
                                   const void *norm_w, const void *norm_b, int norm_f16, const void *w, int w_f16,
                                   const void *bias, int bias_f16, int N, int C, float eps, int rms, float *kc,
                                   float *vc, int S, const int32_t *pos, const int32_t *slots, int NH, int NKV,
                                   int HS, int rope_heads, float theta, int variant, int lead);
kv_status kv_swiglu_matmul(kv_stream s, float *out, const float *gu, const void *w, int w_f16, int N,
                           int F, int OC, int accumulate, int variant);
/* mlp.cu: kv_mlp_acc adds a one-token MLP block (no residual) to acc
 * ([N, C] int64, fixed point with 32 fraction bits, as kv_attention_out):
 * acc[n] += fix(act(norm(in[n])·up_wᵀ + up_b)·down_wᵀ + down_b), in one
 * launch: each block owns 16 columns of the activation, stages its rows of
 * up_w before its programmatic wait and its columns of down_w after it, and
 * adds its partial output with atomics (the sum does not depend on their
 * order).
 * Llama (rms = 1, swiglu = 1): RMSNorm, up_w [2F, C] the gate rows then the
 * up rows, act = silu(gate)·up, no up_b; GPT-2 (0, 0): LayerNorm (norm_b
 * optional), act = gelu_new. clear (NULL or clear_len int64, not acc) is set
 * to zero: the other accumulators of a chain, once their readers have run.
 * in_acc (NULL or [N, C] int64): the input row is in[n] + unfix(in_acc[n])
 * (ref.SumAcc: the residual stream after a folded attention,
 * kv_attention_out), which block 0 also writes to sum ([N, C], not in).
 * lead ≠ 0 lets the next kernel launch before this one waits for its input
 * (as kv_matmul_lead): only for a next kernel that reads nothing this one
 * or the one before it writes until its own wait (kv_attention_block).
 * *launched = 0 (nothing enqueued, not an error) where it does not apply:
 * fp32 weights, N > 8, C % 8 ≠ 0, F % 16 ≠ 0, unaligned operands, more
 * shared memory than a block may have; variant 0 also before sm_90
 * (without programmatic launches the staging cannot overlap) and for MLPs
 * of more than 8 MiB of weights (distilgpt2's 9.4 MB measured slower than
 * two products, SmolLM2's 5.3 MB faster); 1 launches there too. */
kv_status kv_mlp_acc(kv_stream s, long long *acc, long long *clear, long long clear_len, const float *in,
                     const long long *in_acc, float *sum, const void *norm_w,
                     const void *norm_b, int norm_f16, const void *up_w, int up_f16, const void *up_b,
                     int up_b_f16, const void *down_w, int down_f16, const void *down_b, int down_b_f16, int N,
                     int C, int F, float eps, int rms, int swiglu, int variant, int lead, int *launched);
/* The residual stream after a folded attention (kv_attention_out), so that
 * the out-projection costs no launch of its own. acc: [N, C] int64, the
 * heads' partial products summed in fixed point (kv_attention_out).
 * kv_norm_matmul_sum: sum[N,C] = in + (acc_bias + unfix(acc)) (fp32, in
 * this order, as ref.SumAcc; acc_bias of dtype acc_bias_f16, may be NULL),
 * then kv_norm_matmul(out, sum, …) without accumulation; one kernel where
 * v1 applies (its blocks all sum the row, block 0 writes sum), else two.
 * sum must not be in.
 * kv_res_matmul: out[N,OC] = res + (x·w[OC,K]ᵀ + bias), x = in (swiglu = 0)
 * or silu(in[:, :K])·in[:, K:2K] (swiglu = 1, rows 2K apart, no bias), and
 * clear (NULL or [N, OC] int64: the accumulator, which the norm product has
 * read) set to zero for the next layer; one kernel where v1 applies, else
 * a copy of res, a memset and the accumulating product. res must not be
 * out. */
kv_status kv_norm_matmul_sum(kv_stream s, float *out, float *sum, const float *in, const long long *acc,
                             const void *acc_bias, int acc_bias_f16, const void *norm_w, const void *norm_b,
                             int norm_f16, const void *w, int w_f16, const void *bias, int bias_f16, int N, int C,
                             int OC, float eps, int rms, int gelu);
kv_status kv_res_matmul(kv_stream s, float *out, const float *res, const float *in, const void *w, int w_f16,
                        const void *bias, int bias_f16, int N, int K, int OC, int swiglu, long long *clear);
/* gemm_prefill.cu: out[N, OC/2] = silu(p[:, :OC/2])·p[:, OC/2:] with
 * p = norm(in[N,C])·w[OC,C]ᵀ + bias (OC even; norm as kv_norm_matmul):
 * Llama's gate|up product and SwiGLU in one. variant: 0 and 5 = GEMM v3
 * with RMSNorm in its A tiles and SwiGLU in its epilogue (fp16 weights,
 * RMSNorm, aligned operands, C % 8 == 0) where that applies, else (and 3)
 * three steps (norm and product into stream-ordered scratch, kv_silu_mul). */
kv_status kv_norm_matmul_swiglu(kv_stream s, float *out, const float *in, const void *norm_w,
                                const void *norm_b, int norm_f16, const void *w, int w_f16,
                                const void *bias, int bias_f16, int N, int C, int OC, float eps, int rms,
                                int variant);
kv_status kv_rope_store(kv_stream s, float *qkv, float *kc, float *vc, int S, const int32_t *pos,
                        const int32_t *slots, int N, int NH, int NKV, int HS, int row_stride,
                        int rope_heads, float theta, int variant);

/* ---- the persistent decode kernel (decode.cu) ----
 *
 * kv_decode runs every layer of a one-token decode step (T = 1) of B ≤ 4
 * sequences in one launch of one block per SM, with grid-wide barriers
 * between the five phases of a layer instead of kernel boundaries:
 *   q|k|v = norm1(x)·Wqkv + b → attention (RoPE, cache write of the new
 *   entry, split over the keys) → x += att·Wo + b → up = act(norm2(x)·Wup + b)
 *   → x += up·Wdown + b,
 * which equals, layer by layer, kv_norm_matmul_store, kv_attention,
 * kv_matmul (accumulate), kv_norm_matmul (gelu) + kv_matmul or
 * kv_norm_matmul (gate|up) + kv_swiglu_matmul. Each block copies the
 * weights of its rows of the next phases into shared memory before it waits
 * at a barrier, so the weights stream while the step's latency chain runs.
 * Weights, norm weights and biases are fp16 (biases and norm_b may be NULL);
 * caches, activations and arithmetic fp32. The blocks must all be resident
 * at once: nothing else may occupy the GPU's SMs for the kernel's duration
 * except the kernels of this stream. */
typedef struct {
  const void *norm1_w, *norm1_b, *qkv_w, *qkv_b, *o_w, *o_b;
  const void *norm2_w, *norm2_b, *up_w, *up_b, *down_w, *down_b;
  float *kc, *vc; /* the layer's caches [S, NKV, HS] */
} kv_decode_layer;

typedef struct {
  int B, L, C, NH, NKV, HS;
  int F;       /* MLP width (gate and up each F wide with swiglu) */
  int S;       /* cache slots per layer */
  int max_len; /* elements between sequences of order */
  float eps;
  int rms;     /* 1: RMSNorm (no norm bias), 0: LayerNorm */
  int swiglu;  /* 1: up_w is gate|up [2F, C] and act = silu(gate)·up; 0: gelu_new */
  float theta; /* RoPE base; 0: no RoPE (GPT-2) */
  int shift;   /* with theta: keys cached unrotated and rotated at their index when read */
} kv_decode_shape;

/* kv_decode_prepare checks that the current device can run the shape with
 * the persistent kernel and sets it up (shared memory opt-in). It gives the
 * sizes of the two device scratch buffers kv_decode needs: part_floats for
 * attention partial results, sync_words for the barrier counters (which
 * must be zero before the first kv_decode; each kv_decode leaves them zero).
 * cudaErrorNotSupported (801): the shape is outside what the kernel takes
 * (then the per-layer kernels run the step). */
kv_status kv_decode_prepare(const kv_decode_shape *sh, size_t *part_floats, size_t *sync_words);
/* layers: device array of L kv_decode_layer. x [B, C] holds the embedded
 * tokens and receives the last layer's output; qkv [B, (NH+2·NKV)·HS] and
 * act [B, F] are scratch; pos, slots [B], order [B·max_len], lens [B] as in
 * kv_attention (the new entry is the last of each order). trace: NULL, or
 * [grid][5·L][5] timestamps (ns) of every block's phases, for profiling:
 * when its inputs were all that it still waited for, when the barrier let
 * it go, when its input was staged, when its product (or scores) was done,
 * when it finished (0 for phases it had no work in). The grid is the
 * device's SM count. */
kv_status kv_decode(kv_stream s, const kv_decode_shape *sh, const kv_decode_layer *layers, float *x,
                    float *qkv, float *act, float *part, unsigned *sync, const int32_t *pos,
                    const int32_t *slots, const int32_t *order, const int32_t *lens,
                    unsigned long long *trace);

/* kv_stamps_write writes the in-kernel timestamps that a library built with
 * `make -C csrc STAMPS=1` records (csrc/stamps.cuh; scripts/stamps.py reads
 * the file) to path: 0, or -1 when the library has none or the file cannot
 * be written. */
int kv_stamps_write(const char *path);

#ifdef __cplusplus
}
#endif

#endif /* KVALIGN_H */
