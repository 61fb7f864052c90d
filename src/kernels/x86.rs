//! x86_64 kernels over the block layout of [`PackedInt8Weights`]: AVX2 + FMA + F16C for
//! everything, and the int8 tiles once more for each `vpdpbusd` this CPU may have (AVX-VNNI,
//! AVX-512 VNNI on 256-bit registers). The tiles' maths is at [`int8_tiles`]; the float kernels
//! (weight-only int8, activation quantizer, softmax, norms' sums) are AVX2 whatever the tiles
//! use; attention's score and value tiles are in [`super::x86_attention`].

// Register tiles are indexed by row and block on purpose: the loops mirror the tile's shape.
#![allow(clippy::needless_range_loop)]

use super::tiles::{segments, weight_only_tiles, BlockOutputs, Int8Operands, Sink};
use super::{PackedInt8Weights, BLOCK_ROWS};
use half::f16;
use std::arch::x86_64::*;
use std::ops::Range;

/// Whether this CPU can run the AVX2 kernels (F16C, for the `f16` weight scales, came with
/// AVX2 on every x86 CPU that has it).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// The eight-lane part of the int4 grid search (`int4::levels_portable`) in registers: for each
/// eighth weight, `l = clamp(round_even(w / s), lo, hi)` written to `q` and `h·(w − s·l)²` (or
/// `(w − s·l)²` without importances `h`) summed in its lane. `max`/`min` stand in for `clamp`:
/// the levels are finite, where they agree (a `−0.0` may come out `+0.0`: the same level, the
/// same error). Bit for bit the portable lanes.
///
/// # Safety
/// AVX2 available; `w.len()` a multiple of 8, and `q` (and `h`) at least as long.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn int4_levels(w: &[f32], h: Option<&[f32]>, s: f32, (lo, hi): (f32, f32), q: &mut [f32]) -> [f32; 8] {
    let (vs, vinv, vlo, vhi, magic) =
        (_mm256_set1_ps(s), _mm256_set1_ps(1.0 / s), _mm256_set1_ps(lo), _mm256_set1_ps(hi), _mm256_set1_ps(super::int4::MAGIC));
    let mut acc = _mm256_setzero_ps();
    let mut out = [0f32; 8];
    // SAFETY: every load and store is 8 values at `c < w.len()`, within `w`, `q` and `h`
    // (caller).
    unsafe {
        for c in (0..w.len()).step_by(8) {
            let x = _mm256_loadu_ps(w.as_ptr().add(c));
            let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, vinv), magic), magic);
            let l = _mm256_min_ps(_mm256_max_ps(r, vlo), vhi);
            _mm256_storeu_ps(q.as_mut_ptr().add(c), l);
            let d = _mm256_sub_ps(x, _mm256_mul_ps(vs, l));
            let e = match h {
                Some(h) => _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(h.as_ptr().add(c)), d), d),
                None => _mm256_mul_ps(d, d),
            };
            acc = _mm256_add_ps(acc, e);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
    }
    out
}

/// Eight `f16` weight scales widened to `f32`.
///
/// # Safety
/// F16C available; `p` points at eight readable scales.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_scales(p: *const f16) -> __m256 {
    // SAFETY: eight f16 are 16 readable bytes (caller).
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
}

/// Eight weight-group sums `S` (`i16`) times eight scales: `sw · S`, what an activation offset
/// of 1 adds to each of eight outputs over one group.
///
/// # Safety
/// AVX2+F16C available; `sums` and `scales` point at eight readable values each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_terms(scales: *const f16, sums: *const i16) -> __m256 {
    // SAFETY: eight i16 are 16 readable bytes; the scales are the caller's too.
    unsafe { _mm256_mul_ps(load_scales(scales), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128(sums as *const __m128i)))) }
}

/// `acc + Σ₄ u·w` per 32-bit lane — `vpdpbusd` (unsigned bytes of `u` times the signed bytes of
/// `w` in the same lane, four products summed into `i32`, wrapping) — done exactly with AVX2:
/// even and odd bytes widened to 16 bits in place, two `vpmaddwd`. Slower than the `vpmaddubsw`
/// tiles; it runs the VNNI tiles' code on CPUs without VNNI (tests) and never gets picked.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dpbusd_on_avx2(acc: __m256i, u: __m256i, w: __m256i) -> __m256i {
    let u_even = _mm256_and_si256(u, _mm256_set1_epi16(0xff));
    let u_odd = _mm256_srli_epi16::<8>(u);
    let w_even = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(w));
    let w_odd = _mm256_srai_epi16::<8>(w);
    _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(u_even, w_even), _mm256_madd_epi16(u_odd, w_odd)))
}

/// `vpdpbusd` in its VEX encoding (AVX-VNNI: Alder Lake and later client cores, Zen 5).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn dpbusd_avx_vnni(acc: __m256i, u: __m256i, w: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, u, w)
}

/// `vpdpbusd` on 256-bit registers in its EVEX encoding (AVX-512 VNNI + VL: Cascade Lake and
/// later Xeons, Ice Lake, Zen 4).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dpbusd_avx512_vnni(acc: __m256i, u: __m256i, w: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, w)
}

/// The zero points of eight int4 output channels for one group, each repeated in the four
/// bytes of its 32-bit lane (`z` = 8 for symmetric weights: `zeros` null).
///
/// # Safety
/// AVX2 available; `zeros`, unless null, points at eight readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int4_zero_bytes(zeros: *const u8) -> __m256i {
    // SAFETY: as this function's contract.
    _mm256_mullo_epi32(unsafe { int4_zero_lanes(zeros) }, _mm256_set1_epi32(0x0101_0101))
}

/// The zero points of eight int4 output channels for one group as `i32` lanes (8 when `zeros`
/// is null: symmetric weights).
///
/// # Safety
/// AVX2 available; `zeros`, unless null, points at eight readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int4_zero_lanes(zeros: *const u8) -> __m256i {
    if zeros.is_null() {
        return _mm256_set1_epi32(8);
    }
    // SAFETY: eight readable bytes (caller).
    _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(zeros as *const __m128i) })
}

/// Quad `q` of an int4 block as signed bytes `u − z` (byte `4r + t` of the register is
/// `w[8b + r, 4q + t]`): the pair of quads `⌊q/2⌋` is one 32-byte load, quad `q` its low
/// nibbles when `q` is even, its high ones when odd.
///
/// # Safety
/// AVX2 available; `block` points at an int4 block holding quad `q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int4_quad(block: *const i8, q: usize, zero: __m256i) -> __m256i {
    // SAFETY: pair q/2 is the 32 bytes at 32·(q/2) = 16·(q − q%2) (caller).
    let raw = unsafe { _mm256_loadu_si256(block.add(16 * (q - q % 2)) as *const __m256i) };
    let nibbles = _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128(4 * (q % 2) as i32)), _mm256_set1_epi8(15));
    _mm256_sub_epi8(nibbles, zero)
}

/// The four bytes of quad `q` of a row in every 32-bit lane.
///
/// # Safety
/// AVX2 available; the row holds quad `q`'s four bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn broadcast_quad(row: *const u8, q: usize) -> __m256i {
    // SAFETY: quad q's four bytes are readable (caller), read unaligned.
    _mm256_set1_epi32(unsafe { (row.add(4 * q) as *const i32).read_unaligned() })
}

