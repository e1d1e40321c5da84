"""`komt-edge release MODEL --org ORG`: build, verify, measure and publish a komt model's GGUF (and GPTQ) repos.

This module is the release's options, its context and its stage list; each stage calls its stage module:

    merge → gguf → gptq → verify → lora → bench → card → push

- **merge** (``komt_edge.merge``) writes the merged full-precision checkpoint to ``OUT/merged``, only with
  ``keep_merged``: the gguf and gptq stages merge the LoRA adapter themselves.
- **gguf** (``komt_edge.gguf.convert``) converts to every ``--quants`` type in one read and splits a file over
  the Hub's per-file limit into gguf-split shards (``komt_edge.converters.gguf_file.split_gguf``) that llama.cpp
  loads from the first shard.
- **lora** (``komt_edge.gguf_lora``) writes the LoRA adapter as llama.cpp's adapter GGUF (f16) into the GGUF repo,
  for users who apply it at run time on a GGUF of the base, and verifies it so (``verify_files(..., lora=)``, on an
  f16 GGUF of the base written for the purpose); on by default when the model has an adapter.
- **gptq** (optional: ``komt_edge.gptq`` + ``gptqmodel``) quantizes to 4-bit GPTQ with Korean calibration and
  checks the result; ``komt_edge.gptq.acceptance_failure`` decides whether it may be published.
- **verify** (``komt_edge.verify.verify_files``) checks every GGUF file against the original model; a failure
  stops the release before anything is pushed.
- **bench** (optional: ``komt_edge.bench``) measures Korean perplexity, KL divergence against an f16 GGUF
  (written for the purpose when the release has none, then removed) and tokens/s for the cards' file tables.
- **card** (``komt_edge.card.release_cards``) writes README.md for each repo; **push** (``komt_edge.push``)
  publishes each repo folder, sending only what the Hub does not have.

Resumable (``komt_edge.pipeline``): ``release-manifest.json`` in the output folder records each stage's inputs,
outputs and data; a re-run skips a stage whose inputs are unchanged and whose outputs are intact. Push always
runs: it is idempotent against the Hub. Before any work, ``komt_edge.push.preflight`` checks the Hub token, write
access and that the target repos hold only komt-edge's files (unless ``force``).

An optional stage lists the modules it needs (``Stage.requires``): while one is missing the stage is recorded as
skipped. Optional and torch-loading stage modules are imported only when their stage runs (the CLI imports this
module for its defaults).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .atomic import atomic_file, check_dir_target, ensure_writable_dir, remove_stale_partials
from .card import ModelOrigin, ReleaseData, release_cards, render_card
from .converters.gguf_file import model_info, split_gguf, split_leftovers
from .errors import KomtError
from .imatrix import KOREAN, Imatrix
from .pipeline import Context, Manifest, Stage, StageOutput, folder_lock, now, plan_stages, run_stages
from .push import (DEFAULT_BACKOFF, DEFAULT_RETRIES, HUB_MAX_FILE_SIZE, check_repo_id, hub_token, preflight,
                   push as push_folder)
from .templates import template_option_error
from .util import dist_version, fmt_size
from .verify import BoundOverrides, verify_files
from .zoo import ResolvedModel, lookup, model_family, resolve, snapshot_revision

MANIFEST_NAME = "release-manifest.json"
DEFAULT_RELEASE_QUANTS = ("q4_0", "q4_K_M", "q5_K_M", "q8_0")


# --- options and context -----------------------------------------------------------------------------------

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
    imatrix: str | None = KOREAN  # for the k-quant and IQ types: "korean", an imatrix file, or None
    lora: bool | None = None  # the adapter as a LoRA GGUF: None = when the model has an adapter
    plans: tuple = ()  # the GGUF files' QuantPlans (converters.plan), in the order of quants; made by make_options


@dataclass(kw_only=True)
class StageContext(Context):
    """What a release stage sees: the options, the resolved model, its folders, and earlier stages' records."""

    options: ReleaseOptions
    resolved: ResolvedModel | None = None  # None in a dry run, which downloads nothing

    @property
    def out(self) -> Path:
        return self.options.out

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
    def adapter_id(self) -> str | None:
        """The LoRA adapter as given (``--adapter``), else the zoo model's."""
        zoo = self.resolved.zoo
        return self.options.adapter or (zoo.adapter if zoo else None)

    @property
    def family(self) -> str:
        return model_family(self.resolved, self.options.template)

    @property
    def gguf_models(self) -> list[Path]:
        """One path per GGUF model: the file, or the first shard of a split file."""
        return [self.gguf_dir / m["files"][0] for m in self.data("gguf").get("models", [])]

    @property
    def gguf_plans(self) -> list:
        """The QuantPlan each of ``gguf_models`` was made with (None for a model this run did not plan)."""
        plans = {p.name: p for p in self.options.plans}
        return [plans.get(m["quant"]) for m in self.data("gguf").get("models", [])]

    def repo_files(self, folder: Path, stages: Sequence[str]) -> dict[str, dict]:
        """The recorded outputs of ``stages`` inside ``folder``: path in the repo → {"sha256", "size"}."""
        root = folder.resolve()
        files = {}
        for stage in stages:
            for key, meta in self.outputs(stage).items():
                path = self.manifest.path_of(key).resolve()
                if path.is_relative_to(root):
                    files[path.relative_to(root).as_posix()] = meta
        return files

    def work_dir(self, stage: str) -> Path:
        path = self.out / "work" / stage
        path.mkdir(parents=True, exist_ok=True)
        return path


