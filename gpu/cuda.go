//go:build cuda

package gpu

/*
#cgo CFLAGS: -I${SRCDIR}/../csrc
#cgo LDFLAGS: -L${SRCDIR}/../csrc -lkvalign -L/usr/local/cuda/lib64 -lcudart_static -ldl -lrt -lpthread -lstdc++ -lm
#include "kvalign.h"
#include <stdlib.h>
*/
import "C"

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"github.com/x448/float16"
)

// CUDA is the backend over libkvalign.a on one GPU. Every operation is
// enqueued on one non-blocking stream; errors are sticky (see package doc).
// A CUDA value is not safe for concurrent use; several may coexist, one per
// device (it holds no global state).
//
// Threads. The CUDA runtime keeps the current device per OS thread (a new
// thread starts on device 0) and Go moves goroutines between threads at any
// cgo call. So every entry point goes through run, which locks the goroutine
// to its thread, makes c.device current (cudaSetDevice: a thread-local write
// when it already is) and then makes the one cgo call that enqueues work —
// set-device and launch must happen on the same thread, or a kernel could be
// launched into a stream of another device's context and fail. Capture keeps
// the goroutine locked for the whole capture, which also lets it use the
// thread-local capture mode (see kv_capture_begin).
type CUDA struct {
	device    int
	name      string
	smemOptin int // shared memory per block with opt-in, bytes (sampling stages rows in it)
	sms       int // multiprocessors (the screened LM head's blocks must all be resident to share a threshold)
	stream    C.kv_stream
	// ahead is the stream CopyInAhead copies on, aheadDone its event.
	ahead     C.kv_stream
	aheadDone C.kv_event
	err       error
	closed    bool
	capturing bool
	allocs    map[uintptr]int // base address → bytes of every live Alloc, freed by Close

	// sampleScratch holds the per-chunk candidate lists of the multi-block
	// sampler (csrc/sampling.cu v5): sampleScratchKeys 64-bit keys, as I32
	// pairs. Allocated once by NewCUDA, since Sample runs inside captures.
	sampleScratch Buf

	// attnScratch is split-K attention's partial-result buffer, grown
	// (outside capture) by cuda_attention.go through Alloc, so Close frees
	// it with every other live allocation.
	attnScratch Buf
}

// NewCUDA opens CUDA device number device (0-based) with its own stream.
func NewCUDA(device int) (Backend, error) {
	if device < 0 {
		return nil, &Error{Op: "cuda", Msg: fmt.Sprintf("invalid device number %d", device)}
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if s := C.kv_set_device(C.int(device)); s != 0 {
		return nil, cudaError("cuda", s, fmt.Sprintf("device %d", device))
	}
	var name [256]C.char
	var total C.size_t
	var sm, sms, smem C.int
	if s := C.kv_device_info(C.int(device), &name[0], C.int(len(name)), &total, &sm, &sms, &smem); s != 0 {
		return nil, cudaError("cuda", s, fmt.Sprintf("device %d", device))
	}
	if s := C.kv_sample_init(smem); s != 0 {
		return nil, cudaError("cuda", s, fmt.Sprintf("device %d: set up sampling kernels", device))
	}
	c := &CUDA{device: device, smemOptin: int(smem), sms: int(sms), allocs: map[uintptr]int{}}
	c.name = fmt.Sprintf("cuda:%d %s", device, C.GoString(&name[0]))
	if s := C.kv_stream_create(&c.stream); s != 0 {
		return nil, cudaError("cuda", s, "create stream on "+c.name)
	}
	if s := C.kv_stream_create(&c.ahead); s != 0 {
		C.kv_stream_destroy(c.stream)
		return nil, cudaError("cuda", s, "create stream on "+c.name)
	}
	if s := C.kv_event_create(&c.aheadDone); s != 0 {
		C.kv_stream_destroy(c.ahead)
		C.kv_stream_destroy(c.stream)
		return nil, cudaError("cuda", s, "create event on "+c.name)
	}
	// 4 MiB: B·ceil(V/512)·64 keys cover B ≤ 80 rows at V = 50k; bigger
	// batches fall back to one block per row, which fills the GPU anyway.
	if buf, err := c.Alloc(I32, 2*sampleScratchKeys); err == nil {
		c.sampleScratch = buf
	}
	return c, nil
}

// sampleScratchKeys is the size of CUDA.sampleScratch in 64-bit keys.
const sampleScratchKeys = 512 * 1024

func cudaError(op string, s C.kv_status, context string) *Error {
	msg := C.GoString(C.kv_error_string(s))
	if context != "" {
		msg = context + ": " + msg
	}
	return &Error{Op: op, Code: int(s), Msg: msg}
}

// dev is b's device address as a C pointer. Reading the uintptr through a
// pointer keeps go vet quiet (it is not Go memory, so the unsafe.Pointer
// rules about uintptr conversions do not apply) and cgocheck accepts it, as
// the address is outside the Go heap.
func dev(b Buf) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(&b.ptr)) }

