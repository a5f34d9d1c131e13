package align

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/kvalign/kvalign/internal/testenv"
	"github.com/kvalign/kvalign/transformer"
)

func TestLoadNetworkOriginals(t *testing.T) {
	for _, c := range originalNetworks {
		t.Run(c.name, func(t *testing.T) {
			path := testenv.Shared(t, "seed", "networks", c.name+".pth")
			n, meta, err := LoadNetwork(path)
			if err != nil {
				t.Fatal(err)
			}
			if meta != nil {
				t.Errorf("a .pth carries no metadata, got %+v", *meta)
			}
			got := [9]int{n.P, n.DP, n.L, n.DL, n.H, n.DH, n.HS, n.H1, n.H2}
			want := [9]int{256, 32, c.L, 4, c.H, 8, 64, c.H1, c.H2}
			if got != want {
				t.Errorf("sizes P,DP,L,DL,H,DH,HS,H1,H2 = %v, want %v", got, want)
			}
			if err := n.Check(c.L, c.H, 64, 250); err != nil {
				t.Errorf("Check for its own model: %v", err)
			}
		})
	}
}

func TestCheckRefusals(t *testing.T) {
	n := NewRandomNetwork(6, 12, 64, 256, 16, 8, 1)
	for _, c := range []struct {
		name                            string
		layers, heads, headSize, window int
		want                            []string // both sides must be named
	}{
		{"layers", 30, 12, 64, 100, []string{"6 layers", "has 30"}},
		{"heads", 6, 3, 64, 100, []string{"12 kv heads", "has 3"}},
		{"head size", 6, 12, 128, 100, []string{"head size 64", "head size is 128"}},
		{"window", 6, 12, 64, 257, []string{"window of 257", "up to 256", "0..255"}},
		{"negative window", 6, 12, 64, -1, []string{"-1"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := n.Check(c.layers, c.heads, c.headSize, c.window)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
	if err := n.Check(6, 12, 64, 256); err != nil {
		t.Errorf("window 256 = P must be accepted: %v", err)
	}
}

// networksUnderTest are a random network of odd sizes and, when the shared
// fixtures are present, the original distilgpt2 keys network.
func networksUnderTest(t *testing.T) map[string]*Network {
	nets := map[string]*Network{"random": NewRandomNetwork(3, 5, 7, 11, 13, 9, 42)}
	if d := testenv.SharedDir(); d != "" {
		path := filepath.Join(d, "seed", "networks", "keys_network_distilgpt2.pth")
		n, _, err := LoadNetwork(path)
		if err != nil {
			t.Fatal(err)
		}
		nets["keys_network_distilgpt2"] = n
	} else {
		t.Log("shared fixtures absent: testing a random network only")
	}
	return nets
}

// TestForwardMatchesRefAlign compares the literal one-row forward with the
// CPU reference kernel on a cache with padding between layers and a
// scattered slot list.
func TestForwardMatchesRefAlign(t *testing.T) {
	for name, n := range networksUnderTest(t) {
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(3, 4))
			const slotsInCache, entries, pad = 23, 9, 5
			L, NKV, HS := n.L, n.H, n.HS
			layerStride := slotsInCache*NKV*HS + pad
			cache := make([]float32, L*layerStride)
			for i := range cache {
				cache[i] = float32(rng.NormFloat64() * 3)
			}
			orig := slices.Clone(cache)
			perm := rng.Perm(slotsInCache)
			slots := make([]int32, entries)
			index := make([]int32, entries)
			for i := range entries {
				slots[i], index[i] = int32(perm[i]), int32(rng.IntN(n.P))
			}
			index[0], index[1] = 0, int32(n.P-1)

			ref.Align(cache, slots, index, n.Ref(), L, NKV, HS, layerStride)

			want := slices.Clone(orig)
			for l := range L {
				for i := range entries {
					for h := range NKV {
						off := l*layerStride + int(slots[i])*NKV*HS + h*HS
						n.Forward(orig[off:off+HS], int(index[i]), l, h, want[off:off+HS])
					}
				}
			}
			if d := testenv.RelErr(cache, want); d > 1e-5 {
				t.Errorf("ref.Align vs Forward: max|Δ|/max|ref| = %.3g > 1e-5", d)
			}
		})
	}
}

