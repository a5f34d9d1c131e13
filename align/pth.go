package align

import (
	"archive/zip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/big"
	"path"
	"slices"
	"strings"

	"github.com/x448/float16"
)

// PTHTensor is one tensor of a PyTorch checkpoint, converted to float32 and
// made contiguous (row-major in Shape).
type PTHTensor struct {
	Shape []int
	Data  []float32
	// Storage is the PyTorch storage type it was saved as ("FloatStorage", …).
	Storage string
}

// Limits that keep a hostile or corrupt file from making the reader allocate
// without bound. The original networks are under 1 MB.
const (
	maxPickleBytes  = 256 << 20
	maxStorageBytes = 1 << 30
	maxPickleDepth  = 1 << 20 // stack + memo entries
)

// ReadPTH reads the model_state_dict tensors of a PyTorch checkpoint written
// by torch.save (the zip format of PyTorch ≥ 1.6: <dir>/data.pkl, a pickle,
// and <dir>/data/<key>, one raw storage per key).
//
// The pickle is interpreted, never executed: the only callables it may name
// are the few torch.save uses to rebuild tensors and OrderedDict; anything
// else (optimizer state, loss lists, unknown classes) becomes an inert
// placeholder so that a checkpoint with extra content still loads. A file
// holding a bare state dict (torch.save(model.state_dict())) is accepted too.
func ReadPTH(file string) (map[string]PTHTensor, error) {
	zr, err := zip.OpenReader(file)
	if err != nil {
		if errors.Is(err, zip.ErrFormat) {
			return nil, fmt.Errorf("%s: not a zip archive (PyTorch checkpoints are zip files since torch 1.6; re-save older ones with a recent torch): %w", file, err)
		}
		return nil, fmt.Errorf("reading checkpoint: %w", err) // err names the file
	}
	defer zr.Close()
	tensors, err := readPTHArchive(&zr.Reader)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return tensors, nil
}

func readPTHArchive(zr *zip.Reader) (map[string]PTHTensor, error) {
	// torch.save puts everything under one top directory whose name is the
	// file's base name at save time, so it can be anything: find data.pkl.
	var pkl *zip.File
	for _, f := range zr.File {
		dir, name := path.Split(f.Name)
		if name == "data.pkl" && strings.Count(dir, "/") == 1 {
			pkl = f
			break
		}
	}
	if pkl == nil {
		return nil, errors.New("no <dir>/data.pkl in the zip archive: not a torch.save checkpoint")
	}
	prefix := strings.TrimSuffix(pkl.Name, "data.pkl")
	files := make(map[string]*zip.File, len(zr.File))
	for _, f := range zr.File {
		files[f.Name] = f
	}

	bigEndian := false
	if f, ok := files[prefix+"byteorder"]; ok {
		b, err := readZipFile(f, 16)
		if err != nil {
			return nil, err
		}
		switch strings.TrimSpace(string(b)) {
		case "little":
		case "big":
			bigEndian = true
		default:
			return nil, fmt.Errorf("%s: unknown byte order %q", f.Name, b)
		}
	}

	data, err := readZipFile(pkl, maxPickleBytes)
	if err != nil {
		return nil, err
	}
	root, err := unpickle(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", pkl.Name, err)
	}

	state, err := findStateDict(root)
	if err != nil {
		return nil, err
	}
	out := make(map[string]PTHTensor, len(state.keys))
	for i, k := range state.keys {
		name, ok := k.(string)
		if !ok {
			return nil, fmt.Errorf("model_state_dict key %s is not a string", describe(k))
		}
		t, ok := state.vals[i].(*pklTensor)
		if !ok {
			return nil, fmt.Errorf("model_state_dict[%q] is %s, not a tensor", name, describe(state.vals[i]))
		}
		pt, err := materialize(t, files, prefix, bigEndian)
		if err != nil {
			return nil, fmt.Errorf("tensor %q: %w", name, err)
		}
		out[name] = pt
	}
	return out, nil
}

