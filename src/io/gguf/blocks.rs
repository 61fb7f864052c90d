//! GGML's quantized blocks of 32 weights beside this toolkit's int8 and int4 rows.
//!
//! - `Q8_0`: an `f16` scale `d` and 32 `i8` values, `w = d·q`: int8 rows whose groups are whole
//!   multiples of 32 (or one per row) are these blocks bit for bit, the group's scale repeated.
//! - `Q4_0`: `d` and 32 nibbles `u`, `w = d·(u − 8)`: symmetric int4 rows (`u = q + 8`) exactly.
//!   Value `i` of a block sits in the low nibble of byte `i` and value `i + 16` in its high one.
//! - `Q4_1`: `d`, a minimum `m` and 32 nibbles, `w = d·u + m`: asymmetric int4 rows
//!   `w = s·(u − z)` with `d = s` and `m = −s·z` rounded to `f16` (the one loss, reported).
//!
//! Rows go out in `order` (output row `r` is input row `order[r]`), which is how Llama's q/k
//! rows are put in llama.cpp's RoPE order, and come back the same way.

use candle_core::{bail, Result};
use half::f16;

/// Values per block, for every block type here.
pub const QK: usize = 32;
/// Bytes of one `Q8_0` block: `d` then 32 `i8`.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of one `Q4_0` block: `d` then 16 bytes of nibbles.
pub const Q4_0_BYTES: usize = 18;
/// Bytes of one `Q4_1` block: `d`, `m`, then 16 bytes of nibbles.
pub const Q4_1_BYTES: usize = 20;

/// Stored rows of one layer as a checkpoint holds them: `values` (`i8` bytes `[n, k]`, or int4
/// nibbles `[n, ⌈k/2⌉]` with column `c` in the low nibble of byte `c/2` when even), `scales`
/// (`f16` little-endian `[n, ⌈k/group⌉]`) and, for asymmetric int4, `zero_points` `[n, groups]`.
pub struct StoredRows<'a> {
    /// 8, or 4.
    pub bits: u32,
    /// Output channels.
    pub n: usize,
    /// Input channels.
    pub k: usize,
    /// Input channels per scale.
    pub group: usize,
    /// The values' bytes.
    pub values: &'a [u8],
    /// The scales' bytes.
    pub scales: &'a [u8],
    /// Asymmetric int4 zero points; empty otherwise.
    pub zero_points: &'a [u8],
}

impl StoredRows<'_> {
    fn groups(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    /// The scale's two bytes for block `b` of row `j`.
    fn scale_bytes(&self, j: usize, b: usize) -> [u8; 2] {
        let at = 2 * (j * self.groups() + b * QK / self.group);
        [self.scales[at], self.scales[at + 1]]
    }

    /// Int4 nibble `u` at row `j`, column `c`.
    fn nibble(&self, j: usize, c: usize) -> u8 {
        (self.values[j * self.k.div_ceil(2) + c / 2] >> (4 * (c % 2))) & 15
    }

    /// Checks that the bytes hold `n × k` values in groups of `group` (scales, and zero points
    /// when there are any), so that nothing below indexes past them.
    pub fn check(&self) -> Result<()> {
        let (n, k, group) = (self.n, self.k, self.group);
        let row = if self.bits == 4 { k.div_ceil(2) } else { k };
        let groups = if group == 0 { 0 } else { k.div_ceil(group) };
        if group == 0
            || self.values.len() != n * row
            || self.scales.len() != 2 * n * groups
            || !(self.zero_points.is_empty() || self.zero_points.len() == n * groups)
        {
            bail!(
                "{} value bytes, {} scale bytes and {} zero points do not fit {n}×{k} int{} weights in groups of {group}",
                self.values.len(),
                self.scales.len(),
                self.zero_points.len(),
                self.bits
            )
        }
        Ok(())
    }

    /// Row `j` dequantized into `out` (`k` values): `s·q` for int8, `s·(u − z)` for int4 (`z` = 8
    /// when symmetric).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let groups = self.groups();
        for (c, o) in out.iter_mut().enumerate().take(self.k) {
            let g = j * groups + c / self.group;
            let s = f16::from_le_bytes([self.scales[2 * g], self.scales[2 * g + 1]]).to_f32();
            *o = s * match self.bits {
                4 => self.nibble(j, c) as f32 - self.zero_points.get(g).copied().unwrap_or(8) as f32,
                _ => self.values[j * self.k + c] as i8 as f32,
            };
        }
    }

    /// Whether every block of 32 lies inside one group ([`blocks_align`]).
    pub fn blocks_align(&self) -> bool {
        blocks_align(self.k, self.group)
    }
}

