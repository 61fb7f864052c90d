//! nn/: QLinear in every kind, against float layers.

use crate::common;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Linear;
use candle_quant::nn::{ActivationQuant, QLinear, QLinearKind};
use candle_quant::observer::MinMaxObserver;
use candle_quant::quant::{QDType, QScheme, QSpec};
use candle_quant::WeightQuant;
use common::{max_abs_diff, rel_error, Rng};

fn layer(rng: &mut Rng, k: usize, n: usize, bias: bool) -> Linear {
    let w = rng.tensor(&[n, k], 1.0 / (k as f32).sqrt()).unwrap();
    let b = bias.then(|| rng.tensor(&[n], 0.1).unwrap());
    Linear::new(w, b)
}

/// Worst-case output error from activation rounding alone: each input of group g moves by at
/// most `sa_g / 2`, so `|Δy[m,n]| ≤ Σ_g (sa_g / 2) Σ_{k∈g} |ŵ[n,k]|` with ŵ the dequantized weights.
/// Inputs above `outlier` are multiplied in float and excluded from the group scale.
fn activation_rounding_bound(x: &Tensor, w_hat: &Tensor, group: usize, outlier: f32) -> Tensor {
    let (m, k) = x.dims2().unwrap();
    let groups = k.div_ceil(group);
    let (xs, wa) = (x.to_vec2::<f32>().unwrap(), w_hat.abs().unwrap().to_vec2::<f32>().unwrap());
    let n = wa.len();
    let mut bound = vec![0f32; m * n];
    for i in 0..m {
        for g in 0..groups {
            let r = g * group..((g + 1) * group).min(k);
            let sa = xs[i][r.clone()].iter().filter(|v| v.abs() <= outlier).fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            for j in 0..n {
                let w_in: f32 = r.clone().filter(|&c| xs[i][c].abs() <= outlier).map(|c| wa[j][c]).sum();
                bound[i * n + j] += sa / 2.0 * w_in;
            }
        }
    }
    Tensor::from_vec(bound, (m, n), &Device::Cpu).unwrap()
}

#[test]
fn dynamic_matches_dequantized_float_within_the_rounding_bound() {
    let mut rng = Rng::new(1);
    let cases = [
        (64, 24, ActivationQuant::PerToken, WeightQuant::PerChannel, None),
        (100, 17, ActivationQuant::PerGroup(32), WeightQuant::PerGroup(32), None),
        (576, 40, ActivationQuant::PerGroup(64), WeightQuant::PerChannel, None),
        (576, 40, ActivationQuant::PerToken, WeightQuant::PerGroup(32), None),
        (200, 33, ActivationQuant::PerGroup(16), WeightQuant::PerGroup(16), None),
        // Values above 1.5 go through float: they add no rounding error, the bound still holds.
        (576, 40, ActivationQuant::PerGroup(32), WeightQuant::PerGroup(32), Some(1.5)),
    ];
    for (k, n, act, wq, outliers) in cases {
        let float = layer(&mut rng, k, n, true);
        let mut q = QLinear::from_linear(&float, "l").unwrap();
        q.quantize_dynamic(act, wq, outliers).unwrap();
        let deq = q.float_equivalent().unwrap();
        let x = rng.tensor(&[7, k], 1.0).unwrap();
        let (y, y_deq) = (q.forward(&x).unwrap(), deq.forward(&x).unwrap());
        let bound = activation_rounding_bound(&x, deq.weight(), act.group_size(k), outliers.unwrap_or(f32::INFINITY));
        let excess = ((y.sub(&y_deq).unwrap().abs().unwrap() - (bound * 1.0001).unwrap()).unwrap() - 1e-5).unwrap();
        let worst = excess.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(worst <= 0.0, "k={k} n={n} {act:?}: error exceeds the rounding bound by {worst}");
        // And against the original float layer: small relative error.
        let rel = rel_error(&y, &float.forward(&x).unwrap()).unwrap();
        println!("k={k} n={n} {act:?} {wq:?} {outliers:?}: relative error vs float {rel:.5}");
        assert!(rel < 0.02, "relative error {rel}");
    }
}

