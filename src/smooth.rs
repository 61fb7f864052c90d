//! SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights.
//!
//! A linear layer computes `x · Wᵀ`; for any positive `s`, `(x / s) · (W · diag(s))ᵀ` is the
//! same product. Dividing input channel `j` by `s_j = max|X_j|^α / max|W_j|^(1−α)` flattens the
//! channels that static per-tensor quantization cannot represent, at the price of larger weight
//! columns, which per-channel weight scales absorb. The division is folded into whatever
//! produces the input (a norm's weight, or the rows of a linear layer), the multiplication into
//! the columns of every layer that reads it, so the float model computes the same function.
//!
//! A model says where that holds by implementing [`Smoothable`]: its groups of (producer →
//! linear layers that read only its output). [`smooth`] and [`apply_smoothing`] work on any
//! such model.

use crate::nn::{QLinear, QLinearKind};
use candle_core::{bail, Result, Tensor};
use candle_nn::{LayerNorm, RmsNorm};
use std::collections::BTreeMap;

/// Smoothing factors per group of layers that read one input, keyed by the group's first layer.
pub type SmoothingFactors = BTreeMap<String, Vec<f32>>;

/// What produces a group's input, and so takes the division by `s`.
pub enum SmoothSource<'a> {
    /// An RMSNorm: its weight divided.
    RmsNorm(&'a mut RmsNorm),
    /// A LayerNorm: its weight and bias divided.
    LayerNorm(&'a mut LayerNorm),
    /// A linear layer: its output channels (weight rows and bias) divided.
    Linear(&'a mut QLinear),
}

/// A producer and the linear layers that read its output, and nothing else: dividing the
/// producer's output by `s` and multiplying the readers' weight columns by `s` leaves the
/// model's function unchanged.
pub struct SmoothGroup<'a> {
    /// Where the input comes from.
    pub source: SmoothSource<'a>,
    /// The float linear layers that read it (the first one's name keys the group's factors).
    pub readers: Vec<&'a mut QLinear>,
}

/// A model whose linear layers SmoothQuant can smooth: it hands out each of its groups in
/// turn. A group must be a producer whose output only its readers see: in a post-norm block
/// (BERT) the norm's output is also the residual stream, so no norm there may be divided.
pub trait Smoothable {
    /// Calls `f` on every group, in a fixed order (factors are applied in it).
    fn visit_smoothing_groups(&mut self, f: &mut dyn FnMut(SmoothGroup<'_>) -> Result<()>) -> Result<()>;

    /// The linear layers left out, each with why (reported by [`smooth`]).
    fn unsmoothed(&self) -> Vec<String> {
        Vec::new()
    }
}

/// SmoothQuant over every group of `model`: factors from each layer's input channel maxima
/// (`channel_absmax`, by layer name, from calibration; a group takes the largest over its
/// readers) and the readers' weight columns, all computed before any is folded, then folded by
/// [`apply_smoothing`]. Returns the factors, keyed by the first reader of each group, and what
/// was not smoothed, with why.
pub fn smooth(
    model: &mut (impl Smoothable + ?Sized),
    channel_absmax: &BTreeMap<String, Vec<f32>>,
    alpha: f32,
) -> Result<(SmoothingFactors, Vec<String>)> {
    let mut factors = SmoothingFactors::new();
    model.visit_smoothing_groups(&mut |g| {
        let readers: Vec<&QLinear> = g.readers.iter().map(|l| &**l).collect();
        let Some(first) = readers.first() else { return Ok(()) };
        let mut act: Vec<f32> = Vec::new();
        for l in &readers {
            let Some(a) = channel_absmax.get(l.name()) else { bail!("no input channel maxima for layer '{}'", l.name()) };
            if act.is_empty() {
                act = a.clone();
            } else {
                act.iter_mut().zip(a).for_each(|(x, y)| *x = x.max(*y));
            }
        }
        factors.insert(first.name().to_string(), smoothing_factors(&act, &weight_column_absmax(&readers)?, alpha)?);
        Ok(())
    })?;
    apply_smoothing(model, &factors)?;
    Ok((factors, model.unsmoothed()))
}

/// Folds SmoothQuant factors (keyed as [`smooth`] returns them) into the float model: the
/// producer divided, the readers' weight columns multiplied, group by group in the model's
/// order. The float model computes the same function. Errors name the layer; nothing is changed
/// unless every key names a group of this model with as many inputs as factors.
pub fn apply_smoothing(model: &mut (impl Smoothable + ?Sized), factors: &SmoothingFactors) -> Result<()> {
    let mut known = BTreeMap::new();
    model.visit_smoothing_groups(&mut |g| {
        if let Some(first) = g.readers.first() {
            known.insert(first.name().to_string(), first.in_features());
        }
        Ok(())
    })?;
    for (k, s) in factors {
        match known.get(k) {
            None => bail!("smoothing factors for '{k}', which starts no smoothable group of this model"),
            Some(&n) if n != s.len() => bail!("layer '{k}': {} smoothing factors for {n} inputs", s.len()),
            _ if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) => bail!("layer '{k}': smoothing factors must be finite and positive"),
            _ => {}
        }
    }
    model.visit_smoothing_groups(&mut |g| match g.readers.first().and_then(|l| factors.get(l.name())) {
        Some(s) => fold_factors(g, s),
        None => Ok(()),
    })
}

/// Folds one group's factors `s` (as many as its input channels) into the float model: the
/// producer's output divided by `s`, the readers' weight columns multiplied by it. Nothing is
/// changed unless every linear layer involved is float and every reader has `s.len()` inputs.
pub fn fold_factors(g: SmoothGroup<'_>, s: &[f32]) -> Result<()> {
    let producer = match &g.source {
        SmoothSource::Linear(l) => Some(&**l),
        _ => None,
    };
    if let Some(l) = producer.into_iter().chain(g.readers.iter().map(|l| &**l)).find(|l| !matches!(l.kind(), QLinearKind::Float(_))) {
        bail!("layer '{}' is {}: only float layers can be smoothed", l.name(), l.kind_name())
    }
    if let Some(l) = g.readers.iter().find(|l| l.in_features() != s.len()) {
        bail!("layer '{}': {} smoothing factors for {} inputs", l.name(), s.len(), l.in_features())
    }
    let divided = |t: &Tensor| -> Result<Tensor> { t.div(&Tensor::from_slice(s, s.len(), t.device())?.to_dtype(t.dtype())?) };
    match g.source {
        SmoothSource::RmsNorm(norm) => *norm = RmsNorm::new(divided(norm.weight())?, norm.eps()),
        SmoothSource::LayerNorm(norm) => {
            let bias = norm.bias().map(divided).transpose()?;
            let eps = norm.eps();
            *norm = match bias {
                Some(b) => LayerNorm::new(divided(norm.weight())?, b, eps),
                None => LayerNorm::new_no_bias(divided(norm.weight())?, eps),
            };
        }
        SmoothSource::Linear(l) => l.scale_down_output_channels(s)?,
    }
    for l in g.readers {
        l.scale_input_channels(s)?;
    }
    Ok(())
}

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
