//! convert/: the workflow verbs over a model that exposes its layers through `Quantizable`.

use crate::common;

use candle_core::{Module, Result, Tensor};
use candle_nn::Linear;
use candle_quant::convert::{convert, prepare, prepare_qat, quantize_dynamic, QuantConfig, Quantizable};
use candle_quant::nn::{ActivationQuant, QLinear, QLinearKind};
use common::{rel_error, Rng};

/// A two-block MLP with a head, named like a checkpoint.
struct Mlp {
    blocks: Vec<[QLinear; 2]>,
    head: QLinear,
}

impl Mlp {
    fn new(rng: &mut Rng) -> Self {
        let mut lin = |k: usize, n: usize, name: String| {
            let w = rng.tensor(&[n, k], 1.0 / (k as f32).sqrt()).unwrap();
            QLinear::from_linear(&Linear::new(w, Some(rng.tensor(&[n], 0.1).unwrap())), name).unwrap()
        };
        let blocks = (0..2).map(|i| [lin(32, 64, format!("blocks.{i}.up")), lin(64, 32, format!("blocks.{i}.down"))]).collect();
        Self { blocks, head: lin(32, 10, "head".into()) }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for [up, down] in &self.blocks {
            h = (&h + down.forward(&up.forward(&h)?.relu()?)?)?;
        }
        self.head.forward(&h)
    }
}

impl Quantizable for Mlp {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        for block in &mut self.blocks {
            block.as_mut_slice().visit_linears(f)?;
        }
        f(&mut self.head)
    }
}

