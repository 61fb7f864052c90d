//! Int8 matrix kernels behind one entry point per operation: a scalar reference (the ground
//! truth, never deleted) and SIMD versions chosen once at run time from the CPU's features.
//!
//! The maths of the fused int8 linear, for activations quantized per `(row m, group g)` with
//! scale `sa[m,g]` and one zero point `za`, and weights per `(output channel n, group g)` with
//! scale `sw[n,g]` and zero point 0 (either side may have a single group per row):
//!
//! `y[m,n] = Σ_g sa[m,g] · sw[n,g] · (Σ_{k∈g} qa[m,k]·qw[n,k] − za·Σ_{k∈g} qw[n,k]) + bias[n]`
//!
//! The inner sums are exact `i32`; only the per-group rescale is floating point. Work is split
//! over output channels across rayon's pool (`RAYON_NUM_THREADS`, as candle's CPU ops use).

mod activations;
pub mod reference;
mod weights;
#[cfg(target_arch = "x86_64")]
pub mod x86;

pub use activations::QuantizedActivations;
pub use weights::{PackedInt8Weights, WeightQuant, MAX_IN_FEATURES};

use candle_core::{bail, Result};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Below this many multiply-adds a linear runs on the calling thread only.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Bytes per SIMD chunk; rows of weights and activations are zero-padded to a multiple of it.
pub const CHUNK: usize = 32;

/// An instruction-set path for the int8 kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable scalar code.
    Reference,
    /// x86_64 AVX2 + FMA.
    Avx2,
}

impl Isa {
    /// The fastest path this CPU supports, detected once.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| Isa::supported().into_iter().last().unwrap_or(Isa::Reference))
    }

    /// Every path this CPU can run, slowest first (for tests that force each one).
    pub fn supported() -> Vec<Isa> {
        let mut v = vec![Isa::Reference];
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            v.push(Isa::Avx2);
        }
        v
    }
}

fn check_linear(acts: &QuantizedActivations, weights: &PackedInt8Weights, bias: Option<&[f32]>, out: &[f32]) -> Result<()> {
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

/// [`int8_linear`] on a chosen path (errors if this CPU lacks it).
pub fn int8_linear_with(
    isa: Isa,
    acts: &QuantizedActivations,
    weights: &PackedInt8Weights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_linear(acts, weights, bias, out)?;
    if !Isa::supported().contains(&isa) {
        bail!("int8 linear: this CPU cannot run the {isa:?} kernels")
    }
    // SIMD reads whole 32-byte chunks, so segments must be whole chunks (or whole rows).
    let seg = segment(acts, weights)?;
    let simd_ok = seg == acts.cols() || seg % CHUNK == 0;
    let isa = if simd_ok { isa } else { Isa::Reference };
    let (m, n) = (acts.rows(), weights.out_features());
    let block = n.div_ceil(rayon::current_num_threads() * 4).clamp(8, 256);
    let run_block = |b: usize| {
        let cols = b * block..((b + 1) * block).min(n);
        let mut buf = vec![0f32; m * cols.len()];
        linear_block(isa, acts, weights, seg, cols.clone(), &mut buf);
        (cols.start, buf)
    };
    // With one thread, or too little work to share, stay on the calling thread: handing work to
    // the pool and waiting for it costs a wake-up (several µs) per call.
    let blocks: Vec<(usize, Vec<f32>)> = if rayon::current_num_threads() == 1 || m * n * acts.cols() < PARALLEL_MIN_MACS {
        (0..n.div_ceil(block)).map(run_block).collect()
    } else {
        (0..n.div_ceil(block)).into_par_iter().map(run_block).collect()
    };
    for (start, buf) in blocks {
        let width = buf.len() / m.max(1);
        for i in 0..m {
            out[i * n + start..i * n + start + width].copy_from_slice(&buf[i * width..(i + 1) * width]);
        }
    }
    let za = acts.zero_point();
    for i in 0..m {
        let s0 = acts.row_scales(i)[0];
        for j in 0..n {
            let y = &mut out[i * n + j];
            if za != 0 {
                *y -= s0 * za as f32 * weights.zero_point_term(j);
            }
            *y += bias.map_or(0.0, |b| b[j]);
        }
    }
    Ok(())
}

/// `Σ_g sa[m,g] · sw[n,g] · dot_g` over segments of `seg` channels, for output columns `cols`,
/// into `buf` (`M × cols.len()`).
fn linear_block(
    isa: Isa,
    acts: &QuantizedActivations,
    weights: &PackedInt8Weights,
    seg: usize,
    cols: std::ops::Range<usize>,
    buf: &mut [f32],
) {
    let (m, k, width) = (acts.rows(), acts.cols(), cols.len());
    let (a_step, w_step) = ((acts.groups() > 1) as usize, (weights.groups() > 1) as usize);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            let n_chunks = weights.stride() / CHUNK;
            let seg_chunks = if seg == k { n_chunks } else { seg / CHUNK };
            for (jj, j) in cols.enumerate() {
                let (w, sw) = (weights.padded_row(j), weights.row_scales(j));
                let mut i0 = 0;
                while i0 < m {
                    let cnt = (m - i0).min(4);
                    let row = |r: usize| acts.padded_row(i0 + r);
                    let sc = |r: usize| acts.row_scales(i0 + r);
                    // SAFETY: Avx2 is only chosen when x86::available(); padded rows hold
                    // stride = 32·n_chunks bytes; segments are whole chunks or whole rows, so
                    // each grouped side has exactly div_ceil(n_chunks, seg_chunks) scales.
                    let (vals, n_vals): ([f32; 4], usize) = unsafe {
                        match cnt {
                            4 => (
                                x86::dot_rows(
                                    &[row(0), row(1), row(2), row(3)],
                                    &[sc(0), sc(1), sc(2), sc(3)],
                                    a_step,
                                    w,
                                    sw,
                                    w_step,
                                    seg_chunks,
                                    n_chunks,
                                ),
                                4,
                            ),
                            2 | 3 => {
                                let [a, b] = x86::dot_rows(&[row(0), row(1)], &[sc(0), sc(1)], a_step, w, sw, w_step, seg_chunks, n_chunks);
                                ([a, b, 0.0, 0.0], 2)
                            }
                            _ => {
                                let [a] = x86::dot_rows(&[row(0)], &[sc(0)], a_step, w, sw, w_step, seg_chunks, n_chunks);
                                ([a, 0.0, 0.0, 0.0], 1)
                            }
                        }
                    };
                    for (r, &v) in vals.iter().enumerate().take(n_vals) {
                        buf[(i0 + r) * width + jj] = v + outlier_terms(acts.row_outliers(i0 + r), w, sw, weights.group_size());
                    }
                    i0 += n_vals;
                }
            }
        }
        _ => {
            for i in 0..m {
                let (row, sa) = (acts.row(i), acts.row_scales(i));
                for (jj, j) in cols.clone().enumerate() {
                    let (w, sw) = (weights.row(j), weights.row_scales(j));
                    let mut acc = 0f32;
                    for g in 0..k.div_ceil(seg) {
                        let r = g * seg..((g + 1) * seg).min(k);
                        acc += sa[g * a_step] * sw[g * w_step] * reference::dot_i8(&row[r.clone()], &w[r]) as f32;
                    }
                    buf[i * width + jj] = acc + outlier_terms(acts.row_outliers(i), w, sw, weights.group_size());
                }
            }
        }
    }
}

