//! Int8 and int4 checkpoints written as GGUF files that llama.cpp (and candle's quantized
//! models) run: int8 layers as `Q8_0` blocks and symmetric int4 as `Q4_0`, bit for bit;
//! asymmetric int4 as `Q4_1` (its minimum rounded to `f16`); weights no block type holds
//! (groups that are not multiples of 32) re-rounded to `Q8_0`. Every re-rounded layer is
//! reported with its error. Float tensors stay F32 (F16 when stored so).
//!
//! The metadata llama.cpp needs (architecture, hyperparameters, tokenizer, chat template) is a
//! GGUF source's own, or is built from a Llama config and a byte-level BPE tokenizer.
//! The file is streamed a tensor at a time under a temporary name, renamed when complete.

use super::blocks::{self, StoredRows, QK};
use super::{gguf_name, rope_row_order};
use crate::checkpoint::{CheckpointScheme, LayerScheme};
use crate::models::DecoderConfig;
use crate::progress::Progress;
use crate::source::{Dtype, TensorSource};
use candle_core::quantized::gguf_file::Value;
use candle_core::{bail, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// GGUF's default (and this writer's) alignment of tensor data.
const ALIGNMENT: usize = 32;

/// The ggml tensor types this writer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// Blocks of 32 symmetric 4-bit values.
    Q4_0,
    /// Blocks of 32 4-bit values with a minimum.
    Q4_1,
    /// Blocks of 32 int8 values.
    Q8_0,
}

impl GgmlType {
    /// The type's id in GGUF files.
    fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
        }
    }

    /// Bytes of `count` values.
    fn bytes(self, count: usize) -> usize {
        match self {
            GgmlType::F32 => 4 * count,
            GgmlType::F16 => 2 * count,
            GgmlType::Q4_0 => count / QK * blocks::Q4_0_BYTES,
            GgmlType::Q4_1 => count / QK * blocks::Q4_1_BYTES,
            GgmlType::Q8_0 => count / QK * blocks::Q8_0_BYTES,
        }
    }

    /// llama.cpp's `general.file_type` for a model mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 7,
        }
    }
}

/// A layer whose weights GGUF cannot hold exactly, and what writing them cost.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufLoss {
    /// The layer.
    pub layer: String,
    /// The type it went out as.
    pub written_as: GgmlType,
    /// Why it is not exact.
    pub reason: String,
    /// `‖ŵ_gguf − ŵ‖ / ‖ŵ‖` over its weights.
    pub relative_error: f64,
}

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone, Default)]
pub struct GgufReport {
    /// Tensors in the file.
    pub tensors: usize,
    /// Bytes of the file.
    pub bytes: u64,
    /// Layers written block for block, exactly as quantized.
    pub exact_layers: usize,
    /// Layers written with a loss.
    pub lossy: Vec<GgufLoss>,
    /// What the format has no place for (static layers' activation ranges).
    pub dropped: Vec<String>,
}

/// What goes into the GGUF file.
pub struct GgufExport<'a> {
    /// The model's configuration.
    pub config: &'a DecoderConfig,
    /// Its tensors under Hugging Face names, quantized layers as a checkpoint stores them.
    pub tensors: &'a dyn TensorSource,
    /// The quantized layers' schemes.
    pub quantization: &'a CheckpointScheme,
    /// The key-values to write (see [`metadata_from_gguf`], [`metadata_for_llama`]);
    /// `general.file_type` and `general.quantization_version` are set by the writer.
    pub metadata: Vec<(String, Value)>,
}

/// One tensor of the file: its name, type, shape (`[n, k]`, HF order) and where it comes from.
struct Planned {
    name: String,
    ty: GgmlType,
    shape: Vec<usize>,
    from: String,
    /// How a quantized layer is stored; `None` for a float tensor.
    stored: Option<StoredLayout>,
    /// Heads of a Llama q/k tensor, whose rows go out in llama.cpp's RoPE order.
    rope_heads: Option<usize>,
}

/// A quantized layer's stored form: bits, group, zero points.
#[derive(Clone, Copy)]
struct StoredLayout {
    bits: u32,
    group: usize,
    zero_points: bool,
}

impl Planned {
    fn bytes(&self) -> usize {
        self.ty.bytes(self.shape.iter().product())
    }
}

