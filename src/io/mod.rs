//! Where models come from: a Hugging Face hub id (through hf-hub and its cache), a local HF
//! folder, or a GGUF file; loaders that turn each into a model with its tokenizer.

pub mod gguf;
pub mod hf;

use crate::models::bert::{Bert, BertConfig};
use crate::models::llama::{Llama, LlamaConfig};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Hub id of the default model.
pub const DEFAULT_HUB_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// File name of the offline copy of the default model (see `scripts/fetch-models.sh`).
pub const DEFAULT_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A model location, as given on a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// `org/name` or `org/name@revision`.
    Hub { id: String, revision: String },
    /// A folder with `config.json`, safetensors and `tokenizer.json`.
    Folder(PathBuf),
    /// A `.gguf` file.
    Gguf(PathBuf),
}

impl ModelSource {
    /// Existing paths win; a `.gguf` path must exist; anything else shaped `org/name[@rev]` is a
    /// hub id.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Folder(path.to_path_buf()));
        }
        if path.is_file() {
            return match path.extension().and_then(|e| e.to_str()) {
                Some("gguf") => Ok(Self::Gguf(path.to_path_buf())),
                _ => bail!("{spec}: a model file must be .gguf (or give a folder with config.json)"),
            };
        }
        if spec.ends_with(".gguf") {
            bail!("{spec}: no such GGUF file")
        }
        let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
        let parts: Vec<&str> = id.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))) {
            return Ok(Self::Hub { id: id.to_string(), revision: revision.to_string() });
        }
        bail!("{spec}: not an existing folder or .gguf file, nor a hub id like org/name")
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hub { id, revision } if revision == "main" => write!(f, "{id}"),
            Self::Hub { id, revision } => write!(f, "{id}@{revision}"),
            Self::Folder(p) | Self::Gguf(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Folder of the offline models: `$CANDLE_QUANT_MODELS`, else `models/` in this crate.
pub fn models_dir() -> PathBuf {
    std::env::var_os("CANDLE_QUANT_MODELS").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// Loading progress: `(stage, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// A causal language model with its tokenizer.
#[derive(Clone)]
pub struct LanguageModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub source: String,
}

/// A sentence encoder with its tokenizer.
#[derive(Clone)]
pub struct SentenceEncoder {
    pub model: Bert,
    pub tokenizer: Tokenizer,
}

struct HfModel {
    config: serde_json::Value,
    tensors: HashMap<String, Tensor>,
    tokenizer: Tokenizer,
    folder: Option<PathBuf>,
}

fn load_hf(source: &ModelSource, progress: Progress) -> Result<HfModel> {
    let files = match source {
        ModelSource::Folder(dir) => hf::local_files(dir)?,
        #[cfg(feature = "hub")]
        ModelSource::Hub { id, revision } => hf::hub_files(id, revision)?,
        #[cfg(not(feature = "hub"))]
        ModelSource::Hub { id, .. } => bail!("{id}: hub ids need the `hub` feature"),
        ModelSource::Gguf(p) => bail!("{}: expected a Hugging Face folder, got a GGUF file", p.display()),
    };
    let config = hf::read_config(&files.config)?;
    let Some(tok_path) = &files.tokenizer else { bail!("{source}: no tokenizer.json") };
    let mut tokenizer = Tokenizer::from_file(tok_path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tok_path.display())))?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tok_path.display())))?;
    let tensors = hf::load_safetensors(&files.weights, |d, t| progress("loading weights", d, t))?;
    Ok(HfModel { config, tensors, tokenizer, folder: files.config.parent().map(Path::to_path_buf) })
}

/// Loads a Llama-family model from any source.
pub fn load_llama(source: &ModelSource, progress: Progress) -> Result<LanguageModel> {
    let (cfg, tensors, tokenizer, chat_template) = match source {
        ModelSource::Gguf(path) => {
            let g = gguf::load_gguf_llama(path, |d, t| progress("dequantizing GGUF tensors", d, t))?;
            (g.config, g.tensors, g.tokenizer, g.chat_template)
        }
        _ => {
            let hf = load_hf(source, progress)?;
            let cfg = LlamaConfig::from_json(&hf.config).map_err(|e| e.context(format!("{source}")))?;
            let template = hf.folder.as_ref().and_then(|d| chat_template_from(&d.join("tokenizer_config.json")));
            (cfg, hf.tensors, hf.tokenizer, template)
        }
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = Llama::load(&cfg, vb).map_err(|e| e.context(format!("building the model from {source}")))?;
    Ok(LanguageModel { model, tokenizer, chat_template, source: source.to_string() })
}

/// Loads a BERT sentence encoder from a Hugging Face folder or hub id.
pub fn load_bert(source: &ModelSource, progress: Progress) -> Result<SentenceEncoder> {
    let hf = load_hf(source, progress)?;
    let cfg = BertConfig::from_json(&hf.config).map_err(|e| e.context(format!("{source}")))?;
    let vb = VarBuilder::from_tensors(hf.tensors, DType::F32, &Device::Cpu);
    let model = Bert::load(&cfg, vb).map_err(|e| e.context(format!("building the model from {source}")))?;
    Ok(SentenceEncoder { model, tokenizer: hf.tokenizer })
}

fn chat_template_from(path: &Path) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json.get("chat_template")?.as_str().map(str::to_string)
}
