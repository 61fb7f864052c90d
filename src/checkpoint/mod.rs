//! Quantized checkpoints: int8 models saved as a Hugging Face–style folder and loaded back
//! without ever holding a float copy of a quantized weight.
//!
//! A checkpoint is `config.json` (the model's, plus a `quantization_config` object: see
//! [`CheckpointScheme`]) and safetensors files in which each int8 layer `L` has `L.weight`
//! (`I8`, `[out, in]`, values in `[-127, 127]`), `L.weight_scale` (`F16`, `[out, ⌈in / group⌉]`),
//! its float `L.bias`, and for static layers `L.input_scale` (`F32`, `[1]` or one per group) and
//! `L.input_zero_point` (`I32`, the same shape): `w[o, i] = weight[o, i] · weight_scale[o, i / group]`.
//! Every other tensor is stored as it was. `docs/checkpoint-format.md` is the full description.
//!
//! Saving: [`save_quantized`] for any [`Quantizable`] model in memory; [`write_checkpoint`]
//! streams any [`TensorSource`] (the `quantize` command streams a float checkpoint through a
//! [`PlannedSource`], one tensor in memory at a time). Loading: [`QuantizedCheckpoint::open`],
//! build the model on its [`QuantizedCheckpoint::var_builder`] with [`crate::QLinear::load`]
//! layers, then [`QuantizedCheckpoint::apply`] (or [`load_quantized`] for both).
//!
//! A model of your own, saved and loaded back:
//!
//! ```
//! use candle_core::{Device, DType, Module, Result, Tensor};
//! use candle_nn::VarBuilder;
//! use candle_quant::checkpoint::{load_quantized, save_quantized, SaveOptions};
//! use candle_quant::{quantize_dynamic, QLinear, QuantConfig, Quantizable};
//!
//! struct Mlp { up: QLinear, down: QLinear }
//!
//! impl Mlp {
//!     fn load(vb: VarBuilder) -> Result<Self> {
//!         Ok(Self { up: QLinear::load(64, 128, true, vb.pp("up"))?, down: QLinear::load(128, 64, false, vb.pp("down"))? })
//!     }
//!     fn forward(&self, x: &Tensor) -> Result<Tensor> {
//!         self.down.forward(&self.up.forward(x)?.relu()?)
//!     }
//! }
//!
//! impl Quantizable for Mlp {
//!     fn visit_linears(&mut self, f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
//!         f(&mut self.up)?;
//!         f(&mut self.down)
//!     }
//! }
//!
//! # fn main() -> Result<()> {
//! let mut model = Mlp::load(VarBuilder::from_varmap(&candle_nn::VarMap::new(), DType::F32, &Device::Cpu))?;
//! quantize_dynamic(&mut model, &QuantConfig::default())?;
//! let dir = std::env::temp_dir().join(format!("mlp-int8-{}", std::process::id()));
//! save_quantized(&mut model, &dir, &SaveOptions::default())?;
//! let loaded = load_quantized(&dir, Mlp::load)?;
//! let x = Tensor::randn(0f32, 1.0, (2, 64), &Device::Cpu)?;
//! let diff = (model.forward(&x)? - loaded.forward(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert_eq!(diff, 0.0);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```

mod planned;
mod save;
mod scheme;

pub use planned::PlannedSource;
#[cfg(feature = "hub")]
pub(crate) use save::write_folder;
pub use save::{quantized_tensors, save_quantized, write_checkpoint, SaveOptions};
#[cfg(feature = "hub")]
pub(crate) use scheme::plan_layers;
pub use scheme::{ActivationSpec, CheckpointScheme, Int8Kind, LayerScheme, FORMAT_VERSION, QUANT_METHOD};

use crate::convert::{ConversionReport, Quantizable};
use crate::source::{read_json, weight_files, Dtype, SafetensorsSource, SourceBackend, TensorSource};
use candle_core::{bail, Result};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A quantized checkpoint folder, opened: its config and its tensors, read on demand.
pub struct QuantizedCheckpoint {
    dir: PathBuf,
    config: serde_json::Value,
    quantization: CheckpointScheme,
    source: Arc<SafetensorsSource>,
}