/// Int4 quads whose `vpmaddubsw` products an `i16` running sum holds exactly (eight pair sums
/// of at most 3840 each).
const NIBBLE_CHUNK: usize = 8;

/// Whether this CPU has `vpdpbusd` in the VEX encoding.
pub fn avx_vnni_available() -> bool {
    available() && is_x86_feature_detected!("avxvnni")
}

/// Whether this CPU has `vpdpbusd` on 256-bit registers in the EVEX encoding.
pub fn avx512_vnni_available() -> bool {
    available() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512vnni")
}

/// The int8 register tiles, once per byte multiply: `$features` are the tile's target features
/// and `$dot` a `vpdpbusd` with them if `$vnni`, else (the AVX2 `vpmaddubsw` tiles) unused.
///
/// A tile is `R` activation rows × `V` blocks of eight output channels. Per quad of four input
/// channels it loads `V` weight registers, broadcasts each row's four activations, and does
/// `R·V` multiply-adds into `i32` lanes, one lane per output channel:
/// - `vpmaddubsw` multiplies unsigned by signed bytes, so it takes `|a|` and the weight with its
///   bits flipped where `a < 0` (one `xor` with the row's mask: `|a|·!w = a·w − |a|` there, and
///   the row's `Σ_{a<0} a` is taken back, `op.shift_terms`); each 16-bit pair sum is at most
///   `2·127·128 = 32512`, never saturating, and `vpmaddwd` with ones widens the pairs. (`vpsignb`
///   would move the sign in one instruction, but it competes with the two multiplies for the
///   same two pipes on AMD cores; the `xor` runs on any of four);
/// - `vpdpbusd` does all of that in one instruction; its unsigned side is the weight shifted,
///   `w + 128` (one `xor` per weight register, shared by the `R` rows), so a segment sums
///   `Σ a·w + 128·Σ a`, and the row's `128·Σ a` (`op.shift_terms`) is taken back.
///
/// Each segment sum starts from minus its row's shift term (stored negated, one broadcast from
/// memory), so no correction is left for the end.
/// All integer sums are exact (wrapping `i32` arithmetic, and the true sums fit). At the end of
/// each segment (a run of input channels sharing one activation scale and one weight scale) the
/// lanes are converted once and scaled by `sa[m,g] · sw[n,g]` — eight outputs per instruction,
/// and no horizontal sums anywhere.
macro_rules! int8_tiles {
    ($family:ident, $features:literal, $vnni:literal, $dot:path, $panel:literal) => {
        pub mod $family {
            use super::*;

            /// The four activations of quad `q` of one row in every lane, as the multiply takes
            /// them: `a` itself for `vpdpbusd` (the second value unused), else `|a|` (from `ua`)
            /// and the mask of `a < 0` (from `na`), which flips the weight's bits where `a < 0`.
            ///
            /// # Safety
            /// The family's features available; the row (and for `vpmaddubsw` its `|a|` and mask
            /// copies) holds quad `q`'s four bytes.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn act_quad(a: *const i8, ua: *const u8, na: *const u8, q: usize) -> (__m256i, __m256i) {
                // SAFETY: quad q's four bytes are readable (caller).
                unsafe {
                    if $vnni {
                        (broadcast_quad(a as *const u8, q), _mm256_setzero_si256())
                    } else {
                        (broadcast_quad(ua, q), broadcast_quad(na, q))
                    }
                }
            }

            /// `acc` plus the four-product sums of one weight register `wq` (signed bytes, or for
            /// `vpdpbusd` the unsigned `w + 128`) with one quad of activations ([`act_quad`]).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn mul_quad(acc: __m256i, wq: __m256i, (act, neg): (__m256i, __m256i)) -> __m256i {
                if $vnni {
                    // SAFETY: $dot needs only the family's features, which this function enables.
                    unsafe { $dot(acc, wq, act) }
                } else {
                    let pairs = _mm256_maddubs_epi16(act, _mm256_xor_si256(wq, neg));
                    _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
                }
            }

            /// Quads `q` and `q + 1` of int4 weights, two registers of unsigned nibbles `u`,
            /// times the signed activations of those quads, added to a running sum `s`: with
            /// VNNI `s` is `i32` lanes (`Σ₄ u·a` each); without, `vpmaddubsw` takes `u` as its
            /// unsigned side and `a` as its signed one directly and `s` is `i16` lanes, each a
            /// sum of pair products of at most `2·15·128 = 3840` in size, so up to eight of
            /// them ([`NIBBLE_CHUNK`] quads) add without overflow before [`add_nibble_sums`].
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn mul_nibble_pair(s: __m256i, lo: __m256i, hi: __m256i, [a0, a1]: [__m256i; 2]) -> __m256i {
                if $vnni {
                    // SAFETY: $dot needs only the family's features, which this function enables.
                    unsafe { $dot($dot(s, lo, a0), hi, a1) }
                } else {
                    _mm256_add_epi16(s, _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1)))
                }
            }

            /// `acc` plus a running sum of [`mul_nibble_pair`], widened to `i32` lanes.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn add_nibble_sums(acc: __m256i, s: __m256i) -> __m256i {
                _mm256_add_epi32(acc, if $vnni { s } else { _mm256_madd_epi16(s, _mm256_set1_epi16(1)) })
            }

            /// One `R × V` tile at activation row `i0` and weight block `b0`.
            ///
            /// # Safety
            /// The family's features available; rows `i0..i0+R` and blocks `b0..b0+V` exist;
            /// `op.abs` and `op.neg_mask` cover every padded row (`vpmaddubsw` family) and
            /// `op.shift_terms` every row's segments; `op.seg` satisfies
            /// [`Int8Operands::seg`]'s rule; with `SUMS` false, `sink.out` has `R` rows of
            /// `8·V` writable floats at stride `row_len`; with `SUMS` true, `sink.sums` holds
            /// `M · N_pad · segments` values.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile<const R: usize, const V: usize, const SUMS: bool, const SQ: usize, const W4: bool>(
                op: &Int8Operands,
                i0: usize,
                b0: usize,
                sink: Sink,
            ) {
                let stride = op.weights.padded_in_features();
                let quads = stride / 4;
                let (segs, seg_quads) = op.segments();
                // SQ > 0: every segment is exactly SQ quads (the caller checked), a loop the
                // compiler unrolls.
                let seg_quads = if SQ > 0 { SQ } else { seg_quads };
                let (a_step, w_step) = op.scale_steps();
                let shift = _mm256_set1_epi8(-128);
                let (a, sa) = op.row_pointers::<R>(i0);
                let ua: [*const u8; R] = std::array::from_fn(|r| op.abs.as_ptr().wrapping_add((i0 + r) * stride));
                let na: [*const u8; R] = std::array::from_fn(|r| op.neg_mask.as_ptr().wrapping_add((i0 + r) * stride));
                let (w, sw) = op.block_pointers::<V>(b0);
                // Values between a block's consecutive groups in the scales, zero points and sums.
                let ss: [usize; V] = std::array::from_fn(|v| op.weights.side_stride(b0 + v));
                let (ao, ws) = op.offset_pointers::<R, V>(i0, b0);
                let mut y = [[_mm256_setzero_ps(); V]; R];
                // Int4: each block's zero points (null when symmetric).
                let zp: [*const u8; V] = std::array::from_fn(|v| {
                    let z = op.weights.block_zero_points(b0 + v);
                    if z.is_empty() { std::ptr::null() } else { z.as_ptr() }
                });
                for g in 0..segs {
                    // Each segment sum starts at minus what the byte products add beyond
                    // Σ a·w, stored negated so that it is broadcast straight from memory
                    // (`Int8Operands::shift_terms`); for int4, `−Σ a` times each channel's zero
                    // point.
                    // SAFETY: shift_terms holds M · segs values (caller).
                    let term = |r: usize| _mm256_set1_epi32(*unsafe { op.shift_terms.get_unchecked((i0 + r) * segs + g) });
                    let q_end = if SQ > 0 { (g + 1) * SQ } else { ((g + 1) * seg_quads).min(quads) };
                    let mut acc: [[__m256i; V]; R];
                    if W4 {
                        if zp[0].is_null() {
                            // Symmetric: every channel's zero point is 8.
                            acc = std::array::from_fn(|r| [_mm256_slli_epi32::<3>(term(r)); V]);
                        } else {
                            let z: [__m256i; V] = std::array::from_fn(|v| {
                                // SAFETY: with zero points a block has 8 per group.
                                unsafe { int4_zero_lanes(zp[v].add(ss[v] * g * w_step)) }
                            });
                            acc = std::array::from_fn(|r| {
                                let t = term(r);
                                std::array::from_fn(|v| _mm256_mullo_epi32(z[v], t))
                            });
                        }
                        let low = _mm256_set1_epi8(15);
                        // Segments are whole pairs of quads (the int4 group rule), so each
                        // 32-byte load feeds quads q and q + 1: its low and high nibbles. The
                        // products gather in short running sums, NIBBLE_CHUNK quads at a time.
                        let mut chunk = g * seg_quads;
                        while chunk < q_end {
                            let chunk_end = (chunk + NIBBLE_CHUNK).min(q_end);
                            let mut sums = [[_mm256_setzero_si256(); V]; R];
                            for q in (chunk..chunk_end).step_by(2) {
                                // Plain loops, no closures: a closure the compiler leaves out of
                                // line here costs the int4 prefill twice its time.
                                let mut acts = [[_mm256_setzero_si256(); 2]; R];
                                for (act, &row) in acts.iter_mut().zip(&a) {
                                    // SAFETY: quads q and q + 1 lie inside every padded row.
                                    *act = unsafe { [broadcast_quad(row as *const u8, q), broadcast_quad(row as *const u8, q + 1)] };
                                }
                                for v in 0..V {
                                    // SAFETY: an int4 block holds 16·quads bytes, pair q/2 at 16·q.
                                    let raw = unsafe { _mm256_loadu_si256(w[v].add(16 * q) as *const __m256i) };
                                    let lo = _mm256_and_si256(raw, low);
                                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                                    for r in 0..R {
                                        // SAFETY: mul_nibble_pair needs only the family's features.
                                        sums[r][v] = unsafe { mul_nibble_pair(sums[r][v], lo, hi, acts[r]) };
                                    }
                                }
                            }
                            for r in 0..R {
                                for v in 0..V {
                                    // SAFETY: add_nibble_sums needs only the family's features.
                                    acc[r][v] = unsafe { add_nibble_sums(acc[r][v], sums[r][v]) };
                                }
                            }
                            chunk = chunk_end;
                        }
                    } else {
                        acc = std::array::from_fn(|r| [term(r); V]);
                        for q in g * seg_quads..q_end {
                            let mut wv = [_mm256_setzero_si256(); V];
                            for v in 0..V {
                                // SAFETY: a block holds 8·stride = 32·quads bytes.
                                wv[v] = unsafe { _mm256_loadu_si256(w[v].add(32 * q) as *const __m256i) };
                                if $vnni {
                                    // xor 0x80 turns each signed byte w into the unsigned w + 128.
                                    wv[v] = _mm256_xor_si256(wv[v], shift);
                                }
                            }
                            for r in 0..R {
                                // SAFETY: quad q lies inside every padded row (as above).
                                let act = unsafe { act_quad(a[r], ua[r], na[r], q) };
                                for v in 0..V {
                                    // SAFETY: mul_quad needs only the family's features.
                                    acc[r][v] = unsafe { mul_quad(acc[r][v], wv[v], act) };
                                }
                            }
                        }
                    }
                    if SUMS {
                        for r in 0..R {
                            for v in 0..V {
                                let mut lanes = [0i32; BLOCK_ROWS];
                                // SAFETY: `lanes` is 8 i32, the 32 bytes stored.
                                unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc[r][v]) };
                                // SAFETY: the sums buffer holds M·N_pad·segs values (caller).
                                unsafe { sink.put_sums(op, i0 + r, b0 + v, g, &lanes) };
                            }
                        }
                    } else if w_step == 0 {
                        // One weight scale per channel: it multiplies the sum of all segments once,
                        // after the last one.
                        for r in 0..R {
                            // SAFETY: each row has one scale, or one per segment when a_step is 1.
                            let s = _mm256_set1_ps(unsafe { *sa[r].add(g * a_step) });
                            for v in 0..V {
                                y[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][v]), s, y[r][v]);
                            }
                        }
                    } else {
                        for r in 0..R {
                            // SAFETY: each row has one scale, or one per segment when a_step is 1.
                            let s = _mm256_set1_ps(unsafe { *sa[r].add(g * a_step) });
                            for v in 0..V {
                                // SAFETY: a block has 8 scales per weight group.
                                let scale = _mm256_mul_ps(unsafe { load_scales(sw[v].add(ss[v] * g)) }, s);
                                y[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][v]), scale, y[r][v]);
                            }
                        }
                        if op.offsets {
                            // Affine activations: y += o[i,g] · sw[n,g] · S[n,g].
                            for v in 0..V {
                                // SAFETY: with offsets a block has 8 scales and 8 sums per group.
                                let terms = unsafe { group_terms(sw[v].add(ss[v] * g), ws[v].add(ss[v] * g)) };
                                for r in 0..R {
                                    // SAFETY: with offsets each row has one offset, or one per segment when a_step is 1.
                                    let o = _mm256_set1_ps(unsafe { *ao[r].add(g * a_step) });
                                    y[r][v] = _mm256_fmadd_ps(o, terms, y[r][v]);
                                }
                            }
                        }
                    }
                }
                if !SUMS && w_step == 0 {
                    for v in 0..V {
                        // SAFETY: a block has 8 scales (one group).
                        let scale = unsafe { load_scales(sw[v]) };
                        for r in 0..R {
                            y[r][v] = _mm256_mul_ps(y[r][v], scale);
                        }
                        if op.offsets {
                            // One group and one segment: y += o[i] · sw[n] · S[n].
                            // SAFETY: with offsets a block has 8 scales and 8 sums.
                            let terms = unsafe { group_terms(sw[v], ws[v]) };
                            for r in 0..R {
                                // SAFETY: with offsets each row has an offset.
                                y[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(unsafe { *ao[r] }), terms, y[r][v]);
                            }
                        }
                    }
                }
                if !SUMS {
                    // Float outliers (LLM.int8()-style): y += x · q[n,c] · sw[n,c/group], with the
                    // weight quad still in cache. Byte c%4 of each 32-bit lane is shifted to the top
                    // and arithmetic-shifted back down, sign-extending the eight outputs' weights at once.
                    for r in 0..R {
                        for &(c, x) in op.acts.row_outliers(i0 + r) {
                            let c = c as usize;
                            let to_top = _mm_cvtsi32_si128(24 - 8 * (c % 4) as i32);
                            let (xs, g) = (_mm256_set1_ps(x), c / op.weights.group_size());
                            for v in 0..V {
                                // SAFETY: c < K, so quad c/4 and group g exist in every block: 32
                                // weight bytes and 8 scales.
                                let (quad, scales) = unsafe {
                                    let quad = if W4 {
                                        let z = if zp[v].is_null() { zp[v] } else { zp[v].add(ss[v] * g) };
                                        int4_quad(w[v], c / 4, int4_zero_bytes(z))
                                    } else {
                                        _mm256_loadu_si256(w[v].add(32 * (c / 4)) as *const __m256i)
                                    };
                                    (quad, load_scales(sw[v].add(ss[v] * g)))
                                };
                                let q = _mm256_srai_epi32(_mm256_sll_epi32(quad, to_top), 24);
                                let wf = _mm256_mul_ps(_mm256_cvtepi32_ps(q), scales);
                                y[r][v] = _mm256_fmadd_ps(wf, xs, y[r][v]);
                            }
                        }
                    }
                    if let Some(bias) = op.bias {
                        for v in 0..V {
                            // SAFETY: the bias holds 8·blocks values (Int8Operands::bias).
                            let b = unsafe { _mm256_loadu_ps(bias.as_ptr().add(BLOCK_ROWS * (b0 + v))) };
                            for r in 0..R {
                                y[r][v] = _mm256_add_ps(y[r][v], b);
                            }
                        }
                    }
                    for r in 0..R {
                        for v in 0..V {
                            // SAFETY: the caller gives R rows of 8·V floats at stride row_len.
                            unsafe { _mm256_storeu_ps(sink.out.add(r * sink.row_len + BLOCK_ROWS * v), y[r][v]) };
                        }
                    }
                }
            }

            /// Runs every row tile over blocks `blocks`, in panels of a few blocks so that a
            /// panel's weights stay in cache while all rows pass over them. One activation row
            /// (decoding) takes panels of eight blocks — 64 outputs per pass over the row, eight
            /// weight streams in flight (more memory bandwidth than four); more rows take
            /// tiles of 4 rows × `$panel` blocks.
            ///
            /// # Safety
            /// As [`tile`], for every row and every block in `blocks`; `sink.out` (if used) is
            /// `M × 8·blocks.len()` and points at its start.
            #[target_feature(enable = $features)]
            unsafe fn run_tiles<const SUMS: bool, const W4: bool>(op: &Int8Operands, blocks: Range<usize>, sink: Sink) {
                let m = op.acts.rows();
                let panel = if m == 1 { 8 } else { $panel };
                // Groups of 32 channels (the default on both sides): segments of 8 whole quads.
                let eight_quad_segments = matches!(op.segments(), (segs, 8) if segs > 1);
                let mut b = blocks.start;
                while b < blocks.end {
                    // The widest panel that fits what is left: 8, 4, 3, 2 or 1 blocks.
                    let v = [8, 4, 3, 2, 1].into_iter().find(|&v| v <= panel && v <= blocks.end - b).unwrap_or(1);
                    let mut i = 0;
                    while i < m {
                        let r = (m - i).min(4);
                        let at = sink.at(i, b - blocks.start);
                        // SAFETY: rows i..i+r < M and blocks b..b+v ≤ blocks.end exist; `at` is
                        // row i, block b of the sink; the operands and the features are this
                        // function's own contract, which is tile's; 8-quad segments (SQ = 8)
                        // only where every segment is 8 quads.
                        unsafe {
                            match (r, v, eight_quad_segments) {
                                (1, 8, _) => tile::<1, 8, SUMS, 0, W4>(op, i, b, at),
                                (1, 4, _) => tile::<1, 4, SUMS, 0, W4>(op, i, b, at),
                                (1, 3, _) => tile::<1, 3, SUMS, 0, W4>(op, i, b, at),
                                (1, 2, _) => tile::<1, 2, SUMS, 0, W4>(op, i, b, at),
                                (1, _, _) => tile::<1, 1, SUMS, 0, W4>(op, i, b, at),
                                (2, 3, _) => tile::<2, 3, SUMS, 0, W4>(op, i, b, at),
                                (2, 2, _) => tile::<2, 2, SUMS, 0, W4>(op, i, b, at),
                                (2, _, _) => tile::<2, 1, SUMS, 0, W4>(op, i, b, at),
                                (3, 3, _) => tile::<3, 3, SUMS, 0, W4>(op, i, b, at),
                                (3, 2, _) => tile::<3, 2, SUMS, 0, W4>(op, i, b, at),
                                (3, _, _) => tile::<3, 1, SUMS, 0, W4>(op, i, b, at),
                                (_, 3, true) => tile::<4, 3, SUMS, 8, W4>(op, i, b, at),
                                (_, 3, false) => tile::<4, 3, SUMS, 0, W4>(op, i, b, at),
                                (_, 2, true) => tile::<4, 2, SUMS, 8, W4>(op, i, b, at),
                                (_, 2, false) => tile::<4, 2, SUMS, 0, W4>(op, i, b, at),
                                _ => tile::<4, 1, SUMS, 0, W4>(op, i, b, at),
    }
                        }
                        i += r;
                    }
                    b += v;
                }
            }

            /// `out[i, 8·(b − blocks.start) + l] = Σ_g sa[i,g] · sw[8b+l,g] · Σ_{k∈g} a[i,k]·w[8b+l,k]`
            /// `+ Σ_outliers x[i,c] · ŵ[8b+l,c]` for every activation row `i` and every block `b`
            /// in `blocks`.
            ///
            /// # Safety
            /// The family's features available; `op.abs` / `op.shift_terms` filled as [`tile`]
            /// says; `op.seg` is `K` or a multiple of 4 matching the grouped side(s); `blocks`
            /// lies within the weights' blocks; `out` has `M` writable rows of `8·blocks.len()` floats.
            pub unsafe fn int8_blocks(op: &Int8Operands, blocks: Range<usize>, out: BlockOutputs) {
                // SAFETY: run_tiles' contract is this function's (its `out` as the sink).
                unsafe {
                    match op.weights.bits() {
                        4 => run_tiles::<false, true>(op, blocks, Sink::outputs(out)),
                        _ => run_tiles::<false, false>(op, blocks, Sink::outputs(out)),
                    }
                }
            }

            /// The exact `i32` sum of every segment, `sums[((i·N_pad) + n)·segments + g]` — the
            /// quantities [`int8_blocks`] rescales, computed by the very same tiles.
            ///
            /// # Safety
            /// As [`int8_blocks`] over all blocks; `sums` holds `M · 8·blocks · segments` values.
            pub unsafe fn int8_segment_sums(op: &Int8Operands, sums: &mut [i32]) {
                // SAFETY: run_tiles' contract over all blocks, `sums` sized for them (caller).
                unsafe {
                    match op.weights.bits() {
                        4 => run_tiles::<true, true>(op, 0..op.weights.blocks(), Sink::sums(sums)),
                        _ => run_tiles::<true, false>(op, 0..op.weights.blocks(), Sink::sums(sums)),
                    }
                }
            }
        }
    };
}