/// Whether every block of 32 of a row of `k` values lies inside one group of `group`, so one
/// scale covers it: `k` a multiple of 32, and groups spanning the row or a multiple of 32.
pub fn blocks_align(k: usize, group: usize) -> bool {
    k.is_multiple_of(QK) && (group >= k || group.is_multiple_of(QK))
}

/// `rows` (int8, groups aligned to blocks) as `Q8_0` blocks, in `order`.
pub fn q8_0_from_int8(rows: &StoredRows, order: &[usize]) -> Vec<u8> {
    let blocks = rows.k / QK;
    let mut out = Vec::with_capacity(order.len() * blocks * Q8_0_BYTES);
    for &j in order {
        for b in 0..blocks {
            out.extend_from_slice(&rows.scale_bytes(j, b));
            out.extend_from_slice(&rows.values[j * rows.k + b * QK..j * rows.k + (b + 1) * QK]);
        }
    }
    out
}

/// `rows` (symmetric int4, groups aligned to blocks) as `Q4_0` blocks, in `order`.
pub fn q4_0_from_int4(rows: &StoredRows, order: &[usize]) -> Vec<u8> {
    let blocks = rows.k / QK;
    let mut out = Vec::with_capacity(order.len() * blocks * Q4_0_BYTES);
    for &j in order {
        for b in 0..blocks {
            out.extend_from_slice(&rows.scale_bytes(j, b));
            let c = b * QK;
            out.extend((0..QK / 2).map(|i| rows.nibble(j, c + i) | (rows.nibble(j, c + i + QK / 2) << 4)));
        }
    }
    out
}

/// `rows` (asymmetric int4, groups aligned to blocks) as `Q4_1` blocks, in `order`, with the
/// squared error the `f16` minimum adds, summed over every weight: `32·(m − (−s·z))²` a block.
pub fn q4_1_from_int4(rows: &StoredRows, order: &[usize]) -> (Vec<u8>, f64) {
    let (blocks, groups) = (rows.k / QK, rows.groups());
    let mut out = Vec::with_capacity(order.len() * blocks * Q4_1_BYTES);
    let mut squared_error = 0.0;
    for &j in order {
        for b in 0..blocks {
            let d = rows.scale_bytes(j, b);
            let z = rows.zero_points[j * groups + b * QK / rows.group];
            let exact = -(f16::from_le_bytes(d).to_f64()) * z as f64;
            let m = f16::from_f64(exact);
            squared_error += QK as f64 * (m.to_f64() - exact).powi(2);
            out.extend_from_slice(&d);
            out.extend_from_slice(&m.to_le_bytes());
            let c = b * QK;
            out.extend((0..QK / 2).map(|i| rows.nibble(j, c + i) | (rows.nibble(j, c + i + QK / 2) << 4)));
        }
    }
    (out, squared_error)
}

/// One row of floats as `Q8_0` blocks, rounded as llama.cpp does: `d = max|x| / 127` (to
/// `f16`), `q = round(x / d)`. For weights no block type holds exactly.
pub fn q8_0_from_floats(row: &[f32], out: &mut Vec<u8>) {
    for block in row.chunks(QK) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = f16::from_f32(amax / 127.0);
        let inv = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(block.iter().map(|&x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8));
    }
}

