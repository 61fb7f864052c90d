//! Quantization parameters: one `(scale, zero_point)` pair per slice that the granularity defines.

use super::spec::{Granularity, QSpec};
use candle_core::{bail, Result, Shape};

/// Scales and zero points of one quantized tensor (or of one observer's view of a tensor).
/// Built only through the checked constructors: every scale finite and positive, every zero
/// point inside the spec's integer range, as many of each.
#[derive(Debug, Clone, PartialEq)]
pub struct QParams {
    pub(crate) spec: QSpec,
    pub(crate) granularity: Granularity,
    pub(crate) scales: Vec<f32>,
    pub(crate) zero_points: Vec<i32>,
}

impl QParams {
    /// The integer type, scheme and range these parameters were made for.
    pub fn spec(&self) -> QSpec {
        self.spec
    }

    /// Which slices of a tensor share one `(scale, zero_point)`.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// One scale per slot.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// One zero point per slot.
    pub fn zero_points(&self) -> &[i32] {
        &self.zero_points
    }

    /// Per-tensor parameters for the range `[min, max]`.
    pub fn per_tensor(spec: QSpec, min: f32, max: f32) -> Result<Self> {
        Self::from_min_max(spec, Granularity::PerTensor, &[min], &[max])
    }

    /// One `(scale, zero_point)` per `(min[i], max[i])`, through [`QSpec::scale_zero_point`].
    pub fn from_min_max(spec: QSpec, granularity: Granularity, min: &[f32], max: &[f32]) -> Result<Self> {
        if min.len() != max.len() || min.is_empty() {
            bail!("qparams need as many minima as maxima, and at least one (got {} and {})", min.len(), max.len())
        }
        let (scales, zero_points) =
            min.iter().zip(max).map(|(&lo, &hi)| spec.scale_zero_point(lo, hi)).collect::<Result<Vec<_>>>()?.into_iter().unzip();
        Ok(Self { spec, granularity, scales, zero_points })
    }

    /// Explicit parameters, checked: scales finite and positive, zero points inside the range.
    pub fn new(spec: QSpec, granularity: Granularity, scales: Vec<f32>, zero_points: Vec<i32>) -> Result<Self> {
        let (qmin, qmax) = spec.qrange();
        if scales.is_empty() || scales.len() != zero_points.len() {
            bail!("qparams need as many scales as zero points, and at least one (got {} and {})", scales.len(), zero_points.len())
        }
        if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!("scale {s} is not a finite positive number")
        }
        if let Some(z) = zero_points.iter().find(|z| !(qmin..=qmax).contains(*z)) {
            bail!("zero point {z} is outside the integer range [{qmin}, {qmax}]")
        }
        Ok(Self { spec, granularity, scales, zero_points })
    }

    /// How the elements of a tensor of `shape` map to parameter slots.
    pub fn layout(&self, shape: &Shape) -> Result<SlotLayout> {
        let layout = SlotLayout::new(self.granularity, shape)?;
        if layout.slots != self.scales.len() {
            bail!("{:?} qparams hold {} scales but a tensor of shape {shape:?} needs {}", self.granularity, self.scales.len(), layout.slots)
        }
        Ok(layout)
    }
}

/// Maps a flat (row-major) element index to its parameter slot.
#[derive(Debug, Clone, Copy)]
pub struct SlotLayout {
    granularity: Granularity,
    /// Per-channel: elements after the axis. Per-token/group: length of the last dimension.
    inner: usize,
    /// Per-channel: size of the axis. Per-group: groups per row.
    span: usize,
    group: usize,
    /// Number of `(scale, zero_point)` pairs needed.
    pub slots: usize,
}

impl SlotLayout {
    /// The layout of `granularity` over a tensor of `shape` (an error when the shape cannot have it).
    pub fn new(granularity: Granularity, shape: &Shape) -> Result<Self> {
        let dims = shape.dims();
        let numel = shape.elem_count();
        let last = dims.last().copied().unwrap_or(1);
        let rows = numel.checked_div(last).unwrap_or(0);
        let (inner, span, group, slots) = match granularity {
            Granularity::PerTensor => (1, 1, 1, 1),
            Granularity::PerChannel { axis } => {
                let Some(&size) = dims.get(axis) else { bail!("per-channel axis {axis} does not exist in a tensor of shape {shape:?}") };
                (dims[axis + 1..].iter().product(), size, 1, size)
            }
            Granularity::PerToken => (last, 1, last, rows),
            Granularity::PerGroup { size } => {
                if size == 0 {
                    bail!("per-group quantization needs a group size of at least 1")
                }
                let groups = last.div_ceil(size);
                (last, groups, size, rows * groups)
            }
        };
        Ok(Self { granularity, inner, span, group, slots })
    }

    /// Calls `f(slot, range)` for each run of consecutive (row-major) elements of a tensor with
    /// `numel` elements that share one parameter slot, in order.
    pub fn for_each_run(&self, numel: usize, mut f: impl FnMut(usize, std::ops::Range<usize>)) {
        match self.granularity {
            Granularity::PerTensor => f(0, 0..numel),
            Granularity::PerChannel { .. } | Granularity::PerToken => {
                let run = self.inner.max(1);
                for (n, start) in (0..numel).step_by(run).enumerate() {
                    let slot = if let Granularity::PerToken = self.granularity { n } else { n % self.span };
                    f(slot, start..(start + run).min(numel));
                }
            }
            Granularity::PerGroup { .. } => {
                for (row, start) in (0..numel).step_by(self.inner.max(1)).enumerate() {
                    let end = (start + self.inner).min(numel);
                    for (g, s) in (start..end).step_by(self.group).enumerate() {
                        f(row * self.span + g, s..(s + self.group).min(end));
                    }
                }
            }
        }
    }
}
