//! Attention's float tiles on x86_64: the scores `scale · q·k` of a few query heads against a
//! run of key rows, and the weighted sums of value rows. They are written once per register
//! file ([`attention_tiles`]): AVX2's 16 vector registers, and the 32 that the EVEX encoding
//! (AVX-512 VL) gives the same 256-bit instructions. Both families compute every value with
//! the same operations in the same order, so every path gives the same bits.
//!
//! **Scores.** A score is a dot product of `d` values (`d` a multiple of 8): eight lanes of
//! partial sums, lane `l` adding channels `l, l + 8, …` in order with FMAs, then the lanes summed
//! as `((v₀ + v₄) + (v₂ + v₆)) + ((v₁ + v₅) + (v₃ + v₇))`. Summing each score's lanes on its own
//! takes five shuffles and adds per score; a tile of `RP` heads × `KP` keys instead keeps
//! `RP·KP` accumulators and sums them eight at a time, transposed: 128-bit halves of two
//! accumulators added at once (`vperm2f128`), then pairs of lanes (`vshufps`), then neighbours
//! (`vhaddps`) — the very same additions, eight scores per four instructions. Each key row is
//! loaded once per tile for its `RP` heads and each query vector once for its `KP` keys.
//!
//! **Weighted values.** `y_r = Σ_j w_rj · v_j`: each output a sum over the keys in order, `W`
//! vectors of outputs per head per pass over the value rows.

// Register tiles are indexed by head and key on purpose: the loops mirror the tile's shape.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

/// The eight sums of lanes of `v` — `[Σ v[0], …, Σ v[7]]`, each in the order
/// `((l₀ + l₄) + (l₂ + l₆)) + ((l₁ + l₅) + (l₃ + l₇))` (that of [`super::x86::hsum`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lane_sums(v: [__m256; 8]) -> __m256 {
    // `vhaddps` leaves its results in the order 0, 2, 4, 6, 1, 3, 5, 7 of its inputs' pairs;
    // feeding the accumulators as 0, 4, 1, 5, 2, 6, 3, 7 puts them back in order.
    let halves = |a: __m256, b: __m256| _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(a, b), _mm256_permute2f128_ps::<0x31>(a, b));
    let (ab, cd, ef, gh) = (halves(v[0], v[4]), halves(v[1], v[5]), halves(v[2], v[6]), halves(v[3], v[7]));
    // Per 128-bit lane: [x₀ + x₂, x₁ + x₃] of each input's four half sums.
    let pairs = |a: __m256, b: __m256| _mm256_add_ps(_mm256_shuffle_ps::<0x44>(a, b), _mm256_shuffle_ps::<0xee>(a, b));
    _mm256_hadd_ps(pairs(ab, cd), pairs(ef, gh))
}

/// One score at a time, for keys a tile does not cover and heads whose size is not a multiple of
/// 8: `p[r·t + j] = scale · q_r·keys[j]` for `j ∈ keys`, the lanes summed as [`lane_sums`] does,
/// then the channels past the last whole vector added in order.
///
/// # Safety
/// AVX2+FMA; `q` holds `RP` rows of `d`, `p` `RP` rows of `t`, `keys` rows `0..keys.end`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_one_at_a_time<const RP: usize>(
    q: *const f32,
    k: *const f32,
    d: usize,
    scale: f32,
    p: *mut f32,
    t: usize,
    keys: std::ops::Range<usize>,
) {
    // SAFETY: every access stays within the rows the caller vouches for.
    unsafe {
        let body = d - d % 8;
        for j in keys {
            let kr = k.add(j * d);
            let mut acc = [_mm256_setzero_ps(); RP];
            for c in (0..body).step_by(8) {
                let kv = _mm256_loadu_ps(kr.add(c));
                for r in 0..RP {
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(r * d + c)), kv, acc[r]);
                }
            }
            for r in 0..RP {
                let mut s = super::x86::hsum(acc[r]);
                for c in body..d {
                    s += *q.add(r * d + c) * *kr.add(c);
                }
                *p.add(r * t + j) = s * scale;
            }
        }
    }
}

