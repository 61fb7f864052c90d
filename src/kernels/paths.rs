//! One table of kernels per instruction-set path, chosen once per call ([`Kernels::of`]) instead
//! of a `match` on the [`Isa`] at every use.
//!
//! A table is only ever built for a path this CPU supports, which is what lets its methods call
//! target-feature code: the feature half of every kernel's safety contract is settled when the
//! table is made, so the methods are safe where the kernel's other preconditions are checked
//! here, and `unsafe` only where the caller must vouch for more (operands matching each other).

#[cfg(target_arch = "aarch64")]
use super::arm;
use super::tiles::{BlockOutputs, Int8Operands};
#[cfg(target_arch = "x86_64")]
use super::{x86, x86_attention};
use super::{Isa, PackedInt8Weights};
use candle_core::{bail, Result};
use std::ops::Range;

type AbsMax = unsafe fn(&[f32]) -> (f32, bool);
type QuantizeSymmetric = unsafe fn(&[f32], f32, &mut [i8]);
type GroupAbsMax = unsafe fn(&[f32], usize, &mut [f32]) -> bool;
type QuantizeGroups = unsafe fn(&[f32], usize, &[f32], &mut [i8]);
type Int8Blocks = unsafe fn(&Int8Operands, Range<usize>, BlockOutputs);
type SegmentSums = unsafe fn(&Int8Operands, &mut [i32]);
type WeightOnlyBlocks = unsafe fn(&[f32], usize, &PackedInt8Weights, Range<usize>, BlockOutputs);
type AttentionScores = unsafe fn(&[f32], &[f32], usize, f32, &mut [f32]);
type WeightedRows = unsafe fn(&[f32], &[f32], usize, &mut [f32]);
type SiluMul = unsafe fn(&[f32], &[f32], &mut [std::mem::MaybeUninit<f32>]);
type SoftmaxNumerators = unsafe fn(&mut [f32]) -> (f32, f32);
type SumsOfSquares = unsafe fn(&[f32], usize, &mut [f32]);
type SumsAndSquares = unsafe fn(&[f32], usize, &mut [f32], &mut [f32]);
type QuantizeRowGroups32 = unsafe fn(&[f32], f32, &mut [f32], &mut [i8], &mut Vec<usize>) -> bool;
type Int4Levels = unsafe fn(&[f32], Option<&[f32]>, f32, (f32, f32), &mut [f32]) -> [f32; 8];

/// The vector kernels of one supported path; `None` where it has none (the portable code runs).
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    isa: Isa,
    abs_max: Option<AbsMax>,
    quantize_symmetric: Option<QuantizeSymmetric>,
    group_abs_max: Option<GroupAbsMax>,
    quantize_groups: Option<QuantizeGroups>,
    int8_blocks: Option<Int8Blocks>,
    int8_segment_sums: Option<SegmentSums>,
    weight_only_blocks: Option<WeightOnlyBlocks>,
    attention_scores: Option<AttentionScores>,
    softmax_numerators: Option<SoftmaxNumerators>,
    weighted_rows: Option<WeightedRows>,
    gelu_erf: Option<unsafe fn(&mut [f32])>,
    silu_mul: Option<SiluMul>,
    sums_of_squares: Option<SumsOfSquares>,
    sums_and_squares: Option<SumsAndSquares>,
    quantize_row_groups32: Option<QuantizeRowGroups32>,
    int4_levels: Option<Int4Levels>,
    /// Whether the int8 tiles also read int4 weights (x86, NEON); the others leave int4 layers
    /// to the portable code.
    int4_tiles: bool,
    /// Whether the weight-only tiles also read int4 weights (x86, NEON).
    int4_weight_only: bool,
}