func TestSaveLoadRoundTrip(t *testing.T) {
	for name, n := range networksUnderTest(t) {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "net.safetensors")
			meta := Meta{Family: "distilgpt2", Layers: n.L, Heads: n.H, HeadSize: n.HS, StartSize: 4, MaxWindow: min(n.P, 250), Kind: "keys"}
			// Save twice: the second replaces the first in place.
			for range 2 {
				if err := n.Save(path, meta); err != nil {
					t.Fatal(err)
				}
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 1 {
				t.Errorf("directory holds %d files after saving, want only the network (temp files left behind?)", len(entries))
			}
			got, gotMeta, err := LoadNetwork(path)
			if err != nil {
				t.Fatal(err)
			}
			if gotMeta == nil || *gotMeta != meta {
				t.Errorf("meta %+v, want %+v", gotMeta, meta)
			}
			if [9]int{got.P, got.DP, got.L, got.DL, got.H, got.DH, got.HS, got.H1, got.H2} != [9]int{n.P, n.DP, n.L, n.DL, n.H, n.DH, n.HS, n.H1, n.H2} {
				t.Errorf("sizes changed: %+v", got)
			}
			gd, nd := got.data(), n.data()
			for i := range gd {
				if !slices.Equal(*gd[i], *nd[i]) {
					t.Errorf("tensor %s changed in the round trip", tensorNames[i])
				}
			}

			// The file is plain safetensors: header length, JSON, 8-byte aligned data.
			raw, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			hlen := binary.LittleEndian.Uint64(raw)
			var header map[string]json.RawMessage
			if err := json.Unmarshal(raw[8:8+hlen], &header); err != nil {
				t.Fatalf("header is not JSON: %v", err)
			}
			if hlen%8 != 0 || len(header) != len(tensorNames)+1 {
				t.Errorf("header length %d, %d entries", hlen, len(header))
			}
		})
	}
}

func TestSaveRefusesContradictoryMeta(t *testing.T) {
	n := NewRandomNetwork(6, 12, 64, 256, 16, 8, 1)
	path := filepath.Join(t.TempDir(), "net.safetensors")
	for _, m := range []Meta{{Layers: 30}, {Heads: 3}, {HeadSize: 128}, {MaxWindow: 300}, {Kind: "queries"}} {
		if err := n.Save(path, m); err == nil {
			t.Errorf("Save with %+v succeeded", m)
		} else if !strings.Contains(err.Error(), path) {
			t.Errorf("error %q does not name the file", err)
		}
	}
	if _, err := os.Stat(path); err == nil {
		t.Error("a refused Save left a file")
	}
}

