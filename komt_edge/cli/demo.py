"""`komt-edge demo`."""

from __future__ import annotations

from pathlib import Path

import click

from . import options
from .common import progress_log, show


@click.command("demo")
@options.out_dir(Path("dist/demo"), "Folder for the tiny model, its adapter, the merged model and the GGUF files.")
@options.threads()
@options.json_out()
@options.verbose()
def demo_cmd(out: Path, n_threads: int | None, json_out: Path | None) -> None:
    """Run merge → gguf → verify offline on a tiny komt-mistral-shaped model, then chat in Korean.

    Example: komt-edge demo -o dist/demo -t 1
    """
    from ..demo import demo

    result = demo(out, n_threads=n_threads, log=progress_log(json_out))
    show("\n" + result.summary(), result.to_dict(), json_out)
    result.check()
