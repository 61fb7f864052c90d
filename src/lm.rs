//! What [`crate::generate`] and [`crate::eval`] need of a language model: [`CausalLm`], for the
//! crate's own decoder and for any model of yours.

use candle_core::{Result, Tensor};

/// A causal language model driven token by token with a cache of its past positions.
///
/// Implement it for your own model to run [`crate::generate::generate`],
/// [`crate::generate::compare`] and [`crate::eval::evaluate`] on it, float and int8 alike.
pub trait CausalLm {
    /// The model's cache of past positions (keys and values).
    type Cache;

    /// An empty cache.
    fn new_cache(&self) -> Self::Cache;

    /// Logits `[n, vocab]` for `tokens` placed after the positions `cache` holds, which it then
    /// holds too. With `all_logits = false` only the last position's row is returned (`n = 1`).
    fn forward(&self, tokens: &[u32], cache: &mut Self::Cache, all_logits: bool) -> Result<Tensor>;

    /// The longest sequence (prompt and generated tokens) the model takes.
    fn max_context(&self) -> usize;

    /// A token to put before every prompt and evaluation window, for models trained that way.
    fn bos_token(&self) -> Option<u32> {
        None
    }

    /// Tokens that end a generation.
    fn eos_tokens(&self) -> Vec<u32> {
        Vec::new()
    }
}

impl CausalLm for crate::models::Decoder {
    type Cache = crate::models::KvCache;

    fn new_cache(&self) -> Self::Cache {
        Self::Cache::default()
    }

    fn forward(&self, tokens: &[u32], cache: &mut Self::Cache, all_logits: bool) -> Result<Tensor> {
        crate::models::Decoder::forward(self, tokens, cache, all_logits)
    }

    fn max_context(&self) -> usize {
        self.config().max_position_embeddings
    }

    fn bos_token(&self) -> Option<u32> {
        self.config().bos_token_id.filter(|_| self.config().add_bos_token)
    }

    fn eos_tokens(&self) -> Vec<u32> {
        self.config().eos_token_id.clone()
    }
}
