//! GGUF files (llama.cpp), read and written: tensors under Hugging Face names, the llama config
//! from the metadata, and a `tokenizers::Tokenizer` rebuilt from the embedded vocabulary.
//!
//! A file whose linear weights are all `Q8_0`, `Q4_0` or float is read as this toolkit's int8
//! and int4 layers, block for block ([`blocks`]); any other file is dequantized to f32 and
//! quantized like a float model. [`write`] writes int8/int4 checkpoints as GGUF.

pub mod blocks;
pub mod write;

use crate::checkpoint::{CheckpointScheme, LayerScheme};
use crate::kernels::WeightQuant;
use crate::models::{DecoderConfig, Variant};
use crate::progress::Progress;
use crate::source::{Dtype, Entry, TensorSource};
use candle_core::quantized::gguf_file::Content;
pub use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{bail, Device, Result, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

/// What a GGUF llama file holds, converted to the Hugging Face layout.
pub struct GgufDecoder {
    /// The configuration the metadata describes.
    pub config: DecoderConfig,
    /// f32 tensors named as in the HF checkpoint (`model.layers.0.self_attn.q_proj.weight`).
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer rebuilt from the metadata.
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`, if present.
    pub chat_template: Option<String>,
}

/// A GGUF llama file opened: config and tokenizer from the metadata, tensors read on demand.
pub struct GgufModel {
    /// The configuration the metadata describes.
    pub config: DecoderConfig,
    /// The tensor directory, read on demand.
    pub tensors: GgufSource,
    /// The tokenizer rebuilt from the metadata.
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`, if present.
    pub chat_template: Option<String>,
    /// The int8/int4 layers' schemes when the file's linear weights are read as stored
    /// (`Q8_0`/`Q4_0` blocks); `None` when everything is dequantized.
    pub quantization: Option<CheckpointScheme>,
}

/// How a [`GgufSource`] entry is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Dequantized to f32.
    Float,
    /// The int8 values (`Q8_0`) or int4 nibbles (`Q4_0`) of a block-quantized weight.
    Values,
    /// Its `f16` scales.
    Scales,
}

/// A block-quantized weight converted: its GGUF name, and its values and scales until read.
type ConvertedBlocks = (String, [Option<Vec<u8>>; 2]);

/// The tensors of a GGUF llama file under Hugging Face names, each dequantized to f32 (q/k rows
/// put back in HF order) when read.
pub struct GgufSource {
    path: PathBuf,
    content: Content,
    file: Mutex<std::fs::File>,
    entries: Vec<Entry>,
    /// HF name → (GGUF name, entry, what of the GGUF tensor it is).
    names: HashMap<String, (String, usize, Part)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// q/k rows in llama.cpp's interleaved RoPE order (Llama), to be put back in HF order.
    permuted: bool,
    /// Norm weights stored as `1 + w` (Gemma), read as `w`.
    norm_plus_one: bool,
    /// The last block-quantized weight converted: its GGUF name and the part not read yet
    /// (values, scales), so each weight is read from the file once.
    last_blocks: Mutex<Option<ConvertedBlocks>>,
}

fn meta<'a>(content: &'a Content, key: &str, path: &Path) -> Result<&'a Value> {
    content.metadata.get(key).ok_or_else(|| candle_core::Error::Msg(format!("{}: GGUF metadata has no '{key}'", path.display())))
}

/// Reads all tensors of `path` into memory, calling `progress` after each (for
/// peers that want a `VarBuilder::from_tensors`; models load through [`open_gguf_llama`]).
pub fn load_gguf_decoder(path: &Path, mut progress: impl FnMut(Progress)) -> Result<GgufDecoder> {
    let g = open_gguf(path, false)?;
    let total = g.tensors.entries.len();
    let mut tensors = HashMap::new();
    for (i, e) in g.tensors.entries.iter().enumerate() {
        tensors.insert(e.name.clone(), g.tensors.read(&e.name)?);
        progress(Progress::items("reading tensors", i + 1, total));
    }
    Ok(GgufDecoder { config: g.config, tensors, tokenizer: g.tokenizer, chat_template: g.chat_template })
}

