//! Conversion workflows over any model that exposes its linear layers by name:
//! `quantize_dynamic`; `prepare` → run calibration data → `convert`; `prepare_qat` → train →
//! `convert`. The PyTorch verbs, as a visitor over [`QLinear`]s (no global hooks).

mod named;
mod pattern;

pub use named::{Named, NamedTensors};
pub use pattern::matches;

use crate::kernels::WeightQuant;
use crate::nn::{ActivationQuant, QLinear, QLinearKind};
use crate::observer::{MinMaxObserver, Observer};
use crate::progress::Progress;
use crate::quant::{QDType, QScheme, QSpec};
use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

/// A model whose linear layers can be visited, each with its full name.
pub trait Quantizable {
    /// Calls `f` on every [`QLinear`] of the model, in a fixed order.
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()>;

    /// Calls `f` with the checkpoint name and value of every other tensor the model holds
    /// (embeddings, norms), so that [`crate::checkpoint::save_quantized`] can save the whole
    /// model. The default shows none.
    fn visit_tensors(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        let _ = f;
        Ok(())
    }

    /// Calls `f` on every lookup table the model holds as int8 rows (a [`QLinear`] named as
    /// the checkpoint names the table, whose rows are read, never multiplied), so that
    /// [`crate::checkpoint::save_quantized`] can save it. The default shows none.
    fn visit_tables(&self, f: &mut dyn FnMut(&QLinear) -> Result<()>) -> Result<()> {
        let _ = f;
        Ok(())
    }
}

impl Quantizable for QLinear {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        f(self)
    }
}

impl<T: Quantizable> Quantizable for [T] {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.visit_linears(f))
    }

    fn visit_tensors(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        self.iter().try_for_each(|m| m.visit_tensors(f))
    }

    fn visit_tables(&self, f: &mut dyn FnMut(&QLinear) -> Result<()>) -> Result<()> {
        self.iter().try_for_each(|m| m.visit_tables(f))
    }
}

impl<T: Quantizable> Quantizable for Vec<T> {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        self.as_mut_slice().visit_linears(f)
    }

    fn visit_tensors(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        self.as_slice().visit_tensors(f)
    }

    fn visit_tables(&self, f: &mut dyn FnMut(&QLinear) -> Result<()>) -> Result<()> {
        self.as_slice().visit_tables(f)
    }
}

impl<T: Quantizable> Quantizable for Option<T> {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        self.as_mut().map_or(Ok(()), |m| m.visit_linears(f))
    }

    fn visit_tensors(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        self.as_ref().map_or(Ok(()), |m| m.visit_tensors(f))
    }

    fn visit_tables(&self, f: &mut dyn FnMut(&QLinear) -> Result<()>) -> Result<()> {
        self.as_ref().map_or(Ok(()), |m| m.visit_tables(f))
    }
}

/// The linear layers a model leaves in float: every 2-D `P.weight` among `tensors` (the names and
/// shapes of the checkpoint the model was loaded from, e.g. a `VarMap`'s or a safetensors file's)
/// whose `P` the model's [`Quantizable::visit_linears`] never reaches, or reaches as a float
/// layer — a field forgotten in `visit_linears` (or [`quantizable!`](crate::quantizable)) shows up
/// here instead of silently staying float. `ignore` holds patterns (`*` = anything) for 2-D
/// tensors that are not linear layers (embedding tables) or that are meant to stay float.
pub fn float_linears<'a>(
    model: &mut (impl Quantizable + ?Sized),
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ignore: &[&str],
) -> Result<Vec<String>> {
    let mut quantized = std::collections::HashSet::new();
    model.visit_linears(&mut |layer| {
        if !matches!(layer.kind(), QLinearKind::Float(_)) {
            quantized.insert(layer.name().to_string());
        }
        Ok(())
    })?;
    let mut left: Vec<String> = tensors
        .into_iter()
        .filter(|(_, shape)| shape.len() == 2)
        .filter_map(|(name, _)| name.strip_suffix(".weight"))
        .filter(|layer| !quantized.contains(*layer) && !ignore.iter().any(|p| matches(p, layer)))
        .map(str::to_string)
        .collect();
    left.sort();
    Ok(left)
}

