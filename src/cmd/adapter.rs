//! `claw adapter export`: an adapter in another format (GGUF LoRA for llama.cpp).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::adapter::gguf::{export_file, gguf_path_for};
use crate::model::resolve_model_path;

/// Convert LoRA adapters for other engines.
#[derive(Args, Debug)]
pub struct AdapterArgs {
    #[command(subcommand)]
    pub command: AdapterCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdapterCommand {
    Export(ExportArgs),
}

/// Write an adapter as GGUF LoRA, the format llama.cpp's server loads with --lora.
#[derive(Args, Debug)]
#[command(long_about = "\
Write a LoRA adapter (claw's adapter-NNNNNN.safetensors with its .json, or a PEFT
adapter_model.safetensors with adapter_config.json) as a GGUF LoRA adapter, the
format llama.cpp's llama-server loads with --lora FILE (general.type = adapter,
tensors blk.N.attn_q.weight.lora_a / .lora_b, f32). The base model is the GGUF the
engine serves: its architecture and tensor shapes are checked, and on llama-arch
models the q/k rows are permuted as that GGUF stores them.

vLLM and SGLang load claw's PEFT-named safetensors directly (see claw serve
--upstream-adapters); claw train --gguf writes the GGUF beside every checkpoint.

Example:
  claw adapter export claw-data/checkpoints/adapter-000012.safetensors --gguf \\
      --model models/SmolLM2-135M-Instruct.Q4_1.gguf
  llama-server -m models/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --lora claw-data/checkpoints/adapter-000012.gguf")]
pub struct ExportArgs {
    /// The adapter's safetensors file.
    pub adapter: PathBuf,
    /// Write GGUF LoRA (the only format so far; required, so a later format
    /// cannot change what this command does).
    #[arg(long, required = true)]
    pub gguf: bool,
    /// The base GGUF model the adapter was trained on.
    #[arg(long, env = "CLAW_MODEL")]
    pub model: Option<PathBuf>,
    /// Output file (default: the adapter's name with .gguf).
    #[arg(short, long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: AdapterArgs) -> Result<()> {
    match args.command {
        AdapterCommand::Export(args) => export(args),
    }
}

fn export(args: ExportArgs) -> Result<()> {
    let model = resolve_model_path(args.model.as_deref())?;
    let out = args.out.unwrap_or_else(|| gguf_path_for(&args.adapter));
    anyhow::ensure!(
        out != args.adapter,
        "--out {} would overwrite the adapter",
        out.display()
    );
    let step = export_file(&args.adapter, &model, &out)?;
    crate::info!(
        "wrote {} (step {step}, for {})",
        out.display(),
        model.display()
    );
    println!("{}", out.display());
    Ok(())
}
