//! Writing int8 folders: any model in memory ([`save_quantized`]), or any tensor source
//! streamed with its scheme ([`write_checkpoint`]); always under a temporary name, renamed when
//! complete.

use super::scheme::{CheckpointScheme, LayerScheme};
use crate::convert::Quantizable;
use crate::nn::{QLinear, QLinearKind};
use crate::progress::Progress;
use crate::source::memory::MemorySource;
use crate::source::{write_shards, Dtype, TensorSource, WriteReport};
use candle_core::{bail, Result};
use std::path::Path;

/// How a checkpoint is written.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// The model's `config.json` (an object); `quantization_config` is added to it.
    pub config: serde_json::Value,
    /// Other files to write beside it, `(file name, contents)`: `tokenizer.json`,
    /// `tokenizer_config.json` (chat template), …
    pub files: Vec<(String, Vec<u8>)>,
    /// Safetensors files hold at most this many bytes of tensors (one larger tensor gets a file
    /// of its own); more than one file gets a `model.safetensors.index.json`.
    pub max_shard_bytes: u64,
    /// Replace `dir` if it exists (only once the new checkpoint is complete).
    pub overwrite: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self { config: serde_json::json!({}), files: vec![], max_shard_bytes: 2_000_000_000, overwrite: false }
    }
}

/// Writes every tensor of `source` (in its order) and `config.json` with `quantization` to
/// `dir`: into a hidden sibling folder first, renamed to `dir` once complete, so an interrupted
/// run leaves nothing under `dir`'s name. An existing `dir` is an error unless
/// `options.overwrite`.
pub fn write_checkpoint(
    dir: &Path,
    source: &dyn TensorSource,
    quantization: &CheckpointScheme,
    options: &SaveOptions,
    progress: impl FnMut(Progress),
) -> Result<WriteReport> {
    let serde_json::Value::Object(mut config) = options.config.clone() else { bail!("the model config to save must be a JSON object") };
    config.insert("quantization_config".into(), serde_json::to_value(quantization).map_err(|e| candle_core::Error::Msg(e.to_string()))?);
    write_folder(dir, source, &serde_json::Value::Object(config), options, progress)
}

/// Writes every tensor of `source` and `config` (the whole `config.json`) to `dir`, under a
/// hidden sibling name renamed when complete (see [`write_checkpoint`]).
pub(crate) fn write_folder(
    dir: &Path,
    source: &dyn TensorSource,
    config: &serde_json::Value,
    options: &SaveOptions,
    mut progress: impl FnMut(Progress),
) -> Result<WriteReport> {
    if dir.exists() && !options.overwrite {
        bail!("{}: already exists (choose another folder, or set SaveOptions::overwrite to replace it)", dir.display())
    }
    let name =
        dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| candle_core::Error::Msg(format!("{}: not a folder name", dir.display())))?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| candle_core::Error::Msg(format!("{}: cannot create: {e}", tmp.display())))?;
    let written = write_into(&tmp, source, config, options, &mut progress).and_then(|report| {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| candle_core::Error::Msg(format!("{}: cannot replace: {e}", dir.display())))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| candle_core::Error::Msg(format!("renaming {} to {}: {e}", tmp.display(), dir.display())))?;
        Ok(WriteReport { files: report.files.iter().map(|f| dir.join(f.file_name().unwrap_or_default())).collect(), ..report })
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

fn write_into(
    tmp: &Path,
    source: &dyn TensorSource,
    config: &serde_json::Value,
    options: &SaveOptions,
    progress: &mut impl FnMut(Progress),
) -> Result<WriteReport> {
    let report = write_shards(tmp, source, options.max_shard_bytes, progress)?;
    let write = |file: &str, bytes: &[u8]| {
        std::fs::write(tmp.join(file), bytes).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.join(file).display())))
    };
    for (file, bytes) in &options.files {
        write(file, bytes)?;
    }
    write("config.json", serde_json::to_string_pretty(config).map_err(|e| candle_core::Error::Msg(e.to_string()))?.as_bytes())?;
    Ok(report)
}

/// Saves a model in memory — dynamic, weight-only and static (calibrated or QAT-converted) int8
/// layers, float layers, and the other tensors its [`Quantizable::visit_tensors`] shows — as a
/// checkpoint in `dir` (see [`write_checkpoint`]). Observing and fake-quant layers must be
/// converted first; ggml layers cannot be saved. The serialized tensors are collected before
/// writing (the model's size again in memory); large float models go through the `quantize`
/// command, which streams.
pub fn save_quantized(model: &mut (impl Quantizable + ?Sized), dir: &Path, options: &SaveOptions) -> Result<WriteReport> {
    let (mem, quantization) = quantized_tensors(model)?;
    write_checkpoint(dir, &*mem, &quantization, options, |_| {})
}

