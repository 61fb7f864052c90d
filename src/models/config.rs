//! The decoder's configuration and the per-family mapping from a Hugging Face `config.json`:
//! Llama (SmolLM2, TinyLlama, Llama 2/3 with llama3 rope scaling), Qwen2 (q/k/v biases),
//! Mistral (sliding window), Phi-3 (fused projections) and Gemma 3 (a [`Variant`]). GGUF
//! metadata maps to the same type (`io::gguf`).

use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

/// The fields of a Hugging Face `config.json` this model reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DecoderConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    #[serde(default)]
    /// Key/value heads (grouped-query attention); the query heads when absent.
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    /// Size of one head; `hidden_size / num_attention_heads` when absent.
    pub head_dim: Option<usize>,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    /// RoPE base.
    pub rope_theta: f32,
    #[serde(default = "default_context")]
    /// Longest sequence, in tokens.
    pub max_position_embeddings: usize,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    #[serde(default)]
    /// `lm_head` is the embedding table.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2; some Llama variants).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    /// RoPE frequency scaling (llama3).
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    #[serde(default, deserialize_with = "one_or_many")]
    /// End-of-sequence tokens.
    pub eos_token_id: Vec<u32>,
    #[serde(default)]
    /// `llama`, `qwen2`, `mistral`, `phi3` or `gemma3_text`.
    pub model_type: String,
    /// Prepend `bos_token_id` to every prompt and evaluation window (Gemma; llama.cpp's
    /// `add_bos_token`).
    #[serde(default)]
    pub add_bos_token: bool,
    /// Architecture variations beyond Llama (all off for Llama-family checkpoints).
    #[serde(default)]
    pub variant: Variant,
}

/// Where a decoder departs from Llama: Gemma 3 switches on most of these.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Variant {
    /// RMSNorm of each query and key head (over the head size) before RoPE.
    pub qk_norm: bool,
    /// Norms after attention and after the MLP too ("sandwich"): `x + norm(attn(norm(x)))`.
    pub sandwich_norms: bool,
    /// Added to every RMSNorm weight at load (Hugging Face Gemma stores `w − 1`).
    pub norm_offset: f32,
    /// Keys a sliding-window layer attends to: the query's own position and the
    /// `sliding_window − 1` before it.
    pub sliding_window: Option<usize>,
    /// Every `n`-th layer (`n`, `2n`, … counted from 1) attends globally, the others through the
    /// window; `None` with a window: every layer slides.
    pub global_every: Option<usize>,
    /// RoPE base of the sliding-window layers (global ones use `rope_theta`).
    pub rope_local_theta: Option<f32>,
    /// GELU (tanh approximation) instead of SiLU in the gated MLP.
    pub gelu_tanh: bool,
    /// Token embeddings multiplied by √hidden.
    pub scale_embeddings: bool,
    /// One `qkv_proj` instead of `q_proj`, `k_proj`, `v_proj` (Phi-3).
    pub fused_qkv: bool,
    /// One `gate_up_proj` instead of `gate_proj`, `up_proj` (Phi-3).
    pub fused_gate_up: bool,
    /// Attention scores scaled by `1/√query_pre_attn_scalar` instead of `1/√head_dim`.
    pub query_pre_attn_scalar: Option<usize>,
}

impl Variant {
    /// Whether layer `i` attends through the sliding window.
    pub fn is_sliding(&self, i: usize) -> bool {
        self.sliding_window.is_some() && self.global_every.is_none_or(|n| n == 0 || !(i + 1).is_multiple_of(n))
    }
}

fn default_rope_theta() -> f32 {
    10_000.0
}

fn default_context() -> usize {
    4096
}

fn one_or_many<'de, De: serde::Deserializer<'de>>(d: De) -> std::result::Result<Vec<u32>, De::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        Null,
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
        OneOrMany::Null => vec![],
    })
}

/// Llama 3 rope scaling (`rope_type: "llama3"`): long wavelengths slowed by `factor`, short kept,
/// smooth in between.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RopeScaling {
    #[serde(default, alias = "type")]
    /// `llama3` (or `default`: none).
    pub rope_type: String,
    /// How much longer the context is than in training.
    pub factor: f32,
    #[serde(default = "one")]
    /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
    pub low_freq_factor: f32,
    #[serde(default = "four")]
    /// Wavelengths below `original / high_freq_factor` are kept; in between, blended.
    pub high_freq_factor: f32,
    #[serde(default = "default_orig")]
    /// The training context.
    pub original_max_position_embeddings: usize,
}

fn one() -> f32 {
    1.0
}
fn four() -> f32 {
    4.0
}
fn default_orig() -> usize {
    8192
}

