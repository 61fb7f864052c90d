//! A model of your own, quantized: a small pre-norm transformer written the way candle models
//! are written (a `VarBuilder`, `Module`s), with `QLinear` in place of `candle_nn::Linear`.
//! It is converted with `quantize_dynamic`, checked against its float self, saved as an int8
//! folder, loaded back without a float copy, and run again.
//!
//! `cargo run --release --example custom_model [-- --out DIR]`

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, RmsNorm, VarBuilder, VarMap};
use candle_quant::checkpoint::{load_quantized, save_quantized, SaveOptions};
use candle_quant::convert::Named;
use candle_quant::{ensure_quantized, qlinear_no_bias, quantizable, quantize_dynamic, QLinear, QuantConfig};

const VOCAB: usize = 512;
const DIM: usize = 256;
const HIDDEN: usize = 1024;
const HEADS: usize = 4;
const LAYERS: usize = 4;

struct Attention {
    qkv: QLinear,
    out: QLinear,
}

struct Mlp {
    up: QLinear,
    down: QLinear,
}

struct Block {
    attn_norm: Named<RmsNorm>,
    attn: Attention,
    mlp_norm: Named<RmsNorm>,
    mlp: Mlp,
}

struct TinyLm {
    embed: Named<Embedding>,
    blocks: Vec<Block>,
    norm: Named<RmsNorm>,
    head: QLinear,
}

// The fields conversion visits: linear layers (quantized) and named float modules (saved as they are).
quantizable!(Attention { qkv, out });
quantizable!(Mlp { up, down });
quantizable!(Block { attn_norm, attn, mlp_norm, mlp });
quantizable!(TinyLm { embed, blocks, norm, head });

fn rms_norm(vb: VarBuilder) -> Result<RmsNorm> {
    candle_nn::rms_norm(DIM, 1e-5, vb)
}

impl Attention {
    fn load(vb: VarBuilder) -> Result<Self> {
        Ok(Self { qkv: qlinear_no_bias(DIM, 3 * DIM, vb.pp("qkv"))?, out: qlinear_no_bias(DIM, DIM, vb.pp("out"))? })
    }

    /// Causal multi-head attention over `x` `[batch, seq, DIM]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let head_dim = DIM / HEADS;
        let qkv = self.qkv.forward(x)?.reshape((b, s, 3, HEADS, head_dim))?.permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        let mask: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 }).collect();
        let scores = scores.broadcast_add(&Tensor::from_vec(mask, (s, s), x.device())?)?;
        let y = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        self.out.forward(&y.transpose(1, 2)?.reshape((b, s, DIM))?)
    }
}

impl Block {
    fn load(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attn_norm: Named::load(vb.pp("attn_norm"), rms_norm)?,
            attn: Attention::load(vb.pp("attn"))?,
            mlp_norm: Named::load(vb.pp("mlp_norm"), rms_norm)?,
            mlp: Mlp { up: qlinear_no_bias(DIM, HIDDEN, vb.pp("mlp.up"))?, down: qlinear_no_bias(HIDDEN, DIM, vb.pp("mlp.down"))? },
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.attn_norm.forward(x)?)?)?;
        let h = self.mlp.up.forward(&self.mlp_norm.forward(&x)?)?.gelu()?;
        x + self.mlp.down.forward(&h)?
    }
}

impl TinyLm {
    fn load(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            embed: Named::load(vb.pp("embed"), |vb| candle_nn::embedding(VOCAB, DIM, vb))?,
            blocks: (0..LAYERS).map(|i| Block::load(vb.pp(format!("blocks.{i}")))).collect::<Result<_>>()?,
            norm: Named::load(vb.pp("norm"), rms_norm)?,
            head: qlinear_no_bias(DIM, VOCAB, vb.pp("head"))?,
        })
    }
}

impl Module for TinyLm {
    /// Token ids `[batch, seq]` → logits `[batch, seq, VOCAB]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut h = self.embed.forward(ids)?;
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        self.head.forward(&self.norm.forward(&h)?)
    }
}

/// Mean over positions of KL(p_ref ‖ p) and the share of positions whose argmax agrees.
fn kl_and_agreement(reference: &Tensor, candidate: &Tensor) -> Result<(f32, f32)> {
    let lp = candle_nn::ops::log_softmax(reference, D::Minus1)?;
    let lq = candle_nn::ops::log_softmax(candidate, D::Minus1)?;
    let kl = (lp.exp()? * (&lp - &lq)?)?.sum(D::Minus1)?.mean_all()?.to_scalar::<f32>()?;
    let same = reference.argmax(D::Minus1)?.eq(&candidate.argmax(D::Minus1)?)?.to_dtype(DType::F32)?.mean_all()?;
    Ok((kl, same.to_scalar::<f32>()?))
}

fn main() -> Result<()> {
    let out = std::env::args().skip_while(|a| a != "--out").nth(1).map(std::path::PathBuf::from);
    let dev = Device::Cpu;

    // A float model: here random weights from a VarMap; `VarBuilder::from_mmaped_safetensors`
    // over your own checkpoint works the same way.
    let varmap = VarMap::new();
    let float = TinyLm::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut int8 = TinyLm::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;

    let report = quantize_dynamic(&mut int8, &QuantConfig::default())?;
    println!("quantized {} layers: {}", report.converted.len(), report.converted.join(", "));
    // Every 2-D weight except the embedding table belongs to a layer that is now int8.
    let shapes: Vec<(String, Vec<usize>)> = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("VarMap lock poisoned"))?
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    ensure_quantized(&mut int8, shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())), &["embed"])?;

    let ids: Vec<u32> = (0..64).map(|i| (7 * i + 3) % VOCAB as u32).collect();
    let ids = Tensor::from_vec(ids, (1, 64), &dev)?;
    let (y_float, y_int8) = (float.forward(&ids)?, int8.forward(&ids)?);
    let (kl, agree) = kl_and_agreement(&y_float, &y_int8)?;
    println!("int8 vs float over {} positions: KL {kl:.2e}, argmax agreement {:.1}%", ids.dim(1)?, 100.0 * agree);

    let keep = out.is_some();
    let dir = out.unwrap_or_else(|| std::env::temp_dir().join(format!("tiny-lm-int8-{}", std::process::id())));
    let written = save_quantized(&mut int8, &dir, &SaveOptions::default())?;
    println!("saved {} ({} files)", dir.display(), written.files.len());
    let loaded = load_quantized(&dir, TinyLm::load)?;
    let diff = (loaded.forward(&ids)? - &y_int8)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("reloaded: max |difference| to the in-memory int8 model {diff}");
    if !keep {
        std::fs::remove_dir_all(&dir).ok();
    }
    if diff != 0.0 {
        candle_core::bail!("the reloaded model differs from the saved one by {diff}")
    }
    Ok(())
}
