//! Hugging Face `compressed-tensors` checkpoints (what vLLM, SGLang and transformers serve), out
//! and in, beside this toolkit's own folders.
//!
//! The tensors are nearly the same: an int8 layer `L` is `L.weight` (`I8` `[out, in]`) and
//! `L.weight_scale` (`[out, groups]`, or `[out, 1]` per channel), `w = q · s` — `int-quantized`
//! (W8A8) or `naive-quantized` (W8A16). A 4-bit layer is `pack-quantized`: `L.weight_packed`
//! (`I32` `[out, in/8]`, value `c` of a row at bits `4c` of the row's little-endian stream, as
//! `q + 8`), `L.weight_shape` (`[out, in]`) and, asymmetric, `L.weight_zero_point` (`z − 8`
//! packed the same way down the output channels, `I32` `[⌈out/8⌉, groups]`). This toolkit's int4
//! nibbles `u = q + 8` (or `q + z`) are those packed values byte for byte.
//!
//! `quantization_config` describes each scheme in `config_groups` (targets: layer names, or
//! `Linear` when one scheme covers every quantized layer) and lists float layers in `ignore`.

use crate::checkpoint::{CheckpointScheme, LayerScheme};
use crate::quant::QScheme;
use crate::source::{index_of, Dtype, Entry, TensorSource};
use candle_core::{bail, Result};
use half::f16;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// `quantization_config.quant_method` of these checkpoints.
pub const QUANT_METHOD: &str = "compressed-tensors";

/// Where a [`CompressedTensorsView`] tensor comes from.
#[derive(Debug, Clone)]
enum Origin {
    /// The source tensor of that name, as stored.
    Copy(String),
    /// Int4 nibbles read as `I32` words (the same bytes).
    Packed(String),
    /// `[out, in]` of a 4-bit layer, as `I64`.
    Shape([usize; 2]),
    /// Asymmetric int4 zero points `[out, groups]` packed down the output channels.
    ZeroPoints { from: String, n: usize, groups: usize },
    /// Embeddings as `f32`: a tied model's int8 `lm_head` rows, or an int8 table, dequantized.
    Embeddings { layer: String, bits: u32, n: usize, k: usize, group: usize },
}

/// A checkpoint's tensors (this toolkit's names and layouts) as a `compressed-tensors` folder
/// holds them.
pub struct CompressedTensorsView<'a> {
    source: &'a dyn TensorSource,
    entries: Vec<Entry>,
    origins: Vec<Origin>,
    index: HashMap<String, usize>,
}

impl<'a> CompressedTensorsView<'a> {
    /// The view of `source`, whose quantized layers follow `quantization`.
    pub fn new(source: &'a dyn TensorSource, quantization: &CheckpointScheme) -> Result<Self> {
        let (mut entries, mut origins) = (vec![], vec![]);
        let mut push = |e: Entry, o: Origin| {
            entries.push(e);
            origins.push(o);
        };
        let tied = source.entry("model.embed_tokens.weight").is_none() && source.entry("lm_head.weight_scale").is_some();
        for e in source.entries() {
            let name = e.name.as_str();
            if name.ends_with(".input_scale") || name.ends_with(".input_zero_point") {
                continue;
            }
            // An int8 table goes out as float (engines look embeddings up in a float table).
            if [".weight_scale", ".weight_zero_point"].iter().any(|s| name.strip_suffix(s).is_some_and(|l| quantization.is_table(l))) {
                continue;
            }
            let layer = name.strip_suffix(".weight").filter(|l| source.entry(&format!("{l}.weight_scale")).is_some());
            if let Some(layer) = layer {
                let &[n, stored_k] = e.shape.as_slice() else { bail!("{}: a quantized weight must be 2-D", source.describe(name)) };
                let bits = if e.dtype == Dtype::U8 { 4 } else { 8 };
                let k = if bits == 4 { 2 * stored_k } else { stored_k };
                if k == 0 {
                    bail!("{}: a quantized weight with no input channels", source.describe(name))
                }
                let group = quantization.weight_group(source, layer, k);
                if quantization.is_table(layer) {
                    let table = Entry { name: e.name.clone(), dtype: Dtype::F32, shape: vec![n, k] };
                    push(table, Origin::Embeddings { layer: layer.into(), bits, n, k, group });
                    continue;
                }
                if tied && layer == "lm_head" {
                    let embed = Entry { name: "model.embed_tokens.weight".into(), dtype: Dtype::F32, shape: vec![n, k] };
                    push(embed, Origin::Embeddings { layer: layer.into(), bits, n, k, group });
                }
                if bits == 8 {
                    push(e.clone(), Origin::Copy(e.name.clone()));
                    continue;
                }
                if !k.is_multiple_of(8) {
                    bail!("{}: {k} input channels: pack-quantized rows are whole 32-bit words (a multiple of 8)", source.describe(name))
                }
                push(
                    Entry { name: format!("{layer}.weight_packed"), dtype: Dtype::I32, shape: vec![n, k / 8] },
                    Origin::Packed(e.name.clone()),
                );
                push(Entry { name: format!("{layer}.weight_shape"), dtype: Dtype::I64, shape: vec![2] }, Origin::Shape([n, k]));
                continue;
            }
            if let Some(layer) = name.strip_suffix(".weight_zero_point") {
                let &[n, groups] = e.shape.as_slice() else { bail!("{}: zero points must be 2-D", source.describe(name)) };
                let entry = Entry { name: e.name.clone(), dtype: Dtype::I32, shape: vec![n.div_ceil(8), groups] };
                push(entry, Origin::ZeroPoints { from: format!("{layer}.weight_zero_point"), n, groups });
                continue;
            }
            push(e.clone(), Origin::Copy(e.name.clone()));
        }
        let index = index_of(&entries);
        Ok(Self { source, entries, origins, index })
    }
}

