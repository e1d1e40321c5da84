"""`komt-edge verify FILES --hf MODEL`."""

from __future__ import annotations

from pathlib import Path

import click

from . import options
from .common import STDOUT, emit_json


@click.command("verify")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--hf", "hf", required=True, help="The original model: zoo name, Hub id or folder.")
@options.adapter()
@click.option("--lora", type=click.Path(path_type=Path), default=None, metavar="ADAPTER.gguf",
              help="A LoRA adapter GGUF (komt-edge gguf-lora) that llama.cpp applies to each FILE at run time; the "
                   "reference is then --hf with the peft --adapter unmerged.")
@options.template()
@click.option("--hf-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Precision of the HF reference forward pass.")
@click.option("--max-kl", type=float, default=None, help="Override the mean-KL bound.")
@click.option("--min-top1", type=float, default=None, help="Override the top-1 agreement bound (0-1).")
@click.option("--max-abs", type=float, default=None, help="Override the max |Δlogit| bound.")
@options.json_out("the reports")
@options.threads()
@options.allow_pickle()
@options.verbose()
def verify_cmd(files: tuple[Path, ...], hf: str, adapter: str | None, lora: Path | None, template: str | None,
               hf_dtype: str,
               max_kl: float | None, min_top1: float | None, max_abs: float | None, json_out: Path | None,
               n_threads: int | None, allow_pickle: bool) -> None:
    """Check that GGUF FILES tokenize and predict like the HF model, on Korean text.

    All files are compared with one forward pass of the HF model. Exits non-zero when any bound fails.

    Example: komt-edge verify dist/*.gguf --hf komt-mistral-7b --json dist/verify.json, or a base with a LoRA
    file: komt-edge verify BASE-F16.gguf --lora komt-mistral-7b-v1-LoRA-F16.gguf --hf BASE --adapter ADAPTER
    """
    from ..verify import BoundOverrides, verify_files

    overrides = BoundOverrides(max_abs=max_abs, mean_kl=max_kl, min_top1=min_top1)  # checked before any work
    to_file = json_out if json_out != STDOUT else None
    run = verify_files(files, hf, adapter=adapter, allow_pickle=allow_pickle, template=template, hf_dtype=hf_dtype,
                       n_threads=n_threads, overrides=overrides, json_out=to_file,
                       log=None if json_out == STDOUT else click.echo, lora=lora)
    if json_out == STDOUT:
        emit_json([r.to_dict() for r in run.reports], STDOUT)
    run.check()
