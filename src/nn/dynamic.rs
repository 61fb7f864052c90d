//! Dynamic int8 linear: int8 weights ahead of time, activations quantized on every call.

use crate::kernels::{int8_linear_into, Isa, PackedInt8Weights, QuantizedActivations};
use candle_core::{bail, Result};
use std::mem::MaybeUninit;

/// Default outlier threshold of dynamic layers: inputs with `|x|` above it are multiplied in
/// float. On SmolLM2-135M it halves KL(f32 ‖ int8) against no threshold for a few percent of
/// decode time (docs/accuracy.md).
pub const DEFAULT_OUTLIER_THRESHOLD: f32 = 3.0;

/// How activations are quantized on the fly: symmetric int8 (`q = round(x / sa)` in
/// `[-127, 127]`, `sa = max|x| / 127`) or affine (`q = round((x − lo) / sa) − 128` in
/// `[-128, 127]`, `sa = (hi − lo) / 255`, and a float offset `o = lo + 128·sa`, so `x ≈ sa·q + o`),
/// per token or per group of input channels.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationQuant {
    /// One symmetric scale per token (row).
    PerToken,
    /// One symmetric scale per run of `n` input channels within a token, so one outlier channel
    /// only coarsens its own group.
    PerGroup(usize),
    /// One affine scale and offset per token.
    AffinePerToken,
    /// One affine scale and offset per run of `n` input channels within a token: each group's
    /// 256 steps span its own `[lo, hi]`. Needs int8 weights in groups of the same size.
    AffinePerGroup(usize),
}

impl Default for ActivationQuant {
    /// Affine per group of 32 input channels (the weights' default groups): on SmolLM2-135M it
    /// takes KL(f32 ‖ int8) on alice29 from 0.0022 (symmetric, the granularity of candle's Q8_0
    /// activations) to 0.0017 at the same speed (docs/accuracy.md).
    fn default() -> Self {
        ActivationQuant::AffinePerGroup(32)
    }
}

impl ActivationQuant {
    pub(crate) fn validate(&self) -> Result<()> {
        if let ActivationQuant::PerGroup(0) | ActivationQuant::AffinePerGroup(0) = self {
            bail!("activation group size must be at least 1")
        }
        Ok(())
    }

    /// Group size for a row of `k` values.
    pub fn group_size(&self, k: usize) -> usize {
        match *self {
            ActivationQuant::PerToken | ActivationQuant::AffinePerToken => k,
            ActivationQuant::PerGroup(g) | ActivationQuant::AffinePerGroup(g) => g.min(k),
        }
    }

    /// Whether each group also gets an offset (affine).
    pub fn is_affine(&self) -> bool {
        matches!(self, ActivationQuant::AffinePerToken | ActivationQuant::AffinePerGroup(_))
    }

    /// The same scheme with the granularity given as `Some(group)` or `None` (per token).
    pub fn with_group(affine: bool, group: Option<usize>) -> Self {
        match (affine, group) {
            (false, None) => ActivationQuant::PerToken,
            (false, Some(g)) => ActivationQuant::PerGroup(g),
            (true, None) => ActivationQuant::AffinePerToken,
            (true, Some(g)) => ActivationQuant::AffinePerGroup(g),
        }
    }

    /// `Some(group)`, or `None` per token.
    pub fn group(&self) -> Option<usize> {
        match *self {
            ActivationQuant::PerToken | ActivationQuant::AffinePerToken => None,
            ActivationQuant::PerGroup(g) | ActivationQuant::AffinePerGroup(g) => Some(g),
        }
    }
}

/// `y = Σ_g sw_g ⊙ (sa_g · (qa_g · qw_gᵀ) + o_g · Σ_{k∈g} qw) + b`, `qa` (and `o` when affine)
/// computed per call.
#[derive(Debug, Clone)]
pub struct DynamicLinear {
    weights: PackedInt8Weights,
    bias: Option<Vec<f32>>,
    act: ActivationQuant,
    outlier_threshold: Option<f32>,
}

