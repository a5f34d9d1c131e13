// Package gpu runs the tensor operations the models are written against.
//
// Two backends implement Backend: a CPU backend in plain Go (this package,
// over the reference kernels of gpu/ref) and a CUDA backend (build tag cuda,
// cgo over csrc/libkvalign.a). Models never call C: they enqueue operations on
// a Backend, and the same model code runs on either.
//
// Shapes are carried by the caller; names in comments mean the same
// everywhere: B sequences, T tokens per sequence, N = B·T rows, C channels,
// NH query heads, NKV key/value heads, HS head size, V vocabulary, S cache
// slots.
//
// Errors are sticky, as in bufio.Writer: an operation that fails records the
// first error, later operations become no-ops, and Err or Sync reports it.
// This keeps model code readable and lets a whole decode step be enqueued (or
// captured as a CUDA graph) before anything is checked.
package gpu

import (
	"errors"
	"fmt"
)

// DType is the element type of a Buf.
type DType uint8

const (
	F32 DType = iota // float32
	F16              // IEEE half; weights only, arithmetic is fp32
	I32              // int32: token ids, positions, slot lists
)

func (d DType) String() string {
	switch d {
	case F32:
		return "f32"
	case F16:
		return "f16"
	case I32:
		return "i32"
	}
	return fmt.Sprintf("dtype(%d)", uint8(d))
}

// Size is the number of bytes of one element.
func (d DType) Size() int {
	if d == F16 {
		return 2
	}
	return 4
}

// ParseDType reads a --dtype flag value.
func ParseDType(s string) (DType, error) {
	switch s {
	case "fp32", "f32", "float32":
		return F32, nil
	case "fp16", "f16", "float16", "half":
		return F16, nil
	}
	return 0, fmt.Errorf("unknown dtype %q (want fp16 or fp32)", s)
}

// Buf is a one-dimensional buffer of Len elements owned by a Backend. A Buf
// is a small value; View makes sub-buffers that share its memory. The zero
// Buf stands for "absent" (an optional bias, GPT-2's missing RoPE).
type Buf struct {
	dt  DType
	n   int
	f   []float32 // CPU backend: F32 (and F16 weights, held as fp32)
	i   []int32   // CPU backend: I32
	ptr uintptr   // CUDA backend: device address
}

// Len is the number of elements.
func (b Buf) Len() int { return b.n }

// DType is the element type.
func (b Buf) DType() DType { return b.dt }

// IsZero reports whether b is the absent buffer.
func (b Buf) IsZero() bool { return b.n == 0 && b.f == nil && b.i == nil && b.ptr == 0 }

// View is the sub-buffer of n elements starting at element off.
func (b Buf) View(off, n int) Buf {
	if off < 0 || n < 0 || off+n > b.n {
		panic(fmt.Sprintf("gpu: view [%d:%d] out of range of buffer of %d", off, off+n, b.n))
	}
	v := Buf{dt: b.dt, n: n}
	switch {
	case b.f != nil:
		v.f = b.f[off : off+n]
	case b.i != nil:
		v.i = b.i[off : off+n]
	default:
		v.ptr = b.ptr + uintptr(off*b.dt.Size())
	}
	return v
}

// OnDevice reports whether b is device memory, whose address decides where
// its lines sit in the device's caches.
func (b Buf) OnDevice() bool { return b.ptr != 0 }

// AlignedOffset is the least element offset at or after off whose device
// address is a multiple of align bytes (a power of two); off itself on the
// host, where addresses do not decide where data sits in a cache.
func (b Buf) AlignedOffset(off, align int) int {
	size := b.dt.Size()
	if b.ptr == 0 || align <= size {
		return off
	}
	addr := b.ptr + uintptr(off*size)
	return off + int((uintptr(align)-addr%uintptr(align))%uintptr(align))/size
}

// HostInts is int32 memory the host writes and a Backend copies to and from
// the device inside a captured step (pinned memory on CUDA).
type HostInts interface {
	Ints() []int32
	// Buf is the same memory as an I32 buffer that operations may write
	// directly (CUDA: pinned memory mapped into the device's address
	// space), visible in Ints once Sync returns: a step's last result
	// written there needs no CopyOut node after it.
	Buf() Buf
	Close() error
}

