//! `sensitivity`: each linear layer quantized alone and scored against the float model, worst
//! first, and the fewest layers to keep in float for a perplexity budget.

use crate::args::{int8_layer_weights, quant_config, Mode, ModelArgs};
use crate::models::{load_float, smoothed_for_static};
use crate::progress::bar;
use anyhow::{bail, Context, Result};
use candle_quant::convert::Quantizable;
use candle_quant::generate::encode_text;
use std::path::Path;

/// `sensitivity`: every layer quantized alone (as `--mode` says), worst first, and the fewest
/// layers to keep in float for the budget.
pub fn run(model: &ModelArgs, text: &Path, samples: usize, seq_len: usize, budget: f64, top: usize, json: bool) -> Result<()> {
    if samples == 0 || seq_len < 2 {
        bail!("sensitivity: --samples must be at least 1 and --seq-len at least 2 (got {samples} and {seq_len})")
    }
    let mut lm = load_float(model.model.as_deref(), "sensitivity")?;
    let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut tokens = encode_text(&lm, &body)?;
    tokens.truncate(samples * (seq_len - candle_quant::CausalLm::bos_token(&lm.model).is_some() as usize));
    let cfg = quant_config(model)?;
    // A smoothed calibration measures the smoothed model (the same float function).
    let calibration = if model.mode == Mode::Static { Some(smoothed_for_static(model, &mut lm.model)?) } else { None };
    let int4 = model.bits == 4;
    // Int4: every layer ranked at int4 (the --int8-layers default does not apply), the kept
    // ones int8 in the same mode.
    let quantize = |l: &mut candle_quant::QLinear| match int4 {
        true => quantize_as(l, &cfg, cfg.weight, model.mode == Mode::WeightOnly),
        false => model.mode.quantize_layer(l, &cfg, calibration.as_ref()),
    };
    let keep = |l: &mut candle_quant::QLinear| match int4 {
        true => quantize_as(l, &cfg, int8_layer_weights(model), model.mode == Mode::WeightOnly),
        false => Ok(()),
    };
    let mut layers = 0;
    lm.model.clone().visit_linears(&mut |_| {
        layers += 1;
        Ok(())
    })?;
    let pb = bar(layers, "quantizing one layer at a time");
    let reference = candle_quant::eval::ReferenceScores::new(&lm.model, &tokens, seq_len)?;
    let ranked = candle_quant::sensitivity::layer_sensitivity(&lm.model, &reference, quantize, |p| pb.set_position(p.done))?;
    pb.finish_and_clear();
    let pb = bar(0, "searching the exclusions");
    let (exclude, with) = candle_quant::sensitivity::kept_for_budget(&lm.model, &ranked, &reference, budget, quantize, keep)?;
    pb.finish_and_clear();
    if json {
        let out = serde_json::json!({"model": lm.source, "text": text.display().to_string(), "tokens": tokens.len(), "window": seq_len,
            "budget_pct": budget, "layers": ranked, "exclude": exclude, "with_exclusions": with});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("Each linear layer quantized alone, scored against the float model on {} tokens of {}:", tokens.len(), text.display());
    println!("{:>4}  {:<40} {:>10} {:>12} {:>10}", "rank", "layer", "KL", "perplexity", "same top");
    for (i, l) in ranked.iter().take(top).enumerate() {
        println!("{:>4}  {:<40} {:>10.5} {:>+11.2}% {:>9.1}%", i + 1, l.name, l.kld, l.ppl_delta_pct, 100.0 * l.top1_agreement);
    }
    println!(
        "KL: how far the model's next-token probabilities move (0 = not at all); perplexity: how much less sure it becomes of the actual text; same top: how often it still ranks the same next token first."
    );
    if exclude.is_empty() {
        println!(
            "With every layer quantized the perplexity moves {:+.2}%, within the {budget}% budget: nothing needs to stay float.",
            with.ppl_delta_pct
        );
    } else {
        let (at, flag) = if int4 { ("int8", "--int8-layers") } else { ("float", "--exclude") };
        println!("To stay within {budget}% perplexity, keep these {} layers {at}:", exclude.len());
        let flags: Vec<String> = exclude.iter().map(|n| format!("{flag} '{n}'")).collect();
        println!("  {}", flags.join(" "));
        println!(
            "(every other layer quantized: perplexity {:+.2}%, KL {:.5}, same top {:.1}% on the same tokens)",
            with.ppl_delta_pct,
            with.kld,
            100.0 * with.top1_agreement
        );
    }
    Ok(())
}

/// `l` dynamic (or weight-only) with weights `weight` and `cfg`'s activation scheme.
fn quantize_as(
    l: &mut candle_quant::QLinear,
    cfg: &candle_quant::QuantConfig,
    weight: candle_quant::WeightQuant,
    weight_only: bool,
) -> candle_core::Result<()> {
    match weight_only {
        true => l.quantize_weight_only(weight),
        false => l.quantize_dynamic(cfg.activation_for(l.name()), weight, cfg.outlier_threshold),
    }
}
