//! Calibration files: the input ranges a float language model's linear layers saw on sample
//! text and the static int8 activation qparams chosen from them, kept as JSON so that static
//! int8 layers can be built later without running the calibration again.
//!
//! [`calibrate`] runs windows of tokens through a float [`CausalLm`] with an observer on every
//! linear layer's input; [`Calibration::save`] / [`Calibration::load`] write and read the file
//! (`docs/calibration-format.md`); [`Calibration::apply`] turns the selected layers of a model
//! with the same layers into static int8 ones.

use crate::checkpoint::ActivationSpec;
use crate::convert::{prepare, ConversionReport, ObserverFactory, QuantConfig, Quantizable};
use crate::lm::CausalLm;
use crate::nn::QLinearKind;
use crate::observer::{HistogramObserver, MinMaxObserver, Observer};
use crate::progress::Progress;
use crate::quant::{Granularity, QDType, QParams, QScheme, QSpec};
use candle_core::{bail, Module, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The `format` field of every calibration file.
pub const FORMAT: &str = "candle-quant-calibration";
/// The format's version.
pub const VERSION: u32 = 1;

/// How the activation range of each layer is chosen from what it saw.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObserverKind {
    /// The smallest and largest value seen.
    Minmax,
    /// Running averages of each batch's min and max (constant 0.01, PyTorch's default).
    MovingAverage,
    /// The range minimising the expected quantization error over a 2048-bin histogram.
    Histogram,
    /// The 0.01th and 99.99th percentiles of a 2048-bin histogram.
    Percentile,
}

/// How a layer's static input qparams are laid out.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StaticGranularity {
    /// One affine scale and zero point per layer, from the observer (PyTorch's static scheme);
    /// inputs outside the range are clamped.
    PerTensor,
    /// One symmetric scale per run of `size` input channels, the same for every token: the
    /// group's range is the smallest with at most `float_fraction` of the calibration inputs
    /// beyond it ([`crate::observer::GroupHistogram::clip`]), and inputs beyond it are multiplied in float.
    PerGroup {
        /// Input channels per scale.
        size: usize,
        /// Share of the calibration inputs allowed beyond each group's range.
        float_fraction: f64,
    },
}

impl Default for StaticGranularity {
    /// Per tensor, as PyTorch.
    fn default() -> Self {
        StaticGranularity::PerTensor
    }
}

impl StaticGranularity {
    fn validate(&self) -> Result<()> {
        if let StaticGranularity::PerGroup { size, float_fraction } = *self {
            if size == 0 {
                bail!("static activation groups need at least 1 input channel")
            }
            if !(0.0..1.0).contains(&float_fraction) {
                bail!("the share of inputs multiplied in float must be in [0, 1), got {float_fraction}")
            }
        }
        Ok(())
    }
}

/// Static activations: qint8, affine, per tensor (one scale and zero point per layer input).
const ACTIVATION: QSpec = QSpec { dtype: QDType::QInt8, scheme: QScheme::Affine, reduce_range: false, narrow_range: false };

fn minmax() -> Box<dyn Observer> {
    Box::new(MinMaxObserver::new(ACTIVATION))
}
fn moving_average() -> Box<dyn Observer> {
    Box::new(MinMaxObserver::moving_average(ACTIVATION, 0.01).unwrap_or_else(|_| MinMaxObserver::new(ACTIVATION)))
}
fn histogram() -> Box<dyn Observer> {
    match HistogramObserver::new(ACTIVATION, 2048) {
        Ok(h) => Box::new(h),
        Err(_) => minmax(),
    }
}
fn percentile() -> Box<dyn Observer> {
    match HistogramObserver::percentile(ACTIVATION, 99.99, 2048) {
        Ok(h) => Box::new(h),
        Err(_) => minmax(),
    }
}

impl ObserverKind {
    /// The observer factory for `prepare`.
    pub fn factory(self) -> ObserverFactory {
        match self {
            ObserverKind::Minmax => minmax,
            ObserverKind::MovingAverage => moving_average,
            ObserverKind::Histogram => histogram,
            ObserverKind::Percentile => percentile,
        }
    }
}

