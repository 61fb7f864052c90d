//! `eval`: perplexity, KL and top-1 agreement of int8 against f32 on a text.

use crate::args::ModelArgs;
use crate::models::{candidate_label, model_pair};
use crate::progress::bar;
use anyhow::{Context, Result};
use candle_quant::convert::Quantizable;
use candle_quant::eval::{evaluate, EvalReport};
use candle_quant::generate::encode_text;
use std::path::Path;

/// `eval`: perplexity, KL and top-1 agreement of int8 against f32 on a text.
pub fn run(model: &ModelArgs, reference: Option<&str>, text: &Path, max_tokens: usize, window: usize, json: bool) -> Result<()> {
    let (lm, mut q, report) = model_pair(model, reference, "eval")?;
    let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut tokens = encode_text(&lm, &body)?;
    tokens.truncate(max_tokens);
    let pb = bar(tokens.len().div_ceil(window.max(1)), "evaluating windows");
    let r: EvalReport = evaluate(&lm.model, &q.model, &tokens, window, |p| {
        pb.set_length(p.total);
        pb.set_position(p.done)
    })?;
    pb.finish_and_clear();
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = q.source.clone().into();
        v["reference"] = lm.source.clone().into();
        v["text"] = text.display().to_string().into();
        v["window"] = window.into();
        v["quantized_layers"] = report.converted.len().into();
        v["skipped_layers"] = serde_json::to_value(&report.skipped)?;
        let (clamped, in_float) = static_range_misses(&mut q.model)?;
        v["clamped_activations"] = clamped.into();
        v["float_activations"] = in_float.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{} tokens of {} in windows of {window}", r.tokens, text.display());
        let label = candidate_label(model, &mut q)?;
        println!("perplexity f32 {:.3}, {label} {:.3} ({:+.2}%)", r.reference_ppl, r.candidate_ppl, r.ppl_delta_pct);
        println!("mean KL(f32 || {label}) {:.5} nats, top-1 agreement {:.2}%", r.kld, r.top1_agreement * 100.0);
    }
    Ok(())
}

/// Inputs the model's static layers found outside their calibrated ranges so far: clamped
/// (per-tensor ranges) and multiplied in float (per-group ranges).
fn static_range_misses(model: &mut candle_quant::models::Decoder) -> Result<(u64, u64)> {
    let (mut clamped, mut in_float) = (0, 0);
    model.visit_linears(&mut |l| {
        clamped += l.clamped_activations();
        in_float += l.float_activations();
        Ok(())
    })?;
    Ok((clamped, in_float))
}
