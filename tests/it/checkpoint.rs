//! checkpoint/: int8 checkpoints saved and loaded back — bit-identical round trips (SmolLM2,
//! a user's own model with static and QAT layers, sharded bf16 sources), and bad inputs that
//! must be clear errors naming the file and tensor.

use crate::common;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_quant::checkpoint::{
    load_quantized, save_quantized, write_checkpoint, CheckpointScheme, Int8Kind, QuantizedCheckpoint, SaveOptions,
};
use candle_quant::convert::{convert, prepare, prepare_qat, quantize_dynamic, QuantConfig, Quantizable};
use candle_quant::io::{self, LanguageModel, ModelSource};
use candle_quant::models::llama::KvCache;
use candle_quant::nn::ActivationQuant;
use candle_quant::quant::QParams;
use candle_quant::source::{Dtype, Entry, TensorSource};
use candle_quant::{Granularity, QLinear, QSpec, WeightQuant};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A folder path that does not exist yet (checkpoint writers refuse existing folders), inside a
/// scratch folder removed when the first value is dropped.
fn temp(name: &str) -> (common::Scratch, PathBuf) {
    let scratch = common::Scratch::new(&format!("ckpt-{name}"));
    let dir = scratch.join("model");
    (scratch, dir)
}

fn smollm2_source() -> ModelSource {
    let p = common::model_file(io::DEFAULT_GGUF);
    ModelSource::Gguf(p)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn logits_and_greedy(lm: &LanguageModel, prompt: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let logits = lm.model.forward(prompt, &mut KvCache::default(), true).unwrap();
    let mut cache = KvCache::default();
    let mut next = *LanguageModelExt::argmax_last(&lm.model.forward(prompt, &mut cache, false).unwrap()).last().unwrap();
    let mut greedy = vec![next];
    for _ in 0..12 {
        next = *LanguageModelExt::argmax_last(&lm.model.forward(&[next], &mut cache, false).unwrap()).last().unwrap();
        greedy.push(next);
    }
    (bits(&logits), greedy)
}

struct LanguageModelExt;
impl LanguageModelExt {
    fn argmax_last(logits: &Tensor) -> Vec<u32> {
        candle_quant::models::llama::Llama::argmax(logits).unwrap()
    }
}

/// Int4 with zero points, streamed into a folder: the same logits as quantizing in memory, the
/// tied lm_head stored as nibbles (`U8` `[49152, 288]`) beside its scales and zero points, and the
/// folder under a sixth of the float model.
#[test]
fn smollm2_int4_checkpoint_matches_in_memory() {
    let source = smollm2_source();
    let f32_model = io::load_decoder(&source, &mut |_| {}).unwrap();
    let prompt = candle_quant::generate::encode(&f32_model, "The capital of France is").unwrap();
    let cfg = QuantConfig::default().weight(WeightQuant::Int4 { group: 32, zero_point: true });
    let mut in_memory = f32_model.clone();
    quantize_dynamic(&mut in_memory.model, &cfg).unwrap();
    let want = logits_and_greedy(&in_memory, &prompt);
    let (_dir_scratch, dir) = temp("smollm2-int4");
    let written = io::open_decoder(&source).unwrap().quantize_to(&dir, &cfg, Int8Kind::Dynamic, &SaveOptions::default(), |_| {}).unwrap();
    let loaded = io::load_decoder(&ModelSource::Folder(dir.clone()), &mut |_| {}).unwrap();
    assert_eq!(logits_and_greedy(&loaded, &prompt), want, "int4 checkpoint vs in-memory quantization");
    let ckpt = QuantizedCheckpoint::open(&dir).unwrap();
    let entry = |name: &str| ckpt.source().entry(name).map(|e| (e.dtype, e.shape.clone()));
    assert_eq!(entry("lm_head.weight"), Some((Dtype::U8, vec![49152, 288])));
    assert_eq!(entry("lm_head.weight_zero_point"), Some((Dtype::U8, vec![49152, 18])));
    assert_eq!(ckpt.quantization().format_version, 2);
    let f32_bytes = f32_model.model.weight_bytes() as f64;
    assert!((written.tensor_bytes as f64) < f32_bytes / 6.0, "{} of {f32_bytes}", written.tensor_bytes);
}

#[test]
fn smollm2_checkpoint_round_trip_is_bit_identical() {
    let source = smollm2_source();
    let f32_model = io::load_decoder(&source, &mut |_| {}).unwrap();
    let prompt = candle_quant::generate::encode(&f32_model, "The capital of France is").unwrap();
    // Quantized in memory from the float model: the reference.
    let mut in_memory = f32_model.clone();
    quantize_dynamic(&mut in_memory.model, &QuantConfig::default()).unwrap();
    let want = logits_and_greedy(&in_memory, &prompt);

    // Written by the streaming quantizer, loaded back.
    let (_dir_scratch, dir) = temp("smollm2");
    let opened = io::open_decoder(&source).unwrap();
    let mut seen = 0;
    let written = opened.quantize_to(&dir, &QuantConfig::default(), Int8Kind::Dynamic, &SaveOptions::default(), |_| seen += 1).unwrap();
    assert!(seen > 1, "progress was reported");
    let loaded = io::load_decoder(&ModelSource::Folder(dir.clone()), &mut |_| {}).unwrap();
    assert_eq!(logits_and_greedy(&loaded, &prompt), want, "checkpoint vs in-memory quantization");
    // Quantized while loading, without a checkpoint: the same model again.
    let (in_situ, report) = io::open_decoder(&source).unwrap().load_int8(&QuantConfig::default(), Int8Kind::Dynamic, &mut |_| {}).unwrap();
    assert_eq!(report.converted.len(), 211);
    assert_eq!(logits_and_greedy(&in_situ, &prompt), want, "quantized while loading vs in memory");

    // The tied embedding is stored once, as the int8 lm_head: 143 MB of 538 MB.
    let f32_bytes = f32_model.model.weight_bytes() as f64;
    assert!((written.tensor_bytes as f64) < 0.28 * f32_bytes, "{} of {f32_bytes}", written.tensor_bytes);
    let ckpt = QuantizedCheckpoint::open(&dir).unwrap();
    assert!(ckpt.source().entry("model.embed_tokens.weight").is_none());
    assert_eq!(ckpt.source().entry("lm_head.weight").unwrap().dtype, Dtype::I8);
    assert_eq!(ckpt.source().entry("lm_head.weight_scale").unwrap().shape, vec![49152, 576 / 32]);
    assert!(dir.join("tokenizer.json").is_file() && dir.join("tokenizer_config.json").is_file());
    // The folder keeps its tokenizer: the same ids for the same text.
    assert_eq!(candle_quant::generate::encode(&loaded, "The capital of France is").unwrap(), prompt);

    // Writing again needs overwrite; never over the input.
    let e = opened.quantize_to(&dir, &QuantConfig::default(), Int8Kind::Dynamic, &SaveOptions::default(), |_| {}).unwrap_err().to_string();
    assert!(e.contains("already exists") && e.contains("SaveOptions::overwrite"), "{e}");
    let over = SaveOptions { overwrite: true, ..Default::default() };
    opened.quantize_to(&dir, &QuantConfig::default(), Int8Kind::Dynamic, &over, |_| {}).unwrap();
    let gguf_dir = common::models();
    let e = opened.quantize_to(gguf_dir, &QuantConfig::default(), Int8Kind::Dynamic, &over, |_| {}).unwrap_err().to_string();
    assert!(e.contains("holds the input"), "{e}");
}

/// A tiny untied Llama (vocabulary 30522, hidden 64).
const UNTIED_LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "max_position_embeddings": 128, "vocab_size": 30522, "tie_word_embeddings": false, "eos_token_id": 102}"#;

