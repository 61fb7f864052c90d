//! The `quantization_config` of an int8 folder: how each int8 layer computes
//! ([`LayerScheme`]), and which layers a [`QuantConfig`](crate::QuantConfig) makes int8.

use crate::convert::{ConversionReport, Quantizable};
use crate::kernels::WeightQuant;
use crate::nn::{ActivationQuant, QLinear, QLinearKind};
use crate::quant::{Granularity, QDType, QParams, QScheme, QSpec};
use crate::source::{read_tensor, Dtype, TensorSource};
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `quantization_config.quant_method` of this format.
pub const QUANT_METHOD: &str = "candle-quant";
/// The newest `quantization_config.format_version`: 2 adds int4 weights (`weight_bits: 4`), 3
/// int8 embedding tables (`tables`). A folder is written with the oldest version that holds
/// it, so one without either is still version 1, which older builds read; versions 1 to 3
/// are read.
pub const FORMAT_VERSION: u32 = 3;

/// The `quantization_config` object of a checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointScheme {
    /// Always [`QUANT_METHOD`].
    pub quant_method: String,
    /// 1; 2 when some layer has int4 weights; 3 ([`FORMAT_VERSION`]) when `tables` is not empty.
    pub format_version: u32,
    /// How int8 layers not listed in `layers` work.
    pub default: LayerScheme,
    /// Int8 layers whose scheme differs from `default`, by layer name.
    #[serde(default)]
    pub layers: BTreeMap<String, LayerScheme>,
    /// Linear layers kept in float (informative: they have no `weight_scale`).
    #[serde(default)]
    pub excluded: Vec<String>,
    /// Lookup tables stored as int8 rows (`NAME.weight` `I8 [rows, width]` with one `f16`
    /// scale per row in `NAME.weight_scale`), not linear layers: an untied model's token
    /// embeddings once its `lm_head` is quantized (version 3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
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
        /// `affine` (a scale and an offset per group) or `symmetric`; absent means symmetric.
        #[serde(default = "symmetric", skip_serializing_if = "is_symmetric")]
        activation_scheme: QScheme,
        /// 8, or 4 for int4 weights (version 2); absent means 8.
        #[serde(default = "eight", skip_serializing_if = "is_eight")]
        weight_bits: u32,
        /// Int4 weights with a zero point per group (`L.weight_zero_point`); absent means none.
        #[serde(default, skip_serializing_if = "is_false")]
        weight_zero_point: bool,
    },
    /// Float activations times int8 (or int4) weights.
    WeightOnly {
        /// Input channels per weight scale (`None`: one per output channel).
        weight_group_size: Option<usize>,
        /// 8, or 4 for int4 weights (version 2); absent means 8.
        #[serde(default = "eight", skip_serializing_if = "is_eight")]
        weight_bits: u32,
        /// Int4 weights with a zero point per group; absent means none.
        #[serde(default, skip_serializing_if = "is_false")]
        weight_zero_point: bool,
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

/// The integer range of static activations: a [`QSpec`] as it is written in files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationSpec {
    /// `qint8` or `quint8`.
    pub dtype: QDType,
    /// `affine` or `symmetric`.
    pub scheme: QScheme,
    /// One bit less of range (PyTorch's `reduce_range`).
    pub reduce_range: bool,
    /// `[-127, 127]` instead of `[-128, 127]` (qint8).
    pub narrow_range: bool,
}

impl ActivationSpec {
    /// `spec` as written.
    pub fn of(spec: &QSpec) -> Self {
        Self { dtype: spec.dtype, scheme: spec.scheme, reduce_range: spec.reduce_range, narrow_range: spec.narrow_range }
    }

    /// The [`QSpec`] it describes.
    pub fn spec(&self) -> QSpec {
        QSpec::new(self.dtype, self.scheme).with_reduce_range(self.reduce_range).with_narrow_range(self.narrow_range)
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
        let (weight_bits, weight_zero_point) = (w.bits(), w.has_zero_points());
        Some(match layer.kind() {
            QLinearKind::Dynamic(d) => LayerScheme::Dynamic {
                weight_group_size,
                activation_group_size: group_or_none(d.activation_quant().group_size(k), k),
                outlier_threshold: d.outlier_threshold(),
                activation_scheme: scheme_of(d.activation_quant()),
                weight_bits,
                weight_zero_point,
            },
            QLinearKind::Static(s) => LayerScheme::Static {
                weight_group_size,
                activation: ActivationSpec::of(&s.activation_qparams().spec),
                activation_group_size: s.activation_group_size(),
            },
            _ => LayerScheme::WeightOnly { weight_group_size, weight_bits, weight_zero_point },
        })
    }

