package transformer

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
)

// LayerWeights holds one transformer block in the canonical host layout.
// Every matrix is row-major [out, in], so y = x·Wᵀ for both families: HF
// GPT-2's Conv1D stores [in, out] and is transposed on load.
type LayerWeights struct {
	Norm1W, Norm1B []float32 // [C] GPT-2 ln_1 (w, b); Llama input_layernorm (w; B nil)
	QKVW           []float32 // [(NH+2·NKV)·HS, C] rows: q heads, then k heads, then v heads
	QKVB           []float32 // [(NH+2·NKV)·HS] GPT-2; nil for Llama
	OW             []float32 // [C, NH·HS]
	OB             []float32 // [C] GPT-2; nil for Llama
	Norm2W, Norm2B []float32 // [C] GPT-2 ln_2; Llama post_attention_layernorm (B nil)
	UpW            []float32 // GPT-2 c_fc [FFN, C]; Llama [2·FFN, C]: rows 0..FFN-1 gate_proj, FFN..2·FFN-1 up_proj
	UpB            []float32 // [FFN] GPT-2; nil for Llama
	DownW          []float32 // [C, FFN]
	DownB          []float32 // [C] GPT-2; nil for Llama
}

// Weights holds a whole model in float32. All tensors are carved out of one
// allocation (in the order of wSlots), so a backend can upload the model in
// one copy.
type Weights struct {
	Wte            []float32 // [V, C]
	Wpe            []float32 // [MaxPos, C] GPT-2; nil for Llama
	NormFW, NormFB []float32 // [C] ln_f / model.norm (B nil for Llama)
	LMHead         []float32 // [V, C]; the same slice as Wte when embeddings are tied
	Layers         []LayerWeights
}

// wInit says how RandomWeights fills a tensor.
type wInit int

const (
	wInitMatrix wInit = iota // N(0, 0.02), the HF initializer_range
	wInitNorm                // 1 + small noise, so a misplaced norm weight shows
	wInitBias                // small noise, so a misplaced bias shows
)

// wSlot is one canonical tensor: where it goes and how many floats it has.
type wSlot struct {
	dst  *[]float32
	n    int
	init wInit
}

// wSlots lists the canonical tensors of c in allocation order, pointing into
// w (whose Layers must have NLayer entries). The LM head is a slot only when
// untied.
func wSlots(c *Config, w *Weights) []wSlot {
	gpt2 := c.Family == GPT2
	qkvRows := (c.NH + 2*c.NKV) * c.HS
	var s []wSlot
	add := func(dst *[]float32, n int, init wInit) { s = append(s, wSlot{dst, n, init}) }
	add(&w.Wte, c.VocabSize*c.C, wInitMatrix)
	if gpt2 {
		add(&w.Wpe, c.MaxPos*c.C, wInitMatrix)
	}
	for i := range w.Layers {
		l := &w.Layers[i]
		add(&l.Norm1W, c.C, wInitNorm)
		if gpt2 {
			add(&l.Norm1B, c.C, wInitBias)
		}
		add(&l.QKVW, qkvRows*c.C, wInitMatrix)
		if gpt2 {
			add(&l.QKVB, qkvRows, wInitBias)
		}
		add(&l.OW, c.C*c.NH*c.HS, wInitMatrix)
		if gpt2 {
			add(&l.OB, c.C, wInitBias)
		}
		add(&l.Norm2W, c.C, wInitNorm)
		if gpt2 {
			add(&l.Norm2B, c.C, wInitBias)
			add(&l.UpW, c.FFN*c.C, wInitMatrix)
			add(&l.UpB, c.FFN, wInitBias)
		} else {
			add(&l.UpW, 2*c.FFN*c.C, wInitMatrix)
		}
		add(&l.DownW, c.C*c.FFN, wInitMatrix)
		if gpt2 {
			add(&l.DownB, c.C, wInitBias)
		}
	}
	add(&w.NormFW, c.C, wInitNorm)
	if gpt2 {
		add(&w.NormFB, c.C, wInitBias)
	}
	if !c.TiedEmbeddings {
		add(&w.LMHead, c.VocabSize*c.C, wInitMatrix)
	}
	return s
}

// wTensorSizes gives the float count of every canonical tensor of c.
func wTensorSizes(c *Config) []int {
	w := &Weights{Layers: make([]LayerWeights, max(c.NLayer, 0))}
	slots := wSlots(c, w)
	sizes := make([]int, len(slots))
	for i, s := range slots {
		sizes[i] = s.n
	}
	return sizes
}

// wAllocate makes zeroed Weights for c: one allocation carved by the size
// table. Each slice's capacity ends at its length, so an append can never
// spill into a neighbour.
func wAllocate(c *Config) (*Weights, []wSlot) {
	w := &Weights{Layers: make([]LayerWeights, c.NLayer)}
	slots := wSlots(c, w)
	total := 0
	for _, s := range slots {
		total += s.n
	}
	buf := make([]float32, total)
	off := 0
	for _, s := range slots {
		*s.dst = buf[off : off+s.n : off+s.n]
		off += s.n
	}
	if c.TiedEmbeddings {
		w.LMHead = w.Wte
	}
	return w, slots
}