/// Writes `export` to `out` as a GGUF file: under a temporary name in the same folder, renamed
/// when complete (an existing `out` is replaced only when `overwrite`). `progress` counts bytes.
pub fn write_gguf(out: &Path, export: &GgufExport, overwrite: bool, mut progress: impl FnMut(Progress)) -> Result<GgufReport> {
    if out.exists() && !overwrite {
        bail!("{}: already exists (choose another name, or replace it on purpose)", out.display())
    }
    let (plan, mut report) = plan(export)?;
    let file_type = most_common_type(&plan);
    let mut metadata: Vec<(String, Value)> = export
        .metadata
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "general.file_type" | "general.quantization_version" | "general.alignment"))
        .cloned()
        .collect();
    metadata.push(("general.file_type".into(), Value::U32(file_type.file_type())));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    let name =
        out.file_name().and_then(|n| n.to_str()).ok_or_else(|| candle_core::Error::Msg(format!("{}: not a file name", out.display())))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let written = write_file(&tmp, export, &plan, &metadata, &mut report, &mut progress).and_then(|bytes| {
        std::fs::rename(&tmp, out).map_err(|e| candle_core::Error::Msg(format!("renaming {} to {}: {e}", tmp.display(), out.display())))?;
        Ok(bytes)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    report.bytes = written?;
    report.tensors = plan.len();
    Ok(report)
}

/// The quantized type most layers go out as (F32 when none is quantized).
fn most_common_type(plan: &[Planned]) -> GgmlType {
    let mut counts: Vec<(GgmlType, usize)> = vec![];
    for p in plan.iter().filter(|p| p.stored.is_some()) {
        match counts.iter_mut().find(|(t, _)| *t == p.ty) {
            Some((_, n)) => *n += 1,
            None => counts.push((p.ty, 1)),
        }
    }
    counts.iter().max_by_key(|&&(_, n)| n).map_or(GgmlType::F32, |&(t, _)| t)
}

/// Every tensor the file will hold, in the source's order, with GGUF names and types.
fn plan(export: &GgufExport) -> Result<(Vec<Planned>, GgufReport)> {
    let (source, config) = (export.tensors, export.config);
    let gemma3 = match config.model_type.as_str() {
        "llama" => false,
        "gemma3_text" | "gemma3" => true,
        other => bail!("GGUF export supports Llama-family (llama) and Gemma 3 models, not '{other}'"),
    };
    if config.rope_scaling.is_some() {
        bail!("GGUF export: RoPE scaling is not written (llama.cpp needs it as a rope_freqs tensor); this model has rope_scaling")
    }
    let tied = source.entry("model.embed_tokens.weight").is_none();
    let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads.unwrap_or(config.num_attention_heads));
    let mut report = GgufReport::default();
    let mut plan = vec![];
    for e in source.entries() {
        let name = e.name.as_str();
        if [".weight_scale", ".weight_zero_point", ".input_scale", ".input_zero_point"].iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let hf = if tied && name == "lm_head.weight" { "model.embed_tokens.weight" } else { name };
        let Some(gguf) = gguf_name(hf, gemma3) else {
            bail!("{}: has no GGUF name in a {} model", source.describe(name), config.model_type)
        };
        // Llama's q/k rows go out in llama.cpp's RoPE order.
        let rope_heads = match gguf.rsplit('.').nth(1) {
            Some("attn_q") if !gemma3 => Some(heads),
            Some("attn_k") if !gemma3 => Some(kv_heads),
            _ => None,
        };
        let layer = name.strip_suffix(".weight").filter(|l| source.entry(&format!("{l}.weight_scale")).is_some());
        let Some(layer) = layer else {
            let ty = if e.dtype == Dtype::F16 && e.shape.len() > 1 { GgmlType::F16 } else { GgmlType::F32 };
            if !e.dtype.is_float() {
                bail!("{}: a {} tensor has no GGUF type here", source.describe(name), e.dtype.name())
            }
            plan.push(Planned { name: gguf, ty, shape: e.shape.clone(), from: name.into(), stored: None, rope_heads });
            continue;
        };
        let scheme = export.quantization.scheme_for(layer);
        let &[n, k_stored] = e.shape.as_slice() else {
            bail!("{}: a quantized weight must be 2-D, found {:?}", source.describe(name), e.shape)
        };
        let bits = if e.dtype == Dtype::U8 { 4 } else { 8 };
        // Int4 rows hold two values a byte (an odd count would fail GGUF's multiple of 32 below).
        let k = if bits == 4 { 2 * k_stored } else { k_stored };
        // An int8 table (untied embeddings) has no scheme: its grid is its scales'.
        let table = export.quantization.is_table(layer);
        let group = export.quantization.weight_group(source, layer, k);
        let zero_points = source.entry(&format!("{layer}.weight_zero_point")).is_some();
        if !k.is_multiple_of(QK) {
            bail!("{}: {k} input channels: GGUF blocks need a multiple of {QK}", source.describe(name))
        }
        let ty = match (bits, zero_points, blocks::blocks_align(k, group)) {
            (8, _, true) => GgmlType::Q8_0,
            (4, false, true) => GgmlType::Q4_0,
            (4, true, true) => GgmlType::Q4_1,
            _ => GgmlType::Q8_0,
        };
        if !table && matches!(scheme, LayerScheme::Static { .. }) {
            report
                .dropped
                .push(format!("layer '{layer}': its calibrated activation ranges (GGUF engines quantize activations themselves)"));
        }
        let layout = StoredLayout { bits, group, zero_points };
        plan.push(Planned { name: gguf, ty, shape: vec![n, k], from: layer.into(), stored: Some(layout), rope_heads });
    }
    Ok((plan, report))
}