/// One linear layer of the calibrated model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerShape {
    /// Its name (VarBuilder path).
    pub name: String,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
}

/// What was calibrated: where the model came from and its linear layers, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelIdentity {
    /// The model as given (`--model`).
    pub source: String,
    /// Every linear layer, in visiting order.
    pub layers: Vec<LayerShape>,
}

/// One layer's calibrated input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerCalibration {
    /// Smallest input value seen (finite values only).
    pub min: f32,
    /// Largest input value seen.
    pub max: f32,
    /// The chosen activation scale.
    pub scale: f32,
    /// The chosen activation zero point.
    pub zero_point: i32,
    /// Per-group granularity: one symmetric scale (`[-127, 127]`, zero point 0) per group of
    /// input channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_scales: Option<Vec<f32>>,
    /// Each input channel's largest `|x|` (what SmoothQuant needs); kept in memory, not saved.
    #[serde(skip)]
    pub channel_absmax: Vec<f32>,
}

/// SmoothQuant factors folded into the float model before it was calibrated
/// ([`crate::smooth::smooth`]); applying the calibration folds them again first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smoothing {
    /// The migration strength `α` of `s_j = max|X_j|^α / max|W_j|^(1−α)`.
    pub alpha: f32,
    /// Per group, keyed by its first layer: one factor per input channel.
    pub factors: crate::smooth::SmoothingFactors,
    /// Layers left unsmoothed, and why.
    pub skipped: Vec<String>,
}

/// A calibration file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format's version, [`VERSION`].
    pub version: u32,
    /// The candle-quant version that wrote it.
    pub toolkit_version: String,
    /// The calibrated model.
    pub model: ModelIdentity,
    /// How ranges were chosen.
    pub observer: ObserverKind,
    /// Windows of text run through the model.
    pub windows: usize,
    /// Tokens in those windows.
    pub tokens: usize,
    /// The integer type and scheme of the per-tensor qparams.
    pub activation: ActivationSpec,
    /// Per tensor, or per group of input channels.
    #[serde(default)]
    pub granularity: StaticGranularity,
    /// Per layer name: the observed range and the chosen qparams.
    pub layers: BTreeMap<String, LayerCalibration>,
    /// SmoothQuant factors the model was smoothed with before calibration, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoothing: Option<Smoothing>,
}

fn identity(model: &mut (impl Quantizable + ?Sized), source: &str) -> Result<ModelIdentity> {
    let mut layers = Vec::new();
    model.visit_linears(&mut |l| {
        layers.push(LayerShape { name: l.name().to_string(), in_features: l.in_features(), out_features: l.out_features() });
        Ok(())
    })?;
    Ok(ModelIdentity { source: source.to_string(), layers })
}

/// Runs every window of `windows` (token ids, each starting with the model's BOS if it wants one)
/// through the float `model` with an `observer` on every linear layer's input (and, per group,
/// a [`crate::observer::GroupHistogram`]), calling `progress` after each, and returns the ranges and
/// qparams. The model is left float, as it was. Errors: no windows, a layer that is not float,
/// a layer that saw NaN or ±Inf (named), a layer that saw nothing.
pub fn calibrate<M: CausalLm + Quantizable>(
    model: &mut M,
    source: &str,
    observer: ObserverKind,
    granularity: StaticGranularity,
    windows: &[Vec<u32>],
    mut progress: impl FnMut(Progress),
) -> Result<Calibration> {
    if windows.iter().all(|w| w.is_empty()) {
        bail!("calibration needs at least one window of text; none was given")
    }
    let run = |model: &M| -> Result<()> {
        for (i, w) in windows.iter().filter(|w| !w.is_empty()).enumerate() {
            model.forward(w, &mut model.new_cache(), false)?;
            progress(Progress::items("calibrating windows", i + 1, windows.len()));
        }
        Ok(())
    };
    let (batches, tokens) = (windows.iter().filter(|w| !w.is_empty()).count(), windows.iter().map(Vec::len).sum());
    calibrate_with(model, source, observer, granularity, (batches, tokens), run)
}

