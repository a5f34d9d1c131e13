package transformer

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"

	"github.com/x448/float16"
)

// The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte
// little-endian header length N, N bytes of JSON mapping tensor names to
// {dtype, shape, data_offsets: [begin, end]} (offsets relative to the data
// section that follows the header) plus an optional "__metadata__" object of
// strings, then the raw little-endian tensor bytes.

// stMaxHeaderBytes bounds the JSON header, as the reference implementation
// does, so a corrupt length cannot make the parser read or allocate gigabytes.
const stMaxHeaderBytes = 100 << 20

// TensorInfo describes one tensor of a safetensors file.
type TensorInfo struct {
	Name   string
	DType  string // safetensors dtype: "F32", "F16", "BF16", "I64", …
	Shape  []int
	Offset int64  // byte offset of the tensor data from the start of File
	Size   int64  // bytes of tensor data
	File   string // path of the file holding it
}

// SafeTensors is a read-only view of one safetensors file or of a sharded
// set. Files are memory-mapped, so opening a multi-gigabyte checkpoint costs
// nothing until tensors are read; the readers copy into fresh Go slices, so
// nothing returned points into the mapping and Close may unmap at any time.
// Methods are safe for concurrent use.
type SafeTensors struct {
	mu       sync.RWMutex // readers hold it shared while copying; Close exclusively
	closed   bool
	path     string                // what was opened, for errors
	files    map[string][]byte     // file path → mapping
	tensors  map[string]TensorInfo // name → where its bytes are
	names    []string              // sorted
	metadata map[string]string
}

// OpenSafeTensors opens path: a .safetensors file, a sharded index
// (*.safetensors.index.json), or a directory holding model.safetensors or
// model.safetensors.index.json.
func OpenSafeTensors(path string) (*SafeTensors, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("open safetensors: %w", err)
	}
	if st.IsDir() {
		single := filepath.Join(path, "model.safetensors")
		index := filepath.Join(path, "model.safetensors.index.json")
		switch {
		case stIsFile(single):
			return stOpenSingle(single)
		case stIsFile(index):
			return stOpenSharded(index)
		}
		return nil, fmt.Errorf("open safetensors: %s holds neither model.safetensors nor model.safetensors.index.json", path)
	}
	if strings.HasSuffix(path, ".index.json") {
		return stOpenSharded(path)
	}
	return stOpenSingle(path)
}

func stIsFile(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular()
}

func stOpenSingle(path string) (*SafeTensors, error) {
	s := &SafeTensors{path: path, files: map[string][]byte{}}
	tensors, metadata, err := s.stMapFile(path)
	if err != nil {
		return nil, err
	}
	s.tensors = tensors
	s.metadata = metadata
	s.stIndexNames()
	return s, nil
}

// stOpenSharded opens the index written by HF save_pretrained for large
// models: {"metadata": {...}, "weight_map": {tensor name: shard file name}}.
// The weight map is authoritative: only tensors it names are visible.
func stOpenSharded(indexPath string) (*SafeTensors, error) {
	data, err := os.ReadFile(indexPath)
	if err != nil {
		return nil, fmt.Errorf("open safetensors: %w", err)
	}
	var index struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(data, &index); err != nil {
		return nil, fmt.Errorf("%s: invalid safetensors index: %w", indexPath, err)
	}
	if len(index.WeightMap) == 0 {
		return nil, fmt.Errorf("%s: safetensors index has no weight_map entries", indexPath)
	}
	dir := filepath.Dir(indexPath)
	byShard := map[string][]string{} // shard file name → tensor names mapped to it
	for tensor, shard := range index.WeightMap {
		// Shards sit beside the index; a path would let a downloaded index
		// point anywhere on disk.
		if shard == "" || shard != filepath.Base(shard) || shard == "." || shard == ".." {
			return nil, fmt.Errorf("%s: weight_map maps %q to %q, which is not a file name beside the index", indexPath, tensor, shard)
		}
		byShard[shard] = append(byShard[shard], tensor)
	}
	shards := make([]string, 0, len(byShard))
	for shard := range byShard {
		shards = append(shards, shard)
	}
	sort.Strings(shards)

	s := &SafeTensors{path: indexPath, files: map[string][]byte{}, tensors: map[string]TensorInfo{}}
	for i, shard := range shards {
		shardPath := filepath.Join(dir, shard)
		if !stIsFile(shardPath) {
			s.Close()
			return nil, fmt.Errorf("%s: weight_map names shard %s, which does not exist", indexPath, shardPath)
		}
		tensors, metadata, err := s.stMapFile(shardPath)
		if err != nil {
			s.Close()
			return nil, err
		}
		if i == 0 {
			s.metadata = metadata
		}
		for _, name := range byShard[shard] {
			info, ok := tensors[name]
			if !ok {
				s.Close()
				return nil, fmt.Errorf("%s: weight_map places tensor %q in %s, which does not hold it", indexPath, name, shardPath)
			}
			s.tensors[name] = info
		}
	}
	s.stIndexNames()
	return s, nil
}

