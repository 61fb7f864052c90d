//! Decoding attention in float: one query position against the cached keys and values of a
//! key/value head, for all the query heads that share it (grouped-query attention). A decoding
//! step does this for every head group of every layer (a few hundred cached positions × 64
//! values each), between int8 layers, so it lives with the kernels: AVX2 + FMA on x86_64, chosen
//! at run time (the crate is built for baseline x86_64, where the compiler only has SSE2), and
//! portable code elsewhere (aarch64's baseline NEON is auto-vectorised). The SIMD path reads each
//! cached row once for the whole group, not once per query head.

use super::Isa;
use candle_core::{bail, Result};

/// Query heads a SIMD tile handles at once (a group of more is taken a few heads at a time).
pub(super) const MAX_TILE_HEADS: usize = 4;

/// For each query head `r` of one group, `y_r = softmax(scale · q_r·Kᵀ) · V`: `q` and `y` hold
/// the group's heads one after another (`heads · d` values), `keys` and `values` hold `t` rows
/// of `d` values.
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f32, y: &mut [f32]) -> Result<()> {
    attend_with(Isa::best(), q, keys, values, d, scale, y)
}

/// [`attend`] on a chosen path (errors if this CPU lacks it); paths agree up to float
/// summation order.
pub fn attend_with(isa: Isa, q: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f32, y: &mut [f32]) -> Result<()> {
    let rows = |n: usize| d > 0 && n > 0 && n.is_multiple_of(d);
    if !rows(q.len()) || !rows(keys.len()) || y.len() != q.len() || values.len() != keys.len() {
        bail!(
            "attention: heads of {d} values, query of {}, output of {}, keys of {}, values of {}: each must be a whole, non-empty number of rows, query and output alike, keys and values alike",
            q.len(),
            y.len(),
            keys.len(),
            values.len()
        )
    }
    if !isa.is_supported() {
        bail!("attention: this CPU cannot run the {isa:?} kernels")
    }
    let (heads, t) = (q.len() / d, keys.len() / d);
    // Scores, one row of t per head.
    let mut p = vec![0f32; heads * t];
    match isa {
        #[cfg(target_arch = "x86_64")]
        super::avx2_paths!() => {
            for (qs, ps) in q.chunks(MAX_TILE_HEADS * d).zip(p.chunks_mut(MAX_TILE_HEADS * t)) {
                // SAFETY: AVX2 checked above; qs holds whole heads of d, ps as many rows of t,
                // keys t rows of d.
                unsafe { super::x86::attention_scores(qs, keys, d, scale, ps) }
            }
        }
        _ => {
            for (qh, ph) in q.chunks_exact(d).zip(p.chunks_exact_mut(t)) {
                ph.iter_mut().zip(keys.chunks_exact(d)).for_each(|(p, k)| *p = scale * dot(qh, k));
            }
        }
    }
    // Softmax numerators e^(s − max) per head; each head's sum divides its output at the end.
    let sums: Vec<f32> = p
        .chunks_exact_mut(t)
        .map(|ph| {
            let max = ph.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            ph.iter_mut().for_each(|s| *s = (*s - max).exp());
            ph.iter().sum()
        })
        .collect();
    match isa {
        #[cfg(target_arch = "x86_64")]
        super::avx2_paths!() => {
            for (ps, ys) in p.chunks(MAX_TILE_HEADS * t).zip(y.chunks_mut(MAX_TILE_HEADS * d)) {
                // SAFETY: AVX2 checked above; ps holds whole rows of t, ys as many heads of d,
                // values t rows of d.
                unsafe { super::x86::weighted_rows(ps, values, d, ys) }
            }
        }
        _ => {
            for (ph, yh) in p.chunks_exact(t).zip(y.chunks_exact_mut(d)) {
                yh.fill(0.0);
                for (&w, v) in ph.iter().zip(values.chunks_exact(d)) {
                    yh.iter_mut().zip(v).for_each(|(y, v)| *y += w * v);
                }
            }
        }
    }
    for (yh, sum) in y.chunks_exact_mut(d).zip(sums) {
        let inv = 1.0 / sum;
        yh.iter_mut().for_each(|y| *y *= inv);
    }
    Ok(())
}

/// `Σ a·b` with eight independent partial sums, so that the portable path vectorises too.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        acc.iter_mut().zip(x.iter().zip(y)).for_each(|(s, (x, y))| *s += x * y);
    }
    acc.iter().sum::<f32>() + tail
}
