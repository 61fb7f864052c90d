//! The one progress report of long work: loading, quantizing, writing, calibrating, evaluating.
//! Every function that takes a while takes a callback `FnMut(Progress)` and calls it as it goes.

/// Where a long step has come: `done` of `total`, counted in `unit`, in `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress<'a> {
    /// What is being done: "loading tensors", "quantizing layers", "writing tensors", …
    pub stage: &'a str,
    /// How much is done.
    pub done: u64,
    /// How much there is (0 while not known).
    pub total: u64,
    /// What `done` and `total` count.
    pub unit: Unit,
}

/// What a [`Progress`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Things: tensors, layers, windows of text.
    Items,
    /// Bytes of data.
    Bytes,
}

impl<'a> Progress<'a> {
    /// `done` of `total` things in `stage`.
    pub fn items(stage: &'a str, done: usize, total: usize) -> Self {
        Self { stage, done: done as u64, total: total as u64, unit: Unit::Items }
    }

    /// `done` of `total` bytes in `stage`.
    pub fn bytes(stage: &'a str, done: u64, total: u64) -> Self {
        Self { stage, done, total, unit: Unit::Bytes }
    }
}
