//! The int8 and weight-only linear drivers: argument checks, the segment length (the run of
//! input channels that shares one activation and one weight scale), the split of the weight
//! blocks over the kernel team, and the scalar fallback for what a path's tiles cannot take.

use super::memory::{as_unfilled, assume_filled};
use super::operands::TileOperands;
use super::team::team_threads;
use super::tiles::BlockOutputs;
use super::{reference, team, Isa, Kernels, PackedInt8Weights, QuantizedActivations, BLOCK_ROWS};
use candle_core::{bail, Result};
use std::mem::MaybeUninit;

/// Below this many multiply-adds a linear runs on the calling thread only.
const PARALLEL_MIN_MACS: usize = 1 << 18;

fn check_linear(acts: &QuantizedActivations, weights: &PackedInt8Weights, bias: Option<&[f32]>, out: &[MaybeUninit<f32>]) -> Result<()> {
    let (m, k, n) = (acts.rows(), acts.cols(), weights.out_features());
    if k != weights.in_features() {
        bail!("int8 linear: activations have {k} columns but the weights expect {}", weights.in_features())
    }
    if out.len() != m * n {
        bail!("int8 linear: output buffer holds {} values, {m}×{n} needed", out.len())
    }
    if let Some(b) = bias {
        if b.len() != n {
            bail!("int8 linear: bias has {} values, {n} needed", b.len())
        }
    }
    if acts.zero_point() != 0 && acts.groups() != 1 {
        bail!("int8 linear: a non-zero activation zero point needs one group per row")
    }
    if acts.is_affine()
        && acts.groups() > 1
        && !(weights.has_group_sums() && weights.groups() > 1 && weights.group_size() == acts.group_size())
    {
        bail!(
            "int8 linear: affine activations in groups of {} need int8 weights in groups of the same size (at most {}), got groups of {}",
            acts.group_size(),
            super::MAX_SUMMED_GROUP,
            weights.group_size()
        )
    }
    segment(acts, weights).map(|_| ())
}

/// Whether the tiles add the affine activations' offsets themselves, segment by segment:
/// `o[i,g] · sw[n,g] · S[n,g]` needs the weight sums of each segment, which the weights keep
/// when their groups are the segments (or one group spans the row and so does the segment).
/// Other affine activations have one offset per row, added after the tiles as
/// `o[i] · Σ_k ŵ[n,k]`.
pub(super) fn offsets_in_tiles(acts: &QuantizedActivations, weights: &PackedInt8Weights) -> bool {
    acts.is_affine() && weights.has_group_sums() && (weights.groups() > 1 || acts.groups() == 1)
}

/// Length of the runs of input channels that share one activation scale and one weight scale.
fn segment(acts: &QuantizedActivations, weights: &PackedInt8Weights) -> Result<usize> {
    let (ga, gw) = (acts.groups() > 1, weights.groups() > 1);
    Ok(match (ga, gw) {
        (false, false) => acts.cols(),
        (true, false) => acts.group_size(),
        (false, true) => weights.group_size(),
        (true, true) if acts.group_size() == weights.group_size() => acts.group_size(),
        _ => bail!("int8 linear: activation groups of {} and weight groups of {} do not line up", acts.group_size(), weights.group_size()),
    })
}

/// `y = dequant(acts) · dequant(weights)ᵀ + bias` on the best path for this CPU.
/// `out` is `M×N` row-major.
pub fn int8_linear(acts: &QuantizedActivations, weights: &PackedInt8Weights, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    int8_linear_with(Isa::best(), acts, weights, bias, out)
}

/// Whether the SIMD tiles can walk these segments: whole rows, or whole quads of 4 channels
/// (int4: whole pairs of quads, which one load unpacks).
fn simd_segments(seg: usize, k: usize, weights: &PackedInt8Weights) -> bool {
    seg >= k || seg.is_multiple_of(if weights.bits() == 4 { 8 } else { 4 })
}

/// [`int8_linear`] on a chosen path (errors if this CPU lacks it).
pub fn int8_linear_with(
    isa: Isa,
    acts: &QuantizedActivations,
    weights: &PackedInt8Weights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    int8_linear_into(isa, acts, weights, bias, as_unfilled(out))
}

