package transformer

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// stTestRaw builds safetensors bytes from a header string and a data section.
func stTestRaw(header string, data []byte) []byte {
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	out = append(out, header...)
	return append(out, data...)
}

func stTestWrite(t *testing.T, dir, name string, raw []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestWriteSafeTensorsRoundTrip(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.safetensors")
	in := []NamedTensor{
		{Name: "b.weight", Shape: []int{2, 3}, F32: []float32{1, -2, 3.5, 0, 1e-7, -1e30}},
		{Name: "a.ids", Shape: []int{3}, I64: []int64{-1, 0, 1 << 40}},
		{Name: "scalar", Shape: nil, F32: []float32{42}},
		{Name: "empty", Shape: []int{0, 4}},
		{Name: "c.odd", Shape: []int{1}, F32: []float32{7}}, // 4 bytes: later data must still be read right
	}
	meta := map[string]string{"format": "pt", "note": "a <b> & c"}
	if err := WriteSafeTensors(path, in, meta); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the file (temp file left behind?)", len(entries))
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if n := binary.LittleEndian.Uint64(raw); (8+n)%8 != 0 {
		t.Errorf("data section starts at %d, not 8-byte aligned", 8+n)
	}

	s, err := OpenSafeTensors(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, want := s.Names(), []string{"a.ids", "b.weight", "c.odd", "empty", "scalar"}; !slices.Equal(got, want) {
		t.Errorf("Names = %v, want %v", got, want)
	}
	if got := s.Metadata(); got["format"] != "pt" || got["note"] != meta["note"] || len(got) != 2 {
		t.Errorf("Metadata = %v", got)
	}
	for _, want := range in {
		info, ok := s.Info(want.Name)
		if !ok {
			t.Fatalf("no %s", want.Name)
		}
		if info.File != path || !slices.Equal(info.Shape, append([]int{}, want.Shape...)) {
			t.Errorf("%s: info %+v", want.Name, info)
		}
		if want.I64 != nil {
			got, shape, err := s.Int64(want.Name)
			if err != nil || !slices.Equal(got, want.I64) || !slices.Equal(shape, want.Shape) {
				t.Errorf("%s: Int64 = %v %v %v", want.Name, got, shape, err)
			}
			if _, _, err := s.Float32(want.Name); err == nil || !strings.Contains(err.Error(), "cannot be read as float") {
				t.Errorf("Float32 of an I64 tensor: err %v", err)
			}
			continue
		}
		got, shape, err := s.Float32(want.Name)
		if err != nil || !slices.Equal(got, want.F32) && len(want.F32)+len(got) > 0 || len(shape) != len(want.Shape) {
			t.Errorf("%s: Float32 = %v %v %v, want %v", want.Name, got, shape, err, want.F32)
		}
	}
	if _, _, err := s.Int64("b.weight"); err == nil || !strings.Contains(err.Error(), "cannot be read as integer") {
		t.Errorf("Int64 of an F32 tensor: err %v", err)
	}
	if _, _, err := s.Float32("absent"); err == nil || !strings.Contains(err.Error(), `"absent"`) {
		t.Errorf("Float32(absent): err %v", err)
	}
	// Returned slices are copies: writing to them must not touch the file.
	got, _, _ := s.Float32("b.weight")
	got[0] = 99
	again, _, _ := s.Float32("b.weight")
	if again[0] != 1 {
		t.Errorf("Float32 returned memory shared with the mapping")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, _, err := s.Float32("b.weight"); err == nil || !strings.Contains(err.Error(), "after Close") {
		t.Errorf("read after Close: err %v", err)
	}
	// Overwriting an existing file replaces it.
	if err := WriteSafeTensors(path, in[:1], nil); err != nil {
		t.Fatal(err)
	}
	s2, err := OpenSafeTensors(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if len(s2.Names()) != 1 || len(s2.Metadata()) != 0 {
		t.Errorf("rewritten file: names %v metadata %v", s2.Names(), s2.Metadata())
	}
}

func TestWriteSafeTensorsRefuses(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		tensors []NamedTensor
		want    string
	}{
		{"duplicate", []NamedTensor{{Name: "a", Shape: []int{1}, F32: []float32{1}}, {Name: "a", Shape: []int{1}, F32: []float32{2}}}, "given twice"},
		{"both", []NamedTensor{{Name: "a", Shape: []int{1}, F32: []float32{1}, I64: []int64{1}}}, "both"},
		{"count", []NamedTensor{{Name: "a", Shape: []int{2, 2}, F32: []float32{1}}}, "needs 4"},
		{"negative", []NamedTensor{{Name: "a", Shape: []int{-1}}}, "negative"},
		{"metadata name", []NamedTensor{{Name: "__metadata__", Shape: []int{0}}}, "__metadata__"},
	}
	for _, tt := range tests {
		err := WriteSafeTensors(filepath.Join(dir, tt.name+".safetensors"), tt.tensors, nil)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err %v, want one containing %q", tt.name, err, tt.want)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("refused writes left %d files", len(entries))
	}
	if err := WriteSafeTensors(filepath.Join(dir, "no/such/dir/x.safetensors"), nil, nil); err == nil {
		t.Errorf("write into a missing directory succeeded")
	}
}

func TestSafeTensorsHalfPrecision(t *testing.T) {
	// F16: 1, -2, 0.5, 65504 (max); BF16: 1, -2, 3.140625; I32: -5, 7.
	var data []byte
	for _, h := range []uint16{0x3C00, 0xC000, 0x3800, 0x7BFF} {
		data = binary.LittleEndian.AppendUint16(data, h)
	}
	for _, h := range []uint16{0x3F80, 0xC000, 0x4049} {
		data = binary.LittleEndian.AppendUint16(data, h)
	}
	data = append(data, 0, 0) // pad so the I32 tensor starts 4-aligned (not required, but typical)
	for _, v := range []int32{-5, 7} {
		data = binary.LittleEndian.AppendUint32(data, uint32(v))
	}
	header := `{"h":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},` +
		`"b":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]},` +
		`"i":{"dtype":"I32","shape":[2],"data_offsets":[16,24]},` +
		`"flag":{"dtype":"BOOL","shape":[2],"data_offsets":[14,16]}}`
	path := stTestWrite(t, t.TempDir(), "half.safetensors", stTestRaw(header, data))
	s, err := OpenSafeTensors(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, shape, err := s.Float32("h"); err != nil || !slices.Equal(got, []float32{1, -2, 0.5, 65504}) || !slices.Equal(shape, []int{2, 2}) {
		t.Errorf("F16: %v %v %v", got, shape, err)
	}
	if got, _, err := s.Float32("b"); err != nil || !slices.Equal(got, []float32{1, -2, 3.140625}) {
		t.Errorf("BF16: %v %v", got, err)
	}
	if got, _, err := s.Int64("i"); err != nil || !slices.Equal(got, []int64{-5, 7}) {
		t.Errorf("I32: %v %v", got, err)
	}
	// A BOOL buffer opens fine but is not readable as float.
	if _, _, err := s.Float32("flag"); err == nil || !strings.Contains(err.Error(), "dtype BOOL") {
		t.Errorf("BOOL as float: err %v", err)
	}
	info, _ := s.Info("b")
	if info.Offset != int64(8+len(header)+8) || info.Size != 6 || info.DType != "BF16" {
		t.Errorf("Info(b) = %+v", info)
	}
}

// stTestBadHeaders are corrupt files and the error each must produce.
var stTestBadHeaders = []struct {
	name string
	raw  []byte
	want string
}{
	{"short file", []byte{1, 2, 3}, "shorter than the 8-byte"},
	{"header past end", stTestRaw(`{}`, nil)[:9], "runs past the end"},
	{"header above limit", binary.LittleEndian.AppendUint64(nil, 200<<20), "above the"},
	{"not JSON", stTestRaw(`{"a":`, nil), "invalid header JSON"},
	{"not an object", stTestRaw(`[1]`, nil), "not a JSON object"},
	{"garbage after", stTestRaw(`{} x`, nil), "after its JSON object"},
	{"NUL padding", stTestRaw("{}\x00\x00", nil), "after its JSON object"},
	{"entry not object", stTestRaw(`{"a":3}`, nil), "invalid header entry"},
	{"no dtype", stTestRaw(`{"a":{"shape":[1],"data_offsets":[0,4]}}`, make([]byte, 4)), "no dtype"},
	{"no shape", stTestRaw(`{"a":{"dtype":"F32","data_offsets":[0,4]}}`, make([]byte, 4)), "no shape"},
	{"no offsets", stTestRaw(`{"a":{"dtype":"F32","shape":[1]}}`, make([]byte, 4)), "no data_offsets"},
	{"unknown dtype", stTestRaw(`{"a":{"dtype":"F24","shape":[1],"data_offsets":[0,3]}}`, make([]byte, 3)), `unknown or unsupported dtype "F24"`},
	{"size mismatch", stTestRaw(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}`, make([]byte, 8)), "needs 8"},
	{"offsets past data", stTestRaw(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, make([]byte, 4)), "run past the 4-byte data section"},
	{"reversed offsets", stTestRaw(`{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}`, make([]byte, 4)), "not an ordered range"},
	{"three offsets", stTestRaw(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}`, make([]byte, 8)), "must be [begin, end]"},
	{"negative dim", stTestRaw(`{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}`, make([]byte, 4)), "negative dimension"},
	{"huge shape", stTestRaw(`{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}`, make([]byte, 4)), "too large"},
	{"fractional dim", stTestRaw(`{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}`, make([]byte, 4)), "invalid header entry"},
	{"overlap", stTestRaw(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, make([]byte, 8)), `"a" and "b" overlap`},
	{"duplicate", stTestRaw(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, make([]byte, 8)), `"a" twice`},
	{"metadata not strings", stTestRaw(`{"__metadata__":{"n":1}}`, nil), "__metadata__ must map strings"},
}

func TestOpenSafeTensorsRefuses(t *testing.T) {
	dir := t.TempDir()
	for i, tt := range stTestBadHeaders {
		t.Run(tt.name, func(t *testing.T) {
			path := stTestWrite(t, dir, "bad"+string(rune('a'+i))+".safetensors", tt.raw)
			s, err := OpenSafeTensors(path)
			if err == nil {
				s.Close()
				t.Fatalf("opened a corrupt file")
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), path) {
				t.Errorf("error %q, want it to name %s and contain %q", err, path, tt.want)
			}
		})
	}
	if _, err := OpenSafeTensors(filepath.Join(dir, "absent.safetensors")); err == nil {
		t.Errorf("opened a missing file")
	}
	empty := t.TempDir()
	if _, err := OpenSafeTensors(empty); err == nil || !strings.Contains(err.Error(), "neither model.safetensors") {
		t.Errorf("empty dir: err %v", err)
	}
}

func TestParseSafeTensorsHeaderPrefix(t *testing.T) {
	// The parser works on a prefix of the file: it never reads the data section.
	raw := stTestRaw(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, make([]byte, 8))
	tensors, _, err := ParseSafeTensorsHeader(raw[:len(raw)-8], int64(len(raw)), "f")
	if err != nil || tensors["a"].Size != 8 {
		t.Errorf("prefix parse: %v %v", tensors, err)
	}
	if _, _, err := ParseSafeTensorsHeader(raw[:10], int64(len(raw)), "f"); err == nil || !strings.Contains(err.Error(), "header bytes given") {
		t.Errorf("short prefix: err %v", err)
	}
}

// stTestShards writes a two-shard checkpoint and its index into dir.
func stTestShards(t *testing.T, dir string, weightMap map[string]string) {
	t.Helper()
	if err := WriteSafeTensors(filepath.Join(dir, "model-00001-of-00002.safetensors"), []NamedTensor{
		{Name: "a", Shape: []int{2}, F32: []float32{1, 2}},
		{Name: "unlisted", Shape: []int{1}, F32: []float32{0}},
	}, map[string]string{"format": "pt"}); err != nil {
		t.Fatal(err)
	}
	if err := WriteSafeTensors(filepath.Join(dir, "model-00002-of-00002.safetensors"), []NamedTensor{
		{Name: "b", Shape: []int{1}, F32: []float32{3}},
	}, map[string]string{"format": "other"}); err != nil {
		t.Fatal(err)
	}
	index, _ := json.Marshal(map[string]any{"metadata": map[string]any{"total_size": 12}, "weight_map": weightMap})
	stTestWrite(t, dir, "model.safetensors.index.json", index)
}

func TestOpenSafeTensorsSharded(t *testing.T) {
	dir := t.TempDir()
	stTestShards(t, dir, map[string]string{"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
	for _, path := range []string{dir, filepath.Join(dir, "model.safetensors.index.json")} {
		s, err := OpenSafeTensors(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.Names(); !slices.Equal(got, []string{"a", "b"}) {
			t.Errorf("Names = %v (the index is authoritative)", got)
		}
		if got := s.Metadata()["format"]; got != "pt" {
			t.Errorf("Metadata format %q, want the first shard's", got)
		}
		b, _, err := s.Float32("b")
		if err != nil || !slices.Equal(b, []float32{3}) {
			t.Errorf("b = %v %v", b, err)
		}
		if info, _ := s.Info("b"); filepath.Base(info.File) != "model-00002-of-00002.safetensors" {
			t.Errorf("Info(b).File = %s", info.File)
		}
		s.Close()
	}
}

func TestOpenSafeTensorsShardedRefuses(t *testing.T) {
	tests := []struct {
		name      string
		weightMap map[string]string
		index     string // raw index JSON, overriding weightMap
		want      string
	}{
		{"invalid JSON", nil, `{"weight_map": `, "invalid safetensors index"},
		{"no weight_map", nil, `{"metadata": {}}`, "no weight_map"},
		{"missing shard", map[string]string{"a": "model-00003-of-00002.safetensors"}, "", "does not exist"},
		{"tensor absent", map[string]string{"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}, "", `tensor "c"`},
		{"path escape", map[string]string{"a": "../model-00001-of-00002.safetensors"}, "", "not a file name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			stTestShards(t, dir, tt.weightMap)
			if tt.index != "" {
				stTestWrite(t, dir, "model.safetensors.index.json", []byte(tt.index))
			}
			s, err := OpenSafeTensors(dir)
			if err == nil {
				s.Close()
				t.Fatal("opened a bad sharded checkpoint")
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "model.safetensors.index.json") {
				t.Errorf("error %q, want it to name the index and contain %q", err, tt.want)
			}
		})
	}
}

func FuzzParseSafeTensorsHeader(f *testing.F) {
	dir := f.TempDir()
	good := filepath.Join(dir, "good.safetensors")
	if err := WriteSafeTensors(good, []NamedTensor{
		{Name: "w", Shape: []int{2, 3}, F32: []float32{1, 2, 3, 4, 5, 6}},
		{Name: "ids", Shape: []int{2}, I64: []int64{1, 2}},
	}, map[string]string{"format": "pt"}); err != nil {
		f.Fatal(err)
	}
	raw, err := os.ReadFile(good)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(raw, uint16(0))
	for _, tt := range stTestBadHeaders {
		f.Add(tt.raw, uint16(0))
	}
	f.Add(stTestRaw(`{"a":{"dtype":"BF16","shape":[],"data_offsets":[0,2]},"b":{"dtype":"F16","shape":[0],"data_offsets":[2,2]}}`, make([]byte, 2)), uint16(3))
	f.Fuzz(func(t *testing.T, data []byte, extra uint16) {
		fileSize := int64(len(data)) + int64(extra)
		tensors, _, err := ParseSafeTensorsHeader(data, fileSize, "fuzz")
		if err != nil {
			return
		}
		// Whatever is accepted must be safe to read.
		headerEnd := 8 + int64(binary.LittleEndian.Uint64(data))
		for name, info := range tensors {
			if info.Offset < headerEnd || info.Size < 0 || info.Offset+info.Size > fileSize {
				t.Fatalf("tensor %q: range [%d, +%d) outside data section [%d, %d)", name, info.Offset, info.Size, headerEnd, fileSize)
			}
			size, ok := stDTypeSize(info.DType)
			if !ok {
				t.Fatalf("tensor %q: accepted dtype %q", name, info.DType)
			}
			count := int64(1)
			for _, d := range info.Shape {
				count *= int64(d)
			}
			if count*int64(size) != info.Size {
				t.Fatalf("tensor %q: shape %v does not match %d bytes", name, info.Shape, info.Size)
			}
		}
	})
}