/// `Σ x[c] · ŵ[c]` over the float outliers of one activation row, against the weight row in
/// cache (`ŵ = q · sw[c / group]`).
#[inline]
fn outlier_terms(outliers: &[(u32, f32)], w: &[i8], sw: &[f32], group: usize) -> f32 {
    outliers.iter().map(|&(c, v)| v * w[c as usize] as f32 * sw[c as usize / group]).sum()
}

/// Exact integer sums `Σ_{k∈g} qa[k]·qw[k]` of each segment of one activation row against one
/// weight row, computed by the chosen path's inner routine (tests compare paths on this).
pub fn group_sums_with(isa: Isa, acts: &QuantizedActivations, i: usize, weights: &PackedInt8Weights, j: usize) -> Result<Vec<i32>> {
    if !Isa::supported().contains(&isa) {
        bail!("this CPU cannot run the {isa:?} kernels")
    }
    let (seg, k) = (segment(acts, weights)?, acts.cols());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if seg == k || seg % CHUNK == 0 => {
            let n_chunks = weights.stride() / CHUNK;
            let seg_chunks = if seg == k { n_chunks } else { seg / CHUNK };
            let mut out = Vec::new();
            x86::group_sums(acts.padded_row(i), weights.padded_row(j), seg_chunks, n_chunks, &mut out)?;
            Ok(out)
        }
        _ => {
            let (a, w) = (acts.row(i), weights.row(j));
            Ok((0..k.div_ceil(seg))
                .map(|g| reference::dot_i8(&a[g * seg..((g + 1) * seg).min(k)], &w[g * seg..((g + 1) * seg).min(k)]))
                .collect())
        }
    }
}

/// `y = x · dequant(weights)ᵀ + bias` with float activations (weight-only int8).
pub fn weight_only_linear(x: &[f32], m: usize, weights: &PackedInt8Weights, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    let (k, n) = (weights.in_features(), weights.out_features());
    if x.len() != m * k || out.len() != m * n {
        bail!("weight-only linear: {} inputs / {} outputs do not fit {m}×{k} → {m}×{n}", x.len(), out.len())
    }
    let isa = Isa::best();
    out.par_chunks_mut(n).zip(x.par_chunks(k)).for_each(|(y, row)| {
        let g = weights.group_size();
        y.par_iter_mut().enumerate().for_each(|(j, yj)| {
            let (w, sw) = (weights.row(j), weights.row_scales(j));
            let dot: f32 = row
                .chunks(g)
                .zip(w.chunks(g))
                .zip(sw)
                .map(|((x, w), s)| {
                    s * match isa {
                        // SAFETY: Avx2 is only chosen when available; both slices hold x.len() values.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe { x86::dot_f32_i8(x, w) },
                        _ => reference::dot_f32_i8(x, w),
                    }
                })
                .sum();
            *yj = dot + bias.map_or(0.0, |b| b[j]);
        })
    });
    Ok(())
}
