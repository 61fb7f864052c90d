//! Progress bars drawn from the library's [`Progress`] reports: a new bar for each stage, counting
//! things or bytes as the report says.

use anyhow::Result;
use candle_quant::io;
use candle_quant::progress::{Progress, Unit};
use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps labelled `msg`.
pub fn bar(len: usize, msg: &str) -> ProgressBar {
    styled(len as u64, msg, "{msg:>28} [{bar:30}] {pos}/{len} {elapsed}")
}

/// A bar of bytes with a rate, labelled `msg`.
pub fn bytes_bar(msg: &str) -> ProgressBar {
    styled(0, msg, "{msg:>28} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}")
}

fn styled(len: u64, msg: &str, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len).with_message(msg.to_string());
    pb.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    pb
}

/// Progress bars for a sequence of stages: a new bar for each stage.
#[derive(Default)]
pub struct Bars {
    pb: Option<ProgressBar>,
    stage: String,
}

impl Bars {
    /// Shows `p`: on the current bar, or on a new one when the stage changed.
    pub fn update(&mut self, p: Progress) {
        if p.stage != self.stage || self.pb.is_none() {
            if let Some(pb) = self.pb.take() {
                pb.finish_and_clear();
            }
            self.pb = Some(match p.unit {
                Unit::Items => bar(0, p.stage),
                Unit::Bytes => bytes_bar(p.stage),
            });
            self.stage = p.stage.to_string();
        }
        if let Some(pb) = &self.pb {
            pb.set_length(p.total);
            pb.set_position(p.done);
        }
    }

    /// Clears the last bar.
    pub fn finish(self) {
        if let Some(pb) = self.pb {
            pb.finish_and_clear();
        }
    }

    /// Runs `load` with a progress callback that draws these bars, then clears them.
    pub fn around<T>(load: impl FnOnce(io::OnProgress) -> candle_core::Result<T>) -> Result<T> {
        let mut bars = Bars::default();
        let out = load(&mut |p| bars.update(p));
        bars.finish();
        Ok(out?)
    }
}