// Event marks a point in a Backend's queue of work, so that the host can
// wait for one step while the next is already queued.
type Event interface {
	// Record marks the work enqueued so far.
	Record()
	// Wait blocks until the work marked by the last Record has run, and
	// returns the backend's Err.
	Wait() error
	Close() error
}

// Replay runs again the work recorded by Backend.Capture, reading the
// buffers' current contents.
type Replay interface {
	Run()
	Close() error
}

// AttnParams describes one attention call.
//
// Query row t of sequence b (row b·T+t of q and out) attends to the cache
// entries order[b·MaxLen + j] for j ≤ lens[b] − T + t: the entries of its
// sequence in logical order, up to and including itself. order holds slot
// numbers of the K/V caches, so entries never move when others are evicted.
type AttnParams struct {
	B, T        int
	NH, NKV, HS int
	QStride     int     // elements between consecutive q rows (≥ NH·HS)
	MaxLen      int     // elements between consecutive sequences of order
	RopeTheta   float32 // ≠ 0: rotate key j at position j when it is read (StreamingLLM position shift)
	// F16 allows fp16 operands (q, k, v and the probabilities rounded to
	// half, fp32 accumulation): the tensor-core prefill kernel. Models set it
	// when their weights are fp16, whose products already round activations
	// to half; backends without such a kernel ignore it.
	F16 bool
}

// SampleParams describes one sampling call over B rows of logits.
//
// Row b keeps the TopK largest logits whose token is not banned
// (banned[b·MaxBan+i] ≥ 0 lists banned ids, -1 ends the list), takes
// softmax over them and draws one with the uniform number
// Uniform(Seed, counter[b]). TopK = 1 is greedy decoding. With a 2-gram
// memory in Succ, row b also bans the successors it keeps after the row's
// previous token, and records its pick there.
type SampleParams struct {
	B, V   int
	TopK   int
	MaxBan int
	Seed   uint64
	Succ   Successors // zero: none
	// Also (I32, B; zero: none) receives the picks too: a device copy for
	// the next step where out is host memory the host reads.
	Also Buf
}

// Successors is a 2-gram memory on a backend (the layout of ref.Successors,
// whose comment explains it): I32 buffers Count [B·V], Dir [B·V·Dirs],
// Pages [32·pages] and Used [1], and Prev, the step input that holds each
// row's previous token at b·PrevStride. The sampler reads it and appends
// to it on the device, so a decode step that bans repeated 2-grams needs
// no ban list from the host: the next step can be queued before the host
// has seen this step's token.
type Successors struct {
	Prev                    Buf
	PrevStride              int
	Count, Dir, Pages, Used Buf
	Keep                    int
}

// IsZero reports whether there is no memory.
func (s Successors) IsZero() bool { return s.Count.IsZero() }

// check reports what does not fit B rows over a vocabulary of V.
func (s Successors) check(B, V int) error {
	dirs := SuccessorDirs(s.Keep)
	for _, b := range []struct {
		name string
		buf  Buf
		n    int
	}{{"prev", s.Prev, (B-1)*s.PrevStride + 1}, {"count", s.Count, B * V}, {"dir", s.Dir, B * V * dirs}, {"used", s.Used, 1}} {
		if b.buf.dt != I32 || b.buf.n < b.n {
			return fmt.Errorf("successors: %s is a %v buffer of %d, want %d i32", b.name, b.buf.dt, b.buf.n, b.n)
		}
	}
	if s.Keep < 1 || s.PrevStride < 1 || s.Pages.dt != I32 {
		return fmt.Errorf("successors: keep %d, prev stride %d, pages %v", s.Keep, s.PrevStride, s.Pages.dt)
	}
	return nil
}

// SuccessorDirs is the number of ring pages a token's memory of keep
// successors needs.
func SuccessorDirs(keep int) int { return (keep + 31) / 32 }

// AlignParams describes one realignment call (KV-Align, package align): for
// every layer l < L, list entry i < Rows and head h < NKV, the head vector at
// cache[l·LayerStride + slots[i]·NKV·HS + h·HS] is replaced by
// net(x, index[i], l, h).
type AlignParams struct {
	Rows        int
	L, NKV, HS  int
	LayerStride int
}

