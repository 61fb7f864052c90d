//! Models as the commands want them: the one `--model` names (or the default, fetched when
//! missing), float or int8, the pair that `compare` and `eval` measure, and the prompt.

use crate::args::{quant_config, GenArgs, Method, Mode, ModelArgs};
use crate::fetch::fetch_offline_models;
use crate::progress::{bar, Bars};
use anyhow::{bail, Context, Result};
use candle_quant::calibration::Calibration;
use candle_quant::convert::{ConversionReport, Quantizable};
use candle_quant::generate::{apply_chat_template, encode};
use candle_quant::io::{self, LanguageModel, ModelSource};
use clap::ValueEnum;

/// Opens the model named by `--model`, or the default one (offline copy → hub → fetch).
pub fn open_model(spec: Option<&str>) -> Result<io::OpenedDecoder> {
    if let Some(spec) = spec {
        let source = ModelSource::parse(spec)?;
        return io::open_decoder(&source).with_context(|| format!("opening {source}"));
    }
    let local = io::models_dir().join(io::DEFAULT_GGUF);
    if local.is_file() {
        return io::open_decoder(&ModelSource::Gguf(local)).context("opening the offline default model");
    }
    let hub = ModelSource::Hub { id: io::DEFAULT_HUB_MODEL.into(), revision: "main".into() };
    match io::open_decoder(&hub) {
        Ok(m) => Ok(m),
        Err(e) => {
            eprintln!("{} is not reachable ({e})", io::DEFAULT_HUB_MODEL);
            fetch_offline_models()?;
            io::open_decoder(&ModelSource::Gguf(local)).context("opening the offline default model")
        }
    }
}

/// The model as stored: float, or int8 as saved.
pub fn load_model(spec: Option<&str>) -> Result<LanguageModel> {
    let opened = open_model(spec)?;
    Bars::around(|p| opened.load(p))
}

/// A float model, for the f32 side of compare, eval and generate.
pub fn load_float(spec: Option<&str>, what: &str) -> Result<LanguageModel> {
    let opened = open_model(spec)?;
    if opened.is_quantized() {
        bail!("{}: is an int8 checkpoint; {what} needs a float model", opened.source)
    }
    Bars::around(|p| opened.load(p))
}

/// The int8 model: an int8 checkpoint as saved, or a float source quantized while it loads
/// (candle's Q8_0 mode quantizes a loaded float model).
pub fn load_int8(args: &ModelArgs) -> Result<(LanguageModel, ConversionReport)> {
    let opened = open_model(args.model.as_deref())?;
    // GPTQ needs the float model in memory for its calibration run.
    match args.mode.streamed().filter(|_| args.method == Method::Rtn) {
        Some(kind) => {
            let cfg = quant_config(args)?;
            Bars::around(|p| opened.load_int8(&cfg, kind, p))
        }
        None if opened.is_quantized() => {
            bail!("{}: is an int8 checkpoint; --mode static, q8_0, q4_0 and q4k need a float model", opened.source)
        }
        None => quantized(&Bars::around(|p| opened.load(p))?, args),
    }
}

/// The f32 and int8 models compare and eval measure: from a float `--model`, its int8 copy
/// quantized in memory; from an int8 checkpoint, the `--reference` float model beside it.
pub fn model_pair(args: &ModelArgs, reference: Option<&str>, what: &str) -> Result<(LanguageModel, LanguageModel, ConversionReport)> {
    let opened = open_model(args.model.as_deref())?;
    if !opened.is_quantized() {
        if reference.is_some() {
            bail!("--reference is for an int8 checkpoint given as --model; {} is a float model", opened.source)
        }
        let lm = Bars::around(|p| opened.load(p))?;
        let (q, report) = quantized(&lm, args)?;
        return Ok((lm, q, report));
    }
    let Some(reference) = reference else {
        bail!("{}: is an int8 checkpoint; {what} measures it against a float model: pass --reference MODEL", opened.source)
    };
    let mut q = Bars::around(|p| opened.load(p))?;
    let f = load_float(Some(reference), "--reference")?;
    let mut report = ConversionReport::default();
    q.model.visit_linears(&mut |l| {
        if l.is_int8() {
            report.converted.push(l.name().to_string())
        } else {
            report.skipped.push(l.name().to_string())
        }
        Ok(())
    })?;
    Ok((f, q, report))
}

/// `lm` quantized in memory as `--mode` says (static: with its calibration, smoothed first).
pub fn quantized(lm: &LanguageModel, args: &ModelArgs) -> Result<(LanguageModel, ConversionReport)> {
    let mut q = lm.clone();
    let pb = bar(0, "quantizing layers");
    let shown = pb.clone();
    let cfg = quant_config(args)?.progress(move |p| {
        shown.set_length(p.total);
        shown.set_position(p.done);
    });
    let calibration = if args.mode == Mode::Static { Some(smoothed_for_static(args, &mut q.model)?) } else { None };
    if args.method.calibrated() {
        calibrated_weights(&mut q, args, &cfg)?;
    }
    let report = args.mode.convert(&mut q.model, &cfg, calibration.as_ref())?;
    pb.finish();
    Ok((q, report))
}

