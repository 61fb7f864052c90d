//! Decoding speed over a fixed number of tokens, end of text ignored: loads the offline default
//! model, optionally quantizes it (`quantize_dynamic`, default config), prefills a short prompt
//! and times `N` greedy single-token steps on the KV cache. Threads: `RAYON_NUM_THREADS`.
//!
//! Run: `RAYON_NUM_THREADS=1 cargo run --release --example decode_speed -- int8 300`
//! (`f32` instead of `int8` for the float model).

use anyhow::{bail, Result};
use candle_quant::convert::{quantize_dynamic, QuantConfig};
use candle_quant::generate::encode;
use candle_quant::io::{self, ModelSource};
use candle_quant::models::llama::{KvCache, Llama};
use std::time::Instant;

fn main() -> Result<()> {
    candle_quant::runtime::keep_freed_buffers();
    let precision = std::env::args().nth(1).unwrap_or_else(|| "int8".into());
    if !matches!(precision.as_str(), "f32" | "int8") {
        bail!("precision '{precision}': expected f32 or int8")
    }
    let steps = match std::env::args().nth(2) {
        Some(s) => s.parse::<usize>().map_err(|e| anyhow::anyhow!("token count '{s}': {e}"))?,
        None => 300,
    };
    let path = io::models_dir().join(io::DEFAULT_GGUF);
    let mut lm = io::load_decoder(&ModelSource::Gguf(path), &mut |p| eprint!("\r{}: {}/{}", p.stage, p.done, p.total))?;
    eprintln!();
    if precision == "int8" {
        quantize_dynamic(&mut lm.model, &QuantConfig::default())?;
    }
    let mut cache = KvCache::default();
    let prompt = encode(&lm, "Chapter 1. It was a cold morning in the old town, and")?;
    let mut next = Llama::argmax(&lm.model.forward(&prompt, &mut cache, false)?)?;
    let start = Instant::now();
    for _ in 0..steps {
        next = Llama::argmax(&lm.model.forward(&next, &mut cache, false)?)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{precision}: {steps} tokens after a {}-token prompt, {:.1} tok/s", prompt.len(), steps as f64 / secs);
    Ok(())
}
