//go:build cuda

package gpu

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/x448/float16"
)

// Test helpers shared by every gpu/cuda_*_test.go file.

// newTestCUDA opens device 0 (skipping the test when there is none) and
// closes it when the test ends.
func newTestCUDA(tb testing.TB) *CUDA {
	tb.Helper()
	be, err := NewCUDA(0)
	if err != nil {
		tb.Skipf("no CUDA device: %v", err)
	}
	c := be.(*CUDA)
	tb.Cleanup(func() {
		if err := c.Close(); err != nil {
			tb.Errorf("close: %v", err)
		}
	})
	return c
}

// checkOK fails the test now if the backend recorded an error.
func checkOK(tb testing.TB, c *CUDA) {
	tb.Helper()
	if err := c.Sync(); err != nil {
		tb.Fatal(err)
	}
}

func alloc(tb testing.TB, c *CUDA, dt DType, n int) Buf {
	tb.Helper()
	b, err := c.Alloc(dt, n)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// uploadNew allocates a buffer of dt holding vals (converted to dt).
func uploadNew(tb testing.TB, c *CUDA, dt DType, vals []float32) Buf {
	tb.Helper()
	b := alloc(tb, c, dt, len(vals))
	c.Upload(b, vals)
	checkOK(tb, c)
	return b
}

func uploadInts(tb testing.TB, c *CUDA, vals []int32) Buf {
	tb.Helper()
	b := alloc(tb, c, I32, len(vals))
	c.UploadInts(b, vals)
	checkOK(tb, c)
	return b
}

func download(tb testing.TB, c *CUDA, b Buf) []float32 {
	tb.Helper()
	out := make([]float32, b.Len())
	c.Download(out, b)
	checkOK(tb, c)
	return out
}

func downloadInts(tb testing.TB, c *CUDA, b Buf) []int32 {
	tb.Helper()
	out := make([]int32, b.Len())
	c.DownloadInts(out, b)
	checkOK(tb, c)
	return out
}

// poison fills b with NaN (float buffers) or a large negative id, so an
// element a kernel forgot to write shows up in compare.
func poison(tb testing.TB, c *CUDA, b Buf) {
	tb.Helper()
	if b.DType() == I32 {
		v := make([]int32, b.Len())
		for i := range v {
			v[i] = -999999
		}
		c.UploadInts(b, v)
	} else {
		v := make([]float32, b.Len())
		for i := range v {
			v[i] = float32(math.NaN())
		}
		c.Upload(b, v)
	}
	checkOK(tb, c)
}

// compare fails unless |got−want| ≤ atol + rtol·|want| everywhere (NaN in
// got fails unless want is NaN), reporting at most five mismatches.
func compare(tb testing.TB, name string, got, want []float32, atol, rtol float64) {
	tb.Helper()
	if len(got) != len(want) {
		tb.Fatalf("%s: %d values, want %d", name, len(got), len(want))
	}
	bad, worst := 0, 0.0
	var msgs []string
	for i := range want {
		g, w := float64(got[i]), float64(want[i])
		if math.IsNaN(w) && math.IsNaN(g) {
			continue
		}
		d := math.Abs(g - w)
		if !(d <= atol+rtol*math.Abs(w)) {
			bad++
			if len(msgs) < 5 {
				msgs = append(msgs, fmt.Sprintf("[%d] got %v want %v (diff %.3g)", i, g, w, d))
			}
		}
		if d > worst {
			worst = d
		}
	}
	if bad > 0 {
		tb.Errorf("%s: %d of %d values differ (atol %g, rtol %g):\n  %s", name, bad, len(want), atol, rtol, strings.Join(msgs, "\n  "))
	} else if testing.Verbose() {
		tb.Logf("%s: %d values match, max |diff| %.3g", name, len(want), worst)
	}
}

func randNormal(r *rand.Rand, n int, scale, shift float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64())*scale + shift
	}
	return v
}

func randInts(r *rand.Rand, n, hi int) []int32 {
	v := make([]int32, n)
	for i := range v {
		v[i] = int32(r.IntN(hi))
	}
	return v
}

// asWeight rounds vals to what a buffer of dt stores, so the reference sees
// the same fp16 weights the kernel reads.
func asWeight(dt DType, vals []float32) []float32 {
	if dt != F16 {
		return vals
	}
	out := make([]float32, len(vals))
	for i, v := range vals {
		out[i] = float16.Fromfloat32(v).Float32()
	}
	return out
}

var weightTypes = []DType{F32, F16}

// ---- runtime tests ----

func TestCUDAName(t *testing.T) {
	c := newTestCUDA(t)
	if !strings.HasPrefix(c.Name(), "cuda:0 ") || len(c.Name()) < 10 {
		t.Errorf("name %q, want \"cuda:0 <device>\"", c.Name())
	}
	t.Logf("device: %s", c.Name())
	if c.WeightDType(F16) != F16 || c.WeightDType(F32) != F32 {
		t.Error("WeightDType must return what is asked for")
	}
}

