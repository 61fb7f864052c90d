//! GPTQ: int4 (or int8) rounding that compensates each weight's error with the weights not yet
//! rounded, using the second moment of the layer's inputs from a calibration run
//! (Frantar et al., 2022).
//!
//! For a layer `y = W·x` and calibration inputs `X` (`K × tokens`), the error of a rounded
//! row `ŵ` is `(w − ŵ)·H·(w − ŵ)ᵀ` with `H = X·Xᵀ`. Columns are rounded in order; after column
//! `i` the remaining columns of the row absorb its error:
//!
//! `e = (w_i − ŵ_i) / U[i,i]`,  `w_{i+1..} −= e · U[i, i+1..]`
//!
//! where `U` is the upper Cholesky factor of `H⁻¹` (`H⁻¹ = Uᵀ·U`), `H` damped by 1 % of its
//! mean diagonal. Rows are independent, so they are rounded in parallel. A group's scale (and
//! zero point) is chosen, by the same grid search as round to nearest, from the group's weights
//! as they stand when its first column is reached.

use crate::convert::{ConversionReport, QuantConfig, Quantizable};
use crate::kernels::{Int8Rows, PackedInt8Weights, WeightQuant};
use crate::observer::Observer;
use crate::quant::{QParams, QSpec};
use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Dampening added to `H`'s diagonal, as a fraction of its mean (GPTQ's `percdamp`).
pub const DAMPING: f64 = 0.01;

/// `Σ x·xᵀ` over every input row a layer sees, and how many rows.
#[derive(Debug, Default)]
pub struct Hessian {
    /// `K × K`, `f32`.
    pub sum: Option<Tensor>,
    /// Input rows folded in.
    pub rows: usize,
}

impl Hessian {
    /// The Hessian behind a shared handle (an error if an observer panicked holding it).
    pub fn locked(h: &Mutex<Hessian>) -> Result<std::sync::MutexGuard<'_, Hessian>> {
        h.lock().map_err(|_| candle_core::Error::Msg("a Hessian observer panicked".into()))
    }
}

/// An [`Observer`] that accumulates a layer's input second moment into a shared [`Hessian`]
/// (it yields no qparams: GPTQ reads the Hessian instead).
#[derive(Debug)]
pub struct HessianObserver {
    hessian: Arc<Mutex<Hessian>>,
}

impl HessianObserver {
    /// An observer and the handle its Hessian is read through.
    pub fn new() -> (Self, Arc<Mutex<Hessian>>) {
        let h = Arc::new(Mutex::new(Hessian::default()));
        (Self { hessian: h.clone() }, h)
    }
}

impl Observer for HessianObserver {
    fn observe(&mut self, x: &Tensor) -> Result<()> {
        let k = x.dims().last().copied().unwrap_or(0);
        let x = x.to_dtype(DType::F32)?.reshape(((), k))?;
        let xtx = x.t()?.matmul(&x)?;
        let mut h = Hessian::locked(&self.hessian)?;
        h.sum = Some(match h.sum.take() {
            Some(s) => (s + xtx)?,
            None => xtx,
        });
        h.rows += x.dim(0)?;
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        bail!("a Hessian observer collects inputs for GPTQ and has no activation qparams")
    }

    fn reset(&mut self) {
        if let Ok(mut h) = self.hessian.lock() {
            *h = Hessian::default();
        }
    }

    fn spec(&self) -> QSpec {
        QSpec::DYNAMIC_ACTIVATION
    }

    fn nonfinite_count(&self) -> u64 {
        0
    }
}

/// Attaches a [`HessianObserver`] to every layer `config` selects, runs `calibrate` (the
/// calibration forward passes), and puts the layers back as they were; returns each layer's
/// Hessian by name.
pub fn collect_hessians<M: Quantizable + ?Sized>(
    model: &mut M,
    config: &QuantConfig,
    calibrate: impl FnOnce(&mut M) -> Result<()>,
) -> Result<HashMap<String, Arc<Mutex<Hessian>>>> {
    let mut handles = HashMap::new();
    let mut originals = HashMap::new();
    model.visit_linears(&mut |layer| {
        if config.selects(layer.name()) {
            let (observer, handle) = HessianObserver::new();
            originals.insert(layer.name().to_string(), layer.clone());
            layer.observe_with(Box::new(observer))?;
            handles.insert(layer.name().to_string(), handle);
        }
        Ok(())
    })?;
    let ran = calibrate(model);
    model.visit_linears(&mut |layer| {
        if let Some(original) = originals.remove(layer.name()) {
            *layer = original;
        }
        Ok(())
    })?;
    ran?;
    Ok(handles)
}

