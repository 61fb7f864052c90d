//! `embed`: sentence embeddings of a file's lines with a BERT encoder, batched.

use crate::args::{quant_config, Mode, ModelArgs, Precision};
use crate::fetch::fetch_offline_models;
use crate::progress::{bar, Bars};
use crate::writers::write_embeddings;
use anyhow::{bail, Context, Result};
use candle_quant::io::{self, ModelSource};
use std::path::Path;

/// The `embed` command: every non-empty line of `file` embedded, in batches of sentences of
/// similar length (sorted by token count, written back in file order).
pub fn run(args: &ModelArgs, file: &Path, batch: usize, precision: Precision, out: Option<&Path>, json: bool) -> Result<()> {
    if let Some(out) = out.filter(|o| !matches!(o.extension().and_then(|e| e.to_str()), Some("jsonl" | "safetensors"))) {
        bail!("{}: the embeddings file must end in .jsonl or .safetensors", out.display())
    }
    let source = match &args.model {
        Some(spec) => ModelSource::parse(spec)?,
        None => {
            let dir = io::models_dir().join("all-MiniLM-L6-v2");
            if !dir.is_dir() {
                fetch_offline_models()?;
            }
            ModelSource::Folder(dir)
        }
    };
    let mut enc = Bars::around(|p| io::load_bert(&source, p)).with_context(|| format!("loading {source}"))?;
    if precision == Precision::Int8 {
        let cfg = quant_config(args)?;
        if args.mode == Mode::Static {
            bail!("embed: --mode static is for language models (calibrate runs text through a decoder)")
        }
        args.mode.convert(&mut enc.model, &cfg, None)?;
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        bail!("{}: no sentences (one per line)", file.display())
    }
    let max_len = enc.model.max_len();
    let mut ids = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let mut t =
            enc.tokenizer.encode(*l, true).map_err(|e| anyhow::anyhow!("{}: line {}: {e}", file.display(), i + 1))?.get_ids().to_vec();
        t.truncate(max_len);
        ids.push(t);
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let pb = bar(ids.len(), "embedding sentences");
    let start = std::time::Instant::now();
    let mut rows: Vec<Vec<f32>> = vec![vec![]; ids.len()];
    for chunk in order.chunks(batch) {
        let b: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
        let e = enc.model.embed_batch(&b)?.to_vec2::<f32>()?;
        for (&i, row) in chunk.iter().zip(e) {
            rows[i] = row;
        }
        pb.inc(chunk.len() as u64);
    }
    let seconds = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    if let Some(out) = out {
        write_embeddings(out, &rows)?;
    }
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let rate = lines.len() as f64 / seconds;
    let label = if precision == Precision::Int8 { "int8" } else { "f32" };
    if json {
        let v = serde_json::json!({"model": source.to_string(), "precision": label, "sentences": lines.len(), "tokens": tokens,
            "batch_size": batch, "seconds": seconds, "sentences_per_s": rate, "out": out.map(|o| o.display().to_string())});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{} sentences ({tokens} tokens) embedded in {seconds:.2} s by {label} {source}: {rate:.1} sentences/s", lines.len());
        if let Some(out) = out {
            println!("embeddings written to {}", out.display());
        }
    }
    Ok(())
}