// AlignNet holds one realignment network's weights on a backend. Row-major
// [out, in] like torch.nn.Linear.
type AlignNet struct {
	Pos, Layer, Head Buf // embeddings [P,DP], [L,DL], [NKV,DH]
	P, DP, DL, DH    int
	W1, B1           Buf // [H1, HS+DP+DL+DH], [H1]
	W2, B2           Buf // [H2, H1], [H2]
	W3, B3           Buf // [HS, H2], [HS]
	H1, H2           int
	// Pack, when set, is the network rearranged for a faster kernel in a
	// lower precision (PackAlign); the CUDA backend runs it by default and
	// the CPU backend ignores it. align.Pair.Upload sets it for fp16 models.
	Pack *AlignPack
}

// Backend is a device that holds buffers and runs the operations.
// All operations are enqueued in order on one stream; results are visible to
// the host after Sync (the CPU backend runs them at once).
type Backend interface {
	// Name says which device this is ("cpu", "cuda:0 NVIDIA H100 …").
	Name() string
	// WeightDType is the dtype weights are stored in: F32 on the CPU.
	WeightDType(want DType) DType
	Alloc(dt DType, n int) (Buf, error)
	Free(b Buf)
	NewHostInts(n int) (HostInts, error)
	NewEvent() (Event, error)
	Close() error

	// Err is the first error of any enqueued operation.
	Err() error
	// Sync waits for all enqueued work and returns Err.
	Sync() error
	// Capture records what fn enqueues so that Replay.Run repeats it
	// (a CUDA graph; on the CPU, fn itself).
	Capture(fn func()) (Replay, error)

	// Synchronous transfers; Upload converts to dst's dtype.
	Upload(dst Buf, src []float32)
	UploadInts(dst Buf, src []int32)
	Download(dst []float32, src Buf)
	DownloadInts(dst []int32, src Buf)
	// Asynchronous, capturable transfers of step inputs and outputs.
	CopyIn(dst Buf, src HostInts)
	CopyOut(dst HostInts, src Buf)
	// CopyInAhead copies src's ints [off, off+n) to the same ints of dst
	// outside the queue's order: at once (CUDA: on a stream of its own,
	// while the queued work runs), with the work enqueued after it waiting
	// for it. Nothing queued may still read those ints of dst. Not inside
	// Capture: a captured step then reads its inputs from the device.
	CopyInAhead(dst Buf, src HostInts, off, n int)

	// Embed: out[N,C] = wte[tokens[r]] + wpe[pos[r]] (wpe may be absent).
	Embed(out, wte, wpe, tokens, pos Buf, N, C int)
	// LayerNorm: out[N,C] = (in − mean)/sqrt(var + eps)·w + b.
	LayerNorm(out, in, w, b Buf, N, C int, eps float32)
	// RMSNorm: out[N,C] = in/sqrt(mean(in²) + eps)·w.
	RMSNorm(out, in, w Buf, N, C int, eps float32)
	// MatMul: out[N,OC] = in[N,C]·w[OC,C]ᵀ + bias (bias may be absent);
	// with accumulate, out += the same (a fused residual add).
	MatMul(out, in, w, bias Buf, N, C, OC int, accumulate bool)
	// GeluNew: x = gelu_new(x) in place (GPT-2's tanh approximation).
	GeluNew(x Buf, n int)
	// SiluMul: out = silu(gate)·up (SwiGLU). gate and up are [N, F] rows
	// at stride rowStride (so one fused gate|up matmul can feed it).
	SiluMul(out, gate, up Buf, N, F, rowStride int)
	// RoPE rotates heads 0..nHeads-1 of each row of x (rows rowStride apart,
	// heads HS apart) at position pos[r], in HF's rotate-half convention.
	RoPE(x, pos Buf, N, nHeads, HS, rowStride int, theta float32)
	// CacheStore copies row r of src (rowSize elements, rows srcStride apart)
	// to slot slots[r] of cache.
	CacheStore(cache, src, slots Buf, N, rowSize, srcStride int)
	// Attention: softmax(q·kᵀ/sqrt(HS))·v over cache entries, see AttnParams.
	Attention(out, q, kc, vc, order, lens Buf, p AttnParams)
	// NLL: nll[r] = logsumexp(logits[r]) − logits[r, targets[r]].
	NLL(nll, logits, targets Buf, N, V int)
	// Sample draws one token per row into out, see SampleParams.
	Sample(out, logits, banned, counter Buf, p SampleParams)
	// Align realigns cache entries in place with a network, see AlignParams.
	Align(cache, slots, index Buf, net *AlignNet, p AlignParams)
}

