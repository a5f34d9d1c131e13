//go:build cuda

package gpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/kvalign/kvalign/gpu/ref"
)

func TestCUDAEmbed(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(10, 11))
	const V, P, N, C = 37, 19, 13, 67
	wteHost, wpeHost := randNormal(r, V*C, 1, 0), randNormal(r, P*C, 0.5, 0)
	tokens, pos := randInts(r, N, V), randInts(r, N, P)
	tok, ps := uploadInts(t, c, tokens), uploadInts(t, c, pos)
	out := alloc(t, c, F32, N*C)
	for _, dt := range weightTypes {
		wte, wpe := uploadNew(t, c, dt, wteHost), uploadNew(t, c, dt, wpeHost)
		for _, withPos := range []bool{true, false} {
			want := make([]float32, N*C)
			wp, wpRef := Buf{}, []float32(nil)
			if withPos {
				wp, wpRef = wpe, asWeight(dt, wpeHost)
			}
			ref.Embed(want, asWeight(dt, wteHost), wpRef, tokens, pos, N, C)
			poison(t, c, out)
			c.Embed(out, wte, wp, tok, ps, N, C)
			checkOK(t, c)
			compare(t, "embed "+dt.String(), download(t, c, out), want, 0, 0)
		}
	}
	// An id outside the table gives a NaN row, not a fault.
	bad := uploadInts(t, c, []int32{V + 5})
	wte := uploadNew(t, c, F32, wteHost)
	c.Embed(out, wte, Buf{}, bad, Buf{}, 1, C)
	checkOK(t, c)
	if got := download(t, c, out); !math.IsNaN(float64(got[0])) || !math.IsNaN(float64(got[C-1])) {
		t.Errorf("out-of-range token: row starts %v, want NaN", got[0])
	}
}

func BenchmarkCUDAEmbed(b *testing.B) {
	c := newTestCUDA(b)
	r := rand.New(rand.NewPCG(12, 13))
	const V, N, C = 50257, 1, 768
	wte := uploadNew(b, c, F16, randNormal(r, V*C, 1, 0))
	wpe := uploadNew(b, c, F16, randNormal(r, 1024*C, 1, 0))
	tok, pos := uploadInts(b, c, randInts(r, N, V)), uploadInts(b, c, randInts(r, N, 1024))
	out := alloc(b, c, F32, N*C)
	benchGraph(b, c, int64(N*C*(2+2+4)), func() {
		c.Embed(out, wte, wpe, tok, pos, N, C)
	})
}

// TestCUDACopyInAhead: the copy ahead lands exactly ints [off, off+n) of
// the block (the rest keep their contents), and a graph enqueued after it
// reads them (an embedding of the ids). A copy past the staged ints is
// refused.
func TestCUDACopyInAhead(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(12, 13))
	const V, C, n = 37, 67, 103
	host, err := c.NewHostInts(n)
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	block := alloc(t, c, I32, n)
	wteHost := randNormal(r, V*C, 1, 0)
	wte := uploadNew(t, c, F32, wteHost)
	out := alloc(t, c, F32, 4*C)
	rep, err := c.Capture(func() { c.Embed(out, wte, Buf{}, block.View(50, 4), Buf{}, 4, C) })
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	for i, tc := range []struct{ off, k int }{{0, n}, {50, 4}, {47, 56}, {50, 53}} {
		before := randInts(r, n, V)
		c.UploadInts(block, before)
		h := host.Ints()
		for j := range h {
			h[j] = int32(r.IntN(V))
		}
		poison(t, c, out)
		c.CopyInAhead(block, host, tc.off, tc.k)
		rep.Run() // the step after the copy reads the new ids
		checkOK(t, c)
		want := append([]int32(nil), before...)
		copy(want[tc.off:tc.off+tc.k], h[tc.off:tc.off+tc.k])
		if got := downloadInts(t, c, block); !slices.Equal(got, want) {
			t.Fatalf("case %d: the block after copying [%d, %d) ahead differs", i, tc.off, tc.off+tc.k)
		}
		emb := make([]float32, 4*C)
		ref.Embed(emb, wteHost, nil, want[50:54], nil, 4, C)
		compare(t, fmt.Sprintf("case %d: the embedding after the copy", i), download(t, c, out), emb, 0, 0)
	}
	c.CopyInAhead(block, host, n-2, 3)
	if c.Err() == nil {
		t.Fatal("a copy past the staged ints was accepted")
	}
}