/// The NEON int8 tiles without and with `sdot`, in the table's shape.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::*;

    /// # Safety
    /// As [`arm::int8_blocks`] without `dot`.
    pub unsafe fn int8_blocks(op: &Int8Operands, blocks: Range<usize>, out: BlockOutputs) {
        // SAFETY: the caller's contract is `arm::int8_blocks`'.
        unsafe { arm::int8_blocks(op, false, blocks, out) }
    }
    /// # Safety
    /// As [`arm::int8_blocks`] with `dot`.
    pub unsafe fn int8_blocks_dot(op: &Int8Operands, blocks: Range<usize>, out: BlockOutputs) {
        // SAFETY: the caller's contract is `arm::int8_blocks`'.
        unsafe { arm::int8_blocks(op, true, blocks, out) }
    }
    /// # Safety
    /// As [`arm::int8_segment_sums`] without `dot`.
    pub unsafe fn int8_segment_sums(op: &Int8Operands, sums: &mut [i32]) {
        // SAFETY: the caller's contract is `arm::int8_segment_sums`'.
        unsafe { arm::int8_segment_sums(op, false, sums) }
    }
    /// # Safety
    /// As [`arm::int8_segment_sums`] with `dot`.
    pub unsafe fn int8_segment_sums_dot(op: &Int8Operands, sums: &mut [i32]) {
        // SAFETY: the caller's contract is `arm::int8_segment_sums`'.
        unsafe { arm::int8_segment_sums(op, true, sums) }
    }
}

impl Kernels {
    /// The portable path: no vector kernels.
    pub const PORTABLE: Kernels = Kernels {
        isa: Isa::Reference,
        abs_max: None,
        quantize_symmetric: None,
        group_abs_max: None,
        quantize_groups: None,
        int8_blocks: None,
        int8_segment_sums: None,
        weight_only_blocks: None,
        attention_scores: None,
        softmax_numerators: None,
        weighted_rows: None,
        gelu_erf: None,
        silu_mul: None,
        sums_of_squares: None,
        sums_and_squares: None,
        quantize_row_groups32: None,
        int4_levels: None,
        int4_tiles: false,
        int4_weight_only: false,
    };

    /// The table of `isa`; an error naming the path when this CPU cannot run it.
    pub fn of(isa: Isa) -> Result<Kernels> {
        if !isa.is_supported() {
            bail!("this CPU cannot run the {isa:?} kernels (it has {:?})", Isa::supported())
        }
        Ok(Self::table(isa))
    }

    /// The table of the path every layer uses ([`Isa::best`], supported by construction).
    pub fn best() -> Kernels {
        Self::table(Isa::best())
    }

    /// Only for a supported `isa`.
    fn table(isa: Isa) -> Kernels {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::VnniOnAvx2 | Isa::AvxVnni | Isa::Avx512Vnni => {
                let (blocks, sums): (Int8Blocks, SegmentSums) = match isa {
                    Isa::VnniOnAvx2 => (x86::vnni_on_avx2::int8_blocks, x86::vnni_on_avx2::int8_segment_sums),
                    Isa::AvxVnni => (x86::avx_vnni::int8_blocks, x86::avx_vnni::int8_segment_sums),
                    Isa::Avx512Vnni => (x86::avx512_vnni::int8_blocks, x86::avx512_vnni::int8_segment_sums),
                    _ => (x86::maddubs::int8_blocks, x86::maddubs::int8_segment_sums),
                };
                Kernels {
                    isa,
                    abs_max: Some(x86::abs_max),
                    quantize_symmetric: Some(x86::quantize_symmetric),
                    group_abs_max: Some(x86::group_abs_max),
                    quantize_groups: Some(x86::quantize_groups),
                    int8_blocks: Some(blocks),
                    int8_segment_sums: Some(sums),
                    weight_only_blocks: Some(x86::weight_only_blocks),
                    attention_scores: Some(if isa == Isa::Avx512Vnni {
                        x86_attention::avx512::attention_scores
                    } else {
                        x86_attention::avx2::attention_scores
                    }),
                    softmax_numerators: Some(x86::softmax_numerators),
                    weighted_rows: Some(if isa == Isa::Avx512Vnni {
                        x86_attention::avx512::weighted_rows
                    } else {
                        x86_attention::avx2::weighted_rows
                    }),
                    gelu_erf: Some(x86::gelu_erf),
                    silu_mul: Some(x86::silu_mul),
                    sums_of_squares: Some(x86::sums_of_squares),
                    sums_and_squares: Some(x86::sums_and_squares),
                    quantize_row_groups32: Some(x86::quantize_row_groups32),
                    int4_levels: Some(x86::int4_levels),
                    int4_tiles: true,
                    int4_weight_only: true,
                }
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon | Isa::NeonDot => {
                let dot = isa == Isa::NeonDot;
                Kernels {
                    isa,
                    abs_max: Some(arm::abs_max),
                    quantize_symmetric: Some(arm::quantize_symmetric),
                    int8_blocks: Some(if dot { neon::int8_blocks_dot } else { neon::int8_blocks }),
                    int8_segment_sums: Some(if dot { neon::int8_segment_sums_dot } else { neon::int8_segment_sums }),
                    weight_only_blocks: Some(arm::weight_only_blocks),
                    int4_tiles: true,
                    int4_weight_only: true,
                    ..Self::PORTABLE
                }
            }
            _ => Kernels { isa, ..Self::PORTABLE },
        }
    }