// devF32 and devI32 are dev with the C element type; the zero Buf gives NULL.
func devF32(b Buf) *C.float   { return (*C.float)(dev(b)) }
func devI32(b Buf) *C.int32_t { return (*C.int32_t)(dev(b)) }

// f16 is the C flag of a weight-like operand's dtype.
func f16(b Buf) C.int { return cFlag(b.dt == F16) }

// cFlag is a Go bool as the int flag the C entry points take.
func cFlag(b bool) C.int {
	if b {
		return 1
	}
	return 0
}

// status records the first error (sticky) of the entry point op.
func (c *CUDA) status(op string, s C.kv_status) {
	if s != 0 && c.err == nil {
		c.err = cudaError(op, s, "")
	}
}

// fail records a Go-side error (bad arguments) of op, unless one is recorded.
func (c *CUDA) fail(op, format string, args ...any) {
	if c.err == nil {
		c.err = &Error{Op: op, Msg: fmt.Sprintf(format, args...)}
	}
}

// failed reports whether an error is recorded (operations become no-ops).
// A closed backend counts as failed, with an error saying so.
func (c *CUDA) failed() bool {
	if c.closed && c.err == nil {
		c.err = &Error{Op: "cuda", Msg: c.name + " used after Close"}
	}
	return c.err != nil
}

// run makes one cgo call, fn (a kv_ entry point enqueuing on c.stream), with
// c's device current on the calling OS thread, and records its status under
// op. Nothing happens after an earlier error. fn does not escape, so the
// closure costs no allocation.
func (c *CUDA) run(op string, fn func() C.kv_status) {
	if c.failed() {
		return
	}
	runtime.LockOSThread()
	if s := C.kv_set_device(C.int(c.device)); s != 0 {
		c.status(op, s)
	} else {
		c.status(op, fn())
	}
	runtime.UnlockOSThread()
}

// need records an argument error of op unless ok; it returns ok and false
// after any earlier error, so an operation reads
//
//	if !c.need("embed", out.dt == F32, "out is %v, want f32", out.dt) { return }
func (c *CUDA) need(op string, ok bool, format string, args ...any) bool {
	if c.failed() {
		return false
	}
	if !ok {
		c.fail(op, format, args...)
	}
	return ok
}

// needBuf checks that b has dtype one of dts and at least n elements.
func (c *CUDA) needBuf(op, name string, b Buf, n int, dts ...DType) bool {
	if c.failed() {
		return false
	}
	okType := false
	for _, d := range dts {
		okType = okType || b.dt == d
	}
	if !okType || b.ptr == 0 && n > 0 {
		c.fail(op, "%s is a %v buffer of %d (absent: %v), want %v", name, b.dt, b.n, b.ptr == 0, dts)
		return false
	}
	if b.n < n {
		c.fail(op, "%s has %d elements, want at least %d", name, b.n, n)
		return false
	}
	return true
}

