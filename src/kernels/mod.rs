//! Int8 matrix kernels behind one entry point per operation: a scalar reference (the ground
//! truth, never deleted) and SIMD versions chosen once at run time from the CPU's features:
//! AVX2 on x86_64 (`x86.rs`), NEON with or without `sdot` on aarch64 (`arm.rs`), both over the
//! same packed weights (`weights.rs`) and tile plumbing (`tiles.rs`). Decoding attention
//! (`attention.rs`, float) lives here too: it runs between int8 layers on the same team and the
//! same run-time choice of instructions.
//!
//! The maths of the fused int8 linear, for activations quantized per `(row m, group g)` with
//! scale `sa[m,g]` and one zero point `za`, and weights per `(output channel n, group g)` with
//! scale `sw[n,g]` and zero point 0 (either side may have a single group per row):
//!
//! `y[m,n] = Σ_g sa[m,g] · sw[n,g] · (Σ_{k∈g} qa[m,k]·qw[n,k] − za·Σ_{k∈g} qw[n,k]) + bias[n]`
//!
//! The inner sums are exact `i32`; only the per-group rescale is floating point. Work is split
//! over output channels by the kernels' own fork-join team (`team.rs`), as many threads as
//! candle's CPU ops use (rayon's thread count, `RAYON_NUM_THREADS`).

use std::mem::MaybeUninit;

mod activations;
#[cfg(target_arch = "aarch64")]
mod arm;
mod attention;
pub(crate) mod memory;
mod paths;
pub mod reference;
mod team;
mod tiles;
mod weights;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_attention;

pub use activations::QuantizedActivations;
pub use attention::{attend, attend_part, attend_part_with, attend_with, combine_parts, part_len, MAX_TILE_HEADS};
use tiles::BlockOutputs;
pub use weights::{quantize_weight_rows, quantize_weight_rows_with, Int8Rows, PackedInt8Weights, WeightQuant, BLOCK_ROWS, MAX_IN_FEATURES};

use candle_core::{bail, Result};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Below this many multiply-adds a linear runs on the calling thread only.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Rows of weights and activations are zero-padded to a multiple of this many bytes.
pub const CHUNK: usize = 32;

pub(crate) use paths::Kernels;

/// The path [`force_isa`] chose: 0 for none, else 1 + its index in [`Isa::ALL`].
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Makes every int8 layer of the process run on `isa` (`None`: back to the fastest path the CPU
/// has) — to compare paths, or to step around one. Fails, naming the CPU's paths, when this CPU
/// cannot run `isa`. The environment variable `CANDLE_QUANT_ISA` does the same from outside.
pub fn force_isa(isa: Option<Isa>) -> Result<()> {
    let code = match isa {
        None => 0,
        Some(isa) if isa.is_supported() => 1 + Isa::ALL.iter().position(|&i| i == isa).unwrap_or(0) as u8,
        Some(isa) => bail!("kernel path {isa:?} is not available on this CPU, which has {:?}", Isa::detected()),
    };
    FORCED.store(code, Ordering::Relaxed);
    Ok(())
}

/// An instruction-set path for the int8 kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isa {
    /// Portable scalar code.
    Reference,
    /// x86_64 AVX2 + FMA: int8 tiles on `vpmaddubsw`.
    Avx2,
    /// The AVX-VNNI int8 tiles with `vpdpbusd` done exactly by AVX2 arithmetic: slower than
    /// `Avx2` and never picked; it runs the VNNI tiles' code on CPUs without VNNI (tests).
    VnniOnAvx2,
    /// AVX2 + FMA, int8 tiles on AVX-VNNI's `vpdpbusd`.
    AvxVnni,
    /// AVX2 + FMA, int8 tiles on AVX-512 VNNI's `vpdpbusd` (256-bit registers).
    Avx512Vnni,
    /// aarch64 NEON (every aarch64 CPU): `smull` + `sadalp`.
    Neon,
    /// aarch64 NEON with the dot-product extension (`sdot`).
    NeonDot,
}