/// An untied model's embedding table follows its int8 `lm_head` into int8 rows, one `f16` scale
/// per row: streamed into a folder (format version 3, the table listed), quantized while
/// loading, quantized in memory and saved from memory, all the same model; every looked-up row
/// within half a step of the float row; a folder whose `lm_head` stays float keeps the float
/// table (version 1); a table the config lists but the folder lacks is refused by name.
#[test]
fn untied_embedding_table_is_stored_as_int8_rows() {
    let scratch = common::Scratch::new("ckpt-untied-table");
    let tensors = common::tiny_llama(21);
    let float_dir = scratch.join("float");
    std::fs::create_dir_all(&float_dir).unwrap();
    common::write_model(&float_dir, &tensors, 1, UNTIED_LLAMA);
    let source = ModelSource::Folder(float_dir.clone());
    let prompt = [101, 7592, 2088, 1010, 102, 7];
    let cfg = QuantConfig::default();
    let mut in_memory = io::load_decoder(&source, &mut |_| {}).unwrap();
    quantize_dynamic(&mut in_memory.model, &cfg).unwrap();
    let want = logits_and_greedy(&in_memory, &prompt);

    let dir = scratch.join("int8");
    io::open_decoder(&source).unwrap().quantize_to(&dir, &cfg, Int8Kind::Dynamic, &SaveOptions::default(), |_| {}).unwrap();
    let ckpt = QuantizedCheckpoint::open(&dir).unwrap();
    let entry = |name: &str| ckpt.source().entry(name).map(|e| (e.dtype, e.shape.clone()));
    assert_eq!(entry("model.embed_tokens.weight"), Some((Dtype::I8, vec![30522, 64])));
    assert_eq!(entry("model.embed_tokens.weight_scale"), Some((Dtype::F16, vec![30522, 1])));
    assert_eq!((ckpt.quantization().tables.clone(), ckpt.quantization().format_version), (vec!["model.embed_tokens".to_string()], 3));
    let loaded = io::load_decoder(&ModelSource::Folder(dir.clone()), &mut |_| {}).unwrap();
    assert_eq!(logits_and_greedy(&loaded, &prompt), want, "folder vs in-memory quantization");
    let (in_situ, _) = io::open_decoder(&source).unwrap().load_int8(&cfg, Int8Kind::Dynamic, &mut |_| {}).unwrap();
    assert_eq!(logits_and_greedy(&in_situ, &prompt), want, "quantized while loading vs in memory");

    // Rows: q = round(x / s), s = max|x| / 127 rounded to f16, so |x − q·s| ≤ s/2 (+ rounding).
    let table = &tensors["model.embed_tokens.weight"];
    let looked_up = loaded.model.embed(&prompt).unwrap().to_vec2::<f32>().unwrap();
    for (&t, row) in prompt.iter().zip(&looked_up) {
        let x = table.get(t as usize).unwrap().to_vec1::<f32>().unwrap();
        let step = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        let worst = x.iter().zip(row).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 0.5 * step * 1.002 + 1e-6, "token {t}: error {worst}, step {step}");
        assert!(worst > 0.0, "token {t}: the row was not quantized");
    }

    // Saved from memory: the same tensors, and the same model back.
    let saved = scratch.join("saved");
    save_quantized(&mut in_memory.model, &saved, &SaveOptions::default()).unwrap();
    let back = QuantizedCheckpoint::open(&saved).unwrap();
    assert_eq!(back.quantization().tables, vec!["model.embed_tokens".to_string()]);
    for name in ["model.embed_tokens.weight", "model.embed_tokens.weight_scale"] {
        assert_eq!(back.source().read_bytes(name).unwrap(), ckpt.source().read_bytes(name).unwrap(), "{name}");
    }

    // lm_head kept float: so is the table, and the folder stays version 1.
    let float_head = scratch.join("float-head");
    let keep = QuantConfig::default().exclude("lm_head");
    io::open_decoder(&source).unwrap().quantize_to(&float_head, &keep, Int8Kind::Dynamic, &SaveOptions::default(), |_| {}).unwrap();
    let kept = QuantizedCheckpoint::open(&float_head).unwrap();
    assert_eq!(kept.source().entry("model.embed_tokens.weight").map(|e| e.dtype), Some(Dtype::F32));
    assert_eq!((kept.quantization().tables.len(), kept.quantization().format_version), (0, 1));
    io::load_decoder(&ModelSource::Folder(float_head), &mut |_| {}).unwrap();

    // The config lists a table the folder holds in float: refused, naming it.
    edit_config(&dir, |c| c["quantization_config"]["tables"] = serde_json::json!(["model.norm"]));
    let e = match io::load_decoder(&ModelSource::Folder(dir.clone()), &mut |_| {}) {
        Ok(_) => panic!("a listed table without int8 rows should fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("model.norm"), "{e}");
}

/// A model of a user's own: two layers and a float tensor, built the candle way.
struct Tiny {
    fc1: QLinear,
    fc2: QLinear,
    gain: Tensor,
}

impl Tiny {
    fn load(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: QLinear::load(48, 64, true, vb.pp("fc1"))?,
            fc2: QLinear::load(64, 24, false, vb.pp("fc2"))?,
            gain: vb.get(64, "gain")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?.broadcast_mul(&self.gain)?)
    }
}

