package transformer

import (
	"fmt"
	"strings"

	"github.com/kvalign/kvalign/kvcache"
)

// Mode is a policy for generating without end from a bounded cache.
type Mode int

const (
	// SlidingWindow is StreamingLLM: sinks plus a recent window; evicted
	// entries vanish, the rest keep their K/V. Llama keys are cached before
	// RoPE and rotated at their cache index when read (position shift).
	SlidingWindow Mode = iota + 1
	// KVAlign rewrites every window entry with the key and value networks
	// after each eviction, so each stands for its index in the cache.
	KVAlign
	// Recompute drops nothing but recomputes the last cache_size+1 tokens
	// from scratch every step, at positions 0…cache_size.
	Recompute
)

var modeNames = map[string]Mode{
	"sw": SlidingWindow, "sliding_window": SlidingWindow, "sliding-window": SlidingWindow, "streamingllm": SlidingWindow,
	"kv": KVAlign, "kva": KVAlign, "kvn": KVAlign, "kv_align": KVAlign, "kv-align": KVAlign, "key_value_net": KVAlign,
	"ar": Recompute, "wr": Recompute, "with_recompute": Recompute, "attention_recomputation": Recompute,
}

// ParseMode reads a mode name or one of the original code's synonyms.
func ParseMode(s string) (Mode, error) {
	if m, ok := modeNames[strings.ToLower(s)]; ok {
		return m, nil
	}
	return 0, fmt.Errorf("unknown mode %q (want kv, sw or ar, or a synonym: kva, kvn, kv_align, key_value_net, sliding_window, wr, with_recompute, attention_recomputation)", s)
}

