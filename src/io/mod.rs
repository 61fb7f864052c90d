//! Where models come from: a Hugging Face hub id (through hf-hub and its cache), a local HF
//! folder, or a GGUF file; loaders that turn each into a model with its tokenizer.

pub mod compressed_tensors;
pub mod gguf;
pub mod hf;

use crate::checkpoint::{plan_layers, write_checkpoint, CheckpointScheme, Int8Kind, PlannedSource, SaveOptions};
use crate::convert::{ConversionReport, QuantConfig};
use crate::kernels::WeightQuant;
use crate::models::bert::{Bert, BertConfig};
use crate::models::decoder::EMBED_TOKENS;
use crate::models::{Decoder, DecoderConfig};
use crate::progress::Progress;
use crate::source::{read_json, SafetensorsSource, SourceBackend, TensorSource, WriteReport};
use candle_core::{bail, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// Hub id of the default model.
pub const DEFAULT_HUB_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// File name of the offline copy of the default model (see `scripts/fetch-models.sh`).
pub const DEFAULT_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A model location, as given on a command line.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// `org/name` or `org/name@revision`.
    Hub {
        /// `org/name`.
        id: String,
        /// Branch, tag or commit (`main` unless given).
        revision: String,
    },
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

/// Folder of the offline models and texts, resolved at run time: `$CANDLE_QUANT_MODELS`, else
/// `models/` in the current directory when there is one (a checkout of this crate), else
/// `candle-quant/models` in the user's cache (`$XDG_CACHE_HOME`, else `~/.cache`).
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CANDLE_QUANT_MODELS") {
        return PathBuf::from(dir);
    }
    let here = PathBuf::from("models");
    if here.is_dir() {
        return here;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("candle-quant").join("models")
}

/// A loading progress callback.
pub type OnProgress<'a> = &'a mut (dyn FnMut(Progress) + Send);

/// A causal language model with its tokenizer.
#[derive(Clone)]
pub struct LanguageModel {
    /// The decoder.
    pub model: Decoder,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its Jinja chat template, if it has one.
    pub chat_template: Option<String>,
    /// Where it was loaded from, as given.
    pub source: String,
}

/// A sentence encoder with its tokenizer.
#[derive(Clone)]
pub struct SentenceEncoder {
    /// The encoder.
    pub model: Bert,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
}

fn hf_files(source: &ModelSource) -> Result<hf::HfFiles> {
    match source {
        ModelSource::Folder(dir) => hf::local_files(dir),
        #[cfg(feature = "hub")]
        ModelSource::Hub { id, revision } => hf::hub_files(id, revision),
        #[cfg(not(feature = "hub"))]
        ModelSource::Hub { id, .. } => bail!("{id}: hub ids need the `hub` feature"),
        ModelSource::Gguf(p) => bail!("{}: expected a Hugging Face folder, got a GGUF file", p.display()),
    }
}

/// Reads a `tokenizer.json`. The tokenizers crate panics on some malformed files (a decoder of
/// the wrong shape): the file is checked to be JSON first, and a panic while reading it is
/// turned into an error naming the file (its message is not printed).
pub fn tokenizer_from_file(path: &Path) -> Result<Tokenizer> {
    let err = |msg: String| candle_core::Error::Msg(format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    match quiet_panics(|| text.parse::<Tokenizer>()) {
        Ok(Ok(tokenizer)) => Ok(tokenizer),
        Ok(Err(e)) => Err(err(format!("not a tokenizer: {e}"))),
        Err(panic) => Err(err(format!("not a tokenizer the tokenizers crate can read ({panic})"))),
    }
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into `Err(its message)` without printing it: the process's panic
/// hook is wrapped once so that it stays silent on this thread while `f` runs.
fn quiet_panics<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static WRAP: std::sync::Once = std::sync::Once::new();
    WRAP.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info)
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    result.map_err(|p| {
        p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "panic".into())
    })
}

fn read_tokenizer(source: &ModelSource, files: &hf::HfFiles) -> Result<Tokenizer> {
    let Some(tok_path) = &files.tokenizer else { bail!("{source}: no tokenizer.json") };
    let mut tokenizer = tokenizer_from_file(tok_path)?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tok_path.display())))?;
    Ok(tokenizer)
}

