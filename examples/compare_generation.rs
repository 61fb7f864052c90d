//! f32 vs int8 greedy generation on the offline default model (SmolLM2-135M-Instruct), over the
//! library: load, `quantize_dynamic`, generate both, compare speed and text.
//!
//! Run: `scripts/fetch-models.sh && cargo run --release --example compare_generation -- "Your prompt"`

use anyhow::Result;
use candle_quant::convert::{quantize_dynamic, QuantConfig};
use candle_quant::generate::{encode, generate, Sampling};
use candle_quant::io::{self, ModelSource};

fn main() -> Result<()> {
    let prompt = std::env::args().nth(1).unwrap_or_else(|| "The capital of France is".into());
    let path = io::models_dir().join(io::DEFAULT_GGUF);
    let f32_model = io::load_decoder(&ModelSource::Gguf(path), &mut |p| eprint!("\r{}: {}/{}", p.stage, p.done, p.total))?;
    eprintln!();
    let mut int8_model = f32_model.clone();
    let report = quantize_dynamic(&mut int8_model.model, &QuantConfig::default())?;
    println!("{} layers quantized to int8", report.converted.len());

    let tokens = encode(&f32_model, &prompt)?;
    for (label, lm) in [("f32", &f32_model), ("int8", &int8_model)] {
        let g = generate(&lm.model, &lm.tokenizer, &tokens, 48, &Sampling::default(), |_| {})?;
        println!("[{label}] {prompt}{}", g.text);
        println!(
            "[{label}] prefill {:.1} ms, decode {:.1} tok/s, weights {:.1} MB",
            g.stats.prefill_ms,
            g.stats.decode_tok_s,
            lm.model.weight_bytes() as f64 / 1e6
        );
    }
    Ok(())
}