impl Quantizable for Tiny {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        f(&mut self.fc1)?;
        f(&mut self.fc2)
    }

    fn visit_tensors(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        f("gain", &self.gain)
    }
}

fn tiny_float(seed: u64) -> Tiny {
    let mut rng = common::Rng::new(seed);
    let mut t = HashMap::new();
    t.insert("fc1.weight".to_string(), rng.tensor(&[64, 48], 0.3).unwrap());
    t.insert("fc1.bias".to_string(), rng.tensor(&[64], 0.1).unwrap());
    t.insert("fc2.weight".to_string(), rng.tensor(&[24, 64], 0.3).unwrap());
    t.insert("gain".to_string(), (rng.tensor(&[64], 0.1).unwrap() + 1.0).unwrap());
    Tiny::load(VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)).unwrap()
}

fn save_load_same_outputs(mut model: Tiny, name: &str) -> CheckpointScheme {
    let x = common::Rng::new(99).tensor(&[5, 48], 1.0).unwrap();
    let want = bits(&model.forward(&x).unwrap());
    let (_dir_scratch, dir) = temp(name);
    save_quantized(&mut model, &dir, &SaveOptions::default()).unwrap();
    let loaded = load_quantized(&dir, Tiny::load).unwrap();
    assert_eq!(bits(&loaded.forward(&x).unwrap()), want, "{name}: outputs after save and load");
    assert_eq!(loaded.fc1.kind_name(), model.fc1.kind_name());
    assert_eq!(loaded.fc2.kind_name(), model.fc2.kind_name());
    let q = QuantizedCheckpoint::open(&dir).unwrap().quantization().clone();
    q
}

