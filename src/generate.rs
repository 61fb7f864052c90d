//! Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p, repetition
//! penalty, seeded), streaming text as it is produced, with prefill and decode timed apart.

use crate::io::LanguageModel;
use crate::lm::CausalLm;
use candle_core::{bail, Result};
use std::time::Instant;
use tokenizers::Tokenizer;

/// How the next token is chosen.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Sample among the `k` most likely tokens only.
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities add up to `p`.
    pub top_p: Option<f64>,
    /// Logits of recently generated tokens are divided (if positive) or multiplied (if
    /// negative) by this; 1.0 disables it.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the sampler's random numbers.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, repetition_penalty: 1.0, repeat_last_n: 64, seed: 299_792_458 }
    }
}

/// Timings and counts of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenerationStats {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Time to run the prompt through the model, in milliseconds.
    pub prefill_ms: f64,
    /// New tokens after the first, per second of decoding.
    pub decode_tok_s: f64,
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated tokens (the prompt not included).
    pub tokens: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Counts and timings.
    pub stats: GenerationStats,
}

/// Renders a chat template — Jinja, as Hugging Face's `chat_template` and GGUF's
/// `tokenizer.chat_template` hold it — for `messages` (`(role, content)` pairs), with
/// `add_generation_prompt`, `bos_token` and `eos_token` set as transformers sets them and
/// Python string methods (`strip`, `startswith`, …) available. A template that fails to parse
/// or render, or raises an exception itself, is an error.
pub fn render_chat_template(
    template: &str,
    messages: &[(&str, &str)],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let err = |e: minijinja::Error| candle_core::Error::Msg(format!("chat template: {e:#}"));
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(err)?;
    let messages: Vec<minijinja::Value> =
        messages.iter().map(|(role, content)| minijinja::context! { role => *role, content => *content }).collect();
    env.get_template("chat")
        .and_then(|t| t.render(minijinja::context! { messages, add_generation_prompt, bos_token, eos_token }))
        .map_err(err)
}

/// One user message in `lm`'s chat template, ready for the assistant's reply; `None` when the
/// model has no template; an error when the template cannot render.
pub fn apply_chat_template(lm: &LanguageModel, prompt: &str) -> Result<Option<String>> {
    let Some(template) = &lm.chat_template else { return Ok(None) };
    let token = |id: Option<u32>| id.and_then(|i| lm.tokenizer.id_to_token(i)).unwrap_or_default();
    let cfg = lm.model.config();
    let (bos, eos) = (token(cfg.bos_token_id), token(cfg.eos_token_id.first().copied()));
    render_chat_template(template, &[("user", prompt)], true, &bos, &eos)
        .map(Some)
        .map_err(|e| candle_core::Error::Msg(format!("the chat template: {e} (encode the prompt without it to feed it as it is)")))
}

/// Encodes a prompt (special tokens in it are honoured), after the BOS token when the model
/// wants one (`add_bos_token`: Gemma; not SmolLM2).
pub fn encode(lm: &LanguageModel, text: &str) -> Result<Vec<u32>> {
    let cfg = lm.model.config();
    let text_ids = encode_text(lm, text)?;
    // A chat template may have written the BOS token already.
    let bos = cfg.bos_token_id.filter(|b| cfg.add_bos_token && text_ids.first() != Some(b));
    Ok(bos.into_iter().chain(text_ids).collect())
}

