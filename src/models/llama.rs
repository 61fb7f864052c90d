//! Llama-family decoder (SmolLM2, TinyLlama, Llama 2/3, Qwen2-style q/k/v bias) whose linear
//! layers are [`QLinear`]s named as in the checkpoint. Grouped-query attention, RoPE (with
//! llama3 frequency scaling), RMSNorm, SwiGLU, tied or untied `lm_head`, KV cache. Batch 1.

use super::attention::{attend_sequence, HeadRows};
use crate::convert::Quantizable;
use crate::nn::{forward_shared, with_float_values, QLinear};
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use serde::{Deserialize, Serialize};
use std::mem::MaybeUninit;

/// The fields of a Hugging Face `config.json` this model reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LlamaConfig {
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

impl LlamaConfig {
    /// Parses a `config.json`, checking that it describes a supported architecture.
    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let parse = || -> Result<LlamaConfig> {
            serde_json::from_value(json.clone()).map_err(|e| candle_core::Error::Msg(format!("config.json ({model_type}): {e}")))
        };
        let mut cfg: LlamaConfig = match model_type {
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
    fn inv_freq(&self, theta: f32) -> Vec<f32> {
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

/// Positions whose RoPE rotations are computed when a model loads (at most; a longer context
/// computes the rest as it reaches them), so a config's context length never sizes an allocation.
const ROPE_TABLE: usize = 8192;

/// `(cos, sin)` of `p · f` for positions `p ∈ from..from + n` and frequencies `inv_freq`, each
/// `[n, inv_freq.len()]`.
fn rope_rows(inv_freq: &[f32], from: usize, n: usize) -> Result<(Tensor, Tensor)> {
    let angles: Vec<f32> = (from..from + n).flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f)).collect();
    let freqs = Tensor::from_vec(angles, (n, inv_freq.len()), &Device::Cpu)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Positions a layer's key/value buffers grow by: memory is reserved in steps of this many
/// positions instead of being copied on every token.
const KV_CHUNK: usize = 512;

/// Keys and values of past positions, per layer, written in place (a decoding step copies one
/// position, not the whole history). One sequence: a batch of sequences is a cache each.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One layer's keys and values, in the form the attention that reads them wants: rows of plain
/// floats for the kernels' attention (inference), tensors that carry gradients for candle's ops
/// (differentiable mode, other dtypes). A cache filled one way and read the other is converted once.
#[derive(Debug, Clone, Default)]
enum LayerCache {
    #[default]
    Empty,
    Rows(RowCache),
    /// `[1, kv_heads, t, d]` keys and values.
    Tensors(candle_nn::kv_cache::KvCache),
}

impl LayerCache {
    fn len(&self) -> usize {
        match self {
            LayerCache::Empty => 0,
            LayerCache::Rows(r) => r.len,
            LayerCache::Tensors(c) => c.current_seq_len(),
        }
    }

    /// The rows form for `heads` key/value heads of `d` values.
    fn rows(&mut self, heads: usize, d: usize) -> Result<&mut RowCache> {
        if let LayerCache::Tensors(c) = self {
            let mut rows = RowCache::new(heads, d);
            if let (Some(k), Some(v)) = (c.k()?, c.v()?) {
                let (k, v) = (k.flatten_all()?.to_vec1::<f32>()?, v.flatten_all()?.to_vec1::<f32>()?);
                let t = k.len() / (heads * d).max(1);
                rows.reserve(t);
                for g in 0..heads {
                    let (from, to) = (g * t * d..(g + 1) * t * d, g * rows.capacity * d);
                    rows.keys[to..to + t * d].copy_from_slice(&k[from.clone()]);
                    rows.values[to..to + t * d].copy_from_slice(&v[from]);
                }
                rows.len = t;
            }
            *self = LayerCache::Rows(rows);
        }
        if let LayerCache::Empty = self {
            *self = LayerCache::Rows(RowCache::new(heads, d));
        }
        match self {
            LayerCache::Rows(r) if r.heads == heads && r.d == d => Ok(r),
            _ => bail!("key/value cache holds heads of another shape than {heads} × {d}"),
        }
    }

    /// The tensors form.
    fn tensors(&mut self) -> Result<&mut candle_nn::kv_cache::KvCache> {
        if let LayerCache::Rows(r) = self {
            let mut c = candle_nn::kv_cache::KvCache::new(2, KV_CHUNK);
            if r.len > 0 {
                let heads: Vec<usize> = (0..r.heads).collect();
                let gather =
                    |buf: &[f32]| -> Vec<f32> { heads.iter().flat_map(|g| &buf[g * r.capacity * r.d..][..r.len * r.d]).copied().collect() };
                let shape = (1, r.heads, r.len, r.d);
                c.append(
                    &Tensor::from_vec(gather(&r.keys), shape, &Device::Cpu)?,
                    &Tensor::from_vec(gather(&r.values), shape, &Device::Cpu)?,
                )?;
            }
            *self = LayerCache::Tensors(c);
        }
        if let LayerCache::Empty = self {
            *self = LayerCache::Tensors(candle_nn::kv_cache::KvCache::new(2, KV_CHUNK));
        }
        match self {
            LayerCache::Tensors(c) => Ok(c),
            _ => bail!("key/value cache lost its tensors"),
        }
    }
}

/// Keys (RoPE applied) and values of one layer as rows of `d` floats: key/value head `g`'s
/// position `p` at `(g·capacity + p)·d`, room for `capacity` positions reserved in steps of
/// [`KV_CHUNK`].
#[derive(Debug, Clone, Default)]
struct RowCache {
    heads: usize,
    d: usize,
    len: usize,
    capacity: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl RowCache {
    fn new(heads: usize, d: usize) -> Self {
        Self { heads, d, ..Self::default() }
    }

    /// Room for `extra` more positions (moving each head's rows to its new place if it grows).
    fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need <= self.capacity {
            return;
        }
        let (cap, old, len, d) = (need.next_multiple_of(KV_CHUNK), self.capacity, self.len, self.d);
        let regrow = |buf: &[f32]| {
            let mut grown = vec![0f32; self.heads * cap * d];
            for g in 0..self.heads {
                grown[g * cap * d..][..len * d].copy_from_slice(&buf[g * old * d..][..len * d]);
            }
            grown
        };
        (self.keys, self.values) = (regrow(&self.keys), regrow(&self.values));
        self.capacity = cap;
    }

    /// The rows of key/value head `g` up to the last position held.
    fn head(&self, g: usize) -> HeadRows<'_> {
        let at = g * self.capacity * self.d..(g * self.capacity + self.len) * self.d;
        HeadRows { keys: &self.keys[at.clone()], values: &self.values[at] }
    }
}

/// `x` rotated by RoPE at one position (`rotate_half` form, as candle's `rope`): with `h = d/2`,
/// `y_j = x_j·cos_j − x_{j+h}·sin_j` and `y_{j+h} = x_j·sin_j + x_{j+h}·cos_j` for `j < h`.
/// Writes every value of `y` (`d` even, `h` angles given: checked by [`LlamaConfig::validate`]
/// and the caller).
fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [MaybeUninit<f32>]) {
    let h = x.len() / 2;
    let (x1, x2) = x.split_at(h);
    let (y1, y2) = y.split_at_mut(h);
    for j in 0..h {
        y1[j].write(x1[j] * cos[j] - x2[j] * sin[j]);
        y2[j].write(x1[j] * sin[j] + x2[j] * cos[j]);
    }
}

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj`, `v_proj`; or one fused `qkv_proj` whose output is split after the
    /// int8 matmul (Phi-3): each output channel is quantized on its own, so fused or not, the
    /// same numbers.
    qkv: Vec<QLinear>,
    o_proj: QLinear,
    /// Per-head RMSNorms of queries and keys (Gemma 3).
    qk_norms: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Keys visible to a query: its own position and the `window − 1` before it.
    window: Option<usize>,
    scale: f64,
}

#[derive(Debug, Clone)]
struct Mlp {
    /// `gate_proj`, `up_proj`; or one fused `gate_up_proj` (Phi-3), split after the matmul.
    gate_up: Vec<QLinear>,
    down_proj: QLinear,
    gelu_tanh: bool,
}

#[derive(Debug, Clone)]
struct Block {
    attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    /// Before the MLP (`post_attention_layernorm` in Llama checkpoints,
    /// `pre_feedforward_layernorm` in Gemma's).
    pre_mlp_norm: RmsNorm,
    /// Sandwich norms (Gemma 3): on the attention output and on the MLP output.
    post_norms: Option<(RmsNorm, RmsNorm)>,
    /// Index into the model's RoPE tables (0 global, 1 local).
    rope: usize,
}

/// Where token embeddings come from.
#[derive(Debug, Clone)]
enum TokenEmbeddings {
    /// The float table (a float tied `lm_head` holds the very same tensor).
    Float(Embedding),
    /// The rows of the tied `lm_head`'s weights — the same matrix. Once that `lm_head` is int8,
    /// looking rows up there (`q · scale`, rounded like every int8 weight) spares keeping the
    /// float table beside its int8 copy: 113 MB of SmolLM2-135M's 538.
    LmHead { dtype: DType },
}

/// The decoder with its language-model head.
///
/// With tied embeddings, quantizing `lm_head` to int8 (any conversion that visits it) also makes
/// the token embeddings come from its int8 rows, and the float table is dropped.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: TokenEmbeddings,
    /// Whether `lm_head` was built from the embedding table (tied, no `lm_head.weight`).
    tied_lm_head: bool,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: QLinear,
    /// `(cos, sin)` per position: `[0]` global, `[1]` sliding-window layers' (if their base differs).
    ropes: Vec<(Tensor, Tensor)>,
    config: LlamaConfig,
    differentiable: bool,
}

/// RMSNorm from basic ops that carry gradients, or the same arithmetic as candle's fused kernel:
/// on the kernels for a contiguous `f32` CPU tensor (no pool threads, rows summed eight at a
/// time), through candle's otherwise.
fn rms_norm(norm: &RmsNorm, x: &Tensor, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        return candle_nn::ops::rms_norm_slow(x, norm.weight(), norm.eps() as f32);
    }
    if !crate::nn::kernel_ready(x) {
        return norm.forward(x);
    }
    let n = x.dim(D::Minus1)?;
    let y = with_float_values(x, "RMSNorm input", |xs| {
        with_float_values(norm.weight(), "RMSNorm weight", |w| {
            // SAFETY: rms_norm writes every output on Ok.
            unsafe { crate::kernels::filled_vec(xs.len(), |out| crate::kernels::rms_norm_into(xs, n, w, norm.eps() as f32, out)) }
        })
    })?;
    Tensor::from_vec(y, x.shape(), x.device())
}

/// `(x + h, RMSNorm(x + h))` — a residual connection and the norm after it: in one pass on the
/// kernels for contiguous `f32` CPU tensors (bit for bit as candle's add and fused RMSNorm),
/// through [`crate::nn::add`] and [`rms_norm`] otherwise.
fn add_rms_norm(norm: &RmsNorm, x: &Tensor, h: &Tensor, differentiable: bool) -> Result<(Tensor, Tensor)> {
    let plain = || -> Result<(Tensor, Tensor)> {
        let sum = crate::nn::add(x, h)?;
        let y = rms_norm(norm, &sum, differentiable)?;
        Ok((sum, y))
    };
    if differentiable || !crate::nn::kernel_ready(x) || !crate::nn::kernel_ready(h) || x.shape() != h.shape() {
        return plain();
    }
    let n = x.dim(D::Minus1)?;
    let (sum, y) = with_float_values(x, "residual", |xs| {
        with_float_values(h, "residual branch", |hs| {
            with_float_values(norm.weight(), "RMSNorm weight", |w| {
                let len = xs.len();
                let (mut sum, mut y) = (Vec::with_capacity(len), Vec::with_capacity(len));
                let (s, o) = (&mut sum.spare_capacity_mut()[..len], &mut y.spare_capacity_mut()[..len]);
                crate::kernels::add_rms_norm_into(xs, hs, n, w, norm.eps() as f32, s, o)?;
                // SAFETY: add_rms_norm_into wrote all len values of both on Ok.
                unsafe { (sum.set_len(len), y.set_len(len)) };
                Ok((sum, y))
            })
        })
    })?;
    Ok((Tensor::from_vec(sum, x.shape(), x.device())?, Tensor::from_vec(y, x.shape(), x.device())?))
}

/// An RMSNorm of `dim` from `vb`, its weight shifted by the variant's `norm_offset`.
fn load_norm(cfg: &LlamaConfig, dim: usize, vb: VarBuilder) -> Result<RmsNorm> {
    let norm = candle_nn::rms_norm(dim, cfg.rms_norm_eps, vb)?;
    if cfg.variant.norm_offset == 0.0 {
        return Ok(norm);
    }
    Ok(RmsNorm::new((norm.weight() + cfg.variant.norm_offset as f64)?, cfg.rms_norm_eps))
}

impl Attention {
    fn load(cfg: &LlamaConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let (h, kv, d, hid) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim(), cfg.hidden_size);
        if h % kv != 0 {
            bail!("config: {h} attention heads are not a multiple of {kv} key/value heads")
        }
        let qk_norms =
            if cfg.variant.qk_norm { Some((load_norm(cfg, d, vb.pp("q_norm"))?, load_norm(cfg, d, vb.pp("k_norm"))?)) } else { None };
        let scale = 1.0 / (cfg.variant.query_pre_attn_scalar.unwrap_or(d) as f64).sqrt();
        Ok(Self {
            qkv: if cfg.variant.fused_qkv {
                vec![QLinear::load(hid, (h + 2 * kv) * d, cfg.attention_bias, vb.pp("qkv_proj"))?]
            } else {
                vec![
                    QLinear::load(hid, h * d, cfg.attention_bias, vb.pp("q_proj"))?,
                    QLinear::load(hid, kv * d, cfg.attention_bias, vb.pp("k_proj"))?,
                    QLinear::load(hid, kv * d, cfg.attention_bias, vb.pp("v_proj"))?,
                ]
            },
            o_proj: QLinear::load(h * d, hid, false, vb.pp("o_proj"))?,
            qk_norms,
            heads: h,
            kv_heads: kv,
            head_dim: d,
            window: cfg.variant.sliding_window.filter(|_| cfg.variant.is_sliding(layer)),
            scale,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cache: &mut LayerCache, differentiable: bool) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (hd, kvd) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let (q, k, v) = match self.qkv.as_slice() {
            [fused] => {
                let y = fused.forward(x)?;
                (y.narrow(D::Minus1, 0, hd)?, y.narrow(D::Minus1, hd, kvd)?, y.narrow(D::Minus1, hd + kvd, kvd)?)
            }
            [q, k, v] => {
                let [q, k, v] = forward_shared(x, [q, k, v])?;
                (q, k, v)
            }
            _ => bail!("attention holds {} projections", self.qkv.len()),
        };
        if b == 1 && !differentiable && q.dtype() == DType::F32 && q.device().is_cpu() {
            let y = self.attend_rows(q, k, v, cos, sin, cache.rows(self.kv_heads, self.head_dim)?)?;
            return self.o_proj.forward(&y);
        }
        let split = |t: Tensor, n: usize| t.reshape((b, s, n, self.head_dim))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(q, self.heads)?, split(k, self.kv_heads)?, split(v, self.kv_heads)?);
        let (q, k) = match &self.qk_norms {
            Some((qn, kn)) => (rms_norm(qn, &q, differentiable)?, rms_norm(kn, &k, differentiable)?),
            None => (q, k),
        };
        let rope = if differentiable { candle_nn::rotary_emb::rope_slow } else { candle_nn::rotary_emb::rope };
        let (q, k) = (rope(&q, cos, sin)?, rope(&k, cos, sin)?);
        // The first call attends to its own keys and values (which keeps their gradients);
        // later ones to the cache's view of everything so far. Differentiable mode concatenates
        // so that gradients reach this step's keys and values, as in-place writes would not.
        let cache = cache.tensors()?;
        let (k, v) = match (cache.current_seq_len(), differentiable) {
            (0, _) => {
                cache.append(&k, &v)?;
                (k, v)
            }
            (_, false) => cache.append(&k, &v)?,
            (_, true) => {
                let (pk, pv) = (cache.k()?, cache.v()?);
                cache.append(&k, &v)?;
                match (pk, pv) {
                    (Some(pk), Some(pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    _ => bail!("key/value cache lost its contents"),
                }
            }
        };
        let t = k.dim(2)?;
        // Grouped-query attention without copying the cache once per query head: the `rep`
        // query heads that share key/value head `g` are stacked as rows of one matrix,
        // [b, kv, rep·s, d] against keys [b, kv, t, d] (head index = g·rep + r).
        let rep = self.heads / self.kv_heads;
        let qg = q.reshape((b, self.kv_heads, rep * s, self.head_dim))?;
        let mut att = (qg.matmul(&k.t()?)? * self.scale)?;
        let window = self.window.unwrap_or(usize::MAX);
        if s > 1 || t > window {
            // Query i sits at position p = t - s + i and sees keys j ≤ p with p − j < window;
            // rows are (r, i).
            let offset = t - s;
            let visible = |p: usize, j: usize| j <= p && p - j < window;
            let mask: Vec<f32> = (0..rep * s)
                .flat_map(|row| (0..t).map(move |j| if visible(offset + row % s, j) { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            att = att.broadcast_add(&Tensor::from_vec(mask, (rep * s, t), x.device())?)?;
        }
        let att = if differentiable { candle_nn::ops::softmax(&att, D::Minus1)? } else { candle_nn::ops::softmax_last_dim(&att)? };
        let y = att.matmul(&v)?.reshape((b, self.heads, s, self.head_dim))?.transpose(1, 2)?.reshape((b, s, self.heads * self.head_dim))?;
        self.o_proj.forward(&y)
    }

    /// Causal attention of the `s` newest positions (a prompt, or one decoding step) on the
    /// kernels, from the projections' `[1, s, heads·d]` outputs: keys rotated straight into the
    /// cache's rows, values copied there, queries rotated in their own layout; query position
    /// `i` (absolute position `p = t − s + i`) sees the keys `j ≤ p`, and `p − j < window` on a
    /// sliding-window layer. Returns `[1, s, heads·d]`.
    #[allow(clippy::too_many_arguments)]
    fn attend_rows(&self, q: Tensor, k: Tensor, v: Tensor, cos: &Tensor, sin: &Tensor, cache: &mut RowCache) -> Result<Tensor> {
        let (d, s) = (self.head_dim, q.dim(1)?);
        let (q, k) = match &self.qk_norms {
            // Per-head RMSNorm over rows of d, whatever the heads' order.
            Some((qn, kn)) => {
                (rms_norm(qn, &q.reshape((s, self.heads, d))?, false)?, rms_norm(kn, &k.reshape((s, self.kv_heads, d))?, false)?)
            }
            None => (q, k),
        };
        cache.reserve(s);
        let (pos, cap) = (cache.len, cache.capacity);
        let mut qr = Vec::with_capacity(s * self.heads * d);
        with_float_values(cos, "RoPE cosines", |cos| {
            with_float_values(sin, "RoPE sines", |sin| {
                let half = d / 2;
                if cos.len() < s * half || sin.len() < s * half {
                    bail!("RoPE tables hold {} values for {s} positions of {half}", cos.len().min(sin.len()))
                }
                let at = |i: usize| (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
                with_float_values(&q, "attention queries", |q| {
                    // Pieces of 64 rows over the kernel team for a prompt.
                    let row = self.heads * d;
                    let qr = &mut qr.spare_capacity_mut()[..s * row];
                    crate::kernels::parallel_for_parts(qr.chunks_mut(64 * row).collect(), s > 64, |p, y| {
                        for (r, (x, y)) in q[p * 64 * row..].chunks_exact(row).zip(y.chunks_exact_mut(row)).enumerate() {
                            let (c, sn) = at(p * 64 + r);
                            x.chunks_exact(d).zip(y.chunks_exact_mut(d)).for_each(|(x, y)| rope_row(x, c, sn, y));
                        }
                    });
                    Ok(())
                })?;
                with_float_values(&k, "attention keys", |k| {
                    for (i, x) in k.chunks_exact(self.kv_heads * d).enumerate() {
                        let (c, sn) = at(i);
                        for (g, x) in x.chunks_exact(d).enumerate() {
                            rope_row(x, c, sn, crate::kernels::as_unfilled(&mut cache.keys[(g * cap + pos + i) * d..][..d]));
                        }
                    }
                    Ok(())
                })
            })
        })?;
        // SAFETY: the rotation above wrote all s rows of heads · d queries (it returned Ok).
        unsafe { qr.set_len(s * self.heads * d) };
        with_float_values(&v, "attention values", |v| {
            for (i, x) in v.chunks_exact(self.kv_heads * d).enumerate() {
                for (g, x) in x.chunks_exact(d).enumerate() {
                    cache.values[(g * cap + pos + i) * d..][..d].copy_from_slice(x);
                }
            }
            Ok(())
        })?;
        cache.len += s;
        let t = cache.len;
        let kv: Vec<_> = (0..self.kv_heads).map(|g| cache.head(g)).collect();
        let visible: Vec<_> = (t - s..t).map(|p| (p + 1).saturating_sub(self.window.unwrap_or(usize::MAX))..p + 1).collect();
        let mut y = vec![0f32; s * self.heads * d];
        attend_sequence(&qr, d, &kv, self.heads, self.scale as f32, &visible, &mut y)?;
        Tensor::from_vec(y, (1, s, self.heads * d), &Device::Cpu)
    }
}

impl Mlp {
    fn load(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up: if cfg.variant.fused_gate_up {
                vec![QLinear::load(h, 2 * i, false, vb.pp("gate_up_proj"))?]
            } else {
                vec![QLinear::load(h, i, false, vb.pp("gate_proj"))?, QLinear::load(h, i, false, vb.pp("up_proj"))?]
            },
            down_proj: QLinear::load(i, h, false, vb.pp("down_proj"))?,
            gelu_tanh: cfg.variant.gelu_tanh,
        })
    }

    fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let (gate, up) = match self.gate_up.as_slice() {
            [fused] => {
                let y = fused.forward(x)?;
                let i = y.dim(D::Minus1)? / 2;
                (y.narrow(D::Minus1, 0, i)?, y.narrow(D::Minus1, i, i)?)
            }
            [gate, up] => {
                let [gate, up] = forward_shared(x, [gate, up])?;
                (gate, up)
            }
            _ => bail!("MLP holds {} input projections", self.gate_up.len()),
        };
        if !self.gelu_tanh && !differentiable && gate.dtype() == DType::F32 {
            // An int8 down projection quantizes the product row by row as it computes it.
            if let Some(y) = self.down_proj.forward_swiglu(&gate, &up)? {
                return Ok(y);
            }
            // SwiGLU in one pass on the kernels (no libm exp, no intermediate tensor); a
            // strided gate or up (a fused gate_up's halves) is read through a copy.
            let out = with_float_values(&gate, "MLP gate", |g| {
                with_float_values(&up, "MLP up", |u| {
                    // SAFETY: silu_mul_into writes every output on Ok.
                    unsafe { crate::kernels::filled_vec(g.len(), |out| crate::kernels::silu_mul_into(g, u, out)) }
                })
            })?;
            return self.down_proj.forward(&Tensor::from_vec(out, gate.shape(), gate.device())?);
        }
        let gate = if self.gelu_tanh { gate.gelu()? } else { candle_nn::ops::silu(&gate)? };
        self.down_proj.forward(&(gate * up)?)
    }
}

impl Llama {
    /// Builds the model from tensors named as in the HF checkpoint (`model.…`, `lm_head.weight`).
    pub fn load(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let m = vb.pp("model");
        let (hidden, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                let sandwich = cfg.variant.sandwich_norms;
                let norm = |name: &str| load_norm(cfg, hidden, l.pp(name));
                Ok(Block {
                    attn: Attention::load(cfg, i, l.pp("self_attn"))?,
                    mlp: Mlp::load(cfg, l.pp("mlp"))?,
                    input_layernorm: norm("input_layernorm")?,
                    pre_mlp_norm: norm(if sandwich { "pre_feedforward_layernorm" } else { "post_attention_layernorm" })?,
                    post_norms: if sandwich {
                        Some((norm("post_attention_layernorm")?, norm("post_feedforward_layernorm")?))
                    } else {
                        None
                    },
                    rope: (cfg.variant.rope_local_theta.is_some() && cfg.variant.is_sliding(i)) as usize,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = load_norm(cfg, hidden, m.pp("norm"))?;
        // Tied: the checkpoint holds one matrix for both. A float one is the embedding table; an
        // int8 one (a quantized checkpoint) is `lm_head.weight`, whose rows then serve as the
        // embeddings, so no float table is ever built.
        let (has_table, has_head) = (vb.contains_tensor("model.embed_tokens.weight"), vb.contains_tensor("lm_head.weight"));
        let tied_lm_head = cfg.tie_word_embeddings && !(has_table && has_head);
        let (embed_tokens, lm_head) = if has_table {
            let e = candle_nn::embedding(vocab, hidden, m.pp("embed_tokens")).map_err(|e| e.context("loading model.embed_tokens"))?;
            let head = if tied_lm_head {
                QLinear::from_linear(&Linear::new(e.embeddings().clone(), None), "lm_head")?
            } else {
                QLinear::load(hidden, vocab, false, vb.pp("lm_head"))?
            };
            (TokenEmbeddings::Float(e), head)
        } else if tied_lm_head && vb.contains_tensor("lm_head.weight_scale") {
            (TokenEmbeddings::LmHead { dtype: DType::F32 }, QLinear::load(hidden, vocab, false, vb.pp("lm_head"))?)
        } else {
            bail!("no model.embed_tokens.weight (only a tied int8 lm_head can stand in for it)")
        };
        // RoPE tables: global (`rope_theta`), then local for sliding-window layers if they differ;
        // positions past the tables (a context longer than ROPE_TABLE) are computed when reached.
        let thetas: Vec<f32> = std::iter::once(cfg.rope_theta).chain(cfg.variant.rope_local_theta).collect();
        let ropes = thetas
            .iter()
            .map(|&theta| rope_rows(&cfg.inv_freq(theta), 0, cfg.max_position_embeddings.min(ROPE_TABLE)))
            .collect::<Result<_>>()?;
        Ok(Self { embed_tokens, tied_lm_head, layers, norm, lm_head, ropes, config: cfg.clone(), differentiable: false })
    }

    /// Names of the linear layers [`Llama::load`] builds for `cfg`, in visiting order: seven
    /// per decoder layer, then `lm_head`.
    pub fn linear_layer_names(cfg: &LlamaConfig) -> Vec<String> {
        let v = &cfg.variant;
        let qkv: &[&str] =
            if v.fused_qkv { &["self_attn.qkv_proj"] } else { &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] };
        let gate_up: &[&str] = if v.fused_gate_up { &["mlp.gate_up_proj"] } else { &["mlp.gate_proj", "mlp.up_proj"] };
        let parts: Vec<&str> = qkv.iter().chain(&["self_attn.o_proj"]).chain(gate_up).chain(&["mlp.down_proj"]).copied().collect();
        (0..cfg.num_hidden_layers)
            .flat_map(|i| parts.iter().map(move |p| format!("model.layers.{i}.{p}")))
            .chain(std::iter::once("lm_head".to_string()))
            .collect()
    }

    /// Computes RMSNorm, RoPE and softmax from basic ops that carry gradients. candle's fused kernels
    /// have no backward pass, so gradients would silently stop at them: switch this on for
    /// quantization-aware training, off (default) for speed.
    pub fn set_differentiable(&mut self, on: bool) {
        self.differentiable = on;
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Logits `[n, vocab]` for `tokens` placed at positions `cache.len()..`, extending the
    /// cache. `all_logits = false` returns only the last position's row (`n = 1`), which skips
    /// most of the `lm_head` work during prefill.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Tensor> {
        let (pos, s) = (cache.len(), tokens.len());
        if s == 0 {
            bail!("forward needs at least one token")
        }
        if pos + s > self.config.max_position_embeddings {
            bail!("{} positions exceed the model's context of {} tokens", pos + s, self.config.max_position_embeddings)
        }
        cache.layers.resize_with(self.layers.len(), LayerCache::default);
        let thetas = std::iter::once(self.config.rope_theta).chain(self.config.variant.rope_local_theta);
        let ropes = self
            .ropes
            .iter()
            .zip(thetas)
            .map(|((c, s_), theta)| match pos + s <= c.dim(0)? {
                true => Ok((c.narrow(0, pos, s)?, s_.narrow(0, pos, s)?)),
                false => rope_rows(&self.config.inv_freq(theta), pos, s),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut x = self.embed(tokens)?.unsqueeze(0)?;
        if self.config.variant.scale_embeddings {
            x = (x * (self.config.hidden_size as f64).sqrt())?;
        }
        let d = self.differentiable;
        // Each residual connection and the norm that reads it go together ([`add_rms_norm`]):
        // `normed` is the next block's normalised input.
        let mut normed = match self.layers.first() {
            Some(first) => rms_norm(&first.input_layernorm, &x, d)?,
            None => x.clone(),
        };
        for (i, (block, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let (cos, sin) = &ropes[block.rope.min(ropes.len() - 1)];
            let mut h = block.attn.forward(&normed, cos, sin, kv, d)?;
            if let Some((after_attn, _)) = &block.post_norms {
                h = rms_norm(after_attn, &h, d)?;
            }
            let mlp_input;
            (x, mlp_input) = add_rms_norm(&block.pre_mlp_norm, &x, &h, d)?;
            let mut h = block.mlp.forward(&mlp_input, d)?;
            if let Some((_, after_mlp)) = &block.post_norms {
                h = rms_norm(after_mlp, &h, d)?;
            }
            match self.layers.get(i + 1) {
                Some(next) => (x, normed) = add_rms_norm(&next.input_layernorm, &x, &h, d)?,
                None => x = crate::nn::add(&x, &h)?,
            }
        }
        let x = if all_logits { x } else { x.narrow(1, s - 1, 1)? };
        let x = rms_norm(&self.norm, &x, self.differentiable)?;
        self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)
    }

    /// `[tokens, hidden]` input embeddings of `tokens`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            bail!("token id {t} is outside the vocabulary of {}", self.config.vocab_size)
        }
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        match &self.embed_tokens {
            TokenEmbeddings::Float(e) => e.forward(&ids),
            TokenEmbeddings::LmHead { dtype } => {
                let Some((w, _)) = self.lm_head.int8_parts() else {
                    // lm_head was given another kind by hand since: its float weights are the table.
                    return self.lm_head.float_equivalent()?.weight().index_select(&ids, 0)?.to_dtype(*dtype);
                };
                let h = self.config.hidden_size;
                let mut rows = vec![0f32; tokens.len() * h];
                for (&t, row) in tokens.iter().zip(rows.chunks_mut(h)) {
                    w.dequantize_row(t as usize, row)?;
                }
                Tensor::from_vec(rows, (tokens.len(), h), &Device::Cpu)?.to_dtype(*dtype)
            }
        }
    }

    /// Drops the float embedding table once the tied `lm_head` holds the same matrix as int8.
    fn share_tied_embeddings(&mut self) {
        if let (true, true, TokenEmbeddings::Float(e)) = (self.tied_lm_head, self.lm_head.is_int8(), &self.embed_tokens) {
            self.embed_tokens = TokenEmbeddings::LmHead { dtype: e.embeddings().dtype() };
        }
    }

    /// Bytes of all weights: embeddings, norms and every linear layer (a tied `lm_head` and the
    /// embeddings share their storage and are counted once).
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let table = match &self.embed_tokens {
            TokenEmbeddings::Float(e) => bytes(e.embeddings()),
            TokenEmbeddings::LmHead { .. } => 0,
        };
        let mut total = table + self.norms().iter().map(|(_, n)| bytes(n.weight())).sum::<usize>();
        for b in &self.layers {
            let a = &b.attn;
            total +=
                a.qkv.iter().chain([&a.o_proj]).chain(&b.mlp.gate_up).chain([&b.mlp.down_proj]).map(|l| l.weight_bytes()).sum::<usize>();
        }
        let shared = self.tied_lm_head && matches!(self.embed_tokens, TokenEmbeddings::Float(_)) && !self.lm_head.is_int8();
        total + if shared { 0 } else { self.lm_head.weight_bytes() }
    }

    /// Every RMSNorm of the model with its checkpoint name.
    fn norms(&self) -> Vec<(String, &RmsNorm)> {
        let mut norms = vec![];
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            norms.push((format!("{p}.input_layernorm.weight"), &b.input_layernorm));
            match &b.post_norms {
                None => norms.push((format!("{p}.post_attention_layernorm.weight"), &b.pre_mlp_norm)),
                Some((after_attn, after_mlp)) => {
                    norms.push((format!("{p}.post_attention_layernorm.weight"), after_attn));
                    norms.push((format!("{p}.pre_feedforward_layernorm.weight"), &b.pre_mlp_norm));
                    norms.push((format!("{p}.post_feedforward_layernorm.weight"), after_mlp));
                }
            }
            if let Some((qn, kn)) = &b.attn.qk_norms {
                norms.push((format!("{p}.self_attn.q_norm.weight"), qn));
                norms.push((format!("{p}.self_attn.k_norm.weight"), kn));
            }
        }
        norms.push(("model.norm.weight".into(), &self.norm));
        norms
    }

    /// SmoothQuant over every block (see [`crate::smooth`]): factors from each layer's input
    /// channel maxima (`channel_absmax`, by layer name, from calibration) and weight columns,
    /// folded by [`Self::apply_smoothing`]. Groups: `input_layernorm` → q/k/v (or `qkv_proj`),
    /// the pre-MLP norm → gate/up (or `gate_up_proj`), `up_proj` → `down_proj`. Returns the
    /// factors, keyed by the first layer of each group, and what was not smoothed, with why.
    pub fn smooth(
        &mut self,
        channel_absmax: &std::collections::BTreeMap<String, Vec<f32>>,
        alpha: f32,
    ) -> Result<(crate::smooth::SmoothingFactors, Vec<String>)> {
        use crate::smooth::{smoothing_factors, weight_column_absmax};
        let mut factors = std::collections::BTreeMap::new();
        let mut skipped = Vec::new();
        let group = |layers: &[&QLinear]| -> Result<Vec<f32>> {
            let mut act: Vec<f32> = Vec::new();
            for l in layers {
                let Some(a) = channel_absmax.get(l.name()) else { bail!("no input channel maxima for layer '{}'", l.name()) };
                if act.is_empty() {
                    act = a.clone();
                } else {
                    act.iter_mut().zip(a).for_each(|(x, y)| *x = x.max(*y));
                }
            }
            smoothing_factors(&act, &weight_column_absmax(layers)?, alpha)
        };
        for b in &self.layers {
            let qkv: Vec<&QLinear> = b.attn.qkv.iter().collect();
            factors.insert(qkv[0].name().to_string(), group(&qkv)?);
            let gate_up: Vec<&QLinear> = b.mlp.gate_up.iter().collect();
            factors.insert(gate_up[0].name().to_string(), group(&gate_up)?);
            if b.mlp.gate_up.len() == 2 {
                factors.insert(b.mlp.down_proj.name().to_string(), group(&[&b.mlp.down_proj])?);
            } else {
                skipped.push(format!("{}: its input is gate · up of one fused layer, whose up half is not folded", b.mlp.down_proj.name()));
            }
            skipped.push(format!("{}: its input comes out of attention, not folded", b.attn.o_proj.name()));
        }
        skipped.push("lm_head: not folded (a tied head's weight is the token embedding table)".into());
        self.apply_smoothing(&factors)?;
        Ok((factors, skipped))
    }

    /// Folds SmoothQuant factors (keyed as [`Self::smooth`] returns them) into the float model:
    /// the producing norm's weight (or `up_proj`'s rows) divided, the reading layers' weight
    /// columns multiplied. The float model computes the same function. Errors name the layer;
    /// nothing is changed unless every key names a group of this model.
    pub fn apply_smoothing(&mut self, factors: &crate::smooth::SmoothingFactors) -> Result<()> {
        let mut known = std::collections::BTreeMap::new();
        for b in &self.layers {
            known.insert(b.attn.qkv[0].name().to_string(), b.attn.qkv[0].in_features());
            known.insert(b.mlp.gate_up[0].name().to_string(), b.mlp.gate_up[0].in_features());
            if b.mlp.gate_up.len() == 2 {
                known.insert(b.mlp.down_proj.name().to_string(), b.mlp.down_proj.in_features());
            }
        }
        for (k, s) in factors {
            match known.get(k) {
                None => bail!("smoothing factors for '{k}', which starts no smoothable group of this model"),
                Some(&n) if n != s.len() => bail!("layer '{k}': {} smoothing factors for {n} inputs", s.len()),
                _ if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) => bail!("layer '{k}': smoothing factors must be finite and positive"),
                _ => {}
            }
        }
        let divide_norm = |norm: &RmsNorm, s: &[f32]| -> Result<RmsNorm> {
            let s = Tensor::from_slice(s, s.len(), norm.weight().device())?.to_dtype(norm.weight().dtype())?;
            Ok(RmsNorm::new(norm.weight().div(&s)?, norm.eps()))
        };
        for b in &mut self.layers {
            if let Some(s) = factors.get(b.attn.qkv[0].name()) {
                b.input_layernorm = divide_norm(&b.input_layernorm, s)?;
                for l in &mut b.attn.qkv {
                    l.scale_input_channels(s)?;
                }
            }
            if let Some(s) = factors.get(b.mlp.gate_up[0].name()) {
                b.pre_mlp_norm = divide_norm(&b.pre_mlp_norm, s)?;
                for l in &mut b.mlp.gate_up {
                    l.scale_input_channels(s)?;
                }
            }
            if let Some(s) = factors.get(b.mlp.down_proj.name()) {
                b.mlp.gate_up[1].scale_down_output_channels(s)?;
                b.mlp.down_proj.scale_input_channels(s)?;
            }
        }
        Ok(())
    }

    /// Index of the largest logit in each row.
    pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
        logits.argmax(D::Minus1)?.to_vec1::<u32>()
    }
}

impl Quantizable for Llama {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        for b in &mut self.layers {
            let a = &mut b.attn;
            for l in a.qkv.iter_mut().chain([&mut a.o_proj]).chain(b.mlp.gate_up.iter_mut()).chain([&mut b.mlp.down_proj]) {
                f(l)?;
            }
        }
        f(&mut self.lm_head)?;
        self.share_tied_embeddings();
        Ok(())
    }

    fn visit_tensors(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        if let TokenEmbeddings::Float(e) = &self.embed_tokens {
            f("model.embed_tokens.weight", e.embeddings())?;
        }
        // Norm weights as the checkpoint stores them (less the variant's offset).
        let offset = self.config.variant.norm_offset as f64;
        for (name, n) in self.norms() {
            if offset == 0.0 {
                f(&name, n.weight())?
            } else {
                f(&name, &(n.weight() - offset)?)?
            }
        }
        Ok(())
    }
}
