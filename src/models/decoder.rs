//! The decoder of the Llama family and its kin — Llama (SmolLM2, TinyLlama, Llama 2/3), Qwen2,
//! Mistral, Phi-3 and Gemma 3 — whose linear layers are [`QLinear`]s named as in the
//! checkpoint: grouped-query attention with RoPE over a [`KvCache`] (global and sliding-window
//! layers), RMSNorm (also per head, and sandwiched, for Gemma 3), SwiGLU or GELU-tanh MLPs, tied
//! or untied `lm_head`. What differs between families is data ([`DecoderConfig`] and its
//! [`Variant`](super::config::Variant)), not code. One sequence at a time.

use super::config::DecoderConfig;
use super::kv_cache::{KvCache, LayerCache};
use crate::convert::Quantizable;
use crate::nn::attention::{causal_attention, AttentionShape};
use crate::nn::{forward_shared, ops, QLinear};
use crate::smooth::{SmoothGroup, SmoothSource, Smoothable};
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};

/// Positions whose RoPE rotations are computed when a model loads (at most; a longer context
/// computes the rest as it reaches them), so a config's context length never sizes an allocation.
const ROPE_TABLE: usize = 8192;

/// The token embedding table's name in checkpoints (`model.embed_tokens.weight`).
pub(crate) const EMBED_TOKENS: &str = "model.embed_tokens";

/// `(cos, sin)` of `p · f` for positions `p ∈ from..from + n` and frequencies `inv_freq`, each
/// `[n, inv_freq.len()]`.
fn rope_rows(inv_freq: &[f32], from: usize, n: usize) -> Result<(Tensor, Tensor)> {
    let angles: Vec<f32> = (from..from + n).flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f)).collect();
    let freqs = Tensor::from_vec(angles, (n, inv_freq.len()), &Device::Cpu)?;
    Ok((freqs.cos()?, freqs.sin()?))
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
    /// An untied table as int8 rows (`[vocab, hidden]`, one scale per row), looked up as the
    /// tied `lm_head`'s are: what the table becomes once the untied `lm_head` is int8, a quarter
    /// of the `f32` table (Llama-2-7B: 131 MB instead of 524).
    Int8 { table: Box<QLinear>, dtype: DType },
}

/// The decoder with its language-model head.
///
/// Quantizing `lm_head` to int8 (any conversion that visits it) also makes the token embeddings
/// int8 rows: with tied embeddings they come from `lm_head`'s rows, untied ones are quantized
/// one scale per row; the float table is dropped either way.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed_tokens: TokenEmbeddings,
    /// Whether `lm_head` was built from the embedding table (tied, no `lm_head.weight`).
    tied_lm_head: bool,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: QLinear,
    /// `(cos, sin)` per position: `[0]` global, `[1]` sliding-window layers' (if their base differs).
    ropes: Vec<(Tensor, Tensor)>,
    config: DecoderConfig,
    differentiable: bool,
}

/// Rows `tokens` (`ids` as a tensor) of a table held as `layer`'s weights, `[tokens, hidden]` in
/// `dtype`: dequantized int8 rows (`q · scale`), or the float weights' rows when the layer was
/// made float again by hand.
fn looked_up(layer: &QLinear, tokens: &[u32], ids: &Tensor, dtype: DType) -> Result<Tensor> {
    let Some((w, _)) = layer.int8_parts() else {
        return layer.float_equivalent()?.weight().index_select(ids, 0)?.to_dtype(dtype);
    };
    let h = layer.in_features();
    let mut rows = vec![0f32; tokens.len() * h];
    for (&t, row) in tokens.iter().zip(rows.chunks_mut(h)) {
        w.dequantize_row(t as usize, row)?;
    }
    Tensor::from_vec(rows, (tokens.len(), h), &Device::Cpu)?.to_dtype(dtype)
}

/// RMSNorm from basic ops that carry gradients, or the same arithmetic as candle's fused kernel
/// ([`ops::rms_norm`]: on the kernels for a contiguous `f32` CPU tensor).
fn rms_norm(norm: &RmsNorm, x: &Tensor, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        return candle_nn::ops::rms_norm_slow(x, norm.weight(), norm.eps() as f32);
    }
    ops::rms_norm(x, norm.weight(), norm.eps() as f32)
}

