//! Int4 weight quantization: round to nearest on a grid searched per group for the least
//! squared error (the grid that `max |w|` alone gives wastes a level or clips too little; this
//! search is what llama.cpp's and AWQ's int4 quantizers do in their own ways).
//!
//! Per group of `g` weights, with `f16` scales rounded before the values are chosen:
//! - symmetric: `q = clamp(round(w / s), −8, 7)`, `w ≈ s·q`, for `s = ±max|w| / d` over
//!   `d ∈ [7, 8.5]` — the sign lets the group's extreme take the level −8 (as in GGUF's Q4_0);
//! - asymmetric: `u = clamp(round(w / s) + z, 0, 15)`, `w ≈ s·(u − z)`, for
//!   `s = (max − min) / 15 · t` over `t ∈ [0.75, 1]` with `z` anchored at either end;
//!
//! then the least-squares scale for the chosen levels (`s = Σ w·q / Σ q²`), kept where it does
//! better.

use super::paths::Kernels;
use super::weights::{Int8Rows, MAX_IN_FEATURES};
use crate::quant::SCALE_EPS;
use candle_core::{bail, Result};
use half::f16;

/// Candidate scales tried per group and sign (or anchor).
const STEPS: usize = 12;

/// `Σ h·(w − s·(q − z))²` for the levels `round(w / s) + z` clamped to `[lo, hi]`, written to
/// `q` as `level − z` (small integers, exact in `f32`); `h` is the importance of each weight
/// (`WEIGHTED`), else 1. Eight running sums, each over every eighth weight, added in order at
/// the end: the vector path of `kernels` ([`Kernels::int4_levels`]) and [`levels_portable`] do
/// the same operations in the same order.
fn levels<const WEIGHTED: bool>(kernels: &Kernels, w: &[f32], h: &[f32], s: f32, z: i32, (lo, hi): (i32, i32), q: &mut [f32]) -> f32 {
    let (inv, lo, hi) = (1.0 / s, (lo - z) as f32, (hi - z) as f32);
    // `clamp(round(x / s) + z, lo, hi) − z = clamp(round(x / s), lo − z, hi − z)`, in float
    // (exact: small integers).
    let whole = w.len() / 8 * 8;
    let (wl, ql) = (&w[..whole], &mut q[..whole]);
    let mut sums = match kernels.int4_levels(wl, WEIGHTED.then_some(h), s, (lo, hi), ql) {
        Some(sums) => sums,
        None => levels_portable::<WEIGHTED>(wl, h, s, inv, (lo, hi), ql),
    };
    for (c, (qv, &x)) in q.iter_mut().zip(w).enumerate().skip(whole) {
        let l = round_even(x * inv).clamp(lo, hi);
        *qv = l;
        let d = x - s * l;
        sums[0] += if WEIGHTED { h[c] } else { 1.0 } * d * d;
    }
    sums.iter().sum()
}

/// The eight-lane part of [`levels`] (`w.len()` a multiple of 8), one lane per eighth weight.
fn levels_portable<const WEIGHTED: bool>(w: &[f32], h: &[f32], s: f32, inv: f32, (lo, hi): (f32, f32), q: &mut [f32]) -> [f32; 8] {
    let mut sums = [0f32; 8];
    for (c0, (qc, wc)) in q.chunks_exact_mut(8).zip(w.chunks_exact(8)).enumerate() {
        for i in 0..8 {
            let l = round_even(wc[i] * inv).clamp(lo, hi);
            qc[i] = l;
            let d = wc[i] - s * l;
            sums[i] += if WEIGHTED { h[8 * c0 + i] } else { 1.0 } * d * d;
        }
    }
    sums
}

/// `v` rounded to the nearest integer, ties to even, as `f32::round_ties_even` (a libm call on
/// x86_64 without SSE4.1) but inline: adding and taking back `1.5·2²³` leaves no fraction bits
/// below the units, so the addition itself rounds (to nearest even, the default mode). Exact for
/// `|v| < 2²²`; beyond, the result is still beyond `±2²¹` with `v`'s sign, which the int4 levels
/// clamp the same way.
#[inline]
fn round_even(v: f32) -> f32 {
    (v + MAGIC) - MAGIC
}

/// `1.5·2²³`: see [`round_even`].
pub(super) const MAGIC: f32 = 12_582_912.0;

/// The best `(scale, zero point)` of one group and its values `q` (signed, `q = u − z`):
/// symmetric (`z` = 8 implied, returned as 8) or with a zero point; the least squared error.
pub(crate) fn quantize_group(w: &[f32], zero_point: bool, q: &mut [i8]) -> Result<(f16, u8)> {
    search_group::<false>(w, &[], zero_point, q)
}

/// [`quantize_group`] for the least error weighted by `importance` (one non-negative value per
/// weight: what an error there costs, e.g. GPTQ's `1 / [H⁻¹]_cc`).
pub(crate) fn quantize_group_weighted(w: &[f32], importance: &[f32], zero_point: bool, q: &mut [i8]) -> Result<(f16, u8)> {
    if importance.len() != w.len() {
        bail!("int4 group of {} weights given {} importances", w.len(), importance.len())
    }
    search_group::<true>(w, importance, zero_point, q)
}

