//! BERT encoder (all-MiniLM-L6-v2 and kin) with mean pooling → sentence embeddings. Every dense
//! layer is a [`QLinear`] named as in the checkpoint (`encoder.layer.0.attention.self.query`).

use crate::convert::Quantizable;
use crate::nn::attention::{packed_self_attention, unpack_sequences};
use crate::nn::{forward_shared, ops, QLinear, QLinearKind};
use crate::smooth::{SmoothGroup, SmoothSource, Smoothable};
use candle_core::{bail, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;
use std::ops::Range;

#[derive(Debug, Clone, Deserialize)]
/// The fields of a BERT `config.json` this model reads.
pub struct BertConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Longest input, in tokens.
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    /// Token types (segments).
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    /// Epsilon of the layer norms.
    pub layer_norm_eps: f64,
    #[serde(default)]
    /// Feed-forward activation (`gelu`).
    pub hidden_act: String,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Parses a `config.json`, checking the values this model supports.
    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        match json.get("model_type").and_then(|v| v.as_str()).unwrap_or("") {
            "bert" => {}
            other => bail!("unknown architecture '{other}' in config.json (expected bert)"),
        }
        let cfg: Self = serde_json::from_value(json.clone()).map_err(|e| candle_core::Error::Msg(format!("config.json (bert): {e}")))?;
        if !matches!(cfg.hidden_act.as_str(), "gelu" | "") {
            bail!("config.json: activation '{}' is not supported (supported: gelu)", cfg.hidden_act)
        }
        Ok(cfg)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: QLinear,
    key: QLinear,
    value: QLinear,
    attn_out: QLinear,
    attn_norm: LayerNorm,
    intermediate: QLinear,
    output: QLinear,
    out_norm: LayerNorm,
}

/// The encoder; [`Bert::embed`] gives a unit-length sentence embedding.
#[derive(Debug, Clone)]
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    max_len: usize,
    eps: f64,
    differentiable: bool,
}

