//! Attention on the kernels for the models' fast (non-training) paths: every query row against
//! just the keys it may see — causal prefixes for a decoder ([`causal_attention`], over a
//! [`KvRows`] cache), a sentence's own tokens in a packed encoder batch
//! ([`packed_self_attention`]) — so no mask is built and no masked score is computed. The
//! arithmetic is the kernels' ([`kernels::attend_part`]); this module turns tensors into the
//! rows they read.

use super::ops::with_float_values;
use crate::kernels;
use candle_core::{bail, Device, Result, Tensor};
use std::mem::MaybeUninit;
use std::ops::Range;

/// Cached values (`heads · t · d · rows`) from which attention is split over threads.
const PARALLEL_MIN: usize = 1 << 15;

/// The keys and values of one key/value head: rows of `d` values, as many of each.
pub(crate) struct HeadRows<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
}

/// `y[i, h·d..(h+1)·d] = softmax(scale · q_{h,i} · K_gᵀ) · V_g` over the key rows `visible[i]`,
/// for every query row `i < s = visible.len()` and head `h`, whose key/value head is `g = h / rep` with
/// `rep = heads / kv.len()` (grouped-query attention: the `rep` heads of a group read each key
/// and value row once for all of them). `q` and `y` are `[s, heads·d]` (a projection's output
/// rows: head `h` of row `i` at `(i·heads + h)·d`).
///
/// Every (row, group) is a task of the kernel team; a single row (decoding) is also cut into
/// ranges of keys (flash-decoding: each part keeps its own softmax maximum and sum, merged
/// after) once the keys are many enough to outweigh the hand-off, into as many ranges as it
/// takes for the parts to share out evenly over the threads (3 groups on 2 threads: 6 parts,
/// not 2 : 1).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_sequence(
    q: &[f32],
    d: usize,
    kv: &[HeadRows],
    heads: usize,
    scale: f32,
    visible: &[Range<usize>],
    y: &mut [f32],
) -> Result<()> {
    let (s, groups) = (visible.len(), kv.len());
    if s == 0 || groups == 0 || !heads.is_multiple_of(groups) || q.len() != heads * s * d || y.len() != q.len() {
        bail!(
            "attention: {heads} heads of {d} over {s} rows do not fit {groups} key/value heads, a query of {} and an output of {}",
            q.len(),
            y.len()
        )
    }
    let rep = heads / groups;
    for (i, r) in visible.iter().enumerate() {
        if r.is_empty() || kv.iter().any(|h| h.keys.len() < r.end * d || h.values.len() < r.end * d) {
            bail!("attention: query row {i} sees keys {r:?}, beyond the {} rows held", kv[0].keys.len() / d.max(1))
        }
    }
    let work = heads * d * visible.iter().map(|r| r.len()).sum::<usize>();
    let parallel = work >= PARALLEL_MIN;
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let splits = if s > 1 { 1 } else { (1..=threads).find(|n| (groups * n).is_multiple_of(threads)).unwrap_or(1).min(visible[0].len()) };
    // Rows that see the same keys go through the kernel together, up to its tile of query
    // heads, so that each key and value row is read once for all of them.
    let block =
        if rep < kernels::MAX_TILE_HEADS && visible.iter().all(|r| *r == visible[0]) { (kernels::MAX_TILE_HEADS / rep).min(s) } else { 1 };
    let blocks = s.div_ceil(block);
    let part_len = kernels::part_len(block * rep, d);
    let mut parts = vec![0f32; blocks * groups * splits * part_len];
    kernels::try_parallel_for_parts(parts.chunks_mut(part_len).collect(), parallel, |task, part| {
        let (ib, g, split) = (task / (groups * splits), task / splits % groups, task % splits);
        let rows_i = ib * block..((ib + 1) * block).min(s);
        let keys = visible[rows_i.start].clone();
        let rows = keys.start + split * keys.len() / splits..keys.start + (split + 1) * keys.len() / splits;
        let at = rows.start * d..rows.end * d;
        // The group's query heads at each row of the block, one after another: one row's are
        // already side by side; a block's are gathered (a short last block repeats its last
        // row, whose result is not used).
        let heads_of = |i: usize| &q[(i * heads + g * rep) * d..(i * heads + (g + 1) * rep) * d];
        let mut gathered = Vec::new();
        let qg = if block == 1 {
            heads_of(rows_i.start)
        } else {
            gathered.reserve(block * rep * d);
            for i in rows_i.start..rows_i.start + block {
                gathered.extend_from_slice(heads_of(i.min(s - 1)));
            }
            &gathered
        };
        kernels::attend_part(qg, &kv[g].keys[at.clone()], &kv[g].values[at], d, scale, part)
    })?;
    // Output rows hold their heads in order: group g's heads are the g-th run of rep·d values.
    let mut out = vec![0f32; block * rep * d];
    for (task, split_parts) in parts.chunks(splits * part_len).enumerate() {
        let (ib, g) = (task / groups, task % groups);
        kernels::combine_parts(split_parts, splits, d, &mut out)?;
        for (r, i) in (ib * block..((ib + 1) * block).min(s)).enumerate() {
            y[i * heads * d + g * rep * d..i * heads * d + (g + 1) * rep * d].copy_from_slice(&out[r * rep * d..(r + 1) * rep * d]);
        }
    }
    Ok(())
}

