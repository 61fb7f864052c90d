//! GGUF files (llama.cpp): tensors dequantized to f32 under Hugging Face names, the llama config
//! from the metadata, and a `tokenizers::Tokenizer` rebuilt from the embedded vocabulary.

use crate::checkpoint::{Dtype, Entry, TensorSource};
use crate::models::llama::LlamaConfig;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{bail, Device, Result, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// What a GGUF llama file holds, converted to the Hugging Face layout.
pub struct GgufLlama {
    pub config: LlamaConfig,
    /// f32 tensors named as in the HF checkpoint (`model.layers.0.self_attn.q_proj.weight`).
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
}

/// A GGUF llama file opened: config and tokenizer from the metadata, tensors read on demand.
pub struct GgufModel {
    pub config: LlamaConfig,
    pub tensors: GgufSource,
    pub tokenizer: Tokenizer,
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
}

fn meta<'a>(content: &'a Content, key: &str, path: &Path) -> Result<&'a Value> {
    content.metadata.get(key).ok_or_else(|| candle_core::Error::Msg(format!("{}: GGUF metadata has no '{key}'", path.display())))
}

/// Reads all tensors of `path` into memory, calling `progress(done, total)` after each (for
/// peers that want a `VarBuilder::from_tensors`; models load through [`open_gguf_llama`]).
pub fn load_gguf_llama(path: &Path, mut progress: impl FnMut(usize, usize)) -> Result<GgufLlama> {
    let g = open_gguf_llama(path)?;
    let total = g.tensors.entries.len();
    let mut tensors = HashMap::new();
    for (i, e) in g.tensors.entries.iter().enumerate() {
        tensors.insert(e.name.clone(), g.tensors.read(&e.name)?);
        progress(i + 1, total);
    }
    Ok(GgufLlama { config: g.config, tensors, tokenizer: g.tokenizer, chat_template: g.chat_template })
}

/// Opens `path`: metadata, tokenizer and the tensor directory; no tensor data is read.
pub fn open_gguf_llama(path: &Path) -> Result<GgufModel> {
    let ctx = |e: candle_core::Error| e.context(format!("reading GGUF file {}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| candle_core::Error::Msg(format!("cannot open {}: {e}", path.display())))?;
    let content = Content::read(&mut file).map_err(ctx)?;
    let arch = meta(&content, "general.architecture", path)?.to_string()?.clone();
    if arch != "llama" {
        bail!("{}: unsupported GGUF architecture '{arch}' (supported: llama)", path.display())
    }
    let u = |k: &str| -> Result<usize> { Ok(meta(&content, &format!("llama.{k}"), path)?.to_u32()? as usize) };
    let (hidden, heads) = (u("embedding_length")?, u("attention.head_count")?);
    let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
    let tokenizer = tokenizer_from_gguf(&content, path)?;
    let eos = meta(&content, "tokenizer.ggml.eos_token_id", path).and_then(|v| v.to_u32()).ok();
    let bos = meta(&content, "tokenizer.ggml.bos_token_id", path).and_then(|v| v.to_u32()).ok();
    let has_output = content.tensor_infos.contains_key("output.weight");
    let config = LlamaConfig {
        hidden_size: hidden,
        intermediate_size: u("feed_forward_length")?,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: None,
        rms_norm_eps: meta(&content, "llama.attention.layer_norm_rms_epsilon", path)?.to_f32()? as f64,
        rope_theta: meta(&content, "llama.rope.freq_base", path).and_then(|v| v.to_f32()).unwrap_or(10_000.0),
        max_position_embeddings: u("context_length")?,
        vocab_size: tokenizer.get_vocab_size(true),
        tie_word_embeddings: !has_output,
        attention_bias: false,
        rope_scaling: None,
        bos_token_id: bos,
        eos_token_id: eos.map(|e| vec![e]).unwrap_or_default(),
        model_type: "llama".into(),
    };
    if heads == 0 || hidden % heads != 0 {
        bail!("{}: {heads} attention heads do not split the hidden size {hidden}", path.display())
    }
    // Tensors in file order, so that reading them all reads the file front to back.
    let mut infos: Vec<(&String, u64)> = content.tensor_infos.iter().map(|(n, i)| (n, i.offset)).collect();
    infos.sort_by_key(|&(_, at)| at);
    let (mut entries, mut names) = (Vec::new(), HashMap::new());
    for (name, _) in infos {
        let Some(hf) = hf_name(name) else { bail!("{}: unexpected tensor '{name}' in a llama GGUF file", path.display()) };
        let shape = content.tensor_infos[name].shape.dims().to_vec();
        names.insert(hf.clone(), (name.clone(), entries.len()));
        entries.push(Entry { name: hf, dtype: Dtype::F32, shape });
    }
    let chat_template = meta(&content, "tokenizer.chat_template", path).and_then(|v| v.to_string().cloned()).ok();
    let tensors =
        GgufSource { path: path.to_path_buf(), content, file: Mutex::new(file), entries, names, heads, kv_heads, head_dim: hidden / heads };
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
        // llama.cpp stores q/k rows interleaved for its rope; put them back in HF order.
        match name.rsplit('.').nth(1) {
            Some("attn_q") => unpermute_rows(&t, self.heads, self.head_dim),
            Some("attn_k") => unpermute_rows(&t, self.kv_heads, self.head_dim),
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

/// llama.cpp tensor name → Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
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
                "ffn_norm" => "post_attention_layernorm",
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

/// Byte-level BPE tokenizer from `tokenizer.ggml.*` metadata.
fn tokenizer_from_gguf(content: &Content, path: &Path) -> Result<Tokenizer> {
    let terr = |e: tokenizers::Error| candle_core::Error::Msg(format!("{}: building the tokenizer: {e}", path.display()));
    let model = meta(content, "tokenizer.ggml.model", path)?.to_string()?;
    if model != "gpt2" {
        bail!("{}: tokenizer model '{model}' is not supported (supported: gpt2 byte-level BPE)", path.display())
    }
    let tokens: Vec<String> =
        meta(content, "tokenizer.ggml.tokens", path)?.to_vec()?.iter().map(|v| v.to_string().cloned()).collect::<Result<_>>()?;
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
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<Result<_>>()?,
        None => vec![],
    };
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
        tokens.iter().zip(&types).filter(|(_, &ty)| ty == 3).map(|(t, _)| AddedToken::from(t.clone(), true)).collect();
    tokenizer.add_special_tokens(specials).map_err(terr)?;
    Ok(tokenizer)
}