impl TensorSource for CompressedTensorsView<'_> {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let Some(&i) = self.index.get(name) else { bail!("no tensor '{name}' in the compressed-tensors view") };
        match &self.origins[i] {
            Origin::Copy(from) | Origin::Packed(from) => self.source.read_bytes(from),
            Origin::Shape(dims) => Ok(dims.iter().flat_map(|&d| (d as i64).to_le_bytes()).collect()),
            Origin::ZeroPoints { from, n, groups } => {
                let z = self.source.read_bytes(from)?;
                // Column g of the packed words holds zero points of rows 8w..8w+8 of group g.
                let mut words = vec![0u32; n.div_ceil(8) * groups];
                for (i, &zp) in z.iter().enumerate().take(n * groups) {
                    let (j, g) = (i / groups, i % groups);
                    words[(j / 8) * groups + g] |= ((zp & 15) as u32) << (4 * (j % 8));
                }
                Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
            }
            Origin::Embeddings { layer, bits, n, k, group } => {
                let values = self.source.read_bytes(&format!("{layer}.weight"))?;
                let scales = self.source.read_bytes(&format!("{layer}.weight_scale"))?;
                let zp = format!("{layer}.weight_zero_point");
                let zero_points = if self.source.entry(&zp).is_some() { self.source.read_bytes(&zp)? } else { vec![] };
                let rows = crate::io::gguf::blocks::StoredRows {
                    bits: *bits,
                    n: *n,
                    k: *k,
                    group: *group,
                    values: &values,
                    scales: &scales,
                    zero_points: &zero_points,
                };
                rows.check().map_err(|e| e.context(self.source.describe(&format!("{layer}.weight"))))?;
                let mut out = Vec::with_capacity(rows.n * k * 4);
                let mut row = vec![0f32; *k];
                for j in 0..rows.n {
                    rows.dequantize_row(j, &mut row);
                    out.extend(row.iter().flat_map(|v| v.to_le_bytes()));
                }
                Ok(out)
            }
        }
    }

    fn describe(&self, name: &str) -> String {
        match self.index.get(name).map(|&i| &self.origins[i]) {
            Some(Origin::Copy(from) | Origin::Packed(from)) => self.source.describe(from),
            _ => format!("tensor '{name}' of the compressed-tensors view"),
        }
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }
}