    /// The dynamic scheme of weights `weight` and activations `act`, with `config`'s outlier
    /// threshold.
    pub fn dynamic(config: &crate::QuantConfig, act: ActivationQuant, weight: WeightQuant) -> Self {
        LayerScheme::Dynamic {
            weight_group_size: weight_group(weight),
            activation_group_size: act.group(),
            outlier_threshold: config.outlier_threshold,
            activation_scheme: scheme_of(act),
            weight_bits: weight.bits(),
            weight_zero_point: has_zero_point(weight),
        }
    }

    /// The weight-only scheme of weights `weight`.
    pub fn weight_only(weight: WeightQuant) -> Self {
        LayerScheme::WeightOnly {
            weight_group_size: weight_group(weight),
            weight_bits: weight.bits(),
            weight_zero_point: has_zero_point(weight),
        }
    }

    fn weight_group_size(&self) -> Option<usize> {
        match *self {
            LayerScheme::Dynamic { weight_group_size, .. }
            | LayerScheme::WeightOnly { weight_group_size, .. }
            | LayerScheme::Static { weight_group_size, .. } => weight_group_size,
        }
    }

    /// `(bits, zero point)` of the weights.
    fn weight_bits(&self) -> (u32, bool) {
        match *self {
            LayerScheme::Dynamic { weight_bits, weight_zero_point, .. }
            | LayerScheme::WeightOnly { weight_bits, weight_zero_point, .. } => (weight_bits, weight_zero_point),
            LayerScheme::Static { .. } => (8, false),
        }
    }

    /// How the weights of a layer with this scheme are quantized.
    pub fn weight_quant(&self) -> WeightQuant {
        match self.weight_bits() {
            // Int4 in one group per row: a group at least as wide as any row.
            (4, zero_point) => WeightQuant::Int4 { group: self.weight_group_size().unwrap_or(usize::MAX), zero_point },
            _ => self.weight_group_size().map_or(WeightQuant::PerChannel, WeightQuant::PerGroup),
        }
    }

    /// The format version a layer with this scheme needs: 2 for int4 weights.
    fn version(&self) -> u32 {
        if self.weight_bits().0 == 4 {
            2
        } else {
            1
        }
    }