/// Positions a layer's key/value rows grow by: memory is reserved in steps of this many
/// positions instead of being copied on every token.
pub(crate) const KV_CHUNK: usize = 512;

/// Keys (RoPE applied) and values of one decoder layer as rows of `d` floats: key/value head
/// `g`'s position `p` at `(g·capacity + p)·d`, room for `capacity` positions reserved in steps of
/// [`KV_CHUNK`].
#[derive(Debug, Clone, Default)]
pub(crate) struct KvRows {
    heads: usize,
    d: usize,
    len: usize,
    capacity: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvRows {
    /// No positions yet, for `heads` key/value heads of `d` values.
    pub(crate) fn new(heads: usize, d: usize) -> Self {
        Self { heads, d, ..Self::default() }
    }

    /// Positions held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the rows are for `heads` key/value heads of `d` values.
    pub(crate) fn holds(&self, heads: usize, d: usize) -> bool {
        self.heads == heads && self.d == d
    }

    /// The rows of `[1, heads, t, d]` keys and values (a cache filled by candle's ops).
    pub(crate) fn from_tensors(k: &Tensor, v: &Tensor, heads: usize, d: usize) -> Result<Self> {
        let mut rows = KvRows::new(heads, d);
        let (k, v) = (k.flatten_all()?.to_vec1::<f32>()?, v.flatten_all()?.to_vec1::<f32>()?);
        if k.len() != v.len() {
            bail!("key/value cache holds {} keys but {} values", k.len(), v.len())
        }
        let t = k.len() / (heads * d).max(1);
        rows.reserve(t);
        for g in 0..heads {
            let (from, to) = (g * t * d..(g + 1) * t * d, g * rows.capacity * d);
            rows.keys[to..to + t * d].copy_from_slice(&k[from.clone()]);
            rows.values[to..to + t * d].copy_from_slice(&v[from]);
        }
        rows.len = t;
        Ok(rows)
    }

    /// Keys and values as `[1, heads, t, d]` tensors (for candle's ops); `None` when empty.
    pub(crate) fn to_tensors(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.len == 0 {
            return Ok(None);
        }
        let gather = |buf: &[f32]| -> Vec<f32> {
            (0..self.heads).flat_map(|g| &buf[g * self.capacity * self.d..][..self.len * self.d]).copied().collect()
        };
        let shape = (1, self.heads, self.len, self.d);
        Ok(Some((Tensor::from_vec(gather(&self.keys), shape, &Device::Cpu)?, Tensor::from_vec(gather(&self.values), shape, &Device::Cpu)?)))
    }

    /// Room for `extra` more positions (moving each head's rows to its new place if it grows).
    fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need <= self.capacity {
            return;
        }
        let (cap, old, len, d) = (need.next_multiple_of(KV_CHUNK), self.capacity, self.len, self.d);
        let regrow = |buf: &[f32]| {
            let mut grown = vec![0f32; self.heads * cap * d];
            for g in 0..self.heads {
                grown[g * cap * d..][..len * d].copy_from_slice(&buf[g * old * d..][..len * d]);
            }
            grown
        };
        (self.keys, self.values) = (regrow(&self.keys), regrow(&self.values));
        self.capacity = cap;
    }

