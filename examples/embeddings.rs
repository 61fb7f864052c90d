//! Sentence embeddings from all-MiniLM-L6-v2 in f32 and int8: their cosine, and the
//! similarity matrix of a few sentences in both precisions.
//!
//! Run: `scripts/fetch-models.sh && cargo run --release --example embeddings`

use anyhow::{Error, Result};
use candle_quant::convert::{quantize_dynamic, QuantConfig};
use candle_quant::io::{self, ModelSource};
use candle_quant::models::bert::Bert;

#[path = "common/sentences.rs"]
mod sentences;
use sentences::HELD_OUT;

fn main() -> Result<()> {
    let enc = io::load_bert(&ModelSource::Folder(io::models_dir().join("all-MiniLM-L6-v2")), &mut |_| {})?;
    let mut int8 = enc.model.clone();
    quantize_dynamic(&mut int8, &QuantConfig::default())?;
    let sentences = HELD_OUT;
    let mut f = vec![];
    let mut q = vec![];
    for s in sentences {
        let ids = enc.tokenizer.encode(s, true).map_err(Error::msg)?.get_ids().to_vec();
        f.push(enc.model.embed(&ids)?);
        q.push(int8.embed(&ids)?);
        println!("cos(f32, int8) = {:.5}  {s}", Bert::cosine(&f[f.len() - 1], &q[q.len() - 1])?);
    }
    println!("\nsimilarity matrix, f32 / int8:");
    for i in 0..sentences.len() {
        let row: Vec<String> = (0..sentences.len())
            .map(|j| Ok(format!("{:.3}/{:.3}", Bert::cosine(&f[i], &f[j])?, Bert::cosine(&q[i], &q[j])?)))
            .collect::<Result<_>>()?;
        println!("{}", row.join("  "));
    }
    Ok(())
}