// The last argument is the panel width for more than one row: 4 × 3 tiles where the EVEX
// encoding gives 32 vector registers (12 integer and 12 float accumulators fit; 6 % faster than
// 4 × 2 at M = 128 on an AMD EPYC with AVX-512 VNNI), 4 × 2 with 16 registers (4 × 3 spills there: 7 % slower).
// The exact AVX2 emulation of `vpdpbusd` walks the 4 × 3 tiles so that tests cover them on any
// x86 CPU.
int8_tiles!(maddubs, "avx2,fma,f16c", false, dpbusd_on_avx2, 2);
int8_tiles!(vnni_on_avx2, "avx2,fma,f16c", true, dpbusd_on_avx2, 3);
int8_tiles!(avx_vnni, "avx2,fma,f16c,avxvnni", true, dpbusd_avx_vnni, 2);
int8_tiles!(avx512_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", true, dpbusd_avx512_vnni, 3);

/// Eight `f32` registers' worth of one weight quad (its 32 signed bytes), widened: entry `t` holds `w[8b + l, 4q + t]`
/// in lane `l`. A byte shuffle turns each 128-bit half's 4×4 (channel × input) bytes around,
/// a dword permute pairs the halves, and each 8-byte run is sign-extended and converted.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_bytes(quad: __m256i) -> [__m256; 4] {
    let transpose =
        _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let v = _mm256_shuffle_epi8(quad, transpose);
    let v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let f = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
    [f(lo), f(_mm_unpackhi_epi64(lo, lo)), f(hi), f(_mm_unpackhi_epi64(hi, hi))]
}

