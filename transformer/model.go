package transformer

import (
	"errors"
	"fmt"

	"github.com/kvalign/kvalign/gpu"
)

// Model is a GPT-2 or Llama model whose weights live on a backend.
// Its forward pass is written once against gpu.Backend; Runner holds the
// per-sequence state (activations, K/V store) so one Model can serve many.
type Model struct {
	Cfg *Config
	Be  gpu.Backend
	w   deviceWeights
	all gpu.Buf // the single weight allocation the views below are carved from
	// head is the LM head prepared for screened sampling (gpu.HeadSampler:
	// CUDA, fp16 weights; DecodeKernel.ScreenHead); nil where the backend
	// does not screen it.
	head *gpu.HeadScreen
}

type deviceLayer struct {
	norm1W, norm1B, qkvW, qkvB, oW, oB gpu.Buf
	norm2W, norm2B, upW, upB, downW    gpu.Buf
	downB                              gpu.Buf
}

type deviceWeights struct {
	wte, wpe, normFW, normFB, lmHead gpu.Buf
	layers                           []deviceLayer
}

// QKVWidth is the width of a fused q|k|v row: (NH + 2·NKV)·HS.
func (c *Config) QKVWidth() int { return (c.NH + 2*c.NKV) * c.HS }

// UpWidth is the width of the first MLP product: FFN for GPT-2, gate|up
// (2·FFN) for Llama.
func (c *Config) UpWidth() int {
	if c.Family == Llama {
		return 2 * c.FFN
	}
	return c.FFN
}

// NewModel uploads host weights to the backend in dtype (the backend may
// keep another, see gpu.Backend.WeightDType), in one allocation carved by a
// size table.
func NewModel(cfg *Config, hw *Weights, be gpu.Backend, dtype gpu.DType) (*Model, error) {
	dt := be.WeightDType(dtype)
	type piece struct {
		dst *gpu.Buf
		src []float32
	}
	var pieces []piece
	m := &Model{Cfg: cfg, Be: be}
	add := func(dst *gpu.Buf, src []float32) {
		if src != nil {
			pieces = append(pieces, piece{dst, src})
		}
	}
	add(&m.w.wte, hw.Wte)
	add(&m.w.wpe, hw.Wpe)
	add(&m.w.normFW, hw.NormFW)
	add(&m.w.normFB, hw.NormFB)
	tied := len(hw.LMHead) > 0 && len(hw.Wte) > 0 && &hw.LMHead[0] == &hw.Wte[0]
	if !tied {
		add(&m.w.lmHead, hw.LMHead)
	}
	m.w.layers = make([]deviceLayer, len(hw.Layers))
	for i := range hw.Layers {
		l, d := &hw.Layers[i], &m.w.layers[i]
		add(&d.norm1W, l.Norm1W)
		add(&d.norm1B, l.Norm1B)
		add(&d.qkvW, l.QKVW)
		add(&d.qkvB, l.QKVB)
		add(&d.oW, l.OW)
		add(&d.oB, l.OB)
		add(&d.norm2W, l.Norm2W)
		add(&d.norm2B, l.Norm2B)
		add(&d.upW, l.UpW)
		add(&d.upB, l.UpB)
		add(&d.downW, l.DownW)
		add(&d.downB, l.DownB)
	}
	// Offsets are rounded up to 64 elements so every tensor starts 128-byte
	// aligned: the GEMV kernel reads rows with 16-byte vector loads.
	const align = 64
	total := 0
	for _, p := range pieces {
		total += (len(p.src) + align - 1) / align * align
	}
	all, err := be.Alloc(dt, total)
	if err != nil {
		return nil, fmt.Errorf("allocating %d weights for the model: %w", total, err)
	}
	m.all = all
	off := 0
	for _, p := range pieces {
		*p.dst = all.View(off, len(p.src))
		be.Upload(*p.dst, p.src)
		off += (len(p.src) + align - 1) / align * align
	}
	if tied {
		m.w.lmHead = m.w.wte
	}
	if err := be.Sync(); err != nil {
		m.Close()
		return nil, fmt.Errorf("uploading weights: %w", err)
	}
	return m, nil
}

// screenHead prepares the LM head for screened sampling the first time a
// runner asks for it (the int8 copy costs V·C bytes of device memory);
// nothing where the backend does not screen this head.
func (m *Model) screenHead() error {
	hs, ok := m.Be.(gpu.HeadSampler)
	if m.head != nil || !ok || m.all.DType() != gpu.F16 {
		return nil
	}
	h, err := hs.NewHeadScreen(m.w.lmHead, m.Cfg.VocabSize, m.Cfg.C)
	if err != nil && !errors.Is(err, gpu.ErrNoHeadScreen) {
		return fmt.Errorf("preparing the screened LM head: %w", err)
	}
	m.head = h
	return nil
}

// Close frees the weights.
func (m *Model) Close() {
	m.head.Close()
	m.head = nil
	if !m.all.IsZero() {
		m.Be.Free(m.all)
		m.all = gpu.Buf{}
	}
}
