//! Quantized checkpoints: int8 models saved as a Hugging Face–style folder and loaded back
//! without ever holding a float copy of a quantized weight.
//!
//! A checkpoint is `config.json` (the model's, plus a `quantization_config` object: see
//! [`QuantizationConfig`]) and safetensors files in which each int8 layer `L` has `L.weight`
//! (`I8`, `[out, in]`, values in `[-127, 127]`), `L.weight_scale` (`F16`, `[out, ⌈in / group⌉]`),
//! its float `L.bias`, and for static layers `L.input_scale` (`F32`, `[1]` or one per group) and
//! `L.input_zero_point` (`I32`, the same shape): `w[o, i] = weight[o, i] · weight_scale[o, i / group]`.
//! Every other tensor is stored as it was. `docs/checkpoint-format.md` is the full description.
//!
//! Saving: [`save_quantized`] for any [`Quantizable`] model in memory; [`write_checkpoint`]
//! streams any [`TensorSource`] (the `quantize` command streams a float checkpoint through a
//! [`PlannedSource`], one tensor in memory at a time). Loading: [`QuantizedCheckpoint::open`],
//! build the model on its [`QuantizedCheckpoint::var_builder`] with [`crate::QLinear::load`]
//! layers, then [`QuantizedCheckpoint::apply`] (or [`load_quantized`] for both).
//!
//! A model of your own, saved and loaded back:
//!
//! ```
//! use candle_core::{Device, DType, Module, Result, Tensor};
//! use candle_nn::VarBuilder;
//! use candle_quant::checkpoint::{load_quantized, save_quantized, SaveOptions};
//! use candle_quant::{quantize_dynamic, QLinear, QuantConfig, Quantizable};
//!
//! struct Mlp { up: QLinear, down: QLinear }
//!
//! impl Mlp {
//!     fn load(vb: VarBuilder) -> Result<Self> {
//!         Ok(Self { up: QLinear::load(64, 128, true, vb.pp("up"))?, down: QLinear::load(128, 64, false, vb.pp("down"))? })
//!     }
//!     fn forward(&self, x: &Tensor) -> Result<Tensor> {
//!         self.down.forward(&self.up.forward(x)?.relu()?)
//!     }
//! }
//!
//! impl Quantizable for Mlp {
//!     fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
//!         f(&mut self.up)?;
//!         f(&mut self.down)
//!     }
//! }
//!
//! # fn main() -> Result<()> {
//! let mut model = Mlp::load(VarBuilder::from_varmap(&candle_nn::VarMap::new(), DType::F32, &Device::Cpu))?;
//! quantize_dynamic(&mut model, &QuantConfig::default())?;
//! let dir = std::env::temp_dir().join(format!("mlp-int8-{}", std::process::id()));
//! save_quantized(&mut model, &dir, &SaveOptions::default())?;
//! let loaded = load_quantized(&dir, Mlp::load)?;
//! let x = Tensor::randn(0f32, 1.0, (2, 64), &Device::Cpu)?;
//! let diff = (model.forward(&x)? - loaded.forward(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert_eq!(diff, 0.0);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```

pub mod safetensors;
pub mod source;

pub use safetensors::{Dtype, Entry};
pub use source::{CheckpointBackend, PlannedSource, SafetensorsSource, TensorSource};

use crate::convert::{ConversionReport, Quantizable};
use crate::kernels::WeightQuant;
use crate::nn::{ActivationQuant, QLinear, QLinearKind};
use crate::quant::{Granularity, QDType, QParams, QScheme, QSpec};
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `quantization_config.quant_method` of this format.
pub const QUANT_METHOD: &str = "candle-quant";
/// `quantization_config.format_version` written, and the only one read.
pub const FORMAT_VERSION: u32 = 1;

/// The `quantization_config` object of a checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationConfig {
    /// Always [`QUANT_METHOD`].
    pub quant_method: String,
    /// Always [`FORMAT_VERSION`].
    pub format_version: u32,
    /// How int8 layers not listed in `layers` work.
    pub default: LayerScheme,
    /// Int8 layers whose scheme differs from `default`, by layer name.
    #[serde(default)]
    pub layers: BTreeMap<String, LayerScheme>,
    /// Linear layers kept in float (informative: they have no `weight_scale`).
    #[serde(default)]
    pub excluded: Vec<String>,
}

