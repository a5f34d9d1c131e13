// Package align implements KV-Align's realignment networks: the small MLPs
// that, after the cache evicts an entry, rewrite each remaining key or value
// head vector as if it had been computed at its new position in the window.
package align

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"strings"

	"github.com/kvalign/kvalign/gpu/ref"
	"github.com/kvalign/kvalign/transformer"
)

// Network is one realignment network (keys or values), in the layout of the
// original PyTorch module:
//
//	x' = x + fc3(relu(fc2(relu(fc1(cat[x, Pos[p], Layer[b], Head[h]])))))
//
// where x is an HS-dimensional head vector, p the entry's index in the
// recent window, b the layer and h the kv head. Linear weights are row-major
// [out, in] like torch.nn.Linear.
type Network struct {
	Pos   []float32 // [P, DP]  emb_pos.weight; P = largest window index supported + 1
	Layer []float32 // [L, DL]  emb_blocks.weight
	Head  []float32 // [H, DH]  emb_heads.weight
	// fc1 [H1, HS+DP+DL+DH], [H1]; fc2 [H2, H1], [H2]; fc3 [HS, H2], [HS].
	W1, B1, W2, B2, W3, B3 []float32

	P, DP, L, DL, H, DH, HS, H1, H2 int
}

// Meta describes what a network was trained for. It travels in the header of
// kvalign's network files; an original .pth file carries none.
type Meta struct {
	Family    string `json:"family"`     // the model it was trained on, e.g. "distilgpt2", "smollm2"
	Layers    int    `json:"layers"`     // model layers
	Heads     int    `json:"heads"`      // model kv heads
	HeadSize  int    `json:"head_size"`  // model head size
	StartSize int    `json:"start_size"` // attention-sink entries kept at the start of the cache
	MaxWindow int    `json:"max_window"` // largest recent window it was trained for
	Kind      string `json:"kind"`       // "keys" or "values"
}

// Pair is the two networks KV-Align runs after every eviction.
type Pair struct {
	Keys, Values *Network
	Meta         Meta
}

// The state-dict names of the original module, in its registration order
// (kvalign's files use the same names and order).
const (
	tensorPos   = "emb_pos.weight"
	tensorLayer = "emb_blocks.weight"
	tensorHead  = "emb_heads.weight"
	tensorW1    = "fc1.weight"
	tensorB1    = "fc1.bias"
	tensorW2    = "fc2.weight"
	tensorB2    = "fc2.bias"
	tensorW3    = "fc3.weight"
	tensorB3    = "fc3.bias"
	metadataKey = "kvalign" // __metadata__ entry holding Meta as JSON
)

var tensorNames = []string{tensorPos, tensorLayer, tensorHead, tensorW1, tensorB1, tensorW2, tensorB2, tensorW3, tensorB3}

