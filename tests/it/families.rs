//! Decoder families from Hugging Face folders, each proven on a tiny random checkpoint loaded by
//! this crate and by candle-transformers' implementation of the same family: f32 logits agree,
//! and the int8 model's layers are the checkpoint's linear weights.

use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_quant::convert::{quantize_dynamic, QuantConfig};
use candle_quant::io::{self, ModelSource};
use candle_quant::models::llama::KvCache;
use std::collections::HashMap;
use std::path::Path;

fn folder(name: &str) -> common::Scratch {
    common::Scratch::new(&format!("family-{name}"))
}

/// Random tensors of a 2-layer decoder (hidden 64, 4 heads, 2 key/value heads, MLP 96, vocab
/// 30522): `bias` adds q/k/v biases, `tied` leaves out `lm_head.weight`.
fn tensors(seed: u64, bias: bool, tied: bool) -> HashMap<String, Tensor> {
    let mut t = common::tiny_llama(seed);
    let mut rng = common::Rng::new(seed + 100);
    for l in 0..2 {
        for (n, len) in [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)] {
            if bias {
                t.insert(format!("model.layers.{l}.self_attn.{n}.bias"), rng.tensor(&[len], 0.1).unwrap());
            }
        }
    }
    if tied {
        t.remove("lm_head.weight");
    }
    t
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(&a.flatten_all().unwrap(), &b.flatten_all().unwrap()).unwrap()
}

/// This crate's last-position logits for `tokens` from `dir`, and the int8 model's layer names.
fn ours(dir: &Path, tokens: &[u32]) -> (Tensor, Vec<String>) {
    let lm = io::load_decoder(&ModelSource::Folder(dir.to_path_buf()), &mut |_| {}).unwrap();
    let logits = lm.model.forward(tokens, &mut KvCache::default(), false).unwrap();
    let mut q = lm.model.clone();
    let report = quantize_dynamic(&mut q, &QuantConfig::default()).unwrap();
    (logits, report.converted)
}

/// The linear layers a checkpoint holds: its 2-D `*_proj.weight` tensors, and `lm_head` (a
/// tied head reads the embedding table).
fn linear_names(t: &HashMap<String, Tensor>) -> Vec<String> {
    let mut names: Vec<String> =
        t.keys().filter(|n| n.ends_with("_proj.weight")).map(|n| n.trim_end_matches(".weight").to_string()).collect();
    names.push("lm_head".into());
    names.sort();
    names
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 1000 + (i * 7919) % 20000).collect()
}

#[test]
fn qwen2_with_qkv_bias_tied_and_untied_matches_candle_transformers() {
    use candle_transformers::models::qwen2 as ct;
    for tied in [false, true] {
        let t = tensors(11, true, tied);
        let dir = folder(&format!("qwen2-{tied}"));
        let config = format!(
            r#"{{"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
             "max_position_embeddings": 128, "vocab_size": 30522, "tie_word_embeddings": {tied}, "hidden_act": "silu",
             "sliding_window": 128, "max_window_layers": 2, "use_sliding_window": false}}"#
        );
        common::write_model(&dir, &t, 1, &config);
        let tokens = prompt(20);
        let (mine, layers) = ours(&dir, &tokens);
        assert_eq!(sorted(layers), linear_names(&t));
        let cfg: ct::Config = serde_json::from_str(&config).unwrap();
        let mut peer = ct::ModelForCausalLM::new(&cfg, VarBuilder::from_tensors(t.clone(), DType::F32, &Device::Cpu)).unwrap();
        let theirs = peer.forward(&Tensor::new(&tokens[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), 0).unwrap();
        let diff = max_diff(&mine, &theirs);
        println!("qwen2 (tied: {tied}): max |logit difference| {diff}");
        assert!(diff < 1e-4, "qwen2 (tied: {tied}): logits differ by {diff}");
    }
}