func (c *CUDA) Name() string                 { return c.name }
func (c *CUDA) WeightDType(want DType) DType { return want }
func (c *CUDA) Err() error                   { return c.err }

// Alloc allocates n elements of dt on the device (cudaMalloc; synchronous,
// so not while capturing). The memory is not cleared.
func (c *CUDA) Alloc(dt DType, n int) (Buf, error) {
	if c.closed {
		return Buf{}, &Error{Op: "alloc", Msg: c.name + " used after Close"}
	}
	if dt != F32 && dt != F16 && dt != I32 {
		return Buf{}, &Error{Op: "alloc", Msg: "unknown dtype " + dt.String()}
	}
	if n < 0 {
		return Buf{}, &Error{Op: "alloc", Msg: fmt.Sprintf("negative size %d", n)}
	}
	if c.capturing {
		return Buf{}, &Error{Op: "alloc", Msg: "cannot allocate while capturing a CUDA graph (allocate before Capture)"}
	}
	if n == 0 {
		return Buf{dt: dt}, nil
	}
	bytes := n * dt.Size()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if s := C.kv_set_device(C.int(c.device)); s != 0 {
		return Buf{}, cudaError("alloc", s, c.name)
	}
	var p unsafe.Pointer
	if s := C.kv_malloc(&p, C.size_t(bytes)); s != 0 {
		var free, total C.size_t
		mem := "free memory unknown"
		if C.kv_mem_info(&free, &total) == 0 {
			mem = fmt.Sprintf("%d bytes (%.2f GiB) free of %d (%.2f GiB)", free, gib(int(free)), total, gib(int(total)))
		}
		return Buf{}, cudaError("alloc", s, fmt.Sprintf("cannot allocate %d bytes (%.2f GiB: %d × %v) on %s; %s",
			bytes, gib(bytes), n, dt, c.name, mem))
	}
	addr := uintptr(p)
	c.allocs[addr] = bytes
	return Buf{dt: dt, n: n, ptr: addr}, nil
}

func gib(b int) float64 { return float64(b) / (1 << 30) }

// Free releases a buffer returned by Alloc (not a View of it). It works after
// an earlier error too, so cleanup paths release memory. cudaFree waits for
// the device, so not while capturing.
func (c *CUDA) Free(b Buf) {
	if b.ptr == 0 || c.closed {
		return
	}
	if _, ok := c.allocs[b.ptr]; !ok {
		c.fail("free", "address %#x was not returned by Alloc (a View, or freed twice?)", b.ptr)
		return
	}
	if c.capturing {
		c.fail("free", "cannot free while capturing a CUDA graph")
		return
	}
	delete(c.allocs, b.ptr)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	s := C.kv_set_device(C.int(c.device))
	if s == 0 {
		s = C.kv_free(dev(b))
	}
	c.status("free", s)
}