#[test]
fn dynamic_accepts_batched_and_half_inputs() {
    let mut rng = Rng::new(2);
    let float = layer(&mut rng, 48, 8, false);
    let mut q = QLinear::from_linear(&float, "l").unwrap();
    q.quantize_dynamic(ActivationQuant::PerGroup(16), WeightQuant::PerGroup(16), None).unwrap();
    let x = rng.tensor(&[2, 3, 48], 1.0).unwrap();
    let y = q.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 3, 8]);
    let flat = q.forward(&x.reshape((6, 48)).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&y.reshape((6, 8)).unwrap(), &flat).unwrap(), 0.0, "rows are independent");
    let yh = q.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
    assert_eq!(yh.dtype(), DType::F16);
}

#[test]
fn per_group_beats_per_token_with_outlier_channels() {
    // Inputs N(0,1) with two channels at ±200: per-token scales are set by the outliers,
    // per-group scales only in the outliers' own groups.
    let mut rng = Rng::new(3);
    let (k, n) = (576, 64);
    let float = layer(&mut rng, k, n, false);
    let mut x = rng.normals(16 * k, 1.0);
    for row in x.chunks_mut(k) {
        row[5] = 200.0;
        row[300] = -200.0;
    }
    let x = Tensor::from_vec(x, (16, k), &Device::Cpu).unwrap();
    let y = float.forward(&x).unwrap();
    let err = |act| {
        let mut q = QLinear::from_linear(&float, "l").unwrap();
        q.quantize_dynamic(act, WeightQuant::PerChannel, None).unwrap();
        rel_error(&q.forward(&x).unwrap(), &y).unwrap()
    };
    let (tok, grp) = (err(ActivationQuant::PerToken), err(ActivationQuant::PerGroup(32)));
    assert!(grp < tok / 2.0, "per-group {grp} vs per-token {tok}");
}

/// Affine activation groups need weights in the same groups (for the offset term); per-channel
/// weights are an error naming the layer, and take symmetric groups or affine per token.
#[test]
fn affine_groups_need_the_weights_groups() {
    let mut rng = Rng::new(5);
    let float = layer(&mut rng, 96, 12, true);
    let mut q = QLinear::from_linear(&float, "blocks.3.fc").unwrap();
    let e = q.quantize_dynamic(ActivationQuant::AffinePerGroup(32), WeightQuant::PerChannel, None).unwrap_err().to_string();
    assert!(e.contains("'blocks.3.fc'") && e.contains("groups of 32") && e.contains("one scale per output channel"), "{e}");
    let x = rng.tensor(&[3, 96], 1.0).unwrap();
    let y = float.forward(&x).unwrap();
    for act in [ActivationQuant::PerGroup(32), ActivationQuant::AffinePerToken] {
        q.quantize_dynamic(act, WeightQuant::PerChannel, None).unwrap();
        assert!(rel_error(&q.forward(&x).unwrap(), &y).unwrap() < 0.02, "{act:?}");
    }
}

#[test]
fn weight_only_equals_dequantized_float() {
    let mut rng = Rng::new(4);
    let float = layer(&mut rng, 96, 12, true);
    let mut q = QLinear::from_linear(&float, "l").unwrap();
    q.quantize_weight_only(WeightQuant::PerChannel).unwrap();
    let x = rng.tensor(&[5, 96], 1.0).unwrap();
    let deq = q.float_equivalent().unwrap();
    assert!(max_abs_diff(&q.forward(&x).unwrap(), &deq.forward(&x).unwrap()).unwrap() < 1e-4);
    assert!(rel_error(&q.forward(&x).unwrap(), &float.forward(&x).unwrap()).unwrap() < 0.01);
    // Storage as held: 12 outputs pad to two blocks of 8, so 16·96 int8 + 16 f16 scales·2 B,
    // plus the f32 bias 12·4 B = 1536 + 32 + 48.
    assert_eq!(q.weight_bytes(), 16 * 96 + 16 * 2 + 12 * 4);
}

#[test]
fn static_after_calibration() {
    let mut rng = Rng::new(5);
    let float = layer(&mut rng, 64, 16, true);
    let mut q = QLinear::from_linear(&float, "l").unwrap();
    q.observe_with(Box::new(MinMaxObserver::new(QSpec::new(QDType::QUInt8, QScheme::Affine)))).unwrap();
    for _ in 0..4 {
        q.forward(&(rng.tensor(&[8, 64], 1.0).unwrap() + 0.5).unwrap()).unwrap();
    }
    q.convert_static().unwrap();
    assert_eq!(q.kind_name(), "int8-static");
    let x = (rng.tensor(&[8, 64], 1.0).unwrap() + 0.5).unwrap();
    let rel = rel_error(&q.forward(&x).unwrap(), &float.forward(&x).unwrap()).unwrap();
    assert!(rel < 0.03, "static relative error {rel}");
}