/// The attention tiles of one register file: `$features` their target features, `$wide` whether
/// 32 vector registers are there.
macro_rules! attention_tiles {
    ($family:ident, $features:literal, $wide:literal) => {
        pub mod $family {
            use super::*;

            /// `p[r·t + j] = scale · q_r·keys[j]` for the 1 to 4 heads of `q` (rows of `d`) and
            /// every key row `j < t`.
            ///
            /// # Safety
            /// The family's features available; `q` holds 1 to 4 rows of `d`, `p` as many rows of
            /// `t`, and `keys` `t` rows of `d`.
            #[target_feature(enable = $features)]
            pub unsafe fn attention_scores(q: &[f32], keys: &[f32], d: usize, scale: f32, p: &mut [f32]) {
                let heads = q.len() / d;
                let t = p.len() / heads;
                let (q, k, p) = (q.as_ptr(), keys.as_ptr(), p.as_mut_ptr());
                if d % 8 != 0 {
                    // Heads not whole vectors: one key at a time, all heads together.
                    // SAFETY: q holds `heads` (1 to 4) rows of d, keys t rows of d, p `heads`
                    // rows of t (this function's contract); the features are enabled here.
                    return unsafe {
                        match heads {
                            1 => scores_one_at_a_time::<1>(q, k, d, scale, p, t, 0..t),
                            2 => scores_one_at_a_time::<2>(q, k, d, scale, p, t, 0..t),
                            3 => scores_one_at_a_time::<3>(q, k, d, scale, p, t, 0..t),
                            _ => scores_one_at_a_time::<4>(q, k, d, scale, p, t, 0..t),
                        }
                    };
                }
                // (heads, keys) per tile: RP·KP accumulators, RP query and one key register.
                // Heads 3 and 4 split into tiles of 2 + 1 or 2 + 2: the second starts at head 2
                // of q and p (`wrapping_add`: only dereferenced when those heads exist).
                let (q2, p2) = (q.wrapping_add(2 * d), p.wrapping_add(2 * t));
                // SAFETY: q holds `heads` (1 to 4) rows of d, keys t rows of d, p `heads` rows of
                // t (this function's contract): each tile reads and writes only its own heads'
                // rows; the features are enabled here.
                unsafe {
                    match (heads, $wide) {
                        (1, _) => scores::<1, 8>(q, k, d, scale, p, t),
                        (2, true) => scores::<2, 8>(q, k, d, scale, p, t),
                        (2, false) => scores::<2, 4>(q, k, d, scale, p, t),
                        (3, true) => scores::<3, 8>(q, k, d, scale, p, t),
                        (3, false) => {
                            scores::<2, 4>(q, k, d, scale, p, t);
                            scores::<1, 8>(q2, k, d, scale, p2, t);
                        }
                        (_, true) => scores::<4, 4>(q, k, d, scale, p, t),
                        (_, false) => {
                            scores::<2, 4>(q, k, d, scale, p, t);
                            scores::<2, 4>(q2, k, d, scale, p2, t);
                        }
                    }
                }
            }

            /// [`attention_scores`] for `RP` heads, `KP` keys per tile (`RP·KP` a multiple of 8,
            /// `KP` 4 or 8); keys past the last whole tile one at a time.
            ///
            /// # Safety
            /// As [`attention_scores`], `d` a multiple of 8, `q` `RP` rows, `p` `RP` rows of `t`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn scores<const RP: usize, const KP: usize>(q: *const f32, k: *const f32, d: usize, scale: f32, p: *mut f32, t: usize) {
                // SAFETY: rows r < RP of q and p, keys j < t and channels c < d exist (caller).
                unsafe {
                    let scale_v = _mm256_set1_ps(scale);
                    let whole = t - t % KP;
                    for j in (0..whole).step_by(KP) {
                        let mut acc = [[_mm256_setzero_ps(); KP]; RP];
                        for c in (0..d).step_by(8) {
                            let qv: [__m256; RP] = std::array::from_fn(|r| _mm256_loadu_ps(q.add(r * d + c)));
                            for u in 0..KP {
                                let kv = _mm256_loadu_ps(k.add((j + u) * d + c));
                                for r in 0..RP {
                                    acc[r][u] = _mm256_fmadd_ps(qv[r], kv, acc[r][u]);
                                }
                            }
                        }
                        // Eight accumulators at a time, in (head, key) order: KP = 8 is one
                        // head's eight keys, KP = 4 two heads' four.
                        for g in 0..RP * KP / 8 {
                            let s = _mm256_mul_ps(lane_sums(std::array::from_fn(|x| acc[(8 * g + x) / KP][(8 * g + x) % KP])), scale_v);
                            if KP == 8 {
                                _mm256_storeu_ps(p.add(g * t + j), s);
                            } else {
                                _mm_storeu_ps(p.add(2 * g * t + j), _mm256_castps256_ps128(s));
                                _mm_storeu_ps(p.add((2 * g + 1) * t + j), _mm256_extractf128_ps::<1>(s));
                            }
                        }
                    }
                    scores_one_at_a_time::<RP>(q, k, d, scale, p, t, whole..t);
                }
            }

            /// `y_r = Σ_j w[r·t + j] · values[j]` for the 1 to 4 heads of `w` (rows of `t`) and
            /// `y` (rows of `d`), `8·W` outputs of every head per pass over the value rows: as
            /// many as keep `R·W` accumulators, the `R` weights and a value row in registers.
            ///
            /// # Safety
            /// The family's features available; `y` holds 1 to 4 rows of `d`, `w` as many rows of
            /// `t`, and `values` `t` rows of `d`.
            #[target_feature(enable = $features)]
            pub unsafe fn weighted_rows(w: &[f32], values: &[f32], d: usize, y: &mut [f32]) {
                // SAFETY: y holds 1 to 4 rows of d, w as many rows of t, values t rows of d (this
                // function's contract); the features are enabled here.
                unsafe {
                    match y.len() / d {
                        1 => weighted::<1>(w, values, d, y),
                        2 => weighted::<2>(w, values, d, y),
                        3 => weighted::<3>(w, values, d, y),
                        _ => weighted::<4>(w, values, d, y),
                    }
                }
            }

            /// [`weighted_rows`] for exactly `R` heads.
            ///
            /// # Safety
            /// As [`weighted_rows`], with `R` rows in `w` and `y`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn weighted<const R: usize>(w: &[f32], values: &[f32], d: usize, y: &mut [f32]) {
                // SAFETY: row j < t of values and row r < R of w and y exist (caller); every vector
                // access stays below c + 8·W <= body <= d within its row.
                unsafe {
                    let t = w.len() / R;
                    let body = d - d % 8;
                    let (wp, vp, yp) = (w.as_ptr(), values.as_ptr(), y.as_mut_ptr());
                    let mut c = 0;
                    macro_rules! pass {
                        ($w:literal) => {
                            while c + 8 * $w <= body {
                                let mut acc = [[_mm256_setzero_ps(); $w]; R];
                                for j in 0..t {
                                    let v = vp.add(j * d + c);
                                    let wv: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(*wp.add(r * t + j)));
                                    for u in 0..$w {
                                        let vv = _mm256_loadu_ps(v.add(8 * u));
                                        for r in 0..R {
                                            acc[r][u] = _mm256_fmadd_ps(wv[r], vv, acc[r][u]);
                                        }
                                    }
                                }
                                for r in 0..R {
                                    for u in 0..$w {
                                        _mm256_storeu_ps(yp.add(r * d + c + 8 * u), acc[r][u]);
                                    }
                                }
                                c += 8 * $w;
                            }
                        };
                    }
                    if $wide {
                        if R <= 3 {
                            pass!(8);
                        }
                        pass!(4);
                    } else if R <= 2 {
                        pass!(4);
                    } else if R == 3 {
                        pass!(3);
                    }
                    pass!(2);
                    pass!(1);
                    for r in 0..R {
                        for c in body..d {
                            y[r * d + c] = (0..t).map(|j| w[r * t + j] * values[j * d + c]).sum();
                        }
                    }
                }
            }
        }
    };
}

attention_tiles!(avx2, "avx2,fma,f16c", false);
attention_tiles!(avx512, "avx2,fma,f16c,avx512f,avx512vl", true);

#[cfg(test)]
mod tests {
    use super::*;

    /// The transposed sums add in `hsum`'s order: eight accumulators of lanes with mixed
    /// magnitudes (so that another order would round differently) give `hsum`'s bits, in order.
    #[test]
    fn lane_sums_equal_one_horizontal_sum_at_a_time() {
        if !super::super::x86::available() {
            return;
        }
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        for round in 0..200 {
            let lanes: Vec<[f32; 8]> = (0..8).map(|_| std::array::from_fn(|l| next() * 10f32.powi((l as i32 + round) % 7 - 3))).collect();
            // SAFETY: AVX2+FMA+F16C checked above; every array holds 8 floats.
            let (got, want) = unsafe {
                let v: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(lanes[i].as_ptr()));
                let mut got = [0f32; 8];
                _mm256_storeu_ps(got.as_mut_ptr(), lane_sums(v));
                (got, v.map(|x| super::super::x86::hsum(x)))
            };
            assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "round {round}: {got:?} vs {want:?}");
        }
    }
}
