package align

import (
	"archive/zip"
	"bytes"
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kvalign/kvalign/internal/testenv"
)

// originalNetworks are the four KV-Align networks in the shared fixtures,
// with the sizes the fixtures' README documents and a few values read with
// Python's pickle module (persistent_load stubbed) as an independent oracle.
var originalNetworks = []struct {
	name                   string
	L, H, H1, H2           int
	fc1First, fc1Last      float32
	posSum                 float64 // Σ emb_pos.weight, float64
	fc3BiasFirst, fc3BLast float32
}{
	{"keys_network_distilgpt2", 6, 12, 256, 64, -0.10019232332706451, 0.0585881806910038, -375.2228324970347, -0.02884378843009472, -0.009125729091465473},
	{"values_network_distilgpt2", 6, 12, 64, 128, 0.2405642718076706, -0.1769893318414688, 441.1994281070474, 0.0008066602167673409, -0.0015793766360729933},
	{"keys_network_smollm2", 30, 3, 128, 128, -0.09392018616199493, -0.07118967920541763, 540.4831742964063, -0.0007957525085657835, 0.007076391018927097},
	{"values_network_smollm2", 30, 3, 128, 128, -0.04452527314424515, -0.02129802480340004, 172.20465093989696, 0.0004011143173556775, -0.0002452008775435388},
}