// AlignPairer is a backend that realigns the K and V stores in one call
// (CUDA: one launch, each thread block running one network). AlignPair
// returns false, enqueueing nothing, where it does not take the networks:
// two Align calls do the same.
type AlignPairer interface {
	AlignPair(K, V, slots, index Buf, keys, values *AlignNet, p AlignParams) bool
}

// HeadScreen is an LM head prepared for HeadSampler.HeadSample: the fp16
// head and an int8 copy of it with a scale and two error bounds a row
// (csrc/head.cu explains the bound). Close frees the copy.
type HeadScreen struct {
	W    Buf // the head [V, C], F16
	V, C int
	// Q is the copy, 4 bytes an I32 word, in head.cu's fragment order;
	// Rows has 4 floats a row (scale, c1, c2, 0). Both cover V rounded up
	// to 512 rows. Sync is where a launch's blocks share their threshold.
	Q, Rows, Sync Buf
	free          func(Buf)
}

// Close frees the copy (not the head).
func (h *HeadScreen) Close() {
	if h != nil && h.free != nil {
		h.free(h.Q)
		h.free(h.Rows)
		h.free(h.Sync)
		h.free = nil
	}
}

// HeadSampler is a backend that can run the LM head and the sampling of a
// one-token step as one screened operation (CUDA, fp16 heads): an int8 copy
// of the head ranks the rows with a rigorous bound, and only the rows that
// could be among a row's TopK are computed exactly, so the step streams
// about half the head's bytes and draws the same tokens.
type HeadSampler interface {
	// NewHeadScreen prepares w ([V, C], F16) for HeadSample; the error
	// wraps ErrNoHeadScreen where the backend does not take the shape.
	NewHeadScreen(w Buf, V, C int) (*HeadScreen, error)
	// HeadSample = MatMul(logits, x, h.W, none, p.B, h.C, h.V, false), then
	// Sample(out, logits, banned, counter, p), with the same picks; logits
	// receives only the rows that could be among the top p.TopK (the
	// others keep what they held).
	HeadSample(out, logits, x Buf, h *HeadScreen, banned, counter Buf, p SampleParams)
}

// ErrNoHeadScreen: the backend does not screen this head.
var ErrNoHeadScreen = errors.New("gpu: the screened LM head does not take this shape")

// Error is a failed backend operation.
type Error struct {
	Op   string // the operation, e.g. "matmul"
	Code int    // the device's status code (CUDA error number), 0 on the CPU
	Msg  string
}

func (e *Error) Error() string {
	if e.Code != 0 {
		return fmt.Sprintf("gpu: %s: %s (code %d)", e.Op, e.Msg, e.Code)
	}
	return fmt.Sprintf("gpu: %s: %s", e.Op, e.Msg)
}

// BandwidthMeter is implemented by backends that can measure their own
// device-memory copy bandwidth (the floor of memory-bound decoding).
type BandwidthMeter interface {
	// CopyBandwidth times device-to-device copies of a buffer of the given
	// size and returns (bytes read + bytes written) per second, in GB/s.
	CopyBandwidth(bytes int) (float64, error)
}

// NormKind selects the normalisation a fused product starts with.
type NormKind uint8

const (
	LayerNormKind NormKind = iota + 1 // (x − mean)/sqrt(var + eps)·w + b (GPT-2)
	RMSNormKind                       // x/sqrt(mean(x²) + eps)·w (Llama)
)

// Act is an activation applied to a fused product's output.
type Act uint8