/// A block's scale, `None` when zero (an all-zero block: it becomes the smallest positive `f16`
/// with its values zeroed, so the weights stay exactly zero); a scale that is not finite is
/// refused.
fn block_scale(bytes: [u8; 2], what: &dyn Fn() -> String) -> Result<Option<f16>> {
    let d = f16::from_le_bytes(bytes);
    if !d.is_finite() {
        bail!("{}: scale {d} is not finite", what())
    }
    Ok(Some(d).filter(|d| d.to_f32() != 0.0))
}

/// `Q8_0` blocks of `n × k` weights, rows in `order` (output row `r` is stored row `order[r]`),
/// as int8 values `[n, k]` and `f16` scale bytes `[n, k/32]`. Values must lie in `[−127, 127]`;
/// a negative scale (llama.cpp never writes one) turns positive with its values negated.
/// `what(row)` names the tensor in errors.
pub fn int8_from_q8_0(bytes: &[u8], n: usize, k: usize, order: &[usize], what: &dyn Fn() -> String) -> Result<(Vec<u8>, Vec<u8>)> {
    let blocks = k / QK;
    if !k.is_multiple_of(QK) || bytes.len() != n * blocks * Q8_0_BYTES || order.len() != n {
        bail!("{}: {} bytes of Q8_0 blocks cannot hold {n}×{k} weights", what(), bytes.len())
    }
    let (mut values, mut scales) = (Vec::with_capacity(n * k), Vec::with_capacity(n * blocks * 2));
    for &j in order {
        for b in 0..blocks {
            let block = &bytes[(j * blocks + b) * Q8_0_BYTES..][..Q8_0_BYTES];
            let qs = &block[2..];
            match block_scale([block[0], block[1]], &|| format!("{}, row {j}, block {b}", what()))? {
                Some(d) => {
                    if let Some(i) = qs.iter().position(|&q| q as i8 == i8::MIN) {
                        bail!("{}, row {j}, column {}: value −128 (int8 weights lie in [−127, 127])", what(), b * QK + i)
                    }
                    let sign = if d.is_sign_negative() { -1 } else { 1 };
                    scales.extend_from_slice(&(d * f16::from_f32(sign as f32)).to_le_bytes());
                    values.extend(qs.iter().map(|&q| (sign * q as i8) as u8));
                }
                None => {
                    scales.extend_from_slice(&f16::from_bits(1).to_le_bytes());
                    values.extend_from_slice(&[0; QK]);
                }
            }
        }
    }
    Ok((values, scales))
}