fn search_group<const WEIGHTED: bool>(w: &[f32], h: &[f32], zero_point: bool, q: &mut [i8]) -> Result<(f16, u8)> {
    let kernels = Kernels::best();
    let mut best = Best { err: f32::INFINITY, scale: f16::ONE, zero: 8, trial: vec![0f32; w.len()], kept: vec![0f32; w.len()] };
    let (lo, hi) = w.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if !(lo.is_finite() && hi.is_finite()) {
        bail!("int4 weights must be finite")
    }
    let amax = (-lo).max(hi);
    if amax < SCALE_EPS {
        q.fill(0);
        return Ok((f16::from_f32(SCALE_EPS), 8));
    }
    if zero_point {
        let range = (hi - lo).max(SCALE_EPS);
        for i in 0..STEPS {
            let s = range / 15.0 * (1.0 - 0.25 * i as f32 / STEPS as f32);
            for z in [(-lo / s).round(), 15.0 - (hi / s).round()] {
                best.consider::<WEIGHTED>(&kernels, w, h, s, (z as i32).clamp(0, 15))?;
            }
        }
    } else {
        for i in 0..STEPS {
            let d = 7.0 + 1.5 * i as f32 / (STEPS - 1) as f32;
            for sign in [1.0, -1.0] {
                best.consider::<WEIGHTED>(&kernels, w, h, sign * amax / d, 8)?;
            }
        }
    }
    // Least squares for the chosen levels: s = Σ h·w·q / Σ h·q².
    let imp = |c: usize| if WEIGHTED { h[c] } else { 1.0 };
    let (wq, qq) =
        best.kept.iter().zip(w).enumerate().fold((0f32, 0f32), |(a, b), (c, (&qf, &x))| (a + imp(c) * x * qf, b + imp(c) * qf * qf));
    if qq > 0.0 {
        best.consider::<WEIGHTED>(&kernels, w, h, wq / qq, best.zero as i32)?;
    }
    q.iter_mut().zip(&best.kept).for_each(|(q, &l)| *q = l as i8);
    Ok((best.scale, best.zero))
}

/// The best grid of a group so far, and its levels.
struct Best {
    err: f32,
    scale: f16,
    zero: u8,
    trial: Vec<f32>,
    kept: Vec<f32>,
}

impl Best {
    /// Tries scale `s` (rounded to `f16` first) with zero point `z`; its levels become the kept
    /// ones when it does better than the best so far.
    fn consider<const WEIGHTED: bool>(&mut self, kernels: &Kernels, w: &[f32], h: &[f32], s: f32, z: i32) -> Result<()> {
        let scale = f16::from_f32(s);
        if !scale.is_finite() {
            bail!("int4 weight scale {s} does not fit an f16 (weights must stay below {})", f16::MAX.to_f32() * 7.0)
        }
        if scale.to_f32() == 0.0 {
            return Ok(());
        }
        let err = levels::<WEIGHTED>(kernels, w, h, scale.to_f32(), z, (0, 15), &mut self.trial);
        if err < self.err {
            (self.err, self.scale, self.zero) = (err, scale, z as u8);
            std::mem::swap(&mut self.trial, &mut self.kept);
        }
        Ok(())
    }
}