/// How one int8 layer computes. Group sizes count input channels per scale; `None` means one
/// scale per output channel (weights) or per token (activations).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum LayerScheme {
    /// Activations quantized on every call, symmetric int8 per token or per group; inputs with
    /// `|x|` above `outlier_threshold` multiplied in float.
    Dynamic {
        /// Input channels per weight scale (`None`: one per output channel).
        weight_group_size: Option<usize>,
        /// Input channels per activation scale (`None`: one per token).
        activation_group_size: Option<usize>,
        /// Inputs with `|x|` above it are multiplied in float (`None`: off).
        outlier_threshold: Option<f32>,
    },
    /// Float activations times int8 weights.
    WeightOnly {
        /// Input channels per weight scale (`None`: one per output channel).
        weight_group_size: Option<usize>,
    },
    /// Activations quantized with the calibrated `input_scale` / `input_zero_point` tensors,
    /// under `activation`'s integer range: one pair per tensor, or one per group of input
    /// channels (symmetric; inputs beyond a group's range multiplied in float).
    Static {
        /// Input channels per weight scale (`None`: one per output channel).
        weight_group_size: Option<usize>,
        /// The activations' integer range.
        activation: ActivationSpec,
        /// Input channels per activation scale (`None`: one for the whole input).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        activation_group_size: Option<usize>,
    },
}

/// The integer range of static activations (a [`QSpec`] in words).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationSpec {
    /// `qint8` or `quint8`.
    pub dtype: String,
    /// `affine` or `symmetric`.
    pub scheme: String,
    /// One bit less of range (PyTorch's `reduce_range`).
    pub reduce_range: bool,
    /// `[-127, 127]` instead of `[-128, 127]` (qint8).
    pub narrow_range: bool,
}

impl ActivationSpec {
    /// `spec` in words.
    pub fn of(spec: &QSpec) -> Self {
        let dtype = if spec.dtype == QDType::QUInt8 { "quint8" } else { "qint8" };
        let scheme = if spec.scheme == QScheme::Symmetric { "symmetric" } else { "affine" };
        Self { dtype: dtype.into(), scheme: scheme.into(), reduce_range: spec.reduce_range, narrow_range: spec.narrow_range }
    }

    /// The [`QSpec`] these words name (an error for an unknown dtype or scheme).
    pub fn spec(&self) -> Result<QSpec> {
        let dtype = match self.dtype.as_str() {
            "qint8" => QDType::QInt8,
            "quint8" => QDType::QUInt8,
            other => bail!("activation dtype '{other}' is not one of qint8, quint8"),
        };
        let scheme = match self.scheme.as_str() {
            "affine" => QScheme::Affine,
            "symmetric" => QScheme::Symmetric,
            other => bail!("activation scheme '{other}' is not one of affine, symmetric"),
        };
        Ok(QSpec::new(dtype, scheme).with_reduce_range(self.reduce_range).with_narrow_range(self.narrow_range))
    }
}

fn group_or_none(group: usize, k: usize) -> Option<usize> {
    (group < k).then_some(group)
}

impl LayerScheme {
    /// The scheme of an int8 layer; `None` for float, observing, fake-quant and ggml kinds.
    pub fn of(layer: &QLinear) -> Option<Self> {
        let k = layer.in_features();
        let (w, _) = layer.int8_parts()?;
        let weight_group_size = group_or_none(w.group_size(), k);
        Some(match layer.kind() {
            QLinearKind::Dynamic(d) => LayerScheme::Dynamic {
                weight_group_size,
                activation_group_size: group_or_none(d.activation_quant().group_size(k), k),
                outlier_threshold: d.outlier_threshold(),
            },
            QLinearKind::Static(s) => LayerScheme::Static {
                weight_group_size,
                activation: ActivationSpec::of(&s.activation_qparams().spec),
                activation_group_size: s.activation_group_size(),
            },
            _ => LayerScheme::WeightOnly { weight_group_size },
        })
    }

