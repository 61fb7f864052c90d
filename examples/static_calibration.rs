//! Static quantization of all-MiniLM-L6-v2: `prepare` (observers on every linear input) →
//! run calibration sentences → `convert` (int8 weights and activations with fixed scales), then
//! compare sentence embeddings with f32 and with dynamic int8.
//!
//! Run: `scripts/fetch-models.sh && cargo run --release --example static_calibration`

use anyhow::{Error, Result};
use candle_quant::convert::{convert, prepare, quantize_dynamic, QuantConfig};
use candle_quant::io::{self, ModelSource};
use candle_quant::models::bert::Bert;
use candle_quant::observer::{HistogramObserver, MinMaxObserver, Observer};
use candle_quant::quant::{QDType, QScheme, QSpec};

#[path = "common/sentences.rs"]
mod sentences;
use sentences::{CALIBRATION, HELD_OUT};

fn histogram() -> Box<dyn Observer> {
    Box::new(HistogramObserver::new(QSpec::new(QDType::QInt8, QScheme::Affine), 2048).expect("2048 bins is valid"))
}

fn minmax() -> Box<dyn Observer> {
    Box::new(MinMaxObserver::new(QSpec::new(QDType::QInt8, QScheme::Affine)))
}

fn main() -> Result<()> {
    let enc = io::load_bert(&ModelSource::Folder(io::models_dir().join("all-MiniLM-L6-v2")), &mut |_| {})?;
    let ids = |s: &str| -> Result<Vec<u32>> { Ok(enc.tokenizer.encode(s, true).map_err(Error::msg)?.get_ids().to_vec()) };
    let mut dynamic = enc.model.clone();
    quantize_dynamic(&mut dynamic, &QuantConfig::default())?;
    let mut variants = vec![("dynamic int8", dynamic)];
    for (label, factory) in [("static int8, min/max", minmax as fn() -> Box<dyn Observer>), ("static int8, histogram", histogram)] {
        let mut m = enc.model.clone();
        prepare(&mut m, &QuantConfig::default().observer(factory))?;
        for (i, s) in CALIBRATION.iter().enumerate() {
            m.embed(&ids(s)?)?;
            eprint!("\r{label}: calibrated on {}/{} sentences", i + 1, CALIBRATION.len());
        }
        eprintln!();
        let report = convert(&mut m)?;
        println!("{label}: {} layers converted", report.converted.len());
        variants.push((label, m));
    }
    for s in HELD_OUT {
        let reference = enc.model.embed(&ids(s)?)?;
        let cells: Vec<String> = variants
            .iter()
            .map(|(label, m)| Ok(format!("{label} {:.5}", Bert::cosine(&reference, &m.embed(&ids(s)?)?)?)))
            .collect::<Result<_>>()?;
        println!("cos vs f32: {}  — {s}", cells.join(", "));
    }
    Ok(())
}