    /// Gives `layer`, already holding its int8 weights, this scheme; static activation
    /// qparams come from `source`.
    fn apply(&self, layer: &mut QLinear, source: &dyn TensorSource) -> Result<()> {
        let name = layer.name().to_string();
        let Some((w, _)) = layer.int8_parts() else { bail!("layer '{name}' holds no int8 weights to apply {self:?} to") };
        let k = layer.in_features();
        let (bits, zero_point) = self.weight_bits();
        if !matches!(bits, 4 | 8) {
            bail!("layer '{name}': weight_bits {bits} is not supported (4 or 8)")
        }
        if (w.bits(), w.has_zero_points()) != (bits, zero_point) {
            bail!(
                "layer '{name}': quantization_config says int{bits} weights{}, the checkpoint's tensors hold int{}{}",
                if zero_point { " with zero points" } else { "" },
                w.bits(),
                if w.has_zero_points() { " with zero points" } else { "" }
            )
        }
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
            LayerScheme::Dynamic { activation_group_size, outlier_threshold, activation_scheme, .. } => {
                let act = ActivationQuant::with_group(activation_scheme == QScheme::Affine, activation_group_size);
                layer.quantize_dynamic(act, self.weight_quant(), outlier_threshold)
            }
            LayerScheme::WeightOnly { .. } => layer.quantize_weight_only(self.weight_quant()),
            LayerScheme::Static { activation, activation_group_size, .. } => {
                let spec = activation.spec();
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

fn symmetric() -> QScheme {
    QScheme::Symmetric
}

fn eight() -> u32 {
    8
}

fn is_eight(bits: &u32) -> bool {
    *bits == 8
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn has_zero_point(how: WeightQuant) -> bool {
    matches!(how, WeightQuant::Int4 { zero_point: true, .. })
}

fn is_symmetric(scheme: &QScheme) -> bool {
    *scheme == QScheme::Symmetric
}

fn scheme_of(act: ActivationQuant) -> QScheme {
    if act.is_affine() {
        QScheme::Affine
    } else {
        QScheme::Symmetric
    }
}

fn weight_group(how: WeightQuant) -> Option<usize> {
    match how {
        WeightQuant::PerChannel => None,
        WeightQuant::PerGroup(g) | WeightQuant::Int4 { group: g, .. } => Some(g),
    }
}

/// A tensor of `count` values of `dtype`.
fn read_values<T: candle_core::WithDType>(source: &dyn TensorSource, name: &str, dtype: Dtype, count: usize) -> Result<Vec<T>> {
    match source.entry(name) {
        None => bail!("{}: missing (a static layer needs it)", source.describe(name)),
        Some(e) if e.dtype != dtype || e.shape.iter().product::<usize>() != count => {
            bail!("{}: expected {count} {} value(s), found {} of shape {:?}", source.describe(name), dtype.name(), e.dtype.name(), e.shape)
        }
        Some(_) => read_tensor(source, name)?.flatten_all()?.to_vec1::<T>(),
    }
}

impl CheckpointScheme {
    /// A config whose default is `default`, listing exceptions and float layers.
    pub fn new(default: LayerScheme) -> Self {
        let format_version = default.version();
        Self { quant_method: QUANT_METHOD.into(), format_version, default, layers: BTreeMap::new(), excluded: vec![], tables: vec![] }
    }

    /// Whether `name` is an int8 lookup table (listed in `tables`), not a layer.
    pub fn is_table(&self, name: &str) -> bool {
        self.tables.iter().any(|t| t == name)
    }

    /// Input channels per weight scale of the stored layer or table `name`, `k` inputs wide: its
    /// scheme's group; a table has no scheme, so the group its `weight_scale` `[rows, G]`
    /// implies, `⌈k / G⌉`.
    pub fn weight_group(&self, source: &dyn TensorSource, name: &str, k: usize) -> usize {
        if !self.is_table(name) {
            return self.scheme_for(name).weight_quant().group_in(k);
        }
        let groups = source.entry(&format!("{name}.weight_scale")).and_then(|s| s.shape.get(1).copied()).unwrap_or(1);
        k.div_ceil(groups.max(1))
    }

    /// Records `name` as an int8 lookup table (format version 3).
    pub fn add_table(&mut self, name: &str) {
        if !self.is_table(name) {
            self.tables.push(name.to_string());
            self.format_version = self.format_version.max(3);
        }
    }

    /// The scheme of the int8 layer called `name`.
    pub fn scheme_for(&self, name: &str) -> &LayerScheme {
        self.layers.get(name).unwrap_or(&self.default)
    }

    /// Records `name`'s scheme (listed only when it differs from the default).
    pub fn set(&mut self, name: &str, scheme: LayerScheme) {
        if scheme != self.default {
            self.format_version = self.format_version.max(scheme.version());
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
        if !version.is_some_and(|v| (1..=FORMAT_VERSION as u64).contains(&v)) {
            bail!(
                "{}: quantization_config.format_version {} is not supported (this build reads versions 1 to {FORMAT_VERSION})",
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
        let mut int8: BTreeSet<String> =
            source.entries().iter().filter_map(|e| e.name.strip_suffix(".weight_scale")).map(str::to_string).collect();
        if let Some(name) = self.layers.keys().chain(&self.tables).find(|n| !int8.contains(*n)) {
            bail!("quantization_config lists layer '{name}', which has no int8 weights in the checkpoint")
        }
        // Tables are read by the model's loader (rows looked up), not converted here.
        for table in &self.tables {
            int8.remove(table);
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
#[cfg_attr(not(feature = "hub"), allow(dead_code))]
pub fn plan_layers(
    names: &[String],
    config: &crate::QuantConfig,
    kind: Int8Kind,
) -> Result<(CheckpointScheme, Vec<(String, WeightQuant)>)> {
    // The default is the scheme of a layer no per-layer override matches.
    let scheme = |act: ActivationQuant, weight: WeightQuant| match kind {
        Int8Kind::Dynamic => LayerScheme::dynamic(config, act, weight),
        Int8Kind::WeightOnly => LayerScheme::weight_only(weight),
    };
    let mut quantization = CheckpointScheme::new(scheme(config.activation, config.weight));
    let mut layers = vec![];
    for name in names {
        if config.selects(name) {
            quantization.set(name, scheme(config.activation_for(name), config.weight_for(name)));
            layers.push((name.clone(), config.weight_for(name)));
        } else {
            quantization.excluded.push(name.clone());
        }
    }
    if layers.is_empty() {
        bail!("no linear layer is selected for int8 (every one matches an exclude pattern of the QuantConfig, or none an include pattern)")
    }
    Ok((quantization, layers))
}
