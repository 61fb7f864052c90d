//! `QLinear`: one linear layer type whose kind (float, int8 dynamic/static/weight-only,
//! observing, fake-quantized) is a closed enum, so a model holds one type and conversion swaps
//! the kind in place.

pub(crate) mod attention;
mod dynamic;
mod fake_quant;
mod forward;
mod ggml;
mod observed;
pub mod ops;
mod static_linear;
mod weight_only;

/// How a layer's int8 weights are scaled (per output channel, or per group of input channels).
pub use crate::kernels::WeightQuant;
pub use dynamic::{ActivationQuant, DynamicLinear, DEFAULT_OUTLIER_THRESHOLD};
pub use fake_quant::FakeQuantLinear;
pub(crate) use forward::forward_shared;
pub use ggml::GgmlLinear;
pub use observed::ObservedLinear;
pub use static_linear::StaticLinear;
pub use weight_only::WeightOnlyLinear;

use crate::kernels::{Int8Rows, PackedInt8Weights};
use crate::observer::Observer;
use crate::quant::{float_values, Granularity, QParams};
use candle_core::{bail, DType, Result, Storage, Tensor};
use candle_nn::{Linear, VarBuilder};

/// A linear layer `in_features → out_features` with a bias, loaded from `vb` (its path becomes the
/// layer's name): the drop-in for `candle_nn::linear`. Float until a conversion verb quantizes it;
/// over a quantized checkpoint's VarBuilder it loads as int8 directly.
pub fn qlinear(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<QLinear> {
    QLinear::load(in_features, out_features, true, vb)
}

/// [`qlinear`] without a bias: the drop-in for `candle_nn::linear_no_bias`.
pub fn qlinear_no_bias(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<QLinear> {
    QLinear::load(in_features, out_features, false, vb)
}

/// [`qlinear`] with the bias chosen by a flag: the drop-in for `candle_nn::linear_b`.
pub fn qlinear_b(in_features: usize, out_features: usize, bias: bool, vb: VarBuilder) -> Result<QLinear> {
    QLinear::load(in_features, out_features, bias, vb)
}

/// What a [`QLinear`] currently is.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub enum QLinearKind {
    /// `candle_nn::Linear`, untouched.
    Float(Linear),
    /// Int8 weights; activations quantized on the fly per token or per group.
    Dynamic(DynamicLinear),
    /// Int8 weights and activations, activation qparams fixed by calibration.
    Static(StaticLinear),
    /// Int8 weights, float activations.
    WeightOnly(WeightOnlyLinear),
    /// Float forward that records input ranges for calibration.
    Observed(ObservedLinear),
    /// Fake-quantized weights and activations with trainable weights (QAT).
    FakeQuant(FakeQuantLinear),
    /// candle's block-quantized `QMatMul` (Q8_0 etc.): the baseline to compare against.
    Ggml(GgmlLinear),
}

/// A linear layer `y = x·Wᵀ + b` that knows its name (its VarBuilder path) and can be
/// quantized in place.
#[derive(Debug, Clone)]
pub struct QLinear {
    name: String,
    in_features: usize,
    out_features: usize,
    kind: QLinearKind,
}

impl QLinear {
    /// Loads `weight` `[out, in]` (and `bias` `[out]`) from `vb`, like `candle_nn::linear_b`.
    ///
    /// From a quantized checkpoint (`vb` over [`crate::checkpoint::QuantizedCheckpoint`] or a
    /// [`crate::checkpoint::PlannedSource`]), a layer with a `weight_scale` is built straight
    /// from its int8 weights (no float copy) as a dynamic layer with the default activation
    /// scheme; [`crate::checkpoint::CheckpointScheme::apply`] then gives it its saved scheme.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use candle_quant::QLinear;
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    /// let layer = QLinear::load(16, 4, true, vb.pp("encoder.proj"))?;
    /// assert_eq!((layer.name(), layer.kind_name()), ("encoder.proj", "float"));
    /// assert_eq!(layer.forward(&Tensor::zeros((2, 16), DType::F32, &Device::Cpu)?)?.dims(), [2, 4]);
    /// # Ok(()) }
    /// ```
    pub fn load(in_features: usize, out_features: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let name = vb.prefix();
        if vb.contains_tensor("weight_scale") {
            let kind = Self::load_int8(&name, in_features, out_features, bias, &vb)
                .map_err(|e| e.context(format!("loading int8 layer '{name}'")))?;
            return Ok(Self { name, in_features, out_features, kind });
        }
        let linear =
            candle_nn::linear_b(in_features, out_features, bias, vb).map_err(|e| e.context(format!("loading linear layer '{name}'")))?;
        Ok(Self { name, in_features, out_features, kind: QLinearKind::Float(linear) })
    }

    /// Int8 weights (`weight` as `I8`, read as bytes) and their `f16` scales `[out, groups]`,
    /// packed straight from the tensors the checkpoint gave (no other copy).
    fn load_int8(name: &str, k: usize, n: usize, bias: bool, vb: &VarBuilder) -> Result<QLinearKind> {
        let scales = vb.get_unchecked_dtype("weight_scale", DType::F16)?;
        let &[sn, groups] = scales.dims() else {
            bail!("'{name}.weight_scale' must be 2-D [out, groups], the checkpoint has shape {:?}", scales.shape())
        };
        if sn != n {
            bail!(
                "'{name}.weight' has {sn} output channels in the checkpoint ('{name}.weight_scale' is {:?}), but the model builds '{name}' as {k} → {n}: [{sn}, …] against [{n}, {k}]",
                scales.dims()
            )
        }
        if groups == 0 || groups > k {
            bail!(
                "'{name}.weight_scale' has shape {:?}: {groups} scale groups do not fit the {k} input channels of '{name}'",
                scales.dims()
            )
        }
        // The group size the scales imply; a checkpoint's config settles it when `k` is not a
        // multiple of it (see `checkpoint::LayerScheme`).
        let group = k.div_ceil(groups);
        let values = vb.get_unchecked_dtype("weight", DType::U8)?;
        let packed = if values.dims() == [n, k] {
            Self::pack_int8(&values, &scales, (n, k, group))?
        } else if k >= 2 && values.dims() == [n, k.div_ceil(2)] {
            // Int4: two values a byte, with zero points when the checkpoint has them.
            let zero_points = match vb.contains_tensor("weight_zero_point") {
                true => Some(vb.get_with_hints_dtype((n, groups), "weight_zero_point", candle_nn::Init::Const(0.0), DType::U8)?),
                false => None,
            };
            let zero_points = zero_points.map(|z| cpu_slice::<u8, _>(&z, <[u8]>::to_vec)).transpose()?;
            cpu_slice::<u8, _>(&values, |bytes| {
                cpu_slice::<half::f16, _>(&scales, |s| PackedInt8Weights::from_int4_bytes(n, k, group, bytes, s, zero_points.as_deref()))
            })???
        } else {
            bail!(
                "'{name}.weight' has shape {:?} in the checkpoint, but the model builds '{name}' as {k} → {n}: [{n}, {k}] for int8 or [{n}, {}] for int4",
                values.dims(),
                k.div_ceil(2)
            )
        };
        let bias = if bias || vb.contains_tensor("bias") { Some(float_values(&vb.get(n, "bias")?, "bias")?) } else { None };
        // Affine activations in the weights' groups where the weights keep group sums, else one
        // affine scale and offset per token.
        let act =
            if group < k && packed.has_group_sums() { ActivationQuant::AffinePerGroup(group) } else { ActivationQuant::AffinePerToken };
        let dynamic = DynamicLinear::new(packed, bias, act).with_outlier_threshold(Some(DEFAULT_OUTLIER_THRESHOLD));
        Ok(QLinearKind::Dynamic(dynamic))
    }

    /// Int8 values `[n, k]` (stored `I8`, read as bytes) packed with their scales, no other copy.
    fn pack_int8(values: &Tensor, scales: &Tensor, (n, k, group): (usize, usize, usize)) -> Result<PackedInt8Weights> {
        cpu_slice::<u8, _>(values, |bytes| {
            // SAFETY: `u8` and `i8` have the same size and alignment and every bit pattern is
            // valid for both; the slice borrows the tensor's storage for this call only.
            let values = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<i8>(), bytes.len()) };
            cpu_slice::<half::f16, _>(scales, |s| PackedInt8Weights::pack(n, k, group, values, s))?
        })?
    }

    /// Wraps an existing float layer under `name`.
    pub fn from_linear(linear: &Linear, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let &[out_features, in_features] = linear.weight().dims() else {
            bail!("layer '{name}': weight must be 2-D [out, in], got shape {:?}", linear.weight().shape())
        };
        if let Some(b) = linear.bias() {
            if b.dims() != [out_features] {
                bail!("layer '{name}': bias shape {:?} does not match {out_features} outputs", b.shape())
            }
        }
        Ok(Self { name, in_features, out_features, kind: QLinearKind::Float(linear.clone()) })
    }

    /// The layer's name: its VarBuilder path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// What the layer currently is.
    pub fn kind(&self) -> &QLinearKind {
        &self.kind
    }

    /// Replaces the kind with one built by hand; its shapes must match the layer's.
    pub fn set_kind(&mut self, kind: QLinearKind) -> Result<()> {
        let probe = Self { name: self.name.clone(), in_features: self.in_features, out_features: self.out_features, kind };
        let l = probe.float_equivalent()?;
        if l.weight().dims() != [self.out_features, self.in_features] {
            bail!(
                "layer '{}' is {}→{}, the new kind has weights of shape {:?}",
                self.name,
                self.in_features,
                self.out_features,
                l.weight().shape()
            )
        }
        self.kind = probe.kind;
        Ok(())
    }

    /// Short label of the kind: `float`, `int8-dynamic`, `int8-static`, `int8-weight-only`,
    /// `int4-dynamic` (W4A8), `int4-weight-only`, `observed`, `fake-quant`, `ggml`.
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            QLinearKind::Float(_) => "float",
            QLinearKind::Dynamic(l) if l.weights().bits() == 4 => "int4-dynamic",
            QLinearKind::Dynamic(_) => "int8-dynamic",
            QLinearKind::Static(_) => "int8-static",
            QLinearKind::WeightOnly(l) if l.weights().bits() == 4 => "int4-weight-only",
            QLinearKind::WeightOnly(_) => "int8-weight-only",
            QLinearKind::Observed(_) => "observed",
            QLinearKind::FakeQuant(_) => "fake-quant",
            QLinearKind::Ggml(_) => "ggml",
        }
    }

    /// Multiplies input column `j` of a float layer's weight by `s[j]` (SmoothQuant's fold into
    /// the layer that reads a smoothed input).
    pub fn scale_input_channels(&mut self, s: &[f32]) -> Result<()> {
        let QLinearKind::Float(l) = &self.kind else {
            bail!("layer '{}' is {}: only float layers can be smoothed", self.name, self.kind_name())
        };
        if s.len() != self.in_features {
            bail!("layer '{}': {} smoothing factors for {} inputs", self.name, s.len(), self.in_features)
        }
        let s = Tensor::from_slice(s, (1, s.len()), l.weight().device())?;
        self.kind = QLinearKind::Float(Linear::new(l.weight().broadcast_mul(&s)?, l.bias().cloned()));
        Ok(())
    }

    /// Divides output row `j` of a float layer's weight (and bias) by `s[j]` (SmoothQuant's fold
    /// into the layer that produces a smoothed input).
    pub fn scale_down_output_channels(&mut self, s: &[f32]) -> Result<()> {
        let QLinearKind::Float(l) = &self.kind else {
            bail!("layer '{}' is {}: only float layers can be smoothed", self.name, self.kind_name())
        };
        if s.len() != self.out_features {
            bail!("layer '{}': {} smoothing factors for {} outputs", self.name, s.len(), self.out_features)
        }
        let col = Tensor::from_slice(s, (s.len(), 1), l.weight().device())?;
        let bias = l.bias().map(|b| b.broadcast_div(&col.flatten_all()?)).transpose()?;
        self.kind = QLinearKind::Float(Linear::new(l.weight().broadcast_div(&col)?, bias));
        Ok(())
    }

    /// Inputs a static layer clamped to its calibrated range so far (0 for other kinds).
    pub fn clamped_activations(&self) -> u64 {
        match &self.kind {
            QLinearKind::Static(s) => s.clamped_count(),
            _ => 0,
        }
    }

    /// Inputs a static layer with per-group ranges multiplied in float so far, being beyond
    /// their group's calibrated range (0 for other kinds).
    pub fn float_activations(&self) -> u64 {
        match &self.kind {
            QLinearKind::Static(s) => s.float_count(),
            _ => 0,
        }
    }

    /// Whether the weights are stored as int8.
    pub fn is_int8(&self) -> bool {
        self.int8_parts().is_some()
    }

    /// The int8 weights and f32 bias of an int8 kind (dynamic, static, weight-only).
    pub fn int8_parts(&self) -> Option<(&PackedInt8Weights, Option<&[f32]>)> {
        match &self.kind {
            QLinearKind::Dynamic(d) => Some((d.weights(), d.bias())),
            QLinearKind::Static(s) => Some((s.weights(), s.bias())),
            QLinearKind::WeightOnly(w) => Some((w.weights(), w.bias())),
            _ => None,
        }
    }

    /// The bias as `f32` values, if the layer has one (float and int8 kinds).
    pub fn bias_values(&self) -> Result<Option<Vec<f32>>> {
        if let Some((_, b)) = self.int8_parts() {
            return Ok(b.map(<[f32]>::to_vec));
        }
        match &self.kind {
            QLinearKind::Float(l) => l.bias().map(|b| float_values(b, &self.name)).transpose(),
            QLinearKind::Observed(o) => o.linear().bias().map(|b| float_values(b, &self.name)).transpose(),
            _ => Ok(None),
        }
    }

    /// Bytes held by weights and bias.
    pub fn weight_bytes(&self) -> usize {
        let tensor_bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let float = |l: &Linear| tensor_bytes(l.weight()) + l.bias().map_or(0, tensor_bytes);
        match &self.kind {
            QLinearKind::Float(l) => float(l),
            QLinearKind::Observed(o) => float(o.linear()),
            QLinearKind::FakeQuant(f) => f.weight_bytes(),
            QLinearKind::Ggml(g) => g.weight_bytes(),
            QLinearKind::Dynamic(_) | QLinearKind::Static(_) | QLinearKind::WeightOnly(_) => {
                self.int8_parts().map_or(0, |(w, b)| w.nbytes() + b.map_or(0, |b| b.len() * 4))
            }
        }
    }

    /// The float layer this one computes: the original for float kinds, and a `Linear` built
    /// from the *dequantized* weights for int8 kinds (to measure kernel error apart from
    /// weight-rounding error).
    pub fn float_equivalent(&self) -> Result<Linear> {
        let int8 = |w: &PackedInt8Weights, b: Option<&[f32]>| -> Result<Linear> {
            let device = candle_core::Device::Cpu;
            let bias = b.map(|b| Tensor::from_slice(b, b.len(), &device)).transpose()?;
            Ok(Linear::new(w.dequantize(&device)?, bias))
        };
        match &self.kind {
            QLinearKind::Float(l) => Ok(l.clone()),
            QLinearKind::Observed(o) => Ok(o.linear().clone()),
            QLinearKind::FakeQuant(f) => f.float_linear(),
            QLinearKind::Ggml(g) => Ok(Linear::new(g.dequantized_weight()?, g.bias().cloned())),
            QLinearKind::Dynamic(d) => int8(d.weights(), d.bias()),
            QLinearKind::Static(s) => int8(s.weights(), s.bias()),
            QLinearKind::WeightOnly(w) => int8(w.weights(), w.bias()),
        }
    }

    /// Int8 weights and f32 bias: reused when already int8, quantized `how`
    /// ([`crate::quant::QSpec::WEIGHT`]) from the float weights otherwise.
    fn int8_weights(&self, how: WeightQuant) -> Result<(PackedInt8Weights, Option<Vec<f32>>)> {
        if let Some((w, b)) = self.int8_parts() {
            return Ok((w.clone(), b.map(<[f32]>::to_vec)));
        }
        let l = self.float_equivalent()?;
        let w = PackedInt8Weights::quantize(l.weight(), how)
            .map_err(|e| e.context(format!("quantizing the weight of layer '{}'", self.name)))?;
        let b = l.bias().map(|b| float_values(b, &self.name)).transpose()?;
        Ok((w, b))
    }

    /// Reads the int8 weights' scales as groups of `group` input channels (same values, same
    /// number of groups per row): for a checkpoint whose scale shape left the group size open.
    /// The layer is weight-only until its kind is set again.
    pub(crate) fn regroup_int8_weights(&mut self, group: usize) -> Result<()> {
        let Some((w, b)) = self.int8_parts() else { bail!("layer '{}' has no int8 weights", self.name) };
        let rows = w.to_rows();
        let (n, k, zero_points) = (rows.out_features(), rows.in_features(), rows.zero_points().map(<[u8]>::to_vec));
        let rows = match rows.bits() {
            4 => Int8Rows::new_int4(n, k, group, rows.values().to_vec(), rows.scales().to_vec(), zero_points)?,
            _ => Int8Rows::new(n, k, group, rows.values().to_vec(), rows.scales().to_vec())?,
        };
        let b = b.map(<[f32]>::to_vec);
        self.kind = QLinearKind::WeightOnly(WeightOnlyLinear::new(PackedInt8Weights::from_rows(&rows)?, b));
        Ok(())
    }

    /// Becomes [`QLinearKind::WeightOnly`] over `weights` quantized elsewhere (e.g. by GPTQ),
    /// keeping its bias; a conversion verb then keeps these weights whatever scheme it gives.
    pub fn set_weights(&mut self, weights: PackedInt8Weights) -> Result<()> {
        if (weights.out_features(), weights.in_features()) != (self.out_features, self.in_features) {
            bail!(
                "layer '{}' is {} → {}, the weights given are {} → {}",
                self.name,
                self.in_features,
                self.out_features,
                weights.in_features(),
                weights.out_features()
            )
        }
        let bias = self.bias_values()?;
        self.kind = QLinearKind::WeightOnly(WeightOnlyLinear::new(weights, bias));
        Ok(())
    }

    /// Becomes [`QLinearKind::Dynamic`]: int8 weights scaled per `weights`, activations quantized
    /// per `act` on every call. When both are per group, the group sizes must match.
    pub fn quantize_dynamic(&mut self, act: ActivationQuant, weights: WeightQuant, outlier_threshold: Option<f32>) -> Result<()> {
        check_dynamic_groups(&self.name, act, weights, self.in_features)?;
        let (w, b) = self.int8_weights(weights)?;
        self.kind = QLinearKind::Dynamic(DynamicLinear::new(w, b, act).with_outlier_threshold(outlier_threshold));
        Ok(())
    }

    /// Becomes [`QLinearKind::WeightOnly`] with weights scaled per `weights`.
    pub fn quantize_weight_only(&mut self, weights: WeightQuant) -> Result<()> {
        let (w, b) = self.int8_weights(weights)?;
        self.kind = QLinearKind::WeightOnly(WeightOnlyLinear::new(w, b));
        Ok(())
    }

    /// Becomes [`QLinearKind::Ggml`]: candle's `QMatMul` with weights in `dtype` (e.g. Q8_0),
    /// from the float weights.
    pub fn quantize_ggml(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<()> {
        let l = self.float_equivalent()?;
        let g =
            GgmlLinear::new(l.weight(), l.bias().cloned(), dtype).map_err(|e| e.context(format!("layer '{}' to {dtype:?}", self.name)))?;
        self.kind = QLinearKind::Ggml(g);
        Ok(())
    }

    /// Becomes [`QLinearKind::Observed`]: float forward that feeds its inputs to `observer`.
    pub fn observe_with(&mut self, observer: Box<dyn Observer>) -> Result<()> {
        let linear = self.float_equivalent()?;
        self.kind = QLinearKind::Observed(ObservedLinear::new(linear, observer));
        Ok(())
    }

    /// Becomes [`QLinearKind::FakeQuant`] with trainable weights and `observer` for activations.
    pub fn prepare_qat(&mut self, observer: Box<dyn Observer>) -> Result<()> {
        let linear = self.float_equivalent()?;
        self.kind = QLinearKind::FakeQuant(FakeQuantLinear::new(&linear, observer)?);
        Ok(())
    }

    /// Becomes [`QLinearKind::Static`] with the given activation qparams, per tensor or per
    /// group of input channels ([`StaticLinear::new`]). Int8 weights are kept if it has them;
    /// float weights are quantized per output channel for per-tensor activations and per group
    /// of the same size for per-group ones.
    pub fn quantize_static(&mut self, act: QParams) -> Result<()> {
        let how = match act.granularity() {
            Granularity::PerGroup { size } => WeightQuant::PerGroup(size),
            _ => WeightQuant::PerChannel,
        };
        let (w, b) = self.int8_weights(how)?;
        self.kind = QLinearKind::Static(StaticLinear::new(w, b, act).map_err(|e| e.context(format!("layer '{}'", self.name)))?);
        Ok(())
    }

    /// Becomes [`QLinearKind::Static`], taking activation qparams from the observer of an
    /// `Observed` or `FakeQuant` layer.
    pub fn convert_static(&mut self) -> Result<()> {
        let params = match &self.kind {
            QLinearKind::Observed(o) => o.activation_qparams(),
            QLinearKind::FakeQuant(f) => f.activation_qparams(),
            _ => bail!(
                "layer '{}' is {}: only observed or fake-quant layers carry calibrated activation ranges",
                self.name,
                self.kind_name()
            ),
        }
        .map_err(|e| e.context(format!("layer '{}'", self.name)))?;
        let (w, b) = self.int8_weights(WeightQuant::PerChannel)?;
        self.kind = QLinearKind::Static(StaticLinear::new(w, b, params)?);
        Ok(())
    }
}

