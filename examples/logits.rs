//! Logits of a model for given tokens, written as raw little-endian f32 `[tokens, vocab]`: for
//! comparing this toolkit's forward pass with another engine's on the same file
//! (`scripts/check-compressed-tensors.py` reads them beside transformers'). The model loads as
//! stored (float, or quantized as saved: int8 folder, compressed-tensors folder, GGUF).
//!
//! Run: `cargo run --release --example logits -- MODEL 504,3012,314 out.f32`

use anyhow::{bail, Context, Result};
use candle_quant::io::{self, ModelSource};
use candle_quant::models::llama::KvCache;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, tokens, out] = args.as_slice() else { bail!("usage: logits MODEL TOKEN,TOKEN,… OUT.f32") };
    let tokens: Vec<u32> = tokens.split(',').map(|t| t.trim().parse().with_context(|| format!("token '{t}'"))).collect::<Result<_>>()?;
    let lm = io::load_decoder(&ModelSource::parse(model)?, &mut |_| {})?;
    let logits = lm.model.forward(&tokens, &mut KvCache::default(), true)?;
    let values = logits.flatten_all()?.to_vec1::<f32>()?;
    std::fs::write(out, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).with_context(|| format!("writing {out}"))?;
    eprintln!("{} logits ({:?}) written to {out}", values.len(), logits.dims());
    Ok(())
}