impl Isa {
    const ALL: [Isa; 7] = [Isa::Reference, Isa::Avx2, Isa::VnniOnAvx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::Neon, Isa::NeonDot];

    /// The path every layer uses: the one [`force_isa`] chose, else the one `CANDLE_QUANT_ISA`
    /// names (any listed in [`Isa::supported`], case-insensitive), else the fastest this CPU has.
    pub fn best() -> Isa {
        match FORCED.load(Ordering::Relaxed) {
            0 => Isa::detected().last().copied().unwrap_or(Isa::Reference),
            code => Isa::ALL[code as usize - 1],
        }
    }

    /// Every path this CPU can run, slowest first (for tests that force each one).
    pub fn supported() -> Vec<Isa> {
        Isa::detected().to_vec()
    }

    /// Whether this CPU can run `self` (every kernel call asks; detection runs once).
    pub fn is_supported(self) -> bool {
        Isa::detected().contains(&self)
    }

    fn detected() -> &'static [Isa] {
        static DETECTED: OnceLock<Vec<Isa>> = OnceLock::new();
        DETECTED.get_or_init(|| {
            let mut v = vec![Isa::Reference];
            #[cfg(target_arch = "x86_64")]
            if x86::available() {
                v.extend([Isa::VnniOnAvx2, Isa::Avx2]);
                if x86::avx_vnni_available() {
                    v.push(Isa::AvxVnni);
                }
                if x86::avx512_vnni_available() {
                    v.push(Isa::Avx512Vnni);
                }
            }
            #[cfg(target_arch = "aarch64")]
            {
                v.push(Isa::Neon);
                if arm::dotprod_available() {
                    v.push(Isa::NeonDot);
                }
            }
            // `CANDLE_QUANT_ISA` picks a slower path than the fastest (to compare paths, or to
            // step around one): the paths after it are dropped.
            if let Ok(name) = std::env::var("CANDLE_QUANT_ISA") {
                match v.iter().position(|isa| format!("{isa:?}").eq_ignore_ascii_case(name.trim())) {
                    Some(p) => v.truncate(p + 1),
                    None => eprintln!("candle-quant: ignoring CANDLE_QUANT_ISA={name}: this CPU's paths are {v:?}"),
                }
            }
            v
        })
    }
}

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
    segment(acts, weights).map(|_| ())
}

/// `out` as memory to write (every `f32` is a valid value, so writing any keeps it initialised).
pub(crate) fn as_unfilled(out: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same size and alignment; MaybeUninit<f32> only loosens what may be read, and the
    // kernels write nothing but f32 values through it.
    unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// `out` once every value has been written.
///
/// # Safety
/// Every value of `out` is initialised.
pub(crate) unsafe fn assume_filled(out: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: the caller's contract; same size and alignment.
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A vector of `len` floats that `fill` writes in full, without zeroing its memory first (at a
/// prompt's sizes, zeroing every layer's outputs is a few percent of the time).
///
/// # Safety
/// When `fill` returns `Ok`, it has written every one of the `len` values.
pub(crate) unsafe fn filled_vec(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>]) -> Result<()>) -> Result<Vec<f32>> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len])?;
    // SAFETY: capacity is at least len, and fill wrote all of them (the caller's contract).
    unsafe { v.set_len(len) };
    Ok(v)
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

