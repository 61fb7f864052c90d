//! AWQ: activation-aware scaling of input channels before weights are rounded
//! (Lin et al., 2023).
//!
//! For a linear layer `y = W·x` and any positive `s`, `y = (W·diag(s))·(x / s)`. Rounding
//! `W·diag(s)` instead of `W` magnifies the columns of channels with large inputs before each
//! group's scale is set, so their weights get relatively finer steps, at the expense of the
//! quiet channels. For each group of layers that read one input, AWQ tries
//!
//! `s_j = a_j^α / √(max_j a_j^α · min_j a_j^α)`,  `α = 0, 1/20, …, 19/20`,
//!
//! with `a_j` the root mean square of input channel `j` on calibration inputs, and keeps the `α`
//! whose rounded weights give the least output error on those inputs:
//!
//! `E(α) = Σ_layers Σ_rows δ·H·δᵀ`,  `δ = w − Q(w·s) / s`,  `H = Σ x·xᵀ`
//!
//! (`H` is GPTQ's Hessian, so one calibration pass serves both methods). `α = 0` is plain round
//! to nearest, so AWQ never does worse than it on the calibration inputs. The division by `s`
//! is folded into what produces the input ([`crate::smooth::fold_factors`], as SmoothQuant's
//! factors are): the float model computes the same function, and checkpoints need nothing new.
//! The published method measures `a_j` as the mean `|x_j|` and the error on whole blocks' outputs;
//! here both come from `H`.

use crate::convert::QuantConfig;
use crate::gptq::Hessian;
use crate::kernels::{quantize_weight_rows, WeightQuant};
use crate::smooth::{fold_factors, Smoothable, SmoothingFactors};
use candle_core::{bail, DType, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Exponents tried: `α = i / GRID` for `i` in `0..GRID`.
pub const GRID: usize = 20;

/// Smallest factor before normalisation, so that channels no input reached keep finite columns.
const MIN_FACTOR: f32 = 1e-4;

/// What AWQ chose for one group of layers that read one input.
#[derive(Debug, Clone, PartialEq)]
pub struct AwqGroup {
    /// The group's first layer, which keys its factors.
    pub layer: String,
    /// The exponent kept (0: round to nearest was best, and nothing was folded).
    pub alpha: f32,
    /// `E(α)` kept, over the group's rounded layers.
    pub error: f64,
    /// `E(0)`: round to nearest.
    pub rtn_error: f64,
}

/// What [`awq`] did.
#[derive(Debug, Default)]
pub struct AwqReport {
    /// The factors folded, keyed by each group's first layer (as [`crate::smooth::apply_smoothing`] takes them).
    pub factors: SmoothingFactors,
    /// Every group searched.
    pub groups: Vec<AwqGroup>,
    /// Groups left alone, each with why.
    pub skipped: Vec<String>,
}

/// A layer of a group that will be rounded: its float weight and input second moment.
struct Rounded {
    name: String,
    /// Where its Hessian is shared (rescaled when the group is folded).
    handle: Arc<Mutex<Hessian>>,
    how: WeightQuant,
    weight: Tensor,
    hessian: Tensor,
}

/// AWQ over every group of `model` that has a layer `config` makes int4: each group's factors
/// searched from its layers' Hessians ([`crate::gptq::collect_hessians`]) and folded into the
/// float model, one group after another. The Hessians of the layers scaled are rescaled to the
/// inputs they now see, `H / (s·sᵀ)`, so [`crate::gptq::quantize_gptq`] may round the scaled
/// weights next; otherwise the usual conversion rounds them to nearest. Layers without a
/// Hessian (not selected, so kept float) take the factors exactly. `progress(done, total)`
/// after each group. Every layer of a group and its producer must still be float; an error
/// names the layer and leaves the groups before it scaled (the float function unchanged).
pub fn awq(
    model: &mut (impl Smoothable + ?Sized),
    config: &QuantConfig,
    hessians: &HashMap<String, Arc<Mutex<Hessian>>>,
    mut progress: impl FnMut(usize, usize),
) -> Result<AwqReport> {
    let mut total = 0;
    model.visit_smoothing_groups(&mut |_| {
        total += 1;
        Ok(())
    })?;
    let mut report = AwqReport::default();
    let mut done = 0;
    model.visit_smoothing_groups(&mut |g| {
        done += 1;
        let Some(key) = g.readers.first().map(|l| l.name().to_string()) else { return Ok(()) };
        let mut rounded = Vec::new();
        for l in &g.readers {
            let Some(handle) = hessians.get(l.name()) else { continue };
            let Some(hessian) = Hessian::locked(handle)?.sum.clone() else { bail!("AWQ: layer '{}' saw no calibration input", l.name()) };
            let weight = l.float_equivalent()?.weight().to_dtype(DType::F32)?;
            rounded.push(Rounded { name: l.name().to_string(), handle: handle.clone(), how: config.weight_for(l.name()), weight, hessian });
        }
        if !rounded.iter().any(|r| r.how.bits() == 4) {
            report.skipped.push(format!("{key}: no layer of its group has int4 weights"));
            progress(done, total);
            return Ok(());
        }
        let rms = channel_rms(&rounded[0].hessian)?;
        let mut kept: Option<(f64, f32, Vec<f32>)> = None;
        let mut rtn_error = 0.0;
        for i in 0..GRID {
            let alpha = i as f32 / GRID as f32;
            let s = awq_factors(&rms, alpha);
            let mut error = 0.0;
            for r in &rounded {
                error += scaled_rounding_error(r, &s).map_err(|e| e.context(format!("AWQ: layer '{}'", r.name)))?;
            }
            if i == 0 {
                rtn_error = error;
            }
            if kept.as_ref().is_none_or(|(best, _, _)| error < *best) {
                kept = Some((error, alpha, s));
            }
        }
        let Some((error, alpha, s)) = kept else { return Ok(()) };
        if alpha > 0.0 {
            fold_factors(g, &s)?;
            let col = Tensor::from_slice(&s, (s.len(), 1), &candle_core::Device::Cpu)?;
            for r in &rounded {
                Hessian::locked(&r.handle)?.sum = Some(r.hessian.broadcast_div(&col)?.broadcast_div(&col.t()?)?);
            }
            report.factors.insert(key.clone(), s);
        }
        report.groups.push(AwqGroup { layer: key, alpha, error, rtn_error });
        progress(done, total);
        Ok(())
    })?;
    Ok(report)
}

/// `√(H_jj / rows)` up to a common factor (which the factors' normalisation takes out): each
/// input channel's root mean square.
fn channel_rms(h: &Tensor) -> Result<Vec<f32>> {
    let k = h.dim(0)?;
    let v = h.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..k).map(|j| v[j * k + j].max(0.0).sqrt()).collect())
}

