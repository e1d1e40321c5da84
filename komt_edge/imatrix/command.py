"""`komt-edge imatrix MODEL -o FILE`: MODEL's importance matrix on Korean text, for llama.cpp's quantizers.

MODEL is a GGUF file (f32, f16, bf16 or q8_0) or anything ``komt-edge gguf`` converts (a temporary f16 GGUF is
made and removed). The statistics, the file format and the Korean calibration text are
``komt_edge.imatrix``'s; ``komt-edge gguf --imatrix FILE|korean`` quantizes with the result.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import JSON_REPORT, check_output_file, holds_json, output_dir
from ..converters.gguf_file import check_model_gguf, file_info, is_gguf
from ..errors import KomtError
from ..gguf import convert
from ..templates import gguf_template, template_for
from ..util import fmt_size, read_llama_cpp_text, sha256_json
from ..zoo import model_family, resolve
from .core import DEFAULT_N_CTX, KOREAN, MIN_BATCH_ROWS, Imatrix, compute, korean_calibration_text


@dataclass
class ImatrixResult:
    path: Path
    model: str
    dataset: str
    chunks: int
    chunk_size: int
    entries: int

    def summary(self) -> str:
        return (f"{self.path}: {self.entries} weights, {self.chunks} chunks of {self.chunk_size} tokens of "
                f"{self.dataset} ({fmt_size(self.path.stat().st_size)})")

    def to_dict(self) -> dict:
        return {"path": str(self.path), "model": self.model, "dataset": self.dataset, "chunks": self.chunks,
                "chunk_size": self.chunk_size, "entries": self.entries}


FLOAT_INPUT_TYPES = ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16", "MOSTLY_Q8_0")


def imatrix(model: str, out: str | Path, *, text: str = KOREAN, adapter: str | None = None,
            template: str | None = None, n_ctx: int = DEFAULT_N_CTX, n_chunks: int | None = None,
            n_threads: int | None = None, process_output: bool = False, allow_pickle: bool = False,
            force: bool = False, report: str | Path | None = None, progress: bool = True,
            log: Callable[[str], None] | None = None) -> ImatrixResult:
    """Compute MODEL's importance matrix on ``text`` ("korean" or a UTF-8 file) and write it to ``out``.

    MODEL is a GGUF file (f32, f16, bf16 or q8_0), or anything ``komt-edge gguf`` converts: a temporary f16 GGUF
    is made for the run and removed afterwards. ``out`` follows komt-edge's output rule (``atomic.check_output_file``):
    never an input, never a device or a link, and an existing file only when it is an imatrix komt-edge wrote, or
    with ``force``. ``report``: where the caller writes the result's JSON, checked here with the rest."""
    path = Path(model).expanduser()
    inputs = [path, adapter, None if text == KOREAN else text]
    out = check_output_file(Path(out), option="-o", inputs=inputs, force=force, ours=Imatrix.written_by_komt_edge,
                            ours_kind="an importance matrix komt-edge wrote")
    if report is not None:
        if os.path.abspath(report) == os.path.abspath(out):
            raise KomtError(f"--json {report} is the -o imatrix file: give the JSON report another name")
        check_output_file(Path(report), option="--json", inputs=inputs, force=force, ours=holds_json,
                          ours_kind=JSON_REPORT)
    if out.suffix.lower() == ".dat":
        raise KomtError(f"-o {out}: komt-edge writes the GGUF imatrix format; name the file *.imatrix.gguf")
    if n_ctx < MIN_BATCH_ROWS:
        raise KomtError(f"--ctx {n_ctx}: llama-imatrix ignores batches under {MIN_BATCH_ROWS} tokens; use ≥ 16")
    user_text = None
    if text != KOREAN:
        # as llama-imatrix's -f reads it: the same tokens, Windows line ends included
        user_text = read_llama_cpp_text(Path(text), missing=f"--text {text}: no such file; pass 'korean' or a "
                                                           "UTF-8 text file",
                                        folder=f"--text {text} is a folder: pass 'korean' or one UTF-8 text file")
        if not user_text.strip():
            raise KomtError(f"--text {text} is empty: pass a text with at least {2 * n_ctx} tokens")
    info = None
    if path.suffix.lower() == ".gguf" or is_gguf(path):  # a GGUF MODEL: checked before any folder is made
        if adapter:
            raise KomtError("--adapter goes with a Hugging Face MODEL; a GGUF file already holds its weights")
        check_model_gguf(path)
        info = file_info(path)
        if info.file_type not in FLOAT_INPUT_TYPES:
            raise KomtError(f"{path.name} is {info.file_type}: compute the imatrix on an f32, f16, bf16 or q8_0 "
                            "GGUF (the quantized file is what the imatrix is for)")
    with output_dir(out.parent), tempfile.TemporaryDirectory(prefix=".komt-edge-imatrix-", dir=out.parent) as work:
        if info is not None:
            gguf_file, family = path, gguf_template(path, template)[1]
        else:
            gguf_file, family = _float_gguf(model, Path(work), adapter=adapter, template=template,
                                            allow_pickle=allow_pickle, n_threads=n_threads, progress=progress)
        if user_text is None:
            calib, dataset = korean_calibration_text(template_for(family) if family else None)
        else:
            calib, dataset = user_text, f"{Path(text).name} ({len(user_text)} characters)"
        if log:
            log(f"imatrix of {Path(gguf_file).name} on {dataset}")
        result = compute(gguf_file, calib, dataset=dataset, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads,
                         process_output=process_output, progress=progress,
                         metadata={"model": str(model), "text_sha256": sha256_json(calib)})
        result.write(out)
    return ImatrixResult(out, str(model), dataset, result.chunk_count, n_ctx, len(result.entries))


def _float_gguf(model: str, work: Path, *, adapter: str | None, template: str | None, allow_pickle: bool,
                n_threads: int | None, progress: bool) -> tuple[Path, str]:
    """A temporary f16 GGUF of a Hugging Face MODEL, and its komt family."""
    files = convert(model, ["f16"], work, adapter=adapter, allow_pickle=allow_pickle, template=template,
                    name="imatrix-source", n_threads=n_threads, progress=progress)
    family = model_family(resolve(model, adapter=adapter, allow_pickle=allow_pickle), template)
    return files[0], family