    /// The dynamic scheme of `config`'s weights and outlier threshold with activations `act`.
    pub fn dynamic(config: &crate::QuantConfig, act: ActivationQuant) -> Self {
        LayerScheme::Dynamic {
            weight_group_size: weight_group(config.weight),
            activation_group_size: match act {
                ActivationQuant::PerToken => None,
                ActivationQuant::PerGroup(g) => Some(g),
            },
            outlier_threshold: config.outlier_threshold,
        }
    }

    fn weight_group_size(&self) -> Option<usize> {
        match *self {
            LayerScheme::Dynamic { weight_group_size, .. }
            | LayerScheme::WeightOnly { weight_group_size }
            | LayerScheme::Static { weight_group_size, .. } => weight_group_size,
        }
    }

    /// How the weights of a layer with this scheme are quantized.
    pub fn weight_quant(&self) -> WeightQuant {
        self.weight_group_size().map_or(WeightQuant::PerChannel, WeightQuant::PerGroup)
    }

    /// Gives `layer`, already holding its int8 weights, this scheme; static activation
    /// qparams come from `source`.
    fn apply(&self, layer: &mut QLinear, source: &dyn TensorSource) -> Result<()> {
        let name = layer.name().to_string();
        let Some((w, _)) = layer.int8_parts() else { bail!("layer '{name}' holds no int8 weights to apply {self:?} to") };
        let k = layer.in_features();
        let want = self.weight_group_size().map_or(k, |g| g.clamp(1, k));
        if w.group_size() != want {
            // The scales' shape fixes the number of groups, not their size when `in` is not a
            // multiple of it (48 channels in 2 groups: of 32, or of 24): the config decides.
            if w.groups() != k.div_ceil(want) {
                bail!(
                    "layer '{name}': weight_scale has {} groups per row, quantization_config's weight_group_size {want} needs {}",
                    w.groups(),
                    k.div_ceil(want)
                )
            }
            layer.regroup_int8_weights(want)?;
        }
        match *self {
            LayerScheme::Dynamic { activation_group_size, outlier_threshold, .. } => {
                let act = activation_group_size.map_or(ActivationQuant::PerToken, ActivationQuant::PerGroup);
                layer.quantize_dynamic(act, self.weight_quant(), outlier_threshold)
            }
            LayerScheme::WeightOnly { .. } => layer.quantize_weight_only(self.weight_quant()),
            LayerScheme::Static { ref activation, activation_group_size, .. } => {
                let spec = activation.spec().map_err(|e| e.context(format!("layer '{name}'")))?;
                let (granularity, slots) = match activation_group_size {
                    Some(size) if size > 0 => (Granularity::PerGroup { size }, k.div_ceil(size)),
                    Some(_) => bail!("layer '{name}': activation_group_size must be at least 1"),
                    None => (Granularity::PerTensor, 1),
                };
                let scales = read_values::<f32>(source, &format!("{name}.input_scale"), Dtype::F32, slots)?;
                let zero_points = read_values::<i32>(source, &format!("{name}.input_zero_point"), Dtype::I32, slots)?;
                let params = QParams::new(spec, granularity, scales, zero_points)
                    .map_err(|e| e.context(source.describe(&format!("{name}.input_scale"))))?;
                layer.quantize_static(params)
            }
        }
    }
}

fn weight_group(how: WeightQuant) -> Option<usize> {
    match how {
        WeightQuant::PerChannel => None,
        WeightQuant::PerGroup(g) => Some(g),
    }
}

/// A tensor of `count` values of `dtype`.
fn read_values<T: candle_core::WithDType>(source: &dyn TensorSource, name: &str, dtype: Dtype, count: usize) -> Result<Vec<T>> {
    match source.entry(name) {
        None => bail!("{}: missing (a static layer needs it)", source.describe(name)),
        Some(e) if e.dtype != dtype || e.shape.iter().product::<usize>() != count => {
            bail!("{}: expected {count} {} value(s), found {} of shape {:?}", source.describe(name), dtype.name(), e.dtype.name(), e.shape)
        }
        Some(_) => source::read_tensor(source, name)?.flatten_all()?.to_vec1::<T>(),
    }
}