/// `s_j = max(a_j^α, 1e-4)`, normalised by `√(max s · min s)` so the factors straddle 1.
pub fn awq_factors(magnitude: &[f32], alpha: f32) -> Vec<f32> {
    let top = magnitude.iter().copied().fold(0f32, f32::max);
    if top <= 0.0 {
        return vec![1.0; magnitude.len()];
    }
    let s: Vec<f32> = magnitude.iter().map(|&a| (a / top).powf(alpha).max(MIN_FACTOR)).collect();
    let (lo, hi) = s.iter().fold((f32::MAX, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (lo * hi).sqrt();
    s.into_iter().map(|v| v / norm).collect()
}

/// `Σ_rows δ·H·δᵀ` with `δ = w − Q(w·diag(s))·diag(s)⁻¹`: the output error on the calibration
/// inputs of rounding the layer's weight scaled by `s`.
fn scaled_rounding_error(r: &Rounded, s: &[f32]) -> Result<f64> {
    let (n, k) = r.weight.dims2()?;
    if s.len() != k || r.hessian.dims() != [k, k] {
        bail!("{k} inputs, {} factors and a Hessian of {:?}", s.len(), r.hessian.dims())
    }
    let device = r.weight.device();
    let row = Tensor::from_slice(s, (1, k), device)?;
    let scaled = r.weight.broadcast_mul(&row)?.flatten_all()?.to_vec1::<f32>()?;
    let rounded = Tensor::from_vec(quantize_weight_rows(&scaled, n, k, r.how)?.dequantized(), (n, k), device)?;
    let delta = (&r.weight - rounded.broadcast_div(&row)?)?;
    let error = (delta.matmul(&r.hessian)? * &delta)?.sum_all()?.to_scalar::<f32>()?;
    Ok(error as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_straddle_one_and_follow_the_exponent() {
        // a = [1, 4, 16], α = 0.5: (a / 16)^0.5 = [0.25, 0.5, 1]; normalised by √(0.25 · 1) = 0.5
        // → [0.5, 1, 2].
        let s = awq_factors(&[1.0, 4.0, 16.0], 0.5);
        for (got, want) in s.iter().zip([0.5f32, 1.0, 2.0]) {
            assert!((got - want).abs() < 1e-6, "{s:?}");
        }
        // α = 0 is no scaling at all; a channel never reached keeps a finite factor.
        assert_eq!(awq_factors(&[3.0, 0.0, 7.0], 0.0), vec![1.0; 3]);
        assert!(awq_factors(&[3.0, 0.0, 7.0], 0.9).iter().all(|v| v.is_finite() && *v > 0.0));
        assert_eq!(awq_factors(&[0.0, 0.0], 0.7), vec![1.0; 2]);
    }

    #[test]
    fn rounding_error_is_the_output_error_on_the_inputs() {
        // E = Σ_rows δ·H·δᵀ must equal ‖X·δᵀ‖² for H = Xᵀ·X, with the weight and inputs drawn.
        let (n, k, t) = (8usize, 32usize, 40usize);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0).collect();
        let device = candle_core::Device::Cpu;
        let xt = Tensor::from_vec(x, (t, k), &device).unwrap();
        let weight = Tensor::from_vec(w.clone(), (n, k), &device).unwrap();
        let hessian = xt.t().unwrap().matmul(&xt).unwrap();
        let how = WeightQuant::Int4 { group: 16, zero_point: false };
        let r = Rounded { name: "l".into(), handle: Default::default(), how, weight: weight.clone(), hessian };
        let s: Vec<f32> = (0..k).map(|j| 0.5 + (j % 5) as f32 * 0.3).collect();
        let got = scaled_rounding_error(&r, &s).unwrap();
        let row = Tensor::from_slice(&s, (1, k), &device).unwrap();
        let scaled = weight.broadcast_mul(&row).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_weight_rows(&scaled, n, k, how).unwrap().dequantized();
        let q = Tensor::from_vec(q, (n, k), &device).unwrap().broadcast_div(&row).unwrap();
        let delta = (weight - q).unwrap();
        let want = xt.matmul(&delta.t().unwrap()).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(want > 0.0);
        assert!((got - want).abs() <= 1e-3 * want, "{got} vs {want}");
    }
}