fn write_file(
    tmp: &Path,
    export: &GgufExport,
    plan: &[Planned],
    metadata: &[(String, Value)],
    report: &mut GgufReport,
    progress: &mut impl FnMut(Progress),
) -> Result<u64> {
    let io = |e: std::io::Error| candle_core::Error::Msg(format!("{}: {e}", tmp.display()));
    let file = std::fs::File::create(tmp).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(plan.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend_from_slice(&value_type(value)?.to_le_bytes());
        put_value(&mut header, value)?;
    }
    let mut offset = 0usize;
    for p in plan {
        put_string(&mut header, &p.name);
        header.extend_from_slice(&(p.shape.len() as u32).to_le_bytes());
        // ggml lists dimensions innermost first.
        for &d in p.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&p.ty.id().to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += p.bytes().next_multiple_of(ALIGNMENT);
    }
    header.resize(header.len().next_multiple_of(ALIGNMENT), 0);
    w.write_all(&header).map_err(io)?;
    let total = offset as u64;
    let mut done = 0u64;
    for p in plan {
        let bytes = tensor_bytes(export, p, report)?;
        if bytes.len() != p.bytes() {
            bail!("GGUF tensor '{}': produced {} bytes, planned {}", p.name, bytes.len(), p.bytes())
        }
        w.write_all(&bytes).map_err(io)?;
        w.write_all(&vec![0u8; bytes.len().next_multiple_of(ALIGNMENT) - bytes.len()]).map_err(io)?;
        done += bytes.len().next_multiple_of(ALIGNMENT) as u64;
        progress(Progress::bytes("writing GGUF", done, total));
    }
    w.flush().map_err(io)?;
    w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
    Ok(header.len() as u64 + total)
}