/// [`calibrate`] for any model of yours: every input of `inputs` (`[…, in_features]` tensors,
/// e.g. batches of a calibration set) through `model.forward` with the observers attached, then
/// the ranges and qparams; [`Calibration::apply`] makes the layers static int8 (per group with
/// [`StaticGranularity::PerGroup`]). The model is left float. `source` names the model in the
/// file; `tokens` counts the inputs' rows.
///
/// ```
/// use candle_core::{DType, Device, Module, Result, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_quant::calibration::{calibrate_inputs, ObserverKind, StaticGranularity};
/// use candle_quant::{qlinear, quantizable, QLinear, QuantConfig};
///
/// struct Mlp { up: QLinear, down: QLinear }
/// quantizable!(Mlp { up, down });
/// impl Module for Mlp {
///     fn forward(&self, x: &Tensor) -> Result<Tensor> {
///         self.down.forward(&self.up.forward(x)?.gelu()?)
///     }
/// }
///
/// # fn main() -> Result<()> {
/// let vars = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
/// let mut mlp = Mlp { up: qlinear(64, 128, vb.pp("up"))?, down: qlinear(128, 64, vb.pp("down"))? };
/// let batches: Vec<Tensor> = (0..4).map(|_| Tensor::randn(0f32, 1.0, (8, 64), &Device::Cpu)).collect::<Result<_>>()?;
/// let groups = StaticGranularity::PerGroup { size: 32, float_fraction: 3e-3 };
/// let calibration = calibrate_inputs(&mut mlp, "mlp", ObserverKind::Minmax, groups, &batches, |_| {})?;
/// calibration.apply(&mut mlp, &QuantConfig::default())?;
/// assert_eq!(mlp.up.kind_name(), "int8-static");
/// # Ok(()) }
/// ```
pub fn calibrate_inputs<M: Module + Quantizable>(
    model: &mut M,
    source: &str,
    observer: ObserverKind,
    granularity: StaticGranularity,
    inputs: &[Tensor],
    mut progress: impl FnMut(Progress),
) -> Result<Calibration> {
    if inputs.is_empty() {
        bail!("calibration needs at least one input; none was given")
    }
    let rows = |t: &Tensor| t.elem_count() / t.dims().last().copied().unwrap_or(1).max(1);
    let run = |model: &M| -> Result<()> {
        for (i, x) in inputs.iter().enumerate() {
            model.forward(x).map_err(|e| e.context(format!("calibration input {i} of shape {:?}", x.dims())))?;
            progress(Progress::items("calibrating inputs", i + 1, inputs.len()));
        }
        Ok(())
    };
    calibrate_with(model, source, observer, granularity, (inputs.len(), inputs.iter().map(rows).sum()), run)
}