/// `R` float rows against one weight block, weights widened once per quad for all rows.
///
/// # Safety
/// AVX2+FMA+F16C; `x` rows `i0..i0+R` of `padded` floats exist; `out` has `R` rows of 8 writable
/// floats at stride `row_len`; `seg` is `K` or a multiple of 4.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weight_only_tile<const R: usize, const W4: bool>(
    x: &[f32],
    i0: usize,
    weights: &PackedInt8Weights,
    b: usize,
    out: *mut f32,
    row_len: usize,
) {
    let (k, stride) = (weights.in_features(), weights.padded_in_features());
    let quads = stride / 4;
    let (segs, seg_quads) = segments(k, stride, weights.group_size());
    let (w, sw) = (weights.block(b).as_ptr(), weights.block_scales(b).as_ptr());
    let mut y = [_mm256_setzero_ps(); R];
    let zeros = weights.block_zero_points(b);
    // Values between the block's consecutive groups in its scales and zero points.
    let ss = weights.side_stride(b) * (segs > 1) as usize;
    for g in 0..segs {
        let mut acc = [_mm256_setzero_ps(); R];
        let zeros = if zeros.is_empty() { std::ptr::null() } else { zeros[ss * g..].as_ptr() };
        // SAFETY: int4 zero points, when kept, are 8 per block and group (the slice above).
        let zero = if W4 { unsafe { int4_zero_bytes(zeros) } } else { _mm256_setzero_si256() };
        for q in g * seg_quads..((g + 1) * seg_quads).min(quads) {
            // SAFETY: a block holds 32·quads bytes (16·quads for int4), so quad q is inside it.
            let wq = unsafe {
                if W4 {
                    widen_bytes(int4_quad(w, q, zero))
                } else {
                    widen_bytes(_mm256_loadu_si256(w.add(32 * q) as *const __m256i))
                }
            };
            for r in 0..R {
                // SAFETY: rows i0..i0+R of x exist and each holds stride = 4·quads floats (the
                // caller's contract), so quad q's four values are inside row i0 + r.
                let xq: [f32; 4] = unsafe { x.as_ptr().add((i0 + r) * stride + 4 * q).cast::<[f32; 4]>().read_unaligned() };
                for (wt, &xt) in wq.iter().zip(&xq) {
                    acc[r] = _mm256_fmadd_ps(*wt, _mm256_set1_ps(xt), acc[r]);
                }
            }
        }
        // SAFETY: 8 scales per group (a single group when per channel).
        let s = unsafe { load_scales(sw.add(ss * g)) };
        for r in 0..R {
            y[r] = _mm256_fmadd_ps(acc[r], s, y[r]);
        }
    }
    for r in 0..R {
        // SAFETY: R rows of 8 floats at stride row_len (caller).
        unsafe { _mm256_storeu_ps(out.add(r * row_len), y[r]) };
    }
}

