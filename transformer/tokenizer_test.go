package transformer

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/kvalign/kvalign/internal/testenv"
)

// Fixtures: KVALIGN_SHARED (default ../shared beside the module root) holds
// the GPT-2 vocabulary, the fixture tokenizer and the evaluation texts; the
// HF goldens written by scripts/reference/tokenizer_golden.py live in
// testdata/tokenizer (KVALIGN_TOKENIZER_GOLDEN overrides that folder, for
// checking goldens made elsewhere). Tests that need them skip, saying why,
// when they are absent; any mismatch is a failure.

func tokGoldenDir(t testing.TB) string {
	t.Helper()
	if dir := os.Getenv("KVALIGN_TOKENIZER_GOLDEN"); dir != "" {
		return dir
	}
	return filepath.Join(testenv.Root(), "testdata", "tokenizer")
}

// tokTestTokenizers are the tokenizers the conformance tests cover, by the
// names the golden files use.
var tokTestTokenizers = []struct{ name, dir string }{
	{"gpt2", "reference/tokenizers/gpt2"},            // vocab.json + merges.txt
	{"gutenberg", "models/gutenberg-gpt2-7m"},        // tokenizer.json
	{"gutenberg-digits", "models/gutenberg-gpt2-7m"}, // same, Digits pre-split added
}

var tokTestTexts = []struct{ name, path string }{
	{"wikitext-test", "data/wikitext-test.txt"},
	{"gutenberg-valid", "data/gutenberg-valid.txt"},
}