/// [`int8_linear_with`] into memory that need not hold values yet: on `Ok`, every value of
/// `out` is written (so a layer's output buffer is never zeroed first).
pub(crate) fn int8_linear_into(
    isa: Isa,
    acts: &QuantizedActivations,
    weights: &PackedInt8Weights,
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    check_linear(acts, weights, bias, out)?;
    if offsets_in_tiles(acts, weights) {
        // Made here, before the tasks that read them.
        weights.prepare_group_sums();
    }
    let kernels = Kernels::of(isa).map_err(|e| e.context("int8 linear"))?;
    let seg = segment(acts, weights)?;
    let kernels = if simd_segments(seg, acts.cols(), weights) { kernels } else { Kernels::PORTABLE };
    let fresh;
    let operands = match acts.tile_operands(kernels.isa(), seg, weights.bits(), || TileOperands::new(kernels.isa(), acts, weights, seg)) {
        Some(cached) => cached,
        None => {
            fresh = TileOperands::new(kernels.isa(), acts, weights, seg);
            &fresh
        }
    };
    let (m, n) = (acts.rows(), weights.out_features());
    let za = acts.zero_point();
    // One offset per row, added after the tiles (`offsets_in_tiles`).
    let row_offsets = acts.is_affine() && !offsets_in_tiles(acts, weights);
    let after_tiles = za != 0 || row_offsets;
    // Unless something is added after them, the tiles add the bias as they store (at large M
    // a task's outputs outgrow the cache before a second pass could add it); padded to whole
    // blocks.
    let padded_bias = bias.filter(|_| !after_tiles).map(|b| -> std::borrow::Cow<[f32]> {
        let width = weights.blocks() * BLOCK_ROWS;
        if b.len() == width {
            return b.into();
        }
        let mut padded = b.to_vec();
        padded.resize(width, 0.0);
        padded.into()
    });
    over_blocks(m, n, m * n * acts.cols(), out, |blocks, outs| {
        let op = operands.view(acts, weights, seg, padded_bias.as_deref(), offsets_in_tiles(acts, weights));
        // SAFETY: the operands were built for this path; seg passed simd_segments and
        // check_linear; blocks and outs come from over_blocks (M rows of 8·blocks.len() this
        // task alone writes).
        let tiles_ran = unsafe { kernels.int8_blocks(&op, blocks.clone(), outs) };
        if !tiles_ran {
            reference_blocks(acts, weights, seg, blocks.clone(), outs);
            add_outliers(acts, weights, blocks.clone(), outs);
        }
        let bias = bias.filter(|_| !(tiles_ran && op.bias.is_some()));
        if !after_tiles && bias.is_none() {
            return;
        }
        // The bias, and for an activation zero point `Σ_k (a − za)·w = Σ_k a·w − za·Σ_k w`
        // (a row offset: `Σ_k (sa·a + o)·w = sa·Σ_k a·w + o·Σ_k w`), on this task's columns
        // while they are in cache.
        let columns = blocks.start * BLOCK_ROWS..(blocks.end * BLOCK_ROWS).min(n);
        for i in 0..m {
            // SAFETY: row i's outputs of these blocks are this task's (over_blocks).
            let row = unsafe { outs.row(i, columns.len()) };
            if za != 0 {
                let shift = acts.row_scales(i)[0] * za as f32;
                row.iter_mut().zip(columns.clone()).for_each(|(y, j)| *y -= shift * weights.zero_point_term(j));
            }
            if row_offsets {
                let o = acts.row_offsets(i)[0];
                row.iter_mut().zip(columns.clone()).for_each(|(y, j)| *y += o * weights.zero_point_term(j));
            }
            if let Some(b) = bias {
                row.iter_mut().zip(&b[columns.clone()]).for_each(|(y, b)| *y += b);
            }
        }
    });
    Ok(())
}

/// `(output channel j, its column in a blocks' scratch buffer)` for the real (unpadded)
/// channels of `blocks`.
fn block_columns(blocks: &std::ops::Range<usize>, n: usize) -> impl Iterator<Item = (usize, usize)> {
    let first = blocks.start * BLOCK_ROWS;
    (first..(blocks.end * BLOCK_ROWS).min(n)).map(move |j| (j, j - first))
}