impl QuantizationConfig {
    /// A config whose default is `default`, listing exceptions and float layers.
    pub fn new(default: LayerScheme) -> Self {
        Self { quant_method: QUANT_METHOD.into(), format_version: FORMAT_VERSION, default, layers: BTreeMap::new(), excluded: vec![] }
    }

    /// The scheme of the int8 layer called `name`.
    pub fn scheme_for(&self, name: &str) -> &LayerScheme {
        self.layers.get(name).unwrap_or(&self.default)
    }

    /// Records `name`'s scheme (listed only when it differs from the default).
    pub fn set(&mut self, name: &str, scheme: LayerScheme) {
        if scheme != self.default {
            self.layers.insert(name.to_string(), scheme);
        }
    }

    /// Reads `quantization_config` from a parsed `config.json`; `None` when there is none.
    /// An object of another method, another version or an unknown kind is an error naming `file`.
    pub fn from_model_config(config: &serde_json::Value, file: &Path) -> Result<Option<Self>> {
        let Some(q) = config.get("quantization_config") else { return Ok(None) };
        let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("(none)");
        if method != QUANT_METHOD {
            bail!("{}: quantization_config.quant_method is '{method}': only '{QUANT_METHOD}' checkpoints can be read", file.display())
        }
        let version = q.get("format_version").and_then(|v| v.as_u64());
        if version != Some(FORMAT_VERSION as u64) {
            bail!(
                "{}: quantization_config.format_version {} is not supported (this build reads version {FORMAT_VERSION})",
                file.display(),
                version.map_or("(missing)".to_string(), |v| v.to_string())
            )
        }
        let parsed: Self = serde_json::from_value(q.clone())
            .map_err(|e| candle_core::Error::Msg(format!("{}: quantization_config: {e}", file.display())))?;
        Ok(Some(parsed))
    }

    /// Gives every int8 layer of `model` (built on `source` with [`QLinear::load`]) its scheme.
    /// Errors when a layer the checkpoint holds as int8 was not visited, is float in the
    /// model, or when the config names a layer that is not int8 in the checkpoint.
    pub fn apply(&self, model: &mut (impl Quantizable + ?Sized), source: &dyn TensorSource) -> Result<ConversionReport> {
        let int8: BTreeSet<String> =
            source.entries().iter().filter_map(|e| e.name.strip_suffix(".weight_scale")).map(str::to_string).collect();
        if let Some(name) = self.layers.keys().find(|n| !int8.contains(*n)) {
            bail!("quantization_config lists layer '{name}', which has no int8 weights in the checkpoint")
        }
        let mut report = ConversionReport::default();
        model.visit_linears(&mut |layer| {
            let name = layer.name().to_string();
            if !int8.contains(&name) {
                report.skipped.push(name);
                return Ok(());
            }
            if !layer.is_int8() {
                bail!(
                    "layer '{name}' is int8 in the checkpoint but {} in the model: build int8 layers with QLinear::load",
                    layer.kind_name()
                )
            }
            self.scheme_for(&name).apply(layer, source).map_err(|e| e.context(format!("layer '{name}'")))?;
            report.converted.push(name);
            Ok(())
        })?;
        let visited: BTreeSet<&String> = report.converted.iter().collect();
        if let Some(missed) = int8.iter().find(|n| !visited.contains(n)) {
            bail!("the checkpoint's int8 layer '{missed}' was not visited by the model's Quantizable::visit_linears: it would be unused")
        }
        Ok(report)
    }
}

/// How the selected layers of a model get int8 weights.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kind {
    /// [`LayerScheme::Dynamic`]: int8 weights and activations.
    Dynamic,
    /// [`LayerScheme::WeightOnly`]: int8 weights, float activations.
    WeightOnly,
}

