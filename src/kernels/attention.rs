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
pub const MAX_TILE_HEADS: usize = 4;

/// For each query head `r` of one group, `y_r = softmax(scale · q_r·Kᵀ) · V`: `q` and `y` hold
/// the group's heads one after another (`heads · d` values), `keys` and `values` hold `t` rows
/// of `d` values.
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f32, y: &mut [f32]) -> Result<()> {
    attend_with(Isa::best(), q, keys, values, d, scale, y)
}

/// [`attend`] on a chosen path (errors if this CPU lacks it); paths agree up to float
/// summation order.
pub fn attend_with(isa: Isa, q: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f32, y: &mut [f32]) -> Result<()> {
    if d == 0 || y.len() != q.len() {
        bail!("attention: heads of {d} values, query of {}, output of {}: the output must be as long as the query", q.len(), y.len())
    }
    let heads = q.len() / d;
    let mut part = vec![0f32; part_len(heads, d)];
    attend_part_with(isa, q, keys, values, d, scale, &mut part)?;
    combine_parts(&part, 1, d, y)
}

/// Values one [`attend_part`] writes for `heads` heads of `d` values: the unnormalised outputs,
/// then each head's largest score, then each head's `Σ e^(s − max)`.
pub fn part_len(heads: usize, d: usize) -> usize {
    heads * (d + 2)
}

/// Attention over some of the positions (flash-decoding's split): for each head `r`, with
/// scores `s_j = scale · q_r·k_j` over the `t` rows given and `m_r = max_j s_j`, writes
/// `Σ_j e^(s_j − m_r) · v_j`, then every `m_r`, then every `l_r = Σ_j e^(s_j − m_r)` into `part`
/// ([`part_len`] values). Parts over disjoint position ranges merge with [`combine_parts`].
pub fn attend_part(q: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f32, part: &mut [f32]) -> Result<()> {
    attend_part_with(Isa::best(), q, keys, values, d, scale, part)
}

/// [`attend_part`] on a chosen path (errors if this CPU lacks it).
pub fn attend_part_with(isa: Isa, q: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f32, part: &mut [f32]) -> Result<()> {
    let rows = |n: usize| d > 0 && n > 0 && n.is_multiple_of(d);
    if !rows(q.len()) || !rows(keys.len()) || values.len() != keys.len() || part.len() != part_len(q.len() / d.max(1), d) {
        bail!(
            "attention: heads of {d} values, query of {}, keys of {}, values of {}, output of {}: query, keys and values must be whole, non-empty numbers of rows, keys and values alike, the output {} values per head",
            q.len(),
            keys.len(),
            values.len(),
            part.len(),
            d + 2
        )
    }
    let kernels = super::Kernels::of(isa).map_err(|e| e.context("attention"))?;
    let (heads, t) = (q.len() / d, keys.len() / d);
    let (y, stats) = part.split_at_mut(heads * d);
    let (maxima, sums) = stats.split_at_mut(heads);
    // Scores, one row of t per head, in this thread's reused buffer (every value is written
    // before it is read).
    SCORES.with_borrow_mut(|p| {
        p.resize(heads * t, 0.0);
        scores_softmax_values(&kernels, q, keys, values, d, scale, t, &mut p[..heads * t], y, maxima, sums)
    });
    Ok(())
}

thread_local! {
    /// Each thread's score rows, grown to the largest `heads · t` it has seen.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The body of [`attend_part_with`] once its buffers are laid out: scores into `p`, softmax
/// numerators with each head's maximum and sum, then the weighted value rows into `y`.
#[allow(clippy::too_many_arguments)]
fn scores_softmax_values(
    kernels: &super::Kernels,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    d: usize,
    scale: f32,
    t: usize,
    p: &mut [f32],
    y: &mut [f32],
    maxima: &mut [f32],
    sums: &mut [f32],
) {
    for (qs, ps) in q.chunks(MAX_TILE_HEADS * d).zip(p.chunks_mut(MAX_TILE_HEADS * t)) {
        // SAFETY: qs holds 1 to MAX_TILE_HEADS whole heads of d, ps as many rows of t, keys t
        // rows of d.
        if !unsafe { kernels.attention_scores(qs, keys, d, scale, ps) } {
            for (qh, ph) in qs.chunks_exact(d).zip(ps.chunks_exact_mut(t)) {
                ph.iter_mut().zip(keys.chunks_exact(d)).for_each(|(p, k)| *p = scale * dot(qh, k));
            }
        }
    }
    // Softmax numerators e^(s − max) per head, their maximum and sum beside them.
    for ((ph, max), sum) in p.chunks_exact_mut(t).zip(maxima.iter_mut()).zip(sums.iter_mut()) {
        (*max, *sum) = kernels.softmax_numerators(ph);
    }
    for (ps, ys) in p.chunks(MAX_TILE_HEADS * t).zip(y.chunks_mut(MAX_TILE_HEADS * d)) {
        // SAFETY: ps holds 1 to MAX_TILE_HEADS whole rows of t, ys as many heads of d, values t
        // rows of d.
        if !unsafe { kernels.weighted_rows(ps, values, d, ys) } {
            for (ph, yh) in ps.chunks_exact(t).zip(ys.chunks_exact_mut(d)) {
                yh.fill(0.0);
                for (&w, v) in ph.iter().zip(values.chunks_exact(d)) {
                    yh.iter_mut().zip(v).for_each(|(y, v)| *y += w * v);
                }
            }
        }
    }
}

/// Merges `splits` [`attend_part`]s of the same heads over disjoint position ranges (stored one
/// after another in `parts`) into the normalised outputs `y`: per head, with `M = max_p m_p`,
/// `y = Σ_p e^(m_p − M) · y_p / Σ_p e^(m_p − M) · l_p` — softmax over all the positions.
pub fn combine_parts(parts: &[f32], splits: usize, d: usize, y: &mut [f32]) -> Result<()> {
    let heads = y.len() / d.max(1);
    if d == 0 || splits == 0 || y.len() != heads * d || parts.len() != splits * part_len(heads, d) {
        bail!("attention: {} part values cannot be {splits} parts of {heads} heads of {d} values", parts.len())
    }
    let each = || parts.chunks_exact(part_len(heads, d));
    for (h, yh) in y.chunks_exact_mut(d).enumerate() {
        let (max, sum) = (|p: &[f32]| p[heads * d + h], |p: &[f32]| p[heads * (d + 1) + h]);
        let top = each().fold(f32::NEG_INFINITY, |m, p| m.max(max(p)));
        let total: f32 = each().map(|p| (max(p) - top).exp() * sum(p)).sum();
        yh.fill(0.0);
        for p in each() {
            let w = (max(p) - top).exp() / total;
            yh.iter_mut().zip(&p[h * d..(h + 1) * d]).for_each(|(y, v)| *y += w * v);
        }
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
