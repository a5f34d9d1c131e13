package transformer

import (
	"math"
	"unicode/utf8"
)

// This file holds the pieces of byte-level BPE that do not depend on how the
// vocabulary was loaded: GPT-2's byte↔character table, the merge loop, and
// the lossy UTF-8 conversion used by Decode.

// bpeNoMerge is the rank of a pair that has no merge rule.
const bpeNoMerge = math.MaxUint32

// bpeHeapThreshold is the word length (in symbols) above which the merge
// loop switches from rescanning all pairs (quadratic, but fastest for the
// short words that make up nearly all text) to a priority queue, so that a
// pathological pre-token such as a megabyte of '=' stays n·log n.
const bpeHeapThreshold = 64

// bpeByteRunes returns GPT-2's bytes_to_unicode table: printable Latin-1
// bytes stand for themselves and the other 68 bytes are moved to U+0100 and
// up, in byte order, so that every byte has a visible character and a
// byte-level token string never contains a space. (OpenAI gpt-2
// encoder.py bytes_to_unicode; HF tokenizers pre_tokenizers/byte_level.rs.)
func bpeByteRunes() [256]rune {
	var table [256]rune
	next := rune(256)
	for b := 0; b < 256; b++ {
		printable := ('!' <= b && b <= '~') || (0xA1 <= b && b <= 0xAC) || (0xAE <= b && b <= 0xFF)
		if printable {
			table[b] = rune(b)
		} else {
			table[b] = next
			next++
		}
	}
	return table
}

// bpeRuneBytesSize bounds the characters of bpeByteRunes: 256 + 68 moved bytes.
const bpeRuneBytesSize = 256 + 68

// bpeRuneBytes inverts bpeByteRunes; -1 marks characters that are not the
// image of any byte.
func bpeRuneBytes(byteRunes *[256]rune) [bpeRuneBytesSize]int16 {
	var table [bpeRuneBytesSize]int16
	for i := range table {
		table[i] = -1
	}
	for b, r := range byteRunes {
		table[r] = int16(b)
	}
	return table
}

// bpeTokenBytes turns a byte-level token string into the raw bytes it stands
// for. As HF's ByteLevel decoder does, a token with any character outside the
// byte table (an added token such as "<|im_start|>" is fine, one with, say,
// "é" is not) is emitted as its own UTF-8 text instead.
func bpeTokenBytes(token string, runeBytes *[bpeRuneBytesSize]int16) []byte {
	out := make([]byte, 0, len(token))
	for _, r := range token {
		if r < 0 || int(r) >= len(runeBytes) || runeBytes[r] < 0 {
			return []byte(token)
		}
		out = append(out, byte(runeBytes[r]))
	}
	return out
}

// bpePairKey packs an adjacent pair of token ids into one map key.
func bpePairKey(left, right int32) uint64 {
	return uint64(uint32(left))<<32 | uint64(uint32(right))
}

// bpeMergeRule packs a merge's rank (its line in merges.txt, lower merges
// first) and the id of the merged token into one map value.
func bpeMergeRule(rank uint32, merged int32) uint64 {
	return uint64(rank)<<32 | uint64(uint32(merged))
}

// bpeMerges maps an adjacent pair of token ids to its packed merge rule.
type bpeMerges map[uint64]uint64

// lookup returns the rank and merged id for the pair, or bpeNoMerge.
func (m bpeMerges) lookup(left, right int32) (rank uint32, merged int32) {
	rule, ok := m[bpePairKey(left, right)]
	if !ok {
		return bpeNoMerge, -1
	}
	return uint32(rule >> 32), int32(uint32(rule))
}

// merge applies the merge rules to the symbols of one word in place and
// returns the shortened slice. It reproduces HF tokenizers' Word::merge_all
// (models/bpe/word.rs): repeatedly merge the adjacent pair with the lowest
// rank, the leftmost one on ties, until no pair has a rule. (HF's heap also
// drops stale entries by checking only the merged id; that is the same
// thing, because a pair's span only grows, so two pairs starting at the same
// place with the same merged string are the same pair.)
func (m bpeMerges) merge(syms []int32) []int32 {
	if len(syms) > bpeHeapThreshold {
		return m.mergeWithHeap(syms)
	}
	return m.mergeByScan(syms)
}

// mergeByScan is merge for short words: it keeps the rank of every adjacent
// pair and rescans them for the minimum after each merge.
func (m bpeMerges) mergeByScan(syms []int32) []int32 {
	n := len(syms)
	if n < 2 {
		return syms
	}
	// ranks[i], merged[i] describe the pair (syms[i], syms[i+1]); short
	// words keep them on the stack.
	var rankBuf [bpeHeapThreshold]uint32
	var mergedBuf [bpeHeapThreshold]int32
	ranks, merged := rankBuf[:0], mergedBuf[:0]
	if n-1 > bpeHeapThreshold {
		ranks, merged = make([]uint32, 0, n-1), make([]int32, 0, n-1)
	}
	for i := 0; i+1 < n; i++ {
		rank, id := m.lookup(syms[i], syms[i+1])
		ranks, merged = append(ranks, rank), append(merged, id)
	}
	for {
		best, bestRank := -1, uint32(bpeNoMerge)
		for i, r := range ranks {
			if r < bestRank {
				best, bestRank = i, r
			}
		}
		if best < 0 {
			return syms
		}
		// (a, b) at best becomes one symbol; the pair that followed it,
		// (b, c), goes, and the pairs on both sides are looked up anew.
		syms[best] = merged[best]
		syms = append(syms[:best+1], syms[best+2:]...)
		ranks = append(ranks[:best], ranks[best+1:]...)
		merged = append(merged[:best], merged[best+1:]...)
		if best < len(ranks) {
			ranks[best], merged[best] = m.lookup(syms[best], syms[best+1])
		}
		if best > 0 {
			ranks[best-1], merged[best-1] = m.lookup(syms[best-1], syms[best])
		}
	}
}