/// One tensor's bytes as the file stores them.
fn tensor_bytes(export: &GgufExport, p: &Planned, report: &mut GgufReport) -> Result<Vec<u8>> {
    let source = export.tensors;
    // Rows along the first dimension (a 0-d tensor is one row).
    let n = p.shape.first().copied().unwrap_or(1);
    let order = match p.rope_heads {
        Some(heads) => rope_row_order(n, heads, export.config.head_dim(), true).map_err(|e| e.context(source.describe(&p.from)))?,
        None => (0..n).collect(),
    };
    let Some(layout) = p.stored else {
        let e = source.entry(&p.from).ok_or_else(|| candle_core::Error::Msg(format!("{}: missing", source.describe(&p.from))))?;
        let bytes = source.read_bytes(&p.from)?;
        let count: usize = p.shape.iter().product();
        let mut values = vec![0f32; count];
        crate::source::widen_into(e.dtype, &bytes, &mut values);
        // Gemma's norms multiply by 1 + w; llama.cpp stores the sum.
        if export.config.model_type.starts_with("gemma3") && p.from.ends_with("norm.weight") {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        let row = count / n.max(1);
        let ordered = order.iter().flat_map(|&j| values[j * row..(j + 1) * row].iter().copied());
        return Ok(match p.ty {
            GgmlType::F16 => ordered.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
            _ => ordered.flat_map(f32::to_le_bytes).collect(),
        });
    };
    let layer = &p.from;
    let values = source.read_bytes(&format!("{layer}.weight"))?;
    let scales = source.read_bytes(&format!("{layer}.weight_scale"))?;
    let zero_points = if layout.zero_points { source.read_bytes(&format!("{layer}.weight_zero_point"))? } else { vec![] };
    let rows = StoredRows {
        bits: layout.bits,
        n,
        k: p.shape[1],
        group: layout.group,
        values: &values,
        scales: &scales,
        zero_points: &zero_points,
    };
    rows.check().map_err(|e| e.context(source.describe(layer)))?;
    let exact = rows.blocks_align();
    match (p.ty, exact) {
        (GgmlType::Q8_0, true) if layout.bits == 8 => {
            report.exact_layers += 1;
            Ok(blocks::q8_0_from_int8(&rows, &order))
        }
        (GgmlType::Q4_0, true) => {
            report.exact_layers += 1;
            Ok(blocks::q4_0_from_int4(&rows, &order))
        }
        (GgmlType::Q4_1, true) => {
            let (bytes, squared_error) = blocks::q4_1_from_int4(&rows, &order);
            let norm = squared_norm(&rows);
            let reason = "asymmetric int4: Q4_1's minimum −s·z rounded to f16".to_string();
            report.lossy.push(GgufLoss {
                layer: layer.clone(),
                written_as: GgmlType::Q4_1,
                reason,
                relative_error: relative(squared_error, norm),
            });
            Ok(bytes)
        }
        _ => {
            let (mut bytes, mut row, mut squared_error, mut norm) = (vec![], vec![0f32; rows.k], 0.0, 0.0);
            let mut back = vec![];
            for &j in &order {
                rows.dequantize_row(j, &mut row);
                let start = bytes.len();
                blocks::q8_0_from_floats(&row, &mut bytes);
                back.clear();
                for block in bytes[start..].chunks(blocks::Q8_0_BYTES) {
                    let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                    back.extend(block[2..].iter().map(|&q| d * q as i8 as f32));
                }
                squared_error += row.iter().zip(&back).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
                norm += row.iter().map(|&a| (a as f64).powi(2)).sum::<f64>();
            }
            let reason = format!("int{} in groups of {}: no GGUF block type holds them; re-rounded to Q8_0", layout.bits, layout.group);
            report.lossy.push(GgufLoss {
                layer: layer.clone(),
                written_as: GgmlType::Q8_0,
                reason,
                relative_error: relative(squared_error, norm),
            });
            Ok(bytes)
        }
    }
}

fn squared_norm(rows: &StoredRows) -> f64 {
    let mut row = vec![0f32; rows.k];
    (0..rows.n)
        .map(|j| {
            rows.dequantize_row(j, &mut row);
            row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>()
        })
        .sum()
}

fn relative(squared_error: f64, squared_norm: f64) -> f64 {
    if squared_norm > 0.0 {
        (squared_error / squared_norm).sqrt()
    } else {
        squared_error.sqrt()
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's id of a value's type.
fn value_type(v: &Value) -> Result<u32> {
    Ok(match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    })
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            let ty = items.first().map(value_type).transpose()?.unwrap_or(4);
            for item in items {
                if value_type(item)? != ty {
                    bail!("GGUF metadata: an array mixes value types")
                }
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item)?;
            }
        }
    }
    Ok(())
}

