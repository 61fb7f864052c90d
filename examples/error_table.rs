//! Error figures of int8 linear layers against f32, for a 576→1536 layer (SmolLM2's
//! q/gate/up shape): N(0,1) inputs and inputs with a few outlier channels; per-tensor vs
//! per-channel weights; per-token vs per-group activations; static min/max vs histogram.
//!
//! Run: `cargo run --release --example error_table`

use anyhow::Result;
use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use candle_quant::kernels::PackedInt8Weights;
use candle_quant::nn::{ActivationQuant, DynamicLinear, QLinear, QLinearKind};
use candle_quant::observer::{HistogramObserver, MinMaxObserver, Observer};
use candle_quant::quant::{Granularity, QDType, QParams, QScheme, QSpec, QuantizedTensor};
use candle_quant::WeightQuant;

fn rel_error(a: &Tensor, b: &Tensor) -> Result<f32> {
    let num = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(num / b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (k, n, m) = (576, 1536, 64);
    let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? / (k as f64).sqrt())?;
    let float = Linear::new(w.clone(), Some(Tensor::randn(0f32, 0.1, n, &dev)?));
    let normal = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    // Outliers: 4 fixed channels ~50x larger, as in LLM activations (SmolLM2's are far worse).
    let mut scale = vec![1f32; k];
    for c in [7, 100, 333, 500] {
        scale[c] = 50.0;
    }
    let outlier = normal.broadcast_mul(&Tensor::from_vec(scale, k, &dev)?)?;

    let per_tensor_w = {
        let p = QParams::from_tensor(QSpec::WEIGHT, Granularity::PerTensor, &w)?;
        PackedInt8Weights::from_quantized_tensor(&QuantizedTensor::quantize(&w, &p)?)?
    };
    let bias = float.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
    let dynamic = |act: ActivationQuant, per_channel: bool| -> Result<QLinear> {
        let mut q = QLinear::from_linear(&float, "layer")?;
        q.quantize_dynamic(act, WeightQuant::PerChannel, None)?;
        if !per_channel {
            // Same layer with one weight scale for the whole matrix.
            let d = DynamicLinear::new(per_tensor_w.clone(), bias.clone(), act);
            q.set_kind(QLinearKind::Dynamic(d))?;
        }
        Ok(q)
    };
    let default_dynamic = || -> Result<QLinear> {
        let mut q = QLinear::from_linear(&float, "layer")?;
        candle_quant::quantize_dynamic(&mut q, &candle_quant::QuantConfig::default())?;
        Ok(q)
    };
    let static_with = |obs: Box<dyn Observer>, calib: &Tensor| -> Result<QLinear> {
        let mut q = QLinear::from_linear(&float, "layer")?;
        q.observe_with(obs)?;
        for chunk in calib.chunk(4, 0)? {
            q.forward(&chunk)?;
        }
        q.convert_static()?;
        Ok(q)
    };
    let act_spec = QSpec::new(QDType::QInt8, QScheme::Affine);
    println!("relative error ‖y_int8 − y_f32‖ / ‖y_f32‖, {k}→{n}, {m} tokens");
    println!("{:<46} {:>12} {:>14}", "scheme", "N(0,1)", "outlier chans");
    type Build<'a> = Box<dyn Fn(&Tensor) -> Result<QLinear> + 'a>;
    let rows: Vec<(&str, Build)> = vec![
        ("dynamic, per-tensor W, per-token A", Box::new(|_| dynamic(ActivationQuant::PerToken, false))),
        ("dynamic, per-channel W, per-token A", Box::new(|_| dynamic(ActivationQuant::PerToken, true))),
        ("dynamic, per-channel W, per-group(128) A", Box::new(|_| dynamic(ActivationQuant::PerGroup(128), true))),
        ("dynamic, per-channel W, per-group(64) A", Box::new(|_| dynamic(ActivationQuant::PerGroup(64), true))),
        ("dynamic, per-channel W, per-group(32) A", Box::new(|_| dynamic(ActivationQuant::PerGroup(32), true))),
        ("default: group-32 W and A, |x|>3 in float", Box::new(|_| default_dynamic())),
        ("static, per-tensor A, min/max observer", Box::new(|x| static_with(Box::new(MinMaxObserver::new(act_spec)), x))),
        ("static, per-tensor A, histogram observer", Box::new(|x| static_with(Box::new(HistogramObserver::new(act_spec, 2048)?), x))),
    ];
    for (label, build) in rows {
        let mut cells = vec![];
        for x in [&normal, &outlier] {
            let q = build(x)?;
            cells.push(rel_error(&q.forward(x)?, &float.forward(x)?)?);
        }
        println!("{label:<46} {:>12.5} {:>14.5}", cells[0], cells[1]);
    }
    let mut wo = QLinear::from_linear(&float, "layer")?;
    wo.quantize_weight_only(WeightQuant::PerChannel)?;
    let (a, b) =
        (rel_error(&wo.forward(&normal)?, &float.forward(&normal)?)?, rel_error(&wo.forward(&outlier)?, &float.forward(&outlier)?)?);
    println!("{:<46} {a:>12.5} {b:>14.5}", "weight-only (per-channel W, f32 A)");
    Ok(())
}
