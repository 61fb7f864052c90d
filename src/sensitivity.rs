//! Per-layer sensitivity: how much quantizing each linear layer alone moves a language model's
//! predictions, and the fewest layers to keep in float for a perplexity budget.
//!
//! For every layer, a copy of the float model with only that layer quantized is scored against
//! the float model on sample windows ([`crate::eval::evaluate`]: KL of the next-token
//! distributions, perplexity change, top-1 agreement). The layers are then ranked, and
//! [`exclusions_for_budget`] finds the smallest number of the worst layers to leave in float so
//! that the model with every other layer quantized stays within the budget.

use crate::convert::Quantizable;
use crate::eval::{EvalReport, ReferenceScores};
use crate::lm::CausalLm;
use crate::nn::QLinear;
use crate::progress::Progress;
use candle_core::{bail, Result};

/// What quantizing one layer alone does to the model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerSensitivity {
    /// The layer.
    pub name: String,
    /// Mean KL(float ‖ quantized) per token, in nats.
    pub kld: f64,
    /// Perplexity change, in percent.
    pub ppl_delta_pct: f64,
    /// Share of positions where both rank the same token first.
    pub top1_agreement: f64,
}

/// Scores `quantize` applied to each layer of `float` alone against `reference` (the float
/// model's predictions on the sample windows, [`ReferenceScores::new`]), calling
/// `progress` after each layer. Sorted, most damaging first.
pub fn layer_sensitivity<M: CausalLm + Quantizable + Clone>(
    float: &M,
    reference: &ReferenceScores,
    quantize: impl Fn(&mut QLinear) -> Result<()>,
    mut progress: impl FnMut(Progress),
) -> Result<Vec<LayerSensitivity>> {
    let mut names = Vec::new();
    float.clone().visit_linears(&mut |l| {
        names.push(l.name().to_string());
        Ok(())
    })?;
    if names.is_empty() {
        bail!("the model has no linear layers to score")
    }
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let mut candidate = float.clone();
        candidate.visit_linears(&mut |l| {
            if l.name() == name {
                quantize(l).map_err(|e| e.context(format!("layer '{name}'")))
            } else {
                Ok(())
            }
        })?;
        let r = reference.evaluate(&candidate)?;
        out.push(LayerSensitivity { name: name.clone(), kld: r.kld, ppl_delta_pct: r.ppl_delta_pct, top1_agreement: r.top1_agreement });
        progress(Progress::items("quantizing one layer at a time", i + 1, names.len()));
    }
    out.sort_by(|a, b| b.kld.total_cmp(&a.kld));
    Ok(out)
}

/// The fewest of the most damaging layers (`ranked`, worst first) to keep in float so that the
/// model with every other layer quantized by `quantize` moves perplexity by at most
/// `budget_pct` percent against `reference`: a binary search over how many of the worst to keep (the
/// damage falls as more are kept). Returns those layers and the report of that model; when even
/// keeping all but one layer in float misses the budget, every layer is returned.
pub fn exclusions_for_budget<M: CausalLm + Quantizable + Clone>(
    float: &M,
    ranked: &[LayerSensitivity],
    reference: &ReferenceScores,
    budget_pct: f64,
    quantize: impl Fn(&mut QLinear) -> Result<()>,
) -> Result<(Vec<String>, EvalReport)> {
    kept_for_budget(float, ranked, reference, budget_pct, quantize, |_| Ok(()))
}

/// [`exclusions_for_budget`] with the kept layers given `keep` instead of left float — e.g.
/// int8 in a model `quantize` makes int4 (mixed precision). When even keeping every layer
/// misses the budget, every layer is returned.
pub fn kept_for_budget<M: CausalLm + Quantizable + Clone>(
    float: &M,
    ranked: &[LayerSensitivity],
    reference: &ReferenceScores,
    budget_pct: f64,
    quantize: impl Fn(&mut QLinear) -> Result<()>,
    keep: impl Fn(&mut QLinear) -> Result<()>,
) -> Result<(Vec<String>, EvalReport)> {
    let score = |kept: usize| -> Result<EvalReport> {
        let kept: Vec<&str> = ranked[..kept].iter().map(|l| l.name.as_str()).collect();
        let mut candidate = float.clone();
        candidate.visit_linears(&mut |l| if kept.contains(&l.name()) { keep(l) } else { quantize(l) })?;
        reference.evaluate(&candidate)
    };
    let within = |r: &EvalReport| r.ppl_delta_pct.abs() <= budget_pct;
    let (mut lo, mut hi) = (0usize, ranked.len());
    let mut best = score(0)?;
    if within(&best) {
        return Ok((Vec::new(), best));
    }
    // Invariant: keeping `lo` misses the budget; keeping `hi` meets it (all float: Δ = 0; kept
    // at another precision it may not, and then every layer is the answer).
    best = score(hi)?;
    if !within(&best) {
        return Ok((ranked.iter().map(|l| l.name.clone()).collect(), best));
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let r = score(mid)?;
        if within(&r) {
            (hi, best) = (mid, r);
        } else {
            lo = mid;
        }
    }
    Ok((ranked[..hi].iter().map(|l| l.name.clone()).collect(), best))
}