def _source_fingerprint(manifest: Manifest, path: Path | None, source: str | None) -> dict | None:
    """A Hub snapshot by repo and revision; a local folder by the sha256 of its files."""
    if path is None:
        return None
    revision = snapshot_revision(path)
    if revision is not None:
        return {"repo": source, "revision": revision}
    files = {}
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and not f.name.startswith("."):
            files[f.name] = manifest.sha256(f)
    return {"folder": Path(path).name, "files": files}


def _model_inputs(ctx: StageContext) -> dict:
    r = ctx.resolved
    return {"model": _source_fingerprint(ctx.manifest, r.path, r.source),
            "adapter": _source_fingerprint(ctx.manifest, r.adapter, ctx.adapter_id)}


def _llama_cpp_commit() -> str | None:
    vendor = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp.md"
    if vendor.is_file():
        m = re.search(r"llama\.cpp[^\n]*?\b([0-9a-f]{7,40})\b", vendor.read_text(encoding="utf-8"))
        if m:
            return m.group(1)
    return None


# --- merge -------------------------------------------------------------------------------------------------

def _merge_skip(ctx: StageContext) -> str | None:
    if ctx.resolved is not None and ctx.resolved.adapter is None:  # a dry run does not know yet
        return "the model has no adapter"
    if not ctx.options.keep_merged:
        return "not needed: gguf and gptq merge the adapter on the fly (--keep-merged writes it to OUT/merged)"
    return None


def _merge_run(ctx: StageContext) -> StageOutput:
    from .merge import merge

    merge(ctx.resolved.path, ctx.resolved.adapter, ctx.merged_dir, allow_pickle=ctx.options.allow_pickle)
    return StageOutput(files=[p for p in sorted(ctx.merged_dir.iterdir()) if p.is_file()])


# --- gguf --------------------------------------------------------------------------------------------------

def _gguf_inputs(ctx: StageContext) -> dict:
    o = ctx.options
    imatrix = o.imatrix if o.imatrix in (None, KOREAN) else {"file": ctx.manifest.sha256(Path(o.imatrix))}
    custom = {p.name: p.to_dict() for p in o.plans if not p.is_plain_mix}  # what a plan's name does not say
    return {**_model_inputs(ctx), "quants": list(o.quants), "template": o.template, "name": o.name,
            "max_file_size": o.max_file_size, **({"imatrix": imatrix} if _imatrix_plans(o) else {}),
            **({"plans": custom} if custom else {})}


def _imatrix_plans(o: ReleaseOptions) -> list:
    """The plans quantized with the importance matrix (the planner's rule for a release: the k-quant and IQ mixes,
    unless --imatrix none)."""
    return [p for p in o.plans if p.imatrix is not None]


def _gguf_record(files: Sequence[Path]) -> dict:
    """What the manifest and the cards keep of a GGUF model (one file or its shards)."""
    info = model_info(files)
    return {"file_type": None if info.file_type == "UNKNOWN" else info.file_type, "size": info.size_bytes,
            "size_label": info.size_label, "bits_per_weight": round(info.bpw, 3) if info.n_params else None}


