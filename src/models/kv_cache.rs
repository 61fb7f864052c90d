//! The decoder's cache of past positions: per layer, keys and values in the form the attention
//! that reads them wants — rows for the kernels' attention ([`KvRows`]), candle's
//! `KvCache` of tensors for candle's ops (differentiable mode, other dtypes) — converted once
//! when a cache filled one way is read the other.

use crate::nn::attention::{KvRows, KV_CHUNK};
use candle_core::{bail, Result};

/// Keys and values of past positions, per layer, written in place (a decoding step copies one
/// position, not the whole history). One sequence: a batch of sequences is a cache each.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One layer's keys and values, in the form the attention that reads them wants: rows of plain
/// floats for the kernels' attention (inference), tensors that carry gradients for candle's ops
/// (differentiable mode, other dtypes). A cache filled one way and read the other is converted once.
#[derive(Debug, Clone, Default)]
pub(super) enum LayerCache {
    #[default]
    Empty,
    Rows(KvRows),
    /// `[1, kv_heads, t, d]` keys and values.
    Tensors(candle_nn::kv_cache::KvCache),
}

impl LayerCache {
    pub(super) fn len(&self) -> usize {
        match self {
            LayerCache::Empty => 0,
            LayerCache::Rows(r) => r.len(),
            LayerCache::Tensors(c) => c.current_seq_len(),
        }
    }

    /// The rows form for `heads` key/value heads of `d` values.
    pub(super) fn rows(&mut self, heads: usize, d: usize) -> Result<&mut KvRows> {
        if let LayerCache::Tensors(c) = self {
            let rows = match (c.k()?, c.v()?) {
                (Some(k), Some(v)) => KvRows::from_tensors(&k, &v, heads, d)?,
                _ => KvRows::new(heads, d),
            };
            *self = LayerCache::Rows(rows);
        }
        if let LayerCache::Empty = self {
            *self = LayerCache::Rows(KvRows::new(heads, d));
        }
        match self {
            LayerCache::Rows(r) if r.holds(heads, d) => Ok(r),
            _ => bail!("key/value cache holds heads of another shape than {heads} × {d}"),
        }
    }

    /// The tensors form.
    pub(super) fn tensors(&mut self) -> Result<&mut candle_nn::kv_cache::KvCache> {
        if let LayerCache::Rows(r) = self {
            let mut c = candle_nn::kv_cache::KvCache::new(2, KV_CHUNK);
            if let Some((k, v)) = r.to_tensors()? {
                c.append(&k, &v)?;
            }
            *self = LayerCache::Tensors(c);
        }
        if let LayerCache::Empty = self {
            *self = LayerCache::Tensors(candle_nn::kv_cache::KvCache::new(2, KV_CHUNK));
        }
        match self {
            LayerCache::Tensors(c) => Ok(c),
            _ => bail!("key/value cache lost its tensors"),
        }
    }
}
