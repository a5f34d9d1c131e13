package transformer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// tokMaxID bounds token ids: the per-id tables are dense, so a file that
// claims id 2^31 must be refused rather than allocated for. The largest real
// vocabularies (Gemma, ~262k) are far below it.
const tokMaxID = 1 << 22

// LoadTokenizer reads dir/tokenizer.json, or else dir/vocab.json +
// dir/merges.txt (as HF's BPE.from_file, with "<|endoftext|>" registered as a
// special token when the vocabulary has it, as GPT-2's tokenizer does). A
// tokenizer.json that exists but cannot be used is an error, never a reason
// to fall back to the other files.
func LoadTokenizer(dir string) (*Tokenizer, error) {
	jsonPath := filepath.Join(dir, "tokenizer.json")
	if _, err := os.Stat(jsonPath); err == nil {
		return loadTokenizerJSON(jsonPath)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	vocabPath := filepath.Join(dir, "vocab.json")
	mergesPath := filepath.Join(dir, "merges.txt")
	_, vocabErr := os.Stat(vocabPath)
	_, mergesErr := os.Stat(mergesPath)
	if vocabErr != nil || mergesErr != nil {
		return nil, fmt.Errorf("tokenizer: %s has neither tokenizer.json nor both vocab.json and merges.txt", dir)
	}
	return loadTokenizerVocabMerges(vocabPath, mergesPath)
}

// tokMerge is one merge rule as written in the file, with where it was
// written for error messages.
type tokMerge struct {
	left, right string
	where       string // "line 12" or "merges[11]"
}

// tokAddedJSON is one entry of tokenizer.json's added_tokens.
type tokAddedJSON struct {
	ID         *int64 `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

// tokModelJSON is tokenizer.json's "model" object for BPE.
type tokModelJSON struct {
	Type                    string           `json:"type"`
	Dropout                 *float64         `json:"dropout"`
	UnkToken                *string          `json:"unk_token"`
	ContinuingSubwordPrefix *string          `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string          `json:"end_of_word_suffix"`
	FuseUnk                 bool             `json:"fuse_unk"`
	ByteFallback            bool             `json:"byte_fallback"`
	IgnoreMerges            bool             `json:"ignore_merges"`
	Vocab                   map[string]int64 `json:"vocab"`
	Merges                  json.RawMessage  `json:"merges"`
}

// tokFileJSON is the part of tokenizer.json that decides the ids.
type tokFileJSON struct {
	AddedTokens  []tokAddedJSON  `json:"added_tokens"`
	Normalizer   json.RawMessage `json:"normalizer"`
	PreTokenizer json.RawMessage `json:"pre_tokenizer"`
	Decoder      json.RawMessage `json:"decoder"`
	Model        *tokModelJSON   `json:"model"`
}

// tokComponentJSON covers the pre-tokenizer and decoder objects we accept.
type tokComponentJSON struct {
	Type             string             `json:"type"`
	AddPrefixSpace   *bool              `json:"add_prefix_space"`
	UseRegex         *bool              `json:"use_regex"`
	IndividualDigits *bool              `json:"individual_digits"`
	PreTokenizers    []tokComponentJSON `json:"pretokenizers"`
}

// tokIsJSONNull reports whether a raw field is absent or null.
func tokIsJSONNull(raw json.RawMessage) bool {
	trimmed := bytes.TrimSpace(raw)
	return len(trimmed) == 0 || string(trimmed) == "null"
}

func loadTokenizerJSON(path string) (*Tokenizer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	var file tokFileJSON
	if err := json.Unmarshal(data, &file); err != nil {
		return nil, fmt.Errorf("tokenizer: %s: invalid JSON: %v", path, err)
	}
	fail := func(format string, args ...any) (*Tokenizer, error) {
		return nil, fmt.Errorf("tokenizer: %s: "+format, append([]any{path}, args...)...)
	}
	model := file.Model
	if model == nil {
		return fail("no \"model\" object")
	}
	if model.Type != "BPE" && model.Type != "" {
		return fail("model type %q is not supported (only BPE)", model.Type)
	}
	if model.Vocab == nil || tokIsJSONNull(model.Merges) {
		return fail("model has no vocab or no merges")
	}
	if model.Dropout != nil && *model.Dropout != 0 {
		return fail("BPE dropout %v is not supported", *model.Dropout)
	}
	if model.ByteFallback {
		return fail("BPE byte_fallback is not supported (this is a byte-level BPE tokenizer)")
	}
	if p := model.ContinuingSubwordPrefix; p != nil && *p != "" {
		return fail("BPE continuing_subword_prefix %q is not supported", *p)
	}
	if s := model.EndOfWordSuffix; s != nil && *s != "" {
		return fail("BPE end_of_word_suffix %q is not supported", *s)
	}
	if !tokIsJSONNull(file.Normalizer) {
		return fail("normalizer %s is not supported (only null)", tokShortJSON(file.Normalizer))
	}
	splitDigits, err := tokCheckPreTokenizer(file.PreTokenizer)
	if err != nil {
		return fail("%v", err)
	}
	if err := tokCheckDecoder(file.Decoder); err != nil {
		return fail("%v", err)
	}
	merges, err := tokParseJSONMerges(model.Merges)
	if err != nil {
		return fail("%v", err)
	}
	var added []tokAddedJSON
	for i, a := range file.AddedTokens {
		if a.ID == nil {
			return fail("added_tokens[%d] %q has no id", i, a.Content)
		}
		if a.SingleWord || a.LStrip || a.RStrip {
			return fail("added_tokens[%d] %q uses single_word/lstrip/rstrip, which is not supported", i, a.Content)
		}
		added = append(added, a)
	}
	tok, err := tokBuild(model.Vocab, merges, added, model.UnkToken, model.FuseUnk, model.IgnoreMerges, splitDigits)
	if err != nil {
		return fail("%v", err)
	}
	tok.source = path
	return tok, nil
}

// tokShortJSON renders a JSON value for an error message, cut short.
func tokShortJSON(raw json.RawMessage) string {
	s := string(bytes.Join(bytes.Fields(raw), []byte(" ")))
	if len(s) > 120 {
		s = s[:120] + "…"
	}
	return s
}

// tokCheckPreTokenizer accepts ByteLevel(add_prefix_space=false,
// use_regex=true), alone or after Digits(individual_digits=true) in a
// Sequence, and reports whether digits are split.
func tokCheckPreTokenizer(raw json.RawMessage) (splitDigits bool, err error) {
	if tokIsJSONNull(raw) {
		return false, errors.New("pre_tokenizer is null; only ByteLevel is supported")
	}
	var pre tokComponentJSON
	if err := json.Unmarshal(raw, &pre); err != nil {
		return false, fmt.Errorf("pre_tokenizer: %v", err)
	}
	byteLevel := pre
	if pre.Type == "Sequence" {
		steps := pre.PreTokenizers
		switch {
		case len(steps) == 1:
			byteLevel = steps[0]
		case len(steps) == 2 && steps[0].Type == "Digits":
			if steps[0].IndividualDigits == nil || !*steps[0].IndividualDigits {
				return false, fmt.Errorf("pre_tokenizer Digits without individual_digits=true is not supported: %s", tokShortJSON(raw))
			}
			splitDigits = true
			byteLevel = steps[1]
		default:
			return false, fmt.Errorf("pre_tokenizer %s is not supported (only ByteLevel, optionally after Digits)", tokShortJSON(raw))
		}
	}
	if byteLevel.Type != "ByteLevel" {
		return false, fmt.Errorf("pre_tokenizer %s is not supported (only ByteLevel)", tokShortJSON(raw))
	}
	// HF's ByteLevel defaults add_prefix_space to true; only false is supported.
	if byteLevel.AddPrefixSpace == nil || *byteLevel.AddPrefixSpace {
		return false, errors.New("pre_tokenizer ByteLevel with add_prefix_space=true (or unset) is not supported")
	}
	if byteLevel.UseRegex != nil && !*byteLevel.UseRegex {
		return false, errors.New("pre_tokenizer ByteLevel with use_regex=false is not supported")
	}
	return splitDigits, nil
}

// tokCheckDecoder accepts only the ByteLevel decoder, which is what Decode does.
func tokCheckDecoder(raw json.RawMessage) error {
	if tokIsJSONNull(raw) {
		return errors.New("decoder is null; only ByteLevel is supported")
	}
	var dec tokComponentJSON
	if err := json.Unmarshal(raw, &dec); err != nil {
		return fmt.Errorf("decoder: %v", err)
	}
	if dec.Type != "ByteLevel" {
		return fmt.Errorf("decoder %s is not supported (only ByteLevel)", tokShortJSON(raw))
	}
	return nil
}

// tokParseJSONMerges reads model.merges, which HF writes either as
// ["a b", ...] (older files, parsed like merges.txt lines) or as
// [["a","b"], ...] (newer files, which allow spaces inside tokens).
func tokParseJSONMerges(raw json.RawMessage) ([]tokMerge, error) {
	var asStrings []string
	if err := json.Unmarshal(raw, &asStrings); err == nil {
		merges := make([]tokMerge, 0, len(asStrings))
		for i, line := range asStrings {
			if strings.HasPrefix(line, "#version") {
				continue
			}
			m, err := tokParseMergeLine(line, fmt.Sprintf("merges[%d]", i))
			if err != nil {
				return nil, err
			}
			merges = append(merges, m)
		}
		return merges, nil
	}
	var asPairs [][]string
	if err := json.Unmarshal(raw, &asPairs); err != nil {
		return nil, errors.New("model.merges is neither a list of \"a b\" strings nor a list of [\"a\", \"b\"] pairs")
	}
	merges := make([]tokMerge, len(asPairs))
	for i, pair := range asPairs {
		if len(pair) != 2 {
			return nil, fmt.Errorf("merges[%d] has %d tokens, want 2", i, len(pair))
		}
		merges[i] = tokMerge{left: pair[0], right: pair[1], where: fmt.Sprintf("merges[%d]", i)}
	}
	return merges, nil
}

// tokParseMergeLine splits "a b" exactly as HF does (on every ' ', and
// exactly two parts are required).
func tokParseMergeLine(line, where string) (tokMerge, error) {
	parts := strings.Split(line, " ")
	if len(parts) != 2 {
		return tokMerge{}, fmt.Errorf("%s: %q is not two tokens separated by one space", where, line)
	}
	return tokMerge{left: parts[0], right: parts[1], where: where}, nil
}

func loadTokenizerVocabMerges(vocabPath, mergesPath string) (*Tokenizer, error) {
	data, err := os.ReadFile(vocabPath)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	var vocab map[string]int64
	if err := json.Unmarshal(data, &vocab); err != nil {
		return nil, fmt.Errorf("tokenizer: %s: invalid vocabulary (want a JSON object of token → integer id): %v", vocabPath, err)
	}
	if vocab == nil {
		return nil, fmt.Errorf("tokenizer: %s: vocabulary is null", vocabPath)
	}
	text, err := os.ReadFile(mergesPath)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	// Lines as Rust's BufRead::lines gives them: split on \n, a trailing \r
	// dropped, no empty last line after a final newline. Lines starting
	// with "#version" are skipped wherever they are, as HF does.
	lines := strings.Split(string(text), "\n")
	if len(lines) > 0 && lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	merges := make([]tokMerge, 0, len(lines))
	for i, line := range lines {
		line = strings.TrimSuffix(line, "\r")
		if strings.HasPrefix(line, "#version") {
			continue
		}
		m, err := tokParseMergeLine(line, fmt.Sprintf("line %d", i+1))
		if err != nil {
			return nil, fmt.Errorf("tokenizer: %s: %v", mergesPath, err)
		}
		merges = append(merges, m)
	}
	var added []tokAddedJSON
	if id, ok := vocab["<|endoftext|>"]; ok {
		added = append(added, tokAddedJSON{ID: &id, Content: "<|endoftext|>", Special: true})
	}
	source := vocabPath + " + " + mergesPath
	tok, err := tokBuild(vocab, merges, added, nil, false, false, false)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %s: %v", source, err)
	}
	tok.source = source
	return tok, nil
}

