"""`komt-edge gguf MODEL -q q4_0 -q q8_0 -o OUT/`: a komt model (or any llama/mistral checkpoint) → GGUF files.

MODEL is a zoo name (its LoRA adapter is merged into its base on the fly), a Hub id or a local folder. Every
requested type is written from one read of the checkpoint; see ``komt_edge.converters.hf_to_gguf``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_file, check_free_space, check_output_dir, output_dir
from .converters import quantize as q
from .converters.hf_to_gguf import Converter, Metadata
from .converters.plan import Chosen, QuantPlan, choose, mix, plans_for, safe_name
from .errors import KomtError
from .imatrix import KOREAN, Imatrix, korean_calibration_text, resolve_imatrix
from .templates import template_option_error
from .zoo import ResolvedModel, chat_template_for, model_template, resolve, snapshot_revision

DEFAULT_QUANTS = ("q4_0", "q8_0")


def output_name(name: str, plan: QuantPlan | str) -> str:
    """GGUF naming convention: <name>-<PLAN>.gguf, e.g. komt-mistral-7b-v1-Q4_0.gguf (a type name stands for
    llama.cpp's own mix of that type).

    Letters and digits of every script stay (Hangul included, NFC-normalized as macOS folder names are not);
    anything else between them becomes one hyphen, and no name starts with a dot."""
    return f"{safe_name(name)}-{(plan if isinstance(plan, QuantPlan) else mix(plan)).name}.gguf"


def check_target(path: Path, name: str, *, force: bool = False) -> None:
    """An existing file at an output path is replaced only when it is komt-edge's GGUF of the same model (a
    re-run), or with ``force``. Another tool's file, or another model whose name maps to the same file name,
    is refused before any work."""
    if path.is_dir():
        raise KomtError(f"{path} is a folder, where komt-edge would write a GGUF file: move it or choose another -o")
    if not path.exists() or force:
        return
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        ours = "komt_edge.version" in fields
        other = fields["general.name"].contents() if "general.name" in fields else None
    except Exception:  # not a GGUF file, or a damaged one: not ours either way
        ours, other = False, None
    if not ours:
        raise KomtError(f"{path} exists and was not written by komt-edge: choose another -o folder, or pass --force "
                        "to replace it")
    if other != name:
        raise KomtError(f"{path} holds another model ({other!r}, not {name!r}) whose name maps to the same file: "
                        "pass --name to tell them apart, choose another -o folder, or pass --force to replace it")


def metadata_for(resolved: ResolvedModel, conv: Converter, template: str | None, name: str) -> Metadata:
    """general.* and provenance: for a zoo model its licence, base and Hub repos; for a Hub id, that repo."""
    from gguf.utility import size_label

    zoo = resolved.zoo
    from_hub = not Path(resolved.source).exists()
    revision_of = resolved.path
    if zoo and resolved.adapter:  # resolved.source: the base zoo.adapter_base chose; the adapter is the source
        base_models = [resolved.source if from_hub else zoo.base]
        source, revision_of = zoo.adapter, resolved.adapter
    elif zoo:
        base_models, source = [zoo.base], zoo.merged
    else:
        base_models, source = ([resolved.source] if from_hub else []), (resolved.source if from_hub else None)
    return Metadata(
        name=name,
        basename=name,
        size_label=size_label(conv.parameter_count(), 0, 0, 0),
        license=zoo.license if zoo else None,
        base_models=base_models,
        source_repo=source,
        source_revision=snapshot_revision(revision_of),
        chat_template=chat_template_for(resolved, template),
        quantized_by=f"komt-edge {__version__}",
        tool_version=__version__,
    )


def convert(model: str, quants: Sequence[str | QuantPlan] = DEFAULT_QUANTS, out: str | Path = "dist", *,
            adapter: str | None = None, allow_pickle: bool = False, template: str | None = None,
            name: str | None = None, n_threads: int | None = None, force: bool = False,
            imatrix: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Convert MODEL to one GGUF file per requested plan (``quants``: -q values or QuantPlans, see
    ``converters.plan``); returns the written paths.

    Everything is checked before the first byte is written: the plans, the model (config, tensor shapes,
    tokenizer, adapter), the output folder, that no output would replace a file komt-edge did not write for this
    model (see ``check_target``; ``force`` allows it) and the free space. A re-run replaces its own files, each
    atomically.

    ``imatrix`` (an importance-matrix file, or "korean" to compute one on the Korean calibration text, kept in OUT
    as ``<name>-korean.imatrix.gguf`` and reused while the model and text are unchanged) is used for every
    quantized plan that has none of its own. A plan with an importance matrix is quantized
    the way ``llama-quantize --imatrix`` does: from a float GGUF holding the weights exactly, through llama.cpp's
    own ``llama_model_quantize``; types that need an importance matrix (iq2_xs, iq1_s, q2_K_S, ...) need it. The
    plans without one are written by komt-edge's own writer, with the float source, in one read of the checkpoint.
    """
    imatrix = None if imatrix in (None, "", "none") else imatrix
    plans = plans_for(quants, imatrix=None if imatrix is None else str(imatrix))
    if problem := template_option_error(template, allow_none=True):
        raise KomtError(problem)
    matrices = {}  # each imatrix file, readable and an imatrix, before any work
    for spec in ([str(imatrix)] if imatrix is not None else []) + [p.imatrix for p in plans if p.imatrix]:
        if spec != KOREAN and spec not in matrices:
            matrices[spec] = Imatrix.read(Path(spec))
    out = check_output_dir(Path(out))
    resolved = resolve(model, adapter=adapter, allow_pickle=allow_pickle)
    conv = Converter(resolved.path, adapter=resolved.adapter, allow_pickle=allow_pickle)
    display = name or resolved.name
    for warning in conv.warnings:
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    meta = metadata_for(resolved, conv, template, display)
    targets = {plan: out / output_name(display, plan) for plan in plans}
    for path in targets.values():
        check_target(path, display, force=force)
    quantized = [plan for plan in plans if plan.imatrix is not None]
    for spec in dict.fromkeys(plan.imatrix for plan in quantized):
        if spec in matrices:
            matrices[spec].check_against({p.gguf_name: p.shape for p in conv.tensors}, display)
    source_plan = mix(conv.lossless_type())
    needed = sum(conv.output_bytes(plan) for plan in plans)
    check_free_space(out, needed + (conv.output_bytes(source_plan) if quantized else 0),
                     f"{', '.join(p.name for p in targets.values())}")
    direct = {plan: path for plan, path in targets.items() if plan.imatrix is None}
    # The float source llama_model_quantize reads: hidden, named as a partial so that a killed run's is removed.
    source = out / f".{output_name(display, source_plan)}.source.partial-{os.getpid()}"
    outputs = {**direct, **({source_plan: source} if quantized and source_plan not in direct else {})}
    with output_dir(out):
        try:
            with tqdm(total=conv.parameter_count(), unit="w", unit_scale=True, disable=not progress,
                      desc=f"{display} → {', '.join(plan.name for plan in outputs)}") as bar:
                conv.write(outputs, meta, n_threads=n_threads, progress=bar.update)
            for spec in dict.fromkeys(plan.imatrix for plan in quantized):
                _quantize_with_imatrix(outputs[source_plan], {p: targets[p] for p in quantized if p.imatrix == spec},
                                       matrices.get(spec, spec), resolved, template, out, display, n_threads,
                                       progress)
        finally:
            source.unlink(missing_ok=True)
    return [targets[plan] for plan in plans]