func TestReadPTHOriginals(t *testing.T) {
	for _, c := range originalNetworks {
		t.Run(c.name, func(t *testing.T) {
			path := testenv.Shared(t, "seed", "networks", c.name+".pth")
			tensors, err := ReadPTH(path)
			if err != nil {
				t.Fatal(err)
			}
			want := map[string][]int{
				"emb_pos.weight": {256, 32}, "emb_blocks.weight": {c.L, 4}, "emb_heads.weight": {c.H, 8},
				"fc1.weight": {c.H1, 108}, "fc1.bias": {c.H1},
				"fc2.weight": {c.H2, c.H1}, "fc2.bias": {c.H2},
				"fc3.weight": {64, c.H2}, "fc3.bias": {64},
			}
			if len(tensors) != len(want) {
				t.Errorf("%d tensors, want %d", len(tensors), len(want))
			}
			for name, shape := range want {
				got, ok := tensors[name]
				if !ok {
					t.Errorf("no tensor %s", name)
					continue
				}
				if !equalInts(got.Shape, shape) {
					t.Errorf("%s: shape %v, want %v", name, got.Shape, shape)
				}
				if got.Storage != "FloatStorage" {
					t.Errorf("%s: storage %s, want FloatStorage", name, got.Storage)
				}
			}
			fc1 := tensors["fc1.weight"].Data
			if fc1[0] != c.fc1First || fc1[len(fc1)-1] != c.fc1Last {
				t.Errorf("fc1.weight first/last = %v/%v, want %v/%v", fc1[0], fc1[len(fc1)-1], c.fc1First, c.fc1Last)
			}
			b3 := tensors["fc3.bias"].Data
			if b3[0] != c.fc3BiasFirst || b3[len(b3)-1] != c.fc3BLast {
				t.Errorf("fc3.bias first/last = %v/%v, want %v/%v", b3[0], b3[len(b3)-1], c.fc3BiasFirst, c.fc3BLast)
			}
			var sum float64
			for _, v := range tensors["emb_pos.weight"].Data {
				sum += float64(v)
			}
			if math.Abs(sum-c.posSum) > 1e-9*math.Abs(c.posSum) {
				t.Errorf("Σ emb_pos.weight = %.12g, want %.12g", sum, c.posSum)
			}
		})
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// pickleBuilder writes protocol-2 pickles by hand, so tests can make the
// checkpoints torch.save would write (and broken ones) without torch.
type pickleBuilder struct{ bytes.Buffer }

func (p *pickleBuilder) op(b ...byte) *pickleBuilder { p.Write(b); return p }

func (p *pickleBuilder) str(s string) *pickleBuilder {
	p.WriteByte('X')
	binary.Write(&p.Buffer, binary.LittleEndian, uint32(len(s)))
	p.WriteString(s)
	return p
}

func (p *pickleBuilder) int(v int) *pickleBuilder {
	p.WriteByte('J')
	binary.Write(&p.Buffer, binary.LittleEndian, int32(v))
	return p
}

func (p *pickleBuilder) global(module, name string) *pickleBuilder {
	p.WriteString("c" + module + "\n" + name + "\n")
	return p
}

// intTuple pushes a tuple of ints.
func (p *pickleBuilder) ints(v ...int) *pickleBuilder {
	p.op('(')
	for _, x := range v {
		p.int(x)
	}
	return p.op('t')
}

// tensor pushes _rebuild_tensor_v2(storage key, offset, shape, stride).
func (p *pickleBuilder) tensor(storageType, key string, numel, offset int, shape, stride []int) *pickleBuilder {
	p.global("torch._utils", "_rebuild_tensor_v2")
	p.op('(') // args
	p.op('(').str("storage").global("torch", storageType).str(key).str("cpu").int(numel).op('t', 'Q')
	p.int(offset).ints(shape...).ints(stride...).op(0x89) // requires_grad False
	p.global("collections", "OrderedDict").op(')', 'R')   // backward_hooks
	return p.op('t', 'R')
}

// writePTH writes a zip checkpoint with the given pickle and storage records.
func writePTH(t *testing.T, pkl []byte, storages map[string][]byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "net.pth")
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	add := func(name string, data []byte) {
		w, err := zw.CreateHeader(&zip.FileHeader{Name: name, Method: zip.Store})
		if err != nil {
			t.Fatal(err)
		}
		w.Write(data)
	}
	if pkl != nil {
		add("whatever_dir/data.pkl", pkl)
	}
	add("whatever_dir/byteorder", []byte("little"))
	for k, v := range storages {
		add("whatever_dir/data/"+k, v)
	}
	add("whatever_dir/version", []byte("3\n"))
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func f32bytes(v ...float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

// TestReadPTHViews checks storage offsets, non-contiguous strides, shared
// storages, half precision, and the extra content a checkpoint carries.
func TestReadPTHViews(t *testing.T) {
	var p pickleBuilder
	p.op(0x80, 2, '}', 'q', 0, '(')
	p.str("model_state_dict").global("collections", "OrderedDict").op(')', 'R', 'q', 1, '(')
	// a [2,3] view of storage "0" at offset 1: elements 1..6
	p.str("a").tensor("FloatStorage", "0", 8, 1, []int{2, 3}, []int{3, 1})
	// its transpose [3,2] with strides (1,3), same storage, offset 1
	p.str("aT").tensor("FloatStorage", "0", 8, 1, []int{3, 2}, []int{1, 3})
	// a scalar
	p.str("s").tensor("FloatStorage", "0", 8, 7, []int{}, []int{})
	// half precision
	p.str("h").tensor("HalfStorage", "1", 2, 0, []int{2}, []int{1})
	p.op('u') // SETITEMS into model_state_dict
	// BUILD with a _metadata dict, as torch does for state dicts
	p.op('}').str("_metadata").op('}', 's', 'b')
	// extra content: losses (floats, negative and big ints), an unknown class instance
	p.str("train_losses").op(']', '(', 'G')
	binary.Write(&p.Buffer, binary.BigEndian, math.Float64bits(0.25))
	p.op('J', 0xff, 0xff, 0xff, 0xff) // -1
	p.op(0x8a, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0x80)
	p.op('e')
	p.str("opt").global("torch.optim.adam", "Adam").op(')', 0x81).op('}', 'b')
	p.str("again").op('h', 1) // memo get of the state dict itself: harmless
	p.op('u', '.')

	half := make([]byte, 4)
	binary.LittleEndian.PutUint16(half[0:], 0x3c00) // 1.0
	binary.LittleEndian.PutUint16(half[2:], 0xc000) // -2.0
	path := writePTH(t, p.Bytes(), map[string][]byte{
		"0": f32bytes(0, 1, 2, 3, 4, 5, 6, 7),
		"1": half,
	})
	tensors, err := ReadPTH(path)
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string, shape []int, data ...float32) {
		t.Helper()
		got := tensors[name]
		if !equalInts(got.Shape, shape) || len(got.Data) != len(data) {
			t.Fatalf("%s: shape %v data %v, want %v %v", name, got.Shape, got.Data, shape, data)
		}
		for i := range data {
			if got.Data[i] != data[i] {
				t.Fatalf("%s: data %v, want %v", name, got.Data, data)
			}
		}
	}
	check("a", []int{2, 3}, 1, 2, 3, 4, 5, 6)
	check("aT", []int{3, 2}, 1, 4, 2, 5, 3, 6)
	check("s", []int{}, 7)
	check("h", []int{2}, 1, -2)
}

func TestDecodeLong(t *testing.T) {
	for _, c := range []struct {
		b    []byte
		want int64
	}{
		{nil, 0}, {[]byte{0xff}, -1}, {[]byte{0x7f}, 127}, {[]byte{0x80}, -128},
		{[]byte{0x00, 0x80}, -32768}, {[]byte{0xff, 0x00}, 255},
		{[]byte{0, 0, 0, 0, 0, 0, 0, 0x80}, math.MinInt64},
	} {
		if got := decodeLong(c.b); got != c.want {
			t.Errorf("decodeLong(% x) = %v, want %d", c.b, got, c.want)
		}
	}
}

// TestReadPTHRefusesBrokenFiles checks that every kind of damage is an
// error naming the file, never a panic.
func TestReadPTHRefusesBrokenFiles(t *testing.T) {
	good := func() *pickleBuilder {
		var p pickleBuilder
		p.op(0x80, 2, '}', '(').str("model_state_dict").op('}', '(')
		p.str("w").tensor("FloatStorage", "0", 4, 0, []int{2, 2}, []int{2, 1})
		return p.op('u', 'u', '.')
	}
	storage := map[string][]byte{"0": f32bytes(1, 2, 3, 4)}
	if _, err := ReadPTH(writePTH(t, good().Bytes(), storage)); err != nil {
		t.Fatalf("the well-formed base case fails: %v", err)
	}
	goodBytes := good().Bytes()

	dir := t.TempDir()
	writeRaw := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	var noState pickleBuilder
	noState.op(0x80, 2, '}', '(').str("epoch").int(3).op('u', '.')
	var unknownOp pickleBuilder
	unknownOp.op(0x80, 2, 'i') // INST, a protocol-0 opcode torch never writes
	var wrongSize pickleBuilder
	wrongSize.op(0x80, 2, '}', '(').str("model_state_dict").op('}', '(')
	wrongSize.str("w").tensor("FloatStorage", "0", 4, 1, []int{2, 2}, []int{2, 1}).op('u', 'u', '.')

	// A tuple that holds itself twice, 60 levels deep: printing it would take
	// 2^60 steps, so errors must only describe it.
	var deep pickleBuilder
	deep.op(0x80, 2, '}', 'N')
	for range 60 {
		deep.op('2', 0x86)
	}
	deep.op('N', 's', '.')
	var deepPID pickleBuilder
	deepPID.op(0x80, 2, 'N')
	for range 60 {
		deepPID.op('2', 0x86)
	}
	deepPID.op('Q', '.')

	realZip, err := os.ReadFile(writePTH(t, goodBytes, storage))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, path, want string
	}{
		{"garbage", writeRaw("garbage.pth", []byte("this is not a checkpoint at all")), "not a zip"},
		{"empty", writeRaw("empty.pth", nil), "not a zip"},
		{"truncated zip", writeRaw("trunc.pth", realZip[:len(realZip)/2]), "not a zip"},
		{"no data.pkl", writePTH(t, nil, storage), "data.pkl"},
		{"truncated pickle", writePTH(t, goodBytes[:len(goodBytes)-10], storage), "truncated pickle"},
		{"unsupported opcode", writePTH(t, unknownOp.Bytes(), nil), "unsupported pickle opcode"},
		{"missing storage", writePTH(t, goodBytes, nil), "missing storage record"},
		{"short storage", writePTH(t, goodBytes, map[string][]byte{"0": f32bytes(1, 2, 3)}), "holds 12 bytes"},
		{"view past storage", writePTH(t, wrongSize.Bytes(), storage), "runs past"},
		{"no model_state_dict", writePTH(t, noState.Bytes(), nil), "no model_state_dict"},
		{"self-similar key", writePTH(t, deep.Bytes(), nil), "top-level keys: a tuple"},
		{"self-similar persistent id", writePTH(t, deepPID.Bytes(), nil), "persistent id a tuple"},
		{"missing file", filepath.Join(dir, "nope.pth"), "no such file"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := ReadPTH(c.path)
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

// FuzzUnpickle feeds damaged pickles to the unpickler: it must return an
// error or a value, never panic or hang. The seeds are a real checkpoint's
// data.pkl (when the shared fixtures are present) and small hand-made ones.
func FuzzUnpickle(f *testing.F) {
	var p pickleBuilder
	p.op(0x80, 2, '}', '(').str("model_state_dict").op('}', '(')
	p.str("w").tensor("FloatStorage", "0", 4, 0, []int{2, 2}, []int{2, 1}).op('u', 'u', '.')
	f.Add(p.Bytes())
	if d := testenv.SharedDir(); d != "" {
		if zr, err := zip.OpenReader(filepath.Join(d, "seed", "networks", "keys_network_distilgpt2.pth")); err == nil {
			for _, zf := range zr.File {
				if strings.HasSuffix(zf.Name, "/data.pkl") {
					if b, err := readZipFile(zf, maxPickleBytes); err == nil {
						f.Add(b[:1200]) // the model_state_dict part and a bit
						f.Add(b)
					}
				}
			}
			zr.Close()
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		v, err := unpickle(data)
		if err == nil {
			findStateDict(v) // must not panic either
		}
	})
}
