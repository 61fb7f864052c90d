//! A Hugging Face folder's weights: `model.safetensors`, or the shards a
//! `model.safetensors.index.json` names, read as one [`TensorSource`].

use super::safetensors::{Entry, SafetensorsFile};
use super::TensorSource;
use candle_core::{bail, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A JSON file (`config.json`, an index), parsed; errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: invalid JSON: {e}", path.display())))
}

/// The shard files a `model.safetensors.index.json` names, each once, in order; a name that is
/// not a plain file name (a path, `..`) is an error.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let json = read_json(index)?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else { bail!("{}: no 'weight_map' object", index.display()) };
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let Some(file) = file.as_str().filter(|f| !f.is_empty() && !f.contains('/') && !f.contains("..")) else {
            bail!("{}: tensor '{name}' names no plain shard file ({file})", index.display())
        };
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        bail!("{}: 'weight_map' lists no shard", index.display())
    }
    Ok(shards.into_iter().collect())
}

/// The weight files of a folder: `model.safetensors.index.json` and the shards it names, or
/// `model.safetensors`; a shard the index names but the folder lacks is an error.
pub fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let files: Vec<PathBuf> = shard_names(&index)?.iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            bail!("{}: weight shard missing (listed in {})", missing.display(), index.display())
        }
        return Ok((files, Some(index)));
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![single], None));
    }
    bail!("{}: neither model.safetensors nor model.safetensors.index.json found", dir.display())
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
