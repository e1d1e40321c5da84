"""`komt-edge gguf MODEL`."""

from __future__ import annotations

from pathlib import Path

import click

from ..converters.architectures import describe as describe_architectures
from . import options
from .common import show


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
@options.json_out("the paths of the files written")
@options.allow_pickle()
@options.verbose()
def gguf_cmd(model: str, quants: tuple[str, ...], out: Path, adapter: str | None, template: str | None,
             name: str | None, imatrix: str | None, force: bool, n_threads: int | None, json_out: Path | None,
             allow_pickle: bool) -> None:
    """Convert MODEL to GGUF, one file per -q type, from one read of the checkpoint.

    Architectures: {architectures}.

    Files are named <name>-<TYPE>.gguf in OUT. A re-run replaces komt-edge's own files of the same model, each
    atomically (the old file stays until the new one is complete); any other file at those names is refused
    unless --force.

    Korean mixes: -q ko-TYPE (ko-q3_K_M, ko-q2_K, ko-iq4_xs, ...) is llama.cpp's TYPE mix with per-tensor types
    chosen by measured Korean sensitivity (mean KLD against the float model on the Korean calibration text, never
    the held-out text), in a file no larger than llama.cpp's TYPE file with the same importance matrix (--imatrix
    korean unless another is given); ko-TYPE@3.5bpw or ko-TYPE@250MB sets another budget. Written as
    <name>-KO-<TYPE>.gguf, with its llama-quantize recipe beside it (<name>-KO-<TYPE>.tensor-types.txt, for
    llama-quantize --imatrix IMATRIX --tensor-type-file) and its measurements (<name>-KO-<TYPE>.sensitivity.json,
    reused while the model, imatrix and text are unchanged).

    Example: komt-edge gguf komt-mistral-7b -q q4_0 -q q8_0 -o dist/, or with a Korean importance matrix:
    komt-edge gguf komt-mistral-7b -q q4_K_M -q iq3_xxs --imatrix korean -o dist/
    """
    from ..gguf import convert

    paths = convert(model, quants, out, adapter=adapter, allow_pickle=allow_pickle, template=template, name=name,
                    n_threads=n_threads, force=force, imatrix=imatrix)
    show("\n".join(str(p) for p in paths), {"files": [str(p) for p in paths]}, json_out)


# the families of the converter's table (converters/architectures.py), so that adding one is one edit
gguf_cmd.help = gguf_cmd.help.replace("{architectures}", describe_architectures())