/// The tokens of `text` alone, without the BOS a prompt gets (for scoring text in windows,
/// each of which gets its own BOS).
pub fn encode_text(lm: &LanguageModel, text: &str) -> Result<Vec<u32>> {
    let enc = lm.tokenizer.encode(text, false).map_err(|e| candle_core::Error::Msg(format!("tokenizing the prompt: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// End-of-sequence token ids: the model's, then the tokenizer's usual names for one.
pub fn eos_tokens(model: &impl CausalLm, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut eos = model.eos_tokens();
    for name in ["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"] {
        if let Some(id) = tokenizer.token_to_id(name) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    eos
}

/// SplitMix64: small, seedable, good enough for sampling.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from one row of logits.
fn choose(logits: &mut [f32], history: &[u32], s: &Sampling, rng: &mut Rng) -> u32 {
    if s.repetition_penalty != 1.0 {
        let start = history.len().saturating_sub(s.repeat_last_n);
        for &t in &history[start..] {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l >= 0.0 { *l / s.repetition_penalty } else { *l * s.repetition_penalty };
            }
        }
    }
    let argmax = || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = s.top_k {
        idx.truncate(k.max(1));
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = s.top_p {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.uniform() * total;
    for (p, &i) in probs.iter().zip(&idx) {
        r -= p;
        if r <= 0.0 {
            return i as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// Generates up to `max_new` tokens after `prompt` with any [`CausalLm`], calling `on_text` with
/// each new piece of text (decoded by `tokenizer`) as soon as it decodes cleanly. Stops at an
/// end-of-sequence token ([`eos_tokens`]).
pub fn generate(
    model: &impl CausalLm,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let ctx = model.max_context();
    if prompt.is_empty() {
        bail!("the prompt is empty")
    }
    if prompt.len() + max_new > ctx {
        bail!("prompt of {} tokens plus {max_new} new tokens exceeds the model's context of {ctx} tokens", prompt.len())
    }
    let eos = eos_tokens(model, tokenizer);
    let mut rng = Rng(sampling.seed);
    let mut cache = model.new_cache();
    let mut history = prompt.to_vec();
    let mut new = Vec::new();
    let (mut shown, mut text) = (0usize, String::new());
    let start = Instant::now();
    let mut logits = model.forward(prompt, &mut cache, false)?;
    let prefill = start.elapsed();
    let decode_start = Instant::now();
    while new.len() < max_new {
        let mut row = logits.flatten_all()?.to_vec1::<f32>()?;
        let next = choose(&mut row, &history, sampling, &mut rng);
        if eos.contains(&next) {
            break;
        }
        new.push(next);
        history.push(next);
        text = tokenizer.decode(&new, true).map_err(|e| candle_core::Error::Msg(format!("decoding: {e}")))?;
        if !text.ends_with('\u{FFFD}') && text.len() > shown && text.is_char_boundary(shown) {
            on_text(&text[shown..]);
            shown = text.len();
        }
        if new.len() == max_new {
            break;
        }
        logits = model.forward(&[next], &mut cache, false)?;
    }
    let decode = decode_start.elapsed().as_secs_f64();
    let stats = GenerationStats {
        prompt_tokens: prompt.len(),
        new_tokens: new.len(),
        prefill_ms: prefill.as_secs_f64() * 1e3,
        decode_tok_s: if new.len() > 1 && decode > 0.0 { (new.len() - 1) as f64 / decode } else { 0.0 },
    };
    Ok(Generation { tokens: new, text, stats })
}

/// A reference and a candidate model generating greedily from the same prompt, side by side.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The reference's generation, with the median timings of all runs.
    pub reference: Generation,
    /// The candidate's generation, with the median timings of all runs.
    pub candidate: Generation,
    /// Candidate over reference decode speed, one per pair of alternating runs.
    pub decode_speedups: Vec<f64>,
    /// The median of `decode_speedups`.
    pub decode_speedup: f64,
    /// Index of the first generated token where the two texts differ (`None`: identical).
    pub first_divergence: Option<usize>,
    /// Share of the reference's generated positions where, fed the reference's text, the
    /// candidate ranks the same token first (`None` when nothing was generated).
    pub top1_agreement: Option<f64>,
}

/// Which side of a [`compare`] produced a piece of text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The reference model.
    Reference,
    /// The candidate model.
    Candidate,
}

/// Greedy generation of `max_new` tokens after `prompt` by `reference` and `candidate`, `repeats`
/// times each, alternating so that both see the same machine load; `on_text` streams the first
/// run of each. Timings are medians; speedups are per pair, then their median.
pub fn compare<R: CausalLm, C: CausalLm>(
    reference: &R,
    candidate: &C,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new: usize,
    repeats: usize,
    mut on_text: impl FnMut(Side, &str),
) -> Result<Comparison> {
    if repeats == 0 {
        bail!("compare needs at least one run of each model")
    }
    let greedy = Sampling::default();
    let mut r = generate(reference, tokenizer, prompt, max_new, &greedy, |t| on_text(Side::Reference, t))?;
    let mut c = generate(candidate, tokenizer, prompt, max_new, &greedy, |t| on_text(Side::Candidate, t))?;
    let mut runs = vec![(r.stats.clone(), c.stats.clone())];
    for _ in 1..repeats {
        let rr = generate(reference, tokenizer, prompt, max_new, &greedy, |_| {})?;
        let cc = generate(candidate, tokenizer, prompt, max_new, &greedy, |_| {})?;
        runs.push((rr.stats, cc.stats));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let decode_speedups: Vec<f64> =
        runs.iter().map(|(r, c)| if r.decode_tok_s > 0.0 { c.decode_tok_s / r.decode_tok_s } else { 0.0 }).collect();
    r.stats.decode_tok_s = median(runs.iter().map(|x| x.0.decode_tok_s).collect());
    r.stats.prefill_ms = median(runs.iter().map(|x| x.0.prefill_ms).collect());
    c.stats.decode_tok_s = median(runs.iter().map(|x| x.1.decode_tok_s).collect());
    c.stats.prefill_ms = median(runs.iter().map(|x| x.1.prefill_ms).collect());
    let first_divergence = r
        .tokens
        .iter()
        .zip(&c.tokens)
        .position(|(a, b)| a != b)
        .or((r.tokens.len() != c.tokens.len()).then(|| r.tokens.len().min(c.tokens.len())));
    let seq: Vec<u32> = prompt.iter().chain(&r.tokens).copied().collect();
    let top1_agreement = if r.tokens.is_empty() {
        None
    } else {
        Some(crate::eval::evaluate_from(reference, candidate, &seq, prompt.len() - 1)?.top1_agreement)
    };
    Ok(Comparison {
        reference: r,
        candidate: c,
        decode_speedup: median(decode_speedups.clone()),
        decode_speedups,
        first_divergence,
        top1_agreement,
    })
}
