//go:build cuda && !nofused

package gpu

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkCUDAPrefillLayer: where an `ar` step's time goes. One layer of
// the recomputation of T = cache+1 tokens (T = 33, 65, 129, 256), piece by
// piece and as a chain of all the model's layers (each with its own fp16
// weights from a pool larger than L2), the way the runner enqueued it before
// the prefill kernels ("old": norm kernel + GEMM v2, SiluMul/gelu kernels,
// fp32 SIMT attention v7; the graph memory nodes of the two-step path are
// left out) and now ("new": GEMM v3 with the norm/SwiGLU fused, tensor-core
// attention; Llama: SwiGLU in the gate|up GEMM's epilogue). Llama also runs
// "atile" (SwiGLU in the down GEMM's A tiles) and "v3plain" (plain v3 GEMMs
// after RMSNorm/SiluMul kernels) for the MLP. Reported per call (pieces) and
// per layer (chain).
func BenchmarkCUDAPrefillLayer(b *testing.B) {
	c := newTestCUDA(b)
	pool := newBenchPool(b, c, F16)
	rng := rand.New(rand.NewPCG(51, 52))
	for _, m := range decodeChainModels {
		qkvW, upW := (m.NH+2*m.NKV)*m.HS, m.upWidth()
		pc := &poolCarver{pool: pool}
		layers := pc.layers(m)
		pc.fits(b, m.name)
		theta, rot := float32(0), 0
		if m.llama {
			theta, rot = 10000, m.NH+m.NKV
		}
		nk := LayerNormKind
		if m.llama {
			nk = RMSNormKind
		}
		for _, T := range []int{33, 65, 129, 256} {
			x := uploadNew(b, c, F32, randNormal(rng, T*m.C, 1, 0))
			xn := alloc(b, c, F32, T*m.C)
			qkv := uploadNew(b, c, F32, randNormal(rng, T*qkvW, 1, 0))
			att := uploadNew(b, c, F32, randNormal(rng, T*m.NH*m.HS, 1, 0))
			up := uploadNew(b, c, F32, randNormal(rng, T*upW, 1, 0))
			act := alloc(b, c, F32, T*m.F)
			kc, vc := uploadNew(b, c, F32, randNormal(rng, T*m.NKV*m.HS, 1, 0)), uploadNew(b, c, F32, randNormal(rng, T*m.NKV*m.HS, 1, 0))
			idx := make([]int32, T)
			for i := range idx {
				idx[i] = int32(i)
			}
			pos, slots, order, lens := uploadInts(b, c, idx), uploadInts(b, c, idx), uploadInts(b, c, idx), uploadInts(b, c, []int32{int32(T)})
			ap := AttnParams{B: 1, T: T, NH: m.NH, NKV: m.NKV, HS: m.HS, QStride: qkvW, MaxLen: T}
			apF16 := ap
			apF16.F16 = true
			norm := func(ly *benchLayer, second bool) {
				w, bb := ly.n1, ly.nb1
				if second {
					w, bb = ly.n2, ly.nb2
				}
				if m.llama {
					c.RMSNorm(xn, x, w, T, m.C, 1e-5)
				} else {
					c.LayerNorm(xn, x, w, bb, T, m.C, 1e-5)
				}
			}
			type pieces struct{ qkv, rope, attn, o, up, down func(ly *benchLayer) }
			old := pieces{
				qkv:  func(ly *benchLayer) { norm(ly, false); c.matmul(qkv, xn, ly.qkv, ly.bq, T, m.C, qkvW, false, gemmV2) },
				rope: func(ly *benchLayer) { c.RopeStore(qkv, kc, vc, pos, slots, T, m.NH, m.NKV, m.HS, qkvW, rot, theta) },
				attn: func(ly *benchLayer) { c.attention(att, qkv, kc, vc, order, lens, ap, 7, Buf{}) },
				o:    func(ly *benchLayer) { c.matmul(x, att, ly.o, ly.bo, T, m.NH*m.HS, m.C, true, gemmV2) },
				up: func(ly *benchLayer) {
					norm(ly, true)
					c.matmul(up, xn, ly.up, ly.bu, T, m.C, upW, false, gemmV2)
					if !m.llama {
						c.GeluNew(up, T*m.F)
					}
				},
				down: func(ly *benchLayer) {
					if m.llama {
						c.SiluMul(act, up, up.View(m.F, T*upW-m.F), T, m.F, 2*m.F)
						c.matmul(x, act, ly.down, Buf{}, T, m.F, m.C, true, gemmV2)
					} else {
						c.matmul(x, up, ly.down, ly.bd, T, m.F, m.C, true, gemmV2)
					}
				},
			}
			cur := pieces{
				qkv: func(ly *benchLayer) {
					if m.llama {
						c.normMatMul(qkv, x, ly.n1, Buf{}, ly.qkv, Buf{}, T, m.C, qkvW, 1e-5, nk, NoAct, false, fusedPrefill)
					} else {
						norm(ly, false)
						c.matmul(qkv, xn, ly.qkv, ly.bq, T, m.C, qkvW, false, gemmV3)
					}
				},
				rope: old.rope,
				attn: func(ly *benchLayer) { c.attention(att, qkv, kc, vc, order, lens, apF16, 0, Buf{}) },
				o:    func(ly *benchLayer) { c.matmul(x, att, ly.o, ly.bo, T, m.NH*m.HS, m.C, true, gemmV3) },
				up: func(ly *benchLayer) {
					if m.llama { // SwiGLU in the epilogue: act [T, F]
						c.normMatMul(act, x, ly.n2, Buf{}, ly.up, Buf{}, T, m.C, upW, 1e-5, nk, SwiGLUAct, false, fusedPrefill)
					} else {
						norm(ly, true)
						c.matmul(up, xn, ly.up, ly.bu, T, m.C, upW, false, gemmV3)
						c.GeluNew(up, T*m.F)
					}
				},
				down: func(ly *benchLayer) {
					if m.llama {
						c.matmul(x, act, ly.down, Buf{}, T, m.F, m.C, true, gemmV3)
					} else {
						c.matmul(x, up, ly.down, ly.bd, T, m.F, m.C, true, gemmV3)
					}
				},
			}
			ways := []struct {
				name string
				p    pieces
			}{{"old", old}, {"new", cur}}
			if m.llama {
				// SwiGLU in the down product's A tiles instead (gate|up
				// written 2F wide); and both GEMMs with the plain v3 after
				// separate RMSNorm/SiluMul kernels.
				atile := cur
				atile.up = func(ly *benchLayer) {
					c.normMatMul(up, x, ly.n2, Buf{}, ly.up, Buf{}, T, m.C, upW, 1e-5, nk, NoAct, false, fusedPrefill)
				}
				atile.down = func(ly *benchLayer) { c.swiGLUMatMul(x, up, ly.down, T, m.F, m.C, true, fusedPrefill) }
				plain := atile
				plain.up = func(ly *benchLayer) { norm(ly, true); c.matmul(up, xn, ly.up, Buf{}, T, m.C, upW, false, gemmV3) }
				plain.down = func(ly *benchLayer) {
					c.SiluMul(act, up, up.View(m.F, T*upW-m.F), T, m.F, 2*m.F)
					c.matmul(x, act, ly.down, Buf{}, T, m.F, m.C, true, gemmV3)
				}
				ways = append(ways, struct {
					name string
					p    pieces
				}{"atile", atile}, struct {
					name string
					p    pieces
				}{"v3plain", plain})
			}
			for _, way := range ways {
				for _, pc := range []struct {
					name string
					fn   func(ly *benchLayer)
				}{{"qkv", way.p.qkv}, {"rope", way.p.rope}, {"attn", way.p.attn}, {"o", way.p.o}, {"up", way.p.up}, {"down", way.p.down}} {
					if way.name == "atile" || way.name == "v3plain" {
						if pc.name != "up" && pc.name != "down" {
							continue // the same as "new"
						}
					}
					b.Run(fmt.Sprintf("%s_T%d/%s/%s", m.name, T, pc.name, way.name), func(b *testing.B) {
						sec := graphTime(b, c, m.L, func(i int) { pc.fn(&layers[i]) })
						b.ReportMetric(sec*1e6, "µs/call")
					})
				}
				b.Run(fmt.Sprintf("%s_T%d/layer/%s", m.name, T, way.name), func(b *testing.B) {
					sec := graphTime(b, c, 1, func(int) {
						for l := range layers {
							ly := &layers[l]
							way.p.qkv(ly)
							way.p.rope(ly)
							way.p.attn(ly)
							way.p.o(ly)
							way.p.up(ly)
							way.p.down(ly)
						}
					})
					b.ReportMetric(sec*1e6/float64(m.L), "µs/layer")
				})
			}
			for _, bf := range []Buf{x, xn, qkv, att, up, act, kc, vc, pos, slots, order, lens} {
				c.Free(bf)
			}
		}
	}
}
