//! GGUF files (llama.cpp): tensors dequantized to f32 under Hugging Face names, the llama config
//! from the metadata, and a `tokenizers::Tokenizer` rebuilt from the embedded vocabulary.

use crate::models::{DecoderConfig, Variant};
use crate::progress::Progress;
use crate::source::{Dtype, Entry, TensorSource};
use candle_core::quantized::gguf_file::{Content, Value};
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
}

/// The tensors of a GGUF llama file under Hugging Face names, each dequantized to f32 (q/k rows
/// put back in HF order) when read.
pub struct GgufSource {
    path: PathBuf,
    content: Content,
    file: Mutex<std::fs::File>,
    entries: Vec<Entry>,
    /// HF name → (GGUF name, entry).
    names: HashMap<String, (String, usize)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// q/k rows in llama.cpp's interleaved RoPE order (Llama), to be put back in HF order.
    permuted: bool,
    /// Norm weights stored as `1 + w` (Gemma), read as `w`.
    norm_plus_one: bool,
}

fn meta<'a>(content: &'a Content, key: &str, path: &Path) -> Result<&'a Value> {
    content.metadata.get(key).ok_or_else(|| candle_core::Error::Msg(format!("{}: GGUF metadata has no '{key}'", path.display())))
}

/// Reads all tensors of `path` into memory, calling `progress` after each (for
/// peers that want a `VarBuilder::from_tensors`; models load through [`open_gguf_llama`]).
pub fn load_gguf_decoder(path: &Path, mut progress: impl FnMut(Progress)) -> Result<GgufDecoder> {
    let g = open_gguf_llama(path)?;
    let total = g.tensors.entries.len();
    let mut tensors = HashMap::new();
    for (i, e) in g.tensors.entries.iter().enumerate() {
        tensors.insert(e.name.clone(), g.tensors.read(&e.name)?);
        progress(Progress::items("reading tensors", i + 1, total));
    }
    Ok(GgufDecoder { config: g.config, tensors, tokenizer: g.tokenizer, chat_template: g.chat_template })
}

/// Opens `path`: metadata, tokenizer and the tensor directory; no tensor data is read.
pub fn open_gguf_llama(path: &Path) -> Result<GgufModel> {
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
        names.insert(hf.clone(), (name.clone(), entries.len()));
        entries.push(Entry { name: hf, dtype: Dtype::F32, shape });
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
    };
    Ok(GgufModel { config, tensors, tokenizer, chat_template })
}

impl GgufSource {
    /// The tensor under its HF name, dequantized to f32.
    pub fn read(&self, hf: &str) -> Result<Tensor> {
        let ctx = |e: candle_core::Error| e.context(format!("reading GGUF file {}", self.path.display()));
        let Some((name, _)) = self.names.get(hf) else { bail!("{}: no tensor '{hf}'", self.path.display()) };
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
        match name.rsplit('.').nth(1) {
            Some("attn_q") if self.permuted => unpermute_rows(&t, self.heads, self.head_dim),
            Some("attn_k") if self.permuted => unpermute_rows(&t, self.kv_heads, self.head_dim),
            _ => Ok(t),
        }
    }
}

impl TensorSource for GgufSource {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.read(name)?.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        Ok(t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn describe(&self, name: &str) -> String {
        match self.names.get(name) {
            Some((gguf, _)) => format!("{}: tensor '{gguf}' ({name})", self.path.display()),
            None => format!("{}: tensor '{name}'", self.path.display()),
        }
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.names.get(name).map(|&(_, i)| &self.entries[i])
    }
}

/// llama.cpp tensor name → Hugging Face name (Gemma 3's norms have names of their own).
fn hf_name(gguf: &str, gemma3: bool) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (layer, rest) = rest.split_once('.')?;
            let (part, suffix) = rest.rsplit_once('.')?;
            let hf = match part {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                "attn_norm" => "input_layernorm",
                "ffn_norm" if gemma3 => "pre_feedforward_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "post_attention_norm" if gemma3 => "post_attention_layernorm",
                "post_ffw_norm" if gemma3 => "post_feedforward_layernorm",
                "attn_q_norm" if gemma3 => "self_attn.q_norm",
                "attn_k_norm" if gemma3 => "self_attn.k_norm",
                _ => return None,
            };
            format!("model.layers.{layer}.{hf}.{suffix}")
        }
    })
}

/// Inverse of llama.cpp's conversion permute: within each head, GGUF row `2j + t` is HF row
/// `t·(d/2) + j`. Works for weights `[heads·d, in]` and biases `[heads·d]`.
fn unpermute_rows(t: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    if dims[0] != heads * head_dim || !head_dim.is_multiple_of(2) {
        bail!("cannot un-permute a tensor of shape {dims:?} for {heads} heads of {head_dim}")
    }
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, head_dim / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
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
