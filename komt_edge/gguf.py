"""`komt-edge gguf MODEL -q q4_0 -q q8_0 -o OUT/`: a komt model (or any llama/mistral checkpoint) → GGUF files.

MODEL is a zoo name (its LoRA adapter is merged into its base on the fly), a Hub id or a local folder. Every
requested type is written from one read of the checkpoint; see ``komt_edge.converters.hf_to_gguf``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from . import __version__
from .atomic import ensure_writable_dir
from .converters import quantize as q
from .converters.hf_to_gguf import Converter, Metadata
from .errors import KomtError
from .templates import template_for
from .zoo import ResolvedModel, family_for_architecture, resolve

DEFAULT_QUANTS = ("q4_0", "q8_0")


def output_name(name: str, qtype: str) -> str:
    """GGUF naming convention: <name>-<TYPE>.gguf, e.g. komt-mistral-7b-v1-Q4_0.gguf."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    return f"{safe}-{q.display_name(qtype)}.gguf"


def _revision(path: Path) -> str | None:
    """The commit of a huggingface_hub snapshot folder (…/snapshots/<sha>)."""
    parts = Path(path).resolve().parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return parts[-1]
    return None


def chat_template_for(resolved: ResolvedModel, architecture: str, template: str | None) -> str | None:
    """komt's template for zoo models; otherwise the checkpoint's own, else komt's for the architecture."""
    if template == "none":
        return None
    if template:
        return template_for(template).chat_template
    if resolved.zoo is not None:
        return resolved.zoo.template.chat_template
    jinja = resolved.path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg_path = resolved.path / "tokenizer_config.json"
    if cfg_path.is_file():
        own = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(own, str):
            return own
    return template_for(family_for_architecture(architecture)).chat_template


def metadata_for(resolved: ResolvedModel, conv: Converter, template: str | None, name: str) -> Metadata:
    """general.* and provenance: for a zoo model its licence, base and Hub repos; for a Hub id, that repo."""
    from gguf.utility import size_label

    zoo = resolved.zoo
    from_hub = not Path(resolved.source).exists()
    if zoo and resolved.adapter:
        base_models, source = [zoo.base], zoo.adapter
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
        source_revision=_revision(resolved.path),
        chat_template=chat_template_for(resolved, conv.hp.architecture, template),
        quantized_by=f"komt-edge {__version__}",
        tool_version=__version__,
    )


def convert(model: str, quants: Sequence[str] = DEFAULT_QUANTS, out: str | Path = "dist", *,
            adapter: str | None = None, allow_pickle: bool = False, template: str | None = None,
            name: str | None = None, n_threads: int | None = None, progress: bool = True) -> list[Path]:
    """Convert MODEL to one GGUF file per requested type; returns the written paths."""
    try:
        types = list(dict.fromkeys(q.normalize(t) for t in quants))
    except ValueError as err:
        raise KomtError(str(err)) from None
    if not types:
        raise KomtError("no output type given: pass -q q4_0 (or q8_0, f16, q4_K_M, ...)")
    if template not in (None, "none", "llama", "mistral"):
        raise KomtError(f"--template {template!r}: choose llama, mistral or none")
    out = ensure_writable_dir(Path(out))
    resolved = resolve(model, adapter=adapter, allow_pickle=allow_pickle)
    conv = Converter(resolved.path, adapter=resolved.adapter, allow_pickle=allow_pickle)
    display = name or resolved.name
    for warning in conv.vocab.warnings:
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    meta = metadata_for(resolved, conv, template, display)
    targets = {t: out / output_name(display, t) for t in types}
    with tqdm(total=conv.parameter_count(), unit="w", unit_scale=True, disable=not progress,
              desc=f"{display} → {', '.join(q.display_name(t) for t in types)}") as bar:
        written = conv.write(targets, meta, n_threads=n_threads, progress=bar.update)
    return list(written.values())