    /// The rows of key/value head `g` up to the last position held.
    fn head(&self, g: usize) -> HeadRows<'_> {
        let at = g * self.capacity * self.d..(g * self.capacity + self.len) * self.d;
        HeadRows { keys: &self.keys[at.clone()], values: &self.values[at] }
    }
}

/// `x` rotated by RoPE at one position (`rotate_half` form, as candle's `rope`): with `h = d/2`,
/// `y_j = x_j·cos_j − x_{j+h}·sin_j` and `y_{j+h} = x_j·sin_j + x_{j+h}·cos_j` for `j < h`.
/// Writes every value of `y` (`d` even, `h` angles given: checked by the model's config and
/// [`causal_attention`]).
fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [MaybeUninit<f32>]) {
    let h = x.len() / 2;
    let (x1, x2) = x.split_at(h);
    let (y1, y2) = y.split_at_mut(h);
    for j in 0..h {
        y1[j].write(x1[j] * cos[j] - x2[j] * sin[j]);
        y2[j].write(x1[j] * sin[j] + x2[j] * cos[j]);
    }
}

/// The shape of a decoder layer's attention: `heads` query heads and `kv_heads` key/value heads
/// of `d` values, scores scaled by `scale`, and keys visible to a query: its own position and
/// the `window − 1` before it (`None`: all before it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub scale: f32,
    pub window: Option<usize>,
}