// TestLoadNetworkRefusesBadFiles checks that damaged or foreign files are
// errors naming the file, never panics.
func TestLoadNetworkRefusesBadFiles(t *testing.T) {
	dir := t.TempDir()
	n := NewRandomNetwork(2, 2, 4, 8, 3, 3, 1)
	goodPath := filepath.Join(dir, "good.safetensors")
	if err := n.Save(goodPath, Meta{Kind: "values"}); err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(goodPath)
	if err != nil {
		t.Fatal(err)
	}
	hlen := binary.LittleEndian.Uint64(good)

	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// withHeader replaces the JSON header of the good file.
	withHeader := func(name string, edit func(h map[string]any)) string {
		var h map[string]any
		if err := json.Unmarshal(good[8:8+hlen], &h); err != nil {
			t.Fatal(err)
		}
		edit(h)
		hj, _ := json.Marshal(h)
		out := binary.LittleEndian.AppendUint64(nil, uint64(len(hj)))
		out = append(out, hj...)
		return write(name, append(out, good[8+hlen:]...))
	}
	entry := func(h map[string]any, name string) map[string]any { return h[name].(map[string]any) }

	foreign := []transformer.NamedTensor{{Name: "model.embed_tokens.weight", Shape: []int{2, 2}, F32: []float32{1, 2, 3, 4}}}
	foreignPath := filepath.Join(dir, "model.safetensors")
	if err := transformer.WriteSafeTensors(foreignPath, foreign, nil); err != nil {
		t.Fatal(err)
	}
	wrongShape := NewRandomNetwork(2, 2, 4, 8, 3, 3, 1)
	wrongShape.W3 = wrongShape.W3[:len(wrongShape.W3)-3]
	wrongShapePath := filepath.Join(dir, "wrong-shape.safetensors")
	tensors := make([]transformer.NamedTensor, len(tensorNames))
	for i, shape := range wrongShape.shapes() {
		tensors[i] = transformer.NamedTensor{Name: tensorNames[i], Shape: shape, F32: *wrongShape.data()[i]}
	}
	tensors[7].Shape = []int{3, 3} // fc3.weight [HS=3, H2] disagrees with fc3.bias [4]
	tensors[7].F32 = tensors[7].F32[:9]
	if err := transformer.WriteSafeTensors(wrongShapePath, tensors, nil); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name, path, want string
	}{
		{"empty", write("empty", nil), "too short"},
		{"garbage", write("garbage", []byte("garbage garbage garbage")), "header length"},
		{"truncated", write("truncated", good[:len(good)-10]), "data_offsets"},
		{"truncated header", write("trunc-header", good[:20]), "past the end"},
		{"bad json", write("bad-json", append(binary.LittleEndian.AppendUint64(nil, 4), "{{{{"...)), "invalid header JSON"},
		{"offsets past the end", withHeader("past", func(h map[string]any) {
			entry(h, tensorB3)["data_offsets"] = []int{0, 1 << 40}
		}), "data_offsets"},
		{"overlap", withHeader("overlap", func(h map[string]any) {
			entry(h, tensorB2)["data_offsets"] = entry(h, tensorB1)["data_offsets"] // both [3]
		}), "overlap"},
		{"dtype", withHeader("dtype", func(h map[string]any) { entry(h, tensorB3)["dtype"] = "I64" }), "I64"},
		{"negative shape", withHeader("neg", func(h map[string]any) { entry(h, tensorB3)["shape"] = []int{-4} }), "shape"},
		{"meta not JSON", withHeader("meta", func(h map[string]any) {
			h["__metadata__"] = map[string]string{metadataKey: "{"}
		}), "not valid JSON"},
		{"meta contradicts", withHeader("meta2", func(h map[string]any) {
			h["__metadata__"] = map[string]string{metadataKey: `{"layers": 30}`}
		}), "30 layers"},
		{"not a network", foreignPath, "no tensor emb_pos.weight"},
		{"inconsistent shapes", wrongShapePath, "fc3"},
		{"missing", filepath.Join(dir, "nope.safetensors"), "no such file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := LoadNetwork(c.path)
			if err == nil {
				t.Fatal("no error")
			}
			t.Log(err)
			msg := err.Error()
			if !strings.Contains(msg, c.path) || !strings.Contains(strings.ReplaceAll(msg, c.path, ""), c.want) {
				t.Errorf("error %q should name %s and say %q", err, c.path, c.want)
			}
		})
	}
}

// golden is what scripts/reference/align_golden.py writes.
type golden struct {
	Network   string         `json:"network"`
	Torch     string         `json:"torch"`
	Sizes     map[string]int `json:"sizes"`
	StateKeys []string       `json:"state_dict_keys"`
	Tensors   map[string]struct {
		Shape       []int   `json:"shape"`
		Sum         float64 `json:"sum"`
		AbsSum      float64 `json:"abs_sum"`
		First, Last float32
	} `json:"tensors"`
	Pos   []int       `json:"pos"`
	Layer []int       `json:"layer"`
	Head  []int       `json:"head"`
	X     [][]float32 `json:"x"`
	Out   [][]float32 `json:"out"`
}