/// [`super::quantize_weight_rows_with`] for [`super::WeightQuant::Int4`]: rows in parallel,
/// each `K`-long row written by `row(j, buf)`.
pub(super) fn quantize_int4_rows_with(
    n: usize,
    k: usize,
    group: usize,
    zero_point: bool,
    row: impl Fn(usize, &mut [f32]) + Sync,
) -> Result<Int8Rows> {
    use rayon::prelude::*;
    if n == 0 || k == 0 || k > MAX_IN_FEATURES {
        bail!("cannot quantize an {n}×{k} weight (1 to {MAX_IN_FEATURES} input features)")
    }
    if group == 0 || (group < k && !group.is_multiple_of(8)) {
        bail!("int4 weight groups must be a multiple of 8 input channels (32, 64, 128) or span the row of {k}; got {group}")
    }
    let group = group.min(k);
    let groups = k.div_ceil(group);
    let mut q = vec![0i8; n * k];
    let mut scales = vec![f16::ZERO; n * groups];
    let mut zeros = vec![8u8; if zero_point { n * groups } else { 0 }];
    let mut zero_rows: Vec<&mut [u8]> = if zero_point { zeros.chunks_mut(groups).collect() } else { (0..n).map(|_| &mut [][..]).collect() };
    q.par_chunks_mut(k).zip(scales.par_chunks_mut(groups)).zip(zero_rows.par_iter_mut()).enumerate().with_min_len(8).try_for_each_init(
        || vec![0f32; k],
        |buf, (j, ((qrow, srow), zrow))| -> Result<()> {
            row(j, buf);
            for (g, (w, qw)) in buf.chunks(group).zip(qrow.chunks_mut(group)).enumerate() {
                let (s, z) = quantize_group(w, zero_point, qw).map_err(|e| e.context(format!("row {j}, group {g}")))?;
                srow[g] = s;
                if let Some(zv) = zrow.get_mut(g) {
                    *zv = z;
                }
            }
            Ok(())
        },
    )?;
    Int8Rows::new_int4(n, k, group, q, scales, zero_point.then_some(zeros))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inline rounding equals the library's on ties, near ties and far values.
    #[test]
    fn round_even_matches_round_ties_even() {
        for v in [0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 7.49999, -7.50001, 1e-30, 4_194_303.5, -4_194_303.5] {
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
        let mut x = 0.123f32;
        for _ in 0..10_000 {
            x = (x * 1.37 + 0.71) % 40.0 - 20.0;
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
    }

    /// Every vector path's lanes give the portable lanes' levels and sums, bit for bit, weighted
    /// or not, on random weights, scales and zero points.
    #[test]
    fn level_lanes_agree() {
        use crate::kernels::Isa;
        let mut x = 0.377f32;
        let mut next = || {
            x = (x * 1.37 + 0.71) % 7.0 - 3.5;
            x
        };
        let tables: Vec<Kernels> = Isa::supported().into_iter().map(|isa| Kernels::of(isa).unwrap()).collect();
        for trial in 0..200 {
            let n = 8 * (1 + trial % 16);
            let w: Vec<f32> = (0..n).map(|_| next()).collect();
            let h: Vec<f32> = (0..n).map(|_| next().abs()).collect();
            let s = 0.05 + next().abs() / 8.0;
            let z = (trial % 16) as f32;
            let bounds = (-z, 15.0 - z);
            let (mut qa, mut qb) = (vec![0f32; n], vec![0f32; n]);
            for weighted in [false, true] {
                let a = if weighted { levels_portable::<true> } else { levels_portable::<false> }(&w, &h, s, 1.0 / s, bounds, &mut qa);
                for k in &tables {
                    let Some(b) = k.int4_levels(&w, weighted.then_some(&h), s, bounds, &mut qb) else { continue };
                    assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "{:?}, trial {trial}, weighted {weighted}", k.isa());
                    assert!(qa.iter().zip(&qb).all(|(p, q)| p == q), "{:?}, trial {trial}", k.isa());
                }
            }
        }
    }

    /// Importance steers the grid: sixteen weights on the grid `0.5·q` (`q` over `[−8, 7]`) with
    /// importance 1 and sixteen off it (`0.37·(t − 7.5)`, t over 0..16) with importance 0 come out
    /// with scale 0.5 and the sixteen exact (weighted error 0, reached by the least-squares step
    /// over the important ones); unweighted, the sixteen others pull the scale off 0.5.
    #[test]
    fn importance_weighted_grid_fits_the_weights_that_matter() -> Result<()> {
        let on_grid = (-8..8).map(|q| 0.5 * q as f32);
        let off_grid = (0..16).map(|t| 0.37 * (t as f32 - 7.5));
        let w: Vec<f32> = on_grid.zip(off_grid).flat_map(|(a, b)| [a, b]).collect();
        let h: Vec<f32> = (0..32).map(|c| if c % 2 == 0 { 1.0 } else { 0.0 }).collect();
        let mut q = vec![0i8; 32];
        let (s, z) = quantize_group_weighted(&w, &h, false, &mut q)?;
        assert_eq!((s.to_f32(), z), (0.5, 8));
        assert!((0..32).step_by(2).all(|c| 0.5 * q[c] as f32 == w[c]));
        let (s, _) = quantize_group(&w, false, &mut q)?;
        assert_ne!(s.to_f32(), 0.5);
        assert!(quantize_group_weighted(&w, &h[..31], false, &mut q).is_err());
        Ok(())
    }

    /// The symmetric search finds the grid a group was built on: `w = 0.5·q` for `q` over
    /// `[−8, 7]` is reproduced exactly (scale 0.5, error 0); the extreme −4.0 takes level −8.
    #[test]
    fn a_group_on_a_grid_is_reproduced() -> Result<()> {
        let w: Vec<f32> = (-8..8).chain(-8..8).map(|q| 0.5 * q as f32).collect();
        let mut q = vec![0i8; w.len()];
        let (s, z) = quantize_group(&w, false, &mut q)?;
        assert_eq!((s.to_f32(), z), (0.5, 8));
        assert!(q.iter().zip(&w).all(|(&q, &x)| 0.5 * q as f32 == x));
        // Asymmetric: w = 0.25·(u − 3) for u in 0..=15 → scale 0.25, zero point 3.
        let w: Vec<f32> = (0..16).chain(0..16).map(|u| 0.25 * (u - 3) as f32).collect();
        let (s, z) = quantize_group(&w, true, &mut q)?;
        assert_eq!((s.to_f32(), z), (0.25, 3));
        assert!(q.iter().zip(&w).all(|(&q, &x)| 0.25 * q as f32 == x));
        Ok(())
    }
}