const (
	NoAct   Act = iota
	GeluAct     // gelu_new (GPT-2's MLP)
	// SwiGLUAct pairs the product's columns: the first OC/2 are gates, the
	// rest ups, and out[N, OC/2] = silu(gate)·up (Llama's MLP, so that the
	// activation is computed once per element, in the gate|up product).
	SwiGLUAct
)

// AttentionBlocker is a backend that can also fold a layer's q|k|v product
// into AttentionOutProj (CUDA): AttentionBlock =
// NormMatMulStoreSum(qkv, sum, in, mlpAcc, normW, no norm bias, w, no bias,
// a row a sequence, C, eps, RMSNorm, st) then AttentionOutProj(acc, qkv,
// st.K, st.V, order, lens, p, wo, C) (without mlpAcc, NormMatMulStore and
// sum = in), in one launch and without a q|k|v buffer. It reads the older
// cache rows, order, lens, Pos and Slots before its input is ready where
// st.Lead (see QKVStore: the operation before writes none of them), and
// otherwise starts once the operation before has completed (CUDA: a plain
// launch; the first layer's, at the step's start or after the
// realignment). False, enqueuing nothing, where it does not apply.
type AttentionBlocker interface {
	AttentionBlock(acc, sum, in, mlpAcc, normW, w Buf, st QKVStore, order, lens Buf, p AttnParams, wo Buf, C int, eps float32) bool
	// MLPAccLead = MLPAccSum, the next operation (an AttentionBlock)
	// launching before this one's input is ready.
	MLPAccLead(acc, clear, sum, in, inAcc, normW, normB, upW, upB, downW, downB Buf, N, C, F int, eps float32, norm NormKind, act Act) bool
}

