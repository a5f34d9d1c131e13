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
	// ready[next:] are tokens drawn and read but not yet returned by Next;
	// drawn counts the tokens the queued steps draw since the last Feed
	// (its own included), handed those Next returned.
	ready         []int32
	next          int
	drawn, handed int

	// Reused across steps so that a decode step allocates nothing: one
	// for each step of a run (StreamOptions.Group).
	bufs    []stepBuf
	run     []*Step
	target  [1]int32
	one     [1]int32
	indices []int32 // 0, 1, 2, …: window indices and fresh positions/slots
}

// stepBuf is a step with its own copies of what the cache's bookkeeping
// changes from step to step, so that a run's steps can be built before
// any of them is staged.
type stepBuf struct {
	st    Step
	order [1][]int32
	align []int32
	samp  Sampling
	ctr   []int32
}

// StreamOptions configures a Stream.
type StreamOptions struct {
	Mode                 Mode
	CacheSize, StartSize int
	Realigner            Realigner // KVAlign's networks
	MaxBan               int       // most banned tokens when sampling
	// Group: under sw and kv, once the cache is full, Next queues this
	// many steps at a time as one run (Runner.RunSteps), each step taking
	// the token the one before drew on the device: the step boundary
	// costs the device nothing, and tokens reach the host Group at a
	// time. 0 or 1: one step at a time.
	Group        int
	DecodeKernel // how one-token steps run (RunnerOptions)
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
	group := max(o.Group, 1)
	s := &Stream{m: m, mode: o.Mode, cache: cache, indices: make([]int32, cache.Slots()),
		bufs: make([]stepBuf, group), run: make([]*Step, group)}
	for i := range s.indices {
		s.indices[i] = int32(i)
	}
	for j := range s.bufs {
		s.run[j] = &s.bufs[j].st
	}
	s.r, err = NewRunner(m, RunnerOptions{
		B: 1, MaxT: cache.Slots(), MaxLen: cache.Slots(), MaxBan: o.MaxBan,
		ShiftKeys:    o.Mode == SlidingWindow && m.Cfg.Family == Llama,
		Group:        group,
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
	s.ready, s.next, s.drawn, s.handed = s.ready[:0], 0, 0, 0
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
	if fo.Sample != nil {
		s.drawn = 1
	}
	return nil
}

// prepare sets a step's outputs: after the last token fed, the logits
// (plus a sample or an NLL); none before.
func (s *Stream) prepare(st *Step, fo FeedOptions, last bool) {
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
}

// newStep resets step buffer j for T new tokens.
func (s *Stream) newStep(j, T int) *Step {
	st := &s.bufs[j].st
	*st = Step{T: T, Tokens: st.Tokens[:0], Pos: st.Pos[:0], Slots: st.Slots[:0]}
	return st
}

// Next feeds the token the last step drew and returns it. Under sw and kv
// the step is queued first, taking the token on the device (a chained
// step), and only then does Next wait for the token: the device runs one
// step after another while the host reads, prints and stages. With a
// Group, a full cache's steps are queued Group at a time, and Next returns
// the tokens of the run before from memory until they run out. ar needs
// the token on the host to build its window, so there Next waits first.
// fo.Sample.Counter is the random-stream position of the step Next would
// queue one step at a time; a step queued further ahead adds how much
// further, so a Group draws the same tokens.
func (s *Stream) Next(fo FeedOptions) (int32, error) {
	if s.mode == Recompute {
		t, err := s.Sampled()
		if err != nil {
			return 0, err
		}
		s.one[0] = t
		return t, s.Feed(s.one[:], fo)
	}
	if s.next == len(s.ready) {
		if err := s.queue(fo); err != nil {
			return 0, err
		}
		v, err := s.r.Drawn()
		if err != nil {
			return 0, err
		}
		s.ready, s.next = append(s.ready[:0], v...), 0
	}
	t := s.ready[s.next]
	s.next++
	s.handed++
	return t, nil
}

// queue queues the next run of chained steps: one step, or Group once the
// cache is full (every step then evicts, so all have one shape) and the
// steps only sample.
func (s *Stream) queue(fo FeedOptions) error {
	n := 1
	if len(s.bufs) > 1 && s.cache.Full() && fo.Sample != nil && !fo.Score {
		n = len(s.bufs)
	}
	// The steps already queued past the one Next would queue one step at
	// a time (0 without a Group).
	ahead := int32(s.drawn - s.handed - 1)
	for j := 0; j < n; j++ {
		fj := fo
		if fo.Sample != nil && (ahead != 0 || j > 0) {
			b := &s.bufs[j]
			b.samp = *fo.Sample
			b.ctr = append(b.ctr[:0], fo.Sample.Counter...)
			for i := range b.ctr {
				b.ctr[i] += ahead + int32(j)
			}
			b.samp.Counter = b.ctr
			fj.Sample = &b.samp
		}
		if err := s.build(j, s.one[:], true, fj, true); err != nil {
			return err
		}
		s.drawn++
	}
	return s.r.RunSteps(s.run[:n])
}

// ResetSuccessors sets the 2-gram memory that Sampling.NoRepeat bans from
// (Runner.ResetSuccessors): pairs in order, keep successors a token, room
// for records more picks (and for the steps a Group draws past them).
func (s *Stream) ResetSuccessors(keep int, pairs [][2]int32, records int) error {
	return s.r.ResetSuccessors(keep, [][][2]int32{pairs}, records+len(s.bufs))
}

// append runs sw/kv: evict when full, realign (kv), then the new tokens
// (chained: one token, the one the last step drew, on the device).
func (s *Stream) append(tokens []int32, chained bool, fo FeedOptions, last bool) error {
	if err := s.build(0, tokens, chained, fo, last); err != nil {
		return err
	}
	return s.r.Run(s.run[0])
}

// build does the bookkeeping of one sw/kv step into step buffer j.
func (s *Stream) build(j int, tokens []int32, chained bool, fo FeedOptions, last bool) error {
	c, b := s.cache, &s.bufs[j]
	st := s.newStep(j, len(tokens))
	if c.Full() {
		if _, err := c.Evict(); err != nil {
			return err
		}
		if s.mode == KVAlign {
			b.align = append(b.align[:0], c.Window()...)
			st.AlignSlots = b.align
			st.AlignIndex = s.indices[:len(b.align)]
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
	b.order[0] = append(b.order[0][:0], c.Order()...)
	st.Order = b.order[:]
	st.Graph = len(tokens) == 1 && c.Len() == c.Slots()
	st.Chained = chained
	s.fed += len(tokens)
	s.prepare(st, fo, last)
	return nil
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
	st, b := s.newStep(0, T), &s.bufs[0]
	idx := s.indices[:T]
	b.order[0] = idx
	st.Tokens = append(st.Tokens, s.hist...)
	st.Pos, st.Slots, st.Order = idx, idx, b.order[:]
	st.Graph = T == s.cache.Slots()
	s.prepare(st, fo, last)
	return s.r.Run(st)
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

// Sampled is the next token not yet returned by Next (after a Feed, the
// token drawn after its last token), waiting for it without queuing a
// step.
func (s *Stream) Sampled() (int32, error) {
	if s.next < len(s.ready) {
		return s.ready[s.next], nil
	}
	v, err := s.r.Sampled()
	if err != nil {
		return 0, err
	}
	return v[0], nil
}