def _gguf_run(ctx: StageContext) -> StageOutput:
    from .gguf import convert

    o = ctx.options
    gguf_dir = ctx.gguf_dir
    gguf_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(gguf_dir)  # leftovers of an interrupted write
    for leftover in split_leftovers(gguf_dir):
        shutil.rmtree(leftover, ignore_errors=True)
    with_imatrix = _imatrix_plans(o)
    # one read of the checkpoint: the plans without the imatrix, and the float source of those with it
    paths = convert(o.model, o.plans, gguf_dir, adapter=o.adapter, allow_pickle=o.allow_pickle, template=o.template,
                    name=o.name, n_threads=o.n_threads, progress=o.progress)
    models, files = [], []
    imatrix_data = _published_imatrix(o, gguf_dir, with_imatrix) if with_imatrix else None
    for plan, path in zip(o.plans, paths):
        shards = [path]
        if path.stat().st_size > o.max_file_size:
            ctx.log(f"  {path.name} is {fmt_size(path.stat().st_size)}, over the per-file limit of "
                    f"{fmt_size(o.max_file_size)}: splitting it (gguf-split)")
            shards = split_gguf(path, o.max_file_size)
        models.append({"quant": plan.name, "files": [s.name for s in shards], **_gguf_record(shards),
                       **({} if plan.is_plain_mix else {"plan": plan.to_dict()})})
        files += shards
    if imatrix_data:
        files.append(gguf_dir / imatrix_data["file"])
    keep = {f.name for f in files}
    for stale in gguf_dir.glob("*.gguf"):  # files of quant types this release no longer has
        if stale.name not in keep:
            stale.unlink()
    commit = _llama_cpp_commit()
    data = {"models": models, **({"imatrix": imatrix_data} if imatrix_data else {})}
    return StageOutput(files=files, data=data, tools={"llama.cpp": commit} if commit else {})


def _published_imatrix(o: ReleaseOptions, gguf_dir: Path, plans: list) -> dict:
    """The importance matrix the k-quant and IQ files were made with, as a file of the GGUF repo."""
    from .imatrix import imatrix_name

    path = gguf_dir / imatrix_name(o.name)
    if o.imatrix != KOREAN:
        shutil.copyfile(o.imatrix, path)
    m = Imatrix.read(path)
    return {"file": path.name, "dataset": m.datasets[0] if m.datasets else "unknown text", "chunks": m.chunk_count,
            "chunk_size": m.chunk_size, "types": [p.name for p in plans]}


# --- gptq (optional) ---------------------------------------------------------------------------------------

# --- lora ----------------------------------------------------------------------------------------------------

LORA_OUTTYPE = "f16"


def _lora_skip(ctx: StageContext) -> str | None:
    if ctx.options.lora is False:
        return "disabled (--no-lora)"
    if ctx.resolved is not None and ctx.resolved.adapter is None:  # a dry run does not know yet
        return "the model has no adapter"
    return None


def _lora_inputs(ctx: StageContext) -> dict:
    return {**_model_inputs(ctx), "name": ctx.options.name, "outtype": LORA_OUTTYPE}


def _lora_run(ctx: StageContext) -> StageOutput:
    """The adapter GGUF, verified as users run it (:func:`komt_edge.gguf_lora.verify_on_base`)."""
    from .gguf_lora import gguf_lora, verify_on_base

    o, r = ctx.options, ctx.resolved
    on_hub = not Path(r.source).expanduser().exists()
    base = r.source if on_hub else str(r.path)  # a Hub id is named in the file
    result = gguf_lora(r.adapter, ctx.gguf_dir, base=base, outtype=LORA_OUTTYPE, name=o.name, force=o.force,
                       allow_pickle=o.allow_pickle, progress=o.progress, log=ctx.log)
    ctx.log("  " + result.summary().splitlines()[0])
    check = verify_on_base(result.path, r.path, r.adapter, ctx.work_dir("lora"), template=ctx.family, name=o.name,
                           max_kl=o.max_kl, allow_pickle=o.allow_pickle, n_threads=o.n_threads, progress=o.progress,
                           log=lambda text: ctx.log("\n".join("  " + x for x in text.splitlines())))
    message = "" if check.passed else f"verification failed for {result.path.name} applied to an f16 GGUF of the base"
    return StageOutput(files=[result.path], passed=check.passed, message=message,
                       data={"file": result.path.name, "size": result.bytes, "outtype": result.outtype,
                             "alpha": result.alpha, "ranks": result.ranks,
                             "base": r.source if on_hub else (o.base_model or r.path.name),
                             "verify": check.to_dict()})


