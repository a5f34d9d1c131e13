package transformer

import (
	"strings"
	"sync"
	"unicode/utf8"
)

// Tokenizer is a byte-level BPE tokenizer (GPT-2 style) that reproduces the
// token ids of Hugging Face `tokenizers` for the files it accepts: the
// Encode of a string equals HF's `encode(text, add_special_tokens=False).ids`
// and Decode equals HF's `decode(ids, skip_special_tokens=False)`.
//
// Supported: model BPE (no dropout, no byte_fallback, no continuing-subword
// prefix or end-of-word suffix; unk_token, fuse_unk and ignore_merges are
// honoured), no normalizer, pre-tokenizer ByteLevel with add_prefix_space
// false and use_regex true (optionally preceded by Digits with
// individual_digits true), decoder ByteLevel, and added tokens without
// lstrip/rstrip/single_word. Anything else is refused by LoadTokenizer. The
// post-processor is ignored: Encode never adds special tokens. Truncation and
// padding settings are ignored too, as transformers does unless asked.
//
// A Tokenizer is safe for concurrent use: Encode calls are serialised by a
// mutex that guards the per-Tokenizer cache of encoded pre-tokens. Everything
// else is read-only after LoadTokenizer.
type Tokenizer struct {
	source string // the file(s) it was loaded from, for messages

	vocabSize int      // 1 + the largest id of the vocabulary or added tokens
	known     []bool   // known[id]: id names a token
	rawBytes  []string // rawBytes[id]: the bytes the token stands for
	vocab     map[string]int32

	byteSymbol   [256]int32 // id of the one-byte token for each byte, -1 if none
	byteRunes    [256]rune  // GPT-2 bytes_to_unicode
	merges       bpeMerges
	unkID        int32 // id used for a byte with no token, -1 to drop it as HF does
	fuseUnk      bool  // consecutive unknown bytes give one unk token
	ignoreMerges bool  // a pre-token that is itself in the vocabulary is not merged
	splitDigits  bool  // Digits{individual_digits: true} runs before ByteLevel

	// Added tokens are cut out of the text before pre-tokenisation, in two
	// passes as HF's AddedVocabulary does: first those with normalized=false
	// on the raw text, then those with normalized=true (the normalizer is
	// always null here, so only the order differs).
	addedRaw        []tokAddedToken
	addedNormalized []tokAddedToken
	addedByContent  map[string]int32

	mu      sync.Mutex
	cache   tokWordCache // pre-token → ids; guarded by mu
	symsBuf []int32      // scratch for encodeWord; guarded by mu
}

// tokAddedToken is one entry of tokenizer.json's added_tokens.
type tokAddedToken struct {
	content string
	id      int32
}

// Source names the file(s) the tokenizer was loaded from, for messages.
func (t *Tokenizer) Source() string { return t.source }

// VocabSize is one more than the largest token id, so that every id Encode
// can return indexes an embedding table of this many rows.
func (t *Tokenizer) VocabSize() int { return t.vocabSize }

// SpecialID returns the id of the added (special) token with this exact
// content, such as "<|endoftext|>".
func (t *Tokenizer) SpecialID(content string) (int, bool) {
	id, ok := t.addedByContent[content]
	return int(id), ok
}

// EOS returns the id of "<|endoftext|>", or -1 if the tokenizer has none.
func (t *Tokenizer) EOS() int {
	if id, ok := t.SpecialID("<|endoftext|>"); ok {
		return id
	}
	return -1
}

// DecodeToken returns the raw bytes of one token, nil for an unknown id. A
// token may end inside a multi-byte UTF-8 character: a streaming caller
// buffers bytes until they form complete characters.
func (t *Tokenizer) DecodeToken(id int) []byte {
	if id < 0 || id >= len(t.known) || !t.known[id] {
		return nil
	}
	return []byte(t.rawBytes[id])
}

