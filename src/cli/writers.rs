//! Output files of the commands, each written under a temporary name and renamed when complete.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Writes embeddings as `.jsonl` or `.safetensors`, through a temporary file renamed when done.
pub fn write_embeddings(out: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let tmp = out.with_extension(format!("{}.partial", out.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let hidden = rows.first().map_or(0, Vec::len);
    match out.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => {
            let mut text = String::new();
            for r in rows {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        }
        Some("safetensors") => {
            use candle_quant::source::{write_file, Dtype, Entry};
            let entry = Entry { name: "embeddings".into(), dtype: Dtype::F32, shape: vec![rows.len(), hidden] };
            write_file(&tmp, &[entry], |_, buf| {
                *buf = rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
                Ok(())
            })?;
        }
        _ => bail!("{}: the embeddings file must end in .jsonl or .safetensors", out.display()),
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(())
}