// Close waits for the stream, frees every buffer still allocated and
// destroys the stream. Safe to call twice. Pinned HostInts and Replays are
// closed separately (each by its own Close).
func (c *CUDA) Close() error {
	if c.closed {
		return nil
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var first error
	keep := func(op string, s C.kv_status) {
		if s != 0 && first == nil {
			first = cudaError(op, s, c.name)
		}
	}
	keep("close", C.kv_set_device(C.int(c.device)))
	keep("close", C.kv_stream_sync(c.stream))
	if p := os.Getenv("KVALIGN_STAMPS"); p != "" {
		// In-kernel timestamps (csrc/stamps.cuh, scripts/stamps.py): only
		// a library built with `make -C csrc STAMPS=1` records them.
		cp := C.CString(p)
		if C.kv_stamps_write(cp) != 0 {
			fmt.Fprintf(os.Stderr, "KVALIGN_STAMPS: no timestamps written to %s (they need a kernel library built with make -C csrc STAMPS=1)\n", p)
		}
		C.free(unsafe.Pointer(cp))
	}
	for addr := range c.allocs {
		p := *(*unsafe.Pointer)(unsafe.Pointer(&addr))
		keep("close", C.kv_free(p))
	}
	clear(c.allocs)
	c.attnScratch = Buf{}
	c.sampleScratch = Buf{}
	keep("close", C.kv_event_destroy(c.aheadDone))
	keep("close", C.kv_stream_destroy(c.ahead))
	keep("close", C.kv_stream_destroy(c.stream))
	c.stream, c.ahead, c.aheadDone = nil, nil, nil
	c.closed = true
	return first
}

// Sync waits for all enqueued work and returns the first error, including
// asynchronous ones (a kernel fault surfaces here).
func (c *CUDA) Sync() error {
	if !c.need("sync", !c.capturing, "cannot Sync while capturing a CUDA graph") {
		return c.err
	}
	c.run("sync", func() C.kv_status { return C.kv_stream_sync(c.stream) })
	return c.err
}

// hostBytes is the address of a Go slice's first element for a C call that
// only uses it during the call (cgo pins it for that long).
func hostBytes[T any](s []T) unsafe.Pointer {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Pointer(&s[0])
}

// Upload copies min(len(src), dst.Len()) values to dst, converting to dst's
// dtype on the host (F16 through gpu.ToF16). Synchronous: ordered after the
// work already enqueued and finished when it returns.
func (c *CUDA) Upload(dst Buf, src []float32) {
	n := min(len(src), dst.n)
	if !c.needBuf("upload", "dst", dst, n, F32, F16) ||
		!c.need("upload", !c.capturing, "cannot Upload while capturing a CUDA graph (use CopyIn from HostInts)") || n == 0 {
		return
	}
	host := hostBytes(src[:n])
	if dst.dt == F16 {
		h := make([]uint16, n)
		ToF16(h, src[:n])
		host = hostBytes(h)
	}
	c.run("upload", func() C.kv_status {
		return C.kv_upload(c.stream, dev(dst), host, C.size_t(n*dst.dt.Size()))
	})
}

// UploadInts copies min(len(src), dst.Len()) ids to dst. Synchronous.
func (c *CUDA) UploadInts(dst Buf, src []int32) {
	n := min(len(src), dst.n)
	if !c.needBuf("upload", "dst", dst, n, I32) ||
		!c.need("upload", !c.capturing, "cannot UploadInts while capturing a CUDA graph (use CopyIn from HostInts)") || n == 0 {
		return
	}
	c.run("upload", func() C.kv_status {
		return C.kv_upload(c.stream, dev(dst), hostBytes(src), C.size_t(n*4))
	})
}

// Download copies min(len(dst), src.Len()) values to the host, widening F16.
// Synchronous: it waits for the work enqueued before it.
func (c *CUDA) Download(dst []float32, src Buf) {
	n := min(len(dst), src.n)
	if !c.needBuf("download", "src", src, n, F32, F16) ||
		!c.need("download", !c.capturing, "cannot Download while capturing a CUDA graph (use CopyOut to HostInts)") || n == 0 {
		return
	}
	if src.dt == F32 {
		c.run("download", func() C.kv_status {
			return C.kv_download(c.stream, hostBytes(dst), dev(src), C.size_t(n*4))
		})
		return
	}
	h := make([]uint16, n)
	c.run("download", func() C.kv_status {
		return C.kv_download(c.stream, hostBytes(h), dev(src), C.size_t(n*2))
	})
	if c.err == nil {
		for i, v := range h {
			dst[i] = float16.Frombits(v).Float32()
		}
	}
}

// DownloadInts copies min(len(dst), src.Len()) ids to the host. Synchronous.
func (c *CUDA) DownloadInts(dst []int32, src Buf) {
	n := min(len(dst), src.n)
	if !c.needBuf("download", "src", src, n, I32) ||
		!c.need("download", !c.capturing, "cannot DownloadInts while capturing a CUDA graph (use CopyOut to HostInts)") || n == 0 {
		return
	}
	c.run("download", func() C.kv_status {
		return C.kv_download(c.stream, hostBytes(dst), dev(src), C.size_t(n*4))
	})
}

// pinnedInts is the state of a cudaHostInts, behind a pointer so that the
// leak-reporting finalizer is attached to memory users never copy (the way
// os.File keeps *file).
type pinnedInts struct {
	p    unsafe.Pointer // cudaMallocHost memory; nil once closed
	ints []int32
	dev  int
}

// cudaHostInts is pinned host memory (cudaMallocHost) seen as []int32:
// asynchronous copies need it (Go memory may move), and a captured graph
// reads and writes it at the same address on every replay.
type cudaHostInts struct{ *pinnedInts }

func (h cudaHostInts) Ints() []int32 { return h.ints }

// Buf is the pinned memory at its device address (the same as the host's
// under unified addressing, which every 64-bit CUDA platform has): kernels
// write it over the bus, and the writes are visible to the host once the
// stream has been synchronised.
func (h cudaHostInts) Buf() Buf {
	if h.p == nil {
		return Buf{}
	}
	return Buf{dt: I32, n: len(h.ints), ptr: uintptr(h.p)}
}

// Close frees the pinned memory; safe to call twice. Close the Replays that
// copy to or from it first: a graph keeps the raw address.
func (h cudaHostInts) Close() error {
	if h.p == nil {
		return nil
	}
	runtime.SetFinalizer(h.pinnedInts, nil)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	s := C.kv_set_device(C.int(h.dev))
	if s == 0 {
		s = C.kv_free_host(h.p)
	}
	h.p, h.ints = nil, nil
	if s != 0 {
		return cudaError("hostints", s, "free pinned memory")
	}
	return nil
}

// NewHostInts allocates n pinned int32s (zeroed).
func (c *CUDA) NewHostInts(n int) (HostInts, error) {
	if c.closed {
		return nil, &Error{Op: "hostints", Msg: c.name + " used after Close"}
	}
	if n < 0 {
		return nil, &Error{Op: "hostints", Msg: fmt.Sprintf("negative size %d", n)}
	}
	if c.capturing {
		return nil, &Error{Op: "hostints", Msg: "cannot allocate while capturing a CUDA graph"}
	}
	h := cudaHostInts{&pinnedInts{dev: c.device}}
	if n == 0 {
		h.ints = []int32{}
		return h, nil
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	s := C.kv_set_device(C.int(c.device))
	if s == 0 {
		s = C.kv_malloc_host(&h.p, C.size_t(n*4))
	}
	if s != 0 {
		return nil, cudaError("hostints", s, fmt.Sprintf("cannot pin %d bytes of host memory", n*4))
	}
	h.ints = unsafe.Slice((*int32)(h.p), n)
	clear(h.ints)
	runtime.SetFinalizer(h.pinnedInts, func(p *pinnedInts) {
		if p.p != nil {
			// Only a report: freeing here could pull memory from under a
			// graph that still copies to it.
			fmt.Fprintf(os.Stderr, "kvalign: gpu: HostInts of %d ints was not closed (pinned memory leaked)\n", len(p.ints))
		}
	})
	return h, nil
}

func (c *CUDA) pinned(op string, h HostInts) (cudaHostInts, bool) {
	p, ok := h.(cudaHostInts)
	if !c.need(op, ok && p.pinnedInts != nil && p.p != nil, "host buffer %T is not open HostInts of this CUDA backend", h) {
		return cudaHostInts{}, false
	}
	return p, true
}

// CopyIn enqueues an asynchronous copy of min(len, len) ids from pinned host
// memory to dst; inside Capture it becomes a graph node that reads the host
// memory's contents at each replay.
func (c *CUDA) CopyIn(dst Buf, src HostInts) {
	p, ok := c.pinned("copyin", src)
	if !ok {
		return
	}
	n := min(len(p.ints), dst.n)
	if !c.needBuf("copyin", "dst", dst, n, I32) || n == 0 {
		return
	}
	c.run("copyin", func() C.kv_status { return C.kv_copy_in(c.stream, dev(dst), p.p, C.size_t(n*4)) })
}

// CopyInAhead copies src's ints [off, off+n) to the same ints of dst on a
// stream of its own, starting at once, and makes the work enqueued after
// it wait for the copy (see Backend).
func (c *CUDA) CopyInAhead(dst Buf, src HostInts, off, n int) {
	const op = "copyinahead"
	p, ok := c.pinned(op, src)
	if !ok || !c.need(op, !c.capturing, "cannot copy ahead while capturing a CUDA graph") ||
		!c.need(op, off >= 0 && n >= 0 && off+n <= len(p.ints), "ints [%d, %d) outside the %d staged", off, off+n, len(p.ints)) ||
		!c.needBuf(op, "dst", dst, off+n, I32) || n == 0 {
		return
	}
	c.run(op, func() C.kv_status {
		return C.kv_copy_in_ahead(c.stream, c.ahead, c.aheadDone, unsafe.Add(dev(dst), 4*off), unsafe.Add(p.p, 4*off), C.size_t(n*4))
	})
}

// CopyOut enqueues an asynchronous copy of min(len, len) ids from src to
// pinned host memory, valid after Sync.
func (c *CUDA) CopyOut(dst HostInts, src Buf) {
	p, ok := c.pinned("copyout", dst)
	if !ok {
		return
	}
	n := min(len(p.ints), src.n)
	if !c.needBuf("copyout", "src", src, n, I32) || n == 0 {
		return
	}
	c.run("copyout", func() C.kv_status { return C.kv_copy_out(c.stream, p.p, dev(src), C.size_t(n*4)) })
}

// cudaReplay is an instantiated CUDA graph launched on its backend's stream.
type cudaReplay struct {
	c *CUDA
	g C.kv_graph
}

// Run enqueues the graph; errors are the backend's (sticky).
func (r *cudaReplay) Run() {
	if r.g == nil {
		r.c.fail("replay", "Run after Close")
		return
	}
	r.c.run("replay", func() C.kv_status { return C.kv_graph_launch(r.c.stream, r.g) })
}

// Close destroys the graph; safe to call twice.
func (r *cudaReplay) Close() error {
	if r.g == nil {
		return nil
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	s := C.kv_set_device(C.int(r.c.device))
	if s == 0 {
		s = C.kv_graph_destroy(r.g)
	}
	r.g = nil
	if s != 0 {
		return cudaError("replay", s, "destroy graph")
	}
	return nil
}

// Capture records what fn enqueues on the stream as a CUDA graph. Nothing
// runs during the capture; Replay.Run launches the graph. fn must not
// allocate, free, Sync or make synchronous transfers (they fail with an
// error naming the call); an error of any operation inside fn is Capture's
// error (and stays recorded, as every error does).
func (c *CUDA) Capture(fn func()) (Replay, error) {
	if c.failed() {
		return nil, c.err
	}
	if c.capturing {
		c.fail("capture", "Capture inside Capture")
		return nil, c.err
	}
	// The goroutine stays on this OS thread from begin to end: the
	// thread-local capture mode requires it, and so does the current device.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if s := C.kv_set_device(C.int(c.device)); s != 0 {
		c.status("capture", s)
		return nil, c.err
	}
	if s := C.kv_capture_begin(c.stream); s != 0 {
		c.status("capture", s)
		return nil, c.err
	}
	var g C.kv_graph
	var end C.kv_status
	func() {
		c.capturing = true
		// Deferred so a panic in fn still ends the capture (the stream
		// would otherwise stay unusable).
		defer func() {
			c.capturing = false
			end = C.kv_capture_end(c.stream, &g)
		}()
		fn()
	}()
	if c.err == nil {
		c.status("capture", end)
	}
	if c.err != nil {
		if g != nil {
			C.kv_graph_destroy(g)
		}
		return nil, c.err
	}
	return &cudaReplay{c: c, g: g}, nil
}