#[test]
fn a_users_model_saves_and_loads_in_every_int8_kind() {
    // Dynamic with a per-layer override: fc2 per token, listed as an exception.
    let mut m = tiny_float(1);
    let cfg = QuantConfig::default()
        .activation(ActivationQuant::PerGroup(16))
        .weight(WeightQuant::PerGroup(16))
        .override_activation("fc2", ActivationQuant::PerToken);
    quantize_dynamic(&mut m, &cfg).unwrap();
    let q = save_load_same_outputs(m, "dynamic");
    // One layer each: the first scheme is the default, the other an exception.
    assert_eq!(q.layers.keys().collect::<Vec<_>>(), ["fc2"]);

    // Dynamic affine (the default scheme) with an affine per-token exception: the scheme is
    // written, and a file without it (as older folders are) reads as symmetric.
    let mut m = tiny_float(6);
    let cfg = QuantConfig::default().override_activation("fc2", ActivationQuant::AffinePerToken);
    quantize_dynamic(&mut m, &cfg).unwrap();
    let q = save_load_same_outputs(m, "dynamic affine");
    let json = serde_json::to_value(&q).unwrap();
    assert_eq!(json["default"]["activation_scheme"], "affine", "{json}");
    assert_eq!(json["layers"]["fc2"]["activation_scheme"], "affine", "{json}");
    assert_eq!(json["layers"]["fc2"]["activation_group_size"], serde_json::Value::Null, "{json}");
    let mut old = json.clone();
    old["default"].as_object_mut().unwrap().remove("activation_scheme");
    let old: CheckpointScheme = serde_json::from_value(old).unwrap();
    match old.default {
        candle_quant::checkpoint::LayerScheme::Dynamic { activation_scheme, .. } => {
            assert_eq!(activation_scheme, candle_quant::quant::QScheme::Symmetric)
        }
        other => panic!("{other:?}"),
    }
    // Symmetric is the default of the field, so it is not written.
    assert!(serde_json::to_value(&old).unwrap()["default"].get("activation_scheme").is_none());

    // Int4: dynamic with zero points in groups of 16 (affine activations in the same groups),
    // and weight-only symmetric; version 2 and the bits are written, int8 folders stay version 1.
    assert_eq!(q.format_version, 1);
    let mut m = tiny_float(8);
    let int4 = QuantConfig::default().activation(ActivationQuant::AffinePerGroup(16));
    quantize_dynamic(&mut m, &int4.clone().weight(WeightQuant::Int4 { group: 16, zero_point: true })).unwrap();
    assert_eq!(m.fc1.kind_name(), "int4-dynamic");
    let q = save_load_same_outputs(m, "dynamic int4");
    let json = serde_json::to_value(&q).unwrap();
    assert_eq!((json["format_version"].as_u64(), json["default"]["weight_bits"].as_u64()), (Some(2), Some(4)), "{json}");
    assert_eq!(json["default"]["weight_zero_point"], true, "{json}");
    let mut m = tiny_float(9);
    candle_quant::convert::quantize_weight_only(&mut m, &int4.weight(WeightQuant::Int4 { group: 16, zero_point: false })).unwrap();
    assert_eq!(m.fc1.kind_name(), "int4-weight-only");
    let q = save_load_same_outputs(m, "weight-only int4");
    assert!(serde_json::to_value(&q).unwrap()["default"].get("weight_zero_point").is_none());

    // Weight-only, fc2 kept float.
    let mut m = tiny_float(2);
    candle_quant::convert::quantize_weight_only(&mut m, &QuantConfig::default().exclude("fc2")).unwrap();
    let q = save_load_same_outputs(m, "weight-only");
    assert_eq!(q.excluded, ["fc2"]);

    // Static: prepare, calibrate, convert.
    let mut m = tiny_float(3);
    prepare(&mut m, &QuantConfig::default()).unwrap();
    let mut rng = common::Rng::new(4);
    for _ in 0..4 {
        m.forward(&rng.tensor(&[8, 48], 1.0).unwrap()).unwrap();
    }
    convert(&mut m).unwrap();
    assert_eq!(m.fc1.kind_name(), "int8-static");
    let q = save_load_same_outputs(m, "static");
    assert!(matches!(q.default, candle_quant::checkpoint::LayerScheme::Static { .. }), "{q:?}");

    // Static per group of 16 input channels, ranges narrow enough that some inputs of the
    // test batch (|x| up to ~3 on fc1) go through float: the scales and the float path survive.
    let mut m = tiny_float(7);
    for (layer, k) in [(&mut m.fc1, 48), (&mut m.fc2, 64)] {
        let scales: Vec<f32> = (0..k / 16).map(|g| (1.0 + g as f32) / 127.0).collect();
        let p = QParams::new(QSpec::DYNAMIC_ACTIVATION, Granularity::PerGroup { size: 16 }, scales, vec![0; k / 16]).unwrap();
        layer.quantize_static(p).unwrap();
    }
    let q = save_load_same_outputs(m, "static per group");
    match &q.default {
        candle_quant::checkpoint::LayerScheme::Static { activation_group_size, weight_group_size, .. } => {
            assert_eq!((*activation_group_size, *weight_group_size), (Some(16), Some(16)), "{q:?}")
        }
        other => panic!("{other:?}"),
    }

    // QAT: fake-quantized forward passes, then convert.
    let mut m = tiny_float(5);
    prepare_qat(&mut m, &QuantConfig::default()).unwrap();
    for _ in 0..3 {
        m.forward(&rng.tensor(&[8, 48], 1.0).unwrap()).unwrap();
    }
    convert(&mut m).unwrap();
    save_load_same_outputs(m, "qat");
}