func TestCUDATransfers(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(1, 2))
	vals := randNormal(r, 1001, 2, 0)
	for _, dt := range weightTypes {
		compare(t, "roundtrip "+dt.String(), download(t, c, uploadNew(t, c, dt, vals)), asWeight(dt, vals), 0, 0)
	}
	ids := randInts(r, 777, 1<<30)
	got := downloadInts(t, c, uploadInts(t, c, ids))
	for i := range ids {
		if got[i] != ids[i] {
			t.Fatalf("ints[%d] = %d, want %d", i, got[i], ids[i])
		}
	}
	// A view moves only its part.
	b := uploadNew(t, c, F32, vals)
	c.Upload(b.View(10, 5), []float32{1, 2, 3, 4, 5})
	all := download(t, c, b)
	want := append([]float32(nil), vals...)
	copy(want[10:15], []float32{1, 2, 3, 4, 5})
	compare(t, "view upload", all, want, 0, 0)
	// Wrong dtypes are errors, not crashes.
	c.UploadInts(b, ids)
	var e *Error
	if err := c.Err(); !errors.As(err, &e) || e.Op != "upload" {
		t.Errorf("UploadInts into f32: error %v, want a *gpu.Error of upload", err)
	}
}

func TestCUDAAllocOutOfMemory(t *testing.T) {
	c := newTestCUDA(t)
	_, err := c.Alloc(F32, 1<<40)
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("Alloc(1<<40 floats): error %v, want *gpu.Error", err)
	}
	if !strings.Contains(e.Msg, "4398046511104 bytes") || !strings.Contains(e.Msg, "free") || e.Code == 0 {
		t.Errorf("error %q: want the byte count asked for, the free memory and the CUDA code", err)
	}
	t.Logf("OOM error: %v", err)
	// The failure must not leak into the next operation's status.
	if c.Err() != nil {
		t.Fatalf("Alloc failure became sticky: %v", c.Err())
	}
	x := uploadNew(t, c, F32, []float32{1, -1, 2})
	c.GeluNew(x, 3)
	checkOK(t, c)
}

func TestCUDACloseTwice(t *testing.T) {
	be, err := NewCUDA(0)
	if err != nil {
		t.Skipf("no CUDA device: %v", err)
	}
	c := be.(*CUDA)
	b := alloc(t, c, F32, 1000)
	h, err := c.NewHostInts(16)
	if err != nil {
		t.Fatal(err)
	}
	c.Free(b.View(1, 2)) // not a base address: an error, not a crash
	if c.Err() == nil {
		t.Error("Free of a view: no error")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatalf("second HostInts Close: %v", err)
	}
	if _, err := c.Alloc(F32, 10); err == nil {
		t.Error("Alloc after Close: no error")
	}
	c.GeluNew(b, 10) // a no-op with an error
	if c.Sync() == nil {
		t.Error("Sync after Close: no error")
	}
}

func TestCUDAMultipleBackends(t *testing.T) {
	a, b := newTestCUDA(t), newTestCUDA(t)
	x := uploadNew(t, a, F32, []float32{1, 2, 3})
	y := uploadNew(t, b, F32, []float32{4, 5, 6})
	a.GeluNew(x, 3)
	b.GeluNew(y, 3)
	checkOK(t, a)
	checkOK(t, b)
	want := []float32{1, 2, 3, 4, 5, 6}
	ref.GeluNew(want)
	compare(t, "a", download(t, a, x), want[:3], 1e-6, 1e-6)
	compare(t, "b", download(t, b, y), want[3:], 1e-6, 1e-6)
}