/// For a model whose linear layers are `names`: the layers `config` selects with how their
/// weights are quantized, and the `quantization_config` describing the result.
pub fn plan_layers(
    names: &[String],
    config: &crate::QuantConfig,
    kind: Int8Kind,
) -> Result<(QuantizationConfig, Vec<(String, WeightQuant)>)> {
    // The default is the scheme of a layer no per-layer override matches.
    let scheme = |act: ActivationQuant| match kind {
        Int8Kind::Dynamic => LayerScheme::dynamic(config, act),
        Int8Kind::WeightOnly => LayerScheme::WeightOnly { weight_group_size: weight_group(config.weight) },
    };
    let mut quantization = QuantizationConfig::new(scheme(config.activation));
    let mut layers = vec![];
    for name in names {
        if config.selects(name) {
            quantization.set(name, scheme(config.activation_for(name)));
            layers.push((name.clone(), config.weight));
        } else {
            quantization.excluded.push(name.clone());
        }
    }
    if layers.is_empty() {
        bail!("no linear layer is selected for int8 (every one matches an exclude pattern of the QuantConfig, or none an include pattern)")
    }
    Ok((quantization, layers))
}

/// A quantized checkpoint folder, opened: its config and its tensors, read on demand.
pub struct QuantizedCheckpoint {
    dir: PathBuf,
    config: serde_json::Value,
    quantization: QuantizationConfig,
    source: Arc<SafetensorsSource>,
}

/// A JSON file (`config.json`, an index), parsed; errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: invalid JSON: {e}", path.display())))
}

/// The shard files a `model.safetensors.index.json` names, each once, in order; a name that is
/// not a plain file name (a path, `..`) is an error.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let json = read_json(index)?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else { bail!("{}: no 'weight_map' object", index.display()) };
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let Some(file) = file.as_str().filter(|f| !f.is_empty() && !f.contains('/') && !f.contains("..")) else {
            bail!("{}: tensor '{name}' names no plain shard file ({file})", index.display())
        };
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        bail!("{}: 'weight_map' lists no shard", index.display())
    }
    Ok(shards.into_iter().collect())
}

/// The weight files of a folder: `model.safetensors.index.json` and the shards it names, or
/// `model.safetensors`; a shard the index names but the folder lacks is an error.
pub fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let files: Vec<PathBuf> = shard_names(&index)?.iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            bail!("{}: weight shard missing (listed in {})", missing.display(), index.display())
        }
        return Ok((files, Some(index)));
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![single], None));
    }
    bail!("{}: neither model.safetensors nor model.safetensors.index.json found", dir.display())
}

impl QuantizedCheckpoint {
    /// Reads the config and the safetensors headers, and checks that every int8 weight has its
    /// scales (and the reverse) with matching shapes and dtypes.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let config = read_json(&path)?;
        let Some(quantization) = QuantizationConfig::from_model_config(&config, &path)? else {
            bail!("{}: no quantization_config: not a quantized checkpoint", path.display())
        };
        let (files, index) = weight_files(dir)?;
        let source = SafetensorsSource::open(&files, index.as_deref())?;
        check_int8_tensors(&source)?;
        Ok(Self { dir: dir.to_path_buf(), config, quantization, source: Arc::new(source) })
    }

    /// The checkpoint's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model's `config.json`, `quantization_config` included.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Its `quantization_config`: every layer's scheme.
    pub fn quantization(&self) -> &QuantizationConfig {
        &self.quantization
    }

    /// Its tensors, read one at a time.
    pub fn source(&self) -> Arc<dyn TensorSource> {
        self.source.clone()
    }

    /// A `VarBuilder` over the checkpoint (f32, CPU): float tensors widened as they are read,
    /// int8 layers read by [`QLinear::load`].
    pub fn var_builder(&self) -> VarBuilder<'static> {
        CheckpointBackend::new(self.source.clone()).into_var_builder()
    }

    /// Gives the int8 layers of a model built on [`Self::var_builder`] their saved schemes.
    pub fn apply(&self, model: &mut (impl Quantizable + ?Sized)) -> Result<ConversionReport> {
        self.quantization.apply(model, &*self.source).map_err(|e| e.context(format!("{}", self.dir.display())))
    }
}