// findStateDict picks model_state_dict out of a checkpoint dict, or accepts
// the root itself when it is a state dict (every value a tensor).
func findStateDict(root any) (*pklDict, error) {
	d, ok := root.(*pklDict)
	if !ok {
		return nil, fmt.Errorf("checkpoint holds %s, not a dict with model_state_dict", describe(root))
	}
	if v, ok := d.get("model_state_dict"); ok {
		sd, ok := v.(*pklDict)
		if !ok {
			return nil, fmt.Errorf("model_state_dict is %s, not a dict", describe(v))
		}
		return sd, nil
	}
	allTensors := len(d.vals) > 0
	for _, v := range d.vals {
		if _, ok := v.(*pklTensor); !ok {
			allTensors = false
			break
		}
	}
	if allTensors {
		return d, nil
	}
	var keys []string
	for _, k := range d.keys {
		if s, ok := k.(string); ok {
			keys = append(keys, fmt.Sprintf("%q", s))
		} else {
			keys = append(keys, describe(k))
		}
		if len(keys) == 20 {
			keys = append(keys, "…")
			break
		}
	}
	return nil, fmt.Errorf("no model_state_dict in the checkpoint (top-level keys: %s)", strings.Join(keys, ", "))
}

func readZipFile(f *zip.File, limit int64) ([]byte, error) {
	if f.UncompressedSize64 > uint64(limit) {
		return nil, fmt.Errorf("%s: %d bytes, more than the %d this reader accepts", f.Name, f.UncompressedSize64, limit)
	}
	r, err := f.Open()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.Name, err)
	}
	defer r.Close()
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.Name, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s: more than %d bytes", f.Name, limit)
	}
	return b, nil
}

// storageElemSize maps the storage classes torch.save names to their
// element size in bytes.
var storageElemSize = map[string]int{
	"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "DoubleStorage": 8,
	"LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
	"ByteStorage": 1, "BoolStorage": 1,
}

// materialize reads a tensor's storage record and copies the elements it
// views (storage offset and strides honoured) into a contiguous float32 slice.
// Integer and boolean tensors are converted too, so that a state dict with a
// counter in it (BatchNorm's num_batches_tracked) still loads.
func materialize(t *pklTensor, files map[string]*zip.File, prefix string, bigEndian bool) (PTHTensor, error) {
	st := t.storage
	size, ok := storageElemSize[st.typ]
	if !ok {
		return PTHTensor{}, fmt.Errorf("storage type %q is not supported", st.typ)
	}
	if st.numel > maxStorageBytes/int64(size) {
		return PTHTensor{}, fmt.Errorf("storage %s of %d elements is too large", st.key, st.numel)
	}
	if len(t.shape) != len(t.stride) {
		return PTHTensor{}, fmt.Errorf("shape %v and stride %v differ in rank", t.shape, t.stride)
	}
	numel := int64(1)
	for i, n := range t.shape {
		if n < 0 || t.stride[i] < 0 {
			return PTHTensor{}, fmt.Errorf("bad shape %v / stride %v", t.shape, t.stride)
		}
		if n > 0 && numel > maxStorageBytes/n {
			return PTHTensor{}, fmt.Errorf("shape %v is too large", t.shape)
		}
		numel *= n
	}
	if numel > 0 {
		// The largest storage index the view touches must exist; checked
		// dimension by dimension so the sum cannot overflow.
		last := t.offset
		if last < 0 || last >= st.numel {
			return PTHTensor{}, fmt.Errorf("storage offset %d is outside its storage of %d elements", t.offset, st.numel)
		}
		for i, n := range t.shape {
			if n > 1 && t.stride[i] > st.numel {
				last = st.numel // any step of this size leaves the storage
			} else {
				last += (n - 1) * t.stride[i]
			}
			if last >= st.numel {
				return PTHTensor{}, fmt.Errorf("view (offset %d, shape %v, stride %v) runs past its storage of %d elements", t.offset, t.shape, t.stride, st.numel)
			}
		}
	}
	f, ok := files[prefix+"data/"+st.key]
	if !ok {
		return PTHTensor{}, fmt.Errorf("missing storage record %sdata/%s", prefix, st.key)
	}
	raw, err := readZipFile(f, st.numel*int64(size))
	if err != nil {
		return PTHTensor{}, err
	}
	if int64(len(raw)) != st.numel*int64(size) {
		return PTHTensor{}, fmt.Errorf("storage record %s holds %d bytes, want %d (%d × %s)", f.Name, len(raw), st.numel*int64(size), st.numel, st.typ)
	}
	var order binary.ByteOrder = binary.LittleEndian
	if bigEndian {
		order = binary.BigEndian
	}
	elem := func(i int64) float32 {
		b := raw[i*int64(size):]
		switch st.typ {
		case "FloatStorage":
			return math.Float32frombits(order.Uint32(b))
		case "HalfStorage":
			return float16.Frombits(order.Uint16(b)).Float32()
		case "BFloat16Storage":
			return math.Float32frombits(uint32(order.Uint16(b)) << 16)
		case "DoubleStorage":
			return float32(math.Float64frombits(order.Uint64(b)))
		case "LongStorage":
			return float32(int64(order.Uint64(b)))
		case "IntStorage":
			return float32(int32(order.Uint32(b)))
		case "ShortStorage":
			return float32(int16(order.Uint16(b)))
		case "CharStorage":
			return float32(int8(b[0]))
		default: // ByteStorage, BoolStorage
			return float32(b[0])
		}
	}

	shape := make([]int, len(t.shape))
	for i, n := range t.shape {
		shape[i] = int(n)
	}
	out := make([]float32, numel)
	// Walk the view in row-major order with an odometer over the indices.
	idx := make([]int64, len(shape))
	pos := t.offset
	for o := range out {
		out[o] = elem(pos)
		for d := len(idx) - 1; d >= 0; d-- {
			idx[d]++
			pos += t.stride[d]
			if idx[d] < t.shape[d] {
				break
			}
			pos -= idx[d] * t.stride[d]
			idx[d] = 0
		}
	}
	return PTHTensor{Shape: shape, Data: out, Storage: st.typ}, nil
}