// stMapFile maps one file read-only, parses and checks its header, and keeps
// the mapping in s.files.
func (s *SafeTensors) stMapFile(path string) (map[string]TensorInfo, map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("open safetensors: %w", err)
	}
	defer f.Close() // the mapping outlives the descriptor
	st, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("open safetensors: %w", err)
	}
	size := st.Size()
	if size < 8 {
		return nil, nil, fmt.Errorf("%s: file is %d bytes, shorter than the 8-byte safetensors header length", path, size)
	}
	if size > math.MaxInt {
		return nil, nil, fmt.Errorf("%s: file of %d bytes is too large to map", path, size)
	}
	data, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: mmap: %w", path, err)
	}
	tensors, metadata, err := ParseSafeTensorsHeader(data, size, path)
	if err != nil {
		syscall.Munmap(data)
		return nil, nil, err
	}
	s.files[path] = data
	return tensors, metadata, nil
}

func (s *SafeTensors) stIndexNames() {
	s.names = make([]string, 0, len(s.tensors))
	for name := range s.tensors {
		s.names = append(s.names, name)
	}
	sort.Strings(s.names)
}

// Names returns the tensor names, sorted.
func (s *SafeTensors) Names() []string {
	return slices.Clone(s.names)
}

// Info returns where tensor name lives and its dtype and shape.
func (s *SafeTensors) Info(name string) (TensorInfo, bool) {
	info, ok := s.tensors[name]
	if !ok {
		return TensorInfo{}, false
	}
	info.Shape = slices.Clone(info.Shape)
	return info, true
}

// Metadata returns the __metadata__ strings of the (first) file; may be empty.
func (s *SafeTensors) Metadata() map[string]string {
	out := make(map[string]string, len(s.metadata))
	for k, v := range s.metadata {
		out[k] = v
	}
	return out
}

// Close unmaps the files. Reads after Close return an error; calling Close
// twice is harmless.
func (s *SafeTensors) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	var first error
	for path, data := range s.files {
		if err := syscall.Munmap(data); err != nil && first == nil {
			first = fmt.Errorf("%s: munmap: %w", path, err)
		}
	}
	s.files = nil
	return first
}

// stBytes runs use on the raw bytes of tensor name while the mapping is
// guaranteed to stay alive.
func (s *SafeTensors) stBytes(name string, use func(info TensorInfo, raw []byte) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return fmt.Errorf("%s: read tensor %q after Close", s.path, name)
	}
	info, ok := s.tensors[name]
	if !ok {
		return fmt.Errorf("%s: no tensor %q", s.path, name)
	}
	data := s.files[info.File]
	return use(info, data[info.Offset:info.Offset+info.Size])
}

// Float32 returns tensor name converted to float32 (from F32, F16, BF16 or
// F64) in a new slice, and its shape.
func (s *SafeTensors) Float32(name string) ([]float32, []int, error) {
	var out []float32
	var shape []int
	err := s.stBytes(name, func(info TensorInfo, raw []byte) error {
		size, _ := stDTypeSize(info.DType)
		out = make([]float32, info.Size/int64(size))
		shape = slices.Clone(info.Shape)
		return stDecodeFloat32(out, info, raw)
	})
	if err != nil {
		return nil, nil, err
	}
	return out, shape, nil
}

// stReadFloat32Into decodes tensor name into dst, which must have exactly its
// element count; the weight loader uses it to fill one big allocation without
// a copy per tensor.
func (s *SafeTensors) stReadFloat32Into(name string, dst []float32) error {
	return s.stBytes(name, func(info TensorInfo, raw []byte) error {
		size, _ := stDTypeSize(info.DType)
		if n := info.Size / int64(size); n != int64(len(dst)) {
			return fmt.Errorf("%s: tensor %q has %d elements, want %d", info.File, name, n, len(dst))
		}
		return stDecodeFloat32(dst, info, raw)
	})
}

