//! Gemma 3 270M from its GGUF file (the offline models folder, fetched when missing): the f32 model against
//! candle-transformers' Gemma 3 on the same weights, sliding-window decoding against the full
//! forward, and the SentencePiece tokenizer rebuilt from the metadata.

use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_quant::generate::encode;
use candle_quant::io::{self, gguf, LanguageModel, ModelSource};
use candle_quant::models::llama::{KvCache, Llama};
use std::collections::HashMap;
use std::sync::OnceLock;

const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

fn gemma_path() -> std::path::PathBuf {
    common::model_file(GEMMA)
}

fn gemma() -> &'static LanguageModel {
    static LM: OnceLock<LanguageModel> = OnceLock::new();
    LM.get_or_init(|| io::load_decoder(&ModelSource::Gguf(gemma_path()), &mut |_| {}).unwrap())
}

fn alice() -> String {
    std::fs::read_to_string(common::model_file("texts/alice29.txt")).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.flatten_all().unwrap() - b.flatten_all().unwrap()).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// candle-transformers' Gemma 3 on the GGUF's dequantized weights, against this crate's model,
/// on a prompt inside the sliding window (64 tokens) and one past it (600). The peer's mask
/// lets a query see `sliding_window + 1` keys where Hugging Face and llama.cpp let it see
/// `sliding_window`; it is given 511 to compute the same attention.
#[test]
fn gemma3_matches_candle_transformers_on_the_same_weights() {
    use candle_transformers::models::gemma3 as ct;
    let g = gguf::load_gguf_decoder(&gemma_path(), |_| {}).unwrap();
    let c = &g.config;
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.head_dim(), c.kv_heads()), (18, 640, 256, 1));
    let ours = Llama::load(c, VarBuilder::from_tensors(g.tensors.clone(), DType::F32, &Device::Cpu)).unwrap();
    // Norms come as Hugging Face holds them (w, multiplied as 1 + w), as the peer expects.
    let peer_tensors: HashMap<String, Tensor> = g.tensors.clone();
    let cfg = ct::Config {
        attention_bias: false,
        head_dim: c.head_dim(),
        hidden_activation: candle_nn::Activation::GeluPytorchTanh,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_attention_heads: c.num_attention_heads,
        num_hidden_layers: c.num_hidden_layers,
        num_key_value_heads: c.kv_heads(),
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope_theta as f64,
        rope_local_base_freq: 10_000.0,
        vocab_size: c.vocab_size,
        final_logit_softcapping: None,
        attn_logit_softcapping: None,
        query_pre_attn_scalar: 256,
        sliding_window: c.variant.sliding_window.unwrap() - 1,
        sliding_window_pattern: 6,
        max_position_embeddings: 1024,
    };
    let lm = gemma();
    let text = alice();
    let all = encode(lm, &text).unwrap();
    for n in [64, 600] {
        let tokens = &all[..n];
        let mut peer = ct::Model::new(false, &cfg, VarBuilder::from_tensors(peer_tensors.clone(), DType::F32, &Device::Cpu)).unwrap();
        let theirs = peer.forward(&Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), 0).unwrap();
        let mine = ours.forward(tokens, &mut KvCache::default(), false).unwrap();
        let diff = max_diff(&theirs, &mine);
        println!("{n} tokens: max |logit difference| vs candle-transformers {diff}");
        assert!(diff <= 1e-3, "{n} tokens: logits differ by {diff}");
    }
}

/// Decoding one token at a time past the 512-token window (the single-query path reads only
/// the window's keys) gives the logits of the full forward.
#[test]
fn gemma3_decoding_past_the_window_equals_the_full_forward() {
    let lm = gemma();
    let tokens = &encode(lm, &alice()).unwrap()[..530];
    let full = lm.model.forward(tokens, &mut KvCache::default(), true).unwrap();
    let mut cache = KvCache::default();
    lm.model.forward(&tokens[..505], &mut cache, false).unwrap();
    for (i, &t) in tokens.iter().enumerate().skip(505) {
        let step = lm.model.forward(&[t], &mut cache, false).unwrap();
        let diff = max_diff(&step, &full.narrow(0, i, 1).unwrap());
        assert!(diff < 1e-3, "position {i}: decoded logits differ from the full forward by {diff}");
    }
}

/// The tokenizer from the GGUF metadata: BOS first, pieces as the vocabulary spells them,
/// bytes for what it cannot spell, and text back unchanged. Expected ids are looked up in the
/// GGUF's own token list.
#[test]
fn gemma3_tokenizer_from_gguf_metadata() {
    let mut file = std::fs::File::open(gemma_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let vocab: Vec<String> =
        content.metadata["tokenizer.ggml.tokens"].to_vec().unwrap().iter().map(|v| v.to_string().unwrap().clone()).collect();
    let id = |piece: &str| vocab.iter().position(|t| t == piece).unwrap_or_else(|| panic!("'{piece}' is not in the vocabulary")) as u32;
    let lm = gemma();
    assert_eq!(lm.model.config().bos_token_id, Some(id("<bos>")));
    // Whole words are pieces of their own (spaces written as ▁).
    assert_eq!(encode(lm, "Hello world").unwrap(), [id("<bos>"), id("Hello"), id("▁world")]);
    assert_eq!(
        encode(lm, "The cat sat on the mat.").unwrap()[1..],
        [id("The"), id("▁cat"), id("▁sat"), id("▁on"), id("▁the"), id("▁mat"), id(".")]
    );
    // U+F0000 (private use plane) has no piece: its four UTF-8 bytes are byte tokens.
    assert_eq!(encode(lm, "\u{F0000}").unwrap()[1..], [id("<0xF3>"), id("<0xB0>"), id("<0x80>"), id("<0x80>")]);
    for text in ["Alice was beginning to get very tired", "Ünïcödé ☃ \u{F0000}\u{10FFFF} tabs\tand  two spaces\nnew line", " leading space"]
    {
        let ids = encode(lm, text).unwrap();
        let back = lm.tokenizer.decode(&ids, true).unwrap();
        assert_eq!(back, text, "round trip of {text:?} through {ids:?}");
    }
}

/// Gemma 3 quantized to a folder (a Hugging Face–style `gemma3_text` config, norms as HF holds
/// them) loads back to the very model quantized in memory.
#[test]
fn gemma3_int8_checkpoint_round_trip() {
    use candle_quant::checkpoint::{Int8Kind, SaveOptions};
    use candle_quant::convert::{quantize_dynamic, QuantConfig};
    let scratch = common::Scratch::new("gemma");
    let dir = scratch.join("int8");
    let opened = io::open_decoder(&ModelSource::Gguf(gemma_path())).unwrap();
    opened.quantize_to(&dir, &QuantConfig::default(), Int8Kind::Dynamic, &SaveOptions::default(), |_| {}).unwrap();
    let loaded = io::load_decoder(&ModelSource::Folder(dir.clone()), &mut |_| {}).unwrap();
    assert_eq!(loaded.model.config().model_type, "gemma3_text");
    let mut mem = gemma().clone();
    quantize_dynamic(&mut mem.model, &QuantConfig::default()).unwrap();
    let tokens = encode(gemma(), "Alice was beginning to get very tired of sitting by her sister").unwrap();
    assert_eq!(encode(&loaded, "Alice was beginning to get very tired of sitting by her sister").unwrap(), tokens);
    let a = loaded.model.forward(&tokens, &mut KvCache::default(), true).unwrap();
    let b = mem.model.forward(&tokens, &mut KvCache::default(), true).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
}
