"""`komt-edge gguf-lora ADAPTER -o OUT/`: a komt LoRA adapter → llama.cpp's LoRA adapter GGUF.

llama.cpp applies such a file at run time on top of any quant of the base (``llama-cli --lora``, llama-server's
``--lora`` and ``/lora-adapters``, llama-cpp-python's ``lora_path``, Ollama's ``ADAPTER``), so one base GGUF
serves several komt adapters, each a few megabytes. ``komt-edge verify BASE.gguf --lora FILE`` checks the pair
against the HF base + peft adapter.

ADAPTER is a local peft folder (``komt-edge train``'s output is one), a Hub id, or a zoo name (its komt adapter).
The base is read from ``--base``, else the adapter's ``base_model_name_or_path``, else the zoo; only its
config.json is needed (a Hub base is fetched without weights). Adapters that llama.cpp cannot express with one
alpha are converted with the per-module scale folded into B (rsLoRA, ``alpha_pattern``; ``rank_pattern`` needs
nothing), or refused when llama.cpp has no place for what they hold (``modules_to_save``, bias, DoRA, non-LoRA
peft types).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from . import __version__
from .atomic import (JSON_REPORT, check_free_space, check_output_dir, check_output_file, holds_json,
                     output_dir)
from .converters.lora_to_gguf import LORA_TYPES, LoraConverter
from .errors import KomtError
from .gguf import check_target, output_name
from .hub import is_hub_id
from .merge import load_adapter, read_adapter_config
from .util import read_json_object
from .zoo import ZOO, adapter_base, check_not_a_file, download, lookup, resolve_adapter


@dataclass
class GgufLoraResult:
    path: Path
    outtype: str
    adapter: str  # as given
    base: str  # the base the adapter applies to (Hub id or folder)
    alpha: float  # adapter.lora.alpha in the file
    ranks: list[int]
    tensors: int  # adapted weights (each a lora_a + lora_b pair)
    folded: int  # modules whose peft scale was folded into B
    bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}

    def summary(self) -> str:
        ranks = "/".join(str(r) for r in self.ranks)
        folded = f"; {self.folded} module scale(s) folded into lora_b" if self.folded else ""
        return (f"{self.path} ({self.outtype}, {self.bytes / 1e6:.2f} MB, {self.seconds:.1f} s)\n"
                f"  {self.tensors} adapted weights, rank {ranks}, adapter.lora.alpha {self.alpha:g}{folded}\n"
                f"  base: {self.base}\n"
                f"  use: llama-cli -m BASE.gguf --lora {self.path.name}")


def check_expressible(folder: Path) -> None:
    """Refuse, before the weights are read, the peft adapters llama.cpp's LoRA GGUF cannot hold."""
    config = read_adapter_config(folder)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise KomtError(f"{folder} is a {peft_type} adapter, not LoRA: llama.cpp's adapter GGUF holds LoRA "
                        "adapters only")
    if config.get("use_dora"):
        raise KomtError(f"{folder} is a DoRA adapter (use_dora): llama.cpp cannot apply DoRA's magnitude vector; "
                        "merge it instead with `komt-edge gguf BASE --adapter ADAPTER`")
    if config.get("modules_to_save"):
        raise KomtError(f"{folder} trains whole modules (modules_to_save: {', '.join(config['modules_to_save'])}), "
                        "which a llama.cpp LoRA file cannot replace; merge it instead with `komt-edge gguf BASE "
                        "--adapter ADAPTER`")
    if config.get("bias", "none") != "none":
        raise KomtError(f"{folder} trains biases (bias: {config['bias']}), which a llama.cpp LoRA file cannot hold; "
                        "merge it instead with `komt-edge gguf BASE --adapter ADAPTER`")


def _base_folder(base: str) -> Path:
    """The base's folder with config.json: a local folder, or a zoo name or Hub id fetched without weights."""
    local = Path(base).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise KomtError(f"base {local} has no config.json: pass the base model's folder with --base")
        return local
    check_not_a_file(base, "--base")
    entry = lookup(base)
    if entry is not None:
        return download(entry.base, weights=False)
    if is_hub_id(base):
        return download(base, weights=False)
    raise KomtError(f"base {base!r} does not exist: it is neither a local folder nor a Hub id; pass the base "
                    "model with --base")


def _resolve(adapter: str, base: str | None) -> tuple[Path, str, str, str | None, str | None]:
    """(adapter folder, base, display name, adapter Hub id, a note on the base) for ADAPTER as a zoo name, Hub id or
    folder. The base is ``base``, else the one rule every stage uses (``zoo.adapter_base``: the adapter's own Hub
    id, else komt-edge's zoo table), else a local folder the adapter's config names."""
    entry = lookup(adapter)
    if entry is not None and entry.adapter and not Path(adapter).expanduser().is_dir():
        folder, name, hub_id = resolve_adapter(entry.adapter), entry.name, entry.adapter
    else:
        folder = resolve_adapter(adapter)
        hub_id = None if Path(adapter).expanduser().is_dir() else adapter
        name = folder.resolve().name if hub_id is None else hub_id.split("/")[1]
        entry = next((m for m in ZOO if hub_id and m.adapter and m.adapter.lower() == hub_id.lower()), None)
    read_adapter_config(folder)  # a malformed config is named as such, not as a config without a base
    if base is not None:
        return folder, base, name, hub_id, None
    choice = adapter_base(folder, entry)
    base = choice.base
    if base is None and choice.declared and Path(choice.declared).expanduser().is_dir():
        base = choice.declared  # a local training folder (komt-edge train on a local model)
    if not base:
        raise KomtError(f"the base of {adapter} is unknown: adapter_config.json has no base_model_name_or_path; "
                        "pass it with --base")
    return folder, base, name, hub_id, choice.note


