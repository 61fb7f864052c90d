//! Quality of a candidate model (e.g. int8) against a reference (e.g. its float self), on any
//! [`CausalLm`]: perplexity of both, mean KL(reference ‖ candidate) of the next-token
//! distributions, and top-1 agreement.

use crate::lm::CausalLm;
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

/// Scores positions `from..len-1` of `tokens` (each predicting the next token) in one pass.
fn score(reference: &impl CausalLm, candidate: &impl CausalLm, tokens: &[u32], from: usize) -> Result<Sums> {
    let logits_ref = reference.forward(tokens, &mut reference.new_cache(), true)?;
    let logits_cand = candidate.forward(tokens, &mut candidate.new_cache(), true)?;
    let rows = tokens.len() - 1;
    for (what, l) in [("reference", &logits_ref), ("candidate", &logits_cand)] {
        if l.dims().len() != 2 || l.dim(0)? < rows {
            bail!("the {what} model returned logits of shape {:?} for {} tokens: [tokens, vocab] expected", l.shape(), tokens.len())
        }
    }
    let n = tokens.len() - 1;
    let (lr, lc) = (logits_ref.narrow(0, from, n - from)?, logits_cand.narrow(0, from, n - from)?);
    let (lp, lq) = (candle_nn::ops::log_softmax(&lr, D::Minus1)?, candle_nn::ops::log_softmax(&lc, D::Minus1)?);
    let targets = Tensor::new(&tokens[from + 1..], lr.device())?.unsqueeze(1)?;
    let nll = |l: &Tensor| -> Result<f64> { Ok(-(l.gather(&targets, 1)?.sum_all()?.to_scalar::<f32>()? as f64)) };
    let kl = (lp.exp()? * (&lp - &lq)?)?.sum_all()?.to_scalar::<f32>()? as f64;
    let argmax = |l: &Tensor| l.argmax(D::Minus1)?.to_vec1::<u32>();
    let (ar, ac) = (argmax(&lr)?, argmax(&lc)?);
    Ok(Sums { nll_ref: nll(&lp)?, nll_cand: nll(&lq)?, kl, agree: ar.iter().zip(&ac).filter(|(a, b)| a == b).count(), n: n - from })
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
/// as llama.cpp's perplexity does; `tokens` is the text alone. `progress(done, total)` after
/// each window.
pub fn evaluate(
    reference: &impl CausalLm,
    candidate: &impl CausalLm,
    tokens: &[u32],
    window: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if window < 2 {
        bail!("evaluation window must hold at least 2 tokens, got {window}")
    }
    if tokens.len() < 2 {
        bail!("evaluation needs at least 2 tokens of text, got {}", tokens.len())
    }
    let bos = reference.bos_token();
    let text_len = window - bos.is_some() as usize;
    let chunks: Vec<Vec<u32>> =
        tokens.chunks(text_len).map(|c| bos.iter().chain(c).copied().collect::<Vec<u32>>()).filter(|c| c.len() >= 2).collect();
    let mut total = Sums::default();
    for (i, chunk) in chunks.iter().enumerate() {
        let s = score(reference, candidate, chunk, 0)?;
        total.nll_ref += s.nll_ref;
        total.nll_cand += s.nll_cand;
        total.kl += s.kl;
        total.agree += s.agree;
        total.n += s.n;
        progress(i + 1, chunks.len());
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