/// The upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ·U`), row-major `K × K`, for `H` damped by
/// [`DAMPING`]; columns no input reached (`H[i,i] = 0`) get `H[i,i] = 1`.
pub fn inverse_cholesky(h: &[f64], k: usize) -> Result<Vec<f64>> {
    let mut a = h.to_vec();
    let mean = (0..k).map(|i| a[i * k + i]).sum::<f64>() / k as f64;
    for i in 0..k {
        if a[i * k + i] <= 0.0 {
            a[i * k + i] = 1.0;
        }
        a[i * k + i] += DAMPING * mean.max(f64::MIN_POSITIVE);
    }
    // H = R·Rᵀ with R upper (a Cholesky factorisation from the last column back); then
    // H⁻¹ = R⁻ᵀ·R⁻¹, so U = R⁻¹ is the upper factor wanted. Both steps run on rayon's pool
    // where the work is large; every value is computed by the same operations in the same
    // order whichever thread does it, so the result does not depend on the thread count.
    let mut r = vec![0f64; k * k];
    let dot = |x: &[f64], y: &[f64]| -> f64 { x.iter().zip(y).map(|(a, b)| a * b).sum() };
    for j in (0..k).rev() {
        let rj = j * k;
        let d = a[rj + j] - dot(&r[rj + j + 1..rj + k], &r[rj + j + 1..rj + k]);
        if d <= 0.0 || !d.is_finite() {
            bail!("GPTQ: the input second moment is not positive definite at column {j} (pivot {d})")
        }
        let d = d.sqrt();
        let (above, row_j) = r.split_at_mut(rj);
        row_j[j] = d;
        let row_j = &row_j[j + 1..k];
        // Column j of the rows above: R[i,j] = (H[i,j] − R[i, j+1..]·R[j, j+1..]) / R[j,j].
        let entry = |(i, ri): (usize, &mut [f64])| ri[j] = (a[i * k + j] - dot(&ri[j + 1..], row_j)) / d;
        if j * (k - j) >= PARALLEL_MIN_WORK {
            above.par_chunks_mut(k).enumerate().for_each(entry);
        } else {
            above.chunks_mut(k).enumerate().for_each(entry);
        }
    }
    // U = R⁻¹ (upper), rows from the last: U[i, ..] = (e_i − Σ_{t>i} R[i,t]·U[t, ..]) / R[i,i],
    // the sum taken over t in order for every column; wide rows split by columns.
    let mut u = vec![0f64; k * k];
    for i in (0..k).rev() {
        let (row, below) = u.split_at_mut((i + 1) * k);
        let row = &mut row[i * k + i..];
        row[0] = 1.0;
        let (ri, d) = (&r[i * k..(i + 1) * k], r[i * k + i]);
        // Columns c0.. of the row: every t > i in order, U[t, c] zero for c < t.
        let update = |c0: usize, part: &mut [f64]| {
            for t in i + 1..k {
                let start = t.max(c0);
                if start >= c0 + part.len() {
                    break;
                }
                let f = ri[t];
                let below_t = &below[(t - i - 1) * k + start..(t - i - 1) * k + c0 + part.len()];
                part[start - c0..].iter_mut().zip(below_t).for_each(|(x, &y)| *x -= f * y);
            }
            part.iter_mut().for_each(|x| *x /= d);
        };
        let width = k - i;
        if width * width / 2 >= PARALLEL_MIN_WORK {
            let chunk = width.div_ceil(rayon::current_num_threads().max(1)).max(64);
            row.par_chunks_mut(chunk).enumerate().for_each(|(p, part)| update(i + p * chunk, part));
        } else {
            update(i, row);
        }
    }
    Ok(u)
}

