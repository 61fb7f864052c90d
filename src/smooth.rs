//! SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights.
//!
//! A linear layer computes `x · Wᵀ`; for any positive `s`, `(x / s) · (W · diag(s))ᵀ` is the
//! same product. Dividing input channel `j` by `s_j = max|X_j|^α / max|W_j|^(1−α)` flattens the
//! channels that static per-tensor quantization cannot represent, at the price of larger weight
//! columns, which per-channel weight scales absorb. The division is folded into whatever
//! produces the input (a norm's weight, or the rows of a linear layer), the multiplication into
//! the columns of every layer that reads it, so the float model computes the same function.
//! [`crate::models::llama::Llama::smooth`] does this for the Llama family.

use crate::nn::QLinear;
use candle_core::{bail, Result};
use std::collections::BTreeMap;

/// Smoothing factors per group of layers that read one input, keyed by the group's first layer.
pub type SmoothingFactors = BTreeMap<String, Vec<f32>>;

/// `s_j = max|X_j|^α / max|W_j|^(1−α)` for every input channel, `1` where either maximum is 0
/// (a channel never active, or never read), kept within `[1e-5, 1e5]`.
pub fn smoothing_factors(act_absmax: &[f32], weight_absmax: &[f32], alpha: f32) -> Result<Vec<f32>> {
    if !(0.0..=1.0).contains(&alpha) {
        bail!("smoothing alpha must lie in [0, 1], got {alpha}")
    }
    if act_absmax.len() != weight_absmax.len() {
        bail!("smoothing: {} activation maxima for {} weight columns", act_absmax.len(), weight_absmax.len())
    }
    Ok(act_absmax
        .iter()
        .zip(weight_absmax)
        .map(|(&a, &w)| if a > 0.0 && w > 0.0 { (a.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5) } else { 1.0 })
        .collect())
}

/// The largest `|w|` in each input column over the weights of `layers` (float layers that read
/// the same input).
pub fn weight_column_absmax(layers: &[&QLinear]) -> Result<Vec<f32>> {
    let mut out: Vec<f32> = Vec::new();
    for l in layers {
        let cols = l.float_equivalent()?.weight().abs()?.max(0)?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        if out.is_empty() {
            out = cols;
        } else if out.len() != cols.len() {
            bail!("layer '{}' reads {} inputs, not {} like the others of its group", l.name(), cols.len(), out.len())
        } else {
            out.iter_mut().zip(cols).for_each(|(o, c)| *o = o.max(c));
        }
    }
    Ok(out)
}
