//! A float source seen as the int8 checkpoint it quantizes to.

use crate::kernels::{quantize_weight_rows_with, Int8Rows, WeightQuant};
use crate::source::{index_of, widen_into, Dtype, Entry, TensorSource};
use candle_core::{bail, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where a [`PlannedSource`] tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// The source tensor of that name, as stored.
    Copy(String),
    /// One part of that float source weight, quantized `how`.
    Quantized { from: String, how: WeightQuant, part: Part },
}

/// The tensors a quantized weight is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// `L.weight`: int8 values (`I8`), or int4 two to a byte (`U8`, [`Int8Rows::int4_bytes`]).
    Values,
    /// `L.weight_scale`: `f16` scales.
    Scales,
    /// `L.weight_zero_point`: asymmetric int4 zero points (`U8`).
    ZeroPoints,
}

/// A float source seen as the int8 checkpoint it quantizes to: selected linear weights become
/// `<layer>.weight` (`I8`; int4: `U8` `[out, ⌈in/2⌉]`), `<layer>.weight_scale` (`F16`) and for
/// asymmetric int4 `<layer>.weight_zero_point` (`U8`), quantized when read (all from one
/// quantization: the last layer's result is kept until its other parts are read); every other
/// tensor passes through. Writing its entries is the `quantize` command; building a model on it
/// is quantization while loading — the same tensors either way.
pub struct PlannedSource {
    source: Arc<dyn TensorSource>,
    plan: Vec<Entry>,
    origins: Vec<Origin>,
    index: HashMap<String, usize>,
    /// The last weight quantized: its source name, how, and the half not read yet.
    last: Mutex<Option<Quantized>>,
    /// The source bytes of the weight being quantized, reused from one weight to the next.
    scratch: Mutex<Vec<u8>>,
}

/// One quantized weight, handed out one part a read, in any order.
struct Quantized {
    from: String,
    how: WeightQuant,
    /// Values, scales, zero points ([`Part`] order); taken as read.
    parts: [Option<Vec<u8>>; 3],
}

impl PlannedSource {
    /// `layers`: linear layers to quantize, `(name, how)`, whose weights are `<name>.weight` in
    /// `source` unless `renamed` maps the layer to another source tensor (a tied `lm_head` reads
    /// the embedding table, which is then not passed through).
    pub fn new(source: Arc<dyn TensorSource>, layers: &[(String, WeightQuant)], renamed: &HashMap<String, String>) -> Result<Self> {
        let by_source: HashMap<String, (&str, WeightQuant)> = layers
            .iter()
            .map(|(layer, how)| (renamed.get(layer).cloned().unwrap_or_else(|| format!("{layer}.weight")), (layer.as_str(), *how)))
            .collect();
        let (mut plan, mut origins) = (Vec::new(), Vec::new());
        for e in source.entries() {
            let Some(&(layer, how)) = by_source.get(&e.name) else {
                plan.push(e.clone());
                origins.push(Origin::Copy(e.name.clone()));
                continue;
            };
            let &[n, k] = e.shape.as_slice() else {
                bail!("{}: a linear weight must be 2-D, found shape {:?}", source.describe(&e.name), e.shape)
            };
            if !e.dtype.is_float() {
                bail!("{}: a float weight to quantize, found {}", source.describe(&e.name), e.dtype.name())
            }
            let groups = k.div_ceil(how.group_in(k).max(1));
            let mut part = |suffix: &str, dtype, shape, part| {
                plan.push(Entry { name: format!("{layer}.{suffix}"), dtype, shape });
                origins.push(Origin::Quantized { from: e.name.clone(), how, part });
            };
            if let WeightQuant::Int4 { zero_point, .. } = how {
                if k < 2 {
                    bail!("{}: int4 weights need at least 2 input channels, found {k}", source.describe(&e.name))
                }
                part("weight", Dtype::U8, vec![n, k.div_ceil(2)], Part::Values);
                if zero_point {
                    part("weight_zero_point", Dtype::U8, vec![n, groups], Part::ZeroPoints);
                }
            } else {
                part("weight", Dtype::I8, vec![n, k], Part::Values);
            }
            part("weight_scale", Dtype::F16, vec![n, groups], Part::Scales);
        }
        for (from, (layer, _)) in &by_source {
            if source.entry(from).is_none() {
                bail!("layer '{layer}': no weight '{from}' in the model's tensors")
            }
        }
        let index = index_of(&plan);
        Ok(Self { source, plan, origins, index, last: Mutex::new(None), scratch: Mutex::new(Vec::new()) })
    }

