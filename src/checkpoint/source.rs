//! Where a model's tensors come from, one tensor at a time: safetensors files (single or
//! sharded), a GGUF file (in `io`), or a [`PlannedSource`] that quantizes a float source's
//! linear weights as they are read. [`CheckpointBackend`] serves any of them to candle's
//! `VarBuilder`, so a model is built tensor by tensor and never held twice.

use super::safetensors::{Dtype, Entry, SafetensorsFile};
use crate::kernels::{quantize_weight_rows_with, WeightQuant};
use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Tensors by name, each read on demand.
pub trait TensorSource: Send + Sync {
    /// Every tensor, in storage order (reading them in this order reads the source front to back).
    fn entries(&self) -> &[Entry];
    /// The tensor's bytes, little-endian, in its [`Entry::dtype`].
    fn read_bytes(&self, name: &str) -> Result<Vec<u8>>;

    /// [`Self::read_bytes`] into `buf` (replacing its contents), reusing its allocation where the
    /// source can.
    fn read_into(&self, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        *buf = self.read_bytes(name)?;
        Ok(())
    }
    /// Where the tensor lives, for error messages (`file: tensor 'name'`).
    fn describe(&self, name: &str) -> String;

    /// The entry of `name`, if the source has it.
    fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries().iter().find(|e| e.name == name)
    }
}

/// Looks entries up by name (sources build one once).
fn index_of(entries: &[Entry]) -> HashMap<String, usize> {
    entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect()
}

/// `name` as a CPU tensor in its stored dtype (`I8` as `U8`: the same bytes).
pub fn read_tensor(source: &dyn TensorSource, name: &str) -> Result<Tensor> {
    let Some(e) = source.entry(name) else { bail!("{}: no such tensor", source.describe(name)) };
    let bytes = source.read_bytes(name)?;
    let t = match e.dtype {
        // Bytes become the tensor's storage as they are (int8 weights: the largest tensors).
        Dtype::I8 | Dtype::U8 => Tensor::from_vec(bytes, e.shape.as_slice(), &Device::Cpu),
        dtype => Tensor::from_raw_buffer(&bytes, dtype.candle(), &e.shape, &Device::Cpu),
    };
    t.map_err(|err| err.context(source.describe(name)))
}

/// A float tensor widened to `f32` values, row-major, converted straight from its bytes.
pub fn read_f32(source: &dyn TensorSource, name: &str) -> Result<Vec<f32>> {
    let Some(e) = source.entry(name) else { bail!("{}: no such tensor", source.describe(name)) };
    let dtype = e.dtype;
    if !dtype.is_float() {
        bail!("{}: expected a float tensor, found {}", source.describe(name), dtype.name())
    }
    let bytes = source.read_bytes(name)?;
    let mut out = crate::kernels::memory::zeroed::<f32>(bytes.len() / dtype.size());
    out.par_chunks_mut(1 << 16).zip(bytes.par_chunks(dtype.size() << 16)).for_each(|(out, bytes)| widen_into(dtype, bytes, out));
    Ok(out)
}

/// Float values of `dtype` (little-endian bytes) widened into `out`, one loop per dtype so that
/// each vectorizes; `out` is as long as the values (non-float dtypes leave it untouched).
pub fn widen_into(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    fn each<const N: usize>(bytes: &[u8], out: &mut [f32], f: impl Fn([u8; N]) -> f32) {
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(N)) {
            *o = f(b.try_into().unwrap_or([0; N]));
        }
    }
    match dtype {
        Dtype::BF16 => each(bytes, out, |b: [u8; 2]| f32::from_bits((u16::from_le_bytes(b) as u32) << 16)),
        Dtype::F16 => each(bytes, out, |b: [u8; 2]| half::f16::from_le_bytes(b).to_f32()),
        Dtype::F32 => each(bytes, out, f32::from_le_bytes),
        Dtype::F64 => each(bytes, out, |b: [u8; 8]| f64::from_le_bytes(b) as f32),
        Dtype::I8 | Dtype::U8 | Dtype::I32 | Dtype::I64 => {}
    }
}

/// Safetensors files read as one source; with a `model.safetensors.index.json`, its weight map
/// must agree with what the shards hold.
pub struct SafetensorsSource {
    files: Vec<SafetensorsFile>,
    entries: Vec<Entry>,
    /// Tensor name → (file, entry).
    index: HashMap<String, (usize, usize)>,
}