impl DecoderConfig {
    /// Parses a `config.json`, checking that it describes a supported architecture.
    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let parse = || -> Result<DecoderConfig> {
            serde_json::from_value(json.clone()).map_err(|e| candle_core::Error::Msg(format!("config.json ({model_type}): {e}")))
        };
        let mut cfg: DecoderConfig = match model_type {
            "llama" | "qwen2" => parse()?,
            "mistral" => {
                // Every layer attends through the window when the config sets one.
                let mut cfg = parse()?;
                cfg.variant.sliding_window = json.get("sliding_window").and_then(|w| w.as_u64()).map(|w| w as usize);
                cfg
            }
            "gemma3_text" => {
                let mut cfg = parse()?;
                let get = |k: &str| json.get(k).and_then(|v| v.as_f64());
                cfg.variant = Variant {
                    qk_norm: true,
                    sandwich_norms: true,
                    norm_offset: 1.0,
                    sliding_window: get("sliding_window").map(|w| w as usize),
                    global_every: Some(get("sliding_window_pattern").map_or(6, |p| p as usize)),
                    rope_local_theta: Some(get("rope_local_base_freq").unwrap_or(10_000.0) as f32),
                    gelu_tanh: true,
                    scale_embeddings: true,
                    query_pre_attn_scalar: get("query_pre_attn_scalar").map(|q| q as usize),
                    ..Variant::default()
                };
                cfg.add_bos_token = true;
                cfg.tie_word_embeddings = json.get("tie_word_embeddings").and_then(|t| t.as_bool()).unwrap_or(true);
                cfg
            }
            "phi3" => {
                let mut cfg = parse()?;
                if json.get("partial_rotary_factor").and_then(|p| p.as_f64()).is_some_and(|p| p != 1.0) {
                    bail!("config.json (phi3): partial rotary embeddings are not supported")
                }
                if json.get("rope_scaling").is_some_and(|r| !r.is_null()) {
                    bail!("config.json (phi3): rope scaling (su / longrope) is not supported")
                }
                cfg.rope_scaling = None;
                cfg.variant.fused_qkv = true;
                cfg.variant.fused_gate_up = true;
                cfg
            }
            other => bail!("unknown architecture '{other}' in config.json (supported: llama, mistral, qwen2, phi3, gemma3_text)"),
        };
        if model_type == "qwen2" {
            cfg.attention_bias = true;
        }
        if let Some(rs) = &cfg.rope_scaling {
            if !matches!(rs.rope_type.as_str(), "llama3" | "default" | "") {
                bail!("config.json: rope scaling '{}' is not supported (supported: llama3)", rs.rope_type)
            }
        }
        Ok(cfg)
    }

    /// Errors for head counts the attention cannot split: no heads, no key/value heads, query
    /// heads not a whole multiple of key/value heads, or no head size.
    pub fn validate(&self) -> Result<()> {
        // Sizes a config can claim before any tensor is read are bounded, so that nothing is
        // sized by an absurd one (the tensors' own shapes are checked against these when read).
        const MAX_SIZE: usize = 1 << 24;
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim.unwrap_or(0)),
        ];
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v > MAX_SIZE) {
            bail!("model config: {name} = {v} is larger than any supported model ({MAX_SIZE})")
        }
        if self.max_position_embeddings == 0 {
            bail!("model config: max_position_embeddings is 0")
        }
        let (heads, kv) = (self.num_attention_heads, self.kv_heads());
        let d = self.head_dim.or(self.hidden_size.checked_div(heads)).unwrap_or(0);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) || d == 0 {
            bail!("model config: {heads} attention heads, {kv} key/value heads and head size {d} do not split (heads must be a whole multiple of key/value heads, all non-zero)")
        }
        if !d.is_multiple_of(2) {
            bail!("model config: head size {d} is odd (RoPE rotates the two halves of each head)")
        }
        Ok(())
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Inverse frequencies `θ^(-2i/d)` for base `theta`, with llama3 scaling applied when
    /// configured.
    pub(crate) fn inv_freq(&self, theta: f32) -> Vec<f32> {
        let d = self.head_dim();
        let base: Vec<f32> = (0..d / 2).map(|i| 1.0 / theta.powf(2.0 * i as f32 / d as f32)).collect();
        let Some(rs) = self.rope_scaling.as_ref().filter(|r| r.rope_type == "llama3") else { return base };
        let orig = rs.original_max_position_embeddings as f32;
        let (low_wl, high_wl) = (orig / rs.low_freq_factor, orig / rs.high_freq_factor);
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_wl {
                    f
                } else if wavelen > low_wl {
                    f / rs.factor
                } else {
                    let smooth = (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
                    (1.0 - smooth) * f / rs.factor + smooth * f
                }
            })
            .collect()
    }
}

/// The former name of [`DecoderConfig`].
pub type LlamaConfig = DecoderConfig;