/// `Q4_0` blocks of `n × k` weights, rows in `order`, as symmetric int4 nibbles `[n, k/2]`
/// (this toolkit's layout) and `f16` scale bytes `[n, k/32]` (of either sign, as int4 scales).
pub fn int4_from_q4_0(bytes: &[u8], n: usize, k: usize, order: &[usize], what: &dyn Fn() -> String) -> Result<(Vec<u8>, Vec<u8>)> {
    let blocks = k / QK;
    if !k.is_multiple_of(QK) || bytes.len() != n * blocks * Q4_0_BYTES || order.len() != n {
        bail!("{}: {} bytes of Q4_0 blocks cannot hold {n}×{k} weights", what(), bytes.len())
    }
    let (mut values, mut scales) = (Vec::with_capacity(n * k / 2), Vec::with_capacity(n * blocks * 2));
    for &j in order {
        for b in 0..blocks {
            let block = &bytes[(j * blocks + b) * Q4_0_BYTES..][..Q4_0_BYTES];
            let u = |i: usize| if i < QK / 2 { block[2 + i] & 15 } else { block[2 + i - QK / 2] >> 4 };
            match block_scale([block[0], block[1]], &|| format!("{}, row {j}, block {b}", what()))? {
                Some(d) => {
                    scales.extend_from_slice(&d.to_le_bytes());
                    values.extend((0..QK / 2).map(|p| u(2 * p) | (u(2 * p + 1) << 4)));
                }
                None => {
                    scales.extend_from_slice(&f16::from_bits(1).to_le_bytes());
                    values.extend_from_slice(&[0x88; QK / 2]);
                }
            }
        }
    }
    Ok((values, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row of 32 symmetric int4 values `u = c mod 16` under the scale 0.5 (f16 bits
    /// 0x3800): the Q4_0 block is `d` = [0x00, 0x38], then byte `i` = `u(i) | u(i + 16) << 4`
    /// = `i | i << 4` (0x00, 0x11, …, 0xff); and back.
    #[test]
    fn q4_0_golden_block() {
        let nibbles: Vec<u8> = (0..16u8).map(|p| ((2 * p) % 16) | (((2 * p + 1) % 16) << 4)).collect();
        let scales = f16::from_f32(0.5).to_le_bytes();
        let rows = StoredRows { bits: 4, n: 1, k: 32, group: 32, values: &nibbles, scales: &scales, zero_points: &[] };
        let block = q4_0_from_int4(&rows, &[0]);
        let want: Vec<u8> = [0x00, 0x38].into_iter().chain((0..16u8).map(|i| i | (i << 4))).collect();
        assert_eq!(block, want);
        let (back, back_scales) = int4_from_q4_0(&block, 1, 32, &[0], &|| "test".into()).unwrap();
        assert_eq!((back, back_scales), (nibbles, scales.to_vec()));
    }

    /// Two rows of 32 int8 values in one group each, written in the order [1, 0]: each block is
    /// its row's scale then its values; read back in the same order, the rows are as stored.
    /// A negative scale −0.25 reads as 0.25 with the values negated (−0.25·3 = 0.25·(−3)).
    #[test]
    fn q8_0_rows_in_order_and_negative_scales() {
        let values: Vec<u8> = (0..64).map(|i| (i as i8 - 32) as u8).collect();
        let scales: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|&s| f16::from_f32(s).to_le_bytes()).collect();
        let rows = StoredRows { bits: 8, n: 2, k: 32, group: 32, values: &values, scales: &scales, zero_points: &[] };
        let blocks = q8_0_from_int8(&rows, &[1, 0]);
        assert_eq!(&blocks[..2], &f16::from_f32(2.0).to_le_bytes());
        assert_eq!(&blocks[2..34], &values[32..]);
        let (back, back_scales) = int8_from_q8_0(&blocks, 2, 32, &[1, 0], &|| "test".into()).unwrap();
        assert_eq!((back, back_scales), (values, scales));
        let mut negative = vec![0u8; Q8_0_BYTES];
        negative[..2].copy_from_slice(&f16::from_f32(-0.25).to_le_bytes());
        negative[2] = 3;
        let (v, s) = int8_from_q8_0(&negative, 1, 32, &[0], &|| "test".into()).unwrap();
        assert_eq!((v[0] as i8, f16::from_le_bytes([s[0], s[1]]).to_f32()), (-3, 0.25));
    }

    /// Q4_1 of an asymmetric group: `d = s` = 0.1 (f16 0.0999755859375), `z = 3`: the exact
    /// minimum −s·z = −0.2999267578125 rounds to the f16 −0.29980469 (error 1.2e-4 on each of
    /// the 32 weights).
    #[test]
    fn q4_1_reports_the_rounded_minimum() {
        let nibbles = vec![0x21u8; 16];
        let scales = f16::from_f32(0.1).to_le_bytes();
        let rows = StoredRows { bits: 4, n: 1, k: 32, group: 32, values: &nibbles, scales: &scales, zero_points: &[3] };
        let (block, squared_error) = q4_1_from_int4(&rows, &[0]);
        let s = f16::from_le_bytes(scales).to_f64();
        let m = f16::from_le_bytes([block[2], block[3]]).to_f64();
        assert_eq!(m, f16::from_f64(-s * 3.0).to_f64());
        assert!((squared_error - 32.0 * (m + s * 3.0).powi(2)).abs() < 1e-15 && squared_error > 0.0);
    }
}