// Decode turns ids back into text. Unknown ids are skipped and special
// tokens are kept, as HF's decode(ids, skip_special_tokens=False) does. The
// bytes of all tokens are joined first and then made valid UTF-8, each
// ill-formed sequence becoming U+FFFD exactly as HF (and Python's
// bytes.decode(errors="replace")) do.
func (t *Tokenizer) Decode(ids []int) string {
	size := 0
	for _, id := range ids {
		if id >= 0 && id < len(t.known) && t.known[id] {
			size += len(t.rawBytes[id])
		}
	}
	joined := make([]byte, 0, size)
	for _, id := range ids {
		if id >= 0 && id < len(t.known) && t.known[id] {
			joined = append(joined, t.rawBytes[id]...)
		}
	}
	if utf8.Valid(joined) {
		return string(joined)
	}
	return string(bpeAppendLossyUTF8(make([]byte, 0, size+8), joined))
}

// Encode turns text into token ids. It never adds special tokens (HF's
// add_special_tokens=False), but special-token strings inside text, such as
// "<|endoftext|>", become their ids. Text should be valid UTF-8; an invalid
// byte is encoded as its own byte token.
func (t *Tokenizer) Encode(text string) []int {
	ids := make([]int, 0, len(text)/4+1)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.splitAdded(text, t.addedRaw, func(segment string, addedID int32) {
		if addedID >= 0 {
			ids = append(ids, int(addedID))
			return
		}
		t.splitAdded(segment, t.addedNormalized, func(inner string, innerID int32) {
			if innerID >= 0 {
				ids = append(ids, int(innerID))
				return
			}
			ids = t.encodeOrdinary(inner, ids)
		})
	})
	return ids
}

// encodeOrdinary encodes text that holds no added token. Caller holds mu.
func (t *Tokenizer) encodeOrdinary(text string, ids []int) []int {
	if t.splitDigits {
		tokForEachPretoken(text, true, func(piece string) { ids = t.encodePiece(piece, ids) })
		return ids
	}
	// The common case, without a callback per pre-token.
	for i := 0; i < len(text); {
		end := tokPretokenEnd(text, i)
		ids = t.encodePiece(text[i:end], ids)
		i = end
	}
	return ids
}

// encodePiece appends the ids of one pre-token, from the cache when it can.
// Caller holds mu.
func (t *Tokenizer) encodePiece(piece string, ids []int) []int {
	if cached, ok := t.cache.get(piece); ok {
		for _, id := range cached {
			ids = append(ids, int(id))
		}
		return ids
	}
	t.symsBuf = t.encodeWord(piece, t.symsBuf[:0])
	for _, id := range t.symsBuf {
		ids = append(ids, int(id))
	}
	t.cache.put(piece, t.symsBuf)
	return ids
}

// encodeWord runs byte-level BPE on one pre-token, appending its ids to out.
func (t *Tokenizer) encodeWord(word string, out []int32) []int32 {
	if t.ignoreMerges {
		if id, ok := t.vocab[t.byteLevelString(word)]; ok {
			return append(out, id)
		}
	}
	start := len(out)
	pendingUnk := false // an unk symbol was just added and may absorb the next
	for i := 0; i < len(word); i++ {
		id := t.byteSymbol[word[i]]
		if id >= 0 {
			out = append(out, id)
			pendingUnk = false
			continue
		}
		// HF's BPE::merge_word: a character missing from the vocabulary
		// becomes unk_token (one per run with fuse_unk), or is silently
		// dropped when there is no unk_token.
		if t.unkID < 0 {
			continue
		}
		if !(t.fuseUnk && pendingUnk) {
			out = append(out, t.unkID)
		}
		pendingUnk = true
	}
	merged := t.merges.merge(out[start:])
	return out[:start+len(merged)]
}

