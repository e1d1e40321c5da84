"""`komt-edge gguf MODEL -q q4_0 -q q8_0 -o OUT/`: a komt model (or any llama/mistral checkpoint) → GGUF files.

MODEL is a zoo name (its LoRA adapter is merged into its base on the fly), a Hub id or a local folder. Every
requested type is written from one read of the checkpoint; see ``komt_edge.converters.hf_to_gguf``.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from . import __version__
from .atomic import check_free_space, check_output_dir, output_dir
from .converters import quantize as q
from .converters.hf_to_gguf import Converter, Metadata
from .errors import KomtError
from .templates import template_for
from .zoo import ResolvedModel, model_template, resolve, snapshot_revision

DEFAULT_QUANTS = ("q4_0", "q8_0")


def output_name(name: str, qtype: str) -> str:
    """GGUF naming convention: <name>-<TYPE>.gguf, e.g. komt-mistral-7b-v1-Q4_0.gguf.

    Letters and digits of every script stay (Hangul included, NFC-normalized as macOS folder names are not);
    anything else between them becomes one hyphen, and no name starts with a dot."""
    safe = re.sub(r"[^\w.-]+", "-", unicodedata.normalize("NFC", name)).strip("-.") or "model"
    return f"{safe}-{q.display_name(qtype)}.gguf"


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


def chat_template_for(resolved: ResolvedModel, template: str | None) -> str | None:
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
    return model_template(resolved).chat_template


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
        source_revision=snapshot_revision(resolved.path),
        chat_template=chat_template_for(resolved, template),
        quantized_by=f"komt-edge {__version__}",
        tool_version=__version__,
    )


def convert(model: str, quants: Sequence[str] = DEFAULT_QUANTS, out: str | Path = "dist", *,
            adapter: str | None = None, allow_pickle: bool = False, template: str | None = None,
            name: str | None = None, n_threads: int | None = None, force: bool = False,
            progress: bool = True) -> list[Path]:
    """Convert MODEL to one GGUF file per requested type; returns the written paths.

    Everything is checked before the first byte is written: the types, the model (config, tensor shapes,
    tokenizer, adapter), the output folder, that no output would replace a file komt-edge did not write for this
    model (see ``check_target``; ``force`` allows it) and the free space. A re-run replaces its own files, each
    atomically."""
    types = q.parse_types(quants)
    if template not in (None, "none", "llama", "mistral"):
        raise KomtError(f"--template {template!r}: choose llama, mistral or none")
    out = check_output_dir(Path(out))
    resolved = resolve(model, adapter=adapter, allow_pickle=allow_pickle)
    conv = Converter(resolved.path, adapter=resolved.adapter, allow_pickle=allow_pickle)
    display = name or resolved.name
    for warning in conv.warnings:
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    meta = metadata_for(resolved, conv, template, display)
    targets = {t: out / output_name(display, t) for t in types}
    for path in targets.values():
        check_target(path, display, force=force)
    check_free_space(out, sum(conv.output_bytes(t) for t in types), f"{', '.join(p.name for p in targets.values())}")
    with output_dir(out), tqdm(total=conv.parameter_count(), unit="w", unit_scale=True, disable=not progress,
                               desc=f"{display} → {', '.join(q.display_name(t) for t in types)}") as bar:
        written = conv.write(targets, meta, n_threads=n_threads, progress=bar.update)
    return list(written.values())
