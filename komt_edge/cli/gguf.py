"""`komt-edge gguf MODEL`."""

from __future__ import annotations

from pathlib import Path

import click

from . import options


@click.command("gguf")
@click.argument("model")
@options.quants(("q4_0", "q8_0"))
@options.out_dir(Path("dist"), "Output folder.")
@options.adapter()
@options.template(allow_none=True)
@options.name()
@click.option("--imatrix", default=None, metavar="FILE|korean",
              help="Quantize with an importance matrix, as llama-quantize --imatrix: a file (komt-edge imatrix, "
                   "llama-imatrix), or 'korean' to compute one on the Korean calibration text (kept in OUT).")
@options.force("Replace files at the output names even when komt-edge did not write them for this model.")
@options.threads()
@options.allow_pickle()
@options.verbose()
def gguf_cmd(model: str, quants: tuple[str, ...], out: Path, adapter: str | None, template: str | None,
             name: str | None, imatrix: str | None, force: bool, n_threads: int | None, allow_pickle: bool) -> None:
    """Convert MODEL to GGUF, one file per -q type, from one read of the checkpoint.

    Files are named <name>-<TYPE>.gguf in OUT. A re-run replaces komt-edge's own files of the same model, each
    atomically (the old file stays until the new one is complete); any other file at those names is refused
    unless --force.

    Example: komt-edge gguf komt-mistral-7b -q q4_0 -q q8_0 -o dist/, or with a Korean importance matrix:
    komt-edge gguf komt-mistral-7b -q q4_K_M -q iq3_xxs --imatrix korean -o dist/
    """
    from ..gguf import convert

    for path in convert(model, quants, out, adapter=adapter, allow_pickle=allow_pickle, template=template,
                        name=name, n_threads=n_threads, force=force, imatrix=imatrix):
        click.echo(str(path))