// Fused is implemented by backends with fused decode kernels: each call
// does the work of several Backend operations in one launch, which is what
// batch-1 decoding needs (it is bound by launch latency, not arithmetic,
// once the weights stream at full bandwidth). Their results equal the
// unfused sequences given in the comments; models use Fused when the
// backend has it and the plain operations otherwise.
type Fused interface {
	// NormMatMul: out[N,OC] (+)= act(norm(in[N,C])·w[OC,C]ᵀ + bias)
	// = LayerNorm/RMSNorm into a scratch row, MatMul, GeluNew (or, with
	// SwiGLUAct, SiluMul of the product's halves into out[N, OC/2]).
	// With accumulate (act must be NoAct), the product is added to out.
	NormMatMul(out, in, normW, normB, w, bias Buf, N, C, OC int, eps float32, norm NormKind, act Act, accumulate bool)
	// SwiGLUMatMul: out[N,OC] (+)= (silu(gu[:, :F])·gu[:, F:2F])·w[OC,F]ᵀ
	// = SiluMul then MatMul (gu rows are 2F wide).
	SwiGLUMatMul(out, gu, w Buf, N, F, OC int, accumulate bool)
	// RopeStore takes fused q|k|v rows (rowStride apart: NH query heads,
	// then NKV key heads, then NKV value heads, HS each): with theta ≠ 0 it
	// rotates heads 0..ropeHeads-1 in place at pos[r] (RoPE), then copies
	// each row's k and v heads to slot slots[r] of kc and vc
	// = RoPE, CacheStore(kc), CacheStore(vc).
	RopeStore(qkv, kc, vc, pos, slots Buf, N, NH, NKV, HS, rowStride, ropeHeads int, theta float32)
	// NormMatMulStore: the q|k|v product of a layer with its RoPE and cache
	// writes, = NormMatMul(qkv, in, …, OC = (NH+2·NKV)·HS, NoAct, no
	// accumulate), then RopeStore(qkv, st…, rowStride OC).
	NormMatMulStore(qkv, in, normW, normB, w, bias Buf, N, C int, eps float32, norm NormKind, st QKVStore)

	// AttentionOutProj: decode attention (p.T = 1) with the attention
	// output projection folded in, so that it costs no launch of its own:
	// each query head's share of attn·woᵀ (wo [C, NH·HS] as MatMul's w, no
	// bias) is added to acc, [p.B, C] int64 in fixed point held as 2·p.B·C
	// I32 (ref.AttentionOutProj: the sum is the same whatever order the
	// heads arrive in). acc must be zero before; NormMatMulSum reads it and
	// ResMatMul zeroes it again. It returns false, enqueuing nothing, where
	// the backend has no folded kernel for these shapes or dtypes, or
	// folding measured slower (CUDA folds where its attention runs a
	// cluster per query head: SmolLM2, not distilgpt2): then run Attention
	// and MatMul.
	AttentionOutProj(acc, qkv, kc, vc, order, lens Buf, p AttnParams, wo Buf, C int) bool
	// NormMatMulSum: sum[N,C] = in + (accBias + unfix(acc)) (ref.SumAcc;
	// accBias optional), then out[N,OC] = act(norm(sum)·w[OC,C]ᵀ + bias)
	// = NormMatMul(out, sum, …) without accumulate (act NoAct or GeluAct).
	// sum must not overlap in.
	NormMatMulSum(out, sum, in, acc, accBias Buf, normW, normB, w, bias Buf, N, C, OC int, eps float32, norm NormKind, act Act)
	// ResMatMul: out[N,OC] = res + (x·w[OC,K]ᵀ + bias), x = in (NoAct) or
	// silu(in[:, :K])·in[:, K:2K] (SwiGLUAct, no bias) = res copied to out,
	// then MatMul or SwiGLUMatMul accumulating; clear (optional, an
	// AttentionOutProj accumulator of N·OC int64) is set to zero. res must
	// not overlap out.
	ResMatMul(out, res, in, w, bias, clear Buf, N, K, OC int, act Act)

	// MatMulLead = MatMul(out, in, w, bias, N, C, OC, accumulate): the
	// same bits, but (CUDA, one-token products) the next operation may
	// start before this one's input is ready. Only for a next operation
	// that reads nothing but weights until its input is ready: MLPAcc
	// (whose weights then load while the operation before this one still
	// runs) or a NormMatMul.
	MatMulLead(out, in, w, bias Buf, N, C, OC int)
	// MLPAcc adds a one-token MLP block without its residual to acc
	// ([N, C] int64 in fixed point held as 2·N·C I32, as AttentionOutProj's):
	// ref.MLPAcc, norm RMSNormKind with act SwiGLUAct (upW = gate|up rows,
	// no upB) or LayerNormKind with GeluAct; downB optional. clear
	// (optional, another accumulator of the same size) is set to zero. It
	// returns false, enqueuing nothing, where the backend has no one-launch
	// kernel for the shapes or dtypes, or it measured slower than two
	// products (CUDA: MLPs of more than 8 MiB of weights, distilgpt2's):
	// then run NormMatMul and the down product.
	MLPAcc(acc, clear, in, normW, normB, upW, upB, downW, downB Buf, N, C, F int, eps float32, norm NormKind, act Act) bool
	// MLPAccSum = SumAcc of in and inAcc (an AttentionOutProj
	// accumulator, no bias) into sum, then MLPAcc(acc, clear, sum, …): the
	// MLP block of a layer whose attention was folded, so that the output
	// projection costs no launch (CUDA: the Llama pairing only). Without
	// inAcc (and sum) it is MLPAcc. clear (optional, not overlapping acc or
	// inAcc) is set to zero whole, so that one launch can clear both
	// accumulators of the layer before. sum must not overlap in. False as
	// MLPAcc.
	MLPAccSum(acc, clear, sum, in, inAcc, normW, normB, upW, upB, downW, downB Buf, N, C, F int, eps float32, norm NormKind, act Act) bool
	// NormSum: out = LayerNorm (normB optional) or RMSNorm of in +
	// unfix(acc) (ref.SumAcc, then the norm), and acc ([N, C] int64 as
	// MLPAcc's) set to zero: the final norm of a one-token step whose last
	// MLP left its output in an accumulator. clear (optional, [N, C] int64,
	// not overlapping acc) is set to zero too: the last layer's attention
	// accumulator, which that MLP read. out must not overlap in.
	NormSum(out, in, acc, clear, normW, normB Buf, N, C int, eps float32, norm NormKind)
	// NormMatMulStoreSum: sum[N,C] = in + unfix(acc) (ref.SumAcc), then
	// NormMatMulStore(qkv, sum, …): the next layer's q|k|v product on the
	// residual stream an MLPAcc left in acc. sum must not overlap in.
	NormMatMulStoreSum(qkv, sum, in, acc, normW, normB, w, bias Buf, N, C int, eps float32, norm NormKind, st QKVStore)
}

