//! Prefill speed alone (for profiling): loads the offline default model, optionally quantizes
//! it (`quantize_dynamic`, default config), and times `N` prefills of the first `T` tokens of
//! alice29.txt, each on a fresh KV cache. Threads: `RAYON_NUM_THREADS`.
//!
//! Run: `RAYON_NUM_THREADS=1 cargo run --release --example prefill_speed -- int8 5 512`
//! (`f32` instead of `int8` for the float model). Under `perf`, build it with
//! `--profile profiling` (release plus line tables) and record
//! `target/profiling/examples/prefill_speed`.

use anyhow::{bail, Result};
use candle_quant::convert::{quantize_dynamic, QuantConfig};
use candle_quant::io::{self, ModelSource};
use candle_quant::models::llama::KvCache;
use std::time::Instant;

fn main() -> Result<()> {
    candle_quant::runtime::keep_freed_buffers();
    let arg = |i: usize, d: usize| std::env::args().nth(i).map_or(Ok(d), |s| s.parse::<usize>());
    let precision = std::env::args().nth(1).unwrap_or_else(|| "int8".into());
    if !matches!(precision.as_str(), "f32" | "int8" | "int4") {
        bail!("precision '{precision}': expected f32 or int8")
    }
    let (runs, tokens) = (arg(2, 5)?, arg(3, 512)?);
    let path = io::models_dir().join(io::DEFAULT_GGUF);
    let mut lm = io::load_decoder(&ModelSource::Gguf(path), &mut |_| {})?;
    if precision == "int8" {
        quantize_dynamic(&mut lm.model, &QuantConfig::default())?;
    }
    if precision == "int4" {
        let c = QuantConfig::default()
            .weight(candle_quant::WeightQuant::Int4 { group: 32, zero_point: false })
            .override_weight("lm_head", candle_quant::WeightQuant::PerGroup(32));
        quantize_dynamic(&mut lm.model, &c)?;
    }
    let text = std::fs::read_to_string(io::models_dir().join("texts/alice29.txt"))?;
    let encoding = lm.tokenizer.encode(text, false).map_err(anyhow::Error::msg)?;
    let Some(ids) = encoding.get_ids().get(..tokens) else { bail!("alice29.txt holds {} tokens, fewer than {tokens}", encoding.len()) };
    for _ in 0..runs {
        let start = Instant::now();
        let mut cache = KvCache::default();
        lm.model.forward(ids, &mut cache, false)?;
        println!("{precision}: {tokens} tokens in {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}
