//! The kernels on slices, below the layers: int8 linear (dynamic and static activations) and
//! weight-only int8 linear over packed weights, the activation quantizer, decoding attention,
//! exact GELU and SwiGLU, RMSNorm and LayerNorm. Each operation has one entry point that runs on
//! the best instruction-set path this CPU has ([`Isa`], chosen once at run time) and a `_with`
//! form that names the path: a scalar reference (the ground truth, [`reference`](mod@reference), never
//! deleted), AVX2 / AVX-VNNI / AVX-512 VNNI on x86_64 and NEON with or without `sdot` on
//! aarch64, all over the same packed weights. Layers are built on these in [`crate::nn`];
//! use them directly to build int8 operations of your own.
//!
//! The maths of the fused int8 linear, for activations quantized per `(row m, group g)` with
//! scale `sa[m,g]` and one zero point `za`, and weights per `(output channel n, group g)` with
//! scale `sw[n,g]` and zero point 0 (either side may have a single group per row):
//!
//! `y[m,n] = Σ_g sa[m,g] · sw[n,g] · (Σ_{k∈g} qa[m,k]·qw[n,k] − za·Σ_{k∈g} qw[n,k]) + bias[n]`
//!
//! The inner sums are exact `i32`; only the per-group rescale is floating point. Work is split
//! over output channels by the kernels' own fork-join team (`team.rs`), as many threads as
//! candle's CPU ops use (rayon's thread count, `RAYON_NUM_THREADS`).
//!
//! Files: `isa` (detection, the override), `paths` (one table of kernels per path: the
//! dispatch), `linear` and `operands` (the int8 and weight-only drivers), `act_quant` (the
//! activation quantizer), `weights` (packed weights), `tiles` (what every path's tiles share),
//! `x86` / `x86_attention` / `arm` (one ISA each), `attention`, `elementwise`, `norms`, `team`
//! (the fork-join team), `memory` (unfilled and huge-page buffers), `reference`.

mod act_quant;
#[cfg(target_arch = "aarch64")]
mod arm;
mod attention;
mod elementwise;
mod int4;
pub(crate) mod isa;
mod linear;
pub(crate) mod memory;
mod norms;
mod operands;
mod paths;
pub mod reference;
mod team;
mod tiles;
mod weights;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_attention;

pub use act_quant::QuantizedActivations;
pub use attention::{attend, attend_part, attend_part_with, attend_with, combine_parts, part_len, MAX_TILE_HEADS};
pub(crate) use elementwise::silu_mul_into;
pub use elementwise::{gelu_erf, gelu_erf_scalar, silu_mul, silu_scalar};
pub(crate) use int4::quantize_group_weighted as int4_group_grid_weighted;
pub(crate) use isa::Isa;
pub use linear::{group_sums_with, int8_linear, int8_linear_with, weight_only_linear, weight_only_linear_with};
pub(crate) use linear::{int8_linear_into, weight_only_linear_into};
pub(crate) use memory::{as_unfilled, filled_vec};
pub use norms::rms_norm;
pub(crate) use norms::{add_rms_norm_into, layer_norm_into, rms_norm_into};
pub(crate) use operands::TileOperands;
pub(crate) use paths::Kernels;
pub(crate) use team::{parallel_for_parts, try_parallel_for_parts};
pub(crate) use weights::quantize_symmetric;
pub use weights::{
    quantize_weight_rows, quantize_weight_rows_with, Int8Rows, PackedInt8Weights, WeightQuant, BLOCK_ROWS, MAX_IN_FEATURES,
    MAX_SUMMED_GROUP,
};

/// Rows of weights and activations are zero-padded to a multiple of this many bytes.
pub const CHUNK: usize = 32;