// tokBuild checks the vocabulary, merges and added tokens against each
// other and assembles the Tokenizer.
func tokBuild(vocab map[string]int64, merges []tokMerge, added []tokAddedJSON,
	unkToken *string, fuseUnk, ignoreMerges, splitDigits bool) (*Tokenizer, error) {
	t := &Tokenizer{
		vocab:        make(map[string]int32, len(vocab)),
		merges:       make(bpeMerges, len(merges)),
		unkID:        -1,
		fuseUnk:      fuseUnk,
		ignoreMerges: ignoreMerges,
		splitDigits:  splitDigits,
		byteRunes:    bpeByteRunes(),
		cache:        newTokWordCache(),
	}
	runeBytes := bpeRuneBytes(&t.byteRunes)

	maxID := int64(-1)
	checkID := func(id int64, token string) error {
		if id < 0 || id >= tokMaxID {
			return fmt.Errorf("token %q has id %d, outside [0, %d)", token, id, tokMaxID)
		}
		maxID = max(maxID, id)
		return nil
	}
	// Sorted so that any error names the same token every run.
	tokens := make([]string, 0, len(vocab))
	for token, id := range vocab {
		if err := checkID(id, token); err != nil {
			return nil, err
		}
		tokens = append(tokens, token)
	}
	sort.Strings(tokens)
	for _, a := range added {
		if err := checkID(*a.ID, a.Content); err != nil {
			return nil, err
		}
	}
	if maxID < 0 {
		return nil, errors.New("vocabulary is empty")
	}
	t.vocabSize = int(maxID) + 1
	t.known = make([]bool, t.vocabSize)
	t.rawBytes = make([]string, t.vocabSize)
	owner := make([]string, t.vocabSize)
	for _, token := range tokens {
		id := vocab[token]
		if t.known[id] {
			return nil, fmt.Errorf("id %d is given to both %q and %q", id, owner[id], token)
		}
		t.known[id], owner[id] = true, token
		t.rawBytes[id] = string(bpeTokenBytes(token, &runeBytes))
		t.vocab[token] = int32(id)
	}

	// Added tokens: they decode to their content (overriding a model token
	// with the same id, as HF's added vocabulary does) and are cut out of
	// the text before pre-tokenisation.
	t.addedByContent = make(map[string]int32, len(added))
	for _, a := range added {
		if a.Content == "" {
			return nil, fmt.Errorf("added token with id %d has empty content", *a.ID)
		}
		id := int32(*a.ID)
		t.known[id] = true
		t.rawBytes[id] = string(bpeTokenBytes(a.Content, &runeBytes))
		t.addedByContent[a.Content] = id
		entry := tokAddedToken{content: a.Content, id: id}
		if a.Normalized {
			t.addedNormalized = append(t.addedNormalized, entry)
		} else {
			t.addedRaw = append(t.addedRaw, entry)
		}
	}

	missingByte := false
	for b := range 256 {
		if id, ok := t.vocab[string(t.byteRunes[b])]; ok {
			t.byteSymbol[b] = id
		} else {
			t.byteSymbol[b] = -1
			missingByte = true
		}
	}
	if unkToken != nil {
		if id, ok := t.vocab[*unkToken]; ok {
			t.unkID = id
		} else if missingByte {
			// HF fails at encode time when it needs the unk token; refuse now.
			return nil, fmt.Errorf("unk_token %q is not in the vocabulary", *unkToken)
		}
	}

	// Rank = position among the merges; a repeated pair keeps its last
	// rank, as HF's HashMap collect does.
	for rank, m := range merges {
		left, ok := t.vocab[m.left]
		if !ok {
			return nil, fmt.Errorf("merge %s (%q %q): token %q is not in the vocabulary", m.where, m.left, m.right, m.left)
		}
		right, ok := t.vocab[m.right]
		if !ok {
			return nil, fmt.Errorf("merge %s (%q %q): token %q is not in the vocabulary", m.where, m.left, m.right, m.right)
		}
		merged, ok := t.vocab[m.left+m.right]
		if !ok {
			return nil, fmt.Errorf("merge %s (%q %q): merged token %q is not in the vocabulary", m.where, m.left, m.right, m.left+m.right)
		}
		t.merges[bpePairKey(left, right)] = bpeMergeRule(uint32(rank), merged)
	}
	return t, nil
}
