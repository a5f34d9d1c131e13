package ref

import (
	"math"
	"slices"
)

// Uniform is the sampler's random number in [0,1) for a seed and a step
// counter: SplitMix64 of the pair, top 24 bits. Counter-based, so a decode
// step needs no generator state on the device and a CUDA graph can replay it
// with a new counter; the CUDA kernel computes the same bits.
func Uniform(seed uint64, counter uint32) float32 {
	z := seed + uint64(counter)*0x9E3779B97F4A7C15
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	z ^= z >> 31
	return float32(z>>40) / (1 << 24)
}

// Sample draws one token per row b < B of logits[B,V]: among the tokens not
// listed in banned[b·maxBan …] (−1 ends a list), keep the topK largest logits
// (ties to the lower id), take their softmax and pick the first token, in
// descending order, whose cumulative probability exceeds
// Uniform(seed, counter[b]). topK = 1 is argmax. With a 2-gram memory
// (succ ≠ nil), the successors it keeps after the row's previous token are
// banned too, and the pick is recorded there.
func Sample(out []int32, logits []float32, banned, counter []int32, B, V, topK, maxBan int, seed uint64, succ *Successors) {
	for b := 0; b < B; b++ {
		l := logits[b*V : b*V+V]
		ban := map[int32]bool{}
		for i := 0; i < maxBan; i++ {
			t := banned[b*maxBan+i]
			if t < 0 {
				break
			}
			ban[t] = true
		}
		var prev int32 = -1
		if succ != nil {
			prev = succ.Prev[b*succ.PrevStride]
			succ.Each(b, V, prev, func(t int32) { ban[t] = true })
		}
		// The topK best in descending order of logit; scanning ids upwards
		// and admitting only strictly larger values breaks ties to the lower
		// id.
		cand := make([]int32, 0, topK+1)
		for i := range l {
			id := int32(i)
			if ban[id] || len(cand) == topK && l[i] <= l[cand[topK-1]] {
				continue
			}
			j := len(cand)
			for j > 0 && l[cand[j-1]] < l[i] {
				j--
			}
			cand = slices.Insert(cand, j, id)
			if len(cand) > topK {
				cand = cand[:topK]
			}
		}
		if len(cand) == 0 {
			out[b] = -1
			continue
		}
		m := l[cand[0]]
		p := make([]float32, len(cand))
		var sum float32
		for i, t := range cand {
			p[i] = float32(math.Exp(float64(l[t] - m)))
			sum += p[i]
		}
		u := Uniform(seed, uint32(counter[b])) * sum
		var cum float32
		out[b] = cand[len(cand)-1]
		for i, t := range cand {
			cum += p[i]
			if u < cum {
				out[b] = t
				break
			}
		}
		if succ != nil {
			succ.Record(b, V, prev, out[b])
		}
	}
}