func stDecodeFloat32(dst []float32, info TensorInfo, raw []byte) error {
	le := binary.LittleEndian
	switch info.DType {
	case "F32":
		for i := range dst {
			dst[i] = math.Float32frombits(le.Uint32(raw[4*i:]))
		}
	case "F16":
		for i := range dst {
			dst[i] = float16.Frombits(le.Uint16(raw[2*i:])).Float32()
		}
	case "BF16":
		// bfloat16 is the top half of a float32.
		for i := range dst {
			dst[i] = math.Float32frombits(uint32(le.Uint16(raw[2*i:])) << 16)
		}
	case "F64":
		for i := range dst {
			dst[i] = float32(math.Float64frombits(le.Uint64(raw[8*i:])))
		}
	default:
		return fmt.Errorf("%s: tensor %q has dtype %s, which cannot be read as float (want F32, F16, BF16 or F64)", info.File, info.Name, info.DType)
	}
	return nil
}

// Int64 returns integer tensor name (I64 or I32) as int64 in a new slice,
// and its shape.
func (s *SafeTensors) Int64(name string) ([]int64, []int, error) {
	var out []int64
	var shape []int
	err := s.stBytes(name, func(info TensorInfo, raw []byte) error {
		le := binary.LittleEndian
		size, _ := stDTypeSize(info.DType)
		n := info.Size / int64(size)
		switch info.DType {
		case "I64":
			out = make([]int64, n)
			for i := range out {
				out[i] = int64(le.Uint64(raw[8*i:]))
			}
		case "I32":
			out = make([]int64, n)
			for i := range out {
				out[i] = int64(int32(le.Uint32(raw[4*i:])))
			}
		default:
			return fmt.Errorf("%s: tensor %q has dtype %s, which cannot be read as integer (want I64 or I32)", info.File, name, info.DType)
		}
		shape = slices.Clone(info.Shape)
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	return out, shape, nil
}

// stDTypeSize gives the element size of the byte-aligned safetensors dtypes.
// All are accepted in a header, so a checkpoint carrying, say, a BOOL buffer
// next to its weights still opens; only the readers restrict dtypes. The
// sub-byte dtypes (F4, F6_*) are refused.
func stDTypeSize(dtype string) (int, bool) {
	switch dtype {
	case "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0":
		return 1, true
	case "I16", "U16", "F16", "BF16":
		return 2, true
	case "I32", "U32", "F32":
		return 4, true
	case "I64", "U64", "F64", "C64":
		return 8, true
	}
	return 0, false
}

// stEntry is one tensor of the JSON header; pointers tell a missing field
// from a zero one.
type stEntry struct {
	DType       *string  `json:"dtype"`
	Shape       *[]int64 `json:"shape"`
	DataOffsets *[]int64 `json:"data_offsets"`
}

// ParseSafeTensorsHeader parses and checks the header of a safetensors file.
// data holds the start of the file (at least the 8-byte length and the
// header; the whole file is fine), fileSize is the full file size, and name
// (the path) prefixes every error. It checks everything that could make a
// later read go out of bounds: the header length, the JSON, every entry's
// fields and dtype, that each tensor's byte range matches its shape and lies
// inside the data section, and that no two tensors overlap.
func ParseSafeTensorsHeader(data []byte, fileSize int64, name string) (map[string]TensorInfo, map[string]string, error) {
	if fileSize < 8 || len(data) < 8 {
		return nil, nil, fmt.Errorf("%s: file is %d bytes, shorter than the 8-byte safetensors header length", name, fileSize)
	}
	if int64(len(data)) > fileSize {
		return nil, nil, fmt.Errorf("%s: %d bytes given for a file of %d bytes", name, len(data), fileSize)
	}
	n := binary.LittleEndian.Uint64(data[:8])
	if n > stMaxHeaderBytes {
		return nil, nil, fmt.Errorf("%s: header length %d is above the %d-byte limit (not a safetensors file?)", name, n, stMaxHeaderBytes)
	}
	if int64(n) > fileSize-8 {
		return nil, nil, fmt.Errorf("%s: header length %d runs past the end of the %d-byte file (truncated?)", name, n, fileSize)
	}
	if int64(n) > int64(len(data))-8 {
		return nil, nil, fmt.Errorf("%s: header length %d but only %d header bytes given", name, n, len(data)-8)
	}
	header := data[8 : 8+n]
	dataLen := fileSize - 8 - int64(n)

	dec := json.NewDecoder(bytes.NewReader(header))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, fmt.Errorf("%s: header is not a JSON object", name)
	}
	tensors := map[string]TensorInfo{}
	var metadata map[string]string
	seenMetadata := false
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, fmt.Errorf("%s: invalid header JSON: %v", name, err)
		}
		key, ok := tok.(string)
		if !ok { // the decoder yields only strings in key position; be safe anyway
			return nil, nil, fmt.Errorf("%s: invalid header JSON: key %v", name, tok)
		}
		if _, dup := tensors[key]; dup || (key == "__metadata__" && seenMetadata) {
			return nil, nil, fmt.Errorf("%s: header names %q twice", name, key)
		}
		if key == "__metadata__" {
			seenMetadata = true
			if err := dec.Decode(&metadata); err != nil {
				return nil, nil, fmt.Errorf("%s: __metadata__ must map strings to strings: %v", name, err)
			}
			continue
		}
		var e stEntry
		if err := dec.Decode(&e); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, nil, fmt.Errorf("%s: invalid header JSON: it ends inside tensor %q", name, key)
			}
			return nil, nil, fmt.Errorf("%s: tensor %q: invalid header entry: %v", name, key, err)
		}
		info, err := stCheckEntry(key, e, dataLen, 8+int64(n), name)
		if err != nil {
			return nil, nil, err
		}
		tensors[key] = info
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, nil, fmt.Errorf("%s: invalid header JSON: %v", name, err)
	}
	// Only space padding may follow the object.
	if _, err := dec.Token(); err != io.EOF {
		return nil, nil, fmt.Errorf("%s: header has data after its JSON object", name)
	}
	if metadata == nil {
		metadata = map[string]string{}
	}
	if err := stCheckOverlap(tensors, name); err != nil {
		return nil, nil, err
	}
	return tensors, metadata, nil
}