/// Every `X.weight` of dtype `I8` has an `X.weight_scale` of `F16` `[out, groups]`, and every
/// `X.weight_scale` an `I8` weight.
pub fn check_int8_tensors(source: &dyn TensorSource) -> Result<()> {
    for e in source.entries() {
        if let Some(layer) = e.name.strip_suffix(".weight_scale") {
            let w = format!("{layer}.weight");
            match source.entry(&w) {
                Some(we) if we.dtype == Dtype::I8 => {}
                Some(we) => bail!("{}: has a weight_scale, so it must be I8, found {}", source.describe(&w), we.dtype.name()),
                None => bail!("{}: a weight_scale without its int8 weight '{w}'", source.describe(&e.name)),
            }
        }
        if e.dtype != Dtype::I8 {
            continue;
        }
        let Some(layer) = e.name.strip_suffix(".weight") else {
            bail!("{}: I8 tensors must be layer weights (NAME.weight)", source.describe(&e.name))
        };
        let s = format!("{layer}.weight_scale");
        let Some(se) = source.entry(&s) else { bail!("{}: missing: the int8 weight '{}' needs its scales", source.describe(&s), e.name) };
        let (&[n, k], &[sn, groups]) = (e.shape.as_slice(), se.shape.as_slice()) else {
            bail!("{}: weight {:?} and scales {:?} must both be 2-D", source.describe(&s), e.shape, se.shape)
        };
        if se.dtype != Dtype::F16 || sn != n || groups == 0 || groups > k || k.div_ceil(k.div_ceil(groups)) != groups {
            bail!(
                "{}: expected F16 scales of shape [{n}, G] with G groups covering {k} input channels, found {} {:?}",
                source.describe(&s),
                se.dtype.name(),
                se.shape
            )
        }
    }
    Ok(())
}

/// Opens the checkpoint in `dir`, builds the model with `build` on its `VarBuilder`, and applies
/// the saved schemes: the whole load of a user's own model.
pub fn load_quantized<M: Quantizable>(dir: &Path, build: impl FnOnce(VarBuilder<'static>) -> Result<M>) -> Result<M> {
    let ckpt = QuantizedCheckpoint::open(dir)?;
    let mut model = build(ckpt.var_builder()).map_err(|e| e.context(format!("building the model from {}", dir.display())))?;
    ckpt.apply(&mut model)?;
    Ok(model)
}

/// How a checkpoint is written.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// The model's `config.json` (an object); `quantization_config` is added to it.
    pub config: serde_json::Value,
    /// Other files to write beside it, `(file name, contents)`: `tokenizer.json`,
    /// `tokenizer_config.json` (chat template), …
    pub files: Vec<(String, Vec<u8>)>,
    /// Safetensors files hold at most this many bytes of tensors (one larger tensor gets a file
    /// of its own); more than one file gets a `model.safetensors.index.json`.
    pub max_shard_bytes: u64,
    /// Replace `dir` if it exists (only once the new checkpoint is complete).
    pub overwrite: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self { config: serde_json::json!({}), files: vec![], max_shard_bytes: 2_000_000_000, overwrite: false }
    }
}

/// Where writing a checkpoint has come: tensors and bytes written of the totals.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteProgress {
    /// Tensors written so far.
    pub tensors: usize,
    /// Tensors in the checkpoint.
    pub total_tensors: usize,
    /// Bytes of tensor data written so far.
    pub bytes: u64,
    /// Bytes of tensor data in the checkpoint.
    pub total_bytes: u64,
}

/// What was written.
#[derive(Debug, Clone, Default)]
pub struct WriteReport {
    /// The safetensors files, in order.
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
}

/// Writes every tensor of `source` (in its order) and `config.json` with `quantization` to
/// `dir`: into a hidden sibling folder first, renamed to `dir` once complete, so an interrupted
/// run leaves nothing under `dir`'s name. An existing `dir` is an error unless
/// `options.overwrite`.
pub fn write_checkpoint(
    dir: &Path,
    source: &dyn TensorSource,
    quantization: &QuantizationConfig,
    options: &SaveOptions,
    mut progress: impl FnMut(WriteProgress),
) -> Result<WriteReport> {
    if dir.exists() && !options.overwrite {
        bail!("{}: already exists (choose another folder, or set SaveOptions::overwrite to replace it)", dir.display())
    }
    let serde_json::Value::Object(mut config) = options.config.clone() else { bail!("the model config to save must be a JSON object") };
    config.insert("quantization_config".into(), serde_json::to_value(quantization).map_err(|e| candle_core::Error::Msg(e.to_string()))?);
    let name =
        dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| candle_core::Error::Msg(format!("{}: not a folder name", dir.display())))?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| candle_core::Error::Msg(format!("{}: cannot create: {e}", tmp.display())))?;
    let written = write_into(&tmp, source, &serde_json::Value::Object(config), options, &mut progress).and_then(|report| {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| candle_core::Error::Msg(format!("{}: cannot replace: {e}", dir.display())))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| candle_core::Error::Msg(format!("renaming {} to {}: {e}", tmp.display(), dir.display())))?;
        Ok(WriteReport { files: report.files.iter().map(|f| dir.join(f.file_name().unwrap_or_default())).collect(), ..report })
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

