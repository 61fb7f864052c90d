//! The 4×4 tour: a float `Linear(4, 4)` quantized dynamically to int8, run on a random input.
//! The candle counterpart of
//! `torch.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`.
//!
//! Run: `cargo run --release --example quantize_linear`

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_quant::{quantize_dynamic, QLinear, QLinearKind, QuantConfig};

fn main() -> Result<()> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    // Random init, the way candle_nn::linear initialises a fresh layer.
    let mut layer = QLinear::load(4, 4, true, vb.pp("fc"))?;
    let float = layer.clone();

    let report = quantize_dynamic(&mut layer, &QuantConfig::default())?;
    println!("quantized layers: {:?}", report.converted);

    let x = Tensor::randn(0f32, 1.0, (2, 4), &device)?;
    let y_f32 = float.forward(&x)?;
    let y_int8 = layer.forward(&x)?;
    let err = (&y_int8 - &y_f32)?.abs()?.max_all()?.to_scalar::<f32>()?;

    if let QLinearKind::Dynamic(d) = layer.kind() {
        let w = d.weights();
        println!("int8 weights, row 0: {:?}, scales {:?}", w.row(0), w.row_scales(0));
    }
    println!("input:\n{x}");
    println!("float output:\n{y_f32}");
    println!("int8 output:\n{y_int8}");
    println!("max |int8 - float| = {err:.6}");
    println!("weight bytes: float {} -> int8 {}", float.weight_bytes(), layer.weight_bytes());
    Ok(())
}
