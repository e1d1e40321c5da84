"""A resumable pipeline of stages, recorded in a JSON manifest: what ``komt-edge release`` is built on.

A :class:`Stage` names its run function, the inputs that decide whether its result is still valid, a skip rule
and the modules it needs. :func:`run_stages` runs the stages in order, one process per output folder at a time
(:func:`folder_lock`), and records each stage's inputs, outputs (sha256, size), data and tool versions in the
:class:`Manifest`, written atomically after every stage. A stage whose inputs are unchanged and whose outputs
are intact is skipped (:func:`up_to_date`), so an interrupted run resumes where it stopped. :func:`plan_stages`
is the dry run: the same skip rules, nothing run or written.

The pipeline knows nothing of what its stages do: they get a :class:`Context` (or a subclass carrying their own
facts) and return a :class:`StageOutput`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .atomic import atomic_file, pid_alive
from .errors import KomtError
from .util import dist_version, sha256_file, sha256_json

MANIFEST_VERSION = 1


def now() -> str:
    """The local time as manifests record it: 2024-05-01T12:00:00+0900."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- manifest ----------------------------------------------------------------------------------------------

class Manifest:
    """The JSON record of a run: per stage its inputs, outputs (sha256, size), data and tool versions, plus a
    cache of file hashes. ``header`` (e.g. the tool's version) is written into a new manifest only."""

    def __init__(self, path: Path, header: dict | None = None):
        self.path = Path(path)
        self.out = self.path.parent  # output paths are recorded relative to this folder
        self.data: dict = {**(header or {}), "version": MANIFEST_VERSION, "stages": {}, "hashes": {}}
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
        self.data["updated"] = now()
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def key(self, path: Path) -> str:
        """How a file is named in the manifest: relative to the output folder, else absolute."""
        path = Path(path).resolve()
        try:
            return path.relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return str(path)

    def path_of(self, key: str) -> Path:
        """The file a manifest key names (the inverse of :meth:`key`)."""
        return Path(key) if os.path.isabs(key) else self.out / key

    def sha256(self, path: Path) -> str:
        """sha256 of a file, cached by (size, mtime): a multi-GB file is read once, not on every re-run."""
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
        """Every output a stage recorded is still there, with its size and sha256."""
        for key, meta in (record.get("outputs") or {}).items():
            path = self.path_of(key)
            if not path.is_file() or path.stat().st_size != meta["size"] or self.sha256(path) != meta["sha256"]:
                return False
        return True


# --- stages ------------------------------------------------------------------------------------------------

@dataclass
class StageOutput:
    files: list[Path] = field(default_factory=list)  # what the stage wrote (hashed into the manifest)
    data: dict = field(default_factory=dict)  # JSON-able results for later stages
    passed: bool = True  # False stops the run (a check failed)
    message: str = ""  # why it failed, one line
    tools: dict[str, str] = field(default_factory=dict)  # extra tool versions to record


@dataclass
class Context:
    """What every stage sees: the manifest, the log and the records of the stages before it. A pipeline
    subclasses it to add its own facts (options, folders)."""

    manifest: Manifest
    log: Callable[[str], None]
    results: dict[str, dict] = field(default_factory=dict)  # stage → manifest record (status, data, outputs)

    def done(self, stage: str) -> bool:
        return self.results.get(stage, {}).get("status") == "done"

    def data(self, stage: str) -> dict:
        return self.results.get(stage, {}).get("data") or {}

    def outputs(self, stage: str) -> dict[str, dict]:
        """A stage's recorded outputs: manifest key → {"sha256", "size"}."""
        return self.results.get(stage, {}).get("outputs") or {}

    def output_hashes(self, stage: str) -> dict[str, str]:
        """A stage's outputs by sha256: what a later stage's inputs name."""
        return {k: v["sha256"] for k, v in self.outputs(stage).items()}


