//! Quantization-aware training on all-MiniLM-L6-v2: `prepare_qat` (fake-quantized weights and
//! activations, trainable weights) → distil towards the f32 embeddings for a few steps →
//! `convert` to static int8; compared with static int8 from plain calibration.
//!
//! Run: `scripts/fetch-models.sh && cargo run --release --example qat_finetune`

use anyhow::{Error, Result};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use candle_quant::convert::{convert, prepare, prepare_qat, qat_vars, QuantConfig};
use candle_quant::io::{self, ModelSource};
use candle_quant::models::bert::Bert;

#[path = "common/sentences.rs"]
mod sentences;
use sentences::{CALIBRATION, HELD_OUT};

fn main() -> Result<()> {
    let enc = io::load_bert(&ModelSource::Folder(io::models_dir().join("all-MiniLM-L6-v2")), &mut |_| {})?;
    let ids = |s: &str| -> Result<Vec<u32>> { Ok(enc.tokenizer.encode(s, true).map_err(Error::msg)?.get_ids().to_vec()) };
    let targets: Vec<_> = CALIBRATION.iter().map(|s| enc.model.embed(&ids(s)?).map_err(Error::from)).collect::<Result<_>>()?;

    // Baseline: static int8 from calibration only.
    let mut calibrated = enc.model.clone();
    prepare(&mut calibrated, &QuantConfig::default())?;
    for s in CALIBRATION {
        calibrated.embed(&ids(s)?)?;
    }
    convert(&mut calibrated)?;

    // QAT: the same observers, plus trainable weights under fake quantization.
    let mut qat = enc.model.clone();
    prepare_qat(&mut qat, &QuantConfig::default())?;
    // candle's fused layer norm and softmax have no backward pass: use differentiable ones.
    qat.set_differentiable(true);
    let vars = qat_vars(&mut qat)?;
    let mut opt = AdamW::new(vars, ParamsAdamW { lr: 1e-6, weight_decay: 0.0, ..Default::default() })?;
    for epoch in 0..4 {
        let mut total = 0f32;
        for (s, target) in CALIBRATION.iter().zip(&targets) {
            // Loss: 1 - cos(f32 embedding, QAT embedding); both are unit length.
            let emb = qat.embed(&ids(s)?)?;
            let loss = (1.0 - (emb * target)?.sum_all()?)?;
            total += loss.to_scalar::<f32>()?;
            opt.backward_step(&loss)?;
        }
        println!("epoch {epoch}: mean 1 - cos = {:.6}", total / CALIBRATION.len() as f32);
    }
    convert(&mut qat)?;
    qat.set_differentiable(false);

    for s in HELD_OUT {
        let reference = enc.model.embed(&ids(s)?)?;
        let (a, b) = (Bert::cosine(&reference, &calibrated.embed(&ids(s)?)?)?, Bert::cosine(&reference, &qat.embed(&ids(s)?)?)?);
        println!("cos vs f32: static {a:.5}, QAT → static {b:.5}  — {s}");
    }
    Ok(())
}