// ---- the unpickler ----

// Values the unpickler builds. Python ints are int64 (or *big.Int when
// larger), floats float64, str string, bytes []byte, None nil.
type (
	pklList  struct{ items []any }
	pklTuple []any
	pklDict  struct {
		keys, vals []any
		index      map[any]int // for hashable scalar keys
	}
	// pklGlobal is a name from GLOBAL/STACK_GLOBAL. Only the names torch.save
	// needs mean anything; the rest stay inert.
	pklGlobal struct{ module, name string }
	// pklObject is the inert result of calling an unknown global.
	pklObject struct {
		class *pklGlobal
		args  any
		state any
	}
	pklStorage struct {
		typ, key, location string
		numel              int64
	}
	pklTensor struct {
		storage       *pklStorage
		offset        int64
		shape, stride []int64
	}
	pklMark struct{}
)

func newDict() *pklDict { return &pklDict{index: map[any]int{}} }

func (d *pklDict) set(k, v any) {
	switch k.(type) {
	case string, int64, float64, bool, nil:
		if i, ok := d.index[k]; ok {
			d.vals[i] = v
			return
		}
		d.index[k] = len(d.keys)
	}
	d.keys = append(d.keys, k)
	d.vals = append(d.vals, v)
}

func (d *pklDict) get(k string) (any, bool) {
	i, ok := d.index[k]
	if !ok {
		return nil, false
	}
	return d.vals[i], true
}

// describe names a value's kind for error messages. It never prints a
// value's contents: a pickle can build a tuple that shares itself 2^n
// times, and printing that would never finish.
func describe(v any) string {
	switch v := v.(type) {
	case nil:
		return "None"
	case string:
		if len(v) > 40 {
			v = v[:40] + "…"
		}
		return fmt.Sprintf("the string %q", v)
	case int64:
		return fmt.Sprintf("the int %d", v)
	case *pklDict:
		return "a dict"
	case *pklList:
		return "a list"
	case pklTuple:
		return "a tuple"
	case *pklTensor:
		return "a tensor"
	case *pklObject:
		return fmt.Sprintf("an object of %s.%s", v.class.module, v.class.name)
	case *pklGlobal:
		return fmt.Sprintf("the global %s.%s", v.module, v.name)
	}
	return fmt.Sprintf("a %T", v)
}

type unpickler struct {
	data  []byte
	pos   int
	opPos int // offset of the opcode being interpreted
	stack []any
	marks []int
	memo  map[int]any
}

var errTruncated = errors.New("truncated pickle")