func tokLoadShared(t testing.TB, name string) *Tokenizer {
	t.Helper()
	for _, tt := range tokTestTokenizers {
		if tt.name != name {
			continue
		}
		dir := testenv.Shared(t, tt.dir)
		if name == "gutenberg-digits" {
			dir = tokWithDigitsPreTokenizer(t, filepath.Join(dir, "tokenizer.json"))
		}
		tok, err := LoadTokenizer(dir)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	t.Fatalf("unknown test tokenizer %q", name)
	return nil
}

// tokWithDigitsPreTokenizer copies a tokenizer.json into a temp folder with
// its pre-tokenizer replaced by Sequence[Digits, ByteLevel], exactly as the
// golden script does for cases-gutenberg-digits.json.
func tokWithDigitsPreTokenizer(t testing.TB, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var spec map[string]any
	if err := json.Unmarshal(data, &spec); err != nil {
		t.Fatal(err)
	}
	spec["pre_tokenizer"] = map[string]any{
		"type": "Sequence",
		"pretokenizers": []any{
			map[string]any{"type": "Digits", "individual_digits": true},
			map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
		},
	}
	dir := t.TempDir()
	tokWriteJSON(t, filepath.Join(dir, "tokenizer.json"), spec)
	return dir
}

func tokWriteJSON(t testing.TB, path string, v any) {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func tokReadText(t testing.TB, rel string) string {
	t.Helper()
	data, err := os.ReadFile(testenv.Shared(t, rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// tokIDsSHA256 hashes ids as little-endian int32, as the golden script does.
func tokIDsSHA256(ids []int) string {
	buf := make([]byte, 4*len(ids))
	for i, id := range ids {
		binary.LittleEndian.PutUint32(buf[4*i:], uint32(int32(id)))
	}
	sum := sha256.Sum256(buf)
	return hex.EncodeToString(sum[:])
}

// ---------------------------------------------------------------------------
// Pre-tokenizer

func TestPretokenizeMatchesGPT2Regex(t *testing.T) {
	cases := []struct {
		text        string
		splitDigits bool
		want        []string
	}{
		{"", false, nil},
		{"Hello world", false, []string{"Hello", " world"}},
		{"a  b", false, []string{"a", " ", " b"}},
		{"a   b", false, []string{"a", "  ", " b"}},
		{"a\n\nb", false, []string{"a", "\n", "\n", "b"}},
		{"a \n b", false, []string{"a", " \n", " b"}},
		{"a \nb", false, []string{"a", " ", "\n", "b"}},
		{" \tx", false, []string{" ", "\t", "x"}},
		{"\t x", false, []string{"\t", " x"}},
		{"  x", false, []string{" ", " x"}},
		{"x\t", false, []string{"x", "\t"}},
		{"trailing   ", false, []string{"trailing", "   "}},
		{" ", false, []string{" "}},
		{"\n", false, []string{"\n"}},
		{"I'm don't we're they've you'll he'd it's", false,
			[]string{"I", "'m", " don", "'t", " we", "'re", " they", "'ve", " you", "'ll", " he", "'d", " it", "'s"}},
		{"DON'T", false, []string{"DON", "'", "T"}},
		{"'sa", false, []string{"'s", "a"}},
		{"'rx 'lx 'vx", false, []string{"'", "rx", " '", "lx", " '", "vx"}},
		{"!'s", false, []string{"!'", "s"}},
		{" 's", false, []string{" '", "s"}},
		{"''s", false, []string{"''", "s"}},
		{"abc123def", false, []string{"abc", "123", "def"}},
		{" 123 x", false, []string{" 123", " x"}},
		{"3.14", false, []string{"3", ".", "14"}},
		{"café naïve", false, []string{"café", " naïve"}},
		{" 日本語", false, []string{" 日本語"}},
		{"😀👍 🇫🇷", false, []string{"😀👍", " 🇫🇷"}},
		{"e\u0301", false, []string{"e", "\u0301"}},         // a combining mark is not \p{L}
		{"½Ⅻ٣", false, []string{"½Ⅻ٣"}},                     // No, Nl and Nd are all \p{N}
		{"a\u00a0b", false, []string{"a", "\u00a0", "b"}},   // NBSP is \s but not the literal ' '
		{"a\u00a0 b", false, []string{"a", "\u00a0", " b"}}, // the run gives back its last char
		{"x \u3000y", false, []string{"x", " ", "\u3000", "y"}},
		{"\x1c\x1f", false, []string{"\x1c\x1f"}}, // not White_Space: punctuation-like
		{"a\xffb", false, []string{"a", "\xff", "b"}},
		{" \xff", false, []string{" \xff"}},
		// Digits{individual_digits} runs first: every numeric character is
		// its own piece and the regex then runs on each piece alone.
		{"abc123 4x", true, []string{"abc", "1", "2", "3", " ", "4", "x"}},
		{"a  1", true, []string{"a", "  ", "1"}},
		{"٣½", true, []string{"٣", "½"}},
	}
	for _, c := range cases {
		var got []string
		tokForEachPretoken(c.text, c.splitDigits, func(piece string) { got = append(got, piece) })
		if !reflect.DeepEqual(got, c.want) {
			t.Errorf("pretokenize(%q, digits=%v) = %q, want %q", c.text, c.splitDigits, got, c.want)
		}
	}
}

// ---------------------------------------------------------------------------
// Real GPT-2 vocabulary: encodings known from the GPT-2 papers and tooling.

func TestTokenizerGPT2KnownEncodings(t *testing.T) {
	tok := tokLoadShared(t, "gpt2")
	if got := tok.VocabSize(); got != 50257 {
		t.Errorf("VocabSize = %d, want 50257", got)
	}
	if got := tok.EOS(); got != 50256 {
		t.Errorf("EOS = %d, want 50256", got)
	}
	known := []struct {
		text string
		ids  []int
	}{
		{"Hello world", []int{15496, 995}},
		{" the", []int{262}},
		{"Hello, world!", []int{15496, 11, 995, 0}},
		{"<|endoftext|>", []int{50256}},
		{"\n", []int{198}},
		{" ", []int{220}},
		{"The quick brown fox jumps over the lazy dog.", []int{464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13}},
		{"a<|endoftext|>b", []int{64, 50256, 65}},
	}
	for _, k := range known {
		if got := tok.Encode(k.text); !reflect.DeepEqual(got, k.ids) {
			t.Errorf("Encode(%q) = %v, want %v", k.text, got, k.ids)
		}
		if got := tok.Decode(k.ids); got != k.text {
			t.Errorf("Decode(%v) = %q, want %q", k.ids, got, k.text)
		}
	}
	if got := string(tok.DecodeToken(995)); got != " world" {
		t.Errorf("DecodeToken(995) = %q, want %q", got, " world")
	}
	if got := tok.DecodeToken(1 << 20); got != nil {
		t.Errorf("DecodeToken(unknown) = %q, want nil", got)
	}
}

func TestTokenizerFixtureBasics(t *testing.T) {
	tok := tokLoadShared(t, "gutenberg")
	if got := tok.VocabSize(); got != 8192 {
		t.Errorf("VocabSize = %d, want 8192", got)
	}
	if got := tok.EOS(); got != 0 {
		t.Errorf("EOS = %d, want 0", got)
	}
	if id, ok := tok.SpecialID("<|endoftext|>"); !ok || id != 0 {
		t.Errorf("SpecialID(<|endoftext|>) = %d, %v; want 0, true", id, ok)
	}
	if _, ok := tok.SpecialID("<|im_start|>"); ok {
		t.Error("SpecialID(<|im_start|>) found a token the fixture does not have")
	}
}

// The fixture ships both tokenizer.json and vocab.json + merges.txt: both
// loading paths must give the same ids.
func TestTokenizerFixtureLoadPathsAgree(t *testing.T) {
	fixture := testenv.Shared(t, "models", "gutenberg-gpt2-7m")
	fromJSON, err := LoadTokenizer(fixture)
	if err != nil {
		t.Fatal(err)
	}
	legacyDir := t.TempDir()
	for _, name := range []string{"vocab.json", "merges.txt"} {
		if err := os.Symlink(filepath.Join(fixture, name), filepath.Join(legacyDir, name)); err != nil {
			t.Fatal(err)
		}
	}
	fromFiles, err := LoadTokenizer(legacyDir)
	if err != nil {
		t.Fatal(err)
	}
	if fromJSON.VocabSize() != fromFiles.VocabSize() || fromJSON.EOS() != fromFiles.EOS() {
		t.Fatalf("vocab size/EOS differ: json %d/%d, files %d/%d",
			fromJSON.VocabSize(), fromJSON.EOS(), fromFiles.VocabSize(), fromFiles.EOS())
	}
	for _, text := range tokTestTexts {
		s := tokReadText(t, text.path)
		tokCompareIDs(t, text.name, fromFiles, fromJSON.Encode(s), fromFiles.Encode(s))
	}
}

func TestTokenizerRoundTrip(t *testing.T) {
	for _, name := range []string{"gpt2", "gutenberg"} {
		tok := tokLoadShared(t, name)
		for _, text := range tokTestTexts {
			s := tokReadText(t, text.path)
			if got := tok.Decode(tok.Encode(s)); got != s {
				i := 0
				for i < len(got) && i < len(s) && got[i] == s[i] {
					i++
				}
				t.Errorf("%s/%s: Decode(Encode(s)) differs from s at byte %d: got %q, want %q",
					name, text.name, i, tokSnippet(got, i), tokSnippet(s, i))
			}
		}
	}
}

func tokSnippet(s string, at int) string {
	return s[max(0, at-20):min(len(s), at+20)]
}

// tokCompareIDs fails with the first differing index and the text around it.
func tokCompareIDs(t *testing.T, what string, tok *Tokenizer, want, got []int) {
	t.Helper()
	n := min(len(want), len(got))
	first := n
	for i := 0; i < n; i++ {
		if want[i] != got[i] {
			first = i
			break
		}
	}
	if first == n && len(want) == len(got) {
		return
	}
	lo, hi := max(0, first-5), first+5
	t.Errorf("%s: %d ids, want %d; first difference at index %d:\n got  %v (%q)\n want %v (%q)",
		what, len(got), len(want), first,
		got[lo:min(hi, len(got))], tok.Decode(got[lo:min(hi, len(got))]),
		want[lo:min(hi, len(want))], tok.Decode(want[lo:min(hi, len(want))]))
}

// ---------------------------------------------------------------------------
// HF goldens

type tokGoldenText struct {
	Tokenizer   string   `json:"tokenizer"`
	TextFile    string   `json:"text_file"`
	TextSHA256  string   `json:"text_sha256"`
	NumIDs      int      `json:"num_ids"`
	IDsSHA256   string   `json:"ids_sha256"`
	BlockSize   int      `json:"block_size"`
	BlockSHA256 []string `json:"block_sha256"`
	FirstIDs    []int    `json:"first_ids"`
	LastIDs     []int    `json:"last_ids"`
}

type tokGoldenCases struct {
	EOSID     *int `json:"eos_id"`
	VocabSize int  `json:"vocab_size"`
	Encode    []struct {
		Text string `json:"text"`
		IDs  []int  `json:"ids"`
	} `json:"encode"`
	Decode []struct {
		IDs  []int  `json:"ids"`
		Text string `json:"text"`
	} `json:"decode"`
}

// tokReadGolden reads a golden file, skipping the test if it is absent.
func tokReadGolden(t *testing.T, name string, into any) {
	t.Helper()
	path := filepath.Join(tokGoldenDir(t), name)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		t.Skipf("golden file %s is absent: run scripts/reference/tokenizer_golden.py --shared <shared> --out testdata/tokenizer where HF tokenizers is installed", path)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// TestTokenizerMatchesHFOnWholeTexts is the acceptance test: ids identical
// to HF tokenizers on the whole of both evaluation texts, for the real GPT-2
// vocabulary and the fixture tokenizer.
func TestTokenizerMatchesHFOnWholeTexts(t *testing.T) {
	for _, tt := range tokTestTokenizers[:2] {
		for _, text := range tokTestTexts {
			t.Run(tt.name+"-"+text.name, func(t *testing.T) {
				var golden tokGoldenText
				tokReadGolden(t, tt.name+"-"+text.name+".json", &golden)
				s := tokReadText(t, text.path)
				if golden.TextSHA256 != "" {
					sum := sha256.Sum256([]byte(s))
					if got := hex.EncodeToString(sum[:]); got != golden.TextSHA256 {
						t.Fatalf("%s changed since the golden was written (sha256 %s, golden %s): rerun the golden script", text.path, got, golden.TextSHA256)
					}
				}
				tok := tokLoadShared(t, tt.name)
				ids := tok.Encode(s)
				tokCheckAgainstGolden(t, tok, ids, &golden)
			})
		}
	}
}

func tokCheckAgainstGolden(t *testing.T, tok *Tokenizer, ids []int, golden *tokGoldenText) {
	t.Helper()
	tokCompareIDs(t, "first ids", tok, golden.FirstIDs, ids[:min(len(ids), len(golden.FirstIDs))])
	tokCompareIDs(t, "last ids", tok, golden.LastIDs, ids[max(0, len(ids)-len(golden.LastIDs)):])
	if len(ids) != golden.NumIDs {
		t.Errorf("%d ids, HF gives %d", len(ids), golden.NumIDs)
	}
	if golden.BlockSize > 0 {
		for b, want := range golden.BlockSHA256 {
			lo := b * golden.BlockSize
			if lo >= len(ids) {
				break
			}
			block := ids[lo:min(len(ids), lo+golden.BlockSize)]
			if tokIDsSHA256(block) != want {
				t.Errorf("block %d (ids %d..%d) differs from HF; it decodes as %q…", b, lo, lo+len(block), tokSnippet(tok.Decode(block), 0))
				break
			}
		}
	}
	if got := tokIDsSHA256(ids); got != golden.IDsSHA256 {
		t.Errorf("sha256 of ids = %s, HF gives %s", got, golden.IDsSHA256)
	}
}

func TestTokenizerMatchesHFOnCases(t *testing.T) {
	for _, tt := range tokTestTokenizers {
		t.Run(tt.name, func(t *testing.T) {
			var golden tokGoldenCases
			tokReadGolden(t, "cases-"+tt.name+".json", &golden)
			tok := tokLoadShared(t, tt.name)
			if golden.EOSID != nil && *golden.EOSID != tok.EOS() {
				t.Errorf("EOS = %d, HF gives %d", tok.EOS(), *golden.EOSID)
			}
			if golden.VocabSize != 0 && golden.VocabSize != tok.VocabSize() {
				t.Errorf("VocabSize = %d, HF gives %d", tok.VocabSize(), golden.VocabSize)
			}
			for _, c := range golden.Encode {
				if got := tok.Encode(c.Text); !reflect.DeepEqual(got, c.IDs) && !(len(got) == 0 && len(c.IDs) == 0) {
					t.Errorf("Encode(%q) = %v, HF gives %v", c.Text, got, c.IDs)
				}
			}
			for _, c := range golden.Decode {
				if got := tok.Decode(c.IDs); got != c.Text {
					t.Errorf("Decode(%v) = %q, HF gives %q", c.IDs, got, c.Text)
				}
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Decoding invalid UTF-8 (no fixtures needed)

func TestLossyUTF8MatchesPythonReplace(t *testing.T) {
	// Expected values are Python's bytes(...).decode("utf-8", errors="replace").
	const r = "\uFFFD"
	cases := []struct {
		in   []byte
		want string
	}{
		{[]byte{0xE2, 0x82}, r},
		{[]byte{0xE2, 0x82, 0x41}, r + "A"},
		{[]byte{0xFF}, r},
		{[]byte{0x80}, r},
		{[]byte{0x41, 0x80, 0x80, 0x42}, "A" + r + r + "B"},
		{[]byte{0xC0, 0x80}, r + r},
		{[]byte{0xC2}, r},
		{[]byte{0xED, 0xA0, 0x80}, r + r + r},
		{[]byte{0xF0, 0x9F, 0x98}, r},
		{[]byte{0xF0, 0x9F, 0x98, 0x80}, "😀"},
		{[]byte{0xF0, 0x9F, 0x41}, r + "A"},
		{[]byte{0xF4, 0x90, 0x80, 0x80}, r + r + r + r},
		{[]byte{0xF4, 0x8F, 0xBF, 0xBF}, "\U0010FFFF"},
		{[]byte{0xE0, 0x80, 0xAF}, r + r + r},
		{[]byte{0xE0, 0xA0}, r},
		{[]byte{0xF8, 0x88, 0x80, 0x80, 0x80}, r + r + r + r + r},
		{[]byte{0xC3, 0xA9, 0xC3}, "é" + r},
		{[]byte("plain ascii"), "plain ascii"},
	}
	for _, c := range cases {
		if got := string(bpeAppendLossyUTF8(nil, c.in)); got != c.want {
			t.Errorf("lossy(% x) = %q, want %q", c.in, got, c.want)
		}
	}
}

// ---------------------------------------------------------------------------
// BPE merge loop

// The scan (short words) and the heap (long words, HF's algorithm) must
// agree. Each rule gets its own merged id, as in any real vocabulary.
func TestMergeHeapMatchesScan(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for trial := 0; trial < 200; trial++ {
		const base = 4
		merges := bpeMerges{}
		nextID := int32(base)
		numRules := 5 + rng.Intn(40)
		ranks := rng.Perm(numRules)
		for r := 0; r < numRules; r++ {
			left, right := rng.Int31n(nextID), rng.Int31n(nextID)
			if _, ok := merges[bpePairKey(left, right)]; ok {
				continue
			}
			merges[bpePairKey(left, right)] = bpeMergeRule(uint32(ranks[r]), nextID)
			nextID++
		}
		n := 2 + rng.Intn(200)
		word := make([]int32, n)
		for i := range word {
			word[i] = rng.Int31n(base)
		}
		byScan := merges.mergeByScan(append([]int32(nil), word...))
		byHeap := merges.mergeWithHeap(append([]int32(nil), word...))
		if !reflect.DeepEqual(byScan, byHeap) {
			t.Fatalf("trial %d: word %v: scan %v, heap %v", trial, word, byScan, byHeap)
		}
	}
}

// ---------------------------------------------------------------------------
// A small synthetic tokenizer: runs everywhere, no fixtures needed.

// tokSyntheticSpec returns a tokenizer.json object whose vocabulary has the
// 256 byte characters as ids 0..255 (id = byte value) plus a few merges.
func tokSyntheticSpec() map[string]any {
	byteRunes := bpeByteRunes()
	vocab := map[string]any{}
	for b, r := range byteRunes {
		vocab[string(r)] = b
	}
	next := 256
	var merges []any
	for _, m := range [][2]string{{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"Ġ", "w"}} {
		vocab[m[0]+m[1]] = next
		next++
		merges = append(merges, m[0]+" "+m[1])
	}
	vocab["<|endoftext|>"] = next // 261
	return map[string]any{
		"version":        "1.0",
		"truncation":     nil,
		"padding":        nil,
		"added_tokens":   []any{map[string]any{"id": next, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}},
		"normalizer":     nil,
		"pre_tokenizer":  map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
		"post_processor": map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
		"decoder":        map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
		"model": map[string]any{
			"type": "BPE", "dropout": nil, "unk_token": nil, "continuing_subword_prefix": nil,
			"end_of_word_suffix": nil, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
			"vocab": vocab, "merges": merges,
		},
	}
}

func tokLoadSpec(t *testing.T, spec map[string]any) (*Tokenizer, error) {
	t.Helper()
	dir := t.TempDir()
	tokWriteJSON(t, filepath.Join(dir, "tokenizer.json"), spec)
	return LoadTokenizer(dir)
}

func tokMustLoadSpec(t *testing.T, spec map[string]any) *Tokenizer {
	t.Helper()
	tok, err := tokLoadSpec(t, spec)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestTokenizerSynthetic(t *testing.T) {
	spec := tokSyntheticSpec()
	tok := tokMustLoadSpec(t, spec)
	// "hello" merges fully (he, ll, hell, hello); " world" only merges Ġw.
	want := []int{259, 260, 'o', 'r', 'l', 'd', 261, 'h', 'i'}
	text := "hello world<|endoftext|>hi"
	if got := tok.Encode(text); !reflect.DeepEqual(got, want) {
		t.Errorf("Encode(%q) = %v, want %v", text, got, want)
	}
	if got := tok.Decode(want); got != text {
		t.Errorf("Decode = %q, want %q", got, text)
	}
	if !strings.HasSuffix(tok.Source(), "tokenizer.json") {
		t.Errorf("Source() = %q, want the tokenizer.json path", tok.Source())
	}
	if tok.VocabSize() != 262 || tok.EOS() != 261 {
		t.Errorf("VocabSize, EOS = %d, %d; want 262, 261", tok.VocabSize(), tok.EOS())
	}
	// Cached and uncached encodings agree.
	if again := tok.Encode(text); !reflect.DeepEqual(again, want) {
		t.Errorf("second Encode(%q) = %v, want %v", text, again, want)
	}

	// Merges written as pairs give the same tokenizer.
	model := spec["model"].(map[string]any)
	var pairs []any
	for _, m := range model["merges"].([]any) {
		parts := strings.Split(m.(string), " ")
		pairs = append(pairs, []string{parts[0], parts[1]})
	}
	model["merges"] = pairs
	if got := tokMustLoadSpec(t, spec).Encode(text); !reflect.DeepEqual(got, want) {
		t.Errorf("with [a, b] merges: Encode(%q) = %v, want %v", text, got, want)
	}
}

func TestTokenizerAddedTokensLeftmostLongest(t *testing.T) {
	spec := tokSyntheticSpec()
	spec["added_tokens"] = []any{
		map[string]any{"id": 300, "content": "<a>", "normalized": false, "special": true},
		map[string]any{"id": 301, "content": "<a><b>", "normalized": false, "special": true},
		map[string]any{"id": 302, "content": "b>", "normalized": true, "special": false},
	}
	tok := tokMustLoadSpec(t, spec)
	cases := []struct {
		text string
		want []int
	}{
		{"<a><b>", []int{301}},          // longest at the same start
		{"x<a>y", []int{'x', 300, 'y'}}, // leftmost
		{"<a><a><b>", []int{300, 301}},  // leftmost beats longest
		{"<b>", []int{'<', 302}},        // normalized tokens match in the second pass
		{"<a>b><a><b>", []int{300, 302, 301}},
	}
	for _, c := range cases {
		if got := tok.Encode(c.text); !reflect.DeepEqual(got, c.want) {
			t.Errorf("Encode(%q) = %v, want %v", c.text, got, c.want)
		}
	}
	if tok.VocabSize() != 303 {
		t.Errorf("VocabSize = %d, want 303", tok.VocabSize())
	}
}

func TestTokenizerUnknownBytes(t *testing.T) {
	byteRunes := bpeByteRunes()
	withoutZ := func(unk any, fuse bool) map[string]any {
		spec := tokSyntheticSpec()
		model := spec["model"].(map[string]any)
		vocab := model["vocab"].(map[string]any)
		delete(vocab, string(byteRunes['z']))
		vocab["<unk>"] = 400
		model["unk_token"] = unk
		model["fuse_unk"] = fuse
		return spec
	}
	cases := []struct {
		unk  any
		fuse bool
		want []int
	}{
		{nil, false, []int{'a', 'b'}}, // no unk_token: HF drops the character
		{"<unk>", false, []int{'a', 400, 400, 'b'}},
		{"<unk>", true, []int{'a', 400, 'b'}},
	}
	for _, c := range cases {
		tok := tokMustLoadSpec(t, withoutZ(c.unk, c.fuse))
		if got := tok.Encode("azzb"); !reflect.DeepEqual(got, c.want) {
			t.Errorf("unk=%v fuse=%v: Encode(azzb) = %v, want %v", c.unk, c.fuse, got, c.want)
		}
	}
	if _, err := tokLoadSpec(t, withoutZ("<nope>", false)); err == nil || !strings.Contains(err.Error(), "<nope>") {
		t.Errorf("unk_token missing from the vocabulary: err = %v", err)
	}
}

func TestTokenizerIgnoreMerges(t *testing.T) {
	spec := tokSyntheticSpec()
	model := spec["model"].(map[string]any)
	vocab := model["vocab"].(map[string]any)
	vocab["abc"] = 500 // reachable by no merge
	model["ignore_merges"] = true
	tok := tokMustLoadSpec(t, spec)
	if got, want := tok.Encode("abc hello"), []int{500, ' ', 259}; !reflect.DeepEqual(got, want) {
		t.Errorf("Encode = %v, want %v", got, want)
	}
}

func TestLoadTokenizerErrorsNameTheFile(t *testing.T) {
	edits := []struct {
		name     string
		edit     func(spec map[string]any)
		contains string
	}{
		{"wordpiece", func(s map[string]any) { s["model"].(map[string]any)["type"] = "WordPiece" }, "WordPiece"},
		{"byte fallback", func(s map[string]any) { s["model"].(map[string]any)["byte_fallback"] = true }, "byte_fallback"},
		{"dropout", func(s map[string]any) { s["model"].(map[string]any)["dropout"] = 0.1 }, "dropout"},
		{"subword prefix", func(s map[string]any) { s["model"].(map[string]any)["continuing_subword_prefix"] = "##" }, "continuing_subword_prefix"},
		{"normalizer", func(s map[string]any) { s["normalizer"] = map[string]any{"type": "NFC"} }, "normalizer"},
		{"prefix space", func(s map[string]any) {
			s["pre_tokenizer"].(map[string]any)["add_prefix_space"] = true
		}, "add_prefix_space"},
		{"no regex", func(s map[string]any) { s["pre_tokenizer"].(map[string]any)["use_regex"] = false }, "use_regex"},
		{"metaspace", func(s map[string]any) { s["pre_tokenizer"] = map[string]any{"type": "Metaspace"} }, "Metaspace"},
		{"null decoder", func(s map[string]any) { s["decoder"] = nil }, "decoder"},
		{"lstrip", func(s map[string]any) {
			s["added_tokens"].([]any)[0].(map[string]any)["lstrip"] = true
		}, "lstrip"},
		{"unknown merge token", func(s map[string]any) {
			m := s["model"].(map[string]any)
			m["merges"] = append(m["merges"].([]any), "q zz")
		}, `"zz"`},
		{"merged token missing", func(s map[string]any) {
			m := s["model"].(map[string]any)
			m["merges"] = append(m["merges"].([]any), "x y")
		}, `"xy"`},
		{"bad merge line", func(s map[string]any) {
			m := s["model"].(map[string]any)
			m["merges"] = append(m["merges"].([]any), "a b c")
		}, "merges[5]"},
		{"negative id", func(s map[string]any) {
			s["model"].(map[string]any)["vocab"].(map[string]any)["neg"] = -1
		}, "-1"},
		{"huge id", func(s map[string]any) {
			s["model"].(map[string]any)["vocab"].(map[string]any)["huge"] = 1 << 40
		}, "huge"},
		{"duplicate id", func(s map[string]any) {
			s["model"].(map[string]any)["vocab"].(map[string]any)["dup"] = 5
		}, "id 5"},
		{"no model", func(s map[string]any) { delete(s, "model") }, "model"},
	}
	for _, e := range edits {
		spec := tokSyntheticSpec()
		e.edit(spec)
		dir := t.TempDir()
		path := filepath.Join(dir, "tokenizer.json")
		tokWriteJSON(t, path, spec)
		_, err := LoadTokenizer(dir)
		if err == nil {
			t.Errorf("%s: no error", e.name)
			continue
		}
		if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), e.contains) {
			t.Errorf("%s: error %q should name %s and mention %s", e.name, err, path, e.contains)
		}
	}

	// Files that are not JSON, or missing.
	dir := t.TempDir()
	if _, err := LoadTokenizer(dir); err == nil || !strings.Contains(err.Error(), dir) {
		t.Errorf("empty folder: err = %v", err)
	}
	if _, err := LoadTokenizer(filepath.Join(dir, "absent")); err == nil {
		t.Error("missing folder: no error")
	}
	bad := filepath.Join(dir, "tokenizer.json")
	if err := os.WriteFile(bad, []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadTokenizer(dir); err == nil || !strings.Contains(err.Error(), bad) {
		t.Errorf("invalid JSON: err = %v", err)
	}
}

func TestLoadTokenizerVocabMergesErrors(t *testing.T) {
	byteRunes := bpeByteRunes()
	vocab := map[string]int{}
	for b, r := range byteRunes {
		vocab[string(r)] = b
	}
	vocab["he"] = 256
	write := func(vocabJSON any, merges string) (dir, vocabPath, mergesPath string) {
		dir = t.TempDir()
		vocabPath, mergesPath = filepath.Join(dir, "vocab.json"), filepath.Join(dir, "merges.txt")
		if s, ok := vocabJSON.(string); ok {
			if err := os.WriteFile(vocabPath, []byte(s), 0o644); err != nil {
				t.Fatal(err)
			}
		} else {
			tokWriteJSON(t, vocabPath, vocabJSON)
		}
		if err := os.WriteFile(mergesPath, []byte(merges), 0o644); err != nil {
			t.Fatal(err)
		}
		return dir, vocabPath, mergesPath
	}

	dir, _, _ := write(vocab, "#version: 0.2\r\nh e\r\n")
	tok, err := LoadTokenizer(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := tok.Encode("hex"); !reflect.DeepEqual(got, []int{256, 'x'}) {
		t.Errorf("Encode(hex) = %v, want [256 120]", got)
	}
	if tok.EOS() != -1 {
		t.Errorf("EOS = %d, want -1 (no <|endoftext|>)", tok.EOS())
	}

	cases := []struct {
		name     string
		vocab    any
		merges   string
		file     int // 0: vocab.json, 1: merges.txt
		contains string
	}{
		{"vocab not JSON", "{oops", "h e\n", 0, "invalid vocabulary"},
		{"vocab not an object", "[1, 2]", "h e\n", 0, "invalid vocabulary"},
		{"blank merge line", vocab, "#version: 0.2\nh e\n\n", 1, "line 3"},
		{"three tokens", vocab, "h e x\n", 1, "line 1"},
		{"unknown token", vocab, "h e\nhe zz\n", 1, `"zz"`},
	}
	for _, c := range cases {
		dir, vocabPath, mergesPath := write(c.vocab, c.merges)
		_, err := LoadTokenizer(dir)
		path := []string{vocabPath, mergesPath}[c.file]
		if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), c.contains) {
			t.Errorf("%s: error %v should name %s and mention %s", c.name, err, path, c.contains)
		}
	}
}

func TestTokenizerNeverPanicsOnOddInput(t *testing.T) {
	tok := tokMustLoadSpec(t, tokSyntheticSpec())
	rng := rand.New(rand.NewSource(7))
	for i := 0; i < 500; i++ {
		buf := make([]byte, rng.Intn(64))
		rng.Read(buf)
		s := string(buf)
		ids := tok.Encode(s)
		// Every byte survives, so the bytes come back exactly.
		var joined []byte
		for _, id := range ids {
			joined = append(joined, tok.DecodeToken(id)...)
		}
		if !bytes.Equal(joined, buf) {
			t.Fatalf("bytes of Encode(% x) = % x", buf, joined)
		}
		if got := tok.Decode(ids); !utf8.ValidString(got) {
			t.Fatalf("Decode gave invalid UTF-8 %q", got)
		}
	}
	if got := tok.Decode([]int{-1, 1 << 30, 'a'}); got != "a" {
		t.Errorf("Decode with unknown ids = %q, want %q", got, "a")
	}
}

// Encode may be called from several goroutines at once (run with -race).
func TestTokenizerConcurrentEncode(t *testing.T) {
	tok := tokMustLoadSpec(t, tokSyntheticSpec())
	want := tok.Encode("hello world, hello again<|endoftext|>")
	done := make(chan []int)
	for g := 0; g < 4; g++ {
		go func() { done <- tok.Encode("hello world, hello again<|endoftext|>") }()
	}
	for g := 0; g < 4; g++ {
		if got := <-done; !reflect.DeepEqual(got, want) {
			t.Errorf("concurrent Encode = %v, want %v", got, want)
		}
	}
}

// ---------------------------------------------------------------------------
// Benchmarks

func tokBenchmarkEncode(b *testing.B, name string, cold bool) {
	tok := tokLoadShared(b, name)
	text := tokReadText(b, "data/wikitext-test.txt")
	b.SetBytes(int64(len(text)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if cold {
			tok.resetCache()
		}
		if ids := tok.Encode(text); len(ids) == 0 {
			b.Fatal("no ids")
		}
	}
}

// BenchmarkEncode encodes the whole WikiText test split with the GPT-2
// vocabulary (the pre-token cache warm after the first pass, as it is when
// a long text is encoded).
func BenchmarkEncode(b *testing.B) { tokBenchmarkEncode(b, "gpt2", false) }

// BenchmarkEncodeColdCache starts every pass with an empty pre-token cache.
func BenchmarkEncodeColdCache(b *testing.B) { tokBenchmarkEncode(b, "gpt2", true) }

func BenchmarkLoadTokenizerGPT2(b *testing.B) {
	dir := testenv.Shared(b, "reference", "tokenizers", "gpt2")
	for i := 0; i < b.N; i++ {
		if _, err := LoadTokenizer(dir); err != nil {
			b.Fatal(err)
		}
	}
}