/// The tensors a checkpoint of `model` holds (in memory, the model's size again) and its
/// `quantization_config`: what [`save_quantized`] writes, for writers of other formats.
pub fn quantized_tensors(model: &mut (impl Quantizable + ?Sized)) -> Result<(Box<dyn TensorSource>, CheckpointScheme)> {
    let mut mem = MemorySource::new();
    let mut schemes: Vec<(String, LayerScheme)> = vec![];
    let mut excluded = vec![];
    model.visit_tensors(&mut |name, t| mem.push_tensor(name.to_string(), t))?;
    model.visit_linears(&mut |layer| {
        let name = layer.name().to_string();
        if let Some(bias) = layer.bias_values()? {
            mem.push(format!("{name}.bias"), Dtype::F32, vec![bias.len()], bias.iter().flat_map(|v| v.to_le_bytes()).collect())?;
        }
        match (LayerScheme::of(layer), layer.kind()) {
            (Some(scheme), kind) => {
                push_int8_weights(&mut mem, layer)?;
                if let QLinearKind::Static(s) = kind {
                    let p = s.activation_qparams();
                    let (scales, zero_points) = (&p.scales, &p.zero_points);
                    let bytes = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
                    mem.push(format!("{name}.input_scale"), Dtype::F32, vec![scales.len()], bytes)?;
                    let bytes = zero_points.iter().flat_map(|v| v.to_le_bytes()).collect();
                    mem.push(format!("{name}.input_zero_point"), Dtype::I32, vec![zero_points.len()], bytes)?;
                }
                schemes.push((name, scheme));
            }
            (None, QLinearKind::Float(l)) => {
                mem.push_tensor(format!("{name}.weight"), l.weight())?;
                excluded.push(name);
            }
            (None, _) => bail!("layer '{name}' is {}: convert it (or keep it float) before saving", layer.kind_name()),
        }
        Ok(())
    })?;
    let mut tables = vec![];
    model.visit_tables(&mut |table| {
        push_int8_weights(&mut mem, table)?;
        tables.push(table.name().to_string());
        Ok(())
    })?;
    // The most common scheme is the default; the others are listed.
    let Some(default) = most_common(schemes.iter().map(|(_, s)| s)) else { bail!("the model has no int8 layer to save") };
    let mut quantization = CheckpointScheme::new(default);
    for (name, scheme) in schemes {
        quantization.set(&name, scheme);
    }
    quantization.excluded = excluded;
    for table in tables {
        quantization.add_table(&table);
    }
    Ok((Box::new(mem), quantization))
}

/// `layer`'s int8 (or int4) weights as a checkpoint stores them: `NAME.weight`, `NAME.weight_scale`
/// and, for asymmetric int4, `NAME.weight_zero_point`.
fn push_int8_weights(mem: &mut MemorySource, layer: &QLinear) -> Result<()> {
    let name = layer.name();
    let (w, _) = layer.int8_parts().ok_or_else(|| candle_core::Error::Msg(format!("layer '{name}' lost its weights")))?;
    let rows = w.to_rows();
    let (n, k, g, bits) = (rows.out_features(), rows.in_features(), rows.groups(), rows.bits());
    let [values, scales, zero_points] = super::planned::stored_parts(rows);
    match bits {
        4 => mem.push(format!("{name}.weight"), Dtype::U8, vec![n, k.div_ceil(2)], values)?,
        _ => mem.push(format!("{name}.weight"), Dtype::I8, vec![n, k], values)?,
    }
    mem.push(format!("{name}.weight_scale"), Dtype::F16, vec![n, g], scales)?;
    if !zero_points.is_empty() {
        mem.push(format!("{name}.weight_zero_point"), Dtype::U8, vec![n, g], zero_points)?;
    }
    Ok(())
}

fn most_common<'a>(schemes: impl Iterator<Item = &'a LayerScheme>) -> Option<LayerScheme> {
    let mut counts: Vec<(&LayerScheme, usize)> = vec![];
    for s in schemes {
        match counts.iter_mut().find(|(c, _)| *c == s) {
            Some((_, n)) => *n += 1,
            None => counts.push((s, 1)),
        }
    }
    // The first of the most common wins a tie.
    counts.iter().enumerate().max_by_key(|&(i, &(_, n))| (n, std::cmp::Reverse(i))).map(|(_, (s, _))| (*s).clone())
}