/// A calibrated `--method`: the float `lm`'s layers that `cfg` makes int4 get scaled (AWQ,
/// folded into the float model) and/or GPTQ-rounded weights from windows of
/// `--calibration-text`; the conversion that follows keeps GPTQ's weights and rounds AWQ's
/// scaled ones to nearest.
fn calibrated_weights(lm: &mut LanguageModel, args: &ModelArgs, cfg: &candle_quant::QuantConfig) -> Result<()> {
    let Some(path) = &args.calibration_text else {
        bail!("--method {} needs --calibration-text FILE (a text unlike the one you evaluate on)", method_name(args.method))
    };
    let body = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let tokens = candle_quant::generate::encode_text(lm, &body)?;
    let bos = candle_quant::CausalLm::bos_token(&lm.model);
    let per_window = 512 - bos.is_some() as usize;
    let windows: Vec<Vec<u32>> = tokens
        .chunks(per_window)
        .filter(|c| c.len() >= 2)
        .take(args.calibration_windows.max(1))
        .map(|c| bos.iter().chain(c).copied().collect())
        .collect();
    if windows.is_empty() {
        bail!("{}: holds {} tokens, too few for one calibration window", path.display(), tokens.len())
    }
    let started = std::time::Instant::now();
    let pb = bar(windows.len(), "calibration windows");
    let hessians = candle_quant::gptq::collect_hessians(&mut lm.model, cfg, |model| {
        for (i, w) in windows.iter().enumerate() {
            candle_quant::CausalLm::forward(model, w, &mut candle_quant::CausalLm::new_cache(model), false)?;
            pb.set_position(i as u64 + 1);
        }
        Ok(())
    })?;
    pb.finish();
    eprintln!("calibration: {} windows of {} in {:.1} s", windows.len(), path.display(), started.elapsed().as_secs_f64());
    let step = |label: &'static str| {
        let pb = bar(0, label);
        let shown = pb.clone();
        (pb, move |done: usize, total: usize| {
            shown.set_length(total as u64);
            shown.set_position(done as u64);
        })
    };
    if matches!(args.method, Method::Awq | Method::AwqGptq) {
        let started = std::time::Instant::now();
        let (pb, progress) = step("AWQ: scaling groups");
        let report = candle_quant::awq::awq(&mut lm.model, cfg, &hessians, progress)?;
        pb.finish();
        let (kept, rtn) = report.groups.iter().fold((0.0, 0.0), |(a, b), g| (a + g.error, b + g.rtn_error));
        let mut alphas: Vec<f32> = report.groups.iter().map(|g| g.alpha).collect();
        alphas.sort_by(f32::total_cmp);
        eprintln!(
            "AWQ: {} of {} groups scaled (median α {:.2}); output error on the calibration inputs {:.1} % of round to nearest's, in {:.1} s",
            report.factors.len(),
            report.groups.len(),
            alphas.get(alphas.len() / 2).copied().unwrap_or(0.0),
            100.0 * kept / rtn.max(f64::MIN_POSITIVE),
            started.elapsed().as_secs_f64()
        );
    }
    if matches!(args.method, Method::Gptq | Method::AwqGptq) {
        let started = std::time::Instant::now();
        let (pb, progress) = step("GPTQ: rounding layers");
        let report = candle_quant::gptq::quantize_gptq(&mut lm.model, cfg, &hessians, progress)?;
        pb.finish();
        eprintln!("GPTQ: {} layers in {:.1} s", report.converted.len(), started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// `--method`'s value as typed.
pub fn method_name(method: Method) -> String {
    method.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}

/// The `--calibration` file of `--mode static`, its SmoothQuant factors (if any) folded into the
/// float `model` — the model it was calibrated as, computing the same function.
pub fn smoothed_for_static(args: &ModelArgs, model: &mut candle_quant::models::Decoder) -> Result<Calibration> {
    let Some(path) = &args.calibration else { bail!("--mode static needs --calibration FILE (written by `candle-quant calibrate`)") };
    let c = Calibration::load(path)?;
    if let Some(s) = &c.smoothing {
        candle_quant::smooth::apply_smoothing(model, &s.factors)
            .with_context(|| format!("smoothing the model as {} says", path.display()))?;
    }
    Ok(c)
}

/// The prompt's tokens, and whether it went through the model's chat template (the reply then
/// answers it rather than continuing its text).
pub fn prompt_tokens(lm: &LanguageModel, gen: &GenArgs) -> Result<(Vec<u32>, bool)> {
    let (mut tokens, templated) = match &gen.prompt_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading the prompt file {}", path.display()))?;
            (encode(lm, &text)?, false)
        }
        None => {
            let chat = if gen.no_chat_template {
                None
            } else {
                apply_chat_template(lm, &gen.prompt).context("pass --no-chat-template to feed the prompt as it is")?
            };
            (encode(lm, chat.as_deref().unwrap_or(&gen.prompt))?, chat.is_some())
        }
    };
    if let Some(n) = gen.max_prompt_tokens {
        if n == 0 {
            bail!("--max-prompt-tokens must be at least 1")
        }
        tokens.truncate(n);
    }
    Ok((tokens, templated))
}

/// What the quantized side is, for display: candle's ggml modes by name, else `int4` when any
/// layer holds int4 weights (a `--bits 4` run, or an int4 checkpoint or GGUF file as stored),
/// else `int8`.
pub fn candidate_label(args: &ModelArgs, q: &mut LanguageModel) -> Result<&'static str> {
    if matches!(args.mode, Mode::Q8_0 | Mode::Q4_0 | Mode::Q4K) {
        return Ok(args.label());
    }
    let mut int4 = false;
    q.model.visit_linears(&mut |l| {
        int4 |= l.int8_parts().is_some_and(|(w, _)| w.bits() == 4);
        Ok(())
    })?;
    Ok(if int4 { "int4" } else { "int8" })
}