// TestGoldenConformance runs the original networks, read by ReadPTH, on the
// inputs PyTorch ran them on, through both Forward and ref.Align.
func TestGoldenConformance(t *testing.T) {
	for _, c := range originalNetworks {
		t.Run(c.name, func(t *testing.T) {
			gpath := filepath.Join(testenv.Root(), "testdata", "align", c.name+".golden.json")
			raw, err := os.ReadFile(gpath)
			if err != nil {
				t.Skipf("no golden %s (%v): generate it where torch is installed with\n\tpython3 scripts/reference/align_golden.py --shared ../shared --out testdata/align", gpath, err)
			}
			var g golden
			if err := json.Unmarshal(raw, &g); err != nil {
				t.Fatalf("%s: %v", gpath, err)
			}
			n, _, err := LoadNetwork(testenv.Shared(t, "seed", "networks", c.name+".pth"))
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("golden from torch %s", g.Torch)

			// The .pth reader must see exactly the tensors torch.load saw.
			if !slices.Equal(g.StateKeys, tensorNames) {
				t.Errorf("golden state dict keys %v, want %v", g.StateKeys, tensorNames)
			}
			data := n.data()
			for i, name := range tensorNames {
				gt, ok := g.Tensors[name]
				if !ok {
					t.Errorf("golden lacks tensor %s", name)
					continue
				}
				var sum, abs float64
				for _, v := range *data[i] {
					sum += float64(v)
					abs += math.Abs(float64(v))
				}
				d := *data[i]
				if !equalInts(gt.Shape, n.shapes()[i]) || d[0] != gt.First || d[len(d)-1] != gt.Last ||
					math.Abs(sum-gt.Sum) > 1e-9*gt.AbsSum || math.Abs(abs-gt.AbsSum) > 1e-9*gt.AbsSum {
					t.Errorf("tensor %s: shape %v, first %v, last %v, Σ %.12g, Σ|·| %.12g; torch saw %v, %v, %v, %.12g, %.12g",
						name, n.shapes()[i], d[0], d[len(d)-1], sum, abs, gt.Shape, gt.First, gt.Last, gt.Sum, gt.AbsSum)
				}
			}

			rows := len(g.X)
			if rows == 0 || len(g.Out) != rows || len(g.Pos) != rows || len(g.Layer) != rows || len(g.Head) != rows {
				t.Fatalf("%s: inconsistent row counts", gpath)
			}
			HS := n.HS
			var want, viaForward, viaAlign []float32
			for r := range rows {
				if len(g.X[r]) != HS || len(g.Out[r]) != HS {
					t.Fatalf("%s: row %d has %d inputs, %d outputs, want %d", gpath, r, len(g.X[r]), len(g.Out[r]), HS)
				}
				if err := n.Check(n.L, n.H, HS, g.Pos[r]+1); err != nil || g.Pos[r] < 0 || g.Layer[r] < 0 || g.Layer[r] >= n.L || g.Head[r] < 0 || g.Head[r] >= n.H {
					t.Fatalf("%s: row %d: pos %d, layer %d, head %d out of range", gpath, r, g.Pos[r], g.Layer[r], g.Head[r])
				}
				out := make([]float32, HS)
				n.Forward(g.X[r], g.Pos[r], g.Layer[r], g.Head[r], out)
				viaForward = append(viaForward, out...)
				want = append(want, g.Out[r]...)

				// One cache per row: [L, 1 slot, H heads, HS], the row's
				// vector at its layer and head; Align realigns them all.
				cache := make([]float32, n.L*n.H*HS)
				off := (g.Layer[r]*n.H + g.Head[r]) * HS
				copy(cache[off:], g.X[r])
				ref.Align(cache, []int32{0}, []int32{int32(g.Pos[r])}, n.Ref(), n.L, n.H, HS, n.H*HS)
				viaAlign = append(viaAlign, cache[off:off+HS]...)
			}
			// fp32 paths hold 1e-5; an fp16 model's networks run on fp16
			// tensor cores (fp32 accumulation): 1e-3 of the largest output
			// (an H200 saw ≤ 3.3e-4).
			type check struct {
				name string
				got  []float32
				tol  float64
			}
			cpu := gpu.NewCPU()
			checks := []check{{"Forward", viaForward, 1e-5}, {"ref.Align", viaAlign, 1e-5},
				{"cpu Align", alignRowsOn(t, cpu, gpu.F32, n, g.X, g.Pos, g.Layer, g.Head), 1e-5},
				{"cpu Align (fp16 model: the CPU keeps fp32)", alignRowsOn(t, cpu, gpu.F16, n, g.X, g.Pos, g.Layer, g.Head), 1e-5}}
			for _, b := range gpuBackends() {
				be, err := gpu.NewCUDA(0)
				if err != nil {
					t.Fatal(err)
				}
				tol := 1e-5
				if b.dtype == gpu.F16 {
					tol = 1e-3
				}
				checks = append(checks, check{b.name + " Align", alignRowsOn(t, be, b.dtype, n, g.X, g.Pos, g.Layer, g.Head), tol})
				be.Close()
			}
			for _, c := range checks {
				d := testenv.RelErr(c.got, want)
				t.Logf("%s vs PyTorch: max|Δ|/max|ref| = %.3g", c.name, d)
				if d > c.tol {
					t.Errorf("%s differs from PyTorch by %.3g relative (> %g)", c.name, d, c.tol)
				}
			}
		})
	}
}