// unpickle interprets a pickle (protocols 2–5, the subset torch.save emits
// plus the common containers) and returns the object STOP yields.
func unpickle(data []byte) (any, error) {
	u := &unpickler{data: data, memo: map[int]any{}}
	v, err := u.run()
	if err != nil {
		return nil, fmt.Errorf("pickle offset %d: %w", u.opPos, err)
	}
	return v, nil
}

func (u *unpickler) take(n int) ([]byte, error) {
	if n < 0 || n > len(u.data)-u.pos {
		return nil, errTruncated
	}
	b := u.data[u.pos : u.pos+n]
	u.pos += n
	return b, nil
}

func (u *unpickler) uint(n int) (uint64, error) {
	b, err := u.take(n)
	if err != nil {
		return 0, err
	}
	var v uint64
	for i := n - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v, nil
}

func (u *unpickler) line() (string, error) {
	for i := u.pos; i < len(u.data); i++ {
		if u.data[i] == '\n' {
			s := string(u.data[u.pos:i])
			u.pos = i + 1
			return s, nil
		}
	}
	return "", errTruncated
}

func (u *unpickler) push(v any) error {
	if len(u.stack) >= maxPickleDepth {
		return errors.New("pickle stack too deep")
	}
	u.stack = append(u.stack, v)
	return nil
}

func (u *unpickler) pop() (any, error) {
	if len(u.stack) == 0 || u.top() == (pklMark{}) {
		return nil, errors.New("stack underflow")
	}
	v := u.stack[len(u.stack)-1]
	u.stack = u.stack[:len(u.stack)-1]
	return v, nil
}

func (u *unpickler) top() any { return u.stack[len(u.stack)-1] }

// popMark returns the items pushed since the last MARK and removes them.
func (u *unpickler) popMark() ([]any, error) {
	if len(u.marks) == 0 {
		return nil, errors.New("no MARK on the stack")
	}
	m := u.marks[len(u.marks)-1]
	u.marks = u.marks[:len(u.marks)-1]
	items := slices.Clone(u.stack[m+1:])
	u.stack = u.stack[:m]
	return items, nil
}

func (u *unpickler) memoize(i int, v any) error {
	if i < 0 || len(u.memo) >= maxPickleDepth {
		return errors.New("memo too large")
	}
	u.memo[i] = v
	return nil
}

func (u *unpickler) run() (any, error) {
	for {
		if u.pos >= len(u.data) {
			return nil, fmt.Errorf("%w: no STOP", errTruncated)
		}
		u.opPos = u.pos
		op := u.data[u.pos]
		u.pos++
		if err := u.step(op); err != nil {
			switch {
			case err == errStop:
				return u.pop()
			case errors.Is(err, errUnsupported):
				return nil, err
			}
			return nil, fmt.Errorf("opcode %s: %w", opName(op), err)
		}
	}
}

var (
	errStop        = errors.New("STOP")
	errUnsupported = errors.New("unsupported pickle opcode")
)

func opName(op byte) string {
	if op >= 0x20 && op < 0x7f {
		return fmt.Sprintf("%q (0x%02x)", rune(op), op)
	}
	return fmt.Sprintf("0x%02x", op)
}

