//! Attention of one sequence on f32 CPU storage, shared by the models' fast (non-training)
//! paths: every query row against just the keys it may see — causal prefixes for a decoder,
//! a sentence's own tokens in a padded encoder batch — so no mask is built and no masked score
//! is computed. The arithmetic is the kernels' ([`kernels::attend_part`]).

use crate::kernels;
use candle_core::{bail, Result};
use std::ops::Range;

/// Cached values (`heads · t · d · rows`) from which attention is split over threads.
const PARALLEL_MIN: usize = 1 << 15;

/// The keys and values of one key/value head: rows of `d` values, as many of each.
pub(crate) struct HeadRows<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
}

/// `y[i, h·d..(h+1)·d] = softmax(scale · q_{h,i} · K_gᵀ) · V_g` over the key rows `visible[i]`,
/// for every query row `i < s = visible.len()` and head `h`, whose key/value head is `g = h / rep` with
/// `rep = heads / kv.len()` (grouped-query attention: the `rep` heads of a group read each key
/// and value row once for all of them). `q` and `y` are `[s, heads·d]` (a projection's output
/// rows: head `h` of row `i` at `(i·heads + h)·d`).
///
/// Every (row, group) is a task of the kernel team; a single row (decoding) is also cut into
/// ranges of keys (flash-decoding: each part keeps its own softmax maximum and sum, merged
/// after) once the keys are many enough to outweigh the hand-off, into as many ranges as it
/// takes for the parts to share out evenly over the threads (3 groups on 2 threads: 6 parts,
/// not 2 : 1).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_sequence(
    q: &[f32],
    d: usize,
    kv: &[HeadRows],
    heads: usize,
    scale: f32,
    visible: &[Range<usize>],
    y: &mut [f32],
) -> Result<()> {
    let (s, groups) = (visible.len(), kv.len());
    if s == 0 || groups == 0 || !heads.is_multiple_of(groups) || q.len() != heads * s * d || y.len() != q.len() {
        bail!(
            "attention: {heads} heads of {d} over {s} rows do not fit {groups} key/value heads, a query of {} and an output of {}",
            q.len(),
            y.len()
        )
    }
    let rep = heads / groups;
    for (i, r) in visible.iter().enumerate() {
        if r.is_empty() || kv.iter().any(|h| h.keys.len() < r.end * d || h.values.len() < r.end * d) {
            bail!("attention: query row {i} sees keys {r:?}, beyond the {} rows held", kv[0].keys.len() / d.max(1))
        }
    }
    let work = heads * d * visible.iter().map(|r| r.len()).sum::<usize>();
    let parallel = work >= PARALLEL_MIN;
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let splits = if s > 1 { 1 } else { (1..=threads).find(|n| (groups * n).is_multiple_of(threads)).unwrap_or(1).min(visible[0].len()) };
    // Rows that see the same keys go through the kernel together, up to its tile of query
    // heads, so that each key and value row is read once for all of them.
    let block =
        if rep < kernels::MAX_TILE_HEADS && visible.iter().all(|r| *r == visible[0]) { (kernels::MAX_TILE_HEADS / rep).min(s) } else { 1 };
    let blocks = s.div_ceil(block);
    let part_len = kernels::part_len(block * rep, d);
    let mut parts = vec![0f32; blocks * groups * splits * part_len];
    kernels::try_parallel_for_parts(parts.chunks_mut(part_len).collect(), parallel, |task, part| {
        let (ib, g, split) = (task / (groups * splits), task / splits % groups, task % splits);
        let rows_i = ib * block..((ib + 1) * block).min(s);
        let keys = visible[rows_i.start].clone();
        let rows = keys.start + split * keys.len() / splits..keys.start + (split + 1) * keys.len() / splits;
        let at = rows.start * d..rows.end * d;
        // The group's query heads at each row of the block, one after another: one row's are
        // already side by side; a block's are gathered (a short last block repeats its last
        // row, whose result is not used).
        let heads_of = |i: usize| &q[(i * heads + g * rep) * d..(i * heads + (g + 1) * rep) * d];
        let mut gathered = Vec::new();
        let qg = if block == 1 {
            heads_of(rows_i.start)
        } else {
            gathered.reserve(block * rep * d);
            for i in rows_i.start..rows_i.start + block {
                gathered.extend_from_slice(heads_of(i.min(s - 1)));
            }
            &gathered
        };
        kernels::attend_part(qg, &kv[g].keys[at.clone()], &kv[g].values[at], d, scale, part)
    })?;
    // Output rows hold their heads in order: group g's heads are the g-th run of rep·d values.
    let mut out = vec![0f32; block * rep * d];
    for (task, split_parts) in parts.chunks(splits * part_len).enumerate() {
        let (ib, g) = (task / groups, task % groups);
        kernels::combine_parts(split_parts, splits, d, &mut out)?;
        for (r, i) in (ib * block..((ib + 1) * block).min(s)).enumerate() {
            y[i * heads * d + g * rep * d..i * heads * d + (g + 1) * rep * d].copy_from_slice(&out[r * rep * d..(r + 1) * rep * d]);
        }
    }
    Ok(())
}
