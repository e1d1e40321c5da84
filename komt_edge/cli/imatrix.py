"""`komt-edge imatrix MODEL -o FILE`."""

from __future__ import annotations

from pathlib import Path

import click

from . import options
from .common import STDOUT, progress_log, show


@click.command("imatrix")
@click.argument("model")
@options.out_dir(None, "The importance-matrix file to write (llama.cpp's GGUF format, e.g. NAME.imatrix.gguf).",
                 required=True)
@click.option("--text", default="korean", show_default=True,
              help="Calibration text: 'korean' (the calibration split of the built-in Korean corpus, in the "
                   "model's komt template) or a UTF-8 text file.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=512, show_default=True,
              help="Tokens per chunk (llama-imatrix -c); each chunk starts with BOS.")
@click.option("--chunks", "n_chunks", type=click.IntRange(min=0), default=0,
              help="Use at most this many chunks (0 = all, as llama-imatrix --chunks).")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix --process-output).")
@options.adapter()
@options.template()
@options.threads()
@options.json_out()
@options.force("Replace a file at -o even when it is not an importance matrix komt-edge wrote (never an input).")
@options.allow_pickle()
@options.verbose()
def imatrix_cmd(model: str, out: Path, text: str, n_ctx: int, n_chunks: int, process_output: bool,
                adapter: str | None, template: str | None, n_threads: int | None, json_out: Path | None,
                force: bool, allow_pickle: bool) -> None:
    """Compute MODEL's importance matrix on Korean text, for llama.cpp's low-bit quantization types.

    MODEL is a GGUF file (f32, f16, bf16 or q8_0) or a zoo name, Hub id or folder (converted to a temporary f16
    GGUF). The file is what llama-quantize --imatrix and komt-edge gguf --imatrix read.

    Example: komt-edge imatrix komt-mistral-7b -o dist/komt-mistral-7b-korean.imatrix.gguf
    """
    from ..imatrix.command import imatrix

    result = imatrix(model, out, text=text, adapter=adapter, template=template, n_ctx=n_ctx,
                     n_chunks=n_chunks or None, n_threads=n_threads, process_output=process_output,
                     allow_pickle=allow_pickle, force=force, report=None if json_out == STDOUT else json_out,
                     log=progress_log(json_out))
    show(result.summary(), result.to_dict(), json_out)