/// Splits the weight blocks into ranges and runs `f(blocks, outs)` on each — on the kernel team
/// ([`team::run`], candle's thread count) when there is enough work (`macs` multiply-adds) —
/// with `outs` the `M` rows of `8·blocks.len()` outputs that task alone writes. With `N` a
/// multiple of 8 they are the range's columns of `out` (`M×N`) itself; otherwise each range
/// writes a scratch buffer whose real columns are copied over.
fn over_blocks(m: usize, n: usize, macs: usize, out: &mut [MaybeUninit<f32>], f: impl Fn(std::ops::Range<usize>, BlockOutputs) + Sync) {
    let total = n.div_ceil(BLOCK_ROWS);
    let threads = team_threads(macs >= PARALLEL_MIN_MACS);
    // One task per thread for a single row (each task is a short stream of weights); several
    // per thread for more rows, so that a thread slowed by a neighbour does not hold up the rest.
    let per_task = match (threads, m) {
        (1, _) => total,
        (_, 1) => total.div_ceil(threads),
        _ => total.div_ceil(threads * 4).clamp(1, 32),
    };
    let ranges: Vec<_> = (0..total.div_ceil(per_task)).map(|t| t * per_task..((t + 1) * per_task).min(total)).collect();
    if n.is_multiple_of(BLOCK_ROWS) {
        let outs = BlockOutputs::new(out.as_mut_ptr().cast(), n);
        // Ranges are disjoint, so each task writes columns no other task touches.
        return team::run(ranges.len(), threads, &|t| f(ranges[t].clone(), outs.skip_blocks(ranges[t].start)));
    }
    // Range r's scratch follows those of the ranges before it: M·8·r.start floats in.
    let mut scratch = vec![0f32; m * BLOCK_ROWS * total];
    let whole = BlockOutputs::new(scratch.as_mut_ptr(), m * BLOCK_ROWS);
    let part = |r: &std::ops::Range<usize>| BlockOutputs::new(whole.at(r.start, 0), BLOCK_ROWS * r.len());
    team::run(ranges.len(), threads, &|t| f(ranges[t].clone(), part(&ranges[t])));
    for blocks in &ranges {
        let start = blocks.start * BLOCK_ROWS;
        let width = (blocks.end * BLOCK_ROWS).min(n) - start;
        let (from, row_len) = (m * BLOCK_ROWS * blocks.start, BLOCK_ROWS * blocks.len());
        for i in 0..m {
            let (to, row) = (&mut out[i * n + start..i * n + start + width], &scratch[from + i * row_len..from + i * row_len + width]);
            to.iter_mut().zip(row).for_each(|(y, &v)| _ = y.write(v));
        }
    }
}

/// Scalar [`x86::int8_blocks`]: `Σ_g sa · sw · dot_g` per output (plus `o · sw · S_g` for
/// offsets the tiles would add), from the reference dot product.
fn reference_blocks(
    acts: &QuantizedActivations,
    weights: &PackedInt8Weights,
    seg: usize,
    blocks: std::ops::Range<usize>,
    outs: BlockOutputs,
) {
    let (k, n) = (acts.cols(), weights.out_features());
    let (a_step, w_step) = ((acts.groups() > 1) as usize, (weights.groups() > 1) as usize);
    let offsets = offsets_in_tiles(acts, weights);
    for i in 0..acts.rows() {
        let (row, sa, o) = (acts.row(i), acts.row_scales(i), acts.row_offsets(i));
        for (j, col) in block_columns(&blocks, n) {
            let (w, sw) = (weights.row(j), weights.row_scales(j));
            let mut acc = 0f32;
            for g in 0..k.div_ceil(seg) {
                let r = g * seg..((g + 1) * seg).min(k);
                acc += sa[g * a_step] * sw[g * w_step] * reference::dot_i8(&row[r.clone()], &w[r]) as f32;
                if offsets {
                    acc += o[g * a_step] * weights.group_term(j, g * w_step);
                }
            }
            // SAFETY: row i's outputs of these blocks are the caller's task's alone.
            unsafe { outs.write(i, col, acc) };
        }
    }
}

/// Adds `Σ x[c] · ŵ[n,c]` over the float outliers of each activation row (`ŵ = q · sw`) to the
/// outputs of `blocks` (the SIMD tiles do this themselves, vectorised).
fn add_outliers(acts: &QuantizedActivations, weights: &PackedInt8Weights, blocks: std::ops::Range<usize>, outs: BlockOutputs) {
    let group = weights.group_size();
    for i in 0..acts.rows() {
        // SAFETY: row i's outputs of these blocks are the caller's task's alone.
        let out = unsafe { outs.row(i, BLOCK_ROWS * blocks.len()) };
        for &(c, x) in acts.row_outliers(i) {
            let c = c as usize;
            for (j, col) in block_columns(&blocks, weights.out_features()) {
                out[col] += x * weights.value(j, c) as f32 * weights.scale(j, c / group);
            }
        }
    }
}