/// A 40-token prompt through a 16-token window. candle-transformers' mask lets a query see
/// `sliding_window + 1` keys, Hugging Face's `sliding_window`: the peer is given 15.
#[test]
fn mistral_with_a_sliding_window_matches_candle_transformers() {
    use candle_transformers::models::mistral as ct;
    let t = tensors(12, false, false);
    let dir = folder("mistral");
    let config = r#"{"model_type": "mistral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "max_position_embeddings": 128, "vocab_size": 30522, "sliding_window": 16, "hidden_act": "silu"}"#;
    common::write_model(&dir, &t, 1, config);
    let tokens = prompt(40);
    let (mine, layers) = ours(&dir, &tokens);
    assert_eq!(sorted(layers), linear_names(&t));
    let mut cfg: ct::Config = serde_json::from_str(config).unwrap();
    cfg.sliding_window = Some(15);
    let mut peer = ct::Model::new(&cfg, VarBuilder::from_tensors(t.clone(), DType::F32, &Device::Cpu)).unwrap();
    let theirs = peer.forward(&Tensor::new(&tokens[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), 0).unwrap();
    let diff = max_diff(&mine, &theirs);
    println!("mistral: max |logit difference| {diff}");
    assert!(diff < 1e-4, "mistral: logits differ by {diff}");
    // The window matters here: without it the logits are different.
    let mut global = cfg.clone();
    global.sliding_window = None;
    let mut unwindowed = ct::Model::new(&global, VarBuilder::from_tensors(t, DType::F32, &Device::Cpu)).unwrap();
    let far = unwindowed.forward(&Tensor::new(&tokens[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), 0).unwrap();
    assert!(max_diff(&mine, &far) > 1e-3, "the prompt should cross the window");
}

/// Phi-3's fused `qkv_proj` and `gate_up_proj` stay one int8 layer each (named as in the
/// checkpoint), their outputs split after the matmul.
#[test]
fn phi3_with_fused_projections_matches_candle_transformers() {
    use candle_transformers::models::phi3 as ct;
    let mut t = common::tiny_llama(13);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        let take = |t: &mut HashMap<String, Tensor>, n: &str| t.remove(&format!("{p}.{n}.weight")).unwrap();
        let (q, k, v) = (take(&mut t, "self_attn.q_proj"), take(&mut t, "self_attn.k_proj"), take(&mut t, "self_attn.v_proj"));
        t.insert(format!("{p}.self_attn.qkv_proj.weight"), Tensor::cat(&[q, k, v], 0).unwrap());
        let (g, u) = (take(&mut t, "mlp.gate_proj"), take(&mut t, "mlp.up_proj"));
        t.insert(format!("{p}.mlp.gate_up_proj.weight"), Tensor::cat(&[g, u], 0).unwrap());
    }
    let dir = folder("phi3");
    let config = r#"{"model_type": "phi3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "max_position_embeddings": 128, "original_max_position_embeddings": 128, "vocab_size": 30522,
         "hidden_act": "silu", "rope_scaling": null, "partial_rotary_factor": null, "bos_token_id": 1,
         "eos_token_id": 2, "tie_word_embeddings": false}"#;
    common::write_model(&dir, &t, 1, config);
    let tokens = prompt(24);
    let (mine, layers) = ours(&dir, &tokens);
    assert_eq!(sorted(layers), linear_names(&t));
    assert!(linear_names(&t).contains(&"model.layers.1.self_attn.qkv_proj".to_string()));
    let cfg: ct::Config = serde_json::from_str(config).unwrap();
    let mut peer = ct::Model::new(&cfg, VarBuilder::from_tensors(t.clone(), DType::F32, &Device::Cpu)).unwrap();
    let theirs = peer.forward(&Tensor::new(&tokens[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), 0).unwrap();
    let diff = max_diff(&mine, &theirs);
    println!("phi3: max |logit difference| {diff}");
    assert!(diff < 1e-4, "phi3: logits differ by {diff}");
    // Quantized while loading and written as a checkpoint, the fused layers keep their names.
    let out = folder("phi3-int8");
    std::fs::remove_dir_all(&out).unwrap();
    let opened = io::open_decoder(&ModelSource::Folder(dir.to_path_buf())).unwrap();
    let q = QuantConfig::default();
    opened.quantize_to(&out, &q, candle_quant::checkpoint::Int8Kind::Dynamic, &Default::default(), |_| {}).unwrap();
    let ckpt = candle_quant::checkpoint::QuantizedCheckpoint::open(&out).unwrap();
    assert!(ckpt.source().entry("model.layers.0.self_attn.qkv_proj.weight_scale").is_some());
    let loaded = io::load_decoder(&ModelSource::Folder(out.to_path_buf()), &mut |_| {}).unwrap();
    let mut mem = io::load_decoder(&ModelSource::Folder(dir.to_path_buf()), &mut |_| {}).unwrap();
    quantize_dynamic(&mut mem.model, &q).unwrap();
    let a = loaded.model.forward(&tokens, &mut KvCache::default(), false).unwrap();
    let b = mem.model.forward(&tokens, &mut KvCache::default(), false).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
}