/// Runs `f` on the values of a contiguous CPU tensor of element type `T`, borrowed.
fn cpu_slice<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(f(&cpu.as_slice::<T>()?[start..end])),
        _ => bail!("expected a contiguous CPU tensor of {:?}, got {:?} {:?}", T::DTYPE, t.dtype(), t.shape()),
    }
}

/// Whether a dynamic layer `name` of `k` inputs can quantize activations per `act` over weights
/// scaled per `weights`: per-group activations and weights need the same groups, and affine
/// activation groups need weights in the same groups (at most
/// [`crate::kernels::MAX_SUMMED_GROUP`] wide). The error names the layer and both groupings.
pub(crate) fn check_dynamic_groups(name: &str, act: ActivationQuant, weights: WeightQuant, k: usize) -> Result<()> {
    act.validate()?;
    match (act.group().filter(|&a| a < k), weights.group_below(k)) {
        (Some(a), Some(w)) if a != w => {
            bail!("layer '{name}': activation groups of {a} and weight groups of {w} must be equal")
        }
        (Some(a), w) if act.is_affine() => {
            let w = w.unwrap_or(k);
            if w != a || a > crate::kernels::MAX_SUMMED_GROUP {
                bail!(
                    "layer '{name}': affine activations in groups of {a} need int8 weights in groups of the same size (at most {}), got {} (symmetric activations take any weights)",
                    crate::kernels::MAX_SUMMED_GROUP,
                    if w == k { "one scale per output channel".to_string() } else { format!("groups of {w}") }
                )
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_core::Module;

    fn layer(seed: f64, out: usize, k: usize, outliers: Option<f32>) -> Result<QLinear> {
        let w = (Tensor::arange(0f32, (out * k) as f32, &Device::Cpu)?.reshape((out, k))? * seed)?.sin()?;
        let mut l = QLinear::from_linear(&Linear::new(w, None), format!("l{seed}"))?;
        l.quantize_dynamic(ActivationQuant::default(), WeightQuant::default(), outliers)?;
        Ok(l)
    }

    /// One quantization of the shared input gives every layer exactly what its own call gives,
    /// outliers in float included; layers that quantize differently are run one by one.
    #[test]
    fn shared_input_is_quantized_once_with_the_same_results() -> Result<()> {
        let x = (Tensor::arange(0f32, 3.0 * 96.0, &Device::Cpu)?.reshape((3, 96))? * 0.37)?.cos()?;
        let x = (x * 4.0)?; // values up to 4: some above the threshold 3
        let (a, b, c) = (layer(0.1, 40, 96, Some(3.0))?, layer(0.2, 16, 96, Some(3.0))?, layer(0.3, 8, 96, Some(3.0))?);
        let values = |t: &Tensor| t.to_vec2::<f32>();
        for (y, l) in forward_shared(&x, [&a, &b, &c])?.iter().zip([&a, &b, &c]) {
            assert_eq!(values(y)?, values(&l.forward(&x)?)?);
        }
        let other = layer(0.4, 8, 96, None)?;
        let [y, z] = forward_shared(&x, [&a, &other])?;
        assert_eq!(values(&y)?, values(&a.forward(&x)?)?);
        assert_eq!(values(&z)?, values(&other.forward(&x)?)?);
        let wrong = layer(0.5, 8, 64, Some(3.0))?;
        let err = forward_shared(&x, [&a, &wrong]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("l0.5") && err.contains("64"), "{err}");
        Ok(())
    }
}
