//! Tensors held in memory, as a [`TensorSource`].

use super::safetensors::{Dtype, Entry};
use super::TensorSource;
use candle_core::{bail, DType, Result, Tensor};
use std::collections::HashMap;

/// Tensors held in memory as bytes (what `checkpoint::save_quantized` collects from a model).
pub(crate) struct MemorySource {
    /// The tensors, in the order pushed.
    entries: Vec<Entry>,
    /// Their bytes, by name.
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
    pub(crate) fn push(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Result<()> {
        if self.data.contains_key(&name) {
            bail!("the model has two tensors named '{name}'")
        }
        self.entries.push(Entry { name: name.clone(), dtype, shape });
        self.data.insert(name, bytes);
        Ok(())
    }

    pub(crate) fn push_tensor(&mut self, name: String, t: &Tensor) -> Result<()> {
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

impl MemorySource {
    /// No tensors yet.
    pub(crate) fn new() -> Self {
        Self { entries: vec![], data: HashMap::new() }
    }
}