// bpeHeapEntry is a candidate merge of the symbol at pos with its right
// neighbour, as it was when queued.
type bpeHeapEntry struct {
	rank   uint32
	pos    int32
	merged int32
}

func (a bpeHeapEntry) before(b bpeHeapEntry) bool {
	return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos)
}

// bpeHeap is a binary min-heap ordered by (rank, pos), as HF's Merge.
type bpeHeap []bpeHeapEntry

func (h *bpeHeap) push(e bpeHeapEntry) {
	*h = append(*h, e)
	q := *h
	for i := len(q) - 1; i > 0; {
		parent := (i - 1) / 2
		if !q[i].before(q[parent]) {
			break
		}
		q[i], q[parent] = q[parent], q[i]
		i = parent
	}
}

func (h *bpeHeap) pop() bpeHeapEntry {
	q := *h
	top := q[0]
	last := len(q) - 1
	q[0] = q[last]
	q = q[:last]
	for i := 0; ; {
		smallest := i
		if l := 2*i + 1; l < len(q) && q[l].before(q[smallest]) {
			smallest = l
		}
		if r := 2*i + 2; r < len(q) && q[r].before(q[smallest]) {
			smallest = r
		}
		if smallest == i {
			break
		}
		q[i], q[smallest] = q[smallest], q[i]
		i = smallest
	}
	*h = q
	return top
}

// mergeWithHeap is merge for long words, following HF's Word::merge_all
// step by step: symbols form a linked list, candidate merges wait in a heap,
// and an entry whose pair has changed since it was queued is skipped.
func (m bpeMerges) mergeWithHeap(syms []int32) []int32 {
	n := len(syms)
	prev := make([]int32, n)
	next := make([]int32, n)
	alive := make([]bool, n)
	heap := make(bpeHeap, 0, n)
	for i := range syms {
		prev[i], next[i], alive[i] = int32(i-1), int32(i+1), true
	}
	next[n-1] = -1
	for i := 0; i+1 < n; i++ {
		if rank, merged := m.lookup(syms[i], syms[i+1]); rank != bpeNoMerge {
			heap.push(bpeHeapEntry{rank: rank, pos: int32(i), merged: merged})
		}
	}
	for len(heap) > 0 {
		top := heap.pop()
		pos := top.pos
		if !alive[pos] || next[pos] < 0 {
			continue
		}
		right := next[pos]
		if _, merged := m.lookup(syms[pos], syms[right]); merged != top.merged {
			continue // stale: this pair changed after the entry was queued
		}
		syms[pos] = top.merged
		alive[right] = false
		next[pos] = next[right]
		if next[pos] >= 0 {
			prev[next[pos]] = pos
		}
		if p := prev[pos]; p >= 0 {
			if rank, merged := m.lookup(syms[p], syms[pos]); rank != bpeNoMerge {
				heap.push(bpeHeapEntry{rank: rank, pos: p, merged: merged})
			}
		}
		if nx := next[pos]; nx >= 0 {
			if rank, merged := m.lookup(syms[pos], syms[nx]); rank != bpeNoMerge {
				heap.push(bpeHeapEntry{rank: rank, pos: pos, merged: merged})
			}
		}
	}
	out := syms[:0]
	for i := 0; i < n; i++ {
		if alive[i] {
			out = append(out, syms[i])
		}
	}
	return out
}

// bpeAppendLossyUTF8 appends src to dst as valid UTF-8, replacing each
// maximal ill-formed subsequence with one U+FFFD. This is the Unicode
// "substitution of maximal subparts" practice that Rust's
// String::from_utf8_lossy (used by HF's decoder) and Python's
// bytes.decode(errors="replace") both follow; Go's own conversions differ
// (strings.ToValidUTF8 folds a whole run into one U+FFFD, utf8.DecodeRune
// yields one per byte), hence this hand-written loop.
func bpeAppendLossyUTF8(dst, src []byte) []byte {
	const replacement = "\uFFFD"
	for i := 0; i < len(src); {
		lead := src[i]
		if lead < utf8.RuneSelf {
			dst = append(dst, lead)
			i++
			continue
		}
		// Continuation bytes needed, and the allowed range of the first one
		// (narrower after E0, ED, F0 and F4 to exclude overlong forms,
		// surrogates and code points above U+10FFFF).
		need, lo, hi := 0, byte(0x80), byte(0xBF)
		switch {
		case 0xC2 <= lead && lead <= 0xDF:
			need = 1
		case lead == 0xE0:
			need, lo = 2, 0xA0
		case lead == 0xED:
			need, hi = 2, 0x9F
		case 0xE1 <= lead && lead <= 0xEF:
			need = 2
		case lead == 0xF0:
			need, lo = 3, 0x90
		case lead == 0xF4:
			need, hi = 3, 0x8F
		case 0xF1 <= lead && lead <= 0xF3:
			need = 3
		default:
			dst = append(dst, replacement...)
			i++
			continue
		}
		j := i + 1
		complete := true
		for k := 0; k < need; k++ {
			if j >= len(src) || src[j] < lo || src[j] > hi {
				complete = false
				break
			}
			j++
			lo, hi = 0x80, 0xBF
		}
		if complete {
			dst = append(dst, src[i:j]...)
		} else {
			dst = append(dst, replacement...)
		}
		i = j
	}
	return dst
}