def _gptq_skip(ctx: StageContext) -> str | None:
    return None if ctx.options.gptq else "disabled (--no-gptq)"


def _gptq_inputs(ctx: StageContext) -> dict:
    from .gptq import DEFAULT_BITS, DEFAULT_GROUP_SIZE

    return {**_model_inputs(ctx), "name": ctx.options.name, "bits": DEFAULT_BITS, "group_size": DEFAULT_GROUP_SIZE,
            "calibration": "korean"}


def _gptq_run(ctx: StageContext) -> StageOutput:
    from .gptq import acceptance_failure, gptq

    o = ctx.options
    work = ctx.work_dir("gptq")
    for old in work.iterdir():
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    # max_ppl_ratio=None: gptq() reports and the stage applies the same rule below, keeping the numbers of a
    # rejected checkpoint in the manifest (a checkpoint that does not reload is still refused by gptq() itself).
    result = gptq(o.model, work, adapter=o.adapter, name=o.name, allow_pickle=o.allow_pickle, check=True,
                  max_ppl_ratio=None, progress=o.progress)
    target = ctx.gptq_dir
    if target.exists():
        shutil.rmtree(target)
    os.replace(result.path, target)
    failure = acceptance_failure(result.check)
    data = result.record()
    try:
        summary = result.summary()
    except Exception:  # the summary is informative only
        summary = str(result.path)
    for line in summary.splitlines():
        ctx.log("  " + line)
    files = [p for p in sorted(target.rglob("*")) if p.is_file() and p.name != "README.md"]
    return StageOutput(files=files, data=data, passed=failure is None,
                       message=f"GPTQ check failed: {failure}" if failure else "",
                       tools={d: v for d in ("gptqmodel", "optimum") if (v := dist_version(d))})


# --- verify ------------------------------------------------------------------------------------------------

def _verify_inputs(ctx: StageContext) -> dict:
    return {"files": ctx.output_hashes("gguf"), **_model_inputs(ctx), "template": ctx.options.template,
            "max_kl": ctx.options.max_kl}


def _verify_run(ctx: StageContext) -> StageOutput:
    o = ctx.options
    report_path = ctx.out / "verify.json"
    run = verify_files(ctx.gguf_models, o.model, adapter=o.adapter, allow_pickle=o.allow_pickle, template=o.template,
                       n_threads=o.n_threads, overrides=BoundOverrides(mean_kl=o.max_kl), json_out=report_path,
                       progress=o.progress, plans=ctx.gguf_plans,
                       log=lambda text: ctx.log("\n".join("  " + line for line in text.splitlines())))
    data = {}
    for report in run.reports:
        t, lg = report.tokenizer, report.logits
        data[Path(report.file).name] = {"file_type": report.file_type, "passed": report.passed,
                                        "tokenizer": f"{t.probes - len(t.mismatches)}/{t.probes}",
                                        "tokens": lg.tokens, "mean_kl": lg.mean_kl, "max_kl": lg.max_kl,
                                        "top1": lg.top1, "max_abs": lg.max_abs,
                                        "template_ok": report.generation.template_ok}
    message = "" if run.passed else f"verification failed for {', '.join(run.failed)} (see {report_path})"
    return StageOutput(files=[report_path], data={"files": data}, passed=run.passed, message=message)


# --- bench (optional) --------------------------------------------------------------------------------------

def _bench_skip(ctx: StageContext) -> str | None:
    return None if ctx.options.bench else "disabled (--no-bench)"


def _bench_inputs(ctx: StageContext) -> dict:
    return {"files": ctx.output_hashes("gguf"), "reference": "f16", "threads": ctx.options.n_threads}