// wSource is one HF checkpoint tensor and where it lands.
type wSource struct {
	name      string
	shape     []int // HF shape
	dst       []float32
	transpose bool // HF Conv1D [in, out] → canonical [out, in]
}

// wSources maps the HF tensor names of c onto w. prefix is the module prefix
// the checkpoint uses ("transformer." for GPT2LMHeadModel, "model." for
// LlamaForCausalLM, "" for the bare GPT2Model/LlamaModel).
func wSources(c *Config, w *Weights, prefix string) []wSource {
	C, V, FFN := c.C, c.VocabSize, c.FFN
	var s []wSource
	add := func(name string, dst []float32, transpose bool, shape ...int) {
		s = append(s, wSource{name: name, shape: shape, dst: dst, transpose: transpose})
	}
	if c.Family == GPT2 {
		add(prefix+"wte.weight", w.Wte, false, V, C)
		add(prefix+"wpe.weight", w.Wpe, false, c.MaxPos, C)
		for i := range w.Layers {
			l := &w.Layers[i]
			p := fmt.Sprintf("%sh.%d.", prefix, i)
			add(p+"ln_1.weight", l.Norm1W, false, C)
			add(p+"ln_1.bias", l.Norm1B, false, C)
			add(p+"attn.c_attn.weight", l.QKVW, true, C, 3*C)
			add(p+"attn.c_attn.bias", l.QKVB, false, 3*C)
			add(p+"attn.c_proj.weight", l.OW, true, C, C)
			add(p+"attn.c_proj.bias", l.OB, false, C)
			add(p+"ln_2.weight", l.Norm2W, false, C)
			add(p+"ln_2.bias", l.Norm2B, false, C)
			add(p+"mlp.c_fc.weight", l.UpW, true, C, FFN)
			add(p+"mlp.c_fc.bias", l.UpB, false, FFN)
			add(p+"mlp.c_proj.weight", l.DownW, true, FFN, C)
			add(p+"mlp.c_proj.bias", l.DownB, false, C)
		}
		add(prefix+"ln_f.weight", w.NormFW, false, C)
		add(prefix+"ln_f.bias", w.NormFB, false, C)
	} else {
		q, kv := c.NH*c.HS, c.NKV*c.HS
		add(prefix+"embed_tokens.weight", w.Wte, false, V, C)
		for i := range w.Layers {
			l := &w.Layers[i]
			p := fmt.Sprintf("%slayers.%d.", prefix, i)
			add(p+"input_layernorm.weight", l.Norm1W, false, C)
			add(p+"self_attn.q_proj.weight", l.QKVW[:q*C], false, q, C)
			add(p+"self_attn.k_proj.weight", l.QKVW[q*C:(q+kv)*C], false, kv, C)
			add(p+"self_attn.v_proj.weight", l.QKVW[(q+kv)*C:], false, kv, C)
			add(p+"self_attn.o_proj.weight", l.OW, false, C, q)
			add(p+"post_attention_layernorm.weight", l.Norm2W, false, C)
			add(p+"mlp.gate_proj.weight", l.UpW[:FFN*C], false, FFN, C)
			add(p+"mlp.up_proj.weight", l.UpW[FFN*C:], false, FFN, C)
			add(p+"mlp.down_proj.weight", l.DownW, false, C, FFN)
		}
		add(prefix+"norm.weight", w.NormFW, false, C)
	}
	if !c.TiedEmbeddings {
		// lm_head sits outside the base-model prefix in both families.
		add("lm_head.weight", w.LMHead, false, V, C)
	}
	return s
}