impl Bert {
    /// Loads from checkpoint names, with or without a leading `bert.` prefix.
    pub fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let ln = |vb: VarBuilder| candle_nn::layer_norm(h, cfg.layer_norm_eps, vb);
        let e = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|n| {
                let l = vb.pp(format!("encoder.layer.{n}"));
                Ok(Layer {
                    query: QLinear::load(h, h, true, l.pp("attention.self.query"))?,
                    key: QLinear::load(h, h, true, l.pp("attention.self.key"))?,
                    value: QLinear::load(h, h, true, l.pp("attention.self.value"))?,
                    attn_out: QLinear::load(h, h, true, l.pp("attention.output.dense"))?,
                    attn_norm: ln(l.pp("attention.output.LayerNorm"))?,
                    intermediate: QLinear::load(h, i, true, l.pp("intermediate.dense"))?,
                    output: QLinear::load(i, h, true, l.pp("output.dense"))?,
                    out_norm: ln(l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: candle_nn::embedding(cfg.vocab_size, h, e.pp("word_embeddings"))?,
            position: candle_nn::embedding(cfg.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type: candle_nn::embedding(cfg.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            emb_norm: ln(e.pp("LayerNorm"))?,
            layers,
            heads: cfg.num_attention_heads,
            max_len: cfg.max_position_embeddings,
            eps: cfg.layer_norm_eps,
            differentiable: false,
        })
    }

    /// Computes layer norms and softmax from basic ops that carry gradients. candle's fused
    /// layer-norm and softmax kernels have no backward pass, so gradients would silently stop
    /// at them: switch this on for quantization-aware training, off (default) for speed.
    pub fn set_differentiable(&mut self, on: bool) {
        self.differentiable = on;
    }

    fn norm(&self, ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        match (self.differentiable, ln.bias()) {
            (true, Some(b)) => candle_nn::ops::layer_norm_slow(x, ln.weight(), b, self.eps as f32),
            _ => ln.forward(x),
        }
    }

    /// `LayerNorm(x + h)` (a residual connection and its norm): [`ops::add_layer_norm`] (one pass
    /// on the kernels) outside training, else [`ops`]' add and [`Self::norm`].
    fn add_norm(&self, ln: &LayerNorm, x: &Tensor, h: &Tensor) -> Result<Tensor> {
        match ln.bias().filter(|_| !self.differentiable) {
            Some(beta) => ops::add_layer_norm(x, h, ln.weight(), beta, self.eps as f32),
            None => self.norm(ln, &ops::add(x, h)?),
        }
    }

    /// Most tokens one sequence may hold (position embeddings).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Hidden states `[len, hidden]` of one sequence.
    pub fn hidden_states(&self, tokens: &[u32]) -> Result<Tensor> {
        self.hidden_states_batch(&[tokens])?.0.squeeze(0)
    }

    /// Hidden states `[b, s, hidden]` of a batch padded to its longest sequence `s`, and the
    /// `[b, s]` mask of real tokens (1.0) and padding (0.0); each sequence's states are those it
    /// gets alone. Outside training the sequences are packed one after another (no padding
    /// row is computed: every layer but attention works row by row) and padded only in the
    /// result, whose padding rows are zero; in differentiable mode the batch is padded and
    /// padded keys are masked out of attention.
    pub fn hidden_states_batch(&self, batch: &[&[u32]]) -> Result<(Tensor, Tensor)> {
        let (b, s) = (batch.len(), batch.iter().map(|t| t.len()).max().unwrap_or(0));
        if let Some(t) = batch.iter().find(|t| t.is_empty() || t.len() > self.max_len) {
            bail!("BERT input must hold 1 to {} tokens, got {}", self.max_len, t.len())
        }
        if b == 0 {
            bail!("BERT needs at least one sequence")
        }
        let dev = Device::Cpu;
        let real: Vec<f32> = batch.iter().flat_map(|t| (0..s).map(|i| (i < t.len()) as u8 as f32)).collect();
        let mask = Tensor::from_vec(real, (b, s), &dev)?;
        if !self.differentiable && self.word.embeddings().dtype() == candle_core::DType::F32 {
            return Ok((self.packed_hidden_states(batch, s)?, mask));
        }
        let ids: Vec<u32> = batch.iter().flat_map(|t| t.iter().copied().chain(std::iter::repeat_n(0, s - t.len()))).collect();
        let ids = Tensor::from_vec(ids, (b, s), &dev)?;
        let pos = Tensor::arange(0u32, s as u32, &dev)?.unsqueeze(0)?.broadcast_as((b, s))?.contiguous()?;
        // Additive attention mask [b, 1, 1, s]: 0 for real keys, −∞ for padding.
        let bias = if batch.iter().any(|t| t.len() < s) {
            let bias: Vec<f32> = batch.iter().flat_map(|t| (0..s).map(|i| if i < t.len() { 0.0 } else { f32::NEG_INFINITY })).collect();
            Some(Tensor::from_vec(bias, (b, 1, 1, s), &dev)?)
        } else {
            None
        };
        let mut x = self.embeddings(&ids, &pos)?;
        for l in &self.layers {
            x = self.finish_layer(l, &x, &self.masked_attention(l, &x, bias.as_ref())?)?;
        }
        Ok((x, mask))
    }

    /// The batch's sequences one after another in the rows of `[Σ len, hidden]` (sequence `i`
    /// in rows `spans[i]`) through the encoder, returned padded to `[b, s, hidden]`.
    fn packed_hidden_states(&self, batch: &[&[u32]], s: usize) -> Result<Tensor> {
        let dev = Device::Cpu;
        let mut spans = Vec::with_capacity(batch.len());
        for t in batch {
            let start = spans.last().map_or(0, |r: &Range<usize>| r.end);
            spans.push(start..start + t.len());
        }
        let total = spans.last().map_or(0, |r| r.end);
        let ids = Tensor::from_vec(batch.concat(), total, &dev)?;
        let pos: Vec<u32> = batch.iter().flat_map(|t| 0..t.len() as u32).collect();
        let mut x = self.embeddings(&ids, &Tensor::from_vec(pos, total, &dev)?)?;
        for l in &self.layers {
            x = self.finish_layer(l, &x, &self.packed_attention(l, &x, &spans)?)?;
        }
        unpack_sequences(&x, &spans, s)
    }

    /// Word + position + token-type (all type 0) embeddings of `ids`, normalised.
    fn embeddings(&self, ids: &Tensor, pos: &Tensor) -> Result<Tensor> {
        let x = (self.word.forward(ids)? + self.position.forward(pos)?)?;
        let types = Tensor::zeros(ids.shape(), candle_core::DType::U32, ids.device())?;
        self.norm(&self.emb_norm, &(x + self.token_type.forward(&types)?)?)
    }

    /// The rest of an encoder layer once its self-attention gave `a`: output projection,
    /// residual and norm, feed-forward, residual and norm.
    fn finish_layer(&self, l: &Layer, x: &Tensor, a: &Tensor) -> Result<Tensor> {
        let x = self.add_norm(&l.attn_norm, &l.attn_out.forward(a)?, x)?;
        let y = self.output_of_intermediate(l, &x)?;
        self.add_norm(&l.out_norm, &y, &x)
    }

    /// `output(GELU(intermediate(x)))`: an int8 output layer applies the GELU row by row inside
    /// its activation quantizer (outside training).
    fn output_of_intermediate(&self, l: &Layer, x: &Tensor) -> Result<Tensor> {
        if !self.differentiable && x.dtype() == candle_core::DType::F32 {
            if let QLinearKind::Dynamic(_) = l.output.kind() {
                if let Some(y) = l.output.forward_gelu(&l.intermediate.forward(x)?)? {
                    return Ok(y);
                }
            }
        }
        l.output.forward(&self.intermediate_gelu(&l.intermediate, x)?)
    }

    /// `GELU(intermediate(x))`, exact GELU: candle's op in differentiable mode (it has a
    /// backward pass), else the kernels' vectorised one run on the layer's output buffer.
    fn intermediate_gelu(&self, intermediate: &QLinear, x: &Tensor) -> Result<Tensor> {
        if self.differentiable || x.dtype() != candle_core::DType::F32 {
            return intermediate.forward(x)?.gelu_erf();
        }
        intermediate.forward_then(x, crate::kernels::gelu_erf)
    }

    /// Self-attention of sequences packed in the rows of `x` (`[Σ len, hidden]`, sequence `i` in
    /// rows `spans[i]`) on the kernels' attention: each query row sees its own sequence's keys.
    fn packed_attention(&self, l: &Layer, x: &Tensor, spans: &[Range<usize>]) -> Result<Tensor> {
        let [q, k, v] = forward_shared(x, [&l.query, &l.key, &l.value])?;
        packed_self_attention(&q, &k, &v, self.heads, spans)
    }

    /// Self-attention of a padded batch `[b, s, hidden]` on candle ops (they carry gradients),
    /// with the additive padding mask `bias` (`[b, 1, 1, s]`, −∞ at padded keys).
    fn masked_attention(&self, l: &Layer, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| t.reshape((b, s, self.heads, d))?.transpose(1, 2)?.contiguous();
        let [q, k, v] = forward_shared(x, [&l.query, &l.key, &l.value])?;
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let mut att = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
        if let Some(bias) = bias {
            att = att.broadcast_add(bias)?;
        }
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        att.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))
    }

    /// Mean of the hidden states, scaled to unit length (sentence-transformers' pooling +
    /// normalisation).
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        self.embed_batch(&[tokens])?.squeeze(0)
    }