/// Causal attention of the `s` newest positions (a prompt, or one decoding step) from the
/// projections' `[1, s, heads·d]` / `[1, s, kv_heads·d]` outputs (any shape of as many values):
/// keys rotated by RoPE (`cos`, `sin`: `[≥ s, d/2]` from this step's first position) straight
/// into `cache`'s rows, values copied there, queries rotated in their own layout; query
/// position `i` (absolute position `p = t − s + i`) sees the keys `j ≤ p`, and `p − j < window`
/// on a sliding-window layer. Returns `[1, s, heads·d]`.
pub(crate) fn causal_attention(
    shape: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    cache: &mut KvRows,
) -> Result<Tensor> {
    let AttentionShape { heads, kv_heads, d, scale, window } = shape;
    let s = q.elem_count() / (heads * d).max(1);
    if !cache.holds(kv_heads, d)
        || q.elem_count() != s * heads * d
        || k.elem_count() != s * kv_heads * d
        || v.elem_count() != k.elem_count()
    {
        bail!(
            "attention: queries {:?}, keys {:?} and values {:?} are not {s} rows of {heads} and {kv_heads} heads of {d}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    cache.reserve(s);
    let (pos, cap) = (cache.len, cache.capacity);
    let mut qr = Vec::with_capacity(s * heads * d);
    with_float_values(cos, "RoPE cosines", |cos| {
        with_float_values(sin, "RoPE sines", |sin| {
            let half = d / 2;
            if cos.len() < s * half || sin.len() < s * half {
                bail!("RoPE tables hold {} values for {s} positions of {half}", cos.len().min(sin.len()))
            }
            let at = |i: usize| (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
            with_float_values(q, "attention queries", |q| {
                // Pieces of 64 rows over the kernel team for a prompt.
                let row = heads * d;
                let qr = &mut qr.spare_capacity_mut()[..s * row];
                kernels::parallel_for_parts(qr.chunks_mut(64 * row).collect(), s > 64, |p, y| {
                    for (r, (x, y)) in q[p * 64 * row..].chunks_exact(row).zip(y.chunks_exact_mut(row)).enumerate() {
                        let (c, sn) = at(p * 64 + r);
                        x.chunks_exact(d).zip(y.chunks_exact_mut(d)).for_each(|(x, y)| rope_row(x, c, sn, y));
                    }
                });
                Ok(())
            })?;
            with_float_values(k, "attention keys", |k| {
                for (i, x) in k.chunks_exact(kv_heads * d).enumerate() {
                    let (c, sn) = at(i);
                    for (g, x) in x.chunks_exact(d).enumerate() {
                        rope_row(x, c, sn, kernels::as_unfilled(&mut cache.keys[(g * cap + pos + i) * d..][..d]));
                    }
                }
                Ok(())
            })
        })
    })?;
    // SAFETY: the rotation above returned Ok, so it wrote every one of the s rows of heads·d
    // queries: the parts cover `s · heads · d` values and rope_row writes each value of its row.
    unsafe { qr.set_len(s * heads * d) };
    with_float_values(v, "attention values", |v| {
        for (i, x) in v.chunks_exact(kv_heads * d).enumerate() {
            for (g, x) in x.chunks_exact(d).enumerate() {
                cache.values[(g * cap + pos + i) * d..][..d].copy_from_slice(x);
            }
        }
        Ok(())
    })?;
    cache.len += s;
    let t = cache.len;
    let kv: Vec<_> = (0..kv_heads).map(|g| cache.head(g)).collect();
    let visible: Vec<_> = (t - s..t).map(|p| (p + 1).saturating_sub(window.unwrap_or(usize::MAX))..p + 1).collect();
    let mut y = vec![0f32; s * heads * d];
    attend_sequence(&qr, d, &kv, heads, scale, &visible, &mut y)?;
    Tensor::from_vec(y, (1, s, heads * d), &Device::Cpu)
}

/// Self-attention of sequences packed in the rows of the projections `q`, `k`, `v`
/// (`[Σ len, heads·d]`, sequence `i` in rows `spans[i]`): each query row sees its own
/// sequence's keys, scores scaled by `1/√d`. One task per sequence over the kernel team (a
/// sequence's attention is small: one job for the batch rather than one per sequence); a lone
/// sequence splits its own. Returns `[Σ len, heads·d]`.
pub(crate) fn packed_self_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, spans: &[Range<usize>]) -> Result<Tensor> {
    let (rows, h) = q.dims2()?;
    let d = h / heads.max(1);
    if heads == 0 || d * heads != h || k.dims() != q.dims() || v.dims() != q.dims() || spans.last().is_some_and(|r| r.end > rows) {
        bail!(
            "packed attention: {heads} heads do not split queries {:?}, keys {:?} and values {:?} over {} sequences",
            q.dims(),
            k.dims(),
            v.dims(),
            spans.len()
        )
    }
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let mut y = vec![0f32; rows * h];
    let mut outputs = Vec::with_capacity(spans.len());
    let mut rest = &mut y[..];
    for r in spans {
        let (own, tail) = rest.split_at_mut(r.len() * h);
        outputs.push(own);
        rest = tail;
    }
    with_float_values(q, "attention queries", |q| {
        with_float_values(k, "attention keys", |k| {
            with_float_values(v, "attention values", |v| {
                kernels::try_parallel_for_parts(outputs, spans.len() > 1, |i, out| {
                    let r = &spans[i];
                    // The sequence's keys and values gathered per head into rows of their
                    // own ([heads, len, d], in cache for its attention); queries stay in rows.
                    let by_head = |x: &[f32]| {
                        let mut rows = Vec::with_capacity(r.len() * h);
                        for g in 0..heads {
                            for t in r.clone() {
                                rows.extend_from_slice(&x[t * h + g * d..t * h + (g + 1) * d]);
                            }
                        }
                        rows
                    };
                    let (k, v) = (by_head(k), by_head(v));
                    let at = |g: usize| g * r.len() * d..(g + 1) * r.len() * d;
                    let kv: Vec<_> = (0..heads).map(|g| HeadRows { keys: &k[at(g)], values: &v[at(g)] }).collect();
                    let q = &q[r.start * h..r.end * h];
                    attend_sequence(q, d, &kv, heads, scale, &vec![0..r.len(); r.len()], out)
                })
            })
        })
    })?;
    Tensor::from_vec(y, (rows, h), q.device())
}

/// Packed rows `[Σ len, h]` (sequence `i` in rows `spans[i]`) padded back to a batch
/// `[spans.len(), s, h]`, zero rows after each sequence.
pub(crate) fn unpack_sequences(x: &Tensor, spans: &[Range<usize>], s: usize) -> Result<Tensor> {
    let h = x.dim(1)?;
    if spans.iter().any(|r| r.len() > s) || spans.last().is_some_and(|r| r.end * h > x.elem_count()) {
        bail!("unpacking {} sequences of at most {s} rows from {:?}", spans.len(), x.dims())
    }
    let padded = with_float_values(x, "hidden states", |xs| {
        let mut padded = vec![0f32; spans.len() * s * h];
        for (i, r) in spans.iter().enumerate() {
            padded[i * s * h..(i * s + r.len()) * h].copy_from_slice(&xs[r.start * h..r.end * h]);
        }
        Ok(padded)
    })?;
    Tensor::from_vec(padded, (spans.len(), s, h), x.device())
}