/// Multiply-adds below which a step of [`inverse_cholesky`] runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// GPTQ-rounds a row-major `N × K` float weight with the upper factor `u` of its damped inverse
/// Hessian ([`inverse_cholesky`]) into int4 (`how` = [`WeightQuant::Int4`]) rows.
pub fn gptq_rows(weight: &[f32], n: usize, k: usize, u: &[f64], how: WeightQuant) -> Result<Int8Rows> {
    let WeightQuant::Int4 { group, zero_point } = how else { bail!("GPTQ here rounds to int4 weights, got {how:?}") };
    if weight.len() != n * k || u.len() != k * k {
        bail!("GPTQ: a {n}×{k} weight needs {} values and a {k}×{k} factor, got {} and {}", n * k, weight.len(), u.len())
    }
    let group = group.min(k);
    let groups = k.div_ceil(group);
    let u32: Vec<f32> = u.iter().map(|&v| v as f32).collect();
    // What an error in column c costs once the columns before it are fixed: (w − ŵ)² / [H⁻¹]_cc,
    // with [H⁻¹]_cc = U_cc²; each group's grid is the one least wrong by this measure.
    let importance: Vec<f32> = (0..k).map(|c| 1.0 / (u32[c * k + c] * u32[c * k + c])).collect();
    let mut q = vec![0i8; n * k];
    let mut scales = vec![half::f16::ZERO; n * groups];
    let mut zeros = vec![8u8; n * groups];
    q.par_chunks_mut(k).zip(scales.par_chunks_mut(groups)).zip(zeros.par_chunks_mut(groups)).enumerate().try_for_each(
        |(j, ((qrow, srow), zrow))| -> Result<()> {
            let mut w = weight[j * k..(j + 1) * k].to_vec();
            let mut scratch = vec![0i8; group];
            let (mut s, mut z) = (1f32, 8i32);
            for i in 0..k {
                if i % group == 0 {
                    let g = i / group;
                    let end = (i + group).min(k);
                    let (sh, zh) =
                        crate::kernels::int4_group_grid_weighted(&w[i..end], &importance[i..end], zero_point, &mut scratch[..end - i])?;
                    (srow[g], zrow[g]) = (sh, zh);
                    (s, z) = (sh.to_f32(), zh as i32);
                }
                let level = ((w[i] / s).round_ties_even() as i32 + z).clamp(0, 15);
                qrow[i] = (level - z) as i8;
                let err = (w[i] - s * (level - z) as f32) / u32[i * k + i];
                let row = &u32[i * k + i + 1..(i + 1) * k];
                w[i + 1..].iter_mut().zip(row).for_each(|(x, &f)| *x -= err * f);
            }
            Ok(())
        },
    )?;
    Int8Rows::new_int4(n, k, group, q, scales, zero_point.then_some(zeros))
}

/// GPTQ-quantizes every selected layer whose weights `config` makes int4 (layers it keeps int8
/// are left for the usual conversion), from `hessians` ([`collect_hessians`]); each becomes
/// weight-only with its new weights, ready for a conversion verb to give it its activation
/// scheme (which keeps them). `progress(done, total)` after each layer.
pub fn quantize_gptq(
    model: &mut (impl Quantizable + ?Sized),
    config: &QuantConfig,
    hessians: &HashMap<String, Arc<Mutex<Hessian>>>,
    mut progress: impl FnMut(usize, usize),
) -> Result<ConversionReport> {
    let total = hessians.len();
    let mut report = ConversionReport::default();
    model.visit_linears(&mut |layer| {
        let name = layer.name().to_string();
        let how = config.weight_for(&name);
        let Some(handle) = hessians.get(&name).filter(|_| how.bits() == 4) else {
            report.skipped.push(name);
            return Ok(());
        };
        let h = Hessian::locked(handle)?;
        let Some(sum) = h.sum.as_ref() else { bail!("GPTQ: layer '{name}' saw no calibration input") };
        let (n, k) = (layer.out_features(), layer.in_features());
        let hv: Vec<f64> = sum.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        let u = inverse_cholesky(&hv, k).map_err(|e| e.context(format!("layer '{name}'")))?;
        let float = layer.float_equivalent()?;
        let w = float.weight().flatten_all()?.to_vec1::<f32>()?;
        let rows = gptq_rows(&w, n, k, &u, how).map_err(|e| e.context(format!("layer '{name}'")))?;
        layer.set_weights(PackedInt8Weights::from_rows(&rows)?)?;
        report.converted.push(name);
        progress(report.converted.len(), total);
        Ok(())
    })?;
    Ok(report)
}