def gguf_lora(adapter: str | Path, out: str | Path = "dist", *, base: str | None = None, outtype: str = "f16",
              name: str | None = None, force: bool = False, allow_pickle: bool = False, progress: bool = True,
              report: str | Path | None = None, log: Callable[[str], None] | None = None) -> GgufLoraResult:
    """Write ADAPTER as llama.cpp's LoRA adapter GGUF ``OUT/<name>-LoRA-<TYPE>.gguf``.

    Everything is checked before a byte is written: the type, the adapter (a LoRA llama.cpp can express), the
    base (resolved without its weights; its architecture and every adapted weight's shape), the output file (only
    komt-edge's own file of the same adapter is replaced without ``force``) and the free space. ``report``: where
    the caller writes the result's JSON, checked with the rest (never the output GGUF, never an input file)."""
    outtype = outtype.lower()
    if outtype not in LORA_TYPES:
        raise KomtError(f"--outtype {outtype}: llama.cpp LoRA adapters are {', '.join(LORA_TYPES)}")
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    out = check_output_dir(Path(out))
    folder, base, display, hub_id, note = _resolve(str(adapter), base)
    if note:
        log(f"note: {note}")
    check_expressible(folder)
    lora = load_adapter(folder, allow_pickle=allow_pickle)
    if lora.replacements:  # keys that look like full weights, whatever the config says
        kind = "biases" if any(k.endswith(".bias") for k in lora.replacements) else "whole modules (modules_to_save)"
        raise KomtError(f"{folder} holds trained {kind} ({sorted(lora.replacements)[0]}), which a llama.cpp LoRA file "
                        "cannot hold; merge it instead with `komt-edge gguf BASE --adapter ADAPTER`")
    for warning in lora.warnings:
        log(f"warning: {warning}")
    base_dir = _base_folder(base)
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise KomtError(f"{base} has no config.json: pass the base model's folder with --base")
    conv = LoraConverter(lora, read_json_object(config_path), base)
    display = name or display
    target = out / output_name(f"{display}-LoRA", outtype)
    check_target(target, display, force=force)
    if report is not None:
        if os.path.abspath(report) == os.path.abspath(target):
            raise KomtError(f"--json {report} is the adapter GGUF this run writes: give the JSON report another name")
        check_output_file(Path(report), option="--json", inputs=[folder, base_dir], force=force, ours=holds_json,
                          ours_kind=JSON_REPORT)
    check_free_space(out, conv.output_bytes(outtype), target.name)
    base_models = [base] if not Path(base).expanduser().exists() else []
    start = time.perf_counter()
    with output_dir(out), tqdm(total=conv.parameter_count(), unit="w", unit_scale=True, disable=not progress,
                               desc=f"{display} → {target.name}") as bar:
        conv.write(target, outtype, name=display, base_models=base_models, tool_version=__version__,
                   progress=bar.update)
    return GgufLoraResult(path=target, outtype=outtype, adapter=hub_id or str(folder), base=str(base),
                          alpha=conv.alpha, ranks=sorted({t.rank for t in conv.tensors}), tensors=len(conv.tensors),
                          folded=sum(t.factor != 1.0 for t in conv.tensors), bytes=target.stat().st_size,
                          seconds=time.perf_counter() - start, warnings=list(lora.warnings))


@dataclass
class AdapterCheck:
    """An adapter GGUF verified as users run it: applied by llama.cpp to an f16 GGUF of its base."""

    passed: bool
    base_type: str
    tokens: int
    mean_kl: float
    top1: float
    max_abs: float

    def to_dict(self) -> dict:
        return asdict(self)


def verify_on_base(adapter_gguf: Path, model: Path, adapter: Path, work: Path, *, template: str | None,
                   name: str, max_kl: float | None = None, allow_pickle: bool = False, n_threads: int | None = None,
                   progress: bool = True, log: Callable[[str], None] = print) -> AdapterCheck:
    """llama.cpp applies ``adapter_gguf`` to an f16 GGUF of the base ``model`` (written in ``work`` for the
    purpose, then removed); its logits are compared with the Hugging Face base + the peft ``adapter``, within the
    f16 bounds (``max_kl`` overrides the mean-KL bound)."""
    from .gguf import convert
    from .verify import BoundOverrides, verify_files

    log("writing an f16 GGUF of the base to verify the adapter on (not published, removed afterwards)")
    base_gguf = convert(str(model), ["f16"], work, template=template, name=f"{name}-base", allow_pickle=allow_pickle,
                        n_threads=n_threads, progress=progress)[0]
    try:
        run = verify_files([base_gguf], str(model), adapter=str(adapter), allow_pickle=allow_pickle,
                           template=template, n_threads=n_threads, overrides=BoundOverrides(mean_kl=max_kl),
                           lora=adapter_gguf, progress=progress, log=log)
    finally:
        base_gguf.unlink(missing_ok=True)
    report = run.reports[0]
    lg = report.logits
    return AdapterCheck(run.passed, report.file_type, lg.tokens, lg.mean_kl, lg.top1, lg.max_abs)