// TestCUDACaptureReplay captures CopyIn → Embed → Sample → CopyOut once and
// replays it with new token ids and counters written to pinned memory
// between replays, checking each result against the reference.
func TestCUDACaptureReplay(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(3, 4))
	const V, C, B, topK = 53, 301, 2, 7 // the embedded rows are the logits (vocabulary C)
	wteHost := randNormal(r, V*C, 2, 0)
	wte := uploadNew(t, c, F32, wteHost)
	in, err := c.NewHostInts(2 * B) // tokens, then counters
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	outHost, err := c.NewHostInts(B)
	if err != nil {
		t.Fatal(err)
	}
	defer outHost.Close()
	ids := alloc(t, c, I32, 2*B)
	rows := alloc(t, c, F32, B*C)
	picks := alloc(t, c, I32, B)
	p := SampleParams{B: B, V: C, TopK: topK, Seed: 99}
	rep, err := c.Capture(func() {
		c.CopyIn(ids, in)
		c.Embed(rows, wte, Buf{}, ids.View(0, B), Buf{}, B, C)
		c.Sample(picks, rows, Buf{}, ids.View(B, B), p)
		c.CopyOut(outHost, picks)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	for step := 0; step < 20; step++ {
		h := in.Ints()
		for b := 0; b < B; b++ {
			h[b] = int32(r.IntN(V))
			h[B+b] = int32(step*B + b)
		}
		rep.Run()
		checkOK(t, c)
		logits := make([]float32, B*C)
		ref.Embed(logits, wteHost, nil, h[:B], nil, B, C)
		want := make([]int32, B)
		ref.Sample(want, logits, nil, h[B:], B, C, topK, 0, 99, nil)
		for b := 0; b < B; b++ {
			if got := outHost.Ints()[b]; got != want[b] {
				t.Errorf("step %d row %d: sampled %d, want %d", step, b, got, want[b])
			}
		}
	}
	if err := rep.Close(); err != nil {
		t.Fatal(err)
	}
	if err := rep.Close(); err != nil {
		t.Fatalf("second Replay Close: %v", err)
	}
}

func TestCUDACaptureErrors(t *testing.T) {
	c := newTestCUDA(t)
	x := uploadNew(t, c, F32, []float32{1, 2})
	_, err := c.Capture(func() {
		c.GeluNew(x, 2)
		c.Sync() // not allowed inside a capture
	})
	if err == nil || !strings.Contains(err.Error(), "capturing") {
		t.Errorf("Sync inside Capture: error %v, want one about capturing", err)
	}
	d := newTestCUDA(t)
	y := uploadNew(t, d, F32, []float32{1, 2})
	_, err = d.Capture(func() {
		d.GeluNew(y, 3) // out of range: an argument error inside the capture
	})
	if err == nil {
		t.Error("bad argument inside Capture: no error")
	}
	t.Logf("capture errors: %v / %v", c.Err(), err)
}

// benchGraph times fn through a CUDA graph of ten copies of it, so the
// numbers are device time per call (kernel plus graph-node overhead, what a
// captured decode step pays) rather than host launch cost. bytes is what one
// call moves; ns/call is reported besides ns/op (which covers ten calls).
func benchGraph(b *testing.B, c *CUDA, bytes int64, fn func()) {
	b.Helper()
	const copies = 10
	rep, err := c.Capture(func() {
		for i := 0; i < copies; i++ {
			fn()
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	defer rep.Close()
	rep.Run() // warm-up: first launch uploads the graph
	checkOK(b, c)
	b.SetBytes(bytes * copies)
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		rep.Run()
	}
	checkOK(b, c)
	b.ReportMetric(float64(time.Since(start).Nanoseconds())/float64(b.N*copies), "ns/call")
}

// BenchmarkCUDAGraphReplay measures a replay of a small captured step (ten
// RMSNorms of one 768-wide row), i.e. the per-step launch overhead a graph
// leaves.
func BenchmarkCUDAGraphReplay(b *testing.B) {
	c := newTestCUDA(b)
	r := rand.New(rand.NewPCG(5, 6))
	x := uploadNew(b, c, F32, randNormal(r, 768, 1, 0))
	y := alloc(b, c, F32, 768)
	w := uploadNew(b, c, F16, randNormal(r, 768, 1, 1))
	rep, err := c.Capture(func() {
		for i := 0; i < 5; i++ {
			c.RMSNorm(y, x, w, 1, 768, 1e-5)
			c.RMSNorm(x, y, w, 1, 768, 1e-5)
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	defer rep.Close()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		rep.Run()
	}
	checkOK(b, c)
}

// AlignedOffset finds the first element of a device buffer on a boundary,
// for both element sizes, and leaves host offsets alone.
func TestCUDAAlignedOffset(t *testing.T) {
	c := newTestCUDA(t)
	dev, err := c.Alloc(F32, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Free(dev)
	for _, dt := range []DType{F32, F16, I32} {
		b, err := c.Alloc(dt, 1<<17)
		if err != nil {
			t.Fatal(err)
		}
		for _, off := range []int{0, 1, 3, 1000, 40000} {
			for _, align := range []int{256, 4096, 64 << 10} {
				a := b.AlignedOffset(off, align)
				addr := b.View(a, 1).ptr
				if a < off || a-off >= align/dt.Size() || addr%uintptr(align) != 0 {
					t.Fatalf("%v buffer at %#x: AlignedOffset(%d, %d) = %d, address %#x", dt, b.ptr, off, align, a, addr)
				}
			}
		}
		c.Free(b)
	}
	h, err := NewCPU().Alloc(I32, 100)
	if err != nil {
		t.Fatal(err)
	}
	if got := h.AlignedOffset(3, 64<<10); got != 3 || h.OnDevice() || !dev.OnDevice() {
		t.Fatalf("host buffer: AlignedOffset(3, 64 KB) = %d, OnDevice %v", got, h.OnDevice())
	}
}
