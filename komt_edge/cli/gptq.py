"""`komt-edge gptq MODEL`."""

from __future__ import annotations

from pathlib import Path

import click

from ..output import is_verbose
from . import options
from .common import show


@click.command("gptq")
@click.argument("model")
@options.out_dir(Path("dist"), "Parent folder; the checkpoint goes to OUT/<model>-GPTQ-<bits>bit-g<group size>.")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits: 2, 4 or 8.")
@click.option("--group-size", type=int, default=128, show_default=True, help="32, 64, 128 or -1 (per channel).")
@click.option("--desc-act/--no-desc-act", default=False, show_default=True,
              help="Quantize columns in activation order (writes a permuted g_idx).")
@click.option("--calibration", default="korean", show_default=True,
              help="'korean' (built-in Korean set) or a text / JSON / JSONL file.")
@click.option("--samples", type=int, default=96, show_default=True, help="Calibration windows.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per calibration window.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@options.adapter()
@options.name("Model name for the output folder.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Reload, generate in Korean and compare held-out Korean perplexity with the original.")
@click.option("--eval-tokens", type=click.IntRange(min=16), default=8192, show_default=True,
              help="Held-out Korean tokens the check scores (the split holds ~7.7k).")
@click.option("--max-ppl-ratio", type=float, default=1.5, show_default=True,
              help="Reject the checkpoint (exit 1, nothing written) when its held-out Korean perplexity exceeds "
                   "this many times the original's (measured: 4-bit costs ×1.12 on SmolLM2).")
@options.force("Write into an existing checkpoint folder komt-edge did not make (only its own files replaced).")
@options.threads(passed=False)
@options.json_out()
@options.allow_pickle()
@options.verbose()
def gptq_cmd(model: str, out: Path, bits: int, group_size: int, desc_act: bool, calibration: str, samples: int,
             seq_len: int, device: str, adapter: str | None, name: str | None, check: bool, eval_tokens: int,
             max_ppl_ratio: float, force: bool, json_out: Path | None, allow_pickle: bool) -> None:
    """Quantize MODEL to a GPTQ checkpoint (transformers, vLLM), calibrated on Korean text.

    The checkpoint is kept only if it reloads, its chat template renders the komt prompt and its Korean
    perplexity is finite and within --max-ppl-ratio of the original's; otherwise the command fails.

    Example: komt-edge gptq komt-mistral-7b -o dist/
    """
    from ..gptq import gptq

    result = gptq(model, out, bits=bits, group_size=group_size, desc_act=desc_act, calibration=calibration,
                  samples=samples, seq_len=seq_len, device=device, adapter=adapter, name=name, check=check,
                  eval_tokens=eval_tokens, max_ppl_ratio=max_ppl_ratio, allow_pickle=allow_pickle,
                  verbose=is_verbose(), force=force)
    show(result.summary(), result.to_dict(), json_out)
