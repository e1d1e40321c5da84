"""`komt-edge release MODEL --org ORG`: build, verify, measure and publish a komt model's GGUF (and GPTQ) repos.

Stages, in order::

    merge → gguf → gptq → verify → bench → card → push

- **merge** writes the merged full-precision checkpoint to ``OUT/merged``, only with ``keep_merged``: the gguf
  and gptq stages merge the LoRA adapter themselves (on the fly, or in a temporary folder).
- **gguf** converts to every ``--quants`` type in one read (``komt_edge.gguf.convert``) and splits a file over the
  Hub's per-file limit into gguf-split shards (``split.*`` metadata, ``-00001-of-0000N.gguf`` names) that
  llama.cpp loads from the first shard.
- **gptq** and **bench** are optional stages provided by other modules (see *Optional stages*).
- **verify** runs ``komt_edge.verify.verify`` on every GGUF file; a failure stops the release before anything is
  pushed.
- **card** writes README.md for each repo (``komt_edge.card``); **push** publishes each repo folder
  (``komt_edge.push``, which sends only what the Hub does not have).

Resumable: each stage records its inputs (parameters, sha256 of input files, tool versions), its outputs (sha256,
size) and its data in ``release-manifest.json`` in the output folder, written atomically after every stage. A
re-run skips a stage whose inputs are unchanged and whose outputs are intact, so a release interrupted by a crash,
a network failure or Ctrl-C resumes where it stopped. Push always runs: it is idempotent against the Hub.

Before any work: the Hub token (HF_TOKEN or the login cache), write access to the org and the target repos
(refused when they hold files komt-edge did not make, unless ``force``) are checked.

Optional stages
---------------
A stage lists the modules it needs (``Stage.requires``). While one of them is missing the stage is skipped and
recorded as skipped, cleanly; once it is installed the stage runs. Modules are imported only when their stage
runs. Wiring a stage is one line in ``STAGES``: ``Stage(name, run=function(ctx) -> StageOutput, requires=(...))``.

- **gptq** (``komt_edge.gptq`` + ``gptqmodel``): ``komt_edge.gptq.gptq`` quantizes the model (4-bit, group size
  128, Korean calibration; the adapter merged first), reloads it and compares its Korean perplexity with the
  original. The release stops when the check fails (template, non-finite perplexity, or a perplexity ratio over
  ``GPTQ_MAX_PPL_RATIO``).
- **bench** (``komt_edge.bench``): ``quality`` (Korean perplexity and KL divergence against an f16 GGUF, written
  for the purpose when the release has none, then removed) and ``speed`` (llama-bench's tg128/pp512) on every GGUF
  file; the numbers go into the card's file table.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from . import __version__
from .atomic import pid_alive, remove_stale_partials
from .errors import KomtError
from .push import HUB_MAX_FILE_SIZE, DEFAULT_BACKOFF, DEFAULT_RETRIES, fmt_size

MANIFEST_NAME = "release-manifest.json"
MANIFEST_VERSION = 1
DEFAULT_RELEASE_QUANTS = ("q4_0", "q4_K_M", "q5_K_M", "q8_0")


# --- stage interface ---------------------------------------------------------------------------------------

@dataclass
class StageOutput:
    files: list[Path] = field(default_factory=list)  # what the stage wrote (hashed into the manifest)
    data: dict = field(default_factory=dict)  # JSON-able results for later stages and the cards
    passed: bool = True  # False stops the release (verification failed)
    message: str = ""  # why it failed, one line
    tools: dict[str, str] = field(default_factory=dict)  # extra tool versions to record


@dataclass
class ReleaseOptions:
    model: str
    org: str
    quants: tuple[str, ...]
    gptq: bool
    name: str
    out: Path
    gguf_repo: str
    gptq_repo: str
    adapter: str | None = None
    template: str | None = None
    base_model: str | None = None
    license: str | None = None
    private: bool = False
    force: bool = False
    push: bool = True
    allow_pickle: bool = False
    n_threads: int | None = None
    max_file_size: int = HUB_MAX_FILE_SIZE
    max_kl: float | None = None
    bench: bool = True
    keep_merged: bool = False
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    progress: bool = True


@dataclass
class StageContext:
    """What a stage can see: the options, the resolved model, the folders and earlier stages' results."""

    options: ReleaseOptions
    manifest: "Manifest"
    log: Callable[[str], None]
    resolved: object = None  # komt_edge.zoo.ResolvedModel
    results: dict[str, dict] = field(default_factory=dict)  # stage → manifest record (status, data, outputs)

    @property
    def out(self) -> Path:
        return self.options.out

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def n_threads(self) -> int | None:
        return self.options.n_threads

    @property
    def gguf_dir(self) -> Path:
        return self.out / self.options.gguf_repo.split("/")[1]

    @property
    def gptq_dir(self) -> Path:
        return self.out / self.options.gptq_repo.split("/")[1]

    @property
    def merged_dir(self) -> Path:
        return self.out / "merged"

    @property
    def model_dir(self) -> Path:
        return self.resolved.path

    @property
    def adapter_dir(self) -> Path | None:
        return self.resolved.adapter

    @property
    def hf_dir(self) -> Path:
        """A full-precision HF checkpoint of the model: the merged folder when there is an adapter."""
        return self.merged_dir if self.adapter_dir is not None else self.model_dir

    @property
    def family(self) -> str:
        if self.options.template in ("llama", "mistral"):
            return self.options.template
        if self.resolved.zoo is not None:
            return self.resolved.zoo.family
        from .zoo import family_for_architecture

        return family_for_architecture(self.architecture)

    @property
    def architecture(self) -> str:
        cfg = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        return (cfg.get("architectures") or ["LlamaForCausalLM"])[0]

    def done(self, stage: str) -> bool:
        return self.results.get(stage, {}).get("status") == "done"

    def data(self, stage: str) -> dict:
        return self.results.get(stage, {}).get("data") or {}

    @property
    def gguf_models(self) -> list[Path]:
        """One path per GGUF model: the file, or the first shard of a split file."""
        return [self.gguf_dir / m["files"][0] for m in self.data("gguf").get("models", [])]

    def work_dir(self, stage: str) -> Path:
        path = self.out / "work" / stage
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], StageOutput]
    requires: tuple[str, ...] = ()  # modules the stage needs; skipped (cleanly) while one is missing
    inputs: Callable[[StageContext], dict] = lambda ctx: {}
    skip: Callable[[StageContext], str | None] = lambda ctx: None  # a reason to skip, or None
    always: bool = False  # run even when up to date (push: idempotent against the Hub)
    tools: tuple[str, ...] = ()  # distributions whose versions are inputs

    def missing(self) -> str | None:
        """Why the stage cannot run here (a module it needs is not installed), or None."""
        absent = [m for m in self.requires if not module_available(m)]
        return f"{', '.join(absent)} not installed" if absent else None


