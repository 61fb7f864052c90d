//! Quality of a candidate model (e.g. int8) against a reference (e.g. its float self), on any
//! [`CausalLm`]: perplexity of both, mean KL(reference ‖ candidate) of the next-token
//! distributions, and top-1 agreement.

use crate::lm::CausalLm;
use crate::progress::Progress;
use candle_core::{bail, Result, Tensor, D};

/// Sums over the scored positions of one or more windows.
#[derive(Debug, Clone, Default)]
struct Sums {
    nll_ref: f64,
    nll_cand: f64,
    kl: f64,
    agree: usize,
    n: usize,
}

/// Quality figures of `candidate` relative to `reference`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    /// Perplexity of the reference model on the scored tokens.
    pub reference_ppl: f64,
    /// Perplexity of the candidate model.
    pub candidate_ppl: f64,
    /// `100 · (candidate_ppl / reference_ppl − 1)`.
    pub ppl_delta_pct: f64,
    /// Mean KL(reference ‖ candidate) per scored token, in nats.
    pub kld: f64,
    /// Fraction of positions where both models rank the same token first.
    pub top1_agreement: f64,
    /// Tokens scored.
    pub tokens: usize,
}

/// One model's predictions over one window: log-probabilities of positions `from..len-1`, each
/// position's top token, and the negative log-likelihood of the tokens that follow.
struct Side {
    log_probs: Tensor,
    argmax: Vec<u32>,
    nll: f64,
}

impl Side {
    fn of(model: &impl CausalLm, what: &str, tokens: &[u32], from: usize) -> Result<Self> {
        let logits = model.forward(tokens, &mut model.new_cache(), true)?;
        let n = tokens.len() - 1;
        if logits.dims().len() != 2 || logits.dim(0)? < n {
            bail!("the {what} model returned logits of shape {:?} for {} tokens: [tokens, vocab] expected", logits.shape(), tokens.len())
        }
        let log_probs = candle_nn::ops::log_softmax(&logits.narrow(0, from, n - from)?, D::Minus1)?;
        let targets = Tensor::new(&tokens[from + 1..], log_probs.device())?.unsqueeze(1)?;
        let nll = -(log_probs.gather(&targets, 1)?.sum_all()?.to_scalar::<f32>()? as f64);
        let argmax = log_probs.argmax(D::Minus1)?.to_vec1::<u32>()?;
        Ok(Self { log_probs, argmax, nll })
    }
}

/// The sums of a candidate's window against the reference's.
fn compare(reference: &Side, candidate: &Side) -> Result<Sums> {
    let (lp, lq) = (&reference.log_probs, &candidate.log_probs);
    let kl = (lp.exp()? * (lp - lq)?)?.sum_all()?.to_scalar::<f32>()? as f64;
    let agree = reference.argmax.iter().zip(&candidate.argmax).filter(|(a, b)| a == b).count();
    Ok(Sums { nll_ref: reference.nll, nll_cand: candidate.nll, kl, agree, n: reference.argmax.len() })
}

/// Scores positions `from..len-1` of `tokens` (each predicting the next token) in one pass.
fn score(reference: &impl CausalLm, candidate: &impl CausalLm, tokens: &[u32], from: usize) -> Result<Sums> {
    compare(&Side::of(reference, "reference", tokens, from)?, &Side::of(candidate, "candidate", tokens, from)?)
}

impl Sums {
    fn add(&mut self, s: &Sums) {
        self.nll_ref += s.nll_ref;
        self.nll_cand += s.nll_cand;
        self.kl += s.kl;
        self.agree += s.agree;
        self.n += s.n;
    }
}

/// Consecutive non-overlapping windows of `window` tokens of `tokens`, each after `bos` if given.
fn windows(bos: Option<u32>, tokens: &[u32], window: usize) -> Result<Vec<Vec<u32>>> {
    if window < 2 {
        bail!("evaluation window must hold at least 2 tokens, got {window}")
    }
    if tokens.len() < 2 {
        bail!("evaluation needs at least 2 tokens of text, got {}", tokens.len())
    }
    let text_len = window - bos.is_some() as usize;
    Ok(tokens.chunks(text_len).map(|c| bos.iter().chain(c).copied().collect::<Vec<u32>>()).filter(|c| c.len() >= 2).collect())
}

/// A reference model's side of [`evaluate`] on fixed windows, computed once, to score many
/// candidates against it (per-layer sensitivity scores hundreds).
pub struct ReferenceScores {
    windows: Vec<Vec<u32>>,
    sides: Vec<Side>,
}

impl ReferenceScores {
    /// The reference's predictions over `tokens` in windows of `window`, as [`evaluate`] cuts them.
    pub fn new(reference: &impl CausalLm, tokens: &[u32], window: usize) -> Result<Self> {
        let windows = windows(reference.bos_token(), tokens, window)?;
        let sides = windows.iter().map(|w| Side::of(reference, "reference", w, 0)).collect::<Result<_>>()?;
        Ok(Self { windows, sides })
    }

    /// [`evaluate`] of `candidate` against the stored reference.
    pub fn evaluate(&self, candidate: &impl CausalLm) -> Result<EvalReport> {
        let mut total = Sums::default();
        for (w, r) in self.windows.iter().zip(&self.sides) {
            total.add(&compare(r, &Side::of(candidate, "candidate", w, 0)?)?);
        }
        Ok(report(&total))
    }
}

fn report(s: &Sums) -> EvalReport {
    let n = s.n.max(1) as f64;
    let (p, q) = ((s.nll_ref / n).exp(), (s.nll_cand / n).exp());
    EvalReport {
        reference_ppl: p,
        candidate_ppl: q,
        ppl_delta_pct: (q / p - 1.0) * 100.0,
        kld: s.kl / n,
        top1_agreement: s.agree as f64 / n,
        tokens: s.n,
    }
}

/// Perplexity, KL and agreement over consecutive non-overlapping windows of `window` tokens
/// (each window starts with an empty cache). When the reference has a
/// [`CausalLm::bos_token`] it starts every window, before `window − 1` tokens of text,
/// as llama.cpp's perplexity does; `tokens` is the text alone. `progress` after each window.
pub fn evaluate(
    reference: &impl CausalLm,
    candidate: &impl CausalLm,
    tokens: &[u32],
    window: usize,
    mut progress: impl FnMut(Progress),
) -> Result<EvalReport> {
    let chunks = windows(reference.bos_token(), tokens, window)?;
    let mut total = Sums::default();
    for (i, chunk) in chunks.iter().enumerate() {
        total.add(&score(reference, candidate, chunk, 0)?);
        progress(Progress::items("evaluating windows", i + 1, chunks.len()));
    }
    Ok(report(&total))
}

/// Teacher-forced comparison along one sequence: only the predictions of positions from
/// `from` on are scored (e.g. the generated part after a prompt).
pub fn evaluate_from(reference: &impl CausalLm, candidate: &impl CausalLm, tokens: &[u32], from: usize) -> Result<EvalReport> {
    if from + 1 >= tokens.len() {
        bail!("nothing to score: {} tokens, scoring from position {from}", tokens.len())
    }
    Ok(report(&score(reference, candidate, tokens, from)?))
}