#[test]
fn qat_trains_and_converts_to_what_it_simulated() {
    let mut rng = Rng::new(6);
    let target = layer(&mut rng, 32, 4, true);
    let start = layer(&mut rng, 32, 4, true);
    let mut q = QLinear::from_linear(&start, "l").unwrap();
    q.prepare_qat(Box::new(MinMaxObserver::moving_average(QSpec::new(QDType::QInt8, QScheme::Affine), 0.1).unwrap())).unwrap();
    let QLinearKind::FakeQuant(fq) = q.kind() else { panic!("expected fake-quant") };
    let mut opt = <candle_nn::SGD as candle_nn::Optimizer>::new(fq.vars(), 0.05).unwrap();
    let mut losses = vec![];
    for _ in 0..200 {
        let x = rng.tensor(&[16, 32], 1.0).unwrap();
        let loss = q.forward(&x).unwrap().sub(&target.forward(&x).unwrap()).unwrap().sqr().unwrap().mean_all().unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        candle_nn::Optimizer::backward_step(&mut opt, &loss).unwrap();
    }
    let (first, last) = (losses[..10].iter().sum::<f32>() / 10.0, losses[190..].iter().sum::<f32>() / 10.0);
    assert!(last < first / 5.0, "loss {first} -> {last}");
    // Frozen observer: converting gives an int8 layer computing what fake quantization simulated.
    fq.set_observing(false);
    let x = rng.tensor(&[8, 32], 1.0).unwrap();
    let simulated = q.forward(&x).unwrap();
    q.convert_static().unwrap();
    let int8 = q.forward(&x).unwrap();
    let diff = max_abs_diff(&int8, &simulated).unwrap();
    assert!(
        diff < 1e-4 * simulated.abs().unwrap().max_keepdim(D::Minus1).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0),
        "diff {diff}"
    );
}

#[test]
fn load_mirrors_linear_b_and_keeps_the_name() {
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let l = QLinear::load(8, 3, true, vb.pp("model").pp("layers.0").pp("q_proj")).unwrap();
    assert_eq!(l.name(), "model.layers.0.q_proj");
    assert_eq!((l.in_features(), l.out_features(), l.kind_name()), (8, 3, "float"));
    // Missing tensor in a fixed checkpoint: the error names the layer.
    let vb = candle_nn::VarBuilder::from_tensors(Default::default(), DType::F32, &dev);
    let e = QLinear::load(8, 3, false, vb.pp("fc")).unwrap_err().to_string();
    assert!(e.contains("fc"), "{e}");
}

#[test]
fn bad_inputs_are_errors_naming_the_layer() {
    let mut rng = Rng::new(8);
    let float = layer(&mut rng, 16, 4, false);
    let mut q = QLinear::from_linear(&float, "model.fc").unwrap();
    for convert in 0..3 {
        match convert {
            1 => q.quantize_dynamic(ActivationQuant::PerToken, WeightQuant::PerChannel, None).unwrap(),
            2 => q.quantize_weight_only(WeightQuant::default()).unwrap(),
            _ => {}
        }
        let e = q.forward(&rng.tensor(&[2, 15], 1.0).unwrap()).unwrap_err().to_string();
        assert!(e.contains("model.fc") && e.contains("15"), "{e}");
    }
    let e = q.forward(&Tensor::zeros((2, 16), DType::U32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("float"), "{e}");
    assert!(q.quantize_dynamic(ActivationQuant::PerGroup(0), WeightQuant::PerChannel, None).is_err());
    let e = q.quantize_dynamic(ActivationQuant::PerGroup(8), WeightQuant::PerGroup(4), None).unwrap_err().to_string();
    assert!(e.contains("model.fc") && e.contains("must be equal"), "{e}");
    // Static conversion without observation.
    let e = q.convert_static().unwrap_err().to_string();
    assert!(e.contains("model.fc"), "{e}");
    let mut fresh = QLinear::from_linear(&float, "model.fc2").unwrap();
    fresh.observe_with(Box::new(MinMaxObserver::new(QSpec::WEIGHT))).unwrap();
    let e = format!("{:#}", fresh.convert_static().unwrap_err());
    assert!(e.contains("model.fc2") && e.contains("not observed"), "{e}");
    assert!(QLinear::from_linear(&Linear::new(Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(), None), "x").is_err());
}