    /// [`Self::embed`] of every sequence of a batch at once, `[b, hidden]`: the mean over each
    /// sequence's own tokens (padding left out), scaled to unit length.
    pub fn embed_batch(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let (x, mask) = self.hidden_states_batch(batch)?;
        let sum = x.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let mean = sum.broadcast_div(&mask.sum_keepdim(1)?)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        mean.broadcast_div(&norm.maximum(1e-12)?)
    }

    /// Cosine similarity of two embeddings.
    pub fn cosine(a: &Tensor, b: &Tensor) -> Result<f32> {
        let dot = (a * b)?.sum_all()?.to_scalar::<f32>()?;
        let na = a.sqr()?.sum(D::Minus1)?.sqrt()?.to_scalar::<f32>()?;
        let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?.to_scalar::<f32>()?;
        Ok(dot / (na * nb).max(1e-12))
    }
}

impl Quantizable for Bert {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        for l in &mut self.layers {
            for q in [&mut l.query, &mut l.key, &mut l.value, &mut l.attn_out, &mut l.intermediate, &mut l.output] {
                f(q)?;
            }
        }
        Ok(())
    }
}

/// BERT's one SmoothQuant group per block: `value` → the attention output layer. Attention mixes
/// value channel `c` only with channel `c` of other positions (`probs · V`, heads side by side),
/// so dividing `value`'s output channels (rows and bias) by `s` and multiplying `attn_out`'s
/// input columns by `s` leaves the model's function unchanged. Nothing else can take factors:
/// the blocks are post-norm, so every LayerNorm's output is both the next linear layers' input
/// and the residual stream (dividing it would change the model), and the feed-forward output
/// layer reads GELU's output, which no scale passes through.
impl Smoothable for Bert {
    fn visit_smoothing_groups(&mut self, f: &mut dyn FnMut(SmoothGroup<'_>) -> Result<()>) -> Result<()> {
        for l in &mut self.layers {
            f(SmoothGroup { source: SmoothSource::Linear(&mut l.value), readers: vec![&mut l.attn_out] })?;
        }
        Ok(())
    }

    fn unsmoothed(&self) -> Vec<String> {
        vec![
            "query, key, value, intermediate: post-norm blocks (each LayerNorm's output is also the residual stream)".into(),
            "output: reads GELU's output".into(),
        ]
    }
}