/// `out[i, 8·(b − blocks.start) + l] = Σ_k x[i,k] · ŵ[8b+l,k]` with float activations: the
/// weight-only path. `x` is `M` rows zero-padded to `padded_in_features()` floats.
///
/// # Safety
/// AVX2+FMA+F16C available; `x` holds `M · padded_in_features()` floats; the weight group size is
/// `K` or a multiple of 4; `blocks` within the weights; `out` has `M` writable rows of `8·blocks.len()` floats.
pub unsafe fn weight_only_blocks(x: &[f32], m: usize, weights: &PackedInt8Weights, blocks: Range<usize>, out: BlockOutputs) {
    let row_len = out.row_len();
    // SAFETY: the caller's contract (x, the group size, the features); weight_only_tiles keeps
    // rows, blocks and `at` in range.
    weight_only_tiles(m, blocks, out, |rows, i, b, at| unsafe {
        match (rows, weights.bits()) {
            (4, 4) => weight_only_tile::<4, true>(x, i, weights, b, at, row_len),
            (_, 4) => weight_only_tile::<1, true>(x, i, weights, b, at, row_len),
            (4, _) => weight_only_tile::<4, false>(x, i, weights, b, at, row_len),
            _ => weight_only_tile::<1, false>(x, i, weights, b, at, row_len),
        }
    })
}

/// `(max |x|, whether every value is finite)`.
///
/// # Safety
/// AVX2+FMA+F16C available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn abs_max(x: &[f32]) -> (f32, bool) {
    let (sign, zero) = (_mm256_set1_ps(-0.0), _mm256_setzero_ps());
    let (mut amax, mut probe) = (zero, zero);
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: chunks_exact gives 8 floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
        // x·0 is 0 for finite x and NaN for NaN or ±Inf.
        probe = _mm256_add_ps(probe, _mm256_mul_ps(v, zero));
    }
    // Fold the eight lanes in registers: halves, then pairs, then neighbours.
    let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let mut m = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let mut finite = _mm256_movemask_ps(_mm256_cmp_ps(probe, probe, _CMP_UNORD_Q)) == 0;
    for &v in tail {
        m = m.max(v.abs());
        finite &= v * 0.0 == 0.0;
    }
    (m, finite)
}