func (u *unpickler) step(op byte) error {
	switch op {
	case 0x80: // PROTO
		_, err := u.take(1)
		return err
	case 0x95: // FRAME: a length hint only
		_, err := u.take(8)
		return err
	case '.': // STOP
		return errStop
	case '(': // MARK
		u.marks = append(u.marks, len(u.stack))
		return u.push(pklMark{})
	case '0': // POP
		_, err := u.pop()
		return err
	case '1': // POP_MARK
		_, err := u.popMark()
		return err
	case '2': // DUP
		if len(u.stack) == 0 {
			return errors.New("stack underflow")
		}
		return u.push(u.top())

	case 'N': // NONE
		return u.push(nil)
	case 0x88: // NEWTRUE
		return u.push(true)
	case 0x89: // NEWFALSE
		return u.push(false)
	case 'J': // BININT
		v, err := u.uint(4)
		return u.pushErr(int64(int32(uint32(v))), err)
	case 'K': // BININT1
		v, err := u.uint(1)
		return u.pushErr(int64(v), err)
	case 'M': // BININT2
		v, err := u.uint(2)
		return u.pushErr(int64(v), err)
	case 0x8a, 0x8b: // LONG1, LONG4
		width := 1
		if op == 0x8b {
			width = 4
		}
		n, err := u.uint(width)
		if err != nil {
			return err
		}
		if n > 1<<16 {
			return fmt.Errorf("integer of %d bytes", n)
		}
		b, err := u.take(int(n))
		if err != nil {
			return err
		}
		return u.push(decodeLong(b))
	case 'G': // BINFLOAT, big-endian
		b, err := u.take(8)
		if err != nil {
			return err
		}
		return u.push(math.Float64frombits(binary.BigEndian.Uint64(b)))

	case 'X', 0x8c, 0x8d: // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
		width := map[byte]int{'X': 4, 0x8c: 1, 0x8d: 8}[op]
		b, err := u.counted(width)
		return u.pushErr(string(b), err)
	case 'U', 'T': // SHORT_BINSTRING, BINSTRING (protocol-2 byte strings)
		width := map[byte]int{'U': 1, 'T': 4}[op]
		b, err := u.counted(width)
		return u.pushErr(string(b), err)
	case 'C', 'B', 0x8e: // SHORT_BINBYTES, BINBYTES, BINBYTES8
		width := map[byte]int{'C': 1, 'B': 4, 0x8e: 8}[op]
		b, err := u.counted(width)
		return u.pushErr(slices.Clone(b), err)

	case '}': // EMPTY_DICT
		return u.push(newDict())
	case ']': // EMPTY_LIST
		return u.push(&pklList{})
	case ')': // EMPTY_TUPLE
		return u.push(pklTuple{})
	case 0x8f: // EMPTY_SET: kept as a list, sets never matter here
		return u.push(&pklList{})
	case 0x85, 0x86, 0x87: // TUPLE1, TUPLE2, TUPLE3
		n := int(op - 0x84)
		if len(u.stack) < n {
			return errors.New("stack underflow")
		}
		t := slices.Clone(u.stack[len(u.stack)-n:])
		for _, v := range t {
			if v == (pklMark{}) {
				return errors.New("stack underflow")
			}
		}
		u.stack = u.stack[:len(u.stack)-n]
		return u.push(pklTuple(t))
	case 't': // TUPLE
		items, err := u.popMark()
		return u.pushErr(pklTuple(items), err)
	case 'l': // LIST
		items, err := u.popMark()
		return u.pushErr(&pklList{items: items}, err)
	case 0x91: // FROZENSET
		items, err := u.popMark()
		return u.pushErr(pklTuple(items), err)
	case 'd': // DICT
		items, err := u.popMark()
		if err != nil {
			return err
		}
		d := newDict()
		if err := setItems(d, items); err != nil {
			return err
		}
		return u.push(d)
	case 's': // SETITEM
		v, err := u.pop()
		if err != nil {
			return err
		}
		k, err := u.pop()
		if err != nil {
			return err
		}
		return u.setItems([]any{k, v})
	case 'u': // SETITEMS
		items, err := u.popMark()
		if err != nil {
			return err
		}
		return u.setItems(items)
	case 'a': // APPEND
		v, err := u.pop()
		if err != nil {
			return err
		}
		return u.appendItems([]any{v})
	case 'e', 0x90: // APPENDS, ADDITEMS
		items, err := u.popMark()
		if err != nil {
			return err
		}
		return u.appendItems(items)

	case 'q': // BINPUT
		i, err := u.uint(1)
		return u.put(int(i), err)
	case 'r': // LONG_BINPUT
		i, err := u.uint(4)
		return u.put(int(i), err)
	case 0x94: // MEMOIZE
		return u.put(len(u.memo), nil)
	case 'h', 'j': // BINGET, LONG_BINGET
		width := 1
		if op == 'j' {
			width = 4
		}
		i, err := u.uint(width)
		if err != nil {
			return err
		}
		v, ok := u.memo[int(i)]
		if !ok {
			return fmt.Errorf("memo entry %d was never stored", i)
		}
		return u.push(v)

	case 'c': // GLOBAL "module\nname\n"
		module, err := u.line()
		if err != nil {
			return err
		}
		name, err := u.line()
		if err != nil {
			return err
		}
		return u.push(&pklGlobal{module: module, name: name})
	case 0x93: // STACK_GLOBAL
		name, err := u.pop()
		if err != nil {
			return err
		}
		module, err := u.pop()
		if err != nil {
			return err
		}
		ms, ok1 := module.(string)
		ns, ok2 := name.(string)
		if !ok1 || !ok2 {
			return errors.New("STACK_GLOBAL operands are not strings")
		}
		return u.push(&pklGlobal{module: ms, name: ns})
	case 'R': // REDUCE: callable(*args)
		args, err := u.pop()
		if err != nil {
			return err
		}
		fn, err := u.pop()
		if err != nil {
			return err
		}
		v, err := call(fn, args)
		return u.pushErr(v, err)
	case 0x81: // NEWOBJ: cls.__new__(cls, *args)
		args, err := u.pop()
		if err != nil {
			return err
		}
		cls, err := u.pop()
		if err != nil {
			return err
		}
		v, err := call(cls, args)
		return u.pushErr(v, err)
	case 0x92: // NEWOBJ_EX: cls, args, kwargs
		if _, err := u.pop(); err != nil {
			return err
		}
		args, err := u.pop()
		if err != nil {
			return err
		}
		cls, err := u.pop()
		if err != nil {
			return err
		}
		v, err := call(cls, args)
		return u.pushErr(v, err)
	case 'b': // BUILD: obj.__setstate__(state)
		state, err := u.pop()
		if err != nil {
			return err
		}
		if len(u.stack) == 0 {
			return errors.New("stack underflow")
		}
		// Dicts and tensors only get attributes this way (OrderedDict's
		// _metadata, a tensor's hooks); none of them matter for the weights.
		if o, ok := u.top().(*pklObject); ok {
			o.state = state
		}
		return nil
	case 'Q': // BINPERSID: torch's reference to a storage record
		pid, err := u.pop()
		if err != nil {
			return err
		}
		st, err := persistentLoad(pid)
		return u.pushErr(st, err)
	}
	return fmt.Errorf("%w %s (torch.save writes protocol 2; this is not one of its pickles)", errUnsupported, opName(op))
}