/// Whether the SIMD tiles can walk these segments: whole rows, or whole quads of 4 channels.
fn simd_segments(seg: usize, k: usize) -> bool {
    seg >= k || seg.is_multiple_of(4)
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
    let kernels = Kernels::of(isa).map_err(|e| e.context("int8 linear"))?;
    let seg = segment(acts, weights)?;
    let kernels = if simd_segments(seg, acts.cols()) { kernels } else { Kernels::PORTABLE };
    let fresh;
    let operands = match acts.tile_operands(kernels.isa(), seg, || TileOperands::new(kernels.isa(), acts, weights, seg)) {
        Some(cached) => cached,
        None => {
            fresh = TileOperands::new(kernels.isa(), acts, weights, seg);
            &fresh
        }
    };
    let (m, n) = (acts.rows(), weights.out_features());
    let za = acts.zero_point();
    // Without an activation zero point the tiles add the bias as they store (at large M a
    // task's outputs outgrow the cache before a second pass could add it); padded to whole
    // blocks.
    let padded_bias = bias.filter(|_| za == 0).map(|b| -> std::borrow::Cow<[f32]> {
        let width = weights.blocks() * BLOCK_ROWS;
        if b.len() == width {
            return b.into();
        }
        let mut padded = b.to_vec();
        padded.resize(width, 0.0);
        padded.into()
    });
    over_blocks(m, n, m * n * acts.cols(), out, |blocks, outs| {
        let op = operands.view(acts, weights, seg, padded_bias.as_deref());
        // SAFETY: the operands were built for this path; seg passed simd_segments and
        // check_linear; blocks and outs come from over_blocks (M rows of 8·blocks.len() this
        // task alone writes).
        let tiles_ran = unsafe { kernels.int8_blocks(&op, blocks.clone(), outs) };
        if !tiles_ran {
            reference_blocks(acts, weights, seg, blocks.clone(), outs);
            add_outliers(acts, weights, blocks.clone(), outs);
        }
        let bias = bias.filter(|_| !(tiles_ran && op.bias.is_some()));
        if za == 0 && bias.is_none() {
            return;
        }
        // The bias, and for an activation zero point `Σ_k (a − za)·w = Σ_k a·w − za·Σ_k w`,
        // on this task's columns while they are in cache.
        let columns = blocks.start * BLOCK_ROWS..(blocks.end * BLOCK_ROWS).min(n);
        for i in 0..m {
            // SAFETY: row i's outputs of these blocks are this task's (over_blocks).
            let row = unsafe { outs.row(i, columns.len()) };
            if za != 0 {
                let shift = acts.row_scales(i)[0] * za as f32;
                row.iter_mut().zip(columns.clone()).for_each(|(y, j)| *y -= shift * weights.zero_point_term(j));
            }
            if let Some(b) = bias {
                row.iter_mut().zip(&b[columns.clone()]).for_each(|(y, b)| *y += b);
            }
        }
    });
    Ok(())
}

/// What a path's int8 tiles take besides the rows ([`tiles::Int8Operands`]): built once per
/// set of quantized activations and kept with them, so that layers sharing an input
/// ([`crate::nn::forward_shared`]) build them once.
#[derive(Debug, Clone, Default)]
pub(crate) struct TileOperands {
    abs: Vec<u8>,
    neg_mask: Vec<u8>,
    shift_terms: Vec<i32>,
}

impl TileOperands {
    /// The operands `isa`'s tiles read (none for NEON and the portable code).
    fn new(isa: Isa, acts: &QuantizedActivations, weights: &PackedInt8Weights, seg: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        return x86_operands(isa, acts, weights, seg);
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, acts, weights, seg);
            Self::default()
        }
    }

    fn view<'a>(
        &'a self,
        acts: &'a QuantizedActivations,
        weights: &'a PackedInt8Weights,
        seg: usize,
        bias: Option<&'a [f32]>,
    ) -> tiles::Int8Operands<'a> {
        tiles::Int8Operands { acts, abs: &self.abs, neg_mask: &self.neg_mask, shift_terms: &self.shift_terms, weights, seg, bias }
    }
}

