package transformer

import (
	"unicode"
	"unicode/utf8"
)

// This file is the GPT-2 pre-tokeniser: it cuts text into the pieces that
// byte-level BPE then encodes one at a time. HF `tokenizers` (ByteLevel
// pre-tokenizer, use_regex=true) finds them with the Oniguruma regex
//
//	's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// matched leftmost-first from the end of the previous match. Go's regexp has
// no look-ahead, so the scanner below reproduces the regex by hand:
// alternatives are tried in the regex's order, and `\s+(?!\S)` gives back
// the last whitespace character of a run that is followed by a non-space,
// so that "a  b" splits as ["a", " ", " b"] and "a\n\nb" as
// ["a", "\n", "\n", "b"]. Character classes come from package unicode:
// \p{L} is unicode.IsLetter, \p{N} is unicode.IsNumber and \s is
// unicode.IsSpace (the White_Space property, which is Oniguruma's \s for
// UTF-8 text).

// tokCharClass is the class of one character as the GPT-2 regex sees it.
type tokCharClass uint8

const (
	tokClassOther  tokCharClass = iota // [^\s\p{L}\p{N}]
	tokClassLetter                     // \p{L}
	tokClassNumber                     // \p{N}
	tokClassSpace                      // \s
)

// tokClassAt decodes the character at s[i] and returns its class and width.
// An invalid UTF-8 byte counts as one "other" character of width 1: it
// cannot come from a Python str, and treating it as punctuation keeps its
// byte in the output so Decode still returns it.
func tokClassAt(s string, i int) (tokCharClass, int) {
	c := s[i]
	if c < utf8.RuneSelf {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z':
			return tokClassLetter, 1
		case '0' <= c && c <= '9':
			return tokClassNumber, 1
		case c == ' ', '\t' <= c && c <= '\r':
			return tokClassSpace, 1
		default:
			return tokClassOther, 1
		}
	}
	r, w := utf8.DecodeRuneInString(s[i:])
	switch {
	case r == utf8.RuneError && w == 1:
		return tokClassOther, 1
	case unicode.IsLetter(r):
		return tokClassLetter, w
	case unicode.IsNumber(r):
		return tokClassNumber, w
	case unicode.IsSpace(r):
		return tokClassSpace, w
	default:
		return tokClassOther, w
	}
}

// tokPretokenEnd returns the end (exclusive byte offset) of the GPT-2
// pre-token that starts at s[start]; start must be < len(s). The end of s is
// treated as the end of the text, which is what the regex sees when HF runs
// it on one split (between added tokens, or between digits).
func tokPretokenEnd(s string, start int) int {
	n := len(s)
	// 's|'t|'re|'ve|'m|'ll|'d — lower case only, and only at the start of a
	// match: inside a punctuation run the apostrophe is just punctuation.
	if s[start] == '\'' && start+1 < n {
		switch s[start+1] {
		case 's', 't', 'm', 'd':
			return start + 2
		case 'r', 'v':
			if start+2 < n && s[start+2] == 'e' {
				return start + 3
			}
		case 'l':
			if start+2 < n && s[start+2] == 'l' {
				return start + 3
			}
		}
	}
	class, w := tokClassAt(s, start)
	i := start
	// ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: a literal space (only
	// U+0020) joins the run that follows it unless that run is whitespace.
	if s[start] == ' ' && start+1 < n {
		if nextClass, nextW := tokClassAt(s, start+1); nextClass != tokClassSpace {
			class, w = nextClass, nextW
			i = start + 1
		}
	}
	if class != tokClassSpace {
		i += w
		for i < n {
			c, cw := tokClassAt(s, i)
			if c != class {
				break
			}
			i += cw
		}
		return i
	}
	// `\s+(?!\S)` then `\s+`: take the whole whitespace run; if a non-space
	// follows it, the first alternative backtracks one character (so the last
	// whitespace character can start the next pre-token) unless that would
	// leave nothing, in which case `\s+` takes the single character.
	lastStart := i
	i += w
	for i < n {
		c, cw := tokClassAt(s, i)
		if c != tokClassSpace {
			break
		}
		lastStart = i
		i += cw
	}
	if i < n && lastStart > start {
		return lastStart
	}
	return i
}

// tokForEachPretoken calls emit with each GPT-2 pre-token of text, in order.
// With splitDigits (HF pre-tokenizer Digits{individual_digits: true} before
// ByteLevel, as in SmolLM2's tokenizer) every numeric character is cut out
// as a piece of its own first, and the regex then runs on each piece alone.
func tokForEachPretoken(text string, splitDigits bool, emit func(piece string)) {
	if !splitDigits {
		for i := 0; i < len(text); {
			end := tokPretokenEnd(text, i)
			emit(text[i:end])
			i = end
		}
		return
	}
	runStart := 0
	for i := 0; i < len(text); {
		class, w := tokClassAt(text, i)
		if class != tokClassNumber {
			i += w
			continue
		}
		tokForEachPretoken(text[runStart:i], false, emit)
		emit(text[i : i+w])
		i += w
		runStart = i
	}
	tokForEachPretoken(text[runStart:], false, emit)
}