/// A user model that forgets a layer in `visit_linears`.
struct Forgetful(Tiny);

impl Quantizable for Forgetful {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        f(&mut self.0.fc1)
    }
}

#[test]
fn a_layer_the_model_does_not_visit_is_an_error() {
    let mut m = tiny_float(6);
    quantize_dynamic(&mut m, &QuantConfig::default()).unwrap();
    let (_dir_scratch, dir) = temp("forgetful");
    save_quantized(&mut m, &dir, &SaveOptions::default()).unwrap();
    let e = load_quantized(&dir, |vb| Tiny::load(vb).map(Forgetful)).err().unwrap().to_string();
    assert!(e.contains("fc2") && e.contains("visit_linears"), "{e}");
    // A model that reads an int8 weight as a float tensor.
    let e = load_quantized(&dir, |vb| {
        candle_nn::linear(48, 64, vb.pp("fc1"))?;
        Tiny::load(vb)
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("fc1.weight") && e.contains("QLinear::load"), "{e}");
}

/// A source whose third tensor cannot be read: the write must leave nothing behind.
struct Failing(Vec<Entry>);

impl TensorSource for Failing {
    fn entries(&self) -> &[Entry] {
        &self.0
    }
    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        if name == "t2" {
            candle_core::bail!("disk error reading t2")
        }
        Ok(vec![0u8; 16])
    }
    fn describe(&self, name: &str) -> String {
        name.to_string()
    }
}