/// A Llama-family model opened but not loaded: its config, tokenizer and tensors (read one at
/// a time when the model is built or the checkpoint written).
pub struct OpenedDecoder {
    /// The model's configuration.
    pub config: DecoderConfig,
    /// The `config.json` to save with a quantized copy (built from the metadata for GGUF).
    pub config_json: serde_json::Value,
    /// Its tensors, read one at a time.
    pub tensors: Arc<dyn TensorSource>,
    /// Set when the source is a quantized checkpoint (or a GGUF file read as its blocks).
    pub quantization: Option<CheckpointScheme>,
    /// A GGUF source's metadata (tokenizer, hyperparameters), which a GGUF copy carries over.
    pub gguf_metadata: Option<HashMap<String, candle_core::quantized::gguf_file::Value>>,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its Jinja chat template, if it has one.
    pub chat_template: Option<String>,
    /// Files a quantized copy carries over: `tokenizer.json`, `tokenizer_config.json`.
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// The files read, so that a quantized copy never overwrites them.
    pub inputs: Vec<PathBuf>,
    /// Where it was opened from, as given.
    pub source: String,
}

/// Opens a Llama-family model from any source: a float or quantized HF folder, a hub id, or a
/// GGUF file.
pub fn open_decoder(source: &ModelSource) -> Result<OpenedDecoder> {
    if let ModelSource::Gguf(path) = source {
        let g = gguf::open_gguf_llama(path)?;
        let terr = |e: tokenizers::Error| candle_core::Error::Msg(format!("{}: tokenizer: {e}", path.display()));
        let mut extra_files = vec![("tokenizer.json".to_string(), g.tokenizer.to_string(false).map_err(terr)?.into_bytes())];
        if let Some(t) = &g.chat_template {
            extra_files.push(("tokenizer_config.json".into(), serde_json::json!({"chat_template": t}).to_string().into_bytes()));
        }
        let mut config_json = serde_json::to_value(&g.config).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        config_json["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        let v = &g.config.variant;
        if g.config.model_type == "gemma3_text" {
            // Gemma 3's own config keys, so that the folder reads as a Gemma checkpoint.
            config_json["architectures"] = serde_json::json!(["Gemma3ForCausalLM"]);
            config_json["sliding_window"] = v.sliding_window.into();
            config_json["sliding_window_pattern"] = v.global_every.into();
            config_json["rope_local_base_freq"] = v.rope_local_theta.into();
            config_json["query_pre_attn_scalar"] = v.query_pre_attn_scalar.into();
            config_json["hidden_activation"] = "gelu_pytorch_tanh".into();
        }
        return Ok(OpenedDecoder {
            config: g.config,
            config_json,
            gguf_metadata: Some(g.tensors.metadata().clone()),
            tensors: Arc::new(g.tensors),
            quantization: g.quantization,
            tokenizer: g.tokenizer,
            chat_template: g.chat_template,
            extra_files,
            inputs: vec![path.clone()],
            source: source.to_string(),
        });
    }
    let files = hf_files(source)?;
    let config_json = read_json(&files.config)?;
    let config = DecoderConfig::from_json(&config_json).map_err(|e| e.context(format!("{source}")))?;
    let tensors = SafetensorsSource::open(&files.weights, files.index.as_deref())?;
    let (tensors, quantization): (Arc<dyn TensorSource>, _) =
        if config_json["quantization_config"]["quant_method"].as_str() == Some(compressed_tensors::QUANT_METHOD) {
            let (view, scheme) = compressed_tensors::CompressedTensorsSource::new(Arc::new(tensors), &config_json)
                .map_err(|e| e.context(format!("{}: a compressed-tensors checkpoint", files.config.display())))?;
            (Arc::new(view), Some(scheme))
        } else {
            (Arc::new(tensors), CheckpointScheme::from_model_config(&config_json, &files.config)?)
        };
    let tokenizer = read_tokenizer(source, &files)?;
    let folder = files.config.parent().map(Path::to_path_buf).unwrap_or_default();
    let template_file = folder.join("tokenizer_config.json");
    let chat_template = chat_template_from(&template_file);
    let mut extra_files = vec![];
    for f in [files.tokenizer.clone(), Some(template_file).filter(|t| t.is_file())].into_iter().flatten() {
        let bytes = std::fs::read(&f).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", f.display())))?;
        extra_files.push((f.file_name().and_then(|n| n.to_str()).unwrap_or("tokenizer.json").to_string(), bytes));
    }
    if quantization.is_some() {
        crate::checkpoint::check_int8_tensors(&*tensors)?;
    }
    let mut inputs = files.weights.clone();
    inputs.push(files.config.clone());
    Ok(OpenedDecoder {
        config,
        config_json,
        tensors,
        quantization,
        gguf_metadata: None,
        tokenizer,
        chat_template,
        extra_files,
        inputs,
        source: source.to_string(),
    })
}

impl OpenedDecoder {
    /// Whether the model's tensors are a quantized checkpoint.
    pub fn is_quantized(&self) -> bool {
        self.quantization.is_some()
    }

    /// Builds the model: float from a float source, int8 (with the saved schemes) from a
    /// quantized checkpoint.
    pub fn load(self, progress: OnProgress) -> Result<LanguageModel> {
        let source = self.source.clone();
        let vb = SourceBackend::new(self.tensors.clone()).with_progress("loading tensors", progress).into_var_builder();
        let mut model = Decoder::load(&self.config, vb).map_err(|e| e.context(format!("building the model from {source}")))?;
        if let Some(q) = &self.quantization {
            q.apply(&mut model, &*self.tensors).map_err(|e| e.context(source.clone()))?;
        }
        Ok(LanguageModel { model, tokenizer: self.tokenizer, chat_template: self.chat_template, source })
    }

    /// The source as the int8 checkpoint `config` and `kind` make of it: its float linear
    /// weights quantized as they are read. A tied `lm_head` reads the embedding table, which
    /// then is not kept (its int8 rows serve as the embeddings).
    pub fn quantized_view(&self, config: &QuantConfig, kind: Int8Kind) -> Result<(PlannedSource, CheckpointScheme)> {
        if self.is_quantized() {
            bail!("{}: already a quantized checkpoint", self.source)
        }
        let names = Decoder::linear_layer_names(&self.config);
        let (mut quantization, mut layers) = plan_layers(&names, config, kind)?;
        let mut renamed = HashMap::new();
        let tied = self.config.tie_word_embeddings && self.tensors.entry("lm_head.weight").is_none();
        let head_quantized = layers.iter().any(|(n, _)| n == "lm_head");
        if tied && head_quantized {
            renamed.insert("lm_head".to_string(), "model.embed_tokens.weight".to_string());
        }
        // Groups that cannot work together are refused before anything is written.
        if kind == Int8Kind::Dynamic {
            for (name, how) in &layers {
                let from = renamed.get(name).cloned().unwrap_or_else(|| format!("{name}.weight"));
                if let Some(&k) = self.tensors.entry(&from).and_then(|e| e.shape.get(1)) {
                    crate::nn::check_dynamic_groups(name, config.activation_for(name), *how, k)?;
                }
            }
        }
        // An untied embedding table follows its quantized `lm_head` into int8 rows, as a tied
        // one does by being that `lm_head`.
        let table = format!("{EMBED_TOKENS}.weight");
        if !tied && head_quantized && self.tensors.entry(&table).is_some_and(|e| e.dtype.is_float()) {
            layers.push((EMBED_TOKENS.to_string(), WeightQuant::PerChannel));
            quantization.add_table(EMBED_TOKENS);
        }
        Ok((PlannedSource::new(self.tensors.clone(), &layers, &renamed)?, quantization))
    }

    /// Builds the int8 model straight from the source, quantizing each linear weight as it is
    /// read (no float copy of the model ever exists); a quantized checkpoint loads as saved.
    pub fn load_int8(self, config: &QuantConfig, kind: Int8Kind, progress: OnProgress) -> Result<(LanguageModel, ConversionReport)> {
        let source = self.source.clone();
        let (view, quantization): (Arc<dyn TensorSource>, CheckpointScheme) = match &self.quantization {
            Some(q) => (self.tensors.clone(), q.clone()),
            None => {
                let (view, q) = self.quantized_view(config, kind)?;
                (Arc::new(view), q)
            }
        };
        let vb = SourceBackend::new(view.clone()).with_progress("loading and quantizing", progress).into_var_builder();
        let mut model = Decoder::load(&self.config, vb).map_err(|e| e.context(format!("building the model from {source}")))?;
        let report = quantization.apply(&mut model, &*view).map_err(|e| e.context(source.clone()))?;
        Ok((LanguageModel { model, tokenizer: self.tokenizer, chat_template: self.chat_template, source }, report))
    }

    /// Writes the int8 checkpoint of this model to `out`, one tensor in memory at a time.
    /// `out` must not be (or hold) one of the files read.
    pub fn quantize_to(
        &self,
        out: &Path,
        config: &QuantConfig,
        kind: Int8Kind,
        options: &SaveOptions,
        progress: impl FnMut(Progress),
    ) -> Result<WriteReport> {
        let options = self.save_options_for(out, options)?;
        let (view, quantization) = self.quantized_view(config, kind)?;
        write_checkpoint(out, &view, &quantization, &options, progress)
    }

    /// The GGUF metadata a GGUF copy of this model carries: a GGUF source's own, or built from a
    /// Llama config and its byte-level BPE tokenizer.
    pub fn gguf_metadata(&self) -> Result<Vec<(String, gguf::Value)>> {
        if let Some(m) = &self.gguf_metadata {
            return Ok(gguf::write::metadata_from_gguf(m));
        }
        let tokenizer = self.tokenizer.to_string(false).map_err(|e| candle_core::Error::Msg(format!("{}: tokenizer: {e}", self.source)))?;
        let name = Path::new(&self.source).file_name().and_then(|n| n.to_str()).unwrap_or(&self.source);
        gguf::write::metadata_for_llama(&self.config, &tokenizer, self.chat_template.as_deref(), name)
            .map_err(|e| e.context(self.source.clone()))
    }

    /// Checks that `out` is not (and does not hold) one of the files the model is read from.
    pub fn check_output(&self, out: &Path) -> Result<()> {
        let out_abs = std::path::absolute(out).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", out.display())))?;
        let out_real = out_abs.canonicalize().unwrap_or(out_abs.clone());
        for input in &self.inputs {
            let input = input.canonicalize().unwrap_or(input.clone());
            if input.starts_with(&out_real) || input.starts_with(&out_abs) {
                bail!("{}: the output is or holds the input {}; write the quantized model elsewhere", out.display(), input.display())
            }
        }
        Ok(())
    }

    /// `options` completed with this model's `config.json` and tokenizer files, after checking
    /// that `out` does not hold one of the files the model is read from.
    pub fn save_options_for(&self, out: &Path, options: &SaveOptions) -> Result<SaveOptions> {
        self.check_output(out)?;
        let mut options = options.clone();
        if options.config.as_object().is_none_or(|o| o.is_empty()) {
            options.config = self.config_json.clone();
        }
        if options.files.is_empty() {
            options.files = self.extra_files.clone();
        }
        Ok(options)
    }
}

/// Loads a Llama-family model from any source: float as stored, or int8 as saved when the
/// source is a quantized checkpoint.
pub fn load_decoder(source: &ModelSource, progress: OnProgress) -> Result<LanguageModel> {
    open_decoder(source)?.load(progress)
}

/// Loads a BERT sentence encoder from a Hugging Face folder or hub id.
pub fn load_bert(source: &ModelSource, progress: OnProgress) -> Result<SentenceEncoder> {
    let files = hf_files(source)?;
    let cfg = BertConfig::from_json(&read_json(&files.config)?).map_err(|e| e.context(format!("{source}")))?;
    let tokenizer = read_tokenizer(source, &files)?;
    let tensors = Arc::new(SafetensorsSource::open(&files.weights, files.index.as_deref())?);
    let vb = SourceBackend::new(tensors).with_progress("loading tensors", progress).into_var_builder();
    let model = Bert::load(&cfg, vb).map_err(|e| e.context(format!("building the model from {source}")))?;
    Ok(SentenceEncoder { model, tokenizer })
}

fn chat_template_from(path: &Path) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json.get("chat_template")?.as_str().map(str::to_string)
}