    /// Whether this path's int8 tiles (or with `weight_only` its weight-only tiles) read these
    /// weights' bits.
    fn reads(&self, weights: &PackedInt8Weights, weight_only: bool) -> bool {
        weights.bits() == 8 || if weight_only { self.int4_weight_only } else { self.int4_tiles }
    }

    /// The path this table is for.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `(max |x|, whether every value is finite)`.
    pub fn abs_max(&self, x: &[f32]) -> (f32, bool) {
        match self.abs_max {
            // SAFETY: the table's path is supported; the kernel reads `x` only.
            Some(f) => unsafe { f(x) },
            // `f32::max` skips NaN, so NaN is caught by the probe (NaN·0 = NaN, ±Inf·0 = NaN).
            None => x.iter().fold((0f32, true), |(a, f), v| (a.max(v.abs()), f && (v * 0.0) == 0.0)),
        }
    }

    /// `q[i] = round_half_even(clamp(x[i] · inv, −127, 127))`, bit for bit the scalar
    /// [`crate::quant::quantize_value`] with zero point 0, for finite `x` (a non-finite value
    /// gives an unspecified byte). Only the first `x.len()` bytes of `q` are written.
    pub fn quantize_symmetric(&self, x: &[f32], inv: f32, q: &mut [i8]) {
        assert!(q.len() >= x.len(), "quantizer: {} outputs for {} inputs", q.len(), x.len());
        match self.quantize_symmetric {
            // SAFETY: the table's path is supported; `q` is long enough (asserted).
            Some(f) => unsafe { f(x, inv, q) },
            None => q.iter_mut().zip(x).for_each(|(q, &v)| *q = crate::quant::quantize_value(v, inv, 0, -127, 127) as i8),
        }
    }

    /// [`Self::abs_max`] of each run of `group` values of `x` into `amax`, one per run; whether
    /// every value is finite.
    pub fn group_abs_max(&self, x: &[f32], group: usize, amax: &mut [f32]) -> bool {
        assert!(group > 0 && amax.len() >= x.len().div_ceil(group), "abs max: {} outputs for runs of {group} in {}", amax.len(), x.len());
        match self.group_abs_max {
            // SAFETY: the table's path is supported; the kernel reads `x` and writes `amax` only.
            Some(f) => unsafe { f(x, group, amax) },
            None => x.chunks(group).zip(amax).fold(true, |finite, (xg, a)| {
                let (m, f) = self.abs_max(xg);
                *a = m;
                finite & f
            }),
        }
    }

    /// [`Self::quantize_symmetric`] of each run of `group` values of `x` with its own `inv[g]`.
    pub fn quantize_groups(&self, x: &[f32], group: usize, inv: &[f32], q: &mut [i8]) {
        assert!(
            group > 0 && q.len() >= x.len() && inv.len() >= x.len().div_ceil(group),
            "quantizer: {} outputs and {} scales for runs of {group} in {}",
            q.len(),
            inv.len(),
            x.len()
        );
        match self.quantize_groups {
            // SAFETY: the table's path is supported; `q` and `inv` are long enough (asserted).
            Some(f) => unsafe { f(x, group, inv, q) },
            None => x.chunks(group).zip(q.chunks_mut(group)).zip(inv).for_each(|((xg, qg), &i)| self.quantize_symmetric(xg, i, qg)),
        }
    }

