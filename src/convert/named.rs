//! Writing [`Quantizable`] for a model of your own: [`Named`] float modules that remember their
//! VarBuilder path, and the [`quantizable!`](crate::quantizable) macro over a struct's fields.

use super::Quantizable;
use crate::nn::QLinear;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Float parameters that a saved int8 folder must hold beside the int8 layers, named under the
/// path they were loaded from.
pub trait NamedTensors {
    /// Calls `f` with each tensor and its checkpoint name under `path`.
    fn visit_named(&self, path: &str, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()>;
}

impl NamedTensors for Tensor {
    /// A bare tensor is saved as `path` itself.
    fn visit_named(&self, path: &str, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        f(path, self)
    }
}

impl NamedTensors for candle_nn::Embedding {
    /// `path.weight`, as `candle_nn::embedding` loads it.
    fn visit_named(&self, path: &str, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        f(&format!("{path}.weight"), self.embeddings())
    }
}

impl NamedTensors for candle_nn::LayerNorm {
    /// `path.weight` and, when there is one, `path.bias`.
    fn visit_named(&self, path: &str, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        f(&format!("{path}.weight"), self.weight())?;
        self.bias().map_or(Ok(()), |b| f(&format!("{path}.bias"), b))
    }
}

impl NamedTensors for candle_nn::RmsNorm {
    /// `path.weight`.
    fn visit_named(&self, path: &str, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        f(&format!("{path}.weight"), self.weight())
    }
}

/// A float module (embedding, norm, bare tensor) with the VarBuilder path it was loaded from — the
/// counterpart of [`QLinear`] knowing its name — so that saving the model writes it too. Derefs to
/// the module; `Module` when the module is one.
#[derive(Debug, Clone)]
pub struct Named<T> {
    path: String,
    inner: T,
}

impl<T> Named<T> {
    /// Loads the module with `load` from `vb`, remembering `vb`'s path:
    /// `Named::load(vb.pp("norm"), |vb| candle_nn::rms_norm(dim, 1e-5, vb))`.
    pub fn load(vb: VarBuilder, load: impl FnOnce(VarBuilder) -> Result<T>) -> Result<Self> {
        let path = vb.prefix();
        Ok(Self { inner: load(vb)?, path })
    }

    /// Wraps a module built otherwise, under `path`.
    pub fn new(path: impl Into<String>, inner: T) -> Self {
        Self { path: path.into(), inner }
    }

    /// The VarBuilder path the module was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The module.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T> std::ops::Deref for Named<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: Module> Module for Named<T> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }
}

impl<T: NamedTensors> Quantizable for Named<T> {
    /// No linear layers.
    fn visit_linears(&mut self, _f: &mut dyn FnMut(&mut QLinear) -> Result<()>) -> Result<()> {
        Ok(())
    }

    fn visit_tensors(&self, f: &mut dyn FnMut(&str, &Tensor) -> Result<()>) -> Result<()> {
        self.inner.visit_named(&self.path, f)
    }
}

/// Implements [`Quantizable`] for a struct from the fields listed, each itself `Quantizable`: a
/// [`QLinear`], a [`Named`] float module, a nested model, or a `Vec` / `Option` of these. Linear
/// layers are visited in the order written; `Named` fields are what saving writes beside them. A
/// field left out is invisible to every conversion verb — [`super::float_linears`] finds such a
/// forgotten layer.
///
/// ```
/// use candle_core::{Module, Result, Tensor};
/// use candle_nn::{Embedding, VarBuilder};
/// use candle_quant::convert::Named;
/// use candle_quant::{qlinear, qlinear_no_bias, quantizable, QLinear};
///
/// struct Block { up: QLinear, down: QLinear }
/// struct Net { embed: Named<Embedding>, blocks: Vec<Block>, head: QLinear }
///
/// quantizable!(Block { up, down });
/// quantizable!(Net { embed, blocks, head });
///
/// fn block(vb: VarBuilder) -> Result<Block> {
///     Ok(Block { up: qlinear(16, 32, vb.pp("up"))?, down: qlinear_no_bias(32, 16, vb.pp("down"))? })
/// }
/// # fn main() -> Result<()> {
/// let vb = VarBuilder::from_varmap(&candle_nn::VarMap::new(), candle_core::DType::F32, &candle_core::Device::Cpu);
/// let mut net = Net {
///     embed: Named::load(vb.pp("embed"), |vb| candle_nn::embedding(100, 16, vb))?,
///     blocks: (0..2).map(|i| block(vb.pp(format!("blocks.{i}")))).collect::<Result<_>>()?,
///     head: qlinear(16, 100, vb.pp("head"))?,
/// };
/// let report = candle_quant::quantize_dynamic(&mut net, &Default::default())?;
/// assert_eq!(report.converted, ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]);
/// # Ok(()) }
/// ```
#[macro_export]
macro_rules! quantizable {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl $crate::Quantizable for $ty {
            fn visit_linears(
                &mut self,
                f: &mut dyn FnMut(&mut $crate::QLinear) -> $crate::__candle::Result<()>,
            ) -> $crate::__candle::Result<()> {
                $($crate::Quantizable::visit_linears(&mut self.$field, f)?;)*
                let _ = f;
                Ok(())
            }

            fn visit_tensors(
                &self,
                f: &mut dyn FnMut(&str, &$crate::__candle::Tensor) -> $crate::__candle::Result<()>,
            ) -> $crate::__candle::Result<()> {
                $($crate::Quantizable::visit_tensors(&self.$field, f)?;)*
                let _ = f;
                Ok(())
            }
        }
    };
}