def _bench_run(ctx: StageContext) -> StageOutput:
    from .bench import bench_all, pick_reference
    from .gguf import convert

    o = ctx.options
    models = ctx.gguf_models
    reference = pick_reference(models)
    made = []
    if reference is None:
        ctx.log("  writing an f16 GGUF as the KL-divergence reference (not published, removed afterwards)")
        made = convert(o.model, ["f16"], ctx.work_dir("bench"), adapter=o.adapter, allow_pickle=o.allow_pickle,
                       template=o.template, name=o.name, n_threads=o.n_threads, progress=o.progress)
        reference = made[0]
    try:
        result = bench_all(models, reference=reference, n_threads=[o.n_threads] if o.n_threads else None,
                           cuda=False, progress=o.progress)
    finally:
        for f in made:
            Path(f).unlink(missing_ok=True)
    report = ctx.out / "bench.json"
    with atomic_file(report) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2, default=str) + "\n",
                       encoding="utf-8")
    return StageOutput(files=[report], data={"machine": result.machine(), "files": result.rows(),
                                             "reference": Path(reference).name, "corpus": result.quality.corpus})


# --- card --------------------------------------------------------------------------------------------------

def _card_inputs(ctx: StageContext) -> dict:
    o = ctx.options
    return {"gguf": ctx.data("gguf"), "gguf_files": ctx.output_hashes("gguf"), "verify": ctx.data("verify"),
            "bench": ctx.data("bench"), "gptq": ctx.data("gptq") if ctx.done("gptq") else None,
            "gptq_files": ctx.output_hashes("gptq") if ctx.done("gptq") else None,
            "repos": [o.gguf_repo, o.gptq_repo], "base_model": o.base_model, "license": o.license,
            "lora": ctx.data("lora") if ctx.done("lora") else None,
            "model": _model_inputs(ctx),
            "card_tools": {t: dist_version(t) for t in ("huggingface_hub", "gguf", "llama_cpp_python")}}


def _card_run(ctx: StageContext) -> StageOutput:
    o, r = ctx.options, ctx.resolved
    origin = ModelOrigin(model=o.model, path=r.path, source=r.source, revision=snapshot_revision(r.path), zoo=r.zoo,
                         adapter=ctx.adapter_id, adapter_path=r.adapter, adapter_revision=snapshot_revision(r.adapter),
                         base_model=o.base_model, license=o.license)

    def sized(files: dict[str, dict]) -> dict[str, tuple[int, str]]:
        return {path: (meta["size"], meta["sha256"]) for path, meta in files.items()}

    gptq_done = ctx.done("gptq")
    data = ReleaseData(
        name=o.name, family=ctx.family, gguf_repo=o.gguf_repo, gguf_models=ctx.data("gguf").get("models", []),
        gguf_files=sized(ctx.repo_files(ctx.gguf_dir, ["gguf", "lora"])), verify=ctx.data("verify").get("files", {}),
        bench=ctx.data("bench"),
        tools={"komt-edge": __version__, "llama-cpp-python": dist_version("llama_cpp_python"),
               "llama.cpp": _llama_cpp_commit(), "gguf-py": dist_version("gguf")},
        gptq_repo=o.gptq_repo, gptq=ctx.data("gptq") if gptq_done else None,
        gptq_files=sized(ctx.repo_files(ctx.gptq_dir, ["gptq"])) if gptq_done else {},
        gptq_tools=(ctx.results["gptq"].get("tools") or {}) if gptq_done else {},
        imatrix=ctx.data("gguf").get("imatrix"), lora=ctx.data("lora") if ctx.done("lora") else None)
    cards = release_cards(origin, data)
    if cards[0].base_model is None:
        ctx.log("  note: MODEL is a local folder: pass --base-model ORG/NAME so that the cards link the original")
    written = []
    for spec in cards:
        readme = (ctx.gguf_dir if spec.kind == "gguf" else ctx.gptq_dir) / "README.md"
        with atomic_file(readme) as tmp:
            tmp.write_text(render_card(spec), encoding="utf-8")
        written.append(readme)
    return StageOutput(files=written)


# --- push --------------------------------------------------------------------------------------------------

def _push_skip(ctx: StageContext) -> str | None:
    return None if ctx.options.push else "disabled (--no-push)"


def _push_run(ctx: StageContext) -> StageOutput:
    o = ctx.options
    repos = [(o.gguf_repo, ctx.gguf_dir)] + ([(o.gptq_repo, ctx.gptq_dir)] if ctx.done("gptq") else [])
    results = {}
    for repo_id, folder in repos:
        known = ctx.repo_files(folder, ["gguf", "lora", "gptq", "card"])  # hashed already: not read again
        result = push_folder(folder, repo_id, private=o.private, force=o.force,
                             sha256s={path: meta["sha256"] for path, meta in known.items()},
                             max_file_size=o.max_file_size, commit_message=f"komt-edge {__version__}: release {o.name}",
                             retries=o.retries, backoff=o.backoff, log=ctx.log)
        ctx.log("  " + result.summary())
        results[repo_id] = result.to_dict()
    return StageOutput(data={"repos": results})