/// The body of [`calibrate`] and [`calibrate_inputs`]: observers on every linear layer's input
/// while `run` runs `batches` batches of `tokens` rows through the float model, then the ranges
/// and qparams; every layer back to float, also when `run` fails.
fn calibrate_with<M: Quantizable + ?Sized>(
    model: &mut M,
    source: &str,
    observer: ObserverKind,
    granularity: StaticGranularity,
    (batches, tokens): (usize, usize),
    run: impl FnOnce(&M) -> Result<()>,
) -> Result<Calibration> {
    granularity.validate()?;
    let ident = identity(model, source)?;
    let mut not_float = None;
    model.visit_linears(&mut |l| {
        if !matches!(l.kind(), QLinearKind::Float(_)) && not_float.is_none() {
            not_float = Some(format!("{} is {}", l.name(), l.kind_name()));
        }
        Ok(())
    })?;
    if let Some(what) = not_float {
        bail!("calibration needs a float model: layer {what}")
    }
    prepare(model, &QuantConfig::default().observer(observer.factory()))?;
    if let StaticGranularity::PerGroup { size, .. } = granularity {
        model.visit_linears(&mut |l| match l.kind() {
            QLinearKind::Observed(o) => {
                let o = o.clone().with_group_histogram(size).map_err(|e| e.context(format!("layer '{}'", l.name())))?;
                l.set_kind(QLinearKind::Observed(o))
            }
            _ => Ok(()),
        })?;
    }
    let ran = run(model);
    // Collect, then put every layer back to float (also when a window failed).
    let mut layers = BTreeMap::new();
    let mut failure = ran.err();
    model.visit_linears(&mut |l| {
        let QLinearKind::Observed(o) = l.kind() else { return Ok(()) };
        if failure.is_none() {
            let collected = (|| -> Result<LayerCalibration> {
                let bad = o.nonfinite_count()?;
                if bad > 0 {
                    bail!("layer '{}' saw {bad} non-finite input values (NaN or ±Inf) during calibration", l.name())
                }
                let p = o.activation_qparams().map_err(|e| e.context(format!("layer '{}'", l.name())))?;
                let (scale, zero_point) = (p.scales()[0], p.zero_points()[0]);
                let (qmin, qmax) = ACTIVATION.qrange();
                let representable = ((qmin - zero_point) as f32 * scale, (qmax - zero_point) as f32 * scale);
                let (min, max) = o.observed_range()?.unwrap_or(representable);
                let group_scales = match (granularity, o.group_histogram()?) {
                    (StaticGranularity::PerGroup { float_fraction, .. }, Some(h)) => Some(
                        h.clip(float_fraction)?
                            .into_iter()
                            .map(|c| QSpec::DYNAMIC_ACTIVATION.scale_zero_point_unchecked(-c, c).0)
                            .collect(),
                    ),
                    _ => None,
                };
                Ok(LayerCalibration { min, max, scale, zero_point, group_scales, channel_absmax: o.channel_absmax()? })
            })();
            match collected {
                Ok(c) => {
                    layers.insert(l.name().to_string(), c);
                }
                Err(e) => failure = Some(e),
            }
        }
        let float = o.linear().clone();
        l.set_kind(QLinearKind::Float(float))
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Calibration {
        format: FORMAT.into(),
        version: VERSION,
        toolkit_version: env!("CARGO_PKG_VERSION").into(),
        model: ident,
        observer,
        windows: batches,
        tokens,
        activation: ActivationSpec::of(&ACTIVATION),
        granularity,
        layers,
        smoothing: None,
    })
}

impl Calibration {
    /// Writes the file as JSON: to a temporary name beside `path`, renamed when complete.
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| candle_core::Error::Msg(format!("{}: {e}", path.display()));
        let json = serde_json::to_vec_pretty(self).map_err(|e| err(&e))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "calibration".into());
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        std::fs::write(&tmp, json).map_err(|e| err(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            std::fs::remove_file(&tmp).ok();
            err(&e)
        })
    }

    /// Reads and checks a calibration file: format and version, every layer's range and qparams
    /// (finite, a positive scale, the zero point inside the integer range). Errors name the file
    /// and the layer.
    pub fn load(path: &Path) -> Result<Calibration> {
        let err = |m: String| candle_core::Error::Msg(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let c: Calibration = serde_json::from_str(&text).map_err(|e| err(format!("not a calibration file: {e}")))?;
        if c.format != FORMAT || c.version != VERSION {
            return Err(err(format!("format '{}' version {}, expected '{FORMAT}' version {VERSION}", c.format, c.version)));
        }
        let spec = c.activation.spec();
        c.granularity.validate().map_err(|e| err(e.to_string()))?;
        for (name, l) in &c.layers {
            let Some(shape) = c.model.layers.iter().find(|s| &s.name == name) else {
                return Err(err(format!("layer '{name}' is not one of the calibrated model's layers")));
            };
            l.qparams(spec, c.granularity, shape.in_features).map_err(|e| err(format!("layer '{name}': {e}")))?;
            if !(l.min.is_finite() && l.max.is_finite() && l.min <= l.max) {
                return Err(err(format!("layer '{name}': observed range [{}, {}] is not a finite interval", l.min, l.max)));
            }
        }
        if let Some(s) = &c.smoothing {
            if let Some((name, _)) = s.factors.iter().find(|(_, f)| f.iter().any(|v| !(v.is_finite() && *v > 0.0))) {
                return Err(err(format!("layer '{name}': smoothing factors must be finite and positive")));
            }
        }
        Ok(c)
    }

    /// Makes every layer of `model` that `config` selects a static int8 layer with its
    /// calibrated activation qparams (weights per output channel). The model must have exactly
    /// the calibrated layers, with the same shapes; every check runs before any layer changes.
    pub fn apply(&self, model: &mut (impl Quantizable + ?Sized), config: &QuantConfig) -> Result<ConversionReport> {
        let spec = self.activation.spec();
        let ident = identity(model, &self.model.source)?;
        for (have, want) in ident.layers.iter().zip(&self.model.layers) {
            if have != want {
                bail!(
                    "the calibration is for another model: its layer '{}' is {}→{}, the model's layer '{}' is {}→{}",
                    want.name,
                    want.in_features,
                    want.out_features,
                    have.name,
                    have.in_features,
                    have.out_features
                )
            }
        }
        if ident.layers.len() != self.model.layers.len() {
            bail!(
                "the calibration is for another model: {} linear layers calibrated, the model has {}",
                self.model.layers.len(),
                ident.layers.len()
            )
        }
        let mut params = BTreeMap::new();
        for l in ident.layers.iter().filter(|l| config.selects(&l.name)) {
            let Some(c) = self.layers.get(&l.name) else { bail!("layer '{}' has no entry in the calibration", l.name) };
            let p = c.qparams(spec, self.granularity, l.in_features).map_err(|e| e.context(format!("layer '{}'", l.name)))?;
            params.insert(l.name.clone(), p);
        }
        crate::convert::convert_selected_in_parallel(model, config, |layer| match params.get(layer.name()) {
            Some(p) => layer.quantize_static(p.clone()),
            None => bail!("layer '{}' has no calibrated qparams", layer.name()),
        })
    }
}