#[test]
fn an_interrupted_write_leaves_nothing_that_looks_complete() {
    let entries = (0..4).map(|i| Entry { name: format!("t{i}"), dtype: Dtype::F32, shape: vec![4] }).collect();
    let (_dir_scratch, dir) = temp("interrupted");
    let q = CheckpointScheme::new(candle_quant::checkpoint::LayerScheme::WeightOnly {
        weight_group_size: None,
        weight_bits: 8,
        weight_zero_point: false,
    });
    let opts = SaveOptions { max_shard_bytes: 20, ..Default::default() };
    let e = write_checkpoint(&dir, &Failing(entries), &q, &opts, |_| {}).unwrap_err().to_string();
    assert!(e.contains("t2"), "{e}");
    // Nothing under its name, and no partial folder beside it (the scratch folder is empty).
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

const CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "max_position_embeddings": 128, "vocab_size": 30522, "tie_word_embeddings": true, "eos_token_id": 102}"#;

/// A tiny tied Llama (no `lm_head.weight`) in bf16, sharded in `shards` files, with MiniLM's
/// tokenizer.
fn bf16_llama(dir: &Path, shards: usize) {
    let mut t = common::tiny_llama(7);
    t.remove("lm_head.weight");
    let t = t.into_iter().map(|(n, v)| (n, v.to_dtype(DType::BF16).unwrap())).collect();
    std::fs::create_dir_all(dir).unwrap();
    common::write_model(dir, &t, shards, CONFIG);
}

#[test]
fn sharded_bf16_source_to_sharded_int8_checkpoint() {
    let (_src_scratch, src) = temp("bf16-src");
    bf16_llama(&src, 3);
    let source = ModelSource::Folder(src.clone());
    let prompt = [101u32, 7592, 2088, 102, 2023];
    let mut in_memory = io::load_decoder(&source, &mut |_| {}).unwrap();
    let cfg = QuantConfig::default().exclude("*.down_proj");
    quantize_dynamic(&mut in_memory.model, &cfg).unwrap();
    let want = logits_and_greedy(&in_memory, &prompt);
    let (_out_scratch, out) = temp("bf16-int8");
    let opts = SaveOptions { max_shard_bytes: 1_000_000, ..Default::default() };
    let w = io::open_decoder(&source).unwrap().quantize_to(&out, &cfg, Int8Kind::Dynamic, &opts, |_| {}).unwrap();
    assert!(w.files.len() > 1 && out.join("model.safetensors.index.json").is_file(), "{:?}", w.files);
    let loaded = io::load_decoder(&ModelSource::Folder(out.clone()), &mut |_| {}).unwrap();
    assert_eq!(logits_and_greedy(&loaded, &prompt), want);
    let ckpt = QuantizedCheckpoint::open(&out).unwrap();
    assert_eq!(ckpt.quantization().excluded, ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]);
    // Float tensors keep their dtype; the float layer too.
    assert_eq!(ckpt.source().entry("model.norm.weight").unwrap().dtype, Dtype::BF16);
    assert_eq!(ckpt.source().entry("model.layers.0.mlp.down_proj.weight").unwrap().dtype, Dtype::BF16);
}