// byteLevelString maps raw bytes to GPT-2's byte-level characters, the form
// vocabulary keys are written in.
func (t *Tokenizer) byteLevelString(raw string) string {
	var b strings.Builder
	b.Grow(2 * len(raw))
	for i := 0; i < len(raw); i++ {
		b.WriteRune(t.byteRunes[raw[i]])
	}
	return b.String()
}

// splitAdded cuts text at every occurrence of the added tokens and calls
// emit for each piece in order: (piece, -1) for ordinary text, (content, id)
// for an added token. Matching is leftmost-longest, as HF's Aho-Corasick
// matcher (MatchKind::LeftmostLongest) does.
func (t *Tokenizer) splitAdded(text string, added []tokAddedToken, emit func(piece string, id int32)) {
	if len(added) == 0 {
		if text != "" {
			emit(text, -1)
		}
		return
	}
	// nextAt[k] caches where added[k] next occurs at or after pos (-1: never),
	// so each token's occurrences are searched for only once overall.
	var nextBuf [8]int
	nextAt := nextBuf[:0]
	for range added {
		nextAt = append(nextAt, -2) // -2: not searched yet
	}
	pos := 0
	for pos < len(text) {
		best := -1
		for k, tok := range added {
			if nextAt[k] == -2 || (nextAt[k] >= 0 && nextAt[k] < pos) {
				if found := strings.Index(text[pos:], tok.content); found >= 0 {
					nextAt[k] = pos + found
				} else {
					nextAt[k] = -1
				}
			}
			if nextAt[k] < 0 {
				continue
			}
			if best < 0 || nextAt[k] < nextAt[best] ||
				(nextAt[k] == nextAt[best] && len(tok.content) > len(added[best].content)) {
				best = k
			}
		}
		if best < 0 {
			break
		}
		start := nextAt[best]
		if start > pos {
			emit(text[pos:start], -1)
		}
		end := start + len(added[best].content)
		emit(text[start:end], added[best].id)
		pos = end
	}
	if pos < len(text) {
		emit(text[pos:], -1)
	}
}

// resetCache empties the pre-token cache (for cold-cache benchmarks).
func (t *Tokenizer) resetCache() {
	t.mu.Lock()
	t.cache.reset()
	t.mu.Unlock()
}

// tokWordCache remembers the ids of pre-tokens already encoded; most text is
// words seen before, so this lookup is Encode's hot path. Values are packed
// (offset, count) spans of one ids arena rather than slices, which keeps the
// map's slots small. (An open-addressing table with arena keys was tried and
// measured no faster than Go's map.)
type tokWordCache struct {
	spans map[string]uint64
	ids   []int32
}

const (
	// tokCacheMaxWord: longer pre-tokens are rare and not worth keeping (HF
	// uses the same bound, MAX_LENGTH in utils/cache.rs).
	tokCacheMaxWord = 256
	// tokCacheMaxEntries bounds the cache; it is emptied when full, so
	// memory stays bounded on endless input while common words come back
	// quickly.
	tokCacheMaxEntries = 1 << 16
)

func newTokWordCache() tokWordCache {
	return tokWordCache{spans: make(map[string]uint64)}
}

// get returns the cached ids of word, valid until the next put or reset.
func (c *tokWordCache) get(word string) ([]int32, bool) {
	span, ok := c.spans[word]
	if !ok {
		return nil, false
	}
	start, count := span>>32, span&0xFFFFFFFF
	return c.ids[start : start+count], true
}

func (c *tokWordCache) put(word string, ids []int32) {
	if len(word) > tokCacheMaxWord {
		return
	}
	if c.spans == nil {
		c.spans = make(map[string]uint64)
	}
	if len(c.spans) >= tokCacheMaxEntries {
		c.reset()
	}
	// Clone the key so the cache never pins the caller's text.
	c.spans[strings.Clone(word)] = uint64(len(c.ids))<<32 | uint64(len(ids))
	c.ids = append(c.ids, ids...)
}

func (c *tokWordCache) reset() {
	clear(c.spans)
	c.ids = c.ids[:0]
}
