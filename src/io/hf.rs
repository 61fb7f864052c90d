//! Hugging Face model folders (local, or fetched into the hf-hub cache): `config.json`,
//! `model.safetensors` or sharded `model-0000i-of-0000n.safetensors` with
//! `model.safetensors.index.json`, and `tokenizer.json`.

use crate::source::{shard_names, weight_files};
use candle_core::{bail, Result};
use std::path::{Path, PathBuf};

/// Files of one model, wherever they live.
#[derive(Debug, Clone)]
pub struct HfFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// The safetensors files (one, or every shard).
    pub weights: Vec<PathBuf>,
    /// `model.safetensors.index.json`, for a sharded checkpoint.
    pub index: Option<PathBuf>,
    /// `tokenizer.json`, if present.
    pub tokenizer: Option<PathBuf>,
}

/// Finds the model files in a local folder.
pub fn local_files(dir: &Path) -> Result<HfFiles> {
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!("{}: no config.json in this model folder", dir.display())
    }
    let (weights, index) = weight_files(dir)?;
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(HfFiles { config, weights, index, tokenizer })
}

/// Fetches (or finds in the cache) the files of hub repo `id` at `revision`.
///
/// With `HF_HUB_OFFLINE=1` only the local cache (`HF_HOME`, default `~/.cache/huggingface`) is
/// consulted; otherwise cached files are used and missing ones downloaded.
#[cfg(feature = "hub")]
pub fn hub_files(id: &str, revision: &str) -> Result<HfFiles> {
    use hf_hub::{Cache, Repo, RepoType};
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let cached = Cache::from_env().repo(repo.clone());
    let api = if offline {
        None
    } else {
        Some(
            hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(true)
                .build()
                .map_err(|e| candle_core::Error::Msg(format!("hub client: {e}")))?,
        )
    };
    let get = |file: &str| -> Result<Option<PathBuf>> {
        if let Some(p) = cached.get(file) {
            return Ok(Some(p));
        }
        match &api {
            None => Ok(None),
            Some(api) => match api.repo(repo.clone()).get(file) {
                Ok(p) => Ok(Some(p)),
                Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => Ok(None),
                Err(e) => bail!("hub model '{id}' ({revision}): fetching {file}: {e}"),
            },
        }
    };
    let where_ = if offline { "in the local hub cache (HF_HUB_OFFLINE is set)" } else { "on the hub" };
    let Some(config) = get("config.json")? else { bail!("hub model '{id}' ({revision}): config.json not found {where_}") };
    let index = get("model.safetensors.index.json")?;
    let weights = if let Some(index) = &index {
        shard_names(index)?
            .iter()
            .map(|n| get(n)?.ok_or_else(|| candle_core::Error::Msg(format!("hub model '{id}': shard {n} not found {where_}"))))
            .collect::<Result<Vec<_>>>()?
    } else if let Some(w) = get("model.safetensors")? {
        vec![w]
    } else {
        bail!("hub model '{id}' ({revision}): no model.safetensors {where_}")
    };
    Ok(HfFiles { config, weights, index, tokenizer: get("tokenizer.json")? })
}