/// [`float_linears`] as a check: an error naming every layer left in float.
pub fn ensure_quantized<'a>(
    model: &mut (impl Quantizable + ?Sized),
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ignore: &[&str],
) -> Result<()> {
    let left = float_linears(model, tensors, ignore)?;
    if !left.is_empty() {
        bail!("{} linear layer(s) left in float (not visited by the model's Quantizable, or not selected): {}", left.len(), left.join(", "))
    }
    Ok(())
}

pub use crate::nn::DEFAULT_OUTLIER_THRESHOLD;

/// Observer factory used by `prepare`/`prepare_qat` for each layer's input.
pub type ObserverFactory = fn() -> Box<dyn Observer>;

/// A callback told how many of the selected layers' weights are quantized (a [`Progress`] of
/// "quantizing layers"), e.g. to drive a progress bar; called from the converting thread after
/// each batch. Kept in a [`QuantConfig`], which is cloned, so it is shared.
#[derive(Clone)]
pub struct OnProgress(std::sync::Arc<dyn Fn(Progress) + Send + Sync>);

impl std::fmt::Debug for OnProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnProgress(..)")
    }
}

/// Which layers to convert and how.
///
/// A layer is selected when it matches some `include` pattern (all layers when `include` is
/// empty) and no `exclude` pattern. Per-layer activation overrides: the first matching
/// `(pattern, ActivationQuant)` wins.
#[derive(Debug, Clone)]
pub struct QuantConfig {
    /// Layer-name patterns to convert (`*` = anything; empty: all layers).
    pub include: Vec<String>,
    /// Layer-name patterns to keep as they are.
    pub exclude: Vec<String>,
    /// How dynamic layers quantize their inputs.
    pub activation: ActivationQuant,
    /// Weight scales of dynamic and weight-only layers (static layers are per channel).
    pub weight: WeightQuant,
    /// Dynamic layers multiply inputs with `|x|` above this in float (LLM.int8()-style).
    /// Default 3.0: on SmolLM2-135M it halves KL(f32 ‖ int8) against no threshold for a few
    /// percent of decode time (docs/accuracy.md).
    pub outlier_threshold: Option<f32>,
    /// Per-layer activation schemes: the first matching pattern wins.
    pub overrides: Vec<(String, ActivationQuant)>,
    /// Per-layer weight schemes (mixed precision, e.g. an int8 `lm_head` in an int4 model): the
    /// first matching pattern wins.
    pub weight_overrides: Vec<(String, WeightQuant)>,
    /// Observer for static calibration and QAT inputs.
    pub observer: ObserverFactory,
    /// Told how far weight quantization (`quantize_dynamic`, `quantize_weight_only`,
    /// `quantize_ggml`) has come.
    pub progress: Option<OnProgress>,
}

/// Per-tensor affine qint8 min/max: the default static activation observer.
pub fn default_static_observer() -> Box<dyn Observer> {
    Box::new(MinMaxObserver::new(QSpec::new(QDType::QInt8, QScheme::Affine)))
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            include: vec![],
            exclude: vec![],
            activation: ActivationQuant::default(),
            weight: WeightQuant::default(),
            outlier_threshold: Some(DEFAULT_OUTLIER_THRESHOLD),
            overrides: vec![],
            weight_overrides: vec![],
            observer: default_static_observer,
            progress: None,
        }
    }
}

impl QuantConfig {
    /// Adds a pattern of layers to convert.
    pub fn include(mut self, pattern: impl Into<String>) -> Self {
        self.include.push(pattern.into());
        self
    }

    /// Adds a pattern of layers to leave alone.
    pub fn exclude(mut self, pattern: impl Into<String>) -> Self {
        self.exclude.push(pattern.into());
        self
    }

    /// Sets how dynamic layers quantize their inputs.
    pub fn activation(mut self, act: ActivationQuant) -> Self {
        self.activation = act;
        self
    }

    /// Sets the float-outlier threshold of dynamic layers (`None`: off).
    pub fn outlier_threshold(mut self, threshold: Option<f32>) -> Self {
        self.outlier_threshold = threshold;
        self
    }

