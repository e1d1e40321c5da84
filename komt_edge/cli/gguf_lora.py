"""`komt-edge gguf-lora ADAPTER -o OUT/`."""

from __future__ import annotations

from pathlib import Path

import click

from . import options
from .common import STDOUT, show


@click.command("gguf-lora")
@click.argument("adapter")
@click.option("--base", default=None, metavar="MODEL",
              help="The base the adapter applies to (folder, Hub id or zoo name); only its config.json is read. "
                   "Default: the adapter's base_model_name_or_path, else the zoo's base for a komt adapter.")
@options.out_dir(Path("dist"), "Output folder; the file is <name>-LoRA-<TYPE>.gguf.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Type of the adapter's tensors (q8_0 keeps rank-wide lora_b rows in f16, as llama.cpp does).")
@options.name("Adapter name for general.name and the file name (default: the zoo name or the adapter's).")
@options.force("Replace a file at the output name even when komt-edge did not write it for this adapter.")
@options.threads(passed=False)
@options.json_out()
@options.allow_pickle()
@options.verbose()
def gguf_lora_cmd(adapter: str, base: str | None, out: Path, outtype: str, name: str | None, force: bool,
                  json_out: Path | None, allow_pickle: bool) -> None:
    """Convert a LoRA ADAPTER to llama.cpp's LoRA adapter GGUF, applied at run time on any quant of the base.

    ADAPTER is a peft folder (komt-edge train's output is one), a Hub id, or a zoo name (its komt adapter).

    Example: komt-edge gguf-lora komt-mistral-7b -o dist/, then
    llama-cli -m dist/BASE-Q4_K_M.gguf --lora dist/komt-mistral-7b-v1-LoRA-F16.gguf
    """
    from ..gguf_lora import gguf_lora

    result = gguf_lora(adapter, out, base=base, outtype=outtype, name=name, force=force, allow_pickle=allow_pickle,
                       report=None if json_out == STDOUT else json_out)
    show(result.summary(), result.to_dict(), json_out)