impl QuantizedCheckpoint {
    /// Reads the config and the safetensors headers, and checks that every int8 weight has its
    /// scales (and the reverse) with matching shapes and dtypes.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("no checkpoint at {}: not a folder", dir.display())
        }
        let path = dir.join("config.json");
        if !path.is_file() {
            bail!("no checkpoint at {}: it has no config.json", dir.display())
        }
        let config = read_json(&path)?;
        let Some(quantization) = CheckpointScheme::from_model_config(&config, &path)? else {
            bail!("{}: no quantization_config: not a quantized checkpoint", path.display())
        };
        let (files, index) = weight_files(dir)?;
        let source = SafetensorsSource::open(&files, index.as_deref())?;
        check_int8_tensors(&source)?;
        Ok(Self { dir: dir.to_path_buf(), config, quantization, source: Arc::new(source) })
    }

    /// The checkpoint's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model's `config.json`, `quantization_config` included.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Its `quantization_config`: every layer's scheme.
    pub fn quantization(&self) -> &CheckpointScheme {
        &self.quantization
    }

    /// Its tensors, read one at a time.
    pub fn source(&self) -> Arc<dyn TensorSource> {
        self.source.clone()
    }

    /// A `VarBuilder` over the checkpoint (f32, CPU): float tensors widened as they are read,
    /// int8 layers read by [`crate::QLinear::load`].
    pub fn var_builder(&self) -> VarBuilder<'static> {
        SourceBackend::new(self.source.clone()).into_var_builder()
    }

    /// Gives the int8 layers of a model built on [`Self::var_builder`] their saved schemes.
    pub fn apply(&self, model: &mut (impl Quantizable + ?Sized)) -> Result<ConversionReport> {
        self.quantization.apply(model, &*self.source).map_err(|e| e.context(format!("{}", self.dir.display())))
    }
}

/// Every `X.weight` of dtype `I8` has an `X.weight_scale` of `F16` `[out, groups]`, and every
/// `X.weight_scale` an `I8` weight, or an int4 `U8` one `[out, ⌈in/2⌉]`; an
/// `X.weight_zero_point` (`U8`, shaped like the scales) belongs to an int4 weight.
pub(crate) fn check_int8_tensors(source: &dyn TensorSource) -> Result<()> {
    for e in source.entries() {
        if let Some(layer) = e.name.strip_suffix(".weight_scale") {
            let w = format!("{layer}.weight");
            match source.entry(&w) {
                Some(we) if matches!(we.dtype, Dtype::I8 | Dtype::U8) => {}
                Some(we) => {
                    bail!("{}: has a weight_scale, so it must be I8 (int8) or U8 (int4), found {}", source.describe(&w), we.dtype.name())
                }
                None => bail!("{}: a weight_scale without its int8 weight '{w}'", source.describe(&e.name)),
            }
        }
        if let Some(layer) = e.name.strip_suffix(".weight_zero_point") {
            let (w, s) = (format!("{layer}.weight"), format!("{layer}.weight_scale"));
            match (source.entry(&w), source.entry(&s)) {
                (Some(we), Some(se)) if we.dtype == Dtype::U8 && e.dtype == Dtype::U8 && e.shape == se.shape => {}
                _ => bail!("{}: zero points must be U8 shaped like '{s}', beside an int4 (U8) weight '{w}'", source.describe(&e.name)),
            }
        }
        if e.dtype == Dtype::U8 {
            if let Some(layer) = e.name.strip_suffix(".weight") {
                let s = format!("{layer}.weight_scale");
                match (e.shape.as_slice(), source.entry(&s).map(|se| (se.dtype, se.shape.as_slice()))) {
                    (_, None) => {}
                    (&[n, bytes], Some((Dtype::F16, &[sn, groups]))) if sn == n && groups >= 1 && groups <= 2 * bytes => {}
                    _ => bail!(
                        "{}: an int4 weight [out, ⌈in/2⌉] needs F16 scales [out, groups] with at most in groups, found {:?} beside {:?}",
                        source.describe(&s),
                        source.entry(&s).map(|se| se.shape.clone()),
                        e.shape
                    ),
                }
            }
        }
        if e.dtype != Dtype::I8 {
            continue;
        }
        let Some(layer) = e.name.strip_suffix(".weight") else {
            bail!("{}: I8 tensors must be layer weights (NAME.weight)", source.describe(&e.name))
        };
        let s = format!("{layer}.weight_scale");
        let Some(se) = source.entry(&s) else { bail!("{}: missing: the int8 weight '{}' needs its scales", source.describe(&s), e.name) };
        let (&[n, k], &[sn, groups]) = (e.shape.as_slice(), se.shape.as_slice()) else {
            bail!("{}: weight {:?} and scales {:?} must both be 2-D", source.describe(&s), e.shape, se.shape)
        };
        if se.dtype != Dtype::F16 || sn != n || groups == 0 || groups > k || k.div_ceil(k.div_ceil(groups)) != groups {
            bail!(
                "{}: expected F16 scales of shape [{n}, G] with G groups covering {k} input channels, found {} {:?}",
                source.describe(&s),
                se.dtype.name(),
                se.shape
            )
        }
    }
    Ok(())
}

/// Opens the checkpoint in `dir`, builds the model with `build` on its `VarBuilder`, and applies
/// the saved schemes: the whole load of a user's own model.
pub fn load_quantized<M: Quantizable>(dir: &Path, build: impl FnOnce(VarBuilder<'static>) -> Result<M>) -> Result<M> {
    let ckpt = QuantizedCheckpoint::open(dir)?;
    let mut model = build(ckpt.var_builder()).map_err(|e| e.context(format!("building the model from {}", dir.display())))?;
    ckpt.apply(&mut model)?;
    Ok(model)
}
