//! `compare`: greedy generation in f32 and int8 side by side, as a table or JSON.

use crate::args::{GenArgs, ModelArgs};
use crate::models::{candidate_label, model_pair, prompt_tokens};
use anyhow::{Context, Result};
use candle_quant::convert::Quantizable;
use candle_quant::generate::{compare, Generation, Side};
use candle_quant::io::LanguageModel;
use std::io::Write;
use std::path::Path;

/// `compare`: f32 and int8 side by side ([`candle_quant::generate::compare`]), as a table or JSON.
pub fn run(model: &ModelArgs, reference: Option<&str>, gen: &GenArgs, repeats: usize, json: bool) -> Result<()> {
    let (lm, mut q, report) = model_pair(model, reference, "compare")?;
    let (tokens, _) = prompt_tokens(&lm, gen)?;
    let label = candidate_label(model, &mut q)?;
    let mut side = None;
    let c = compare(&lm.model, &q.model, &lm.tokenizer, &tokens, gen.max_new_tokens, repeats, |s, piece| {
        if json {
            return;
        }
        if side != Some(s) {
            if side.is_some() {
                println!();
            }
            eprintln!("--- {} ---", if s == Side::Reference { "f32" } else { label });
            side = Some(s);
        }
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    if json {
        let side = |g: &Generation, m: &LanguageModel| serde_json::json!({"text": g.text, "prefill_ms": g.stats.prefill_ms, "decode_tok_s": g.stats.decode_tok_s, "weight_bytes": m.model.weight_bytes()});
        let out = serde_json::json!({
            "model": q.source,
            "reference": lm.source,
            "prompt_tokens": tokens.len(),
            "new_tokens": c.reference.tokens.len(),
            "f32": side(&c.reference, &lm),
            "int8": side(&c.candidate, &q),
            "decode_speedup": c.decode_speedup,
            "decode_speedups": c.decode_speedups,
            "repeats": repeats,
            "first_divergence": c.first_divergence,
            "top1_agreement": c.top1_agreement,
            "quantized_layers": report.converted.len(),
            "skipped_layers": report.skipped,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!();
    println!("{:<6} {:>12} {:>14} {:>14}", "", "prefill ms", "decode tok/s", "weight MB");
    for (label, g, m) in [("f32", &c.reference, &lm), (label, &c.candidate, &q)] {
        println!("{label:<6} {:>12.1} {:>14.1} {:>14.1}", g.stats.prefill_ms, g.stats.decode_tok_s, m.model.weight_bytes() as f64 / 1e6);
    }
    let speedup = c.decode_speedup;
    if repeats > 1 {
        let each: Vec<String> = c.decode_speedups.iter().map(|s| format!("{s:.2}")).collect();
        println!("decode speedup {label}/f32: {speedup:.2}x (median of {repeats} alternating runs: {})", each.join(", "));
    } else {
        println!("decode speedup {label}/f32: {speedup:.2}x");
    }
    match c.first_divergence {
        Some(p) => println!("outputs first differ at generated token {p}"),
        None => println!("outputs are identical"),
    }
    if let Some(a) = c.top1_agreement {
        println!("top-1 agreement of {label} with f32 along the f32 text: {:.1}%", a * 100.0);
    }
    println!("layers: {}; {} kept float {:?}", layer_kinds(&mut q)?, report.skipped.len(), report.skipped);
    Ok(())
}

/// How many linear layers of each kind `m` has, e.g. `210 int4-dynamic, 1 int8-dynamic`.
fn layer_kinds(m: &mut LanguageModel) -> Result<String> {
    let mut kinds: Vec<(&'static str, usize)> = Vec::new();
    m.model.visit_linears(&mut |l| {
        match kinds.iter_mut().find(|(k, _)| *k == l.kind_name()) {
            Some((_, n)) => *n += 1,
            None => kinds.push((l.kind_name(), 1)),
        }
        Ok(())
    })?;
    Ok(kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", "))
}

/// `compare --prompts FILE`: greedy f32 and int8 on every chat message of a prompt set; counts
/// the prompts whose int8 text equals f32's, with where each first differs.
pub fn run_prompt_set(
    model: &ModelArgs,
    reference: Option<&str>,
    path: &Path,
    max_new_tokens: usize,
    repeats: usize,
    json: bool,
) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the prompt set {}", path.display()))?;
    let prompts: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    if prompts.is_empty() {
        anyhow::bail!("the prompt set {} holds no prompt (one per line; # starts a comment)", path.display())
    }
    let (lm, q, _) = model_pair(model, reference, "compare")?;
    let mut rows = Vec::with_capacity(prompts.len());
    for (p, prompt) in prompts.iter().enumerate() {
        let gen =
            GenArgs { prompt: prompt.to_string(), max_new_tokens, no_chat_template: false, prompt_file: None, max_prompt_tokens: None };
        let (tokens, _) = prompt_tokens(&lm, &gen)?;
        let c = compare(&lm.model, &q.model, &lm.tokenizer, &tokens, max_new_tokens, repeats, |_, _| {})?;
        eprintln!(
            "prompt {}/{}: {}",
            p + 1,
            prompts.len(),
            c.first_divergence.map_or("identical".to_string(), |d| format!("differs at token {d}"))
        );
        rows.push((prompt, c));
    }
    let same = rows.iter().filter(|(_, c)| c.first_divergence.is_none()).count();
    let agreements: Vec<f64> = rows.iter().filter_map(|(_, c)| c.top1_agreement).collect();
    let mean_agreement = agreements.iter().sum::<f64>() / agreements.len().max(1) as f64;
    if json {
        let each: Vec<_> = rows
            .iter()
            .map(|(prompt, c)| {
                serde_json::json!({"prompt": prompt, "first_divergence": c.first_divergence, "top1_agreement": c.top1_agreement,
                    "f32": c.reference.text, "int8": c.candidate.text})
            })
            .collect();
        let out = serde_json::json!({"model": q.source, "reference": lm.source, "prompts": rows.len(), "identical": same,
            "mean_top1_agreement": mean_agreement, "max_new_tokens": max_new_tokens, "each": each});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for (prompt, c) in &rows {
        let at = c.first_divergence.map_or("same".to_string(), |d| format!("token {d}"));
        println!("{at:>10}  {prompt}");
    }
    println!("int8 greedy text equal to f32's on {same} of {} prompts ({max_new_tokens} new tokens each); mean top-1 agreement along f32's text {:.1}%", rows.len(), mean_agreement * 100.0);
    Ok(())
}
