"""`komt-edge train --model MODEL --data FILE -o OUT`: the defaults are the komt recipe (``komt_edge.train.RECIPE``)."""

from __future__ import annotations

from pathlib import Path

import click

from ..train import RECIPE
from . import options
from .common import progress_log, show


@click.command("train")
@click.option("--model", "model", required=True,
              help="What the adapter applies to: zoo name (its merged komt model), Hub id or local folder.")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help='JSON or JSONL records {"instruction", "output"} (optional "input"; also prompt/response '
                   'keys and chat "messages", see komt_edge.records).')
@options.out_dir(None, "Output folder: the adapter, checkpoints/ and logs/.", required=True)
@click.option("--bits", type=click.Choice(["4", "8", "16", "32"]), default=RECIPE.bits,
              help="Base weights: 4 (nf4 QLoRA, default on CUDA), 8, 16 or 32; CPU trains in 32.")
@click.option("--lora-r", type=click.IntRange(min=1), default=RECIPE.lora_r, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=RECIPE.lora_alpha,
              show_default=True, help="LoRA alpha (scale = alpha / r).")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=RECIPE.lora_dropout,
              show_default=True, help="Dropout on the LoRA input during training.")
@click.option("--target-modules", default=",".join(RECIPE.target_modules), show_default=True,
              help="Comma-separated module names to adapt.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=RECIPE.epochs, show_default=True,
              help="Passes over the training records (fractions allowed).")
@click.option("--max-steps", type=click.IntRange(min=1), default=RECIPE.max_steps,
              help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=RECIPE.lr, show_default=True,
              help="Peak learning rate (cosine schedule).")
@click.option("--batch-size", type=click.IntRange(min=1), default=RECIPE.batch_size, show_default=True,
              help="Records per device and step.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=RECIPE.grad_accum, show_default=True,
              help="Gradient accumulation steps.")
@click.option("--max-length", type=click.IntRange(min=8), default=RECIPE.max_length, show_default=True,
              help="Tokens per record; longer records are truncated (reported).")
@click.option("--eval-split", type=click.FloatRange(0, 1, max_open=True), default=RECIPE.eval_split,
              show_default=True, help="Fraction of records held out for the eval loss (0: none).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in OUT/checkpoints.")
@options.template()
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Where to train: auto is CUDA when available, else the CPU.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=RECIPE.warmup_steps, show_default=True,
              help="Linear learning-rate warm-up steps.")
@click.option("--save-steps", type=click.IntRange(min=1), default=RECIPE.save_steps, show_default=True,
              help="Checkpoint every N steps.")
@click.option("--save-total-limit", type=click.IntRange(min=1), default=RECIPE.save_total_limit,
              show_default=True, help="Checkpoints kept.")
@click.option("--eval-steps", type=click.IntRange(min=1), default=RECIPE.eval_steps,
              help="Eval every N steps (default: --save-steps).")
@click.option("--logging-steps", type=click.IntRange(min=1), default=RECIPE.logging_steps, show_default=True,
              help="Log the loss every N steps.")
@click.option("--seed", type=int, default=RECIPE.seed, show_default=True,
              help="Seed for the data split, LoRA initialisation and shuffling.")
@click.option("--optim", default=RECIPE.optim,
              help="transformers optimizer name (default: paged_adamw_32bit on CUDA, adamw_torch on CPU).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=RECIPE.gradient_checkpointing,
              help="Default: on for CUDA, off on CPU.")
@click.option("--deepspeed", default=None,
              help="DeepSpeed JSON config, or 'zero3' for the shipped ZeRO-3 CPU-offload config.")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard logs to OUT/logs/tensorboard.")
@options.threads(passed=False)
@options.json_out()
@options.allow_pickle()
@options.verbose()
def train_cmd(model: str, data: Path, out: Path, bits: str | None, target_modules: str, json_out: Path | None,
              **kwargs) -> None:
    """Train a komt-style LoRA adapter on Korean instruction data (komt's QLoRA recipe by default).

    Example: komt-edge train --model komt-mistral-7b --data ko.jsonl -o out/my-lora, then
    komt-edge gguf komt-mistral-7b --adapter out/my-lora. Multi-GPU:
    accelerate launch --config_file "$(python -m komt_edge.configs multi-gpu)" -m komt_edge.cli train ...
    """
    from ..train import train

    result = train(model, data, out, bits=int(bits) if bits else None, target_modules=target_modules.split(","),
                   log=progress_log(json_out), **kwargs)
    # the model's own chat template is the one `komt-edge gguf` writes for it: no --template to pass
    template = "" if result.template == "own" else f" --template {result.template}"
    show(f"{result.summary()}\nnext: komt-edge gguf {model} --adapter {out}{template} -q q4_0 -q q8_0 -o dist",
         result.to_dict(), json_out)