/// `q[i] = round_half_even(clamp(x[i] · inv, −127, 127))`, bit for bit what
/// [`crate::quant::quantize_value`] gives with zero point 0 (`vcvtps2dq` rounds half to even).
///
/// # Safety
/// AVX2+FMA+F16C available; `x` finite; `q.len() >= x.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_symmetric(x: &[f32], inv: f32, q: &mut [i8]) {
    let (inv, lo, hi) = (_mm256_set1_ps(inv), _mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut i = 0;
    while i + 32 <= x.len() {
        let mut v = [_mm256_setzero_si256(); 4];
        for (j, vj) in v.iter_mut().enumerate() {
            // SAFETY: i + 32 <= x.len().
            let r = _mm256_mul_ps(unsafe { _mm256_loadu_ps(x.as_ptr().add(i + 8 * j)) }, inv);
            *vj = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        // Packing works per 128-bit half; the permute puts the 32 bytes back in order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        // SAFETY: q has as many bytes as x has floats.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order)) };
        i += 32;
    }
    for (qv, &xv) in q[i..].iter_mut().zip(&x[i..]) {
        *qv = crate::quant::quantize_value(xv, _mm256_cvtss_f32(inv), 0, -127, 127) as i8;
    }
}

/// The dynamic quantizer's one pass over a row in groups of 32 (`x.len()` a multiple of 32):
/// per group, `m = max |x|`; a group with `m ≤ limit` gets its symmetric scale (`max(m / 127,
/// SCALE_EPS)`, as every dynamic quantizer computes it)
/// and its values quantized by `1 / scales[g]` exactly as [`quantize_symmetric`] does, while it
/// is in registers; a group above `limit` is pushed to `above` (its scale must leave the
/// outliers out: the caller's). Returns whether every value is finite.
///
/// # Safety
/// AVX2+FMA+F16C available; `scales` holds `x.len() / 32` values and `q` at least `x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_groups32(x: &[f32], limit: f32, scales: &mut [f32], q: &mut [i8], above: &mut Vec<usize>) -> bool {
    // SAFETY: every access stays within the lengths the caller vouches for.
    unsafe {
        let (sign, lo, hi) = (_mm256_set1_ps(-0.0), _mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut unordered = _mm256_setzero_ps();
        let mut finite = true;
        for g in 0..x.len() / 32 {
            let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(x.as_ptr().add(32 * g + 8 * j)));
            for vj in v {
                unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(vj, vj, _CMP_UNORD_Q));
            }
            let a = v.map(|vj| _mm256_andnot_ps(sign, vj));
            let m8 = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            finite &= m != f32::INFINITY;
            if m > limit {
                above.push(g);
                continue;
            }
            let scale = crate::quant::QSpec::DYNAMIC_ACTIVATION.scale_zero_point_unchecked(-m, m).0;
            *scales.get_unchecked_mut(g) = scale;
            let inv = _mm256_set1_ps(1.0 / scale);
            let i = v.map(|vj| _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(vj, inv), lo), hi)));
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            _mm256_storeu_si256(q.as_mut_ptr().add(32 * g) as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order));
        }
        finite && _mm256_movemask_ps(unordered) == 0
    }
}

/// The affine quantizer's one pass over a row in groups of 32 (`x.len()` a multiple of 32): per
/// group, the range of its values within `limit` ([`affine_range`]'s), its `[sa, o]` into
/// `params` (`affine_params`) and its values quantized as [`quantize_affine`] does, while the
/// group is in registers; groups holding values beyond `limit` are pushed to `beyond` (their
/// slots are the caller's to set aside). Returns whether every value is finite.
///
/// # Safety
/// AVX2+FMA+F16C available; `params` holds `2 · x.len() / 32` values and `q` at least `x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_affine32(x: &[f32], limit: f32, params: &mut [f32], q: &mut [i8], beyond: &mut Vec<usize>) -> bool {
    // SAFETY: every access stays within the lengths the caller vouches for.
    unsafe {
        let (sign, lim, inf, ninf) =
            (_mm256_set1_ps(-0.0), _mm256_set1_ps(limit), _mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
        let (zero, top, half) = (_mm256_setzero_ps(), _mm256_set1_ps(255.0), _mm256_set1_epi32(128));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut bad = _mm256_setzero_ps();
        for g in 0..x.len() / 32 {
            let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(x.as_ptr().add(32 * g + 8 * j)));
            let a = v.map(|vj| _mm256_andnot_ps(sign, vj));
            let within = a.map(|aj| _mm256_cmp_ps(aj, lim, _CMP_LE_OQ));
            for aj in a {
                bad = _mm256_or_ps(bad, _mm256_cmp_ps(aj, inf, _CMP_NLT_UQ));
            }
            let lows: [__m256; 4] = std::array::from_fn(|j| _mm256_blendv_ps(inf, v[j], within[j]));
            let highs: [__m256; 4] = std::array::from_fn(|j| _mm256_blendv_ps(ninf, v[j], within[j]));
            let lo8 = _mm256_min_ps(_mm256_min_ps(lows[0], lows[1]), _mm256_min_ps(lows[2], lows[3]));
            let hi8 = _mm256_max_ps(_mm256_max_ps(highs[0], highs[1]), _mm256_max_ps(highs[2], highs[3]));
            let l = _mm_min_ps(_mm256_castps256_ps128(lo8), _mm256_extractf128_ps(lo8, 1));
            let l = _mm_min_ps(l, _mm_movehl_ps(l, l));
            let h = _mm_max_ps(_mm256_castps256_ps128(hi8), _mm256_extractf128_ps(hi8, 1));
            let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            let (lo, hi) = (_mm_cvtss_f32(_mm_min_ss(l, _mm_movehdup_ps(l))), _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))));
            let all = _mm256_and_ps(_mm256_and_ps(within[0], within[1]), _mm256_and_ps(within[2], within[3]));
            if _mm256_movemask_ps(all) != 0xff {
                beyond.push(g);
            }
            let (lo, sa, inv, offset) = super::act_quant::affine_params(lo, hi);
            (*params.get_unchecked_mut(2 * g), *params.get_unchecked_mut(2 * g + 1)) = (sa, offset);
            let (lov, invv) = (_mm256_set1_ps(lo), _mm256_set1_ps(inv));
            let i = v.map(|vj| {
                let r = _mm256_mul_ps(_mm256_sub_ps(vj, lov), invv);
                _mm256_sub_epi32(_mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, zero), top)), half)
            });
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            _mm256_storeu_si256(q.as_mut_ptr().add(32 * g) as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order));
        }
        _mm256_movemask_ps(bad) == 0
    }
}

/// `(lo, hi, finite, beyond)` of a run whose length is a multiple of 8, as
/// [`super::act_quant`]'s portable `range_within` gives them: the least and greatest value with
/// `|x| ≤ limit` (`lo > hi` when none), whether all are finite, and whether any is beyond `limit`.
///
/// # Safety
/// AVX2+FMA+F16C available; `x.len()` a multiple of 8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn affine_range(x: &[f32], limit: f32) -> (f32, f32, bool, bool) {
    let (sign, limit, inf, ninf) =
        (_mm256_set1_ps(-0.0), _mm256_set1_ps(limit), _mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
    let (mut lo, mut hi, mut bad, mut all_within) = (inf, ninf, _mm256_setzero_ps(), _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
    for c in x.chunks_exact(8) {
        // SAFETY: chunks_exact gives 8 floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        let a = _mm256_andnot_ps(sign, v);
        // NaN compares false: never within, and "not below ∞" marks it (and ±∞) as not finite.
        let within = _mm256_cmp_ps(a, limit, _CMP_LE_OQ);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
        all_within = _mm256_and_ps(all_within, within);
        lo = _mm256_min_ps(lo, _mm256_blendv_ps(inf, v, within));
        hi = _mm256_max_ps(hi, _mm256_blendv_ps(ninf, v, within));
    }
    let l = _mm_min_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
    let l = _mm_min_ps(l, _mm_movehl_ps(l, l));
    let h = _mm_max_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    (
        _mm_cvtss_f32(_mm_min_ss(l, _mm_movehdup_ps(l))),
        _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))),
        _mm256_movemask_ps(bad) == 0,
        _mm256_movemask_ps(all_within) != 0xff,
    )
}

