//! `generate`: one model, its text streamed to stdout.

use crate::args::{GenArgs, ModelArgs, Precision, SamplingArgs};
use crate::models::{load_float, load_int8, prompt_tokens};
use anyhow::Result;
use candle_quant::generate::{generate, Sampling};
use std::io::Write;

/// `generate`: one model, streamed to stdout.
pub fn run(model: &ModelArgs, precision: Precision, gen: &GenArgs, sampling: &SamplingArgs) -> Result<()> {
    let lm = if precision == Precision::Int8 { load_int8(model)?.0 } else { load_float(model.model.as_deref(), "--precision f32")? };
    let (tokens, chat) = prompt_tokens(&lm, gen)?;
    let s = Sampling {
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
        repetition_penalty: sampling.repeat_penalty,
        repeat_last_n: sampling.repeat_last_n,
        seed: sampling.seed,
    };
    // A continuation follows its prompt on the line; a chat reply stands apart from it.
    if chat {
        println!("> {}", gen.prompt);
    } else if gen.prompt_file.is_none() {
        print!("{}", gen.prompt);
    }
    let g = generate(&lm.model, &lm.tokenizer, &tokens, gen.max_new_tokens, &s, |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    eprintln!(
        "{} prompt tokens, prefill {:.1} ms; {} new tokens at {:.1} tok/s",
        g.stats.prompt_tokens, g.stats.prefill_ms, g.stats.new_tokens, g.stats.decode_tok_s
    );
    Ok(())
}