    /// Sets how weights are scaled.
    pub fn weight(mut self, how: WeightQuant) -> Self {
        self.weight = how;
        self
    }

    /// Gives the layers matching `pattern` their own activation scheme.
    pub fn override_activation(mut self, pattern: impl Into<String>, act: ActivationQuant) -> Self {
        self.overrides.push((pattern.into(), act));
        self
    }

    /// Gives the layers matching `pattern` their own weight scheme (mixed precision).
    pub fn override_weight(mut self, pattern: impl Into<String>, how: WeightQuant) -> Self {
        self.weight_overrides.push((pattern.into(), how));
        self
    }

    /// Sets the observer `prepare` and `prepare_qat` attach to each layer's input.
    pub fn observer(mut self, factory: ObserverFactory) -> Self {
        self.observer = factory;
        self
    }

    /// Calls `f` as layers' weights are quantized (layers done of those selected).
    pub fn progress(mut self, f: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(OnProgress(std::sync::Arc::new(f)));
        self
    }

    /// Whether the layer called `name` is selected.
    pub fn selects(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| matches(p, name))) && !self.exclude.iter().any(|p| matches(p, name))
    }

    /// How the weights of the layer called `name` are quantized.
    pub fn weight_for(&self, name: &str) -> WeightQuant {
        self.weight_overrides.iter().find(|(p, _)| matches(p, name)).map_or(self.weight, |(_, w)| *w)
    }

    /// Activation quantization for the layer called `name`.
    pub fn activation_for(&self, name: &str) -> ActivationQuant {
        self.overrides.iter().find(|(p, _)| matches(p, name)).map_or(self.activation, |(_, a)| *a)
    }
}

/// Which layers a conversion changed and which it left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversionReport {
    /// Layers the verb changed, in visiting order.
    pub converted: Vec<String>,
    /// Layers it visited and left as they were.
    pub skipped: Vec<String>,
}

fn convert_selected(
    model: &mut (impl Quantizable + ?Sized),
    config: &QuantConfig,
    mut step: impl FnMut(&mut QLinear) -> Result<bool>,
) -> Result<ConversionReport> {
    let mut report = ConversionReport::default();
    model.visit_linears(&mut |layer| {
        let name = layer.name().to_string();
        if config.selects(&name) && step(layer)? {
            report.converted.push(name);
        } else {
            report.skipped.push(name);
        }
        Ok(())
    })?;
    Ok(report)
}

/// Like [`convert_selected`] for steps that only read their own layer (weight quantization):
/// layers are converted on rayon's pool, a batch of a few per thread at a time — so at most one
/// batch of new weights exists beside the float ones — and swapped in, in visiting order.
pub(crate) fn convert_selected_in_parallel(
    model: &mut (impl Quantizable + ?Sized),
    config: &QuantConfig,
    step: impl Fn(&mut QLinear) -> Result<()> + Sync,
) -> Result<ConversionReport> {
    let batch = 4 * rayon::current_num_threads();
    let mut selected = 0;
    model.visit_linears(&mut |layer| {
        selected += config.selects(layer.name()) as usize;
        Ok(())
    })?;
    let report = |done: usize| {
        if let Some(OnProgress(f)) = &config.progress {
            f(Progress::items("quantizing layers", done.min(selected), selected))
        }
    };
    report(0);
    let mut start = 0;
    loop {
        // Copies of this batch's selected layers (float tensors are shared, not copied).
        let (mut index, mut todo) = (0, Vec::new());
        model.visit_linears(&mut |layer| {
            if config.selects(layer.name()) {
                if (start..start + batch).contains(&index) {
                    todo.push(layer.clone());
                }
                index += 1;
            }
            Ok(())
        })?;
        if todo.is_empty() {
            break;
        }
        let mut done = todo.into_par_iter().map(|mut layer| step(&mut layer).map(|_| layer)).collect::<Result<Vec<_>>>()?.into_iter();
        let mut index = 0;
        model.visit_linears(&mut |layer| {
            if config.selects(layer.name()) {
                if (start..start + batch).contains(&index) {
                    match done.next() {
                        Some(q) if q.name() == layer.name() => *layer = q,
                        _ => bail!("layer {} changed while it was being converted", layer.name()),
                    }
                }
                index += 1;
            }
            Ok(())
        })?;
        start += batch;
        report(start);
    }
    // Every selected layer is now converted: the report is a visit with a step that does nothing.
    convert_selected(model, config, |_| Ok(true))
}

