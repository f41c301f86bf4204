//! `claw chat`: a quick look at a local model, one-shot or interactive.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value as Json};

use crate::model::generate::Flow;
use crate::model::{resolve_model_path, Generation, Model, SamplingParams, WeightFormat};

/// Chat with a local model: one prompt, or an interactive session.
#[derive(Args)]
#[command(long_about = "\
Chat with a local GGUF model, for a quick look at what it says.

Reads: a GGUF model (--model, $CLAW_MODEL, or the default SmolLM2-135M-Instruct in
models/, fetched by scripts/fetch-model). Writes: the reply to stdout as it is
generated; with --json, one JSON object with the prompt and response token ids and
the log-prob of every generated token instead.

Without PROMPT, reads one message per line from stdin and keeps the conversation
(an empty line or EOF ends it).

Log-probs are those of the model's own softmax, before temperature or top-p/top-k:
the probability the policy gave each token it produced.

Example:
  claw chat \"What is the capital of France?\"
  claw chat --json --max-tokens 16 \"Say hi\"")]
pub struct ChatArgs {
    /// The user message (omit for an interactive session).
    pub prompt: Option<String>,
    /// GGUF model file.
    #[arg(long, env = "CLAW_MODEL")]
    pub model: Option<PathBuf>,
    /// How to hold the weights: as stored in the GGUF (quantized), or dequantized.
    #[arg(long, value_enum, default_value_t = WeightFormat::default())]
    pub weights: WeightFormat,
    /// System message (the chat template's default is used when absent).
    #[arg(long)]
    pub system: Option<String>,
    /// Sampling temperature; 0 is greedy and deterministic.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sample only among the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Random seed for sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Feed PROMPT to the model as raw text, without the chat template.
    #[arg(long, requires = "prompt")]
    pub raw: bool,
    /// Generate past end-of-sequence tokens (benchmarks use it for a fixed length).
    #[arg(long)]
    pub ignore_eos: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object: text, token ids, log-probs, finish reason, timing.
    #[arg(long, requires = "prompt")]
    pub json: bool,
}

pub fn run(args: ChatArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        // candle sizes its thread pool from this variable on first use.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        top_logprobs: 0,
    };
    params.validate()?;
    let path = resolve_model_path(args.model.as_deref())?;
    crate::debug!("loading {}", path.display());
    let model = Model::load_with(&path, args.weights)?;
    crate::debug!(
        "{} layers, hidden {}, vocab {}",
        model.config.num_layers,
        model.config.hidden_size,
        model.config.vocab_size
    );

    let mut messages: Vec<Json> = Vec::new();
    if let Some(system) = &args.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    match &args.prompt {
        Some(prompt) => {
            let prompt_text = if args.raw {
                prompt.clone()
            } else {
                messages.push(json!({"role": "user", "content": prompt}));
                model.template.render(&messages, None, true)?
            };
            one_turn(&model, &prompt_text, &params, args.json)?;
        }
        None => interactive(&model, messages, &params)?,
    }
    Ok(())
}

fn one_turn(
    model: &Model,
    prompt_text: &str,
    params: &SamplingParams,
    as_json: bool,
) -> Result<Generation> {
    let prompt_ids = model.tokenizer.encode(prompt_text)?;
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let generation = model.generate(&prompt_ids, params, |piece| {
        if as_json {
            return Flow::Continue;
        }
        match stdout
            .write_all(piece.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => Flow::Continue,
            Err(e) => {
                write_error = Some(e);
                Flow::Cancel
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("cannot write to stdout");
    }
    let t = &generation.timing;
    if as_json {
        let report = json!({
            "model": model.name,
            "prompt_text": prompt_text,
            "prompt_ids": prompt_ids,
            "response_text": generation.text,
            "response_ids": generation.token_ids,
            "response_logprobs": generation.logprobs,
            "finish_reason": generation.finish_reason,
            "timing": {
                "prompt_tokens": t.prompt_tokens,
                "prefill_s": t.prefill_s,
                "completion_tokens": t.completion_tokens,
                "decode_s": t.decode_s,
                "prefill_tokens_per_s": t.prefill_tokens_per_s(),
                "decode_tokens_per_s": t.decode_tokens_per_s(),
            },
        });
        serde_json::to_writer_pretty(&mut stdout, &report)?;
    }
    writeln!(stdout)?;
    crate::debug!(
        "{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s ({})",
        t.prompt_tokens,
        t.prefill_tokens_per_s(),
        t.completion_tokens,
        t.decode_tokens_per_s(),
        generation.finish_reason.as_str()
    );
    Ok(generation)
}

fn interactive(model: &Model, mut messages: Vec<Json>, params: &SamplingParams) -> Result<()> {
    crate::info!(
        "chatting with {} (empty line or Ctrl-D to quit)",
        model.name
    );
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read stdin")?
            == 0
        {
            break;
        }
        let message = line.trim_end_matches(['\n', '\r']);
        if message.trim().is_empty() {
            break;
        }
        messages.push(json!({"role": "user", "content": message}));
        let turn = model
            .template
            .render(&messages, None, true)
            .and_then(|prompt_text| one_turn(model, &prompt_text, params, false));
        match turn {
            Ok(generation) => {
                messages.push(json!({"role": "assistant", "content": generation.text}));
            }
            // A turn that cannot run (e.g. the conversation outgrew the context)
            // must not end the session: say why and drop that message.
            Err(err) => {
                eprintln!("claw: error: {err:#}");
                messages.pop();
            }
        }
    }
    Ok(())
}
