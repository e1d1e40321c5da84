"""`komt-edge merge BASE ADAPTER -o OUT`."""

from __future__ import annotations

from pathlib import Path

import click

from . import options
from .common import show


@click.command("merge")
@click.argument("base")
@click.argument("adapter")
@options.out_dir(None, "Output folder: new, empty, or an earlier merge's output (replaced).", required=True)
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output safetensors shard.")
@options.threads(default="all cores but one, which writes the output")
@options.force("Write into an existing folder holding other files: only the merge's own files are replaced.")
@options.json_out("the merged folder's path")
@options.allow_pickle()
@options.verbose()
def merge_cmd(base: str, adapter: str, out: Path, max_shard_size: str, n_threads: int | None, force: bool,
              json_out: Path | None, allow_pickle: bool) -> None:
    """Merge a LoRA ADAPTER into the full-precision BASE, tensor by tensor.

    BASE and ADAPTER are local folders, Hub ids or (BASE) a zoo name. OUT must be new, empty or an earlier merge's
    output (which is replaced); a folder holding anything else is refused unless --force.

    Example: komt-edge merge mistralai/Mistral-7B-Instruct-v0.1 davidkim205/komt-mistral-7b-v1-lora -o merged/
    """
    from ..merge import merge

    merged = merge(base, adapter, out, allow_pickle=allow_pickle, max_shard_size=max_shard_size, force=force,
                   n_threads=n_threads, progress=True)
    show(f"merged model written to {merged}", {"out": str(merged)}, json_out)
