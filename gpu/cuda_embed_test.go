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

// TestCUDACopyInEmbed: the fused copy and embedding against CopyIn + ref.Embed,
// directly and as a graph replayed with new host contents each time (the
// kernel must read the pinned block at each replay), with 16-byte aligned
// and misaligned destinations, with and without wpe, and with more rows or
// ids outside the copied block (the unfused fallbacks).
func TestCUDACopyInEmbed(t *testing.T) {
	c := newTestCUDA(t)
	r := rand.New(rand.NewPCG(12, 13))
	const V, P, n = 37, 19, 103 // n: not a multiple of 4 (the copy's tail)
	host, err := c.NewHostInts(n)
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	block := alloc(t, c, I32, n+1)
	fill := func(N, tokOff, posOff int) {
		h := host.Ints()
		for i := range h {
			h[i] = int32(r.IntN(1 << 20))
		}
		for i := 0; i < N; i++ {
			h[tokOff+i] = int32(r.IntN(V))
			h[posOff+i] = int32(r.IntN(P))
		}
	}
	for _, tc := range []struct {
		name                    string
		N, C, shift, tok, pos   int
		withPos, separateTokens bool
	}{
		{name: "aligned", N: 3, C: 67, tok: 5, pos: 40, withPos: true},
		{name: "misaligned", N: 2, C: 600, shift: 1, tok: 0, pos: 97, withPos: true},
		{name: "no wpe", N: 1, C: 768, tok: 102, pos: 0},
		{name: "many rows", N: 12, C: 64, tok: 30, pos: 60, withPos: true}, // the copy engine, then the embedding
		{name: "ids elsewhere", N: 2, C: 64, tok: 10, pos: 20, withPos: true, separateTokens: true},
	} {
		dst := block.View(tc.shift, n)
		tokens, pos := dst.View(tc.tok, tc.N), dst.View(tc.pos, tc.N)
		if tc.separateTokens {
			tokens = alloc(t, c, I32, tc.N)
		}
		wteHost, wpeHost := randNormal(r, V*tc.C, 1, 0), randNormal(r, P*tc.C, 0.5, 0)
		for _, dt := range weightTypes {
			wte := uploadNew(t, c, dt, wteHost)
			wpe, wpeRef := Buf{}, []float32(nil)
			if tc.withPos {
				wpe, wpeRef = uploadNew(t, c, dt, wpeHost), asWeight(dt, wpeHost)
			}
			out := alloc(t, c, F32, tc.N*tc.C)
			check := func(what string) {
				h := append([]int32(nil), host.Ints()...)
				if got := downloadInts(t, c, dst); !slices.Equal(got, h) {
					t.Fatalf("%s %s %s: the copied block differs from the host's", tc.name, dt, what)
				}
				ids := h[tc.tok : tc.tok+tc.N]
				if tc.separateTokens {
					ids = downloadInts(t, c, tokens)
				}
				want := make([]float32, tc.N*tc.C)
				ref.Embed(want, asWeight(dt, wteHost), wpeRef, ids, h[tc.pos:tc.pos+tc.N], tc.N, tc.C)
				compare(t, tc.name+" "+dt.String()+" "+what, download(t, c, out), want, 0, 0)
			}
			if tc.separateTokens {
				c.UploadInts(tokens, randInts(r, tc.N, V))
			}
			fill(tc.N, tc.tok, tc.pos)
			poison(t, c, out)
			c.CopyInEmbed(dst, host, out, wte, wpe, tokens, pos, tc.N, tc.C)
			checkOK(t, c)
			check("direct")
			rep, err := c.Capture(func() { c.CopyInEmbed(dst, host, out, wte, wpe, tokens, pos, tc.N, tc.C) })
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 3; i++ {
				fill(tc.N, tc.tok, tc.pos)
				poison(t, c, out)
				rep.Run()
				checkOK(t, c)
				check(fmt.Sprintf("replay %d", i))
			}
			if err := rep.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
}