    /// The path's int8 tiles over `blocks` into `out`; `false` (nothing done) when it has none.
    ///
    /// # Safety
    /// As the tiles' `int8_blocks`: `op`'s operands built for this path (`x86_operands`), `op.seg`
    /// `K` or a multiple of 4 matching the grouped side(s), `blocks` within the weights' blocks,
    /// `out` with `M` writable rows of `8·blocks.len()` floats that nothing else accesses meanwhile.
    pub unsafe fn int8_blocks(&self, op: &Int8Operands, blocks: Range<usize>, out: BlockOutputs) -> bool {
        let Some(f) = self.int8_blocks.filter(|_| self.reads(op.weights, false)) else { return false };
        // SAFETY: the path is supported; the rest is the caller's contract.
        unsafe { f(op, blocks, out) };
        true
    }

    /// The exact `i32` sums of every segment by the path's tiles; `false` when it has none.
    ///
    /// # Safety
    /// As [`Self::int8_blocks`] over all blocks; `sums` holds `M · N_pad · segments` values.
    pub unsafe fn int8_segment_sums(&self, op: &Int8Operands, sums: &mut [i32]) -> bool {
        let Some(f) = self.int8_segment_sums.filter(|_| self.reads(op.weights, false)) else { return false };
        // SAFETY: the path is supported; the rest is the caller's contract.
        unsafe { f(op, sums) };
        true
    }

    /// The path's weight-only tiles; `false` when it has none.
    ///
    /// # Safety
    /// `x` holds `m` rows of the weights' padded input width; the group size passed
    /// `simd_segments`; `blocks` within the weights' blocks; `out` has `m` writable rows of `8·blocks.len()`
    /// floats that nothing else accesses meanwhile.
    pub unsafe fn weight_only_blocks(
        &self,
        x: &[f32],
        m: usize,
        weights: &PackedInt8Weights,
        blocks: Range<usize>,
        out: BlockOutputs,
    ) -> bool {
        let Some(f) = self.weight_only_blocks.filter(|_| self.reads(weights, true)) else { return false };
        // SAFETY: the path is supported; the rest is the caller's contract.
        unsafe { f(x, m, weights, blocks, out) };
        true
    }

    /// Vector attention scores `p[h, j] = scale · q_h·k_j`; `false` when the path has none.
    ///
    /// # Safety
    /// `q` holds whole heads of `d` (at most `MAX_TILE_HEADS`), `keys` rows of `d`, `p` one row of
    /// `keys.len() / d` per head.
    pub unsafe fn attention_scores(&self, q: &[f32], keys: &[f32], d: usize, scale: f32, p: &mut [f32]) -> bool {
        let Some(f) = self.attention_scores else { return false };
        // SAFETY: the path is supported; the rest is the caller's contract.
        unsafe { f(q, keys, d, scale, p) };
        true
    }

    /// Softmax numerators of a row of scores in place: with `m = max p`, `p ← e^(p − m)`;
    /// returns `(m, Σ p)`.
    pub fn softmax_numerators(&self, p: &mut [f32]) -> (f32, f32) {
        match self.softmax_numerators {
            // SAFETY: the table's path is supported; the kernel stays within `p`.
            Some(f) => unsafe { f(p) },
            None => {
                let max = p.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                p.iter_mut().for_each(|s| *s = (*s - max).exp());
                (max, p.iter().sum())
            }
        }
    }

    /// Vector weighted sums of value rows; `false` when the path has none.
    ///
    /// # Safety
    /// `w` holds whole rows of `values.len() / d` weights (at most `MAX_TILE_HEADS`), `y` as many
    /// heads of `d`.
    pub unsafe fn weighted_rows(&self, w: &[f32], values: &[f32], d: usize, y: &mut [f32]) -> bool {
        let Some(f) = self.weighted_rows else { return false };
        // SAFETY: the path is supported; the rest is the caller's contract.
        unsafe { f(w, values, d, y) };
        true
    }