def _quantize_with_imatrix(source: Path, targets: dict[QuantPlan, Path], imatrix, resolved: ResolvedModel,
                           template: str | None, out: Path, display: str, n_threads: int | None,
                           progress: bool) -> None:
    """llama-quantize --imatrix for each target plan, from the float ``source``."""
    matrix, matrix_file = resolve_imatrix(imatrix, source, resolved, template, out, display, n_threads,
                                          progress)
    matrix.check_finite()  # the Korean one too: a model whose activations overflow gives NaN sums
    weights = {n: matrix.weights(n) for n in matrix.entries}
    provenance = {"quantize.imatrix.file": str(matrix_file), "quantize.imatrix.entries_count": len(weights)}
    if matrix.datasets:
        provenance["quantize.imatrix.dataset"] = matrix.datasets[0]
    if matrix.chunk_count > 0:
        provenance["quantize.imatrix.chunks_count"] = matrix.chunk_count
    text = None
    for plan, target in tqdm(targets.items(), desc=f"{display}: llama_model_quantize with the imatrix", unit="file",
                             disable=not progress):
        chosen = Chosen(plan, None, {}, "")
        if plan.pending:  # per-tensor types measured on this model (converters.plan.choose; issue 26)
            if text is None:
                text = korean_calibration_text(model_template(resolved, template if template != "none" else None))[0]
            chosen = choose(plan, source=source, imatrix=weights, provenance=provenance, text=text, out=out,
                            display=display, n_threads=n_threads, progress=progress,
                            log=lambda m: tqdm.write(m, file=sys.stderr))
        with atomic_file(target) as tmp:
            q.quantize_file(source, tmp, chosen.plan, imatrix=weights, metadata={**provenance, **chosen.metadata},
                            n_threads=n_threads, model=display)
            size = Path(tmp).stat().st_size
            if chosen.max_bytes is not None and size > chosen.max_bytes:
                raise KomtError(f"{target.name} would be {size:,} bytes, over its budget of {chosen.max_bytes:,}: "
                                "report this as a komt-edge bug")
        if plan.pending:
            with atomic_file(recipe_path(target)) as tmp:
                Path(tmp).write_text(chosen.recipe, encoding="utf-8")


def recipe_path(target: Path) -> Path:
    """Beside a KO file, its per-tensor types in llama-quantize's --tensor-type-file format."""
    return Path(target).with_name(Path(target).name.removesuffix(".gguf") + ".tensor-types.txt")