/// Swaps every selected layer for a dynamic int8 one (int8 weights per group or per output
/// channel as `config.weight` says, activations quantized on the fly) — the counterpart of
/// `torch.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`. Layers are
/// quantized in parallel.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_quant::{qlinear, quantize_dynamic, QuantConfig};
///
/// # fn main() -> candle_core::Result<()> {
/// let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
/// let mut layers = vec![qlinear(64, 64, vb.pp("a"))?, qlinear(64, 64, vb.pp("b"))?];
/// let report = quantize_dynamic(&mut layers, &QuantConfig::default().exclude("b"))?;
/// assert_eq!((report.converted, report.skipped), (vec!["a".to_string()], vec!["b".to_string()]));
/// assert!(layers[0].is_int8() && !layers[1].is_int8());
/// let y = layers[0].forward(&Tensor::ones((3, 64), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), [3, 64]);
/// # Ok(()) }
/// ```
pub fn quantize_dynamic(model: &mut (impl Quantizable + ?Sized), config: &QuantConfig) -> Result<ConversionReport> {
    convert_selected_in_parallel(model, config, |layer| {
        let act = config.activation_for(layer.name());
        layer.quantize_dynamic(act, config.weight_for(layer.name()), config.outlier_threshold)
    })
}

/// Swaps every selected layer for a weight-only int8 one (in parallel).
pub fn quantize_weight_only(model: &mut (impl Quantizable + ?Sized), config: &QuantConfig) -> Result<ConversionReport> {
    convert_selected_in_parallel(model, config, |layer| layer.quantize_weight_only(config.weight_for(layer.name())))
}

/// Swaps every selected layer for candle's block-quantized `QMatMul` in `dtype` (the
/// Q8_0 baseline; in parallel).
pub fn quantize_ggml(
    model: &mut (impl Quantizable + ?Sized),
    config: &QuantConfig,
    dtype: candle_core::quantized::GgmlDType,
) -> Result<ConversionReport> {
    convert_selected_in_parallel(model, config, |layer| layer.quantize_ggml(dtype))
}

/// Static quantization, step 1: selected float layers start observing their inputs.
/// Run calibration data through the model, then call [`convert`].
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_quant::{convert, prepare, qlinear, QuantConfig};
///
/// # fn main() -> candle_core::Result<()> {
/// let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
/// let mut layer = qlinear(32, 16, vb.pp("proj"))?;
/// prepare(&mut layer, &QuantConfig::default())?; // observers on the inputs (min/max by default)
/// for _ in 0..4 {
///     layer.forward(&Tensor::randn(0f32, 1.0, (8, 32), &Device::Cpu)?)?; // calibration batches
/// }
/// convert(&mut layer)?; // weights and activations int8, activation range fixed
/// assert_eq!(layer.kind_name(), "int8-static");
/// # Ok(()) }
/// ```
pub fn prepare(model: &mut (impl Quantizable + ?Sized), config: &QuantConfig) -> Result<ConversionReport> {
    convert_selected(model, config, |layer| match layer.kind() {
        QLinearKind::Float(_) => layer.observe_with((config.observer)()).map(|_| true),
        _ => Ok(false),
    })
}

/// QAT, step 1: selected float layers become fake-quantized with trainable weights.
/// Train, then call [`convert`].
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_quant::{convert, prepare_qat, qlinear, QuantConfig};
///
/// # fn main() -> candle_core::Result<()> {
/// let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
/// let mut layer = qlinear(32, 16, vb.pp("proj"))?;
/// prepare_qat(&mut layer, &QuantConfig::default())?;
/// // Training steps: forward passes see quantized weights and inputs, gradients pass straight
/// // through the rounding to the float weights.
/// let x = Tensor::randn(0f32, 1.0, (8, 32), &Device::Cpu)?;
/// let loss = layer.forward(&x)?.sqr()?.mean_all()?;
/// let _grads = loss.backward()?;
/// convert(&mut layer)?;
/// assert!(layer.is_int8());
/// # Ok(()) }
/// ```
pub fn prepare_qat(model: &mut (impl Quantizable + ?Sized), config: &QuantConfig) -> Result<ConversionReport> {
    convert_selected(model, config, |layer| match layer.kind() {
        QLinearKind::Float(_) => layer.prepare_qat((config.observer)()).map(|_| true),
        _ => Ok(false),
    })
}