def module_available(name: str) -> bool:
    """Importable, without importing it (a module set to None in sys.modules counts as missing)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], StageOutput]
    requires: tuple[str, ...] = ()  # modules the stage needs; skipped (cleanly) while one is missing
    inputs: Callable[[Context], dict] = lambda ctx: {}
    skip: Callable[[Context], str | None] = lambda ctx: None  # a reason to skip, or None
    always: str = ""  # why the stage runs even when up to date (it is idempotent on its own), or ""
    tools: tuple[str, ...] = ()  # distributions whose versions are inputs

    def missing(self) -> str | None:
        """Why the stage cannot run here (a module it needs is not installed), or None."""
        absent = [m for m in self.requires if not module_available(m)]
        return f"{', '.join(absent)} not installed" if absent else None


def skip_reason(stage: Stage, ctx: Context) -> str | None:
    """Why ``stage`` does not run at all: its skip rule, or a module it needs is missing."""
    return stage.skip(ctx) or stage.missing()


def input_digest(inputs: dict, tools: dict) -> str:
    return sha256_json({"inputs": inputs, "tools": tools})


def up_to_date(stage: Stage, record: dict, digest: str, manifest: Manifest) -> bool:
    """The stage finished before with the same inputs and tool versions, and its outputs are intact."""
    return (not stage.always and record.get("status") == "done" and record.get("input_digest") == digest
            and manifest.outputs_intact(record))


# --- running -----------------------------------------------------------------------------------------------

def run_stages(stages: Sequence[Stage], ctx: Context, *, stopped: str = "the run stopped") -> dict[str, str]:
    """Run ``stages`` in order, skipping those up to date; returns stage → status ("done in 1.2 s", "up to date",
    "skipped: …"). A stage that does not pass raises KomtError ("NAME: its message; ``stopped``")."""
    manifest, log = ctx.manifest, ctx.log
    statuses: dict[str, str] = {}
    total = len(stages)
    for i, stage in enumerate(stages, 1):
        tag = f"[{i}/{total} {stage.name}]"
        reason = skip_reason(stage, ctx)
        if reason is not None:
            manifest.stages[stage.name] = {"status": "skipped", "reason": reason, "finished": now()}
            ctx.results[stage.name] = manifest.stages[stage.name]
            manifest.save()
            statuses[stage.name] = f"skipped: {reason}"
            log(f"{tag} skipped: {reason}")
            continue
        inputs = dict(stage.inputs(ctx))
        tools = {t: dist_version(t) for t in stage.tools}
        digest = input_digest(inputs, tools)
        previous = manifest.stages.get(stage.name) or {}
        if up_to_date(stage, previous, digest, manifest):
            ctx.results[stage.name] = previous
            statuses[stage.name] = "up to date"
            log(f"{tag} up to date (inputs unchanged since {previous.get('finished', '?')}): skipped")
            continue
        log(f"{tag} running")
        record = {"status": "running", "started": now(), "inputs": inputs, "input_digest": digest, "tools": tools}
        manifest.stages[stage.name] = record
        manifest.save()
        started = time.monotonic()
        try:
            output = stage.run(ctx)
        except KeyboardInterrupt:
            record.update(status="interrupted", finished=now())
            manifest.save()
            raise
        except BaseException as err:
            record.update(status="failed", finished=now(), error=str(err) if isinstance(err, KomtError)
                          else type(err).__name__)
            manifest.save()
            raise
        record.update(outputs=manifest.record_files(output.files), data=output.data,
                      tools={**tools, **output.tools}, finished=now(),
                      seconds=round(time.monotonic() - started, 2),
                      status="done" if output.passed else "failed")
        if not output.passed:
            record["error"] = output.message
        ctx.results[stage.name] = record
        manifest.save()
        if not output.passed:
            raise KomtError(f"{stage.name}: {output.message or 'its check failed'}; {stopped}")
        statuses[stage.name] = f"done in {record['seconds']:.1f} s"
        log(f"{tag} done in {record['seconds']:.1f} s")
    return statuses


def plan_stages(stages: Sequence[Stage], ctx: Context) -> dict[str, str]:
    """The dry run: what :func:`run_stages` would do with each stage, by the same skip rules; runs and writes
    nothing. Whether a finished stage's inputs changed is not computed (that may need its inputs downloaded)."""
    statuses = {}
    for stage in stages:
        reason = skip_reason(stage, ctx)
        record = ctx.manifest.stages.get(stage.name) or {}
        if reason:
            statuses[stage.name] = f"would skip: {reason}"
        elif stage.always:
            statuses[stage.name] = f"would run ({stage.always})"
        elif record.get("status") == "done":
            statuses[stage.name] = "done earlier: skipped if its inputs are unchanged"
        else:
            statuses[stage.name] = "would run"
    return statuses


@contextlib.contextmanager
def folder_lock(folder: Path, name: str = ".lock", *, what: str = "run") -> Iterator[None]:
    """One ``what`` per output folder at a time (the lock file ``folder/name`` holds its pid); a lock left by a
    killed process is taken over."""
    lock = Path(folder) / name
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and pid_alive(pid):
                raise KomtError(f"another {what} (pid {pid}) is running in {folder}: wait for it, or use another -o")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise KomtError(f"could not lock {folder}: remove {lock} if no {what} is running")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