impl Calibration {
    /// The static qparams calibrated for `layer` (an error naming it when there are none).
    pub fn qparams_for(&self, layer: &str) -> Result<QParams> {
        let Some(c) = self.layers.get(layer) else { bail!("layer '{layer}' has no entry in the calibration") };
        let Some(shape) = self.model.layers.iter().find(|s| s.name == layer) else {
            bail!("layer '{layer}' is not one of the calibrated model's layers")
        };
        c.qparams(self.activation.spec(), self.granularity, shape.in_features).map_err(|e| e.context(format!("layer '{layer}'")))
    }
}

impl LayerCalibration {
    /// The static qparams (checked) of a layer with `in_features` inputs: per tensor under
    /// `spec`, or per group (symmetric `[-127, 127]`, one scale per group).
    pub fn qparams(&self, spec: QSpec, granularity: StaticGranularity, in_features: usize) -> Result<QParams> {
        let per_tensor = QParams::new(spec, Granularity::PerTensor, vec![self.scale], vec![self.zero_point])?;
        match (granularity, &self.group_scales) {
            (StaticGranularity::PerTensor, None) => Ok(per_tensor),
            (StaticGranularity::PerGroup { size, .. }, Some(scales)) => {
                let groups = in_features.div_ceil(size.clamp(1, in_features.max(1)));
                if scales.len() != groups {
                    bail!("{} group scales, {in_features} inputs in groups of {size} need {groups}", scales.len())
                }
                QParams::new(QSpec::DYNAMIC_ACTIVATION, Granularity::PerGroup { size }, scales.clone(), vec![0; groups])
            }
            (StaticGranularity::PerTensor, Some(_)) => bail!("group scales in a per-tensor calibration"),
            (StaticGranularity::PerGroup { .. }, None) => bail!("no group scales in a per-group calibration"),
        }
    }
}