// QKVStore says where NormMatMulStore's keys and values go and which heads
// it rotates (RopeStore's arguments).
type QKVStore struct {
	K, V, Pos, Slots       Buf // one layer's caches [S, NKV, HS]; per row: position, slot
	NH, NKV, HS, RopeHeads int
	Theta                  float32 // 0: no rotation
	// Lead lets the next operation, the decode attention, start before
	// this one's input is ready (CUDA, one-token products; the same
	// results), so that it gathers its older K/V rows early. Only where
	// the operation before this one writes none of what the attention
	// reads before its input is ready: the order, the lengths and the
	// cache rows but this step's (the runner: every layer but the first,
	// which may follow the realignment). The
	// operation before must also have had its own input ready before this
	// one started, as every decode operation but a leading one does; the
	// CUDA kernel then reads Pos and Slots before its input is ready.
	Lead bool
	// Tokens (I32, one a row) and Wte (the token embeddings, [V, C]):
	// AttentionBlock's stream is the rows' embeddings (wte[Tokens[b]], an
	// id outside the table a NaN row) instead of its input, which is not
	// read, nor is an MLP accumulator taken: the first layer embeds the
	// step's token itself (models without learned positions). Not with
	// Lead.
	Tokens, Wte Buf
}

// DecodeShape describes the model and batch a persistent decode plan runs:
// one new token for each of B sequences through all L layers.
type DecodeShape struct {
	B, L, C, NH, NKV, HS int
	FFN                  int // MLP width (Llama: gate and up each FFN wide)
	Slots, MaxLen        int // cache slots per layer; AttnParams.MaxLen
	Eps                  float32
	Norm                 NormKind
	Act                  Act     // GeluAct (GPT-2) or SwiGLUAct (Llama: up weights are gate|up)
	Theta                float32 // RoPE base, 0 for none
	// ShiftKeys: keys are cached unrotated and rotated at their cache index
	// when read (StreamingLLM's position shift); else rotated at their
	// position before they are cached.
	ShiftKeys bool
}

// DecodeLayer is one layer's weights (F16; biases and NormB may be absent)
// and its K/V caches [Slots, NKV, HS] as a decode plan reads them.
type DecodeLayer struct {
	Norm1W, Norm1B, QKVW, QKVB, OW, OB     Buf
	Norm2W, Norm2B, UpW, UpB, DownW, DownB Buf
	K, V                                   Buf
}

// DecodeBufs are the step's buffers: X [B, C] holds the embedded tokens and
// receives the last layer's output; QKV [B, (NH+2·NKV)·HS] and Act [B, FFN]
// are scratch; Pos, Slots [B], Order [B·MaxLen], Lens [B] as for
// Attention and QKVStore (T = 1: the new entry is the last of each order).
type DecodeBufs struct {
	X, QKV, Act             Buf
	Pos, Slots, Order, Lens Buf
}

// Decoder is implemented by backends with a persistent decode kernel: all
// layers of a one-token step in one launch, the phase boundaries of a layer
// being grid barriers instead of kernel boundaries (csrc/decode.cu). A
// plan's Run equals, layer by layer, NormMatMulStore, Attention, MatMul
// (accumulate) and the MLP's NormMatMul and MatMul / SwiGLUMatMul.
type Decoder interface {
	// NewDecodePlan checks the shape and buffers and prepares the plan
	// (allocations, so not while capturing). It fails with ErrNoDecodePlan
	// when the kernel does not take the shape; callers then run the layers
	// one operation at a time.
	NewDecodePlan(sh DecodeShape, layers []DecodeLayer, bufs DecodeBufs) (DecodePlan, error)
}

// DecodePlan runs the decode step it was made for.
type DecodePlan interface {
	Run() // enqueues the step (capturable)
	Close() error
}

// ErrNoDecodePlan: the persistent decode kernel does not take this shape or
// device.
var ErrNoDecodePlan = errors.New("gpu: the persistent decode kernel does not take this shape")
