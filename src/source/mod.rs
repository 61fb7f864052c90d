//! Where a model's tensors come from, one tensor at a time, below both the checkpoint format
//! and the model loaders: the [`TensorSource`] trait; safetensors files read and written a
//! tensor at a time; a Hugging Face folder's weight files, single or sharded
//! ([`SafetensorsSource`], [`weight_files`]); tensors in memory; streamed shards
//! ([`write_shards`]); and [`SourceBackend`], which serves any source to candle's `VarBuilder`
//! so a model is built tensor by tensor and never held twice. The GGUF source lives with the
//! GGUF loader (`io::gguf`), the quantizing one with the checkpoint format
//! (`checkpoint::PlannedSource`).

mod folder;
pub(crate) mod memory;
pub(crate) mod safetensors;
mod shards;

pub(crate) use folder::read_json;
#[cfg(feature = "hub")]
pub(crate) use folder::shard_names;
pub use folder::{weight_files, SafetensorsSource};
pub use safetensors::{write_file, Dtype, Entry};
pub use shards::{write_shards, WriteReport};

use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::progress::Progress;

/// A progress callback.
type OnProgress<'a> = Box<dyn FnMut(Progress) + Send + 'a>;

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
pub(crate) fn index_of(entries: &[Entry]) -> HashMap<String, usize> {
    entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect()
}

/// `name` as a CPU tensor in its stored dtype (`I8` as `U8`: the same bytes).
pub(crate) fn read_tensor(source: &dyn TensorSource, name: &str) -> Result<Tensor> {
    let Some(e) = source.entry(name) else { bail!("{}: no such tensor", source.describe(name)) };
    let bytes = source.read_bytes(name)?;
    let t = match e.dtype {
        // Bytes become the tensor's storage as they are (int8 weights: the largest tensors).
        Dtype::I8 | Dtype::U8 => Tensor::from_vec(bytes, e.shape.as_slice(), &Device::Cpu),
        dtype => Tensor::from_raw_buffer(&bytes, dtype.candle(), &e.shape, &Device::Cpu),
    };
    t.map_err(|err| err.context(source.describe(name)))
}

/// Float values of `dtype` (little-endian bytes) widened into `out`, one loop per dtype so that
/// each vectorizes; `out` is as long as the values (non-float dtypes leave it untouched).
pub(crate) fn widen_into(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
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

/// Serves a [`TensorSource`] to candle's `VarBuilder`: each tensor is read when the model asks
/// for it, its shape checked. Float tensors come in the dtype asked for; an `I8` tensor only as
/// `U8` (its bytes), which is how [`crate::QLinear::load`] reads int8 weights.
pub struct SourceBackend<'a> {
    source: Arc<dyn TensorSource>,
    progress: Option<(&'a str, Mutex<OnProgress<'a>>)>,
    reads: std::sync::atomic::AtomicUsize,
}

impl<'a> SourceBackend<'a> {
    /// Serves `source` to a `VarBuilder`.
    pub fn new(source: Arc<dyn TensorSource>) -> Self {
        Self { source, progress: None, reads: 0.into() }
    }

    /// Calls `f` with the tensors read of those in the source, as `stage`, after each read.
    pub fn with_progress(mut self, stage: &'a str, f: impl FnMut(Progress) + Send + 'a) -> Self {
        self.progress = Some((stage, Mutex::new(Box::new(f))));
        self
    }

    /// A `VarBuilder` (f32, CPU) over this backend.
    pub fn into_var_builder(self) -> candle_nn::VarBuilder<'a> {
        candle_nn::VarBuilder::from_backend(Box::new(self), DType::F32, Device::Cpu)
    }
}

impl candle_nn::var_builder::SimpleBackend for SourceBackend<'_> {
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
        if let Some((stage, Ok(mut report))) = self.progress.as_ref().map(|(s, p)| (s, p.lock())) {
            let done = self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            report(Progress::items(stage, done, self.source.entries().len()));
        }
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.entry(name).is_some()
    }
}