// BenchmarkAlignCPU is one decode step's realignment for distilgpt2 with a
// window of 250: 6 layers × 250 entries × 12 heads through the keys network.
func BenchmarkAlignCPU(b *testing.B) {
	const window = 250
	n := NewRandomNetwork(6, 12, 64, 256, 256, 64, 1)
	if d := testenv.SharedDir(); d != "" {
		if orig, _, err := LoadNetwork(filepath.Join(d, "seed", "networks", "keys_network_distilgpt2.pth")); err == nil {
			n = orig
		}
	}
	L, NKV, HS := n.L, n.H, n.HS
	layerStride := window * NKV * HS
	cache := make([]float32, L*layerStride)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range cache {
		cache[i] = float32(rng.NormFloat64())
	}
	slots := make([]int32, window)
	index := make([]int32, window)
	for i := range window {
		slots[i], index[i] = int32(i), int32(i)
	}
	net := n.Ref()
	rows := L * window * NKV
	b.SetBytes(int64(2 * rows * HS * 4)) // every head vector read and written
	b.ResetTimer()
	for range b.N {
		ref.Align(cache, slots, index, net, L, NKV, HS, layerStride)
	}
	b.ReportMetric(float64(rows*b.N)/b.Elapsed().Seconds(), "rows/s")
}

func ExampleNetwork_Check() {
	n := NewRandomNetwork(6, 12, 64, 256, 256, 64, 1)
	fmt.Println(n.Check(30, 3, 64, 250))
	// Output: realignment network has 6 layers (emb_blocks), but the model has 30
}

// alignRowsOn realigns each row x[r] (at its window index, layer and head)
// through a backend's Align, one cache slot per row, all rows in one call,
// with the network uploaded for a model of weights dt.
func alignRowsOn(t *testing.T, be gpu.Backend, dt gpu.DType, n *Network, x [][]float32, pos, layer, head []int) []float32 {
	t.Helper()
	rows, HS := len(x), n.HS
	layerStride := rows * n.H * HS
	host := make([]float32, n.L*layerStride)
	slots, index := make([]int32, rows), make([]int32, rows)
	for r := range rows {
		copy(host[layer[r]*layerStride+(r*n.H+head[r])*HS:], x[r])
		slots[r], index[r] = int32(r), int32(pos[r])
	}
	dev, err := (&Pair{Keys: n, Values: n}).Upload(be, dt)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if want := be.WeightDType(dt); dev.Precision() != want {
		t.Fatalf("%s, %v model: networks run in %v, want %v", be.Name(), dt, dev.Precision(), want)
	}
	cache, _ := be.Alloc(gpu.F32, len(host))
	sb, _ := be.Alloc(gpu.I32, rows)
	ib, _ := be.Alloc(gpu.I32, rows)
	defer func() { be.Free(cache); be.Free(sb); be.Free(ib) }()
	be.Upload(cache, host)
	be.UploadInts(sb, slots)
	be.UploadInts(ib, index)
	be.Align(cache, sb, ib, &dev.keys, gpu.AlignParams{Rows: rows, L: n.L, NKV: n.H, HS: HS, LayerStride: layerStride})
	be.Download(host, cache)
	if err := be.Sync(); err != nil {
		t.Fatal(err)
	}
	var out []float32
	for r := range rows {
		off := layer[r]*layerStride + (r*n.H+head[r])*HS
		out = append(out, host[off:off+HS]...)
	}
	return out
}