    /// `out = silu(gate) · up`; `false` (nothing done) when the path has no vector version.
    /// Lengths are the caller's to match (checked by [`super::silu_mul`]).
    pub fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) -> bool {
        let Some(f) = self.silu_mul else { return false };
        assert!(gate.len() == up.len() && out.len() == gate.len(), "silu_mul: lengths differ");
        // SAFETY: the table's path is supported; the three slices have the same length.
        unsafe { f(gate, up, out) };
        true
    }

    /// `sums[r] = Σ_j x[r·n + j]²` for every row `r` of `n` values, each added in order (`x·x`
    /// rounded, then added), as the portable loop does.
    pub fn sums_of_squares(&self, x: &[f32], n: usize, sums: &mut [f32]) {
        assert!(n > 0 && x.len() == n * sums.len(), "sums of squares: {} values are not {} rows of {n}", x.len(), sums.len());
        match self.sums_of_squares {
            // SAFETY: the table's path is supported; x holds sums.len() rows of n.
            Some(f) => unsafe { f(x, n, sums) },
            None => x.chunks_exact(n).zip(sums).for_each(|(row, s)| *s = row.iter().map(|&v| v * v).sum()),
        }
    }

    /// `sums[r] = Σ_j x[r·n + j]` and `squares[r] = Σ_j x[r·n + j]²` for every row of `n`
    /// values, each added in order as the portable loop (and candle's LayerNorm) does.
    pub fn sums_and_squares(&self, x: &[f32], n: usize, sums: &mut [f32], squares: &mut [f32]) {
        assert!(
            n > 0 && x.len() == n * sums.len() && sums.len() == squares.len(),
            "row sums: {} values are not {} rows of {n}",
            x.len(),
            sums.len()
        );
        match self.sums_and_squares {
            // SAFETY: the table's path is supported; x holds sums.len() rows of n.
            Some(f) => unsafe { f(x, n, sums, squares) },
            None => {
                for ((row, s), s2) in x.chunks_exact(n).zip(sums).zip(squares) {
                    let (mut sum, mut sum2) = (0f32, 0f32);
                    for &v in row {
                        sum += v;
                        sum2 += v * v;
                    }
                    (*s, *s2) = (sum, sum2);
                }
            }
        }
    }

    /// The dynamic quantizer's single pass over a row in groups of 32 (see
    /// [`x86::quantize_row_groups32`]): `None` when the path has none (the caller then takes
    /// the group maxima and the values in two passes), else whether every value is finite.
    pub fn quantize_row_groups32(&self, x: &[f32], limit: f32, scales: &mut [f32], q: &mut [i8], above: &mut Vec<usize>) -> Option<bool> {
        let f = self.quantize_row_groups32?;
        assert!(
            x.len().is_multiple_of(32) && scales.len() >= x.len() / 32 && q.len() >= x.len(),
            "quantizer: groups of 32 over {} values",
            x.len()
        );
        // SAFETY: the table's path is supported; the lengths are asserted above.
        Some(unsafe { f(x, limit, scales, q, above) })
    }

    /// The eight-lane part of the int4 grid search (see [`x86::int4_levels`]) for scale `s`
    /// and level bounds `(lo, hi)`, with importances `h` or none: `None` when the path has no
    /// vector version (the caller then runs the portable lanes).
    pub fn int4_levels(&self, w: &[f32], h: Option<&[f32]>, s: f32, bounds: (f32, f32), q: &mut [f32]) -> Option<[f32; 8]> {
        let f = self.int4_levels?;
        assert!(
            w.len().is_multiple_of(8) && q.len() >= w.len() && h.is_none_or(|h| h.len() >= w.len()),
            "int4 grid search: {} weights, {} levels, {:?} importances",
            w.len(),
            q.len(),
            h.map(<[f32]>::len)
        );
        // SAFETY: the table's path is supported; the lengths are asserted above.
        Some(unsafe { f(w, h, s, bounds, q) })
    }

    /// Exact GELU in place; `false` (nothing done) when the path has no vector version.
    pub fn gelu_erf(&self, x: &mut [f32]) -> bool {
        let Some(f) = self.gelu_erf else { return false };
        // SAFETY: the table's path is supported; the kernel stays within `x`.
        unsafe { f(x) };
        true
    }
}