func (u *unpickler) pushErr(v any, err error) error {
	if err != nil {
		return err
	}
	return u.push(v)
}

func (u *unpickler) put(i int, err error) error {
	if err != nil {
		return err
	}
	if len(u.stack) == 0 || u.top() == (pklMark{}) {
		return errors.New("memoizing an empty stack")
	}
	return u.memoize(i, u.top())
}

// counted reads a length-prefixed byte string.
func (u *unpickler) counted(width int) ([]byte, error) {
	n, err := u.uint(width)
	if err != nil {
		return nil, err
	}
	if n > uint64(len(u.data)) {
		return nil, errTruncated
	}
	return u.take(int(n))
}

func (u *unpickler) setItems(items []any) error {
	if len(items)%2 != 0 {
		return errors.New("odd number of items for a dict")
	}
	if len(u.stack) == 0 {
		return errors.New("stack underflow")
	}
	switch d := u.top().(type) {
	case *pklDict:
		return setItems(d, items)
	case *pklObject: // a dict subclass we do not know: harmless, drop
		return nil
	}
	return fmt.Errorf("SETITEM on %s", describe(u.top()))
}

func setItems(d *pklDict, items []any) error {
	if len(items)%2 != 0 {
		return errors.New("odd number of items for a dict")
	}
	for i := 0; i < len(items); i += 2 {
		d.set(items[i], items[i+1])
	}
	return nil
}

func (u *unpickler) appendItems(items []any) error {
	if len(u.stack) == 0 {
		return errors.New("stack underflow")
	}
	switch l := u.top().(type) {
	case *pklList:
		l.items = append(l.items, items...)
		return nil
	case *pklObject: // a list subclass or set we do not know: drop
		return nil
	}
	return fmt.Errorf("APPEND on %s", describe(u.top()))
}