/// Edits `dir`'s files, expects an error on load mentioning every `needle`.
fn corrupt(name: &str, edit: impl FnOnce(&Path), needles: &[&str]) {
    let (_dir_scratch, dir) = temp(&format!("bad-{name}"));
    let mut m = tiny_float(8);
    quantize_dynamic(&mut m, &QuantConfig::default()).unwrap();
    save_quantized(&mut m, &dir, &SaveOptions { max_shard_bytes: 3000, ..Default::default() }).unwrap();
    edit(&dir);
    let e = match load_quantized(&dir, Tiny::load) {
        Ok(_) => panic!("{name}: loading should fail"),
        Err(e) => format!("{e:#}"),
    };
    for n in needles {
        assert!(e.contains(n), "{name}: '{n}' not in: {e}");
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(path, c.to_string()).unwrap();
}

/// Rewrites the safetensors file holding `tensor`: `f` edits its header (JSON) and data.
fn edit_shard(dir: &Path, tensor: &str, f: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>)) {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    let file = dir.join(index["weight_map"][tensor].as_str().unwrap());
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    f(&mut header, &mut data);
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(file, out).unwrap();
}

#[test]
fn bad_checkpoints_are_errors_naming_the_file_and_tensor() {
    corrupt("version", |d| edit_config(d, |c| c["quantization_config"]["format_version"] = 9.into()), &["config.json", "format_version 9"]);
    corrupt("method", |d| edit_config(d, |c| c["quantization_config"]["quant_method"] = "gptq".into()), &["config.json", "gptq"]);
    corrupt("kind", |d| edit_config(d, |c| c["quantization_config"]["default"]["kind"] = "int3".into()), &["config.json", "int3"]);
    corrupt(
        "unknown layer",
        |d| {
            edit_config(d, |c| {
                c["quantization_config"]["layers"]["fc9"] = serde_json::json!({"kind": "weight-only", "weight_group_size": null})
            })
        },
        &["fc9"],
    );
    corrupt(
        "group mismatch",
        |d| edit_config(d, |c| c["quantization_config"]["default"]["weight_group_size"] = 16.into()),
        &["fc1", "weight_group_size 16", "2 groups"],
    );
    corrupt(
        "missing scale",
        |d| {
            edit_shard(d, "fc2.weight_scale", |h, _| {
                h.as_object_mut().unwrap().remove("fc2.weight_scale");
            });
            let path = d.join("model.safetensors.index.json");
            let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            index["weight_map"].as_object_mut().unwrap().remove("fc2.weight_scale");
            std::fs::write(path, index.to_string()).unwrap();
        },
        &["fc2.weight_scale", "missing"],
    );
    corrupt(
        "scale dtype",
        |d| {
            edit_shard(d, "fc2.weight_scale", |h, _| {
                let e = &mut h["fc2.weight_scale"];
                e["dtype"] = "BF16".into();
            })
        },
        &["fc2.weight_scale", "F16", "BF16"],
    );
    corrupt(
        "scale shape",
        |d| edit_shard(d, "fc2.weight_scale", |h, _| h["fc2.weight_scale"]["shape"] = serde_json::json!([4, 12])),
        &["fc2.weight_scale", "[4, 12]"],
    );
    corrupt(
        "byte length",
        |d| edit_shard(d, "fc1.weight", |h, _| h["fc1.weight"]["shape"] = serde_json::json!([64, 40])),
        &["safetensors", "fc1.weight", "[64, 40]"],
    );
    corrupt("truncated", |d| edit_shard(d, "fc1.weight", |_, data| data.truncate(data.len() / 2)), &["safetensors", "outside"]);
    corrupt(
        "nan scale",
        |d| {
            edit_shard(d, "fc1.weight_scale", |h, data| {
                let at = h["fc1.weight_scale"]["data_offsets"][0].as_u64().unwrap() as usize + 6;
                data[at..at + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
            })
        },
        &["fc1", "scale at row 1, group 1", "NaN"],
    );
    corrupt(
        "int8 -128",
        |d| {
            edit_shard(d, "fc2.weight", |h, data| {
                let at = h["fc2.weight"]["data_offsets"][0].as_u64().unwrap() as usize + 65;
                data[at] = 0x80;
            })
        },
        &["fc2", "-128", "row 1, column 1"],
    );
    corrupt(
        "index disagrees",
        |d| {
            let path = d.join("model.safetensors.index.json");
            let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let other = index["weight_map"]["gain"].as_str().unwrap().to_string();
            let files: Vec<String> = std::fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
            let wrong = files.iter().find(|f| f.ends_with(".safetensors") && **f != other).unwrap().clone();
            index["weight_map"]["gain"] = wrong.into();
            std::fs::write(path, index.to_string()).unwrap();
        },
        &["model.safetensors.index.json", "gain"],
    );
    corrupt(
        "missing shard",
        |d| {
            let first =
                std::fs::read_dir(d).unwrap().flatten().map(|e| e.path()).find(|p| p.to_str().unwrap().contains("model-00001-of")).unwrap();
            std::fs::remove_file(first).unwrap()
        },
        &["model-00001-of-"],
    );
}

/// The files are plain safetensors: the reference implementation (the `safetensors` crate)
/// reads them, I8 weights and F16 scales included, with the values we wrote.
#[test]
fn checkpoints_open_in_the_reference_safetensors_reader() {
    let mut m = tiny_float(9);
    quantize_dynamic(&mut m, &QuantConfig::default()).unwrap();
    let (_dir_scratch, dir) = temp("interop");
    save_quantized(&mut m, &dir, &SaveOptions::default()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("fc1.weight").unwrap();
    assert_eq!((w.dtype(), w.shape()), (safetensors::Dtype::I8, &[64usize, 48][..]));
    let (want, _) = m.fc1.int8_parts().unwrap();
    let rows = want.to_rows();
    assert_eq!(w.data().iter().map(|&b| b as i8).collect::<Vec<_>>(), rows.values());
    let s = st.tensor("fc1.weight_scale").unwrap();
    assert_eq!((s.dtype(), s.shape()), (safetensors::Dtype::F16, &[64usize, 2][..]));
    assert_eq!(st.tensor("gain").unwrap().dtype(), safetensors::Dtype::F32);
}

/// Per-channel weights with affine activations in groups of 32 cannot compute together: the
/// streamed writer refuses the plan, naming the layer and both groupings, before it writes
/// anything.
#[test]
fn quantize_to_refuses_groups_that_cannot_work_together() {
    let (scratch, dir) = temp("mismatched-groups");
    let float = scratch.join("float");
    std::fs::create_dir_all(&float).unwrap();
    common::write_model(
        &float,
        &common::tiny_llama(3),
        1,
        CONFIG.replace("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false").as_str(),
    );
    let opened = io::open_decoder(&ModelSource::Folder(float)).unwrap();
    let config = QuantConfig::default().weight(WeightQuant::PerChannel).activation(ActivationQuant::AffinePerGroup(32));
    let err = opened.quantize_to(&dir, &config, Int8Kind::Dynamic, &SaveOptions::default(), |_| {}).unwrap_err().to_string();
    assert!(err.contains("model.layers.0.self_attn.q_proj") && err.contains("one scale per output channel"), "{err}");
    assert!(!dir.exists());
}