/// A GGUF source's metadata, to be carried over (sorted by key, `general.architecture` first).
pub fn metadata_from_gguf(metadata: &HashMap<String, Value>) -> Vec<(String, Value)> {
    let mut kv: Vec<(String, Value)> =
        metadata.iter().filter(|(k, _)| !k.starts_with("split.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    kv.sort_by(|a, b| (a.0 != "general.architecture").cmp(&(b.0 != "general.architecture")).then(a.0.cmp(&b.0)));
    kv
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const UNUSED: i32 = 5;

/// The metadata llama.cpp needs for a Llama model given as a Hugging Face config and a byte-level
/// BPE `tokenizer` (its `tokenizer.json` text): hyperparameters, vocabulary, merges, special
/// tokens and the chat template. Other tokenizers are refused, naming what they are.
pub fn metadata_for_llama(
    config: &DecoderConfig,
    tokenizer_json: &str,
    chat_template: Option<&str>,
    name: &str,
) -> Result<Vec<(String, Value)>> {
    if config.model_type != "llama" {
        bail!(
            "GGUF metadata can be built for Llama models; a {} model needs a GGUF source (quantize its GGUF file instead)",
            config.model_type
        )
    }
    let json: serde_json::Value =
        serde_json::from_str(tokenizer_json).map_err(|e| candle_core::Error::Msg(format!("tokenizer.json: {e}")))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        bail!("tokenizer.json: a {} model; GGUF export writes byte-level BPE tokenizers", model["type"])
    }
    let pre = byte_level_pre(&json["pre_tokenizer"])?;
    let vocab = model["vocab"].as_object().ok_or_else(|| candle_core::Error::Msg("tokenizer.json: model.vocab is not an object".into()))?;
    let mut tokens: Vec<Option<String>> = vec![None; config.vocab_size.max(vocab.len())];
    let mut types = vec![NORMAL; tokens.len()];
    for (token, id) in vocab {
        let id = id.as_u64().ok_or_else(|| candle_core::Error::Msg(format!("tokenizer.json: token '{token}' has no id")))? as usize;
        if id >= tokens.len() {
            tokens.resize(id + 1, None);
            types.resize(id + 1, NORMAL);
        }
        tokens[id] = Some(token.clone());
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else { continue };
        let id = id as usize;
        if id >= tokens.len() {
            tokens.resize(id + 1, None);
            types.resize(id + 1, NORMAL);
        }
        tokens[id] = Some(content.to_string());
        if added["special"].as_bool().unwrap_or(false) {
            types[id] = CONTROL;
        }
    }
    // Ids no token holds (a vocabulary padded to the embedding's rows) get placeholder tokens.
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(pair) if pair.len() == 2 => {
                Ok(Value::String(format!("{} {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or(""))))
            }
            other => bail!("tokenizer.json: malformed merge {other}"),
        })
        .collect::<Result<_>>()?;
    let head_dim = config.head_dim();
    let u32v = |v: usize| Value::U32(v as u32);
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name.into())),
        ("llama.context_length".into(), u32v(config.max_position_embeddings)),
        ("llama.embedding_length".into(), u32v(config.hidden_size)),
        ("llama.block_count".into(), u32v(config.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u32v(config.intermediate_size)),
        ("llama.attention.head_count".into(), u32v(config.num_attention_heads)),
        ("llama.attention.head_count_kv".into(), u32v(config.num_key_value_heads.unwrap_or(config.num_attention_heads))),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(config.rms_norm_eps as f32)),
        ("llama.rope.freq_base".into(), Value::F32(config.rope_theta)),
        ("llama.rope.dimension_count".into(), u32v(head_dim)),
        ("llama.attention.key_length".into(), u32v(head_dim)),
        ("llama.attention.value_length".into(), u32v(head_dim)),
        ("llama.vocab_size".into(), u32v(tokens.len())),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(config.add_bos_token)),
    ];
    if let Some(bos) = config.bos_token_id {
        kv.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(&eos) = config.eos_token_id.first() {
        kv.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if let Some(t) = chat_template {
        kv.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(kv)
}

/// llama.cpp's name for a byte-level pre-tokenizer: `gpt2` (byte level alone) or `smollm` (digits
/// split one by one first).
fn byte_level_pre(pre: &serde_json::Value) -> Result<&'static str> {
    let kinds: Vec<&serde_json::Value> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default(),
        _ => vec![pre],
    };
    match kinds.iter().map(|p| p["type"].as_str().unwrap_or("?")).collect::<Vec<_>>().as_slice() {
        ["ByteLevel"] => Ok("gpt2"),
        ["Digits", "ByteLevel"] if kinds[0]["individual_digits"] == true => Ok("smollm"),
        other => bail!("tokenizer.json: pre-tokenizer {other:?} has no llama.cpp name here (byte level, optionally after single digits)"),
    }
}
