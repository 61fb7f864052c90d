//! `inspect`: every linear layer with its shape, kind and bytes.

use crate::args::{ModelArgs, Precision};
use crate::models::{load_int8, load_model};
use anyhow::Result;
use candle_quant::convert::Quantizable;

/// `inspect`: every linear layer with its shape, kind and bytes.
pub fn run(model: &ModelArgs, precision: Precision) -> Result<()> {
    let mut m = if precision == Precision::Int8 { load_int8(model)?.0 } else { load_model(model.model.as_deref())? };
    let (mut n, mut int8) = (0usize, 0usize);
    println!("{:<44} {:>12} {:<18} {:>12}", "layer", "in x out", "kind", "bytes");
    m.model.visit_linears(&mut |l| {
        println!(
            "{:<44} {:>12} {:<18} {:>12}",
            l.name(),
            format!("{}x{}", l.in_features(), l.out_features()),
            l.kind_name(),
            l.weight_bytes()
        );
        n += 1;
        int8 += l.is_int8() as usize;
        Ok(())
    })?;
    println!("{n} linear layers, {int8} int8; all weights {:.1} MB", m.model.weight_bytes() as f64 / 1e6);
    Ok(())
}