/// The `compressed-tensors` description of one layer scheme: its `weights`, `input_activations`
/// and `format`; `Err` for what the format has no place for.
fn scheme_json(scheme: &LayerScheme) -> Result<Value> {
    let weights = |group: Option<usize>, bits: u32, zero_point: bool| {
        let mut w = json!({"num_bits": bits, "type": "int", "symmetric": !zero_point, "dynamic": false, "observer": "minmax"});
        match group {
            Some(g) => {
                w["strategy"] = "group".into();
                w["group_size"] = g.into();
            }
            None => w["strategy"] = "channel".into(),
        }
        w
    };
    let format = |bits: u32, activations: bool| match (bits, activations) {
        (4, _) => "pack-quantized",
        (_, true) => "int-quantized",
        _ => "naive-quantized",
    };
    Ok(match *scheme {
        LayerScheme::Dynamic { weight_group_size, activation_group_size, activation_scheme, weight_bits, weight_zero_point, .. } => {
            let mut a = json!({"num_bits": 8, "type": "int", "symmetric": activation_scheme == QScheme::Symmetric, "dynamic": true});
            match activation_group_size {
                Some(g) => {
                    a["strategy"] = "group".into();
                    a["group_size"] = g.into();
                }
                None => a["strategy"] = "token".into(),
            }
            json!({
                "weights": weights(weight_group_size, weight_bits, weight_zero_point),
                "input_activations": a,
                "output_activations": null,
                "format": format(weight_bits, true),
            })
        }
        LayerScheme::WeightOnly { weight_group_size, weight_bits, weight_zero_point } => json!({
            "weights": weights(weight_group_size, weight_bits, weight_zero_point),
            "input_activations": null,
            "output_activations": null,
            "format": format(weight_bits, false),
        }),
        LayerScheme::Static { .. } => {
            bail!("static layers (calibrated activation ranges per group) have no compressed-tensors scheme here: quantize with --mode dynamic or weight-only")
        }
    })
}

/// The `quantization_config` of a `compressed-tensors` folder for the quantized layers of
/// `source` (those with a `weight_scale`) under `quantization`: one config group per scheme,
/// float layers in `ignore`. Also what the format cannot say (outlier thresholds).
pub fn quantization_config(source: &dyn TensorSource, quantization: &CheckpointScheme) -> Result<(Value, Vec<String>)> {
    let layers: Vec<&str> =
        source.entries().iter().filter_map(|e| e.name.strip_suffix(".weight_scale")).filter(|l| !quantization.is_table(l)).collect();
    let mut groups: Vec<(Value, Vec<String>)> = vec![];
    let mut dropped = vec![];
    for layer in &layers {
        let scheme = quantization.scheme_for(layer);
        if let LayerScheme::Dynamic { outlier_threshold: Some(t), .. } = scheme {
            let note = format!("outlier threshold {t} (inputs above it multiplied in float here; other engines quantize every input)");
            if !dropped.contains(&note) {
                dropped.push(note);
            }
        }
        let json = scheme_json(scheme).map_err(|e| e.context(format!("layer '{layer}'")))?;
        match groups.iter_mut().find(|(s, _)| *s == json) {
            Some((_, names)) => names.push(layer.to_string()),
            None => groups.push((json, vec![layer.to_string()])),
        }
    }
    if groups.is_empty() {
        bail!("no quantized layer to describe")
    }
    let single = groups.len() == 1;
    let formats: Vec<String> = groups.iter().filter_map(|(s, _)| s["format"].as_str().map(String::from)).collect();
    let format = if formats.iter().all(|f| *f == formats[0]) { formats[0].clone() } else { "mixed-precision".to_string() };
    let config_groups: serde_json::Map<String, Value> = groups
        .into_iter()
        .enumerate()
        .map(|(i, (mut scheme, names))| {
            scheme["targets"] = if single { json!(["Linear"]) } else { json!(names) };
            (format!("group_{i}"), scheme)
        })
        .collect();
    let config = json!({
        "quant_method": QUANT_METHOD,
        "format": format,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": quantization.excluded,
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
    });
    Ok((config, dropped))
}

/// A `compressed-tensors` folder's tensors as this toolkit's: `weight_packed` nibbles as `U8`
/// `[out, in/2]`, packed zero points unpacked to `U8` `[out, groups]`, scales as `F16` (other
/// float scales rounded to it), int8 values of −128 (which symmetric int8 there can reach, and
/// the int8 tiles here cannot take) clamped to −127; every other tensor as stored.
pub struct CompressedTensorsSource {
    source: std::sync::Arc<dyn TensorSource>,
    entries: Vec<Entry>,
    origins: Vec<InOrigin>,
    index: HashMap<String, usize>,
}

