//! `inspect`: every linear layer with its shape, kind and bytes.

use crate::args::{ModelArgs, Precision};
use crate::models::{load_int8, load_model};
use anyhow::Result;
use candle_quant::convert::Quantizable;

/// `inspect`: every linear layer with its shape, kind and bytes.
pub fn run(model: &ModelArgs, precision: Precision) -> Result<()> {
    let mut m = if precision == Precision::Int8 { load_int8(model)?.0 } else { load_model(model.model.as_deref())? };
    let (mut n, mut int8, mut int4) = (0usize, 0usize, 0usize);
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
        let four_bit = l.kind_name().starts_with("int4");
        int4 += four_bit as usize;
        int8 += (l.is_int8() && !four_bit) as usize;
        Ok(())
    })?;
    let int4 = if int4 > 0 { format!(", {int4} int4") } else { String::new() };
    println!("{n} linear layers, {int8} int8{int4}; all weights {:.1} MB", m.model.weight_bytes() as f64 / 1e6);
    Ok(())
}