/// Opens `path`: metadata, tokenizer and the tensor directory; no tensor data is read. A file
/// whose linear weights are all `Q8_0`, `Q4_0` or float keeps its blocks as int8/int4 layers.
pub fn open_gguf_llama(path: &Path) -> Result<GgufModel> {
    open_gguf(path, true)
}

/// Ggml types whose blocks are this toolkit's layers, and float types.
fn block_kind(dtype: GgmlDType) -> Option<Option<WeightQuant>> {
    match dtype {
        GgmlDType::Q8_0 => Some(Some(WeightQuant::PerGroup(blocks::QK))),
        GgmlDType::Q4_0 => Some(Some(WeightQuant::Int4 { group: blocks::QK, zero_point: false })),
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Some(None),
        _ => None,
    }
}

fn open_gguf(path: &Path, keep_blocks: bool) -> Result<GgufModel> {
    let ctx = |e: candle_core::Error| e.context(format!("reading GGUF file {}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| candle_core::Error::Msg(format!("cannot open {}: {e}", path.display())))?;
    let file_len = file.metadata().map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?.len();
    let content = Content::read(&mut file).map_err(ctx)?;
    let arch = meta(&content, "general.architecture", path)?.to_string()?.clone();
    let gemma3 = match arch.as_str() {
        "llama" => false,
        "gemma3" => true,
        _ => bail!("{}: unsupported GGUF architecture '{arch}' (supported: llama, gemma3)", path.display()),
    };
    let u = |k: &str| -> Result<usize> { Ok(meta(&content, &format!("{arch}.{k}"), path)?.to_u32()? as usize) };
    let (hidden, heads) = (u("embedding_length")?, u("attention.head_count")?);
    let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
    let head_dim = u("attention.key_length").ok();
    let tokenizer = tokenizer_from_gguf(&content, path)?;
    let eos = meta(&content, "tokenizer.ggml.eos_token_id", path).and_then(|v| v.to_u32()).ok();
    let bos = meta(&content, "tokenizer.ggml.bos_token_id", path).and_then(|v| v.to_u32()).ok();
    let add_bos = meta(&content, "tokenizer.ggml.add_bos_token", path).and_then(|v| v.to_bool()).unwrap_or(false);
    let has_output = content.tensor_infos.contains_key("output.weight");
    // Gemma 3 (what llama.cpp assumes of it): every sixth layer global, the others through the
    // window with RoPE base 10 000; norms stored with Gemma's +1 already added by the converter.
    let variant = if gemma3 {
        Variant {
            qk_norm: true,
            sandwich_norms: true,
            // The converter stored Gemma's norms as 1 + w; they are read back as w (below), as
            // Hugging Face checkpoints hold them, so a quantized copy is a Gemma checkpoint too.
            norm_offset: 1.0,
            sliding_window: u("attention.sliding_window").ok(),
            global_every: Some(6),
            rope_local_theta: Some(10_000.0),
            gelu_tanh: true,
            scale_embeddings: true,
            query_pre_attn_scalar: head_dim,
            ..Variant::default()
        }
    } else {
        Variant::default()
    };
    let config = DecoderConfig {
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim,
        rms_norm_eps: meta(&content, &format!("{arch}.attention.layer_norm_rms_epsilon"), path)?.to_f32()? as f64,
        rope_theta: meta(&content, &format!("{arch}.rope.freq_base"), path).and_then(|v| v.to_f32()).unwrap_or(10_000.0),
        max_position_embeddings: u("context_length")?,
        vocab_size: tokenizer.get_vocab_size(true),
        tie_word_embeddings: !has_output,
        attention_bias: false,
        rope_scaling: None,
        bos_token_id: bos,
        eos_token_id: eos.map(|e| vec![e]).unwrap_or_default(),
        model_type: if gemma3 { "gemma3_text".into() } else { "llama".into() },
        add_bos_token: add_bos,
        variant,
    };
    if heads == 0 || (head_dim.is_none() && hidden % heads != 0) {
        bail!("{}: {heads} attention heads do not split the hidden size {hidden}", path.display())
    }
    // Tensors in file order, so that reading them all reads the file front to back.
    let mut infos: Vec<(&String, u64)> = content.tensor_infos.iter().map(|(n, i)| (n, i.offset)).collect();
    infos.sort_by_key(|&(_, at)| at);
    // The linear weights, under their layers' names (a tied output layer reads the embeddings),
    // are kept as blocks when every one is Q8_0, Q4_0 or float and some are not float.
    let layer_of = |gguf: &str| -> Option<String> {
        let hf = hf_name(gguf, gemma3)?;
        match hf.as_str() {
            "lm_head.weight" => Some("lm_head".into()),
            "model.embed_tokens.weight" if !has_output => Some("lm_head".into()),
            _ => hf.strip_suffix(".weight").filter(|l| l.ends_with("_proj")).map(str::to_string),
        }
    };
    let linear: Vec<(&String, GgmlDType)> =
        infos.iter().filter(|(n, _)| layer_of(n).is_some()).map(|&(n, _)| (n, content.tensor_infos[n].ggml_dtype)).collect();
    let kinds: Option<Vec<Option<WeightQuant>>> = linear.iter().map(|&(_, t)| block_kind(t)).collect();
    let stored = keep_blocks && kinds.as_ref().is_some_and(|k| k.iter().any(Option::is_some));
    let mut quantization: Option<CheckpointScheme> = None;
    // An untied embedding table in Q8_0 or Q4_0 blocks stays int8 (int4) rows beside such layers.
    let mut tables = vec![];
    let table_of = |gguf: &str| {
        (has_output && hf_name(gguf, gemma3).as_deref() == Some("model.embed_tokens.weight"))
            .then(|| crate::models::decoder::EMBED_TOKENS.to_string())
    };
    let defaults = crate::QuantConfig::default();
    let (mut entries, mut names) = (Vec::new(), HashMap::new());
    for (name, _) in infos {
        let Some(hf) = hf_name(name, gemma3) else { bail!("{}: unexpected tensor '{name}' in a {arch} GGUF file", path.display()) };
        let info = &content.tensor_infos[name];
        let shape = info.shape.dims().to_vec();
        // The bytes the shape implies must lie inside the file: a shape whose element count
        // overflows, or claims more than the file holds, is refused before anything is sized by it.
        let (block, type_size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        let bytes = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).and_then(|n| (n / block).checked_mul(type_size));
        let room = file_len.saturating_sub(content.tensor_data_offset.saturating_add(info.offset));
        if bytes.is_none_or(|b| b as u64 > room) {
            bail!(
                "{}: tensor '{name}' of shape {shape:?} ({:?}) does not fit in the file ({room} bytes after its offset)",
                path.display(),
                info.ggml_dtype
            )
        }
        let table = table_of(name);
        let layer = layer_of(name).or(table.clone()).filter(|_| stored);
        let kind = block_kind(info.ggml_dtype).flatten();
        let (Some(layer), Some(how), &[n, k]) = (layer, kind, shape.as_slice()) else {
            names.insert(hf.clone(), (name.clone(), entries.len(), Part::Float));
            entries.push(Entry { name: hf, dtype: Dtype::F32, shape });
            continue;
        };
        if table.is_some() {
            tables.push(layer.clone());
        } else {
            let scheme = LayerScheme::dynamic(&defaults, defaults.activation, how);
            match &mut quantization {
                None => quantization = Some(CheckpointScheme::new(scheme)),
                Some(q) => q.set(&layer, scheme),
            }
        }
        let values = match how {
            WeightQuant::Int4 { .. } => Entry { name: format!("{layer}.weight"), dtype: Dtype::U8, shape: vec![n, k / 2] },
            _ => Entry { name: format!("{layer}.weight"), dtype: Dtype::I8, shape: vec![n, k] },
        };
        let scales = Entry { name: format!("{layer}.weight_scale"), dtype: Dtype::F16, shape: vec![n, k / blocks::QK] };
        for (e, part) in [(values, Part::Values), (scales, Part::Scales)] {
            names.insert(e.name.clone(), (name.clone(), entries.len(), part));
            entries.push(e);
        }
    }
    if let Some(q) = &mut quantization {
        q.excluded = linear.iter().filter(|&&(_, t)| block_kind(t).flatten().is_none()).filter_map(|(n, _)| layer_of(n)).collect();
        tables.iter().for_each(|t| q.add_table(t));
    }
    let chat_template = meta(&content, "tokenizer.chat_template", path).and_then(|v| v.to_string().cloned()).ok();
    // llama.cpp permutes Llama's q/k rows for its RoPE; Gemma's are stored as they are.
    let permuted = !gemma3;
    let head_dim = config.head_dim();
    let tensors = GgufSource {
        path: path.to_path_buf(),
        content,
        file: Mutex::new(file),
        entries,
        names,
        heads,
        kv_heads,
        head_dim,
        permuted,
        norm_plus_one: gemma3,
        last_blocks: Mutex::new(None),
    };
    Ok(GgufModel { config, tensors, tokenizer, chat_template, quantization })
}

impl GgufSource {
    /// The tensor under its HF name, dequantized to f32.
    pub fn read(&self, hf: &str) -> Result<Tensor> {
        let ctx = |e: candle_core::Error| e.context(format!("reading GGUF file {}", self.path.display()));
        let Some((name, _, _)) = self.names.get(hf) else { bail!("{}: no tensor '{hf}'", self.path.display()) };
        let device = Device::Cpu;
        let q = {
            let mut file = self.file.lock().map_err(|_| candle_core::Error::Msg("a GGUF reader panicked".into()))?;
            self.content.tensor(&mut *file, name, &device).map_err(ctx)?
        };
        let t = q.dequantize(&device).map_err(ctx)?;
        if self.norm_plus_one && hf.ends_with("norm.weight") {
            return t - 1.0;
        }
        // llama.cpp stores q/k rows interleaved for its rope; put them back in HF order.
        match self.rope_heads(name) {
            Some(heads) => {
                let order: Vec<u32> =
                    rope_row_order(t.dim(0)?, heads, self.head_dim, false).map_err(ctx)?.into_iter().map(|r| r as u32).collect();
                t.index_select(&Tensor::new(order, &device)?, 0)
            }
            None => Ok(t),
        }
    }

    /// The metadata, as read.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Heads of a q/k weight whose rows llama.cpp stored in its RoPE order; `None` otherwise.
    fn rope_heads(&self, gguf: &str) -> Option<usize> {
        match gguf.rsplit('.').nth(1) {
            Some("attn_q") if self.permuted => Some(self.heads),
            Some("attn_k") if self.permuted => Some(self.kv_heads),
            _ => None,
        }
    }

    /// One part of a `Q8_0`/`Q4_0` weight as this toolkit stores it, rows in HF order: both
    /// parts converted on the first read, the other kept for its own.
    fn read_blocks(&self, gguf: &str, part: Part) -> Result<Vec<u8>> {
        let slot = usize::from(part == Part::Scales);
        let mut last = self.last_blocks.lock().map_err(|_| candle_core::Error::Msg("a GGUF reader panicked".into()))?;
        if let Some((_, parts)) = last.as_mut().filter(|(name, _)| name == gguf) {
            if let Some(bytes) = parts[slot].take() {
                return Ok(bytes);
            }
        }
        let mut parts = self.convert_blocks(gguf).map(|(values, scales)| [Some(values), Some(scales)])?;
        let wanted = parts[slot].take().unwrap_or_default();
        *last = Some((gguf.to_string(), parts));
        Ok(wanted)
    }

    /// A `Q8_0`/`Q4_0` weight read from the file as (values, scales), rows in HF order.
    fn convert_blocks(&self, gguf: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let what = || format!("{}: tensor '{gguf}'", self.path.display());
        let Some(info) = self.content.tensor_infos.get(gguf) else { bail!("{}: not in the file", what()) };
        let &[n, k] = info.shape.dims() else { bail!("{}: a linear weight must be 2-D, found {:?}", what(), info.shape) };
        let mut raw = vec![0u8; n * (k / info.ggml_dtype.block_size()) * info.ggml_dtype.type_size()];
        {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = self.file.lock().map_err(|_| candle_core::Error::Msg("a GGUF reader panicked".into()))?;
            let at = self.content.tensor_data_offset + info.offset;
            file.seek(SeekFrom::Start(at))
                .and_then(|_| file.read_exact(&mut raw))
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", what())))?;
        }
        let order = match self.rope_heads(gguf) {
            Some(heads) => rope_row_order(n, heads, self.head_dim, false)?,
            None => (0..n).collect(),
        };
        match info.ggml_dtype {
            GgmlDType::Q8_0 => blocks::int8_from_q8_0(&raw, n, k, &order, &what),
            GgmlDType::Q4_0 => blocks::int4_from_q4_0(&raw, n, k, &order, &what),
            other => bail!("{}: {other:?} blocks are not read as int8/int4 layers", what()),
        }
    }
}

/// Row order between Hugging Face's q/k rows and llama.cpp's RoPE order: within each head of
/// `d` rows, GGUF row `2j + t` is HF row `t·(d/2) + j`. `to_gguf`: entry `r` is the HF row that
/// GGUF row `r` holds; else the GGUF row that HF row `r` comes from.
fn rope_row_order(rows: usize, heads: usize, head_dim: usize, to_gguf: bool) -> Result<Vec<usize>> {
    let d = head_dim;
    if rows != heads * d || !d.is_multiple_of(2) {
        bail!("cannot reorder {rows} rows as {heads} RoPE heads of {d}")
    }
    Ok((0..rows)
        .map(|r| {
            let (h, i) = (r / d, r % d);
            if to_gguf {
                h * d + (i % 2) * (d / 2) + i / 2
            } else {
                h * d + 2 * (i % (d / 2)) + i / (d / 2)
            }
        })
        .collect())
}

impl TensorSource for GgufSource {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        match self.names.get(name) {
            Some((gguf, _, part)) if *part != Part::Float => self.read_blocks(gguf, *part),
            _ => {
                let t = self.read(name)?.flatten_all()?.to_dtype(candle_core::DType::F32)?;
                Ok(t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
        }
    }

    fn describe(&self, name: &str) -> String {
        match self.names.get(name) {
            Some((gguf, _, _)) => format!("{}: tensor '{gguf}' ({name})", self.path.display()),
            None => format!("{}: tensor '{name}'", self.path.display()),
        }
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.names.get(name).map(|&(_, i, _)| &self.entries[i])
    }
}

/// Per-layer tensor names, llama.cpp's beside Hugging Face's; `Some(true)`: Gemma 3 only,
/// `Some(false)`: Llama only (the same GGUF name means another norm in each).
const LAYER_NAMES: &[(&str, &str, Option<bool>)] = &[
    ("attn_q", "self_attn.q_proj", None),
    ("attn_k", "self_attn.k_proj", None),
    ("attn_v", "self_attn.v_proj", None),
    ("attn_output", "self_attn.o_proj", None),
    ("ffn_gate", "mlp.gate_proj", None),
    ("ffn_up", "mlp.up_proj", None),
    ("ffn_down", "mlp.down_proj", None),
    ("attn_norm", "input_layernorm", None),
    ("ffn_norm", "pre_feedforward_layernorm", Some(true)),
    ("ffn_norm", "post_attention_layernorm", Some(false)),
    ("post_attention_norm", "post_attention_layernorm", Some(true)),
    ("post_ffw_norm", "post_feedforward_layernorm", Some(true)),
    ("attn_q_norm", "self_attn.q_norm", Some(true)),
    ("attn_k_norm", "self_attn.k_norm", Some(true)),
];

/// Whole-model tensor names, llama.cpp's beside Hugging Face's.
const MODEL_NAMES: &[(&str, &str)] =
    &[("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")];

/// llama.cpp tensor name → Hugging Face name (Gemma 3's norms have names of their own).
fn hf_name(gguf: &str, gemma3: bool) -> Option<String> {
    if let Some(&(_, hf)) = MODEL_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.into());
    }
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let &(_, hf, _) = LAYER_NAMES.iter().find(|&&(g, _, only)| g == part && only.is_none_or(|o| o == gemma3))?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Hugging Face name → llama.cpp tensor name: the inverse of [`hf_name`].
fn gguf_name(hf: &str, gemma3: bool) -> Option<String> {
    if let Some(&(g, _)) = MODEL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.into());
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let &(g, _, _) = LAYER_NAMES.iter().find(|&&(_, h, only)| h == part && only.is_none_or(|o| o == gemma3))?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// The tokenizer in `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`: Llama 3, SmolLM2) or
/// SentencePiece (`llama`: Gemma, Llama 2).
fn tokenizer_from_gguf(content: &Content, path: &Path) -> Result<Tokenizer> {
    let model = meta(content, "tokenizer.ggml.model", path)?.to_string()?;
    let tokens: Vec<String> =
        meta(content, "tokenizer.ggml.tokens", path)?.to_vec()?.iter().map(|v| v.to_string().cloned()).collect::<Result<_>>()?;
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<Result<_>>()?,
        None => vec![],
    };
    match model.as_str() {
        "gpt2" => byte_level_bpe(content, path, tokens, &types),
        "llama" => sentencepiece(content, path, tokens, &types),
        other => {
            bail!("{}: tokenizer model '{other}' is not supported (supported: gpt2 byte-level BPE, llama SentencePiece)", path.display())
        }
    }
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// A SentencePiece BPE model rebuilt as a Hugging Face BPE: spaces become `▁`, pieces merge in
/// the order of the merged piece's score (highest first, as SentencePiece merges), and text the
/// vocabulary cannot spell falls back to its bytes (`<0xNN>` tokens).
fn sentencepiece(content: &Content, path: &Path, tokens: Vec<String>, types: &[i32]) -> Result<Tokenizer> {
    let terr = |e: tokenizers::Error| candle_core::Error::Msg(format!("{}: building the tokenizer: {e}", path.display()));
    let scores: Vec<f32> = meta(content, "tokenizer.ggml.scores", path)?.to_vec()?.iter().map(|v| v.to_f32()).collect::<Result<_>>()?;
    if scores.len() != tokens.len() || (!types.is_empty() && types.len() != tokens.len()) {
        bail!("{}: {} tokens but {} scores and {} token types", path.display(), tokens.len(), scores.len(), types.len())
    }
    let kind = |i: usize| types.get(i).copied().unwrap_or(NORMAL);
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    // Every normal piece that two pieces concatenate to is a merge of those two.
    let mut merges: Vec<(f32, u32, u32, usize)> = vec![];
    for (i, piece) in tokens.iter().enumerate().filter(|&(i, _)| kind(i) == NORMAL) {
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                merges.push((scores[i], a, b, i));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges = merges.into_iter().map(|(_, a, b, _)| (tokens[a as usize].clone(), tokens[b as usize].clone())).collect();
    let unk = meta(content, "tokenizer.ggml.unknown_token_id", path).and_then(|v| v.to_u32()).ok().and_then(|i| tokens.get(i as usize));
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.clone());
    }
    let mut tokenizer = Tokenizer::new(builder.build().map_err(terr)?);
    let space = Replace::new(" ", "▁").map_err(terr)?;
    let prefix = meta(content, "tokenizer.ggml.add_space_prefix", path).and_then(|v| v.to_bool()).unwrap_or(true);
    let normalizer: NormalizerWrapper =
        if prefix { NormalizerSequence::new(vec![Prepend::new("▁".into()).into(), space.into()]).into() } else { space.into() };
    tokenizer.with_normalizer(Some(normalizer)).map_err(terr)?;
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new("▁", " ").map_err(terr)?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    // Control tokens (<bos>, <start_of_turn>, …) are special: never split, skipped when decoding
    // on request; user-defined ones are never split either.
    let added = |ty: i32, special: bool| -> Vec<AddedToken> {
        tokens.iter().enumerate().filter(|&(i, _)| kind(i) == ty).map(|(_, t)| AddedToken::from(t.clone(), special)).collect()
    };
    tokenizer.add_special_tokens(added(CONTROL, true)).map_err(terr)?;
    tokenizer.add_tokens(added(USER_DEFINED, false)).map_err(terr)?;
    Ok(tokenizer)
}

/// Byte-level BPE tokenizer from `tokenizer.ggml.*` metadata.
fn byte_level_bpe(content: &Content, path: &Path, tokens: Vec<String>, types: &[i32]) -> Result<Tokenizer> {
    let terr = |e: tokenizers::Error| candle_core::Error::Msg(format!("{}: building the tokenizer: {e}", path.display()));
    let merges: Vec<(String, String)> = meta(content, "tokenizer.ggml.merges", path)?
        .to_vec()?
        .iter()
        .map(|v| {
            let s = v.to_string()?;
            s.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| candle_core::Error::Msg(format!("{}: malformed BPE merge '{s}'", path.display())))
        })
        .collect::<Result<_>>()?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(terr)?;
    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre = match content.metadata.get("tokenizer.ggml.pre").map(|v| v.to_string()).transpose()?.map(String::as_str) {
        Some("smollm") => PreTokenizerWrapper::Sequence(Sequence::new(vec![Digits::new(true).into(), byte_level.into()])),
        None | Some("gpt2") | Some("default") => byte_level.into(),
        Some(other) => bail!("{}: pre-tokenizer '{other}' is not supported (supported: smollm, gpt2)", path.display()),
    };
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // Control tokens (type 3) are special: never split, skipped when decoding on request.
    let specials: Vec<AddedToken> =
        tokens.iter().zip(types).filter(|(_, &ty)| ty == CONTROL).map(|(t, _)| AddedToken::from(t.clone(), true)).collect();
    tokenizer.add_special_tokens(specials).map_err(terr)?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One head of 6 rows: GGUF row `2j + t` holds HF row `t·3 + j`, so GGUF rows 0..6 hold HF
    /// rows [0, 3, 1, 4, 2, 5], and HF rows 0..6 come from GGUF rows [0, 2, 4, 1, 3, 5] (the
    /// inverse permutation).
    #[test]
    fn rope_row_orders_are_inverse() {
        assert_eq!(rope_row_order(6, 1, 6, true).unwrap(), [0, 3, 1, 4, 2, 5]);
        assert_eq!(rope_row_order(6, 1, 6, false).unwrap(), [0, 2, 4, 1, 3, 5]);
        let (to, from) = (rope_row_order(32, 4, 8, true).unwrap(), rope_row_order(32, 4, 8, false).unwrap());
        assert!((0..32).all(|r| from[to[r]] == r));
        assert!(rope_row_order(30, 4, 8, true).is_err());
    }

    /// Every per-layer name maps both ways, per architecture.
    #[test]
    fn tensor_names_map_both_ways() {
        for gemma3 in [false, true] {
            for &(g, h, _) in LAYER_NAMES.iter().filter(|(_, _, o)| o.is_none_or(|o| o == gemma3)) {
                let gguf = format!("blk.3.{g}.weight");
                let hf = format!("model.layers.3.{h}.weight");
                assert_eq!(hf_name(&gguf, gemma3).as_deref(), Some(hf.as_str()));
                assert_eq!(gguf_name(&hf, gemma3).as_deref(), Some(gguf.as_str()));
            }
        }
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight", false).as_deref(), Some("blk.0.ffn_norm.weight"));
        assert_eq!(gguf_name("model.layers.0.post_attention_layernorm.weight", true).as_deref(), Some("blk.0.post_attention_norm.weight"));
    }
}