/// Where a [`CompressedTensorsSource`] tensor comes from.
#[derive(Debug, Clone)]
enum InOrigin {
    Copy(String),
    /// `I8` values with −128 clamped.
    Int8(String),
    /// Packed int4 words as nibble bytes.
    Packed(String),
    /// Scales of another float dtype, rounded to `f16`.
    Scales(String, Dtype),
    /// Packed zero points `[⌈out/8⌉, groups]` unpacked to `[out, groups]`.
    ZeroPoints {
        from: String,
        n: usize,
        groups: usize,
    },
}

impl CompressedTensorsSource {
    /// The view of `source` (a folder's tensors) under `config`'s `quantization_config`, with the
    /// scheme of every quantized layer.
    pub fn new(source: std::sync::Arc<dyn TensorSource>, config: &Value) -> Result<(Self, CheckpointScheme)> {
        let q = &config["quantization_config"];
        let format = q["format"].as_str().unwrap_or("");
        if !["int-quantized", "naive-quantized", "pack-quantized", "mixed-precision"].contains(&format) {
            bail!(
                "quantization_config.format '{format}' is not read here (int-quantized, naive-quantized, pack-quantized, mixed-precision)"
            )
        }
        if q["quantization_status"].as_str() != Some("compressed") {
            bail!(
                "quantization_config.quantization_status is {}: only compressed checkpoints hold integer weights",
                q["quantization_status"]
            )
        }
        let groups =
            q["config_groups"].as_object().ok_or_else(|| candle_core::Error::Msg("quantization_config.config_groups is missing".into()))?;
        let ignore: Vec<String> = q["ignore"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
        // Every quantized layer: `weight_scale` beside `weight` or `weight_packed`.
        let layers: Vec<String> = source.entries().iter().filter_map(|e| e.name.strip_suffix(".weight_scale")).map(String::from).collect();
        let mut schemes: BTreeMap<String, LayerScheme> = BTreeMap::new();
        for layer in &layers {
            let (name, group) = groups
                .iter()
                .find(|(_, g)| targets(g).iter().any(|t| *t == layer.as_str() || target_matches(t, layer)))
                .or_else(|| groups.iter().find(|(_, g)| targets(g).contains(&"Linear")))
                .ok_or_else(|| candle_core::Error::Msg(format!("layer '{layer}' has a weight_scale but no config group targets it")))?;
            let scheme = layer_scheme(group).map_err(|e| e.context(format!("layer '{layer}' (config group '{name}')")))?;
            schemes.insert(layer.clone(), scheme);
        }
        let (mut entries, mut origins) = (vec![], vec![]);
        for e in source.entries() {
            let name = e.name.as_str();
            let describe = || source.describe(name);
            if let Some(layer) = name.strip_suffix(".weight_packed") {
                let Some(&[n, words]) = Some(e.shape.as_slice()).filter(|_| e.dtype == Dtype::I32) else {
                    bail!("{}: weight_packed must be I32 [out, in/8], found {} {:?}", describe(), e.dtype.name(), e.shape)
                };
                if schemes.get(layer).is_none_or(|s| s.weight_quant().bits() != 4) {
                    bail!("{}: packed weights of a layer whose config group is not 4-bit", describe())
                }
                entries.push(Entry { name: format!("{layer}.weight"), dtype: Dtype::U8, shape: vec![n, 4 * words] });
                origins.push(InOrigin::Packed(e.name.clone()));
            } else if name.ends_with(".weight_shape") {
                continue;
            } else if let Some(layer) = name.strip_suffix(".weight_zero_point") {
                let Some(scales) = source.entry(&format!("{layer}.weight_scale")) else {
                    bail!("{}: zero points without scales", describe())
                };
                let &[n, groups] = scales.shape.as_slice() else { bail!("{}: scales must be 2-D", describe()) };
                if e.dtype != Dtype::I32 || e.shape != [n.div_ceil(8), groups] {
                    bail!(
                        "{}: packed zero points must be I32 [{}, {groups}], found {} {:?}",
                        describe(),
                        n.div_ceil(8),
                        e.dtype.name(),
                        e.shape
                    )
                }
                entries.push(Entry { name: e.name.clone(), dtype: Dtype::U8, shape: vec![n, groups] });
                origins.push(InOrigin::ZeroPoints { from: e.name.clone(), n, groups });
            } else if name.ends_with(".weight_scale") {
                if !e.dtype.is_float() || e.shape.len() != 2 {
                    bail!("{}: weight_scale must be float [out, groups], found {} {:?}", describe(), e.dtype.name(), e.shape)
                }
                entries.push(Entry { name: e.name.clone(), dtype: Dtype::F16, shape: e.shape.clone() });
                origins.push(if e.dtype == Dtype::F16 {
                    InOrigin::Copy(e.name.clone())
                } else {
                    InOrigin::Scales(e.name.clone(), e.dtype)
                });
            } else if e.dtype == Dtype::I8 {
                if name.strip_suffix(".weight").is_none_or(|l| !schemes.contains_key(l)) {
                    bail!("{}: an I8 tensor that is not a quantized layer's weight", describe())
                }
                entries.push(e.clone());
                origins.push(InOrigin::Int8(e.name.clone()));
            } else {
                entries.push(e.clone());
                origins.push(InOrigin::Copy(e.name.clone()));
            }
        }
        let mut scheme: Option<CheckpointScheme> = None;
        for (layer, s) in schemes {
            match &mut scheme {
                None => scheme = Some(CheckpointScheme::new(s)),
                Some(c) => c.set(&layer, s),
            }
        }
        let mut scheme = scheme.ok_or_else(|| candle_core::Error::Msg("no quantized layer (no tensor has a weight_scale)".into()))?;
        scheme.excluded = ignore;
        let index = index_of(&entries);
        Ok((Self { source, entries, origins, index }, scheme))
    }
}

fn targets(group: &Value) -> Vec<&str> {
    group["targets"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect()
}

/// A `re:` target (a regular expression on module names) of the two shapes writers use:
/// `re:.*suffix$` and `re:.*suffix`.
fn target_matches(target: &str, layer: &str) -> bool {
    let Some(pattern) = target.strip_prefix("re:") else { return false };
    let body = pattern.trim_start_matches(".*").trim_end_matches('$');
    !body.is_empty() && body.chars().all(|c| c.is_ascii_alphanumeric() || "._".contains(c)) && layer.ends_with(body)
}

/// This toolkit's scheme for a config group; `Err` naming what does not map.
fn layer_scheme(group: &Value) -> Result<LayerScheme> {
    let w = &group["weights"];
    let bits = w["num_bits"].as_u64().unwrap_or(0) as u32;
    if w["type"].as_str() != Some("int") || !matches!(bits, 4 | 8) {
        bail!("weights of {} bits, type {}: only int8 and int4 weights map to this toolkit's layers", w["num_bits"], w["type"])
    }
    let symmetric = w["symmetric"].as_bool().unwrap_or(true);
    if bits == 8 && !symmetric {
        bail!("asymmetric int8 weights have no layer here (int8 weights are symmetric)")
    }
    let weight_group_size = match w["strategy"].as_str() {
        Some("group") => Some(
            w["group_size"]
                .as_u64()
                .filter(|&g| g > 0)
                .ok_or_else(|| candle_core::Error::Msg("group strategy without a group_size".into()))? as usize,
        ),
        Some("channel") => None,
        other => bail!("weight strategy {other:?}: only group and channel map to this toolkit's layers"),
    };
    let a = &group["input_activations"];
    if a.is_null() {
        return Ok(LayerScheme::WeightOnly { weight_group_size, weight_bits: bits, weight_zero_point: !symmetric });
    }
    if a["num_bits"].as_u64() != Some(8) || a["type"].as_str() != Some("int") || a["dynamic"].as_bool() != Some(true) {
        bail!("input activations {a}: only dynamic int8 activations map (static ones need calibrated ranges this reader does not take)")
    }
    let activation_group_size = match a["strategy"].as_str() {
        Some("token") => None,
        Some("group") => a["group_size"].as_u64().map(|g| g as usize),
        other => bail!("activation strategy {other:?}: only token and group map"),
    };
    let activation_scheme = if a["symmetric"].as_bool().unwrap_or(true) { QScheme::Symmetric } else { QScheme::Affine };
    let weight = if bits == 4 {
        crate::kernels::WeightQuant::Int4 { group: weight_group_size.unwrap_or(usize::MAX), zero_point: !symmetric }
    } else {
        weight_group_size.map_or(crate::kernels::WeightQuant::PerChannel, crate::kernels::WeightQuant::PerGroup)
    };
    // The format has no outlier threshold: this toolkit's default applies, as to a GGUF file.
    let config = crate::QuantConfig::default();
    let act = crate::nn::ActivationQuant::with_group(activation_scheme == QScheme::Affine, activation_group_size);
    Ok(LayerScheme::dynamic(&config, act, weight))
}

impl TensorSource for CompressedTensorsSource {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let Some(&i) = self.index.get(name) else { bail!("no tensor '{name}' in the checkpoint") };
        match &self.origins[i] {
            InOrigin::Copy(from) | InOrigin::Packed(from) => self.source.read_bytes(from),
            InOrigin::Int8(from) => {
                let mut bytes = self.source.read_bytes(from)?;
                bytes.iter_mut().filter(|b| **b == 0x80).for_each(|b| *b = (-127i8) as u8);
                Ok(bytes)
            }
            InOrigin::Scales(from, dtype) => {
                let bytes = self.source.read_bytes(from)?;
                let mut values = vec![0f32; bytes.len() / dtype.size()];
                crate::source::widen_into(*dtype, &bytes, &mut values);
                Ok(values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect())
            }
            InOrigin::ZeroPoints { from, n, groups } => {
                let words = self.source.read_bytes(from)?;
                let word = |w: usize| u32::from_le_bytes([words[4 * w], words[4 * w + 1], words[4 * w + 2], words[4 * w + 3]]);
                Ok((0..n * groups)
                    .map(|i| ((word((i / groups / 8) * groups + i % groups) >> (4 * ((i / groups) % 8))) & 15) as u8)
                    .collect())
            }
        }
    }

    fn describe(&self, name: &str) -> String {
        match self.index.get(name).map(|&i| &self.origins[i]) {
            Some(InOrigin::Copy(f) | InOrigin::Int8(f) | InOrigin::Packed(f) | InOrigin::Scales(f, _)) => self.source.describe(f),
            Some(InOrigin::ZeroPoints { from, .. }) => self.source.describe(from),
            None => format!("tensor '{name}'"),
        }
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }
}

/// What [`write_compressed_tensors`] wrote, and what the format had no place for.
#[derive(Debug, Clone)]
pub struct CompressedTensorsReport {
    /// The safetensors files and their bytes.
    pub written: crate::source::WriteReport,
    /// Settings of this toolkit's layers that other engines do not take (outlier thresholds).
    pub dropped: Vec<String>,
}

/// Writes the checkpoint `source` (this toolkit's tensors, schemes `quantization`) to `dir` as a
/// `compressed-tensors` folder: `options.config` with this format's `quantization_config`, the
/// tensors in its layout, `options.files` beside them; under a temporary name, renamed when
/// complete. A tied model whose `lm_head` is quantized gets its embeddings as f32 (the rows it
/// runs on) and `tie_word_embeddings: false`.
pub fn write_compressed_tensors(
    dir: &std::path::Path,
    source: &dyn TensorSource,
    quantization: &CheckpointScheme,
    options: &crate::checkpoint::SaveOptions,
    progress: impl FnMut(crate::progress::Progress),
) -> Result<CompressedTensorsReport> {
    let view = CompressedTensorsView::new(source, quantization)?;
    let (q, dropped) = quantization_config(source, quantization)?;
    let Value::Object(mut config) = options.config.clone() else { bail!("the model config to save must be a JSON object") };
    config.insert("quantization_config".into(), q);
    if source.entry("model.embed_tokens.weight").is_none() && view.entry("model.embed_tokens.weight").is_some() {
        config.insert("tie_word_embeddings".into(), false.into());
    }
    let written = crate::checkpoint::write_folder(dir, &view, &Value::Object(config), options, progress)?;
    Ok(CompressedTensorsReport { written, dropped })
}