impl SafetensorsSource {
    /// Opens safetensors files (the shards of one model; `index_file` is its `model.safetensors.index.json`, checked against them).
    pub fn open(paths: &[PathBuf], index_file: Option<&Path>) -> Result<Self> {
        let files = paths.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>>>()?;
        let (mut entries, mut index): (Vec<Entry>, HashMap<String, (usize, usize)>) = (Vec::new(), HashMap::new());
        for (f, file) in files.iter().enumerate() {
            for name in file.names_in_storage_order() {
                let info = file.info(&name)?;
                if let Some(&(other, _)) = index.get(&name) {
                    bail!("tensor '{name}' is in both {} and {}", files[other].path().display(), file.path().display())
                }
                index.insert(name.clone(), (f, entries.len()));
                entries.push(Entry { name, dtype: info.dtype, shape: info.shape.clone() });
            }
        }
        if let Some(index_file) = index_file {
            check_index(index_file, &files, &index)?;
        }
        Ok(Self { files, entries, index })
    }

    /// Starts reading the tensors after entry `i` (up to [`PREFETCH_BYTES`], at least one) in
    /// the background: a model read in storage order keeps the disk busy while each tensor is
    /// worked on. Tensors already asked for are asked again; the kernel skips cached pages.
    fn prefetch_after(&self, i: usize) {
        let mut ahead = 0;
        for next in self.entries.iter().skip(i + 1) {
            if ahead >= PREFETCH_BYTES {
                break;
            }
            if let Some(&(f, _)) = self.index.get(&next.name) {
                self.files[f].prefetch(&next.name);
            }
            ahead += next.nbytes();
        }
    }
}

/// Bytes of the tensors after the one being read that are asked for in the background.
const PREFETCH_BYTES: u64 = 256 << 20;

/// Every tensor of the weight map is in the shard it names, and every tensor of every shard is
/// in the weight map.
fn check_index(index_file: &Path, files: &[SafetensorsFile], held: &HashMap<String, (usize, usize)>) -> Result<()> {
    let json = super::read_json(index_file)?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else { bail!("{}: no 'weight_map' object", index_file.display()) };
    for (name, shard) in map {
        let shard = shard.as_str().unwrap_or_default();
        match held.get(name) {
            None => bail!("{}: tensor '{name}' is listed in shard {shard}, which does not hold it", index_file.display()),
            Some(&(f, _)) if files[f].path().file_name().and_then(|n| n.to_str()) != Some(shard) => {
                bail!("{}: tensor '{name}' is listed in shard {shard} but found in {}", index_file.display(), files[f].path().display())
            }
            _ => {}
        }
    }
    if let Some((name, &(f, _))) = held.iter().find(|(n, _)| !map.contains_key(*n)) {
        bail!("{}: tensor '{name}' is not in the index {}", files[f].path().display(), index_file.display())
    }
    Ok(())
}

impl TensorSource for SafetensorsSource {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_into(name, &mut buf)?;
        Ok(buf)
    }

    /// Reads `name` and starts the next tensors' reads in the background: a model read in
    /// storage order overlaps the disk with the work done on each tensor.
    fn read_into(&self, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        let Some(&(f, i)) = self.index.get(name) else { bail!("no tensor '{name}' in the safetensors files") };
        self.prefetch_after(i);
        self.files[f].read_into(name, buf)
    }

    fn describe(&self, name: &str) -> String {
        match self.index.get(name) {
            Some(&(f, _)) => format!("{}: tensor '{name}'", self.files[f].path().display()),
            None => format!("tensor '{name}' (in none of {} safetensors files)", self.files.len()),
        }
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&(_, e)| &self.entries[e])
    }
}

/// Where a [`PlannedSource`] tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// The source tensor of that name, as stored.
    Copy(String),
    /// The int8 values of that float source weight, quantized `how`.
    Int8Weight { from: String, how: WeightQuant },
    /// Their `f16` scales.
    WeightScale { from: String, how: WeightQuant },
}

/// A float source seen as the int8 checkpoint it quantizes to: selected linear weights become
/// `<layer>.weight` (`I8`) and `<layer>.weight_scale` (`F16`), quantized when read (both from
/// one quantization: the last layer's result is kept until its other half is read); every other
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