/// What the x86 int8 tiles of `isa` take besides the rows:
/// - `vpmaddubsw` (AVX2) multiplies unsigned by signed bytes; it gets `|a|` and a mask of the
///   negative `a`, and multiplies `|a|` by the weight with its bits flipped where `a < 0`:
///   `|a|·!w = |a|·(−w − 1) = a·w − |a|` there, so a segment sums `Σ a·w + Σ_{a<0} a`, and the
///   second term comes off at its end (`!w` lies in `[−128, 126]`, so a pair of products stays
///   within `±2·127·128`, below `vpmaddubsw`'s saturation);
/// - `vpdpbusd` gets `w + 128` as its unsigned side, so a segment sums `Σ a·w + 128·Σ a`.
#[cfg(target_arch = "x86_64")]
fn x86_operands(isa: Isa, acts: &QuantizedActivations, weights: &PackedInt8Weights, seg: usize) -> TileOperands {
    let (m, k, stride) = (acts.rows(), acts.cols(), weights.padded_in_features());
    let (segs, _) = tiles::segments(k, stride, seg);
    let seg = seg.min(stride);
    let avx2 = match isa {
        Isa::Avx2 => true,
        Isa::VnniOnAvx2 | Isa::AvxVnni | Isa::Avx512Vnni => false,
        _ => return TileOperands::default(),
    };
    let bytes = if avx2 { m * stride } else { 0 };
    let mut ops = TileOperands { abs: vec![0; bytes], neg_mask: vec![0; bytes], shift_terms: vec![0; m * segs] };
    // Pieces of whole rows, about 32 KB of activations each, over the kernel team.
    let rows = (32_768 / stride.max(1)).max(1);
    let data = acts.padded_data();
    let mut pieces: Vec<_> = ops.shift_terms.chunks_mut(rows * segs).map(|terms| (terms, &mut [][..], &mut [][..])).collect();
    if avx2 {
        for ((piece, abs), neg) in pieces.iter_mut().zip(ops.abs.chunks_mut(rows * stride)).zip(ops.neg_mask.chunks_mut(rows * stride)) {
            (piece.1, piece.2) = (abs, neg);
        }
    }
    run_on_items(pieces, team_threads(m > rows), |p, (terms, abs, neg)| {
        let data = &data[p * rows * stride..][..terms.len() / segs * stride];
        if avx2 {
            // `|a|`, the mask of `a < 0`, and `−Σ_{a<0} a` per segment.
            abs.iter_mut().zip(data).for_each(|(u, &v)| *u = v.unsigned_abs());
            neg.iter_mut().zip(data).for_each(|(u, &v)| *u = (v >> 7) as u8);
            let negatives: Vec<i8> = data.iter().map(|&v| v.min(0)).collect();
            // SAFETY: every x86 SIMD path has AVX2; terms holds segs values per row of data.
            unsafe { x86::segment_sums(&negatives, stride, seg, segs, -1, terms) };
        } else {
            // `−128·Σ a` per segment (the padding is zeros, which add nothing).
            // SAFETY: as above.
            unsafe { x86::segment_sums(data, stride, seg, segs, -128, terms) };
        }
    });
    ops
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

/// Threads for a team job: candle's thread count (rayon's, `RAYON_NUM_THREADS`) when the work
/// is worth splitting, else the calling thread alone.
fn team_threads(parallel: bool) -> usize {
    if parallel {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// Runs `work(i, &mut items[i])` for every item on `threads` threads of the kernel team, each
/// item handed to exactly one task.
fn run_on_items<P: Send>(items: Vec<P>, threads: usize, work: impl Fn(usize, &mut P) + Sync) {
    let items: Vec<_> = items.into_iter().map(std::sync::Mutex::new).collect();
    team::run(items.len(), threads, &|i| {
        // Each task locks only its own item (never contended); a panic in `work` poisons that
        // item alone and team::run re-raises it once every task has finished.
        if let Ok(mut item) = items[i].lock() {
            work(i, &mut item)
        }
    })
}

/// Runs `work(i, parts[i])` for every part on `threads` threads of the kernel team, each part
/// handed to exactly one task.
fn run_on_parts<T: Send>(parts: Vec<&mut [T]>, threads: usize, work: impl Fn(usize, &mut [T]) + Sync) {
    run_on_items(parts, threads, |i, part| work(i, part))
}

/// Scalar [`x86::int8_blocks`]: `Σ_g sa · sw · dot_g` per output, from the reference dot product.
fn reference_blocks(
    acts: &QuantizedActivations,
    weights: &PackedInt8Weights,
    seg: usize,
    blocks: std::ops::Range<usize>,
    outs: BlockOutputs,
) {
    let (k, n) = (acts.cols(), weights.out_features());
    let (a_step, w_step) = ((acts.groups() > 1) as usize, (weights.groups() > 1) as usize);
    for i in 0..acts.rows() {
        let (row, sa) = (acts.row(i), acts.row_scales(i));
        for (j, col) in block_columns(&blocks, n) {
            let (w, sw) = (weights.row(j), weights.row_scales(j));
            let mut acc = 0f32;
            for g in 0..k.div_ceil(seg) {
                let r = g * seg..((g + 1) * seg).min(k);
                acc += sa[g * a_step] * sw[g * w_step] * reference::dot_i8(&row[r.clone()], &w[r]) as f32;
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
    if simd_segments(seg, k) {
        let operands = TileOperands::new(isa, acts, weights, seg);
        let op = operands.view(acts, weights, seg, None);
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
    let kernels = if simd_segments(weights.group_size(), k) { kernels } else { Kernels::PORTABLE };
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

/// [`Kernels::quantize_symmetric`] on the best path, for any input: a run holding a non-finite
/// value goes through the scalar quantizer (weights quantized at load time use this).
pub(crate) fn quantize_symmetric(x: &[f32], inv: f32, q: &mut [i8]) {
    let best = Kernels::best();
    let kernels = if best.abs_max(x).1 { best } else { Kernels::PORTABLE };
    kernels.quantize_symmetric(x, inv, q)
}

/// `p` and `a1..a5` of Abramowitz & Stegun 7.1.26: for `z ≥ 0`, with `t = 1/(1 + p·z)`,
/// `erf(z) ≈ 1 − t·(a1 + a2·t + a3·t² + a4·t³ + a5·t⁴)·e^(−z²)`, absolute error below 1.5e-7.
const ERF_COEFFS: [f32; 6] = [0.327_591_1, 0.254_829_6, -0.284_496_74, 1.421_413_7, -1.453_152, 1.061_405_4];

/// Exact GELU in place, `x ↦ x·Φ(x) = x/2 · (1 + erf(x/√2))` (BERT's activation), on the best
/// path. With `z = |x|/√2` and `c = x/2 · t·P(t) · e^(−z²)` (the tail `1 − erf(z)` of
/// `ERF_COEFFS`, times `x/2`): `x − c` for `x ≥ 0` and `c` for `x < 0`, so the negative side,
/// where the result is small, keeps its relative precision.
pub fn gelu_erf(x: &mut [f32]) {
    if !Kernels::best().gelu_erf(x) {
        x.iter_mut().for_each(|v| *v = gelu_erf_scalar(*v))
    }
}

/// SwiGLU's product `out[i] = silu(gate[i]) · up[i]`, `silu(x) = x / (1 + e^(−x))`, on the best
/// path (Llama's MLP between its gate/up and down projections). With `e = e^(−|x|) ≤ 1`:
/// `σ(x) = 1/(1 + e)` for `x ≥ 0` and `e/(1 + e)` for `x < 0`, so the exponential never
/// overflows.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    silu_mul_into(gate, up, as_unfilled(out))
}

/// [`silu_mul`] into memory that need not hold values yet (every value is written on `Ok`), in
/// pieces of 64 K values over the kernel team when there are several.
pub(crate) fn silu_mul_into(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) -> Result<()> {
    if gate.len() != up.len() || out.len() != gate.len() {
        bail!("silu_mul: gate of {}, up of {} and output of {} values must match", gate.len(), up.len(), out.len())
    }
    const PIECE: usize = 1 << 16;
    let kernels = Kernels::best();
    run_on_parts(out.chunks_mut(PIECE).collect(), team_threads(gate.len() > PIECE), |p, out| {
        let (gate, up) = (&gate[p * PIECE..][..out.len()], &up[p * PIECE..][..out.len()]);
        if !kernels.silu_mul(gate, up, out) {
            out.iter_mut().zip(gate.iter().zip(up)).for_each(|(o, (&g, &u))| _ = o.write(silu_scalar(g) * u))
        }
    });
    Ok(())
}

/// `x / (1 + e^(−x))` (the portable path of [`silu_mul`]).
pub fn silu_scalar(x: f32) -> f32 {
    let e = (-x.abs()).exp();
    let r = 1.0 / (1.0 + e);
    x * if x >= 0.0 { r } else { e * r }
}

/// [`gelu_erf`] of one value (the portable path).
pub fn gelu_erf_scalar(x: f32) -> f32 {
    let [p, a1, a2, a3, a4, a5] = ERF_COEFFS;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + p * z);
    let tail = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * (-z * z).exp();
    let c = 0.5 * x * tail;
    if x >= 0.0 {
        x - c
    } else {
        c
    }
}

/// RMSNorm of every row of `n` values of `x` into `out`, bit for bit as candle's CPU kernel
/// computes it: `Σ x²` of each row added in order (`x·x` rounded, then added),
/// `m = √(Σ/n + ε)`, `y = x / m · α`. The sums of eight rows at a time run in the lanes of one
/// register on x86 (a row per lane, still in order); the rows are shared out over the kernel
/// team when there are many.
pub fn rms_norm(x: &[f32], n: usize, alpha: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    rms_norm_into(x, n, alpha, eps, as_unfilled(out))
}

/// [`rms_norm`] into memory that need not hold values yet: on `Ok`, every value of `out` is written.
pub(crate) fn rms_norm_into(x: &[f32], n: usize, alpha: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) -> Result<()> {
    rms_norm_rows(x, None, n, alpha, eps, out)
}

/// A residual connection and the RMSNorm after it in one pass: `sum = x + h` into `sum`, and
/// [`rms_norm`] of `sum` into `out` (each piece of rows normalised while it is in cache); on
/// `Ok`, every value of both is written.
pub(crate) fn add_rms_norm_into(
    x: &[f32],
    h: &[f32],
    n: usize,
    alpha: &[f32],
    eps: f32,
    sum: &mut [MaybeUninit<f32>],
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    if h.len() != x.len() || sum.len() != x.len() {
        bail!("residual rms norm: {} inputs, {} residuals and {} sums differ", x.len(), h.len(), sum.len())
    }
    rms_norm_rows(x, Some((h, sum)), n, alpha, eps, out)
}

/// The body of [`rms_norm_into`] and [`add_rms_norm_into`]: with a residual `(h, sum)`, the rows
/// normalised are `x + h`, written to `sum` first.
fn rms_norm_rows(
    x: &[f32],
    residual: Option<(&[f32], &mut [MaybeUninit<f32>])>,
    n: usize,
    alpha: &[f32],
    eps: f32,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    if n == 0 || !x.len().is_multiple_of(n) || alpha.len() != n || out.len() != x.len() {
        bail!("rms norm: {} inputs, {} outputs and {} weights are not rows of {n}", x.len(), out.len(), alpha.len())
    }
    let kernels = Kernels::best();
    let rows = x.len() / n;
    let per = norm_piece_rows(n);
    let (h, sum) = match residual {
        Some((h, sum)) => (h, sum),
        None => (&[][..], &mut [][..]),
    };
    let mut sums = sum.chunks_mut(per * n);
    let parts: Vec<_> = out.chunks_mut(per * n).map(|out| (out, sums.next())).collect();
    run_on_items(parts, team_threads(rows > per), |p, (out, sum)| {
        let x = &x[p * per * n..][..out.len()];
        let x: &[f32] = match sum {
            Some(sum) => {
                sum.iter_mut().zip(x).zip(&h[p * per * n..]).for_each(|((s, &a), &b)| _ = s.write(a + b));
                // SAFETY: every value was just written.
                unsafe { assume_filled(sum) }
            }
            None => x,
        };
        let mut sums = vec![0f32; out.len() / n];
        kernels.sums_of_squares(x, n, &mut sums);
        for ((row, y), sum) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).zip(sums) {
            let m = (sum / n as f32 + eps).sqrt();
            y.iter_mut().zip(row).zip(alpha).for_each(|((y, &v), &a)| _ = y.write(v / m * a));
        }
    });
    Ok(())
}

/// Rows of `n` values per piece of a norm on the kernel team: about 64 K values (in cache while
/// summed and normalised), a multiple of the eight rows the x86 sums take at once.
fn norm_piece_rows(n: usize) -> usize {
    (65_536 / n).next_multiple_of(8).max(8)
}

/// LayerNorm of every row of `n` values of `x` (plus `residual`, when given: the rows normalised
/// are `x + residual`, summed piece by piece in cache and never written out) into `out`, bit for
/// bit as candle's CPU kernel computes it: `Σ x` and `Σ x²` of each row added in order,
/// `μ = Σ/n`, `σ² = Σx²/n − μ²`, `y = (x − μ) · (1/√(σ² + ε)) · α + β`. The sums of eight rows
/// at a time run in the lanes of a register on x86; the rows are shared out over the team.
/// On `Ok`, every value of `out` is written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_into(
    x: &[f32],
    residual: Option<&[f32]>,
    n: usize,
    alpha: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    if n == 0
        || !x.len().is_multiple_of(n)
        || alpha.len() != n
        || beta.len() != n
        || out.len() != x.len()
        || residual.is_some_and(|h| h.len() != x.len())
    {
        bail!(
            "layer norm: {} inputs, {} outputs, {} weights and {} biases are not rows of {n}",
            x.len(),
            out.len(),
            alpha.len(),
            beta.len()
        )
    }
    let kernels = Kernels::best();
    let rows = x.len() / n;
    let per = norm_piece_rows(n);
    run_on_parts(out.chunks_mut(per * n).collect(), team_threads(rows > per), |p, out| {
        let x = &x[p * per * n..][..out.len()];
        let summed: Vec<f32>;
        let x = match residual {
            Some(h) => {
                summed = x.iter().zip(&h[p * per * n..]).map(|(a, b)| a + b).collect();
                &summed[..]
            }
            None => x,
        };
        let (mut sums, mut squares) = (vec![0f32; out.len() / n], vec![0f32; out.len() / n]);
        kernels.sums_and_squares(x, n, &mut sums, &mut squares);
        for (((row, y), sum), sum2) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).zip(sums).zip(squares) {
            let mean = sum / n as f32;
            let var = sum2 / n as f32 - mean * mean;
            let inv_std = (var + eps).sqrt().recip();
            y.iter_mut().zip(row).zip(alpha.iter().zip(beta)).for_each(|((y, &v), (&a, &b))| _ = y.write((v - mean) * inv_std * a + b));
        }
    });
    Ok(())
}

/// Runs `work(i, parts[i])` for every part on the kernels' fork-join team — as many threads as
/// candle's CPU ops use — or on the calling thread when `parallel` is false. For other small,
/// latency-bound steps of a decoding model that run between int8 layers (the team is awake
/// then).
pub fn parallel_for_parts<T: Send>(parts: Vec<&mut [T]>, parallel: bool, work: impl Fn(usize, &mut [T]) + Sync) {
    run_on_parts(parts, team_threads(parallel), work)
}

/// [`parallel_for_parts`] for work that can fail: every part runs, then the first error one
/// of them returned (if any) is returned.
pub(crate) fn try_parallel_for_parts<T: Send>(
    parts: Vec<&mut [T]>,
    parallel: bool,
    work: impl Fn(usize, &mut [T]) -> Result<()> + Sync,
) -> Result<()> {
    let failed = std::sync::Mutex::new(None);
    parallel_for_parts(parts, parallel, |i, part| {
        if let Err(e) = work(i, part) {
            if let Ok(mut f) = failed.lock() {
                f.get_or_insert(e);
            }
        }
    });
    failed.into_inner().ok().flatten().map_or(Ok(()), Err)
}

/// Parts the bandwidth probe reads side by side: as many as the weight blocks a decoding tile
/// streams at once (one stream alone reads memory slower than eight side by side).
const STREAMS: usize = 8;

/// Wrapping sum of `buf` with the widest vectors this CPU has, read as eight parts side by side
/// like the decoding tile reads its weights: a read-bandwidth probe for benchmarks (the
/// weights' streaming speed is judged against it).
pub fn stream_sum(buf: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2 is available.
        return unsafe { x86::stream_sum(buf) };
    }
    let part = buf.len() / STREAMS;
    let mut acc = [0u64; STREAMS];
    for i in 0..part {
        for (s, a) in acc.iter_mut().enumerate() {
            *a = a.wrapping_add(buf[s * part + i]);
        }
    }
    buf[STREAMS * part..].iter().chain(&acc).fold(0, |a, &b| a.wrapping_add(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused residual + RMSNorm writes `x + h` and the RMSNorm of it bit for bit as an add
    /// followed by [`rms_norm`]: rows fewer and more than eight, several pieces of rows.
    #[test]
    fn residual_rms_norm_equals_add_then_norm() -> Result<()> {
        let wave = |len: usize, f: f32| (0..len).map(|i| (i as f32 * f).sin() * (1 + i % 7) as f32).collect::<Vec<f32>>();
        for (rows, n) in [(3, 24), (300, 576)] {
            let (x, h, alpha) = (wave(rows * n, 0.37), wave(rows * n, 1.91), wave(n, 0.11));
            let want_sum: Vec<f32> = x.iter().zip(&h).map(|(a, b)| a + b).collect();
            let mut want = vec![0f32; rows * n];
            rms_norm(&want_sum, n, &alpha, 1e-5, &mut want)?;
            let (mut sum, mut got) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows * n]);
            add_rms_norm_into(&x, &h, n, &alpha, 1e-5, as_unfilled(&mut sum), as_unfilled(&mut got))?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&sum), bits(&want_sum), "{rows} rows of {n}: sums");
            assert_eq!(bits(&got), bits(&want), "{rows} rows of {n}: norms");
        }
        assert!(add_rms_norm_into(
            &[1.0; 4],
            &[1.0; 3],
            4,
            &[1.0; 4],
            1e-5,
            &mut [MaybeUninit::uninit(); 4],
            &mut [MaybeUninit::uninit(); 4]
        )
        .is_err());
        Ok(())
    }

    /// LayerNorm on the kernels gives candle's fused LayerNorm bit for bit, on `x` and on a
    /// residual sum `x + h`: rows fewer and more than eight, of whole 8-value vectors and not,
    /// several pieces of rows; lengths that do not fit are errors.
    #[test]
    fn layer_norm_equals_candles_bit_for_bit() -> Result<()> {
        use candle_core::{Device, Tensor};
        let wave = |len: usize, f: f32, c: f32| (0..len).map(|i| (i as f32 * f).sin() * (1 + i % 7) as f32 + c).collect::<Vec<f32>>();
        for (rows, n) in [(3, 20), (13, 384), (300, 384), (9, 7)] {
            let (x, h, alpha, beta) = (wave(rows * n, 0.37, 0.5), wave(rows * n, 1.91, -0.2), wave(n, 0.11, 1.0), wave(n, 0.05, 0.0));
            let tensor = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &Device::Cpu);
            let sum: Vec<f32> = x.iter().zip(&h).map(|(a, b)| a + b).collect();
            for residual in [None, Some(&h[..])] {
                let normed = if residual.is_some() { &sum } else { &x };
                let want = candle_nn::ops::layer_norm(&tensor(normed, &[rows, n])?, &tensor(&alpha, &[n])?, &tensor(&beta, &[n])?, 1e-12)?;
                let want: Vec<u32> = want.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect();
                let mut got = vec![f32::NAN; rows * n];
                layer_norm_into(&x, residual, n, &alpha, &beta, 1e-12, as_unfilled(&mut got))?;
                let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{rows} rows of {n}, residual {}", residual.is_some());
            }
        }
        let mut out = [MaybeUninit::uninit(); 8];
        assert!(layer_norm_into(&[1.0; 8], Some(&[1.0; 4]), 4, &[1.0; 4], &[0.0; 4], 1e-5, &mut out).is_err());
        assert!(layer_norm_into(&[1.0; 8], None, 4, &[1.0; 4], &[0.0; 3], 1e-5, &mut out).is_err());
        Ok(())
    }
}