/// `q[i] = round_half_even(clamp((x[i] − lo) · inv, 0, 255)) − 128`, bit for bit the portable
/// affine quantizer (clamping to whole bounds before or after rounding gives the same integer;
/// `vcvtps2dq` rounds half to even).
///
/// # Safety
/// AVX2+FMA+F16C available; `x` finite; `q.len() >= x.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_affine(x: &[f32], lo: f32, inv: f32, q: &mut [i8]) {
    let (lov, invv, zero, top, half) =
        (_mm256_set1_ps(lo), _mm256_set1_ps(inv), _mm256_setzero_ps(), _mm256_set1_ps(255.0), _mm256_set1_epi32(128));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut i = 0;
    while i + 32 <= x.len() {
        let mut v = [_mm256_setzero_si256(); 4];
        for (j, vj) in v.iter_mut().enumerate() {
            // SAFETY: i + 32 <= x.len().
            let r = _mm256_mul_ps(_mm256_sub_ps(unsafe { _mm256_loadu_ps(x.as_ptr().add(i + 8 * j)) }, lov), invv);
            *vj = _mm256_sub_epi32(_mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, zero), top)), half);
        }
        // Packing works per 128-bit half; the permute puts the 32 bytes back in order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        // SAFETY: q has as many bytes as x has floats.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order)) };
        i += 32;
    }
    for (qv, &xv) in q[i..].iter_mut().zip(&x[i..]) {
        *qv = super::act_quant::affine_value(xv, lo, inv);
    }
}

/// [`abs_max`] of each run of `group` values of `x` into `amax` (one per run, in order), in one
/// call for a whole activation row; whether every value is finite.
///
/// # Safety
/// AVX2+FMA+F16C available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn group_abs_max(x: &[f32], group: usize, amax: &mut [f32]) -> bool {
    // SAFETY: the features are the caller's contract.
    unsafe {
        let mut finite = true;
        for (xg, a) in x.chunks(group).zip(amax) {
            let (m, f) = abs_max(xg);
            (*a, finite) = (m, finite & f);
        }
        finite
    }
}

/// [`quantize_symmetric`] of each run of `group` values of `x` with its own `inv[g]`, in one
/// call for a whole activation row.
///
/// # Safety
/// AVX2+FMA+F16C available; `x` finite; `q.len() >= x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_groups(x: &[f32], group: usize, inv: &[f32], q: &mut [i8]) {
    // SAFETY: the caller's contract; each run of q is as long as its run of x.
    unsafe {
        for ((xg, qg), &i) in x.chunks(group).zip(q.chunks_mut(group)).zip(inv) {
            quantize_symmetric(xg, i, qg)
        }
    }
}

/// `factor · Σ a` over each run of `seg` bytes of each row of `stride` bytes in `data` (the first
/// `segs` runs of a row, the last one possibly short), into `out` row by row (`segs` values
/// per row; rows beyond `out` are left out): the shift terms of the int8 tiles. Whole 32-byte pieces are summed with `vpsadbw` on `a xor 0x80`
/// (`= a + 128` as an unsigned byte), taking `128` per byte back at the end.
///
/// # Safety
/// AVX2 available.
#[target_feature(enable = "avx2")]
pub unsafe fn segment_sums(data: &[i8], stride: usize, seg: usize, segs: usize, factor: i32, out: &mut [i32]) {
    // SAFETY: AVX2 is the caller's contract; every load reads 32 bytes inside `run`.
    unsafe {
        let (flip, zero) = (_mm256_set1_epi8(-128), _mm256_setzero_si256());
        for (row, terms) in data.chunks(stride).zip(out.chunks_mut(segs)) {
            for (run, term) in row.chunks(seg).take(segs).zip(terms) {
                let whole = run.len() / 32 * 32;
                let mut acc = zero;
                for i in (0..whole).step_by(32) {
                    let v = _mm256_xor_si256(_mm256_loadu_si256(run.as_ptr().add(i) as *const __m256i), flip);
                    acc = _mm256_add_epi64(acc, _mm256_sad_epu8(v, zero));
                }
                let lanes = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
                let biased = _mm_cvtsi128_si64(_mm_add_epi64(lanes, _mm_unpackhi_epi64(lanes, lanes)));
                let tail: i32 = run[whole..].iter().map(|&v| v as i32).sum();
                *term = factor * (biased as i32 - 128 * whole as i32 + tail);
            }
        }
    }
}

/// `e^x` in every lane, for `x ≤ 0` (softmax numerators): `x = n·ln2 + r` with `n` the nearest
/// integer to `x·log2(e)` and `|r| ≤ ln2/2`, `e^r` by its Taylor polynomial to degree 6
/// (relative error below `r⁷/7! ≈ 1.2e-7`), times `2^n` built in the exponent bits. Below
/// `−87` (where `e^x` leaves the normal floats) the result is 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn exp_nonpositive(x: __m256) -> __m256 {
    let live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_GE_OQ);
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // ln 2 in two parts, so that n·ln2 is exact to float precision for |n| ≤ 126.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut poly = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
    }
    let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    _mm256_and_ps(_mm256_mul_ps(poly, two_n), live)
}

/// The softmax numerators of a row of scores in place: with `m = max_j p[j]`,
/// `p[j] = e^(p[j] − m)`; returns `(m, Σ_j p[j])`.
///
/// # Safety
/// AVX2+FMA+F16C available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn softmax_numerators(p: &mut [f32]) -> (f32, f32) {
    let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
    let chunks = p.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    for c in chunks {
        // SAFETY: chunks_exact gives 8 floats.
        top = _mm256_max_ps(top, unsafe { _mm256_loadu_ps(c.as_ptr()) });
    }
    let mut lanes = [0f32; 8];
    // SAFETY: lanes holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), top) };
    let max = lanes.iter().fold(tail, |m, &s| m.max(s));
    let (m, mut sum) = (_mm256_set1_ps(max), _mm256_setzero_ps());
    // Padding past the end is −∞, whose e^(−∞ − m) = 0 adds nothing to the sum.
    map_vectors(p, f32::NEG_INFINITY, |v| {
        let e = exp_nonpositive(_mm256_sub_ps(v, m));
        sum = _mm256_add_ps(sum, e);
        e
    });
    (max, hsum(sum))
}

/// `x[i] = f(x[i..i+8])` eight values at a time, in place; the last, partial vector is padded
/// with `pad` and only its real values are written back.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn map_vectors(x: &mut [f32], pad: f32, mut f: impl FnMut(__m256) -> __m256) {
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: chunks_exact_mut gives 8 floats.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), f(_mm256_loadu_ps(c.as_ptr()))) };
    }
    let tail = chunks.into_remainder();
    if tail.is_empty() {
        return;
    }
    let mut rest = [pad; 8];
    rest[..tail.len()].copy_from_slice(tail);
    // SAFETY: rest holds 8 floats.
    unsafe { _mm256_storeu_ps(rest.as_mut_ptr(), f(_mm256_loadu_ps(rest.as_ptr()))) };
    tail.copy_from_slice(&rest[..tail.len()]);
}