fn write_into(
    tmp: &Path,
    source: &dyn TensorSource,
    config: &serde_json::Value,
    options: &SaveOptions,
    progress: &mut impl FnMut(WriteProgress),
) -> Result<WriteReport> {
    let report = write_shards(tmp, source, options.max_shard_bytes, progress)?;
    let write = |file: &str, bytes: &[u8]| {
        std::fs::write(tmp.join(file), bytes).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.join(file).display())))
    };
    for (file, bytes) in &options.files {
        write(file, bytes)?;
    }
    write("config.json", serde_json::to_string_pretty(config).map_err(|e| candle_core::Error::Msg(e.to_string()))?.as_bytes())?;
    Ok(report)
}

/// Writes every tensor of `source`, in its order, into `dir` as safetensors files of at most
/// `max_shard_bytes` of tensors each (a larger tensor alone in its file): `model.safetensors`,
/// or `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. One tensor is in
/// memory at a time.
pub fn write_shards(
    dir: &Path,
    source: &dyn TensorSource,
    max_shard_bytes: u64,
    progress: &mut impl FnMut(WriteProgress),
) -> Result<WriteReport> {
    let entries = source.entries();
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut size = 0u64;
    for (i, e) in entries.iter().enumerate() {
        match shards.last_mut() {
            Some(s) if size + e.nbytes() <= max_shard_bytes => s.push(i),
            _ => {
                shards.push(vec![i]);
                size = 0;
            }
        }
        size += e.nbytes();
    }
    if shards.is_empty() {
        bail!("the model has no tensors to save")
    }
    let total = WriteProgress { total_tensors: entries.len(), total_bytes: entries.iter().map(Entry::nbytes).sum(), ..Default::default() };
    let mut done = total;
    progress(done);
    let n = shards.len();
    let names: Vec<String> =
        if n == 1 { vec!["model.safetensors".into()] } else { (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect() };
    let mut weight_map = serde_json::Map::new();
    for (shard, file) in shards.iter().zip(&names) {
        let part: Vec<Entry> = shard.iter().map(|&i| entries[i].clone()).collect();
        safetensors::write_file(&dir.join(file), &part, |i, buf| {
            *buf = source.read_bytes(&part[i].name)?;
            if i > 0 {
                done.tensors += 1;
                done.bytes += part[i - 1].nbytes();
                progress(done);
            }
            Ok(())
        })?;
        if let Some(last) = part.last() {
            done.tensors += 1;
            done.bytes += last.nbytes();
            progress(done);
        }
        for e in &part {
            weight_map.insert(e.name.clone(), file.clone().into());
        }
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total.total_bytes}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, index.to_string()).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    }
    Ok(WriteReport { files: names.iter().map(|f| dir.join(f)).collect(), tensor_bytes: total.total_bytes })
}

/// Tensors held in memory (what [`save_quantized`] collects from a model).
struct MemorySource {
    entries: Vec<Entry>,
    data: HashMap<String, Vec<u8>>,
}

impl TensorSource for MemorySource {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        self.data.get(name).cloned().ok_or_else(|| candle_core::Error::Msg(format!("no tensor '{name}' in the model")))
    }

    fn describe(&self, name: &str) -> String {
        format!("tensor '{name}' of the model")
    }
}

impl MemorySource {
    fn push(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Result<()> {
        if self.data.contains_key(&name) {
            bail!("the model has two tensors named '{name}'")
        }
        self.entries.push(Entry { name: name.clone(), dtype, shape });
        self.data.insert(name, bytes);
        Ok(())
    }

    fn push_tensor(&mut self, name: String, t: &Tensor) -> Result<()> {
        let dtype = Dtype::from_candle(t.dtype()).map_err(|e| e.context(format!("tensor '{name}'")))?;
        let bytes = tensor_bytes(t)?;
        self.push(name, dtype, t.dims().to_vec(), bytes)
    }
}

/// A tensor's values as little-endian bytes.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::I32 => t.to_vec1::<i32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => bail!("tensors of dtype {other:?} cannot be saved"),
    })
}