/// QAT, step 2: the trainable weights of every fake-quantized layer `prepare_qat` made, in
/// visiting order — what an optimizer (e.g. `candle_nn::AdamW`) updates.
pub fn qat_vars(model: &mut (impl Quantizable + ?Sized)) -> Result<Vec<candle_core::Var>> {
    let mut vars = Vec::new();
    model.visit_linears(&mut |l| {
        if let QLinearKind::FakeQuant(f) = l.kind() {
            vars.extend(f.vars());
        }
        Ok(())
    })?;
    Ok(vars)
}

/// QAT with learned ranges (LSQ), between `prepare_qat` and training: every fake-quantized
/// layer for which `init` gives per-tensor qparams (e.g. a calibration's,
/// [`crate::calibration::Calibration::qparams_for`]) trains its input step size from there;
/// returns those step sizes' variables (log scale, one per layer) for an optimizer.
pub fn learn_activation_ranges(
    model: &mut (impl Quantizable + ?Sized),
    mut init: impl FnMut(&QLinear) -> Result<Option<crate::quant::QParams>>,
) -> Result<Vec<candle_core::Var>> {
    let mut vars = Vec::new();
    edit_fake_quant(model, |l, f| {
        let Some(p) = init(l)? else { return Ok(false) };
        f.learn_activation_range(&p)?;
        vars.extend(f.range_var());
        Ok(true)
    })?;
    Ok(vars)
}

/// QAT of the input ranges alone: every fake-quantized layer's weights stop training and their
/// fake-quantized values are computed once ([`crate::nn::FakeQuantLinear::freeze_weights`]),
/// which makes a training step several times cheaper. Returns how many layers were frozen.
pub fn freeze_qat_weights(model: &mut (impl Quantizable + ?Sized)) -> Result<usize> {
    let mut frozen = 0;
    edit_fake_quant(model, |_, f| {
        f.freeze_weights()?;
        frozen += 1;
        Ok(true)
    })?;
    Ok(frozen)
}

/// Offers a copy of every fake-quantized layer to `edit` (with the layer as it is) and puts the
/// copy in its place when `edit` says so; errors name the layer.
fn edit_fake_quant(
    model: &mut (impl Quantizable + ?Sized),
    mut edit: impl FnMut(&QLinear, &mut crate::nn::FakeQuantLinear) -> Result<bool>,
) -> Result<()> {
    model.visit_linears(&mut |l| {
        let QLinearKind::FakeQuant(f) = l.kind() else { return Ok(()) };
        let mut f = f.clone();
        if edit(l, &mut f).map_err(|e| e.context(format!("layer '{}'", l.name())))? {
            l.set_kind(QLinearKind::FakeQuant(f))?;
        }
        Ok(())
    })
}

/// Static quantization / QAT, last step: observed and fake-quant layers become static int8
/// layers with the activation qparams their observers learned. Fails, naming the layer, if a
/// layer saw no calibration data.
pub fn convert(model: &mut (impl Quantizable + ?Sized)) -> Result<ConversionReport> {
    let mut report = ConversionReport::default();
    model.visit_linears(&mut |layer| {
        if matches!(layer.kind(), QLinearKind::Observed(_) | QLinearKind::FakeQuant(_)) {
            layer.convert_static()?;
            report.converted.push(layer.name().to_string());
        } else {
            report.skipped.push(layer.name().to_string());
        }
        Ok(())
    })?;
    if report.converted.is_empty() {
        bail!("convert found no prepared layer: call prepare or prepare_qat first")
    }
    Ok(report)
}