/// Exact integer sums `Σ_{k∈g} qa[i,k]·qw[j,k]` of every segment, `[M][N][segments]`, from the
/// chosen path's own tiles (tests compare paths on this).
pub fn group_sums_with(isa: Isa, acts: &QuantizedActivations, weights: &PackedInt8Weights) -> Result<Vec<i32>> {
    let kernels = Kernels::of(isa)?;
    if acts.cols() != weights.in_features() {
        bail!("group sums: activations have {} columns but the weights expect {}", acts.cols(), weights.in_features())
    }
    let (seg, k, m, n) = (segment(acts, weights)?, acts.cols(), acts.rows(), weights.out_features());
    let segs = k.div_ceil(seg);
    if simd_segments(seg, k, weights) {
        let operands = TileOperands::new(isa, acts, weights, seg);
        let op = operands.view(acts, weights, seg, None, false);
        let n_pad = weights.blocks() * BLOCK_ROWS;
        let mut sums = vec![0i32; m * n_pad * segs];
        // SAFETY: the operands were built for this path; seg passed simd_segments; sums holds
        // M · N_pad · segments values.
        if unsafe { kernels.int8_segment_sums(&op, &mut sums) } {
            debug_assert_eq!(op.segments().0, segs);
            return Ok(unpad_sums(&sums, m, n, n_pad, segs));
        }
    }
    Ok((0..m)
        .flat_map(|i| {
            let a = acts.row(i).to_vec();
            (0..n).flat_map(move |j| {
                let w = weights.row(j);
                (0..segs)
                    .map(|g| reference::dot_i8(&a[g * seg..((g + 1) * seg).min(k)], &w[g * seg..((g + 1) * seg).min(k)]))
                    .collect::<Vec<_>>()
            })
        })
        .collect())
}

/// The sums of the real outputs from `[M][N_pad][segments]` tile sums.
fn unpad_sums(sums: &[i32], m: usize, n: usize, n_pad: usize, segs: usize) -> Vec<i32> {
    (0..m).flat_map(|i| sums[i * n_pad * segs..(i * n_pad + n) * segs].to_vec()).collect()
}

/// `y = x · dequant(weights)ᵀ + bias` with float activations (weight-only int8).
pub fn weight_only_linear(x: &[f32], m: usize, weights: &PackedInt8Weights, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    weight_only_linear_with(Isa::best(), x, m, weights, bias, out)
}

/// [`weight_only_linear`] on a chosen path (errors if this CPU lacks it).
pub fn weight_only_linear_with(
    isa: Isa,
    x: &[f32],
    m: usize,
    weights: &PackedInt8Weights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    weight_only_linear_into(isa, x, m, weights, bias, as_unfilled(out))
}

/// [`weight_only_linear_with`] into memory that need not hold values yet: on `Ok`, every value
/// of `out` is written.
pub(crate) fn weight_only_linear_into(
    isa: Isa,
    x: &[f32],
    m: usize,
    weights: &PackedInt8Weights,
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    let (k, n) = (weights.in_features(), weights.out_features());
    if x.len() != m * k || out.len() != m * n {
        bail!("weight-only linear: {} inputs / {} outputs do not fit {m}×{k} → {m}×{n}", x.len(), out.len())
    }
    if let Some(b) = bias {
        if b.len() != n {
            bail!("weight-only linear: bias has {} values, {n} needed", b.len())
        }
    }
    let kernels = Kernels::of(isa).map_err(|e| e.context("weight-only linear"))?;
    let kernels = if simd_segments(weights.group_size(), k, weights) { kernels } else { Kernels::PORTABLE };
    let stride = weights.padded_in_features();
    let padded: Vec<f32> = if kernels.isa() == Isa::Reference {
        Vec::new()
    } else {
        x.chunks(k).flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0.0, stride - k))).collect()
    };
    over_blocks(m, n, m * n * k, out, |blocks, outs| {
        // SAFETY: `padded` holds M rows of `stride` floats whenever the path has vector tiles;
        // the group size passed simd_segments; outs has M rows of 8·blocks.len() this task alone
        // writes (over_blocks).
        if !unsafe { kernels.weight_only_blocks(&padded, m, weights, blocks.clone(), outs) } {
            let g = weights.group_size();
            for (i, row) in x.chunks(k).enumerate() {
                for (j, col) in block_columns(&blocks, n) {
                    let (w, sw) = (weights.row(j), weights.row_scales(j));
                    let y = row.chunks(g).zip(w.chunks(g)).zip(&sw).map(|((x, w), s)| s * reference::dot_f32_i8(x, w)).sum();
                    // SAFETY: as above.
                    unsafe { outs.write(i, col, y) };
                }
            }
        }
    });
    if let Some(b) = bias {
        // SAFETY: over_blocks had every output of every block written.
        let out = unsafe { assume_filled(out) };
        for y in out.chunks_mut(n) {
            y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
    }
    Ok(())
}