func (m Mode) String() string {
	switch m {
	case SlidingWindow:
		return "sw"
	case KVAlign:
		return "kv"
	case Recompute:
		return "ar"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// Stream generates or scores one sequence without end from a cache of
// CacheSize entries (plus the one in flight) under a Mode.
type Stream struct {
	m     *Model
	mode  Mode
	r     *Runner
	cache *kvcache.Cache
	hist  []int32 // Recompute: the last CacheSize+1 tokens
	fed   int     // tokens fed so far
	nll   bool    // the last step computed an NLL

	// Reused across steps so that a decode step allocates nothing.
	st      Step
	order   [1][]int32
	target  [1]int32
	one     [1]int32
	indices []int32 // 0, 1, 2, …: window indices and fresh positions/slots
}

// StreamOptions configures a Stream.
type StreamOptions struct {
	Mode                 Mode
	CacheSize, StartSize int
	Realigner            Realigner // KVAlign's networks
	MaxBan               int       // most banned tokens when sampling
	DecodeKernel                   // how one-token steps run (RunnerOptions)
}

// NewStream prepares a Stream on the model's backend.
func NewStream(m *Model, o StreamOptions) (*Stream, error) {
	cache, err := kvcache.New(o.CacheSize, o.StartSize, 0)
	if err != nil {
		return nil, err
	}
	if m.Cfg.Family == GPT2 && o.CacheSize > m.Cfg.MaxPos-1 {
		return nil, fmt.Errorf("cache size %d needs positions up to %d, beyond GPT-2's n_positions %d", o.CacheSize, o.CacheSize, m.Cfg.MaxPos)
	}
	if o.Mode == KVAlign && o.Realigner == nil {
		return nil, fmt.Errorf("mode kv needs key and value networks")
	}
	s := &Stream{m: m, mode: o.Mode, cache: cache, indices: make([]int32, cache.Slots())}
	for i := range s.indices {
		s.indices[i] = int32(i)
	}
	s.r, err = NewRunner(m, RunnerOptions{
		B: 1, MaxT: cache.Slots(), MaxLen: cache.Slots(), MaxBan: o.MaxBan,
		ShiftKeys:    o.Mode == SlidingWindow && m.Cfg.Family == Llama,
		DecodeKernel: o.DecodeKernel,
	})
	if err != nil {
		return nil, err
	}
	s.r.SetRealigner(o.Realigner)
	return s, nil
}

// Close frees the stream's device state.
func (s *Stream) Close() { s.r.Close() }

// Persistent reports whether the stream's one-token steps run as one
// persistent kernel (Runner.Persistent).
func (s *Stream) Persistent() bool { return s.r.Persistent() }

// Cache is the stream's bookkeeping (read-only use).
func (s *Stream) Cache() *kvcache.Cache { return s.cache }

// Runner is the stream's device state (tests read logits and K/V through it).
func (s *Stream) Runner() *Runner { return s.r }

// Fed is the number of tokens fed so far.
func (s *Stream) Fed() int { return s.fed }

// FeedOptions says what the step after the last fed token produces.
type FeedOptions struct {
	Sample *Sampling // draw the next token on the device
	Score  bool      // compute the NLL of Target as the next token
	Target int32
}

// Feed appends tokens, evicting (and realigning) as the mode says, and
// leaves the logits after the last one ready (plus a sample or an NLL).
// A first feed of up to CacheSize+1 tokens is one prefill; the rest go one
// token at a time, so long prompts follow exactly the policy of generation.
func (s *Stream) Feed(tokens []int32, fo FeedOptions) error {
	for len(tokens) > 0 {
		n := 1
		if s.fed == 0 && s.mode != Recompute {
			n = min(len(tokens), s.cache.Slots())
		}
		if s.mode == Recompute {
			n = len(tokens) // only the final window is ever computed
		}
		chunk := tokens[:n]
		tokens = tokens[n:]
		last := len(tokens) == 0
		var err error
		if s.mode == Recompute {
			err = s.recompute(chunk, fo, last)
		} else {
			err = s.append(chunk, false, fo, last)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (s *Stream) step(st *Step, fo FeedOptions, last bool) error {
	st.Logits, st.Sample, st.Targets = NoLogits, nil, nil
	s.nll = false
	if last {
		st.Logits = LastRow
		st.Sample = fo.Sample
		if fo.Score {
			s.target[0] = fo.Target
			st.Targets = s.target[:]
			s.nll = true
		}
	}
	return s.r.Run(st)
}

// newStep resets the reused Step for T new tokens.
func (s *Stream) newStep(T int) *Step {
	st := &s.st
	*st = Step{T: T, Tokens: st.Tokens[:0], Pos: st.Pos[:0], Slots: st.Slots[:0]}
	return st
}

// Next feeds the token the last step drew and returns it. Under sw and kv
// the step is queued first, taking the token on the device (a chained
// step), and only then does Next wait for the token: the device runs one
// step after another while the host reads, prints and stages. ar needs the
// token on the host to build its window, so there Next waits first.
func (s *Stream) Next(fo FeedOptions) (int32, error) {
	if s.mode == Recompute {
		t, err := s.Sampled()
		if err != nil {
			return 0, err
		}
		s.one[0] = t
		return t, s.Feed(s.one[:], fo)
	}
	if err := s.append(s.one[:], true, fo, true); err != nil {
		return 0, err
	}
	v, err := s.r.Drawn()
	if err != nil {
		return 0, err
	}
	return v[0], nil
}

// ResetSuccessors sets the 2-gram memory that Sampling.NoRepeat bans from
// (Runner.ResetSuccessors): pairs in order, keep successors a token, room
// for records more picks.
func (s *Stream) ResetSuccessors(keep int, pairs [][2]int32, records int) error {
	return s.r.ResetSuccessors(keep, [][][2]int32{pairs}, records)
}

// append runs sw/kv: evict when full, realign (kv), then the new tokens
// (chained: one token, the one the last step drew, on the device).
func (s *Stream) append(tokens []int32, chained bool, fo FeedOptions, last bool) error {
	c := s.cache
	st := s.newStep(len(tokens))
	if c.Full() {
		if _, err := c.Evict(); err != nil {
			return err
		}
		if s.mode == KVAlign {
			win := c.Window()
			st.AlignSlots = win
			st.AlignIndex = s.indices[:len(win)]
			c.SetPositions()
		}
	}
	for _, t := range tokens {
		pos := c.Len() // the incoming token stands at the cache length
		slot, err := c.Append(pos)
		if err != nil {
			return err
		}
		st.Tokens = append(st.Tokens, t)
		st.Pos = append(st.Pos, int32(pos))
		st.Slots = append(st.Slots, slot)
	}
	s.order[0] = c.Order()
	st.Order = s.order[:]
	st.Graph = len(tokens) == 1 && c.Len() == c.Slots()
	st.Chained = chained
	s.fed += len(tokens)
	return s.step(st, fo, last)
}

// recompute runs ar: the last CacheSize+1 tokens from scratch.
func (s *Stream) recompute(tokens []int32, fo FeedOptions, last bool) error {
	s.hist = append(s.hist, tokens...)
	if k := s.cache.Slots(); len(s.hist) > k {
		s.hist = append(s.hist[:0], s.hist[len(s.hist)-k:]...)
	}
	s.fed += len(tokens)
	if !last {
		return nil
	}
	T := len(s.hist)
	st := s.newStep(T)
	idx := s.indices[:T]
	s.order[0] = idx
	st.Tokens = append(st.Tokens, s.hist...)
	st.Pos, st.Slots, st.Order = idx, idx, s.order[:]
	st.Graph = T == s.cache.Slots()
	return s.step(st, fo, last)
}

// Logits downloads the logits after the last fed token.
func (s *Stream) Logits() ([]float32, error) { return s.r.Logits(1) }

// NLL is the negative log-likelihood of the target given with the last feed.
func (s *Stream) NLL() (float32, error) {
	if !s.nll {
		return 0, fmt.Errorf("stream: the last feed computed no NLL")
	}
	v, err := s.r.NLL(1)
	if err != nil {
		return 0, err
	}
	return v[0], nil
}

// Sampled is the token drawn after the last fed token.
func (s *Stream) Sampled() (int32, error) {
	v, err := s.r.Sampled()
	if err != nil {
		return 0, err
	}
	return v[0], nil
}