func stCheckEntry(key string, e stEntry, dataLen, dataStart int64, file string) (TensorInfo, error) {
	fail := func(format string, args ...any) (TensorInfo, error) {
		return TensorInfo{}, fmt.Errorf("%s: tensor %q: %s", file, key, fmt.Sprintf(format, args...))
	}
	switch {
	case e.DType == nil:
		return fail("header entry has no dtype")
	case e.Shape == nil:
		return fail("header entry has no shape")
	case e.DataOffsets == nil:
		return fail("header entry has no data_offsets")
	}
	elemSize, ok := stDTypeSize(*e.DType)
	if !ok {
		return fail("unknown or unsupported dtype %q", *e.DType)
	}
	shape := make([]int, len(*e.Shape))
	count := int64(1)
	for i, d := range *e.Shape {
		if d < 0 {
			return fail("negative dimension in shape %v", *e.Shape)
		}
		if d != 0 && count > math.MaxInt64/d {
			return fail("shape %v is too large", *e.Shape)
		}
		count *= d
		shape[i] = int(d)
	}
	if count > math.MaxInt64/int64(elemSize) {
		return fail("shape %v is too large", *e.Shape)
	}
	offsets := *e.DataOffsets
	if len(offsets) != 2 {
		return fail("data_offsets must be [begin, end], got %v", offsets)
	}
	begin, end := offsets[0], offsets[1]
	if begin < 0 || end < begin {
		return fail("data_offsets [%d, %d] are not an ordered range", begin, end)
	}
	if end > dataLen {
		return fail("data_offsets [%d, %d] run past the %d-byte data section (truncated file?)", begin, end, dataLen)
	}
	if want := count * int64(elemSize); end-begin != want {
		return fail("data_offsets [%d, %d] span %d bytes, but %s shape %v needs %d", begin, end, end-begin, *e.DType, shape, want)
	}
	return TensorInfo{Name: key, DType: *e.DType, Shape: shape, Offset: dataStart + begin, Size: end - begin, File: file}, nil
}

