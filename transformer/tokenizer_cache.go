package transformer

import "hash/maphash"

// tokWordCache remembers the ids of pre-tokens already encoded. Looking a
// pre-token up is the hot path of Encode (text is mostly words seen
// before), so instead of a map[string][]int32 — a string header and a slice
// header per entry, and the key's bytes somewhere else on the heap — it is
// an open-addressing table of small fixed-size slots whose keys and ids live
// in two arenas.
type tokWordCache struct {
	seed  maphash.Seed
	slots []tokCacheSlot // power-of-two length, at most half full
	used  int
	keys  []byte  // the pre-tokens' bytes, end to end
	ids   []int32 // their ids, end to end
}

type tokCacheSlot struct {
	hash   uint64 // 0 marks an empty slot (stored hashes have bit 0 set)
	keyOff uint32
	idsOff uint32
	keyLen uint16
	idsLen uint16
}

const (
	// tokCacheMaxWord: longer pre-tokens are rare and not worth keeping
	// (HF uses the same bound, MAX_LENGTH in utils/cache.rs). It also keeps
	// lengths within the slots' uint16 fields (a word has at most one id
	// per byte).
	tokCacheMaxWord = 256
	// tokCacheMaxEntries and tokCacheMaxKeyBytes bound the cache: when
	// either is reached it is emptied, so memory stays bounded on endless
	// input while common words quickly come back.
	tokCacheMaxEntries  = 1 << 16
	tokCacheMaxKeyBytes = 4 << 20
	tokCacheFirstSlots  = 1 << 10
)

func newTokWordCache() tokWordCache {
	return tokWordCache{seed: maphash.MakeSeed(), slots: make([]tokCacheSlot, tokCacheFirstSlots)}
}

func (c *tokWordCache) hash(word string) uint64 {
	return maphash.String(c.seed, word) | 1
}

// get returns the cached ids of word; the slice is only valid until the
// next put or reset.
func (c *tokWordCache) get(word string) ([]int32, bool) {
	if len(word) > tokCacheMaxWord {
		return nil, false
	}
	h := c.hash(word)
	mask := uint64(len(c.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		s := &c.slots[i]
		if s.hash == 0 {
			return nil, false
		}
		if s.hash == h && int(s.keyLen) == len(word) &&
			string(c.keys[s.keyOff:s.keyOff+uint32(s.keyLen)]) == word {
			return c.ids[s.idsOff : s.idsOff+uint32(s.idsLen)], true
		}
	}
}

// put stores the ids of a word that get did not find.
func (c *tokWordCache) put(word string, ids []int32) {
	if len(word) > tokCacheMaxWord {
		return
	}
	if c.used >= tokCacheMaxEntries || len(c.keys)+len(word) > tokCacheMaxKeyBytes {
		c.reset()
	}
	if 2*(c.used+1) > len(c.slots) {
		c.grow()
	}
	slot := tokCacheSlot{
		hash:   c.hash(word),
		keyOff: uint32(len(c.keys)),
		keyLen: uint16(len(word)),
		idsOff: uint32(len(c.ids)),
		idsLen: uint16(len(ids)),
	}
	c.keys = append(c.keys, word...)
	c.ids = append(c.ids, ids...)
	c.insert(slot)
	c.used++
}

func (c *tokWordCache) insert(slot tokCacheSlot) {
	mask := uint64(len(c.slots) - 1)
	i := slot.hash & mask
	for c.slots[i].hash != 0 {
		i = (i + 1) & mask
	}
	c.slots[i] = slot
}

// grow doubles the table; the arenas stay where they are.
func (c *tokWordCache) grow() {
	old := c.slots
	c.slots = make([]tokCacheSlot, 2*len(old))
	for _, s := range old {
		if s.hash != 0 {
			c.insert(s)
		}
	}
}

// reset empties the cache, keeping its memory.
func (c *tokWordCache) reset() {
	clear(c.slots)
	c.used = 0
	c.keys = c.keys[:0]
	c.ids = c.ids[:0]
}
