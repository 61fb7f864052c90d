//! Any [`TensorSource`] written out as safetensors shards, one tensor in memory at a time.

use super::safetensors::{self, Entry};
use super::TensorSource;
use crate::progress::Progress;
use candle_core::{bail, Result};
use std::path::{Path, PathBuf};

/// What was written.
#[derive(Debug, Clone, Default)]
pub struct WriteReport {
    /// The safetensors files, in order.
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
}

/// Writes every tensor of `source`, in its order, into `dir` as safetensors files of at most
/// `max_shard_bytes` of tensors each (a larger tensor alone in its file): `model.safetensors`,
/// or `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. One tensor is in
/// memory at a time.
pub fn write_shards(
    dir: &Path,
    source: &dyn TensorSource,
    max_shard_bytes: u64,
    progress: &mut impl FnMut(Progress),
) -> Result<WriteReport> {
    let entries = source.entries();
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut size = 0u64;
    for (i, e) in entries.iter().enumerate() {
        match shards.last_mut() {
            Some(s) if size + e.nbytes() <= max_shard_bytes => s.push(i),
            _ => {
                shards.push(vec![i]);
                size = 0;
            }
        }
        size += e.nbytes();
    }
    if shards.is_empty() {
        bail!("the model has no tensors to save")
    }
    const STAGE: &str = "writing tensors";
    let total: u64 = entries.iter().map(Entry::nbytes).sum();
    let mut done = 0;
    progress(Progress::bytes(STAGE, done, total));
    let n = shards.len();
    let names: Vec<String> =
        if n == 1 { vec!["model.safetensors".into()] } else { (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect() };
    let mut weight_map = serde_json::Map::new();
    for (shard, file) in shards.iter().zip(&names) {
        let part: Vec<Entry> = shard.iter().map(|&i| entries[i].clone()).collect();
        safetensors::write_file(&dir.join(file), &part, |i, buf| {
            *buf = source.read_bytes(&part[i].name)?;
            if i > 0 {
                done += part[i - 1].nbytes();
                progress(Progress::bytes(STAGE, done, total));
            }
            Ok(())
        })?;
        if let Some(last) = part.last() {
            done += last.nbytes();
            progress(Progress::bytes(STAGE, done, total));
        }
        for e in &part {
            weight_map.insert(e.name.clone(), file.clone().into());
        }
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, index.to_string()).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    }
    Ok(WriteReport { files: names.iter().map(|f| dir.join(f)).collect(), tensor_bytes: total })
}