// stCheckOverlap refuses tensors sharing bytes: a writer bug that would make
// two weights alias. Empty tensors occupy nothing and are skipped.
func stCheckOverlap(tensors map[string]TensorInfo, file string) error {
	ranges := make([]TensorInfo, 0, len(tensors))
	for _, t := range tensors {
		if t.Size > 0 {
			ranges = append(ranges, t)
		}
	}
	sort.Slice(ranges, func(i, j int) bool {
		if ranges[i].Offset != ranges[j].Offset {
			return ranges[i].Offset < ranges[j].Offset
		}
		return ranges[i].Name < ranges[j].Name
	})
	for i := 1; i < len(ranges); i++ {
		prev, cur := ranges[i-1], ranges[i]
		if cur.Offset < prev.Offset+prev.Size {
			return fmt.Errorf("%s: tensors %q and %q overlap in the data section", file, prev.Name, cur.Name)
		}
	}
	return nil
}

// NamedTensor is a tensor to write: exactly one of F32 and I64 holds the data
// (both nil is allowed for an empty F32 tensor).
type NamedTensor struct {
	Name  string
	Shape []int
	F32   []float32
	I64   []int64
}

// WriteSafeTensors writes tensors as F32/I64 to path atomically (temp file in
// the same directory, then rename), names sorted, header padded with spaces
// to 8-byte alignment as the reference writer does, so tensor data is
// aligned for mapping. Non-empty metadata becomes __metadata__.
func WriteSafeTensors(path string, tensors []NamedTensor, metadata map[string]string) error {
	sorted := slices.Clone(tensors)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })

	type entry struct {
		DType       string   `json:"dtype"`
		Shape       []int    `json:"shape"`
		DataOffsets [2]int64 `json:"data_offsets"`
	}
	header := map[string]any{}
	if len(metadata) > 0 {
		header["__metadata__"] = metadata
	}
	var offset int64
	for i, t := range sorted {
		if t.Name == "__metadata__" {
			return fmt.Errorf("write %s: a tensor cannot be named __metadata__", path)
		}
		if i > 0 && sorted[i-1].Name == t.Name {
			return fmt.Errorf("write %s: tensor %q given twice", path, t.Name)
		}
		if t.F32 != nil && t.I64 != nil {
			return fmt.Errorf("write %s: tensor %q has both float32 and int64 data", path, t.Name)
		}
		count := 1
		for _, d := range t.Shape {
			if d < 0 {
				return fmt.Errorf("write %s: tensor %q has negative dimension in shape %v", path, t.Name, t.Shape)
			}
			count *= d
		}
		dtype, elemSize, n := "F32", 4, len(t.F32)
		if t.I64 != nil {
			dtype, elemSize, n = "I64", 8, len(t.I64)
		}
		if n != count {
			return fmt.Errorf("write %s: tensor %q has %d elements but shape %v needs %d", path, t.Name, n, t.Shape, count)
		}
		shape := t.Shape
		if shape == nil {
			shape = []int{} // a scalar: JSON [] rather than null
		}
		size := int64(count) * int64(elemSize)
		header[t.Name] = entry{DType: dtype, Shape: shape, DataOffsets: [2]int64{offset, offset + size}}
		offset += size
	}
	headerJSON, err := json.Marshal(header) // map keys come out sorted
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if pad := (8 - len(headerJSON)%8) % 8; pad > 0 {
		headerJSON = append(headerJSON, bytes.Repeat([]byte{' '}, pad)...)
	}

	return stWriteAtomic(path, func(w *bufio.Writer) error {
		var buf [8]byte
		binary.LittleEndian.PutUint64(buf[:], uint64(len(headerJSON)))
		w.Write(buf[:])
		w.Write(headerJSON)
		chunk := make([]byte, 0, 1<<16)
		for _, t := range sorted {
			for i, v := range t.F32 {
				chunk = binary.LittleEndian.AppendUint32(chunk, math.Float32bits(v))
				if len(chunk) == cap(chunk) || i == len(t.F32)-1 {
					w.Write(chunk)
					chunk = chunk[:0]
				}
			}
			for i, v := range t.I64 {
				chunk = binary.LittleEndian.AppendUint64(chunk, uint64(v))
				if len(chunk) == cap(chunk) || i == len(t.I64)-1 {
					w.Write(chunk)
					chunk = chunk[:0]
				}
			}
		}
		return nil // bufio.Writer errors are sticky; Flush reports them
	})
}

// stWriteAtomic writes a file through fill into a temp file beside path and
// renames it into place, so readers never see a half-written file.
func stWriteAtomic(path string, fill func(w *bufio.Writer) error) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	w := bufio.NewWriterSize(tmp, 1<<20)
	if err := fill(w); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := errors.Join(w.Flush(), tmp.Chmod(0o644), tmp.Sync(), tmp.Close()); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