# --- the release -------------------------------------------------------------------------------------------

STAGES: tuple[Stage, ...] = (
    Stage("merge", run=_merge_run, inputs=_model_inputs, skip=_merge_skip, tools=("komt-edge", "torch")),
    Stage("gguf", run=_gguf_run, inputs=_gguf_inputs, tools=("komt-edge", "gguf", "llama_cpp_python", "torch")),
    Stage("gptq", run=_gptq_run, requires=("komt_edge.gptq", "gptqmodel"), inputs=_gptq_inputs, skip=_gptq_skip,
          tools=("komt-edge", "gptqmodel", "transformers", "torch")),
    Stage("verify", run=_verify_run, inputs=_verify_inputs,
          tools=("komt-edge", "llama_cpp_python", "transformers", "torch", "peft")),
    Stage("lora", run=_lora_run, inputs=_lora_inputs, skip=_lora_skip, tools=("komt-edge", "gguf", "torch")),
    Stage("bench", run=_bench_run, requires=("komt_edge.bench",), inputs=_bench_inputs, skip=_bench_skip,
          tools=("komt-edge", "llama_cpp_python")),
    Stage("card", run=_card_run, inputs=_card_inputs, tools=("komt-edge", "huggingface_hub")),
    Stage("push", run=_push_run, skip=_push_skip, always="sends only what the Hub lacks",
          tools=("komt-edge", "huggingface_hub")),
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

    def to_dict(self) -> dict:
        o = self.options
        return {"name": o.name, "model": o.model, "out": str(o.out), "manifest": str(self.manifest),
                "dry_run": self.dry_run, "quants": list(o.quants), "gguf_repo": o.gguf_repo,
                "gptq_repo": o.gptq_repo if o.gptq else None, "stages": self.stages, "repos": self.repos}


def model_name(model: str, name: str | None = None) -> str:
    """The release name: --name, else the zoo name, the Hub repo's name or the folder's name."""
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
    from .converters.plan import kquant_or_iq, plans_for

    if not re.match(r"^[A-Za-z0-9][\w.-]*$", org or ""):
        raise KomtError(f"--org {org!r} is not a Hub user or organization name")
    plans = tuple(plans_for(quants, imatrix=kwargs.get("imatrix", KOREAN), imatrix_for=kquant_or_iq))
    types = tuple(p.key for p in plans)
    release_name = model_name(model, name)
    gguf_repo = check_repo_id(gguf_repo or f"{org}/{release_name}-GGUF")
    gptq_repo = check_repo_id(gptq_repo or f"{org}/{release_name}-GPTQ")
    if gguf_repo.split("/")[1] == gptq_repo.split("/")[1]:
        raise KomtError("the GGUF and GPTQ repos need different names")
    out = Path(out) if out else Path("dist") / "release" / release_name
    return ReleaseOptions(model=model, org=org, quants=types, gptq=gptq, name=release_name, out=out,
                          gguf_repo=gguf_repo, gptq_repo=gptq_repo, plans=plans, **kwargs)


def _gptq_stage_available(options: ReleaseOptions) -> bool:
    """The release builds a GPTQ repo: asked for, and the gptq stage's modules are installed."""
    return options.gptq and next(s for s in STAGES if s.name == "gptq").missing() is None


def _preflight_hub(options: ReleaseOptions, log: Callable[[str], None]) -> None:
    """Token, write access and foreign files, before any work (and before any download)."""
    repos = [options.gguf_repo] + ([options.gptq_repo] if _gptq_stage_available(options) else [])
    preflight(repos, force=options.force, action="release", retries=options.retries, backoff=options.backoff,
              log=log, announce=True)


def release(model: str, org: str, *, quants: Sequence[str] = DEFAULT_RELEASE_QUANTS, gptq: bool = True,
            dry_run: bool = False, out: str | Path | None = None, adapter: str | None = None,
            template: str | None = None, name: str | None = None, base_model: str | None = None,
            license: str | None = None, gguf_repo: str | None = None, gptq_repo: str | None = None,
            private: bool = False, force: bool = False, push: bool = True, allow_pickle: bool = False,
            n_threads: int | None = None, max_file_size: int = HUB_MAX_FILE_SIZE, max_kl: float | None = None,
            bench: bool = True, keep_merged: bool = False, retries: int = DEFAULT_RETRIES,
            backoff: float = DEFAULT_BACKOFF, progress: bool = True, imatrix: str | None = KOREAN,
            lora: bool | None = None, log: Callable[[str], None] = print) -> ReleaseResult:
    """Build, verify, measure and publish MODEL's GGUF (and GPTQ) repos under ORG; see the module docstring."""
    if problem := template_option_error(template):
        raise KomtError(problem)
    BoundOverrides(mean_kl=max_kl)  # a bound no file could meet fails now, not after the conversion
    options = make_options(model, org, quants=quants, gptq=gptq, out=out, name=name, gguf_repo=gguf_repo,
                           gptq_repo=gptq_repo, adapter=adapter, template=template, base_model=base_model,
                           license=license, private=private, force=force, push=push, allow_pickle=allow_pickle,
                           n_threads=n_threads, max_file_size=max_file_size, max_kl=max_kl, bench=bench,
                           keep_merged=keep_merged, retries=retries, backoff=backoff, progress=progress,
                           imatrix=None if imatrix in (None, "", "none") else imatrix, lora=lora)
    if options.imatrix not in (None, KOREAN):
        Imatrix.read(Path(options.imatrix))  # readable and an imatrix, before any work
    if dry_run:
        return _dry_run(options, log)
    # OUT is this release's, reused by re-runs (its manifest says so); a folder holding other files needs --force.
    check_dir_target(options.out, force=force, owned_if=(MANIFEST_NAME,))
    if push:
        _preflight_hub(options, log)

    ensure_writable_dir(options.out)
    with folder_lock(options.out, ".release.lock", what="release"):
        manifest = Manifest(options.out / MANIFEST_NAME, header={"komt_edge": __version__})
        manifest.data["release"] = {"model": model, "org": org, "name": options.name,
                                    "repos": [options.gguf_repo, options.gptq_repo]}
        manifest.data.setdefault("created", now())
        ctx = StageContext(manifest, log, options=options,
                           resolved=resolve(model, adapter=adapter, allow_pickle=allow_pickle))
        statuses = run_stages(STAGES, ctx, stopped="the release stopped before anything was pushed")
        repos = ctx.data("push").get("repos", {}) if ctx.done("push") else {}
        return ReleaseResult(options, manifest.path, statuses, repos)


def _dry_run(options: ReleaseOptions, log: Callable[[str], None]) -> ReleaseResult:
    """What a real run would do: stages to run or skip, repos to create, files to upload. Writes nothing."""
    from .gguf import output_name

    ctx = StageContext(Manifest(options.out / MANIFEST_NAME), log, options=options)  # read, never saved
    statuses = plan_stages(STAGES, ctx)
    repos = {}
    if options.push:
        if hub_token(required=False) is None:
            log("no Hub token (HF_TOKEN or `hf auth login`): a real run would stop before any work")
        targets = [(options.gguf_repo, ctx.gguf_dir)]
        if _gptq_stage_available(options):
            targets.append((options.gptq_repo, ctx.gptq_dir))
        for repo_id, folder in targets:
            if folder.is_dir() and any(folder.iterdir()):
                result = push_folder(folder, repo_id, private=options.private, dry_run=True, log=log,
                                     retries=options.retries, backoff=options.backoff)
                log(result.plan.describe())
                repos[repo_id] = result.to_dict()
            elif repo_id == options.gguf_repo:
                files = [output_name(options.name, p) for p in options.plans]
                zoo = lookup(options.model)
                if options.lora is not False and (options.adapter or (zoo is not None and zoo.adapter)):
                    files.append(output_name(f"{options.name}-LoRA", LORA_OUTTYPE))
                log(f"{repo_id}: would publish {', '.join(files)} and README.md "
                    "(shards instead of any file over the per-file limit)")
            else:
                log(f"{repo_id}: would publish the GPTQ checkpoint and README.md")
    log(f"quantization types: {', '.join(p.name for p in options.plans)}; output folder {options.out}")
    return ReleaseResult(options, options.out / MANIFEST_NAME, statuses, repos, dry_run=True)