    /// One part of source weight `from` quantized, as bytes: quantized on the first read of
    /// its parts, the others kept for theirs.
    fn quantized(&self, from: &str, how: WeightQuant, part: Part) -> Result<Vec<u8>> {
        let lock_err = || candle_core::Error::Msg("a quantizing reader panicked".into());
        let mut last = self.last.lock().map_err(|_| lock_err())?;
        if let Some(q) = last.as_mut().filter(|q| q.from == from && q.how == how) {
            if let Some(bytes) = q.parts[part as usize].take() {
                return Ok(bytes);
            }
        }
        let Some(e) = self.source.entry(from) else { bail!("{}: no such tensor", self.source.describe(from)) };
        let (n, k, dtype) = (e.shape[0], e.shape[1], e.dtype);
        let mut bytes = self.scratch.lock().map_err(|_| lock_err())?;
        self.source.read_into(from, &mut bytes)?;
        if bytes.len() != n * k * dtype.size() {
            bail!("{}: read {} bytes for a {n}×{k} {} weight", self.source.describe(from), bytes.len(), dtype.name())
        }
        let row_bytes = k * dtype.size();
        let rows = quantize_weight_rows_with(n, k, how, |j, row| widen_into(dtype, &bytes[j * row_bytes..(j + 1) * row_bytes], row))
            .map_err(|err| err.context(self.source.describe(from)))?;
        let mut parts = stored_parts(rows).map(Some);
        let wanted = parts[part as usize].take().unwrap_or_default();
        *last = Some(Quantized { from: from.to_string(), how, parts });
        Ok(wanted)
    }
}

/// Quantized rows as the tensors a checkpoint stores, in [`Part`] order (no zero points: empty).
pub(super) fn stored_parts(rows: Int8Rows) -> [Vec<u8>; 3] {
    let zero_points = rows.zero_points().map(<[u8]>::to_vec).unwrap_or_default();
    let scales: Vec<u8> = rows.scales().iter().flat_map(|s| s.to_le_bytes()).collect();
    let values = if rows.bits() == 4 { rows.int4_bytes() } else { int8_bytes(rows.into_parts().0) };
    [values, scales, zero_points]
}

/// `i8` values as the same bytes, without a copy.
fn int8_bytes(values: Vec<i8>) -> Vec<u8> {
    let mut values = std::mem::ManuallyDrop::new(values);
    let (ptr, len, cap) = (values.as_mut_ptr(), values.len(), values.capacity());
    // SAFETY: `i8` and `u8` have the same size and alignment, and every bit pattern is valid
    // for both; the allocation is handed over whole (pointer, length, capacity) and the
    // original vector is never dropped.
    unsafe { Vec::from_raw_parts(ptr.cast::<u8>(), len, cap) }
}

impl TensorSource for PlannedSource {
    fn entries(&self) -> &[Entry] {
        &self.plan
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let Some(&i) = self.index.get(name) else { bail!("no tensor '{name}' in the quantized model") };
        match &self.origins[i] {
            Origin::Copy(from) => self.source.read_bytes(from),
            Origin::Quantized { from, how, part } => self.quantized(from, *how, *part),
        }
    }

    fn describe(&self, name: &str) -> String {
        match self.index.get(name).map(|&i| &self.origins[i]) {
            Some(Origin::Copy(from)) => self.source.describe(from),
            Some(Origin::Quantized { from, .. }) => {
                format!("tensor '{name}' quantized from {}", self.source.describe(from))
            }
            None => format!("tensor '{name}' (not in the quantized model)"),
        }
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.plan[i])
    }
}