// decodeLong decodes a little-endian two's-complement integer.
func decodeLong(b []byte) any {
	if len(b) <= 8 {
		var v uint64
		for i := len(b) - 1; i >= 0; i-- {
			v = v<<8 | uint64(b[i])
		}
		if n := len(b); n > 0 && n < 8 && b[n-1]&0x80 != 0 {
			v |= ^uint64(0) << (8 * n) // sign-extend
		}
		return int64(v)
	}
	be := make([]byte, len(b))
	for i, c := range b {
		be[len(b)-1-i] = c
	}
	v := new(big.Int).SetBytes(be)
	if b[len(b)-1]&0x80 != 0 {
		v.Sub(v, new(big.Int).Lsh(big.NewInt(1), uint(8*len(b))))
	}
	return v
}

// call applies a global to its arguments. Only the callables torch.save
// uses to rebuild tensors and dicts do anything; every other call yields an
// inert pklObject, which is safe because nothing is ever executed.
func call(fn, args any) (any, error) {
	g, ok := fn.(*pklGlobal)
	if !ok {
		return nil, fmt.Errorf("calling %s", describe(fn))
	}
	a, ok := args.(pklTuple)
	if !ok {
		return nil, fmt.Errorf("arguments of %s.%s are %s, not a tuple", g.module, g.name, describe(args))
	}
	switch g.module + "." + g.name {
	case "collections.OrderedDict", "builtins.dict", "__builtin__.dict":
		if len(a) == 0 {
			return newDict(), nil
		}
	case "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor":
		return rebuildTensor(a)
	case "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state":
		// (data, requires_grad, backward_hooks[, state]): a Parameter is its data.
		if len(a) >= 1 {
			if t, ok := a[0].(*pklTensor); ok {
				return t, nil
			}
		}
	}
	return &pklObject{class: g, args: args}, nil
}

// rebuildTensor reads the arguments of torch._utils._rebuild_tensor_v2:
// (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]).
func rebuildTensor(a pklTuple) (any, error) {
	if len(a) < 4 {
		return nil, fmt.Errorf("_rebuild_tensor_v2 with %d arguments, want at least 4", len(a))
	}
	st, ok := a[0].(*pklStorage)
	if !ok {
		return nil, fmt.Errorf("_rebuild_tensor_v2 storage is %s", describe(a[0]))
	}
	offset, ok := a[1].(int64)
	if !ok {
		return nil, fmt.Errorf("_rebuild_tensor_v2 offset is %s", describe(a[1]))
	}
	shape, err := intTuple(a[2])
	if err != nil {
		return nil, fmt.Errorf("_rebuild_tensor_v2 size: %w", err)
	}
	stride, err := intTuple(a[3])
	if err != nil {
		return nil, fmt.Errorf("_rebuild_tensor_v2 stride: %w", err)
	}
	return &pklTensor{storage: st, offset: offset, shape: shape, stride: stride}, nil
}

func intTuple(v any) ([]int64, error) {
	t, ok := v.(pklTuple)
	if !ok {
		return nil, fmt.Errorf("%s, not a tuple", describe(v))
	}
	out := make([]int64, len(t))
	for i, e := range t {
		n, ok := e.(int64)
		if !ok {
			return nil, fmt.Errorf("element %d is %s, not an int", i, describe(e))
		}
		out[i] = n
	}
	return out, nil
}

// persistentLoad resolves torch.save's persistent ids,
// ('storage', storage_type, key, location, numel), to a storage reference;
// the bytes are read later, only for the tensors that are wanted.
func persistentLoad(pid any) (any, error) {
	t, ok := pid.(pklTuple)
	if !ok || len(t) < 5 || t[0] != "storage" {
		return nil, fmt.Errorf("persistent id %s is not a ('storage', type, key, location, numel) tuple", describe(pid))
	}
	g, ok := t[1].(*pklGlobal)
	if !ok {
		return nil, fmt.Errorf("storage type is %s", describe(t[1]))
	}
	key, ok1 := t[2].(string)
	loc, _ := t[3].(string)
	numel, ok2 := t[4].(int64)
	if !ok1 || !ok2 || numel < 0 {
		return nil, errors.New("malformed ('storage', type, key, location, numel) reference")
	}
	typ := g.name
	if g.module != "torch" {
		typ = g.module + "." + g.name
	}
	return &pklStorage{typ: typ, key: key, location: loc, numel: numel}, nil
}