fn kinds(m: &mut Mlp) -> Vec<(String, &'static str)> {
    let mut out = vec![];
    m.visit_linears(&mut |l| {
        out.push((l.name().to_string(), l.kind_name()));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn quantize_dynamic_with_patterns_and_overrides() {
    let mut rng = Rng::new(11);
    let mut model = Mlp::new(&mut rng);
    let x = rng.tensor(&[4, 32], 1.0).unwrap();
    let y = model.forward(&x).unwrap();
    let config = QuantConfig::default().exclude("head").exclude("blocks.1.*").override_activation("*.down", ActivationQuant::PerToken);
    let report = quantize_dynamic(&mut model, &config).unwrap();
    assert_eq!(report.converted, ["blocks.0.up", "blocks.0.down"]);
    assert_eq!(report.skipped, ["blocks.1.up", "blocks.1.down", "head"]);
    let QLinearKind::Dynamic(d) = model.blocks[0][1].kind() else { panic!() };
    assert_eq!(d.activation_quant(), ActivationQuant::PerToken);
    let QLinearKind::Dynamic(d) = model.blocks[0][0].kind() else { panic!() };
    assert_eq!(d.activation_quant(), ActivationQuant::default());
    assert!(rel_error(&model.forward(&x).unwrap(), &y).unwrap() < 0.02);
    // Include patterns restrict the selection; progress counts the two selected layers.
    let mut model = Mlp::new(&mut rng);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let log = seen.clone();
    let config = QuantConfig::default().include("*.up").progress(move |p| log.lock().unwrap().push((p.done as usize, p.total as usize)));
    let report = quantize_dynamic(&mut model, &config).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!((seen.first(), seen.last()), (Some(&(0, 2)), Some(&(2, 2))), "{seen:?}");
    assert_eq!(report.converted, ["blocks.0.up", "blocks.1.up"]);
    assert_eq!(kinds(&mut model)[4], ("head".to_string(), "float"));
}

#[test]
fn prepare_calibrate_convert() {
    let mut rng = Rng::new(12);
    let mut model = Mlp::new(&mut rng);
    let reference = Mlp::new(&mut Rng::new(12));
    let report = prepare(&mut model, &QuantConfig::default()).unwrap();
    assert_eq!(report.converted.len(), 5);
    // Converting before any data flowed names the first layer that saw nothing.
    let e = format!("{:#}", convert(&mut model).unwrap_err());
    assert!(e.contains("blocks.0.up"), "{e}");
    for _ in 0..8 {
        model.forward(&rng.tensor(&[16, 32], 1.0).unwrap()).unwrap();
    }
    convert(&mut model).unwrap();
    assert!(kinds(&mut model).iter().all(|(_, k)| *k == "int8-static"));
    let x = rng.tensor(&[16, 32], 1.0).unwrap();
    let rel = rel_error(&model.forward(&x).unwrap(), &reference.forward(&x).unwrap()).unwrap();
    assert!(rel < 0.05, "static model relative error {rel}");
    // Nothing left to convert.
    assert!(convert(&mut model).is_err());
}

/// Static int8 per group on a model of one's own (`calibrate_inputs`, any `Module +
/// Quantizable`): every layer becomes static int8, closer to float than one range per tensor on
/// inputs with an outlier channel; the file counts the batches and rows; no input, or an input of
/// the wrong width, is an error that says so.
#[test]
fn calibrate_inputs_makes_any_model_static_per_group() {
    use candle_quant::calibration::{calibrate_inputs, ObserverKind, StaticGranularity};
    let mut rng = Rng::new(31);
    let float = Mlp::new(&mut rng);
    let batch = |rng: &mut Rng| {
        // Channel 5 is an outlier channel (×20), as in real activations.
        let x = rng.tensor(&[16, 32], 1.0).unwrap();
        let scale: Vec<f32> = (0..32).map(|c| if c == 5 { 20.0 } else { 1.0 }).collect();
        x.broadcast_mul(&Tensor::new(scale.as_slice(), &candle_core::Device::Cpu).unwrap()).unwrap()
    };
    let batches: Vec<Tensor> = (0..4).map(|_| batch(&mut rng)).collect();
    let copy = |m: &Mlp| Mlp { blocks: m.blocks.clone(), head: m.head.clone() };
    let (mut grouped, mut tensor) = (copy(&float), copy(&float));
    let per_group = StaticGranularity::PerGroup { size: 8, float_fraction: 0.01 };
    let c = calibrate_inputs(&mut grouped, "mlp", ObserverKind::Minmax, per_group, &batches, |_| {}).unwrap();
    // 4 batches of 16 rows.
    assert_eq!((c.windows, c.tokens, c.layers.len()), (4, 64, 5));
    c.apply(&mut grouped, &QuantConfig::default()).unwrap();
    let pt = calibrate_inputs(&mut tensor, "mlp", ObserverKind::Minmax, StaticGranularity::PerTensor, &batches, |_| {}).unwrap();
    pt.apply(&mut tensor, &QuantConfig::default()).unwrap();
    assert!(kinds(&mut grouped).iter().all(|(_, k)| *k == "int8-static"), "{:?}", kinds(&mut grouped));
    let x = batch(&mut rng);
    let want = float.forward(&x).unwrap();
    let (eg, et) = (rel_error(&grouped.forward(&x).unwrap(), &want).unwrap(), rel_error(&tensor.forward(&x).unwrap(), &want).unwrap());
    assert!(eg < 0.03 && eg < et, "per group {eg}, per tensor {et}");
    let e = calibrate_inputs(&mut copy(&float), "mlp", ObserverKind::Minmax, per_group, &[], |_| {}).unwrap_err().to_string();
    assert!(e.contains("at least one input"), "{e}");
    let narrow = [Tensor::zeros((2, 31), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap()];
    let e = calibrate_inputs(&mut copy(&float), "mlp", ObserverKind::Minmax, per_group, &narrow, |_| {}).unwrap_err().to_string();
    assert!(e.contains("calibration input 0") && e.contains("31"), "{e}");
}

#[test]
fn prepare_qat_then_convert() {
    let mut rng = Rng::new(13);
    let mut model = Mlp::new(&mut rng);
    let report = prepare_qat(&mut model, &QuantConfig::default().exclude("head")).unwrap();
    assert_eq!(report.skipped, ["head"]);
    model.forward(&rng.tensor(&[16, 32], 1.0).unwrap()).unwrap();
    let report = convert(&mut model).unwrap();
    assert_eq!(report.converted.len(), 4);
    assert_eq!(kinds(&mut model)[4].1, "float");
}

/// QAT of the ranges alone: learned step sizes start from the given qparams, frozen weights
/// leave nothing but the step sizes to train, one optimizer step moves them, and `convert`
/// makes static layers with the trained ranges.
#[test]
fn learned_ranges_train_alone_and_convert() {
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    use candle_quant::convert::{freeze_qat_weights, learn_activation_ranges, qat_vars};
    use candle_quant::quant::QParams;
    use candle_quant::{Granularity, QSpec};
    let mut rng = Rng::new(17);
    let mut model = Mlp::new(&mut rng);
    let x = rng.tensor(&[16, 32], 1.0).unwrap();
    let float = model.forward(&x).unwrap();
    prepare_qat(&mut model, &QuantConfig::default()).unwrap();
    let before = model.forward(&x).unwrap();
    assert_eq!(freeze_qat_weights(&mut model).unwrap(), 5);
    assert!(qat_vars(&mut model).unwrap().is_empty());
    // Frozen fq(W) is the same constant the trainable path computes.
    assert_eq!(model.forward(&x).unwrap().to_vec2::<f32>().unwrap(), before.to_vec2::<f32>().unwrap());
    // Deliberately coarse start: one step of 0.5 on a symmetric range.
    let init =
        QParams::new(QSpec::new(candle_quant::QDType::QInt8, candle_quant::QScheme::Affine), Granularity::PerTensor, vec![0.5], vec![0])
            .unwrap();
    let ranges = learn_activation_ranges(&mut model, |_| Ok(Some(init.clone()))).unwrap();
    assert_eq!(ranges.len(), 5);
    let target = float.detach();
    let mut opt = AdamW::new(ranges.clone(), ParamsAdamW { lr: 0.1, weight_decay: 0.0, ..Default::default() }).unwrap();
    let loss = |m: &Mlp| m.forward(&x).unwrap().sub(&target).unwrap().sqr().unwrap().mean_all().unwrap();
    let l0 = loss(&model).to_scalar::<f32>().unwrap();
    for _ in 0..20 {
        opt.backward_step(&loss(&model)).unwrap();
    }
    let l1 = loss(&model).to_scalar::<f32>().unwrap();
    assert!(l1 < l0 / 2.0, "training the step sizes should fit the float outputs better: {l0} → {l1}");
    let steps: Vec<f32> = ranges.iter().map(|v| v.as_tensor().exp().unwrap().to_vec1::<f32>().unwrap()[0]).collect();
    assert!(steps.iter().all(|&s| s < 0.5), "coarse steps should shrink: {steps:?}");
    convert(&mut model).unwrap();
    let first = &model.blocks[0][0];
    let QLinearKind::Static(s) = first.kind() else { panic!("{} is {}", first.name(), first.kind_name()) };
    assert!((s.activation_qparams().scales()[0] - steps[0]).abs() < 1e-6);
}

/// A user model built like candle models are (VarBuilder paths), with its `Quantizable` written
/// by the macro — one version that forgets a layer, one that does not.
mod user_kit {
    use candle_core::{DType, Device, Module, Result, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use candle_quant::checkpoint::{load_quantized, save_quantized, SaveOptions};
    use candle_quant::convert::float_linears;
    use candle_quant::convert::Named;
    use candle_quant::{ensure_quantized, qlinear, qlinear_b, qlinear_no_bias, quantizable, quantize_dynamic, QLinear, QuantConfig};

    #[derive(Clone)]
    struct Attn {
        qkv: QLinear,
        out: QLinear,
    }
    #[derive(Clone)]
    struct Net {
        embed: Named<candle_nn::Embedding>,
        norm: Named<candle_nn::RmsNorm>,
        layers: Vec<Attn>,
        head: Option<QLinear>,
    }
    /// `out` forgotten.
    struct Forgetful(Net);

    quantizable!(Attn { qkv, out });
    quantizable!(Net { embed, norm, layers, head });
    impl candle_quant::Quantizable for Forgetful {
        fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
            for layer in &mut self.0.layers {
                f(&mut layer.qkv)?;
            }
            self.0.head.as_mut().map_or(Ok(()), f)
        }
    }

    fn net(vb: VarBuilder) -> Result<Net> {
        let layers = (0..2)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(Attn { qkv: qlinear_b(32, 96, i == 0, vb.pp("qkv"))?, out: qlinear_no_bias(96, 32, vb.pp("out"))? })
            })
            .collect::<Result<_>>()?;
        Ok(Net {
            embed: Named::load(vb.pp("embed"), |vb| candle_nn::embedding(50, 32, vb))?,
            norm: Named::load(vb.pp("norm"), |vb| candle_nn::rms_norm(32, 1e-5, vb))?,
            layers,
            head: Some(qlinear(32, 50, vb.pp("head"))?),
        })
    }

    impl Module for Net {
        fn forward(&self, ids: &Tensor) -> Result<Tensor> {
            let mut h = self.embed.forward(ids)?;
            for l in &self.layers {
                h = (&h + l.out.forward(&l.qkv.forward(&self.norm.forward(&h)?)?.gelu()?)?)?;
            }
            self.head.as_ref().map_or(Ok(h.clone()), |head| head.forward(&h))
        }
    }

    /// A model without a KV cache: the cache is the tokens so far, and each call reruns them all.
    impl candle_quant::CausalLm for Net {
        type Cache = Vec<u32>;
        fn new_cache(&self) -> Vec<u32> {
            Vec::new()
        }
        fn forward(&self, tokens: &[u32], cache: &mut Vec<u32>, all_logits: bool) -> Result<Tensor> {
            cache.extend_from_slice(tokens);
            let logits = Module::forward(self, &Tensor::new(cache.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?.squeeze(0)?;
            let keep = if all_logits { tokens.len() } else { 1 };
            logits.narrow(0, cache.len() - keep, keep)
        }
        fn max_context(&self) -> usize {
            1024
        }
    }

    #[test]
    fn evaluate_runs_on_a_model_of_your_own() -> Result<()> {
        let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
        let (float, mut int8) = (net(vb.clone())?, net(vb)?);
        quantize_dynamic(&mut int8, &QuantConfig::default())?;
        let tokens: Vec<u32> = (0..200).map(|i| (i * 7 + 3) % 50).collect();
        let same = candle_quant::eval::evaluate(&float, &float, &tokens, 64, |_| {})?;
        // 200 tokens in windows of 64: 63 + 63 + 63 + 7 scored positions.
        assert_eq!(same.tokens, 196);
        assert_eq!((same.kld.abs() < 1e-6, same.top1_agreement, same.ppl_delta_pct), (true, 1.0, 0.0));
        let r = candle_quant::eval::evaluate(&float, &int8, &tokens, 64, |_| {})?;
        assert!(r.kld > 0.0 && r.kld < 0.01 && r.top1_agreement > 0.9, "{r:?}");
        Ok(())
    }

    #[test]
    fn calibrate_save_load_apply_and_refuse_what_does_not_fit() -> Result<()> {
        use candle_quant::calibration::{calibrate, Calibration, ObserverKind, StaticGranularity};
        let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
        let (float, mut model) = (net(vb.clone())?, net(vb)?);
        let windows: Vec<Vec<u32>> = (0..4).map(|w| (0..32).map(|i| (w * 13 + i * 7) % 50).collect()).collect();
        let mut seen = 0;
        let c =
            calibrate(&mut model, "test-net", ObserverKind::Minmax, StaticGranularity::PerTensor, &windows, |p| seen = p.done as usize)?;
        assert_eq!((seen, c.windows, c.tokens, c.layers.len()), (4, 4, 128, 5));
        // The model is float again, and the file round-trips.
        let kinds = |m: &mut Net| -> Vec<&'static str> {
            let mut k = vec![];
            candle_quant::Quantizable::visit_linears(m, &mut |l| {
                k.push(l.kind_name());
                Ok(())
            })
            .unwrap();
            k
        };
        assert_eq!(kinds(&mut model), ["float"; 5]);
        let dir = crate::common::Scratch::new("convert-calib");
        let path = dir.join("calib.json");
        c.save(&path)?;
        // (The per-channel maxima are for smoothing in memory; the file does not keep them.)
        let mut saved = c.clone();
        saved.layers.values_mut().for_each(|l| l.channel_absmax.clear());
        assert_eq!(Calibration::load(&path)?, saved);
        // Applied: every layer static, outputs close to float on the calibration text.
        let report = c.apply(&mut model, &QuantConfig::default())?;
        assert_eq!((report.converted.len(), kinds(&mut model)), (5, vec!["int8-static"; 5]));
        let r = candle_quant::eval::evaluate(&float, &model, &windows.concat(), 32, |_| {})?;
        assert!(r.kld < 0.05 && r.top1_agreement > 0.8, "{r:?}");

        // Another model (a wider head) is refused by name, before any layer changes.
        let other_map = VarMap::new();
        let ovb = VarBuilder::from_varmap(&other_map, DType::F32, &Device::Cpu);
        let mut other = net(ovb.clone())?;
        other.head = Some(qlinear(32, 60, ovb.pp("wide_head"))?);
        let e = c.apply(&mut other, &QuantConfig::default()).unwrap_err().to_string();
        assert!(e.contains("another model") && e.contains("head"), "{e}");
        assert_eq!(kinds(&mut other), ["float"; 5]);
        // A truncated or hand-broken file names the file (and the layer).
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(Calibration::load(&path).unwrap_err().to_string().contains("calib.json"));
        let mut broken = c.clone();
        broken.layers.get_mut("head").unwrap().scale = -1.0;
        broken.save(&path)?;
        let e = Calibration::load(&path).unwrap_err().to_string();
        assert!(e.contains("calib.json") && e.contains("'head'"), "{e}");
        // No windows, and NaN activations, are errors (the latter naming the first layer).
        let mut nan = net(VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu))?;
        let e = calibrate(&mut nan, "t", ObserverKind::Minmax, StaticGranularity::PerTensor, &[], |_| {}).unwrap_err().to_string();
        assert!(e.contains("at least one window"), "{e}");
        let table = Tensor::full(f32::NAN, (50, 32), &Device::Cpu)?;
        nan.embed = Named::new("embed", candle_nn::Embedding::new(table, 32));
        let e = calibrate(&mut nan, "t", ObserverKind::Histogram, StaticGranularity::PerTensor, &windows, |_| {}).unwrap_err().to_string();
        assert!(e.contains("layers.0.qkv") && e.contains("non-finite"), "{e}");
        Ok(())
    }

    #[test]
    fn per_group_calibration_goes_float_beyond_its_ranges_and_refuses_a_wrong_file() -> Result<()> {
        use candle_quant::calibration::{calibrate, Calibration, ObserverKind, StaticGranularity};
        let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
        let (float, mut tensor, mut grouped) = (net(vb.clone())?, net(vb.clone())?, net(vb)?);
        let windows: Vec<Vec<u32>> = (0..4).map(|w| (0..32).map(|i| (w * 13 + i * 7) % 50).collect()).collect();
        let per_group = StaticGranularity::PerGroup { size: 8, float_fraction: 0.01 };
        let c = calibrate(&mut grouped, "test-net", ObserverKind::Minmax, per_group, &windows, |_| {})?;
        // One scale per 8 input channels: 32 inputs (qkv, head) → 4 groups, 96 (out) → 12.
        let groups: Vec<usize> = c.layers.values().map(|l| l.group_scales.as_ref().map_or(0, Vec::len)).collect();
        // (In name order: head, layers.0.out, layers.0.qkv, layers.1.out, layers.1.qkv.)
        assert_eq!(groups, [4, 12, 4, 12, 4]);
        c.apply(&mut grouped, &QuantConfig::default())?;
        let pt = calibrate(&mut tensor, "test-net", ObserverKind::Minmax, StaticGranularity::PerTensor, &windows, |_| {})?;
        pt.apply(&mut tensor, &QuantConfig::default())?;
        // On the calibration text about 1 % of the inputs lie beyond their group's range and go
        // through float; per-group ranges are closer to float than one range per tensor.
        let tokens = windows.concat();
        let (rg, rt) = (
            candle_quant::eval::evaluate(&float, &grouped, &tokens, 32, |_| {})?,
            candle_quant::eval::evaluate(&float, &tensor, &tokens, 32, |_| {})?,
        );
        assert!(rg.kld < rt.kld && rg.top1_agreement > 0.9, "per group {rg:?}, per tensor {rt:?}");
        let (mut in_float, mut clamped) = (0, 0);
        candle_quant::Quantizable::visit_linears(&mut grouped, &mut |l| {
            in_float += l.float_activations();
            clamped += l.clamped_activations();
            Ok(())
        })?;
        assert!(in_float > 0 && clamped == 0, "{in_float} in float, {clamped} clamped");
        // A file whose group scales do not fit a layer's width names the file and the layer.
        let dir = crate::common::Scratch::new("convert-calib-groups");
        let path = dir.join("groups.json");
        let mut broken = c.clone();
        broken.layers.get_mut("head").unwrap().group_scales.as_mut().unwrap().pop();
        broken.save(&path)?;
        let e = Calibration::load(&path).unwrap_err().to_string();
        assert!(e.contains("groups.json") && e.contains("'head'") && e.contains("group scales"), "{e}");
        let mut fresh = net(VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu))?;
        let all_float = StaticGranularity::PerGroup { size: 8, float_fraction: 1.0 };
        let e = calibrate(&mut fresh, "t", ObserverKind::Minmax, all_float, &windows, |_| {}).unwrap_err().to_string();
        assert!(e.contains("[0, 1)"), "{e}");
        Ok(())
    }

    #[test]
    fn sensitivity_ranks_layers_and_finds_the_exclusions_for_a_budget() -> Result<()> {
        use candle_quant::eval::ReferenceScores;
        use candle_quant::sensitivity::{exclusions_for_budget, layer_sensitivity};
        let float = net(VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu))?;
        let tokens: Vec<u32> = (0..96).map(|i| (i * 11 + 5) % 50).collect();
        let reference = ReferenceScores::new(&float, &tokens, 32)?;
        // Coarse weights (per channel) and activations (per token), no outliers: every layer hurts a bit.
        let q = |l: &mut QLinear| l.quantize_dynamic(candle_quant::ActivationQuant::PerToken, candle_quant::WeightQuant::PerChannel, None);
        let mut calls = 0;
        let ranked = layer_sensitivity(&float, &reference, q, |_| calls += 1)?;
        assert_eq!((calls, ranked.len()), (5, 5));
        assert!(ranked.windows(2).all(|w| w[0].kld >= w[1].kld) && ranked.iter().all(|l| l.kld > 0.0), "{ranked:?}");
        // A generous budget keeps nothing in float; a zero budget keeps everything.
        let (none, r) = exclusions_for_budget(&float, &ranked, &reference, 1e9, q)?;
        assert!(none.is_empty() && r.kld > 0.0);
        let (all, r) = exclusions_for_budget(&float, &ranked, &reference, 0.0, q)?;
        assert_eq!((all.len(), r.ppl_delta_pct), (5, 0.0));
        // In between: the exclusions are the worst layers, in rank order.
        let (some, r) = exclusions_for_budget(&float, &ranked, &reference, ranked[0].ppl_delta_pct.abs() / 4.0, q)?;
        let worst: Vec<String> = ranked[..some.len()].iter().map(|l| l.name.clone()).collect();
        assert_eq!(some, worst);
        assert!(r.ppl_delta_pct.abs() <= ranked[0].ppl_delta_pct.abs() / 4.0);
        Ok(())
    }

    fn shapes(map: &VarMap) -> Vec<(String, Vec<usize>)> {
        map.data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect()
    }

    #[test]
    fn a_forgotten_layer_is_named_and_the_macro_model_round_trips() -> Result<()> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let shapes = shapes(&{
            net(vb.clone())?;
            map.clone()
        });
        let named = || shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));

        let mut forgetful = Forgetful(net(vb.clone())?);
        let report = quantize_dynamic(&mut forgetful, &QuantConfig::default())?;
        assert_eq!(report.converted, ["layers.0.qkv", "layers.1.qkv", "head"]);
        // The embedding table is 2-D too: ignored by pattern; the two `out` layers are reported.
        assert_eq!(float_linears(&mut forgetful, named(), &["embed"])?, ["layers.0.out", "layers.1.out"]);
        let err = ensure_quantized(&mut forgetful, named(), &["embed"]).unwrap_err().to_string();
        assert!(err.contains("layers.1.out"), "{err}");

        let mut model = net(vb)?;
        quantize_dynamic(&mut model, &QuantConfig::default())?;
        ensure_quantized(&mut model, named(), &["embed"])?;

        // The macro's tensor list makes the saved folder complete: it loads back to the same outputs.
        let scratch = crate::common::Scratch::new("convert-user-kit");
        let dir = scratch.join("int8");
        save_quantized(&mut model, &dir, &SaveOptions::default())?;
        let loaded = load_quantized(&dir, net)?;
        let ids = Tensor::new(&[[1u32, 7, 49, 3]], &Device::Cpu)?;
        let diff = (model.forward(&ids)? - loaded.forward(&ids)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