def module_available(name: str) -> bool:
    """Importable, without importing it (a module set to None in sys.modules counts as missing)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --- manifest ----------------------------------------------------------------------------------------------

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tool_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    if dist == "komt-edge":
        return __version__
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


class Manifest:
    """``release-manifest.json``: per stage its inputs, outputs (sha256, size), data and tool versions."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / MANIFEST_NAME
        self.data: dict = {"komt_edge": __version__, "version": MANIFEST_VERSION, "stages": {}, "hashes": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                loaded = None  # written atomically, so only a hand edit breaks it: start over
            if isinstance(loaded, dict) and loaded.get("version") == MANIFEST_VERSION:
                self.data = loaded
                self.data.setdefault("stages", {})
                self.data.setdefault("hashes", {})

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def save(self) -> None:
        from .atomic import atomic_file

        self.data["updated"] = _now()
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def key(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return path.relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return str(path)

    def sha256(self, path: Path) -> str:
        """sha256 of a file, cached by (size, mtime): a multi-GB file is read once, not on every re-run."""
        from .push import sha256_file

        st = Path(path).stat()
        key = self.key(path)
        cached = self.data["hashes"].get(key)
        if cached and cached["size"] == st.st_size and cached["mtime_ns"] == st.st_mtime_ns:
            return cached["sha256"]
        sha = sha256_file(Path(path))
        self.data["hashes"][key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        return sha

    def record_files(self, files: Sequence[Path]) -> dict[str, dict]:
        out = {}
        for f in files:
            st = Path(f).stat()
            out[self.key(f)] = {"sha256": self.sha256(f), "size": st.st_size}
        return out

    def outputs_intact(self, record: dict) -> bool:
        for key, meta in (record.get("outputs") or {}).items():
            path = Path(key) if os.path.isabs(key) else self.out / key
            if not path.is_file() or path.stat().st_size != meta["size"] or self.sha256(path) != meta["sha256"]:
                return False
        return True


# --- sources -----------------------------------------------------------------------------------------------

def _source_fingerprint(manifest: Manifest, path: Path | None, source: str | None) -> dict | None:
    """A Hub snapshot by repo and revision; a local folder by the sha256 of its files."""
    from .gguf import _revision

    if path is None:
        return None
    revision = _revision(path)
    if revision is not None:
        return {"repo": source, "revision": revision}
    files = {}
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and not f.name.startswith("."):
            files[f.name] = manifest.sha256(f)
    return {"folder": Path(path).name, "files": files}


def _outputs_of(ctx: StageContext, stage: str) -> dict:
    return {k: v["sha256"] for k, v in (ctx.results.get(stage, {}).get("outputs") or {}).items()}


def _model_inputs(ctx: StageContext) -> dict:
    r = ctx.resolved
    return {"model": _source_fingerprint(ctx.manifest, r.path, r.source),
            "adapter": _source_fingerprint(ctx.manifest, r.adapter, ctx.options.adapter or
                                           (r.zoo.adapter if r.zoo else None))}


# --- merge -------------------------------------------------------------------------------------------------

def _merge_skip(ctx: StageContext) -> str | None:
    if ctx.adapter_dir is None:
        return "the model has no adapter"
    if not ctx.options.keep_merged:
        return "not needed: gguf and gptq merge the adapter on the fly (--keep-merged writes it to OUT/merged)"
    return None


def _merge_run(ctx: StageContext) -> StageOutput:
    from .merge import merge

    merge(ctx.model_dir, ctx.adapter_dir, ctx.merged_dir, allow_pickle=ctx.options.allow_pickle)
    return StageOutput(files=[p for p in sorted(ctx.merged_dir.iterdir()) if p.is_file()])


# --- gguf --------------------------------------------------------------------------------------------------

def _gguf_inputs(ctx: StageContext) -> dict:
    o = ctx.options
    return {**_model_inputs(ctx), "quants": list(o.quants), "template": o.template, "name": o.name,
            "max_file_size": o.max_file_size}


def _gguf_run(ctx: StageContext) -> StageOutput:
    from .converters import quantize as q
    from .gguf import convert

    o = ctx.options
    gguf_dir = ctx.gguf_dir
    gguf_dir.mkdir(parents=True, exist_ok=True)
    _clean_partials(gguf_dir)
    written = convert(o.model, o.quants, gguf_dir, adapter=o.adapter, allow_pickle=o.allow_pickle,
                      template=o.template, name=o.name, n_threads=o.n_threads, progress=o.progress)
    models, files = [], []
    for qtype, path in zip([q.normalize(t) for t in dict.fromkeys(o.quants)], written):
        shards = [path]
        if path.stat().st_size > o.max_file_size:
            ctx.log(f"  {path.name} is {fmt_size(path.stat().st_size)}, over the per-file limit of "
                    f"{fmt_size(o.max_file_size)}: splitting it (gguf-split)")
            shards = split_gguf(path, o.max_file_size)
        info = gguf_info(shards)
        models.append({"quant": q.display_name(qtype), "files": [s.name for s in shards], **info})
        files += shards
    keep = {f.name for f in files}
    for stale in gguf_dir.glob("*.gguf"):  # files of quant types this release no longer has
        if stale.name not in keep:
            stale.unlink()
    return StageOutput(files=files, data={"models": models},
                       tools={"llama.cpp": _llama_cpp_commit()} if _llama_cpp_commit() else {})


def _llama_cpp_commit() -> str | None:
    vendor = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp.md"
    if vendor.is_file():
        m = re.search(r"llama\.cpp[^\n]*?\b([0-9a-f]{7,40})\b", vendor.read_text(encoding="utf-8"))
        if m:
            return m.group(1)
    return None


def _clean_partials(folder: Path) -> None:
    """Leftovers of an interrupted write: hidden ``.NAME.partial-PID`` files and split folders."""
    remove_stale_partials(folder)
    for p in folder.glob(".*.split-*"):
        shutil.rmtree(p, ignore_errors=True)


def gguf_info(files: Sequence[Path]) -> dict:
    """file type, size, bits per weight and size label of a GGUF model (all its shards)."""
    from gguf import GGUFReader, LlamaFileType

    n_bytes = n_elements = size = 0
    file_type = size_label = None
    for i, f in enumerate(files):
        reader = GGUFReader(f)
        if i == 0:
            ft = reader.fields.get("general.file_type")
            file_type = LlamaFileType(int(ft.contents())).name if ft is not None else None
            sl = reader.fields.get("general.size_label")
            size_label = sl.contents() if sl is not None else None
        for t in reader.tensors:
            n_bytes += int(t.n_bytes)
            n_elements += int(t.n_elements)
        size += Path(f).stat().st_size
        del reader
    return {"file_type": file_type, "size": size, "size_label": size_label,
            "bits_per_weight": round(8 * n_bytes / n_elements, 3) if n_elements else None}


def split_gguf(path: Path, max_size: int) -> list[Path]:
    """Split a GGUF file the way llama.cpp's gguf-split does: shards ``NAME-00001-of-0000N.gguf``, each at most
    ``max_size`` bytes, the first with all metadata, each with ``split.no``/``split.count``/``split.tensors.count``.
    llama.cpp loads the model from the first shard. The original file is replaced by the shards."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    path = Path(path)
    reader = GGUFReader(path)
    tensors = list(reader.tensors)
    # Metadata and tensor infos go in front of the data, and every tensor is aligned: keep room for them.
    overhead = int(reader.data_offset) + (reader.alignment + 64) * len(tensors) + 4096
    budget = max_size - overhead
    biggest = max(tensors, key=lambda t: int(t.n_bytes))
    if budget <= 0 or int(biggest.n_bytes) > budget:
        raise KomtError(f"{path.name} cannot be split under {fmt_size(max_size)} per file: tensor {biggest.name} "
                        f"alone is {fmt_size(int(biggest.n_bytes))}; a tensor cannot span files")
    tmp = path.parent / f".{path.stem}.split-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        arch = reader.fields["general.architecture"].contents()
        writer = GGUFWriter(tmp / path.name, arch, split_max_size=budget)
        writer.data_alignment = reader.alignment
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or key.startswith("split."):
                continue
            vtype = GGUFValueType(f.types[0])
            sub_type = None
            if vtype == GGUFValueType.ARRAY:
                if len(f.types) != 2:
                    raise KomtError(f"{path.name}: nested array {key} is not supported by the splitter")
                sub_type = GGUFValueType(f.types[1])
            writer.add_key_value(key, f.contents(), vtype, sub_type=sub_type)
        for t in tensors:
            writer.add_tensor_info(t.name, [int(x) for x in reversed(t.shape)], np.dtype(np.float32),
                                   int(t.n_bytes), raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(t.data)
        writer.close()
        del reader
        shards = sorted(tmp.glob(f"{path.stem}-*-of-*.gguf"))
        too_big = [s.name for s in shards if s.stat().st_size > max_size]
        if len(shards) < 2 or too_big:
            raise KomtError(f"splitting {path.name} did not give shards under {fmt_size(max_size)} ({too_big})")
        final = []
        for s in shards:
            os.replace(s, path.parent / s.name)
            final.append(path.parent / s.name)
        path.unlink()
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- gptq (optional) ---------------------------------------------------------------------------------------

# 4-bit GPTQ of a 7B model costs a few percent of perplexity; a broken quantization costs multiples.
GPTQ_MAX_PPL_RATIO = 1.5


def _gptq_skip(ctx: StageContext) -> str | None:
    return None if ctx.options.gptq else "disabled (--no-gptq)"


def _gptq_inputs(ctx: StageContext) -> dict:
    o = ctx.options
    return {**_model_inputs(ctx), "name": o.name, "bits": 4, "group_size": 128, "calibration": "korean"}


def _gptq_run(ctx: StageContext) -> StageOutput:
    import math

    from .gptq import gptq

    o = ctx.options
    work = ctx.work_dir("gptq")
    for old in work.iterdir():
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    result = gptq(o.model, work, adapter=o.adapter, name=o.name, allow_pickle=o.allow_pickle, check=True,
                  progress=o.progress)
    target = ctx.gptq_dir
    if target.exists():
        shutil.rmtree(target)
    os.replace(result.path, target)
    k = result.check
    problems = list(result.warnings)
    if k is None:
        problems.append("the GPTQ checkpoint was not checked")
    elif k.ppl_ratio > GPTQ_MAX_PPL_RATIO:
        problems.append(f"Korean perplexity {k.ppl_gptq:.3f} is ×{k.ppl_ratio:.2f} the original's "
                        f"{k.ppl_reference:.3f} (bound ×{GPTQ_MAX_PPL_RATIO})")
    data = {"quant": f"GPTQ-{result.bits}bit-" + ("gchannel" if result.group_size == -1 else f"g{result.group_size}"),
            "bits": result.bits, "group_size": result.group_size, "desc_act": result.desc_act,
            "format": "gptq v1", "device": result.device, "calibration": result.calibration}
    if k is not None:
        data.update(ppl=k.ppl_gptq if math.isfinite(k.ppl_gptq) else None, ppl_reference=k.ppl_reference,
                    ppl_ratio=k.ppl_ratio if math.isfinite(k.ppl_ratio) else None, template_ok=k.template_ok,
                    eval_tokens=k.eval_tokens, answer=k.answer)
    try:
        summary = result.summary()
    except Exception:  # the summary is informative only
        summary = str(result.path)
    for line in summary.splitlines():
        ctx.log("  " + line)
    files = [p for p in sorted(target.rglob("*")) if p.is_file() and p.name != "README.md"]
    return StageOutput(files=files, data=data, passed=not problems,
                       message=f"GPTQ check failed: {'; '.join(problems)}" if problems else "",
                       tools={d: tool_version(d) for d in ("gptqmodel", "optimum") if tool_version(d)})


# --- verify ------------------------------------------------------------------------------------------------

def _verify_inputs(ctx: StageContext) -> dict:
    return {"files": _outputs_of(ctx, "gguf"), **_model_inputs(ctx), "template": ctx.options.template,
            "max_kl": ctx.options.max_kl}


def _verify_run(ctx: StageContext) -> StageOutput:
    from .verify import BoundOverrides, load_reference, verify

    o = ctx.options
    reports, data = [], {}
    # one HF forward pass for all files: a 7B float32 reference is the slow part
    reference = load_reference(o.model, adapter=o.adapter, allow_pickle=o.allow_pickle, template=o.template)
    overrides = BoundOverrides(mean_kl=o.max_kl)
    for path in ctx.gguf_models:
        report = verify(path, o.model, n_threads=o.n_threads, overrides=overrides, reference=reference)
        ctx.log("\n".join("  " + line for line in report.summary().splitlines()))
        reports.append(report)
        t, lg = report.tokenizer, report.logits
        data[path.name] = {"file_type": report.file_type, "passed": report.passed,
                           "tokenizer": f"{t.probes - len(t.mismatches)}/{t.probes}", "tokens": lg.tokens,
                           "mean_kl": lg.mean_kl, "max_kl": lg.max_kl, "top1": lg.top1, "max_abs": lg.max_abs,
                           "template_ok": report.generation.template_ok}
    report_path = ctx.out / "verify.json"
    from .atomic import atomic_file

    with atomic_file(report_path) as tmp:
        tmp.write_text("[" + ",\n".join(r.to_json() for r in reports) + "]\n", encoding="utf-8")
    failed = [r for r in reports if not r.passed]
    message = ""
    if failed:
        message = (f"verification failed for {', '.join(Path(r.file).name for r in failed)} "
                   f"(see {report_path})")
    return StageOutput(files=[report_path], data={"files": data}, passed=not failed, message=message)


# --- bench (optional) --------------------------------------------------------------------------------------

def _bench_skip(ctx: StageContext) -> str | None:
    return None if ctx.options.bench else "disabled (--no-bench)"


def _bench_inputs(ctx: StageContext) -> dict:
    return {"files": _outputs_of(ctx, "gguf"), "reference": "f16", "threads": ctx.options.n_threads}


def _bench_run(ctx: StageContext) -> StageOutput:
    from . import bench
    from .atomic import atomic_file
    from .gguf import convert

    o = ctx.options
    models = ctx.gguf_models
    types = {m["files"][0]: m.get("file_type") for m in ctx.data("gguf").get("models", [])}
    reference = next((p for p in models if types.get(p.name) in ("MOSTLY_F16", "MOSTLY_BF16", "ALL_F32")), None)
    work = ctx.work_dir("bench")
    made = []
    if reference is None:
        ctx.log("  writing an f16 GGUF as the KL-divergence reference (not published, removed afterwards)")
        made = convert(o.model, ["f16"], work, adapter=o.adapter, allow_pickle=o.allow_pickle, template=o.template,
                       name=o.name, n_threads=o.n_threads, progress=o.progress)
        reference = made[0]
    try:
        quality = bench.quality(models, reference, n_threads=o.n_threads, progress=o.progress)
        speed = bench.speed(models, n_threads=o.n_threads, cuda=False, progress=o.progress)
    finally:
        for f in made:
            Path(f).unlink(missing_ok=True)
    files: dict[str, dict] = {}
    for r in quality.results:
        files.setdefault(Path(r.file.path).name, {}).update(
            ppl=r.ppl, ppl_unc=r.ppl_unc, kld_f16=r.kl.mean_kld if r.kl else None,
            same_top=r.kl.same_top if r.kl else None, ppl_tokens=r.tokens)
    threads = None
    for r in speed.results:
        threads = r.n_threads
        files.setdefault(Path(r.file.path).name, {}).update(tokens_per_s=r.tg.mean, tokens_per_s_sd=r.tg.sd,
                                                            prompt_tokens_per_s=r.pp.mean)
    env = speed.env or {}
    machine = (f"{env.get('cpu') or 'CPU'}, {threads} thread(s), llama.cpp (llama-cpp-python "
               f"{env.get('llama_cpp_python')}); tg128/pp512 as llama-bench; perplexity and KL over "
               f"{quality.tokens_total} tokens of {quality.corpus}")
    report = ctx.out / "bench.json"
    with atomic_file(report) as tmp:
        tmp.write_text(json.dumps({"quality": quality.to_dict(), "speed": speed.to_dict()}, ensure_ascii=False,
                                  indent=2, default=str) + "\n", encoding="utf-8")
    return StageOutput(files=[report], data={"machine": machine, "files": files,
                                             "reference": Path(reference).name, "corpus": quality.corpus})


# --- card --------------------------------------------------------------------------------------------------

def _card_inputs(ctx: StageContext) -> dict:
    o = ctx.options
    return {"gguf": ctx.data("gguf"), "gguf_files": _outputs_of(ctx, "gguf"), "verify": ctx.data("verify"),
            "bench": ctx.data("bench"), "gptq": ctx.data("gptq") if ctx.done("gptq") else None,
            "gptq_files": _outputs_of(ctx, "gptq") if ctx.done("gptq") else None, "repos": [o.gguf_repo, o.gptq_repo],
            "base_model": o.base_model, "license": o.license, "model": _model_inputs(ctx),
            "card_tools": {t: tool_version(t) for t in ("huggingface_hub", "gguf", "llama_cpp_python")}}


def _sources(ctx: StageContext) -> list:
    from .card import Source
    from .gguf import _revision

    r, o = ctx.resolved, ctx.options
    sources = []
    model_on_hub = _revision(r.path) is not None
    sources.append(Source("base" if r.adapter is not None else "model",
                          r.source if model_on_hub else Path(r.path).name, _revision(r.path), model_on_hub))
    if r.adapter is not None:
        adapter_id = o.adapter or (r.zoo.adapter if r.zoo else None)
        on_hub = _revision(r.adapter) is not None
        sources.append(Source("adapter", adapter_id if on_hub else Path(r.adapter).name, _revision(r.adapter),
                              on_hub))
    return sources


def _license(ctx: StageContext) -> tuple[str, str | None, str | None]:
    from .card import HUB_URL

    r, o = ctx.resolved, ctx.options
    if o.license:
        return o.license, None, None
    if r.zoo is not None:
        if r.zoo.license == "other":
            slug = re.sub(r"[^a-z0-9.-]+", "-", r.zoo.base.split("/")[-1].lower()) + "-license"
            return "other", slug, f"{HUB_URL}/{r.zoo.base}"
        return r.zoo.license, None, None
    readme = Path(r.path) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            lic = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data.license
        except Exception:
            lic = None
        if isinstance(lic, str):
            return lic, None, None
    return "unknown", None, None


def _base_model(ctx: StageContext) -> str | None:
    r, o = ctx.resolved, ctx.options
    if o.base_model:
        return o.base_model
    if r.zoo is not None:
        return r.zoo.merged
    if not Path(o.model).expanduser().exists():
        return o.model  # a Hub id
    return None


def _card_run(ctx: StageContext) -> StageOutput:
    from .atomic import atomic_file
    from .card import CardRow, CardSpec, render_card

    o = ctx.options
    lic, lic_name, lic_link = _license(ctx)
    base = _base_model(ctx)
    if base is None:
        ctx.log("  note: MODEL is a local folder: pass --base-model ORG/NAME so that the cards link the original")
    arch = ctx.architecture.replace("ForCausalLM", "")
    tools = {"komt-edge": __version__, "llama-cpp-python": tool_version("llama_cpp_python"),
             "llama.cpp": _llama_cpp_commit(), "gguf-py": tool_version("gguf")}
    verify_data = ctx.data("verify").get("files", {})
    bench = ctx.data("bench")
    bench_files = bench.get("files", {}) if isinstance(bench.get("files"), dict) else {}
    rows, files = [], {}
    for m in ctx.data("gguf").get("models", []):
        first = m["files"][0]
        v, b = verify_data.get(first, {}), bench_files.get(first, {})
        rows.append(CardRow(m["quant"], m["files"], m["size"], m.get("bits_per_weight"), ppl=b.get("ppl"),
                            kld_f16=b.get("kld_f16"), tokens_per_s=b.get("tokens_per_s"), kl_ref=v.get("mean_kl"),
                            top1=v.get("top1"), verified=v.get("passed")))
    for key, meta in (ctx.results["gguf"].get("outputs") or {}).items():
        files[Path(key).name] = (meta["size"], meta["sha256"])
    tokens = next((v.get("tokens") for v in verify_data.values()), None)
    common = dict(model_name=o.name, family=ctx.family, base_model=base, license=lic, license_name=lic_name,
                  license_link=lic_link, sources=_sources(ctx), architecture=arch,
                  size_label=(ctx.data("gguf").get("models") or [{}])[0].get("size_label"))
    written = []
    gguf_spec = CardSpec(kind="gguf", repo_id=o.gguf_repo, rows=rows, files=files,
                         tools={k: v for k, v in tools.items() if v}, bench_machine=bench.get("machine"),
                         verify_tokens=tokens, **common)
    readme = ctx.gguf_dir / "README.md"
    with atomic_file(readme) as tmp:
        tmp.write_text(render_card(gguf_spec), encoding="utf-8")
    written.append(readme)
    if ctx.done("gptq"):
        g = ctx.data("gptq")
        gfiles = {}
        for key, meta in (ctx.results["gptq"].get("outputs") or {}).items():
            p = Path(key)
            if (ctx.out / p).resolve().is_relative_to(ctx.gptq_dir.resolve()) and p.name != "README.md":
                gfiles[(ctx.out / p).resolve().relative_to(ctx.gptq_dir.resolve()).as_posix()] = (meta["size"],
                                                                                                   meta["sha256"])
        row = CardRow(g.get("quant") or f"GPTQ-{g.get('bits', 4)}bit", sorted(gfiles),
                      sum(size for size, _ in gfiles.values()), g.get("bits_per_weight"), ppl=g.get("ppl"),
                      ppl_reference=g.get("ppl_reference"), tokens_per_s=g.get("tokens_per_s"),
                      kl_ref=g.get("kl_ref"), top1=g.get("top1"), verified=True)
        gtools = {"komt-edge": __version__, **(ctx.results["gptq"].get("tools") or {})}
        gptq_spec = CardSpec(kind="gptq", repo_id=o.gptq_repo, rows=[row], files=gfiles,
                             tools={k: v for k, v in gtools.items() if v}, gptq=g, bench_machine=g.get("machine"),
                             **common)
        readme = ctx.gptq_dir / "README.md"
        with atomic_file(readme) as tmp:
            tmp.write_text(render_card(gptq_spec), encoding="utf-8")
        written.append(readme)
    return StageOutput(files=written)


# --- push --------------------------------------------------------------------------------------------------

def _repo_folders(ctx: StageContext) -> list[tuple[str, Path, str]]:
    """(repo id, folder, stage that fills it) for each repo this release publishes."""
    repos = [(ctx.options.gguf_repo, ctx.gguf_dir, "gguf")]
    if ctx.done("gptq"):
        repos.append((ctx.options.gptq_repo, ctx.gptq_dir, "gptq"))
    return repos


def _push_skip(ctx: StageContext) -> str | None:
    return None if ctx.options.push else "disabled (--no-push)"


def _push_run(ctx: StageContext) -> StageOutput:
    from .push import push

    o = ctx.options
    results = {}
    known = {}
    for stage in ("gguf", "gptq", "card"):
        for key, meta in (ctx.results.get(stage, {}).get("outputs") or {}).items():
            known[(ctx.out / key).resolve()] = meta["sha256"]
    for repo_id, folder, _ in _repo_folders(ctx):
        sha256s = {p.resolve().relative_to(folder.resolve()).as_posix(): sha
                   for p, sha in known.items() if p.is_relative_to(folder.resolve())}
        result = push(folder, repo_id, private=o.private, force=o.force, sha256s=sha256s, max_file_size=o.max_file_size,
                      commit_message=f"komt-edge {__version__}: release {o.name}", retries=o.retries,
                      backoff=o.backoff, log=ctx.log)
        ctx.log("  " + result.summary())
        results[repo_id] = result.to_dict()
    return StageOutput(data={"repos": results})


# --- the pipeline ------------------------------------------------------------------------------------------

STAGES: tuple[Stage, ...] = (
    Stage("merge", run=_merge_run, inputs=_model_inputs, skip=_merge_skip, tools=("komt-edge", "torch")),
    Stage("gguf", run=_gguf_run, inputs=_gguf_inputs, tools=("komt-edge", "gguf", "llama_cpp_python", "torch")),
    Stage("gptq", run=_gptq_run, requires=("komt_edge.gptq", "gptqmodel"), inputs=_gptq_inputs, skip=_gptq_skip,
          tools=("komt-edge", "gptqmodel", "transformers", "torch")),
    Stage("verify", run=_verify_run, inputs=_verify_inputs,
          tools=("komt-edge", "llama_cpp_python", "transformers", "torch", "peft")),
    Stage("bench", run=_bench_run, requires=("komt_edge.bench",), inputs=_bench_inputs, skip=_bench_skip,
          tools=("komt-edge", "llama_cpp_python")),
    Stage("card", run=_card_run, inputs=_card_inputs, tools=("komt-edge", "huggingface_hub")),
    Stage("push", run=_push_run, skip=_push_skip, always=True, tools=("komt-edge", "huggingface_hub")),
)


@dataclass
class ReleaseResult:
    options: ReleaseOptions
    manifest: Path
    stages: dict[str, str]  # stage → "ran", "up to date", "skipped: …", "would run", …
    repos: dict[str, dict] = field(default_factory=dict)
    dry_run: bool = False

    def summary(self) -> str:
        o = self.options
        lines = [("dry run: " if self.dry_run else "") + f"release of {o.name} in {o.out}"]
        lines += [f"  {name:<7} {status}" for name, status in self.stages.items()]
        for repo, r in self.repos.items():
            if r.get("dry_run"):
                continue
            lines.append(f"  {repo}: {len(r.get('uploaded') or [])} file(s) uploaded, "
                         f"{len(r.get('unchanged') or [])} unchanged" + (f", commit {r['commit'][:10]}"
                                                                         if r.get("commit") else ""))
        if not self.dry_run:
            lines.append(f"  manifest: {self.manifest}")
        return "\n".join(lines)


def model_name(model: str, name: str | None = None) -> str:
    """The release name: --name, else the zoo name, the Hub repo's name or the folder's name."""
    from .zoo import lookup

    if name:
        raw = name
    elif Path(model).expanduser().is_dir():
        raw = Path(model).expanduser().resolve().name
    elif lookup(model) is not None:
        raw = lookup(model).name
    else:
        raw = model.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "model"


def make_options(model: str, org: str, *, quants: Sequence[str] = DEFAULT_RELEASE_QUANTS, gptq: bool = True,
                 out: str | Path | None = None, name: str | None = None, gguf_repo: str | None = None,
                 gptq_repo: str | None = None, **kwargs) -> ReleaseOptions:
    from .converters import quantize as q
    from .push import check_repo_id

    if not re.match(r"^[A-Za-z0-9][\w.-]*$", org or ""):
        raise KomtError(f"--org {org!r} is not a Hub user or organization name")
    spec = [t for item in quants for t in str(item).replace(",", " ").split()]
    try:
        types = tuple(dict.fromkeys(q.normalize(t) for t in spec))
    except ValueError as err:
        raise KomtError(str(err)) from None
    if not types:
        raise KomtError('no quantization types: pass --quants "q4_0 q8_0"')
    release_name = model_name(model, name)
    gguf_repo = check_repo_id(gguf_repo or f"{org}/{release_name}-GGUF")
    gptq_repo = check_repo_id(gptq_repo or f"{org}/{release_name}-GPTQ")
    if gguf_repo.split("/")[1] == gptq_repo.split("/")[1]:
        raise KomtError("the GGUF and GPTQ repos need different names")
    out = Path(out) if out else Path("dist") / "release" / release_name
    return ReleaseOptions(model=model, org=org, quants=types, gptq=gptq, name=release_name, out=out,
                          gguf_repo=gguf_repo, gptq_repo=gptq_repo, **kwargs)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One release per output folder at a time; a lock left by a killed process is taken over."""
    lock = out / ".release.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and pid_alive(pid):
                raise KomtError(f"another release (pid {pid}) is running in {out}: wait for it, or use another -o")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise KomtError(f"could not lock {out}: remove {lock} if no release is running")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _preflight_hub(options: ReleaseOptions, log: Callable[[str], None]) -> None:
    """Token, write access and foreign files, before any work (and before any download)."""
    from .push import Hub, hub_token, probe, unreachable_message

    token = hub_token(required=True)
    hub = Hub(token, retries=options.retries, backoff=options.backoff, log=log)
    unreachable = probe(hub.endpoint)
    if unreachable:
        raise KomtError(unreachable_message(hub.endpoint, unreachable))
    gptq_stage = next(s for s in STAGES if s.name == "gptq")
    repos = [options.gguf_repo] + ([options.gptq_repo] if options.gptq and gptq_stage.missing() is None else [])
    checked = set()
    for repo_id in repos:
        try:
            namespace = repo_id.split("/")[0]
            if namespace not in checked:
                user = hub.check_write_access(namespace)
                checked.add(namespace)
                log(f"Hub: {hub.endpoint}, token of {user}, write access to {namespace}")
            remote = hub.remote_state(repo_id, "main")
        except KomtError:
            raise
        except Exception as err:
            raise hub.explain(err, repo_id) from None
        others = [p for p in remote.files if p != ".gitattributes"]
        if remote.exists and others and not remote.made_by_komt and not options.force:
            shown = ", ".join(sorted(others)[:5])
            raise KomtError(f"{repo_id} already exists with files komt-edge did not make ({shown}): pass --force to "
                            "release into it anyway (its files are kept), or choose another repo name")


def release(model: str, org: str, *, quants: Sequence[str] = DEFAULT_RELEASE_QUANTS, gptq: bool = True,
            dry_run: bool = False, out: str | Path | None = None, adapter: str | None = None,
            template: str | None = None, name: str | None = None, base_model: str | None = None,
            license: str | None = None, gguf_repo: str | None = None, gptq_repo: str | None = None,
            private: bool = False, force: bool = False, push: bool = True, allow_pickle: bool = False,
            n_threads: int | None = None, max_file_size: int = HUB_MAX_FILE_SIZE, max_kl: float | None = None,
            bench: bool = True, keep_merged: bool = False, retries: int = DEFAULT_RETRIES,
            backoff: float = DEFAULT_BACKOFF, progress: bool = True,
            log: Callable[[str], None] = print) -> ReleaseResult:
    """Build, verify, measure and publish MODEL's GGUF (and GPTQ) repos under ORG; see the module docstring."""
    from .verify import BoundOverrides

    if template not in (None, "llama", "mistral"):
        raise KomtError(f"--template {template!r}: choose llama or mistral")
    BoundOverrides(mean_kl=max_kl)  # a bound no file could meet fails now, not after the conversion
    options = make_options(model, org, quants=quants, gptq=gptq, out=out, name=name, gguf_repo=gguf_repo,
                           gptq_repo=gptq_repo, adapter=adapter, template=template, base_model=base_model,
                           license=license, private=private, force=force, push=push, allow_pickle=allow_pickle,
                           n_threads=n_threads, max_file_size=max_file_size, max_kl=max_kl, bench=bench,
                           keep_merged=keep_merged, retries=retries,
                           backoff=backoff, progress=progress)
    if dry_run:
        return _dry_run(options, log)
    from .atomic import check_dir_target, ensure_writable_dir
    from .zoo import resolve

    # OUT is this release's, reused by re-runs (its manifest says so); a folder holding other files needs --force.
    check_dir_target(options.out, force=force, owned_if=(MANIFEST_NAME,))
    if push:
        _preflight_hub(options, log)

    ensure_writable_dir(options.out)
    with _lock(options.out):
        manifest = Manifest(options.out)
        manifest.data["release"] = {"model": model, "org": org, "name": options.name,
                                    "repos": [options.gguf_repo, options.gptq_repo]}
        manifest.data.setdefault("created", _now())
        ctx = StageContext(options, manifest, log)
        ctx.resolved = resolve(model, adapter=adapter, allow_pickle=allow_pickle)
        statuses = _run_stages(ctx)
        repos = ctx.data("push").get("repos", {}) if ctx.done("push") else {}
        return ReleaseResult(options, manifest.path, statuses, repos)


def _run_stages(ctx: StageContext) -> dict[str, str]:
    manifest, log = ctx.manifest, ctx.log
    statuses: dict[str, str] = {}
    total = len(STAGES)
    for i, stage in enumerate(STAGES, 1):
        tag = f"[{i}/{total} {stage.name}]"
        reason = stage.skip(ctx) or stage.missing()
        if reason is not None:
            manifest.stages[stage.name] = {"status": "skipped", "reason": reason, "finished": _now()}
            ctx.results[stage.name] = manifest.stages[stage.name]
            manifest.save()
            statuses[stage.name] = f"skipped: {reason}"
            log(f"{tag} skipped: {reason}")
            continue
        inputs = dict(stage.inputs(ctx))
        tools = {t: tool_version(t) for t in stage.tools}
        digest = _digest({"inputs": inputs, "tools": tools})
        previous = manifest.stages.get(stage.name) or {}
        if (not stage.always and previous.get("status") == "done" and previous.get("input_digest") == digest
                and manifest.outputs_intact(previous)):
            ctx.results[stage.name] = previous
            statuses[stage.name] = "up to date"
            log(f"{tag} up to date (inputs unchanged since {previous.get('finished', '?')}): skipped")
            continue
        log(f"{tag} running")
        record = {"status": "running", "started": _now(), "inputs": inputs, "input_digest": digest, "tools": tools}
        manifest.stages[stage.name] = record
        manifest.save()
        started = time.monotonic()
        try:
            output = stage.run(ctx)
        except KeyboardInterrupt:
            record.update(status="interrupted", finished=_now())
            manifest.save()
            raise
        except BaseException as err:
            record.update(status="failed", finished=_now(), error=str(err) if isinstance(err, KomtError)
                          else type(err).__name__)
            manifest.save()
            raise
        record.update(outputs=manifest.record_files(output.files), data=output.data,
                      tools={**tools, **output.tools}, finished=_now(),
                      seconds=round(time.monotonic() - started, 2),
                      status="done" if output.passed else "failed")
        if not output.passed:
            record["error"] = output.message
        ctx.results[stage.name] = record
        manifest.save()
        if not output.passed:
            raise KomtError(f"{stage.name}: {output.message or 'verification failed'}; the release stopped before "
                            "anything was pushed")
        statuses[stage.name] = f"done in {record['seconds']:.1f} s"
        log(f"{tag} done in {record['seconds']:.1f} s")
    return statuses


def _dry_run(options: ReleaseOptions, log: Callable[[str], None]) -> ReleaseResult:
    """What a real run would do: stages to run or skip, repos to create, files to upload. Writes nothing."""
    from .converters import quantize as q
    from .gguf import output_name
    from .push import hub_token, push

    manifest = Manifest(options.out) if (options.out / MANIFEST_NAME).is_file() else None
    statuses = {}
    for stage in STAGES:
        reason = None
        if stage.name == "push" and not options.push:
            reason = "disabled (--no-push)"
        elif stage.name == "gptq" and not options.gptq:
            reason = "disabled (--no-gptq)"
        elif stage.name == "bench" and not options.bench:
            reason = "disabled (--no-bench)"
        elif stage.name == "merge":
            reason = None if options.keep_merged else "not needed (--keep-merged writes it)"
        else:
            reason = stage.missing()
        record = (manifest.stages.get(stage.name) if manifest else None) or {}
        if reason:
            statuses[stage.name] = f"would skip: {reason}"
        elif stage.always:
            statuses[stage.name] = "would run (sends only what the Hub lacks)"
        elif record.get("status") == "done":
            statuses[stage.name] = "done earlier: skipped if its inputs are unchanged"
        else:
            statuses[stage.name] = "would run"
    repos = {}
    token = hub_token(required=False)
    if options.push:
        if token is None:
            log("no Hub token (HF_TOKEN or `hf auth login`): a real run would stop before any work")
        folder = options.out / options.gguf_repo.split("/")[1]
        if folder.is_dir() and any(folder.iterdir()):
            result = push(folder, options.gguf_repo, private=options.private, dry_run=True, log=log,
                          retries=options.retries, backoff=options.backoff)
            log(result.plan.describe())
            repos[options.gguf_repo] = result.to_dict()
        else:
            files = [output_name(options.name, t) for t in options.quants]
            log(f"{options.gguf_repo}: would publish {', '.join(files)} and README.md "
                "(shards instead of any file over the per-file limit)")
        if options.gptq and next(s for s in STAGES if s.name == "gptq").missing() is None:
            gfolder = options.out / options.gptq_repo.split("/")[1]
            if gfolder.is_dir() and any(gfolder.iterdir()):
                result = push(gfolder, options.gptq_repo, private=options.private, dry_run=True, log=log,
                              retries=options.retries, backoff=options.backoff)
                log(result.plan.describe())
                repos[options.gptq_repo] = result.to_dict()
            else:
                log(f"{options.gptq_repo}: would publish the GPTQ checkpoint and README.md")
    log(f"quantization types: {', '.join(q.display_name(t) for t in options.quants)}; output folder {options.out}")
    return ReleaseResult(options, options.out / MANIFEST_NAME, statuses, repos, dry_run=True)