/// `(x + h, RMSNorm(x + h))` — a residual connection and the norm after it ([`ops::add_rms_norm`]:
/// one pass on the kernels), or from basic ops that carry gradients.
fn add_rms_norm(norm: &RmsNorm, x: &Tensor, h: &Tensor, differentiable: bool) -> Result<(Tensor, Tensor)> {
    if differentiable {
        let sum = (x + h)?;
        let y = rms_norm(norm, &sum, true)?;
        return Ok((sum, y));
    }
    ops::add_rms_norm(x, h, norm.weight(), norm.eps() as f32)
}

/// An RMSNorm of `dim` from `vb`, its weight shifted by the variant's `norm_offset`.
fn load_norm(cfg: &DecoderConfig, dim: usize, vb: VarBuilder) -> Result<RmsNorm> {
    let norm = candle_nn::rms_norm(dim, cfg.rms_norm_eps, vb)?;
    if cfg.variant.norm_offset == 0.0 {
        return Ok(norm);
    }
    Ok(RmsNorm::new((norm.weight() + cfg.variant.norm_offset as f64)?, cfg.rms_norm_eps))
}

impl Attention {
    fn load(cfg: &DecoderConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
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
            let y = self.attend_rows(q, k, v, cos, sin, cache)?;
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

    /// Causal attention of the `s` newest positions on the kernels ([`causal_attention`]), from
    /// the projections' `[1, s, heads·d]` outputs after the per-head q/k norms. Returns
    /// `[1, s, heads·d]`.
    fn attend_rows(&self, q: Tensor, k: Tensor, v: Tensor, cos: &Tensor, sin: &Tensor, cache: &mut LayerCache) -> Result<Tensor> {
        let (d, s) = (self.head_dim, q.dim(1)?);
        let (q, k) = match &self.qk_norms {
            // Per-head RMSNorm over rows of d, whatever the heads' order.
            Some((qn, kn)) => {
                (rms_norm(qn, &q.reshape((s, self.heads, d))?, false)?, rms_norm(kn, &k.reshape((s, self.kv_heads, d))?, false)?)
            }
            None => (q, k),
        };
        let shape = AttentionShape { heads: self.heads, kv_heads: self.kv_heads, d, scale: self.scale as f32, window: self.window };
        causal_attention(shape, &q, &k, &v, (cos, sin), cache.rows(self.kv_heads, d)?)
    }
}

impl Mlp {
    fn load(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
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
            // SwiGLU in one pass on the kernels (no libm exp, no intermediate tensor).
            return self.down_proj.forward(&ops::silu_mul(&gate, &up)?);
        }
        let gate = if self.gelu_tanh { gate.gelu()? } else { candle_nn::ops::silu(&gate)? };
        self.down_proj.forward(&(gate * up)?)
    }
}