/// `x ↦ x·Φ(x)` (exact GELU, `Φ` the normal distribution function) in place: see
/// [`super::gelu_erf`] for the maths; the same steps eight lanes at a time.
///
/// # Safety
/// AVX2+FMA+F16C available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gelu_erf(x: &mut [f32]) {
    let [p, a1, a2, a3, a4, a5] = super::elementwise::ERF_COEFFS.map(|c| _mm256_set1_ps(c));
    let (half, one, sign) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0), _mm256_set1_ps(-0.0));
    let frac = _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2);
    let lanes = |v: __m256| {
        let z = _mm256_mul_ps(_mm256_andnot_ps(sign, v), frac);
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(p, z, one));
        let mut poly = a5;
        for a in [a4, a3, a2, a1] {
            poly = _mm256_fmadd_ps(poly, t, a);
        }
        let tail = _mm256_mul_ps(_mm256_mul_ps(poly, t), exp_nonpositive(_mm256_mul_ps(_mm256_xor_ps(z, sign), z)));
        let c = _mm256_mul_ps(_mm256_mul_ps(half, v), tail);
        // x − c where x ≥ 0, c where x < 0.
        _mm256_blendv_ps(_mm256_sub_ps(v, c), c, v)
    };
    map_vectors(x, 0.0, lanes)
}

/// `out = silu(gate) · up` eight values at a time: see [`super::silu_mul`] for the maths.
///
/// # Safety
/// AVX2+FMA+F16C available; `gate`, `up` and `out` of the same length.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
    let (one, sign) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-0.0));
    let lanes = |x: __m256, u: __m256| {
        let e = exp_nonpositive(_mm256_or_ps(x, sign));
        let r = _mm256_div_ps(one, _mm256_add_ps(one, e));
        // σ = e·r where x < 0 (its sign bit set), r elsewhere.
        let sigma = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), x);
        _mm256_mul_ps(_mm256_mul_ps(x, sigma), u)
    };
    let n = gate.len() - gate.len() % 8;
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n <= the three lengths (equal, the caller's contract).
        unsafe {
            let y = lanes(_mm256_loadu_ps(gate.as_ptr().add(i)), _mm256_loadu_ps(up.as_ptr().add(i)));
            _mm256_storeu_ps(out.as_mut_ptr().add(i).cast(), y);
        }
    }
    let (mut g, mut u, mut o) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    let rest = gate.len() - n;
    g[..rest].copy_from_slice(&gate[n..]);
    u[..rest].copy_from_slice(&up[n..]);
    // SAFETY: the three arrays hold 8 floats.
    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), lanes(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()))) };
    out[n..].iter_mut().zip(o).for_each(|(y, v)| _ = y.write(v));
}

/// Horizontal sum of eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// `sums[r] = Σ_j x[r·n + j]²` for every row `r` of `n` values, each row's squares added in order
/// — eight rows at a time, one per lane: 8 × 8 blocks are transposed so that each register holds
/// one channel of the eight rows; the rows left over, one at a time.
///
/// # Safety
/// AVX2+FMA+F16C available; `x` holds `sums.len()` rows of `n > 0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn sums_of_squares(x: &[f32], n: usize, sums: &mut [f32]) {
    // SAFETY: the caller's contract; no plain sums are asked for.
    unsafe { row_sums::<false>(x, n, &mut [], sums) }
}

/// `sums[r] = Σ_j x[r·n + j]` and `squares[r] = Σ_j x[r·n + j]²`, each added in order (LayerNorm's
/// two running sums, side by side), eight rows at a time as [`sums_of_squares`].
///
/// # Safety
/// AVX2+FMA+F16C available; `x` holds `sums.len() == squares.len()` rows of `n > 0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn sums_and_squares(x: &[f32], n: usize, sums: &mut [f32], squares: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { row_sums::<true>(x, n, sums, squares) }
}

/// The body of [`sums_of_squares`] (`PLAIN` false, `sums` unused) and [`sums_and_squares`].
///
/// # Safety
/// As [`sums_and_squares`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_sums<const PLAIN: bool>(x: &[f32], n: usize, sums: &mut [f32], squares: &mut [f32]) {
    let eights = squares.len() / 8 * 8;
    let body = n - n % 8;
    for r0 in (0..eights).step_by(8) {
        let at = |r: usize| x.as_ptr().wrapping_add((r0 + r) * n);
        let (mut plain, mut acc) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for j in (0..body).step_by(8) {
            // SAFETY: rows r0..r0+8 hold n values each, j + 8 <= body <= n.
            let rows: [__m256; 8] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(at(r).add(j)) });
            for c in transpose8(rows) {
                if PLAIN {
                    plain = _mm256_add_ps(plain, c);
                }
                acc = _mm256_add_ps(acc, _mm256_mul_ps(c, c));
            }
        }
        for j in body..n {
            // SAFETY: as above, j < n.
            let c: [f32; 8] = std::array::from_fn(|r| unsafe { *at(r).add(j) });
            // SAFETY: c holds 8 floats.
            let c = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            if PLAIN {
                plain = _mm256_add_ps(plain, c);
            }
            acc = _mm256_add_ps(acc, _mm256_mul_ps(c, c));
        }
        // SAFETY: both outputs hold at least r0 + 8 values (sums only when PLAIN).
        unsafe {
            _mm256_storeu_ps(squares.as_mut_ptr().add(r0), acc);
            if PLAIN {
                _mm256_storeu_ps(sums.as_mut_ptr().add(r0), plain);
            }
        }
    }
    for (r, row) in x.chunks_exact(n).enumerate().skip(eights).take(squares.len() - eights) {
        let (mut sum, mut sum2) = (0f32, 0f32);
        for &v in row {
            sum += v;
            sum2 += v * v;
        }
        squares[r] = sum2;
        if PLAIN {
            sums[r] = sum;
        }
    }
}

/// The columns of an 8 × 8 block of rows: `out[c][r] = rows[r][c]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // Pairs of rows interleaved, then quads (columns c and c + 4 in the two halves), then halves.
    let lo = |a, b| _mm256_unpacklo_ps(a, b);
    let hi = |a, b| _mm256_unpackhi_ps(a, b);
    let t =
        [lo(r[0], r[1]), hi(r[0], r[1]), lo(r[2], r[3]), hi(r[2], r[3]), lo(r[4], r[5]), hi(r[4], r[5]), lo(r[6], r[7]), hi(r[6], r[7])];
    let even = |a, b| _mm256_shuffle_ps::<0x44>(a, b);
    let odd = |a, b| _mm256_shuffle_ps::<0xee>(a, b);
    let q = [
        even(t[0], t[2]),
        odd(t[0], t[2]),
        even(t[1], t[3]),
        odd(t[1], t[3]),
        even(t[4], t[6]),
        odd(t[4], t[6]),
        even(t[5], t[7]),
        odd(t[5], t[7]),
    ];
    std::array::from_fn(
        |c| if c < 4 { _mm256_permute2f128_ps::<0x20>(q[c], q[c + 4]) } else { _mm256_permute2f128_ps::<0x31>(q[c - 4], q[c]) },
    )
}