// wDetectPrefix finds which module prefix the checkpoint's names carry.
func wDetectPrefix(st *SafeTensors, c *Config) (string, error) {
	probe, prefixes := "embed_tokens.weight", []string{"model.", ""}
	if c.Family == GPT2 {
		probe, prefixes = "wte.weight", []string{"transformer.", ""}
	}
	for _, p := range prefixes {
		if _, ok := st.Info(p + probe); ok {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: no %s token embedding (looked for %s%s and %s): not a %s checkpoint?",
		st.path, c.Family, prefixes[0], probe, probe, c.Family)
}

// LoadWeights reads the HF checkpoint at path (a model directory, a
// .safetensors file or a sharded index) into the canonical layout, checking
// every tensor's shape against cfg. F32, F16 and BF16 checkpoints are read;
// tensors the model does not use (attn.bias buffers, …) are ignored.
func LoadWeights(path string, cfg *Config) (*Weights, error) {
	if err := cfg.cfgValidate(path); err != nil {
		return nil, err
	}
	st, err := OpenSafeTensors(path)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	prefix, err := wDetectPrefix(st, cfg)
	if err != nil {
		return nil, err
	}
	w, _ := wAllocate(cfg)
	var scratch []float32
	for _, src := range wSources(cfg, w, prefix) {
		info, ok := st.Info(src.name)
		if !ok {
			hint := ""
			if src.name == "lm_head.weight" {
				hint = " (the config has tie_word_embeddings false)"
			}
			return nil, fmt.Errorf("%s: missing tensor %q, want shape %v%s", st.path, src.name, src.shape, hint)
		}
		if !slices.Equal(info.Shape, src.shape) {
			return nil, fmt.Errorf("%s: tensor %q has shape %v, want %v for this config", info.File, src.name, info.Shape, src.shape)
		}
		if !src.transpose {
			if err := st.stReadFloat32Into(src.name, src.dst); err != nil {
				return nil, err
			}
			continue
		}
		scratch = slices.Grow(scratch[:0], len(src.dst))[:len(src.dst)]
		if err := st.stReadFloat32Into(src.name, scratch); err != nil {
			return nil, err
		}
		wTranspose(src.dst, scratch, src.shape[0], src.shape[1])
	}
	return w, nil
}

// SaveWeights writes w as an HF checkpoint (float32 safetensors with the
// names and layouts LoadWeights reads, GPT2LMHeadModel/LlamaForCausalLM
// prefixes, and the {"format": "pt"} metadata transformers requires), so
// weights made here, such as RandomWeights, can be loaded by HF to produce
// reference outputs.
func SaveWeights(path string, cfg *Config, w *Weights) error {
	if err := cfg.cfgValidate(path); err != nil {
		return err
	}
	if w == nil {
		return fmt.Errorf("save weights %s: no weights", path)
	}
	if len(w.Layers) != cfg.NLayer {
		return fmt.Errorf("save weights %s: %d layers, config has %d", path, len(w.Layers), cfg.NLayer)
	}
	for _, slot := range wSlots(cfg, w) {
		if len(*slot.dst) != slot.n {
			return fmt.Errorf("save weights %s: a tensor has %d floats, config wants %d", path, len(*slot.dst), slot.n)
		}
	}
	prefix := "model."
	if cfg.Family == GPT2 {
		prefix = "transformer."
	}
	var tensors []NamedTensor
	for _, src := range wSources(cfg, w, prefix) {
		data := src.dst
		if src.transpose {
			rows, cols := src.shape[0], src.shape[1]
			data = make([]float32, len(src.dst))
			wTranspose(data, src.dst, cols, rows) // canonical [cols, rows] → HF [rows, cols]
		}
		tensors = append(tensors, NamedTensor{Name: src.name, Shape: src.shape, F32: data})
	}
	return WriteSafeTensors(path, tensors, map[string]string{"format": "pt"})
}

// wTranspose writes dst[cols, rows] = srcᵀ for src[rows, cols], in tiles so
// both sides stay in cache.
func wTranspose(dst, src []float32, rows, cols int) {
	const tile = 32
	for i0 := 0; i0 < rows; i0 += tile {
		i1 := min(i0+tile, rows)
		for j0 := 0; j0 < cols; j0 += tile {
			j1 := min(j0+tile, cols)
			for i := i0; i < i1; i++ {
				row := src[i*cols : i*cols+cols]
				for j := j0; j < j1; j++ {
					dst[j*rows+i] = row[j]
				}
			}
		}
	}
}

// RandomWeights makes weights for cfg (which must have come from ParseConfig
// or passed LoadWeights' checks): matrices N(0, 0.02) as HF initialises them,
// norm weights 1 + N(0, 0.05), biases N(0, 0.02); the noise on norms and
// biases makes a misplaced one visible in conformance tests. The result
// depends only on cfg and seed: the floats are cut into fixed chunks, each
// drawn from its own PCG stream, and the chunks are filled in parallel.
func RandomWeights(cfg *Config, seed int64) *Weights {
	w, slots := wAllocate(cfg)
	const chunk = 1 << 18
	type job struct {
		dst    []float32
		init   wInit
		stream uint64
	}
	var jobs []job
	for _, s := range slots {
		d := *s.dst
		for off := 0; off < len(d); off += chunk {
			jobs = append(jobs, job{d[off:min(off+chunk, len(d))], s.init, uint64(len(jobs))})
		}
	}
	var taken atomic.Int64
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), len(jobs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				k := int(taken.Add(1)) - 1
				if k >= len(jobs) {
					return
				}
				j := jobs[k]
				rng := rand.New(rand.NewPCG(uint64(seed), j.stream))
				std, mean := 0.02, 0.0
				if j.init == wInitNorm {
					std, mean = 0.05, 1
				}
				for i := range j.dst {
					j.dst[i] = float32(mean + std*rng.NormFloat64())
				}
			}
		}()
	}
	wg.Wait()
	return w
}
