package ref

import "math"

// HeadTile is the row tile of the screened LM head's int8 copy
// (csrc/head.cu): the copy covers V rounded up to it.
const HeadTile = 512

// HeadRows is the number of rows of the int8 copy of a head of V rows.
func HeadRows(V int) int { return (V + HeadTile - 1) / HeadTile * HeadTile }

// HeadQOffset is where element (r, k) of the copy of a head of C columns
// lives (head.cu's head_q_offset): rows in tiles of 512, a tile in 32
// m-tiles of 16 rows, each in k-tiles of 32 columns stored as the 32
// lanes' A fragments of an mma m16n8k32 (16 bytes a lane).
func HeadQOffset(r, k, C int) int {
	KT := C / 32
	t, rt := r/HeadTile, r%HeadTile
	mt, rr := rt/16, rt%16
	kt, kk := k/32, k%32
	lane := (rr&7)*4 + (kk&15)>>2
	reg := rr>>3 + 2*(kk>>4)
	return (((t*32+mt)*KT+kt)*32+lane)*16 + reg*4 + kk&3
}

// HeadQuantize is the screened head's int8 copy of w ([V, C], values
// exact in fp16): row r is s_r·q_r + d_r with s_r = max|w_r|/127 (fp32) and
// q_r = round-half-even(w_r/s_r) (fp32 division); rows holds (s_r, c1_r,
// c2_r, 0) a row with c1 = ‖d‖₂ + γ‖w‖₂ (γ = (C+1)u/(1−(C+1)u), u = 2⁻²⁴)
// and c2 = s·‖q‖₂, the bounds head.cu's screen uses (computed in float64
// and rounded up: the CUDA copy may differ from these in the last bit of
// c1 and c2, never in q or s).
func HeadQuantize(w []float32, V, C int) (q []int8, rows []float32) {
	n := HeadRows(V)
	q = make([]int8, n*C)
	rows = make([]float32, 4*n)
	n1 := float64(C+1) * 0x1p-24
	gamma := n1 / (1 - n1)
	for r := 0; r < V; r++ {
		wr := w[r*C : (r+1)*C]
		var mx float32
		for _, v := range wr {
			mx = max(mx, float32(math.Abs(float64(v))))
		}
		s := mx / 127
		var dd, ww, qq float64
		for k, v := range wr {
			qi := 0
			if s > 0 {
				qi = int(max(-127, min(127, math.RoundToEven(float64(v/s)))))
			}
			d := float64(v) - float64(s)*float64(qi)
			dd += d * d
			ww += float64(v) * float64(v)
			qq += float64(qi * qi)
			q[HeadQOffset(r, k, C)] = int8(qi)
		}
		rows[4*r] = s
		rows[4*r+1] = roundUp32((math.Sqrt(dd) + gamma*math.Sqrt(ww)) * (1 + 1e-9))
		rows[4*r+2] = roundUp32(float64(s) * math.Sqrt(qq) * (1 + 1e-9))
	}
	return q, rows
}

// roundUp32 is the least float32 at or above v.
func roundUp32(v float64) float32 {
	f := float32(v)
	if float64(f) < v {
		f = math.Nextafter32(f, float32(math.Inf(1)))
	}
	return f
}

// HeadScreen is head.cu's screen of one input row x [C] against the copy
// (q, rows) of HeadQuantize: for each row r < V its approximation a_r of
// w_r·x and the bound b_r with |l − a_r| ≤ b_r for any fp32 sum l of the
// products w_r,i·x_i. x splits exactly into three int8 levels,
// x = s3·(2¹⁴·x1 + 2⁷·x2 + x3) + e with power-of-two scales; T_r =
// q_r·(2¹⁴x1 + 2⁷x2 + x3) is an exact integer and a_r = s_r·(s3·T_r) in
// fp32. Non-finite x, or max|x| outside [2⁻⁹³, 2¹⁰⁶], gives b_r = +Inf.
func HeadScreen(q []int8, rows, x []float32, V, C int) (a, b []float32) {
	var mx float32
	for _, v := range x {
		mx = max(mx, float32(math.Abs(float64(v))))
	}
	finite := mx <= math.MaxFloat32
	k := 0
	if finite && mx > 0 {
		_, k = math.Frexp(float64(mx))
		k -= 7
		finite = k >= -100 && k < 100 // else every row is a candidate
		if finite && float32(math.Ldexp(127, k)) < mx {
			k++
		}
	}
	if !finite {
		k = 0
	}
	var sq float64
	for _, v := range x {
		e := math.Ldexp(float64(v), -k)
		sq += e * e
	}
	// H ≥ ‖x‖₂ however the device rounds its fp32 sum (the factor covers it).
	H := float32(math.Ldexp(math.Sqrt(sq), k)) * (1 + float32(C+4)*0x1p-23)
	finite = finite && H <= math.MaxFloat32
	lv := make([]int64, C) // 2¹⁴x1 + 2⁷x2 + x3
	for i, v := range x {
		if !finite {
			break
		}
		r := float64(v)
		q1 := math.RoundToEven(math.Ldexp(r, -k))
		r -= math.Ldexp(q1, k)
		q2 := math.RoundToEven(math.Ldexp(r, 7-k))
		r -= math.Ldexp(q2, k-7)
		q3 := math.RoundToEven(math.Ldexp(r, 14-k))
		lv[i] = int64(q1)<<14 + int64(q2)<<7 + int64(q3)
	}
	E := float32(math.Ldexp(float64(float32(math.Sqrt(float64(C)))*1.0001), k-15))
	s3 := float32(math.Ldexp(1, k-14))
	a = make([]float32, V)
	b = make([]float32, V)
	for r := 0; r < V; r++ {
		var T int64
		for i := 0; i < C; i++ {
			T += int64(q[HeadQOffset(r, i, C)]) * lv[i]
		}
		a[r] = rows[4*r] * (s3 * float32(T))
		if !finite {
			b[r] = float32(math.Inf(1))
			continue
		}
		c := float32(float64(rows[4*r+1])*float64(H) + float64(rows[4*r+2]*E))
		b[r] = c*(1+0x1p-10) + float32(math.Abs(float64(a[r])))*0x1p-20 + 0x1p-120
	}
	return a, b
}