impl Decoder {
    /// Builds the model from tensors named as in the HF checkpoint (`model.…`, `lm_head.weight`).
    pub fn load(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
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
        let (embed_tokens, lm_head) = if has_table && vb.contains_tensor("model.embed_tokens.weight_scale") {
            if tied_lm_head {
                bail!("model.embed_tokens: an int8 embedding table needs its own lm_head.weight (the model ties them)")
            }
            let table = QLinear::load(hidden, vocab, false, m.pp("embed_tokens"))?;
            (TokenEmbeddings::Int8 { table: Box::new(table), dtype: DType::F32 }, QLinear::load(hidden, vocab, false, vb.pp("lm_head"))?)
        } else if has_table {
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

    /// Names of the linear layers [`Decoder::load`] builds for `cfg`, in visiting order: seven
    /// per decoder layer, then `lm_head`.
    pub fn linear_layer_names(cfg: &DecoderConfig) -> Vec<String> {
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
    pub fn config(&self) -> &DecoderConfig {
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
                None => x = ops::add(&x, &h)?,
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
            TokenEmbeddings::LmHead { dtype } => looked_up(&self.lm_head, tokens, &ids, *dtype),
            TokenEmbeddings::Int8 { table, dtype } => looked_up(table, tokens, &ids, *dtype),
        }
    }

    /// Makes the embeddings int8 rows once `lm_head` is int8: a tied model's become `lm_head`'s
    /// rows, an untied model's table is quantized one `f16` scale per row (as a checkpoint
    /// stores it, so a model converted in memory and one loaded from its folder agree).
    fn quantize_embeddings(&mut self) -> Result<()> {
        let TokenEmbeddings::Float(e) = &self.embed_tokens else { return Ok(()) };
        if !self.lm_head.is_int8() {
            return Ok(());
        }
        let dtype = e.embeddings().dtype();
        self.embed_tokens = if self.tied_lm_head {
            TokenEmbeddings::LmHead { dtype }
        } else {
            let weights = e.embeddings().to_dtype(DType::F32)?;
            let mut table = QLinear::from_linear(&Linear::new(weights, None), EMBED_TOKENS)?;
            table.quantize_weight_only(crate::kernels::WeightQuant::PerChannel)?;
            TokenEmbeddings::Int8 { table: Box::new(table), dtype }
        };
        Ok(())
    }

    /// Bytes of all weights: embeddings, norms and every linear layer (a tied `lm_head` and the
    /// embeddings share their storage and are counted once).
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let table = match &self.embed_tokens {
            TokenEmbeddings::Float(e) => bytes(e.embeddings()),
            TokenEmbeddings::LmHead { .. } => 0,
            TokenEmbeddings::Int8 { table, .. } => table.weight_bytes(),
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

    /// Index of the largest logit in each row.
    pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
        logits.argmax(D::Minus1)?.to_vec1::<u32>()
    }
}

impl Quantizable for Decoder {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        for b in &mut self.layers {
            let a = &mut b.attn;
            for l in a.qkv.iter_mut().chain([&mut a.o_proj]).chain(b.mlp.gate_up.iter_mut()).chain([&mut b.mlp.down_proj]) {
                f(l)?;
            }
        }
        f(&mut self.lm_head)?;
        self.quantize_embeddings()
    }

    fn visit_tables(&self, f: &mut dyn FnMut(&QLinear) -> Result<()>) -> Result<()> {
        match &self.embed_tokens {
            TokenEmbeddings::Int8 { table, .. } => f(table),
            _ => Ok(()),
        }
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

/// SmoothQuant groups, per block: `input_layernorm` → q/k/v (or `qkv_proj`), the pre-MLP norm →
/// gate/up (or `gate_up_proj`), `up_proj` → `down_proj` (not with a fused `gate_up_proj`, whose
/// up half is not folded). These norms feed only their linear layers (pre-norm blocks), so the
/// folded model computes the same function.
impl Smoothable for Decoder {
    fn visit_smoothing_groups(&mut self, f: &mut dyn FnMut(SmoothGroup<'_>) -> Result<()>) -> Result<()> {
        for b in &mut self.layers {
            f(SmoothGroup { source: SmoothSource::RmsNorm(&mut b.input_layernorm), readers: b.attn.qkv.iter_mut().collect() })?;
            f(SmoothGroup { source: SmoothSource::RmsNorm(&mut b.pre_mlp_norm), readers: b.mlp.gate_up.iter_mut().collect() })?;
            if let [_, up] = b.mlp.gate_up.as_mut_slice() {
                f(SmoothGroup { source: SmoothSource::Linear(up), readers: vec![&mut b.mlp.down_proj] })?;
            }
        }
        Ok(())
    }

    fn unsmoothed(&self) -> Vec<String> {
        let mut skipped = Vec::new();
        for b in &self.layers {
            if b.mlp.gate_up.len() != 2 {
                skipped.push(format!("{}: its input is gate · up of one fused layer, whose up half is not folded", b.mlp.down_proj.name()));
            }
            skipped.push(format!("{}: its input comes out of attention, not folded", b.attn.o_proj.name()));
        }
        skipped.push("lm_head: not folded (a tied head's weight is the token embedding table)".into());
        skipped
    }
}

/// The decoder under its former name.
pub type Llama = Decoder;