/// One quantized weight, handed out in two reads (values, then scales, or the reverse).
struct Quantized {
    from: String,
    how: WeightQuant,
    values: Option<Vec<u8>>,
    scales: Option<Vec<u8>>,
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
            let group = match how {
                WeightQuant::PerChannel => k,
                WeightQuant::PerGroup(g) => g.clamp(1, k),
            };
            plan.push(Entry { name: format!("{layer}.weight"), dtype: Dtype::I8, shape: vec![n, k] });
            origins.push(Origin::Int8Weight { from: e.name.clone(), how });
            plan.push(Entry { name: format!("{layer}.weight_scale"), dtype: Dtype::F16, shape: vec![n, k.div_ceil(group)] });
            origins.push(Origin::WeightScale { from: e.name.clone(), how });
        }
        for (from, (layer, _)) in &by_source {
            if source.entry(from).is_none() {
                bail!("layer '{layer}': no weight '{from}' in the model's tensors")
            }
        }
        let index = index_of(&plan);
        Ok(Self { source, plan, origins, index, last: Mutex::new(None), scratch: Mutex::new(Vec::new()) })
    }

    /// The int8 values (`scales = false`) or `f16` scales of source weight `from`, as bytes:
    /// quantized on the first of the two reads, the other half kept for the second.
    fn quantized(&self, from: &str, how: WeightQuant, scales: bool) -> Result<Vec<u8>> {
        let lock_err = || candle_core::Error::Msg("a quantizing reader panicked".into());
        let mut last = self.last.lock().map_err(|_| lock_err())?;
        if let Some(q) = last.as_mut().filter(|q| q.from == from && q.how == how) {
            if let Some(part) = if scales { q.scales.take() } else { q.values.take() } {
                return Ok(part);
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
        let (values, scale_values) = rows.into_parts();
        let values = int8_bytes(values);
        let scale_bytes: Vec<u8> = scale_values.iter().flat_map(|s| s.to_le_bytes()).collect();
        let (wanted, kept) = if scales { (scale_bytes, values) } else { (values, scale_bytes) };
        let (values, scales) = if scales { (Some(kept), None) } else { (None, Some(kept)) };
        *last = Some(Quantized { from: from.to_string(), how, values, scales });
        Ok(wanted)
    }
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
            Origin::Int8Weight { from, how } => self.quantized(from, *how, false),
            Origin::WeightScale { from, how } => self.quantized(from, *how, true),
        }
    }

    fn describe(&self, name: &str) -> String {
        match self.index.get(name).map(|&i| &self.origins[i]) {
            Some(Origin::Copy(from)) => self.source.describe(from),
            Some(Origin::Int8Weight { from, .. } | Origin::WeightScale { from, .. }) => {
                format!("tensor '{name}' quantized from {}", self.source.describe(from))
            }
            None => format!("tensor '{name}' (not in the quantized model)"),
        }
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.plan[i])
    }
}

/// A progress callback: `(done, total)`.
type Progress<'a> = Box<dyn FnMut(usize, usize) + Send + 'a>;

/// Serves a [`TensorSource`] to candle's `VarBuilder`: each tensor is read when the model asks
/// for it, its shape checked. Float tensors come in the dtype asked for; an `I8` tensor only as
/// `U8` (its bytes), which is how [`crate::QLinear::load`] reads int8 weights.
pub struct CheckpointBackend<'a> {
    source: Arc<dyn TensorSource>,
    progress: Option<Mutex<Progress<'a>>>,
    reads: std::sync::atomic::AtomicUsize,
}

impl<'a> CheckpointBackend<'a> {
    /// Serves `source` to a `VarBuilder`.
    pub fn new(source: Arc<dyn TensorSource>) -> Self {
        Self { source, progress: None, reads: 0.into() }
    }

    /// Calls `f(tensors read, tensors in the source)` after each read.
    pub fn with_progress(mut self, f: impl FnMut(usize, usize) + Send + 'a) -> Self {
        self.progress = Some(Mutex::new(Box::new(f)));
        self
    }

    /// A `VarBuilder` (f32, CPU) over this backend.
    pub fn into_var_builder(self) -> candle_nn::VarBuilder<'a> {
        candle_nn::VarBuilder::from_backend(Box::new(self), DType::F32, Device::Cpu)
    }
}

impl candle_nn::var_builder::SimpleBackend for CheckpointBackend<'_> {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            bail!("{}: shape {:?} in the checkpoint, the model expects {:?}", self.source.describe(name), t.dims(), s.dims())
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let Some(e) = self.source.entry(name) else { bail!("{}: not found", self.source.describe(name)) };
        if e.dtype == Dtype::I8 && dtype != DType::U8 {
            bail!("{}: int8 (I8) weights are read by candle_quant::QLinear::load, not as {dtype:?}", self.source.describe(name))
        }
        let t = read_tensor(&*self.source, name)?.to_dtype(dtype)?.to_device(dev)?;
        if let Some(Ok(mut report)) = self.progress.as_ref().map(|p| p.lock()) {
            let done = self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            report(done, self.source.entries().len());
        }
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.entry(name).is_some()
    }
}
