//! Int8 matrix kernels behind one entry point per operation, so faster (SIMD, threaded)
//! versions can replace the inner loops without touching the layers.
//!
//! The maths of the fused int8 linear, for activations quantized per `(row m, group g)` with
//! scale `sa[m,g]` and one zero point `za`, and weights per output channel `n` with scale
//! `sw[n]` and zero point 0:
//!
//! `y[m,n] = sw[n] · Σ_g sa[m,g] · (Σ_{k∈g} qa[m,k]·qw[n,k] − za·Σ_{k∈g} qw[n,k]) + bias[n]`
//!
//! The inner sums are exact `i32`; only the per-group rescale is floating point.

mod activations;
pub mod reference;
mod weights;

pub use activations::QuantizedActivations;
pub use weights::PackedInt8Weights;

use candle_core::{bail, Result};

/// `y = dequant(acts) · dequant(weights)ᵀ + bias`, computed as integer dot products per
/// activation group followed by a float rescale. `out` is `M×N` row-major.
pub fn int8_linear(
    acts: &QuantizedActivations,
    weights: &PackedInt8Weights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let (m, k, n) = (acts.rows(), acts.cols(), weights.out_features());
    if k != weights.in_features() {
        bail!(
            "int8 linear: activations have {k} columns but the weights expect {}",
            weights.in_features()
        )
    }
    if out.len() != m * n {
        bail!(
            "int8 linear: output buffer holds {} values, {m}×{n} needed",
            out.len()
        )
    }
    if let Some(b) = bias {
        if b.len() != n {
            bail!("int8 linear: bias has {} values, {n} needed", b.len())
        }
    }
    let za = acts.zero_point();
    if za != 0 && acts.groups() != 1 {
        bail!("int8 linear: a non-zero activation zero point needs one group per row")
    }
    let group = acts.group_size();
    for i in 0..m {
        let (row, scales) = (acts.row(i), acts.row_scales(i));
        let y = &mut out[i * n..(i + 1) * n];
        for (j, yj) in y.iter_mut().enumerate() {
            let w = weights.row(j);
            let mut acc = 0f32;
            for (g, &sa) in scales.iter().enumerate() {
                let r = g * group..((g + 1) * group).min(k);
                acc += sa * reference::dot_i8(&row[r.clone()], &w[r]) as f32;
            }
            if za != 0 {
                acc -= scales[0] * (za as i64 * weights.row_sum(j) as i64) as f32;
            }
            *yj = acc * weights.scale(j) + bias.map_or(0.0, |b| b[j]);
        }
    }
    Ok(())
}

/// `y = x · dequant(weights)ᵀ + bias` with float activations (weight-only int8).
pub fn weight_only_linear(
    x: &[f32],
    m: usize,
    weights: &PackedInt8Weights,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let (k, n) = (weights.in_features(), weights.out_features());
    if x.len() != m * k || out.len() != m * n {
        bail!(
            "weight-only linear: {} inputs / {} outputs do not fit {m}×{k} → {m}×{n}",
            x.len(),
            out.len()
        )
    }
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        for j in 0..n {
            out[i * n + j] = reference::dot_f32_i8(row, weights.row(j)) * weights.scale(j)
                + bias.map_or(0.0, |b| b[j]);
        }
    }
    Ok(())
}