/// Saves a model in memory — dynamic, weight-only and static (calibrated or QAT-converted) int8
/// layers, float layers, and the other tensors its [`Quantizable::visit_tensors`] shows — as a
/// checkpoint in `dir` (see [`write_checkpoint`]). Observing and fake-quant layers must be
/// converted first; ggml layers cannot be saved. The serialized tensors are collected before
/// writing (the model's size again in memory); large float models go through the `quantize`
/// command, which streams.
pub fn save_quantized(model: &mut (impl Quantizable + ?Sized), dir: &Path, options: &SaveOptions) -> Result<WriteReport> {
    let mut mem = MemorySource { entries: vec![], data: HashMap::new() };
    let mut schemes: Vec<(String, LayerScheme)> = vec![];
    let mut excluded = vec![];
    model.visit_tensors(&mut |name, t| mem.push_tensor(name.to_string(), t))?;
    model.visit_linears(&mut |layer| {
        let name = layer.name().to_string();
        if let Some(bias) = layer.bias_values()? {
            mem.push(format!("{name}.bias"), Dtype::F32, vec![bias.len()], bias.iter().flat_map(|v| v.to_le_bytes()).collect())?;
        }
        match (LayerScheme::of(layer), layer.kind()) {
            (Some(scheme), kind) => {
                let (w, _) = layer.int8_parts().ok_or_else(|| candle_core::Error::Msg(format!("layer '{name}' lost its weights")))?;
                let rows = w.to_rows();
                let (n, k, g) = (rows.out_features(), rows.in_features(), rows.groups());
                mem.push(format!("{name}.weight"), Dtype::I8, vec![n, k], rows.values().iter().map(|&v| v as u8).collect())?;
                mem.push(
                    format!("{name}.weight_scale"),
                    Dtype::F16,
                    vec![n, g],
                    rows.scales().iter().flat_map(|s| s.to_le_bytes()).collect(),
                )?;
                if let QLinearKind::Static(s) = kind {
                    let p = s.activation_qparams();
                    let (scales, zero_points) = (&p.scales, &p.zero_points);
                    let bytes = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
                    mem.push(format!("{name}.input_scale"), Dtype::F32, vec![scales.len()], bytes)?;
                    let bytes = zero_points.iter().flat_map(|v| v.to_le_bytes()).collect();
                    mem.push(format!("{name}.input_zero_point"), Dtype::I32, vec![zero_points.len()], bytes)?;
                }
                schemes.push((name, scheme));
            }
            (None, QLinearKind::Float(l)) => {
                mem.push_tensor(format!("{name}.weight"), l.weight())?;
                excluded.push(name);
            }
            (None, _) => bail!("layer '{name}' is {}: convert it (or keep it float) before saving", layer.kind_name()),
        }
        Ok(())
    })?;
    // The most common scheme is the default; the others are listed.
    let Some(default) = most_common(schemes.iter().map(|(_, s)| s)) else { bail!("the model has no int8 layer to save") };
    let mut quantization = QuantizationConfig::new(default);
    for (name, scheme) in schemes {
        quantization.set(&name, scheme);
    }
    quantization.excluded = excluded;
    write_checkpoint(dir, &mem, &quantization, options, |_| {})
}

fn most_common<'a>(schemes: impl Iterator<Item = &'a LayerScheme>) -> Option<LayerScheme> {
    let mut counts: Vec<(&LayerScheme, usize)> = vec![];
    for s in schemes {
        match counts.iter_mut().find(|(c, _)| *c == s) {
            Some((_, n)) => *n += 1,
            None => counts.push((s, 1)),
        }
    }
    // The first of the most common wins a tie.
    counts.iter().enumerate().max_by_key(|&(i, &(_, n))| (n, std::cmp::Reverse(i))).map(|(_, (s, _))| (*s).clone())
}
