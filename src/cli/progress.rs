//! Progress bars: one per long step, and one per loading stage.

use anyhow::Result;
use candle_quant::io;
use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps labelled `msg`.
pub fn bar(len: usize, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64).with_message(msg.to_string());
    pb.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

/// Progress bars for loading: a new bar for each stage.
#[derive(Default)]
pub struct Bars {
    pb: Option<ProgressBar>,
    stage: String,
}

impl Bars {
    fn update(&mut self, stage: &str, done: usize, total: usize) {
        if stage != self.stage || self.pb.is_none() {
            if let Some(p) = self.pb.take() {
                p.finish();
            }
            self.pb = Some(bar(total, stage));
            self.stage = stage.to_string();
        }
        if let Some(p) = &self.pb {
            p.set_position(done as u64);
        }
    }

    fn finish(self) {
        if let Some(p) = self.pb {
            p.finish_and_clear();
        }
    }

    /// Runs `load` with a progress callback that draws these bars, then clears them.
    pub fn around<T>(load: impl FnOnce(io::Progress) -> candle_core::Result<T>) -> Result<T> {
        let mut bars = Bars::default();
        let out = load(&mut |s, d, t| bars.update(s, d, t));
        bars.finish();
        Ok(out?)
    }
}

/// A bar of bytes with a rate, for writing files.
pub fn bytes_bar(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(0).with_message(msg.to_string());
    pb.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}