// LoadNetwork reads a realignment network from an original KV-Align .pth
// checkpoint (Meta is then nil: the file does not say what it was trained
// for) or from a kvalign .safetensors file written by Save (Meta from its
// header, nil if absent). The format is recognised by content, not name.
func LoadNetwork(path string) (*Network, *Meta, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("loading realignment network: %w", err)
	}
	var magic [4]byte
	_, err = io.ReadFull(f, magic[:])
	f.Close()
	if err != nil {
		return nil, nil, fmt.Errorf("%s: too short to be a realignment network (%v)", path, err)
	}
	if string(magic[:]) == "PK\x03\x04" { // a zip archive: torch.save
		tensors, err := ReadPTH(path)
		if err != nil {
			return nil, nil, err
		}
		n, err := networkFromTensors(func(name string) ([]int, []float32, error) {
			t, ok := tensors[name]
			if !ok {
				return nil, nil, fmt.Errorf("no tensor %s in model_state_dict (it has %s)", name, strings.Join(slices.Sorted(maps.Keys(tensors)), ", "))
			}
			return t.Shape, t.Data, nil
		})
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", path, err)
		}
		return n, nil, nil
	}

	st, err := transformer.OpenSafeTensors(path)
	if err != nil {
		return nil, nil, err
	}
	defer st.Close()
	n, err := networkFromTensors(func(name string) ([]int, []float32, error) {
		if _, ok := st.Info(name); !ok {
			return nil, nil, fmt.Errorf("no tensor %s", name)
		}
		data, shape, err := st.Float32(name)
		return shape, data, err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	raw, ok := st.Metadata()[metadataKey]
	if !ok {
		return n, nil, nil
	}
	var meta Meta
	if err := json.Unmarshal([]byte(raw), &meta); err != nil {
		return nil, nil, fmt.Errorf("%s: __metadata__ %q is not valid JSON: %w", path, metadataKey, err)
	}
	if err := n.checkMeta(meta); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return n, &meta, nil
}

// networkFromTensors assembles a Network from its state-dict tensors and
// checks that their shapes agree with one another.
func networkFromTensors(get func(name string) ([]int, []float32, error)) (*Network, error) {
	n := &Network{}
	shapes := map[string][]int{}
	load := func(name string, dst *[]float32, rank int) error {
		shape, data, err := get(name)
		if err != nil {
			return err
		}
		if len(shape) != rank {
			return fmt.Errorf("tensor %s has shape %v, want %d dimensions", name, shape, rank)
		}
		shapes[name] = shape
		*dst = data
		return nil
	}
	for _, t := range []struct {
		name string
		dst  *[]float32
		rank int
	}{
		{tensorPos, &n.Pos, 2}, {tensorLayer, &n.Layer, 2}, {tensorHead, &n.Head, 2},
		{tensorW1, &n.W1, 2}, {tensorB1, &n.B1, 1},
		{tensorW2, &n.W2, 2}, {tensorB2, &n.B2, 1},
		{tensorW3, &n.W3, 2}, {tensorB3, &n.B3, 1},
	} {
		if err := load(t.name, t.dst, t.rank); err != nil {
			return nil, err
		}
	}
	n.P, n.DP = shapes[tensorPos][0], shapes[tensorPos][1]
	n.L, n.DL = shapes[tensorLayer][0], shapes[tensorLayer][1]
	n.H, n.DH = shapes[tensorHead][0], shapes[tensorHead][1]
	n.H1 = shapes[tensorW1][0]
	n.H2 = shapes[tensorW2][0]
	n.HS = shapes[tensorW3][0]
	for i, want := range n.shapes() {
		if got := shapes[tensorNames[i]]; !slices.Equal(got, want) {
			return nil, fmt.Errorf("tensor %s has shape %v, want %v (sizes read from the other tensors: P=%d DP=%d from emb_pos, L=%d DL=%d from emb_blocks, H=%d DH=%d from emb_heads, H1=%d from fc1.weight, H2=%d from fc2.weight, HS=%d from fc3.weight)",
				tensorNames[i], got, want, n.P, n.DP, n.L, n.DL, n.H, n.DH, n.H1, n.H2, n.HS)
		}
	}
	if err := n.validate(); err != nil {
		return nil, err
	}
	return n, nil
}

// shapes lists every tensor's expected shape, derived from the sizes.
func (n *Network) shapes() [][]int {
	in := n.HS + n.DP + n.DL + n.DH
	return [][]int{
		{n.P, n.DP}, {n.L, n.DL}, {n.H, n.DH},
		{n.H1, in}, {n.H1},
		{n.H2, n.H1}, {n.H2},
		{n.HS, n.H2}, {n.HS},
	}
}

func (n *Network) data() []*[]float32 {
	return []*[]float32{&n.Pos, &n.Layer, &n.Head, &n.W1, &n.B1, &n.W2, &n.B2, &n.W3, &n.B3}
}

// validate checks that the sizes are positive and every slice has the
// length its shape says.
func (n *Network) validate() error {
	for _, s := range []struct {
		name string
		v    int
	}{{"P", n.P}, {"DP", n.DP}, {"L", n.L}, {"DL", n.DL}, {"H", n.H}, {"DH", n.DH}, {"HS", n.HS}, {"H1", n.H1}, {"H2", n.H2}} {
		if s.v <= 0 {
			return fmt.Errorf("realignment network size %s = %d, want > 0", s.name, s.v)
		}
	}
	data := n.data()
	for i, shape := range n.shapes() {
		size := 1
		for _, d := range shape {
			size *= d
		}
		if len(*data[i]) != size {
			return fmt.Errorf("tensor %s has %d elements, want %v = %d (P=%d DP=%d L=%d DL=%d H=%d DH=%d HS=%d H1=%d H2=%d)",
				tensorNames[i], len(*data[i]), shape, size, n.P, n.DP, n.L, n.DL, n.H, n.DH, n.HS, n.H1, n.H2)
		}
	}
	return nil
}

// checkMeta refuses a Meta that contradicts the network's own shapes.
func (n *Network) checkMeta(m Meta) error {
	if m.Kind != "" && m.Kind != "keys" && m.Kind != "values" {
		return fmt.Errorf("metadata kind %q, want \"keys\" or \"values\"", m.Kind)
	}
	if m.Layers != 0 && m.Layers != n.L {
		return fmt.Errorf("metadata says %d layers, the network's emb_blocks has %d", m.Layers, n.L)
	}
	if m.Heads != 0 && m.Heads != n.H {
		return fmt.Errorf("metadata says %d kv heads, the network's emb_heads has %d", m.Heads, n.H)
	}
	if m.HeadSize != 0 && m.HeadSize != n.HS {
		return fmt.Errorf("metadata says head size %d, the network's fc3 outputs %d", m.HeadSize, n.HS)
	}
	if m.MaxWindow > n.P {
		return fmt.Errorf("metadata says window %d, the network's emb_pos covers only %d indices", m.MaxWindow, n.P)
	}
	return nil
}

// Check refuses to run the network on a model or window it cannot serve.
func (n *Network) Check(layers, heads, headSize, window int) error {
	switch {
	case n.L != layers:
		return fmt.Errorf("realignment network has %d layers (emb_blocks), but the model has %d", n.L, layers)
	case n.H != heads:
		return fmt.Errorf("realignment network has %d kv heads (emb_heads), but the model has %d", n.H, heads)
	case n.HS != headSize:
		return fmt.Errorf("realignment network works on head size %d, but the model's head size is %d", n.HS, headSize)
	case window < 0:
		return fmt.Errorf("window of %d entries is negative", window)
	case window > n.P:
		return fmt.Errorf("window of %d entries needs window indices up to %d, but the realignment network's emb_pos supports indices 0..%d (window ≤ %d)", window, window-1, n.P-1, n.P)
	}
	return nil
}

// Forward runs the network on one head vector x (length HS) at window index
// pos, layer and kv head, writing x' to out (length HS; out may be x).
// It is the literal definition, kept apart from ref.Align's table-based
// version so that each checks the other. Out-of-range arguments panic: this
// is a convenience for tests, callers that take user input use Check.
func (n *Network) Forward(x []float32, pos, layer, head int, out []float32) {
	if len(x) != n.HS || len(out) != n.HS || pos < 0 || pos >= n.P || layer < 0 || layer >= n.L || head < 0 || head >= n.H {
		panic(fmt.Sprintf("align.Network.Forward: x %d, out %d, pos %d, layer %d, head %d outside HS %d, P %d, L %d, H %d",
			len(x), len(out), pos, layer, head, n.HS, n.P, n.L, n.H))
	}
	in := make([]float32, 0, n.HS+n.DP+n.DL+n.DH)
	in = append(in, x...)
	in = append(in, n.Pos[pos*n.DP:(pos+1)*n.DP]...)
	in = append(in, n.Layer[layer*n.DL:(layer+1)*n.DL]...)
	in = append(in, n.Head[head*n.DH:(head+1)*n.DH]...)
	h1 := linear(n.W1, n.B1, in, n.H1, true)
	h2 := linear(n.W2, n.B2, h1, n.H2, true)
	y := linear(n.W3, n.B3, h2, n.HS, false)
	for k := range y {
		out[k] = x[k] + y[k]
	}
}

// linear is torch.nn.Linear (then ReLU if relu), accumulating in float64 and
// rounding each output to float32 as PyTorch stores it.
func linear(w, b, x []float32, outDim int, relu bool) []float32 {
	out := make([]float32, outDim)
	for j := range out {
		row := w[j*len(x) : (j+1)*len(x)]
		s := float64(b[j])
		for k, v := range x {
			s += float64(row[k]) * float64(v)
		}
		if relu && s < 0 {
			s = 0
		}
		out[j] = float32(s)
	}
	return out
}

// Ref is the network as the CPU reference kernel takes it. The slices are
// shared, not copied.
func (n *Network) Ref() *ref.AlignNet {
	return &ref.AlignNet{
		Pos: n.Pos, Layer: n.Layer, Head: n.Head,
		W1: n.W1, B1: n.B1, W2: n.W2, B2: n.B2, W3: n.W3, B3: n.B3,
		P: n.P, DP: n.DP, DL: n.DL, DH: n.DH, H1: n.H1, H2: n.H2,
	}
}

// NewRandomNetwork makes a network of the original's embedding sizes
// (DP=32, DL=4, DH=8) initialised as PyTorch would (embeddings N(0,1),
// linear layers U(±1/sqrt(fan_in))), for tests and benchmarks.
func NewRandomNetwork(L, H, HS, P, H1, H2 int, seed int64) *Network {
	rng := rand.New(rand.NewPCG(uint64(seed), 0x6b76616c69676e)) // "kvalign"
	n := &Network{P: P, DP: 32, L: L, DL: 4, H: H, DH: 8, HS: HS, H1: H1, H2: H2}
	normal := func(size int) []float32 {
		s := make([]float32, size)
		for i := range s {
			s[i] = float32(rng.NormFloat64())
		}
		return s
	}
	uniform := func(size, fanIn int) []float32 {
		s := make([]float32, size)
		bound := 1 / math.Sqrt(float64(fanIn))
		for i := range s {
			s[i] = float32((2*rng.Float64() - 1) * bound)
		}
		return s
	}
	in := HS + n.DP + n.DL + n.DH
	n.Pos, n.Layer, n.Head = normal(P*n.DP), normal(L*n.DL), normal(H*n.DH)
	n.W1, n.B1 = uniform(H1*in, in), uniform(H1, in)
	n.W2, n.B2 = uniform(H2*H1, H1), uniform(H2, H1)
	n.W3, n.B3 = uniform(HS*H2, H2), uniform(HS, H2)
	return n
}

// Save writes the network in kvalign's format: a standard safetensors file
// (tensors named as in the original state dict, F32) whose __metadata__
// holds meta as JSON under "kvalign". The file is replaced atomically.
func (n *Network) Save(path string, meta Meta) error {
	if err := n.validate(); err != nil {
		return fmt.Errorf("saving %s: %w", path, err)
	}
	if err := n.checkMeta(meta); err != nil {
		return fmt.Errorf("saving %s: %w", path, err)
	}
	metaJSON, err := json.Marshal(meta)
	if err != nil {
		return fmt.Errorf("saving %s: %w", path, err)
	}
	data := n.data()
	tensors := make([]transformer.NamedTensor, len(tensorNames))
	for i, shape := range n.shapes() {
		tensors[i] = transformer.NamedTensor{Name: tensorNames[i], Shape: shape, F32: *data[i]}
	}
	return transformer.WriteSafeTensors(path, tensors, map[string]string{metadataKey: string(metaJSON)})
}