impl DynamicLinear {
    /// A layer over packed int8 weights, quantizing its inputs as `act` says (no outlier threshold).
    pub fn new(weights: PackedInt8Weights, bias: Option<Vec<f32>>, act: ActivationQuant) -> Self {
        if act.is_affine() {
            // Made now, not on the first call; a layer whose groups cannot have them gets a
            // clear error from the kernel on its first call.
            weights.prepare_group_sums();
        }
        Self { weights, bias, act, outlier_threshold: None }
    }

    /// Inputs with `|x|` above `threshold` are multiplied in float instead of int8
    /// (LLM.int8()-style decomposition); `None` quantizes everything.
    pub fn with_outlier_threshold(mut self, threshold: Option<f32>) -> Self {
        self.outlier_threshold = threshold;
        self
    }

    /// Inputs with `|x|` above this are multiplied in float.
    pub fn outlier_threshold(&self) -> Option<f32> {
        self.outlier_threshold
    }

    /// The packed int8 weights.
    pub fn weights(&self) -> &PackedInt8Weights {
        &self.weights
    }

    /// The float bias.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// How inputs are quantized.
    pub fn activation_quant(&self) -> ActivationQuant {
        self.act
    }

    /// Writes every value of `out` (`m × out_features`) on `Ok`.
    pub(crate) fn forward_rows(&self, x: &[f32], m: usize, out: &mut [MaybeUninit<f32>]) -> Result<()> {
        self.forward_quantized(&self.quantize_input(x, m)?, out)
    }

    /// `m` input rows quantized as this layer quantizes them.
    pub(crate) fn quantize_input(&self, x: &[f32], m: usize) -> Result<QuantizedActivations> {
        let k = self.weights.in_features();
        let group = self.act.group_size(k);
        if self.act.is_affine() {
            QuantizedActivations::quantize_dynamic_affine(x, m, k, group, self.outlier_threshold)
        } else {
            QuantizedActivations::quantize_dynamic(x, m, k, group, self.outlier_threshold)
        }
    }

    /// `m` rows of SwiGLU's `silu(gate) · up` quantized as this layer quantizes its input, the
    /// product computed row by row as it is quantized (never written out whole).
    pub(crate) fn quantize_swiglu(&self, gate: &[f32], up: &[f32], m: usize) -> Result<QuantizedActivations> {
        let k = self.weights.in_features();
        QuantizedActivations::quantize_dynamic_swiglu(gate, up, m, k, self.act.group_size(k), self.outlier_threshold, self.act.is_affine())
    }

    /// `m` rows of `gelu_erf(x)` quantized as this layer quantizes its input, each row's GELU
    /// computed as it is quantized.
    pub(crate) fn quantize_gelu(&self, x: &[f32], m: usize) -> Result<QuantizedActivations> {
        let k = self.weights.in_features();
        QuantizedActivations::quantize_dynamic_gelu(x, m, k, self.act.group_size(k), self.outlier_threshold, self.act.is_affine())
    }

    /// The layer on inputs already quantized by [`Self::quantize_input`] (of this layer or of
    /// one that [`Self::quantizes_like`] it).
    /// Writes every value of `out` on `Ok`.
    pub(crate) fn forward_quantized(&self, acts: &QuantizedActivations, out: &mut [MaybeUninit<f32>]) -> Result<()> {
        int8_linear_into(Isa::best(), acts, &self.weights, self.bias(), out)
    }

    /// Whether `other` turns every input into the same int8 values and scales as this layer.
    pub(crate) fn quantizes_like(&self, other: &DynamicLinear) -> bool {
        let k = self.weights.in_features();
        k == other.weights.in_features()
            && self.act.group_size(k) == other.act.group_size(k)
            && self.act.is_affine() == other.act.is_affine()
            && self.outlier_threshold == other.outlier_threshold
    }
}
