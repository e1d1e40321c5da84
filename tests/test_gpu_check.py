"""`make gpu-check` (komt_edge.benchmarks.gpu_check) on a machine without CUDA: one line, exit 2, no report; and
the parts that do not need a GPU: each path in its own process and budget, the report's shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from komt_edge.benchmarks import gpu_check as gc

ROOT = Path(__file__).resolve().parent.parent
HERE = "tests.test_gpu_check"


@pytest.mark.subprocess  # runs the check as a process (the slow group of pytest.ini)
@pytest.mark.parametrize("how", ["module", "script"])
def test_without_cuda_one_line_exit_2_no_report(tmp_path, how):
    import torch  # here, not at import: the harness test's child processes import this module

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    report = tmp_path / "results" / "gpu-check.json"
    cmd = ([sys.executable, "-m", "komt_edge.benchmarks.gpu_check"] if how == "module"
           else [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--bundle", str(tmp_path / "none")])
    proc = subprocess.run([*cmd, "-o", str(report), "--work", str(tmp_path / "work")], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == gc.NO_CUDA_EXIT
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu-check: no CUDA GPU: torch ") and "no report written" in lines[0]
    assert not report.exists() and not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def test_no_cuda_reason_names_the_build(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert gc.no_cuda_reason() == f"torch {torch.__version__} is a CPU-only build"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert gc.no_cuda_reason() == f"torch {torch.__version__} is built for CUDA 13.0 but sees no GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gc.no_cuda_reason() is None


# Stages for the harness test, called in child processes (this module is importable from the repository root).
def _ok(ctx):
    return {"answer": 42, "work": ctx["work"]}


def _needs_ok(ctx):
    return {"saw": ctx["results"]["ok"]["answer"]}


def _boom(ctx):
    raise RuntimeError("the kernel said no\nsecond line that the report must not carry")


def _wrong(ctx):
    raise gc.CheckFailed("loss not finite", {"loss": "nan"})


def _hang(ctx):
    print("compiling kernels", flush=True)
    time.sleep(60)


def _exit(ctx):
    os._exit(9)


@pytest.mark.subprocess  # each path is a process (the slow group of pytest.ini)
def test_each_path_in_its_own_process_and_budget(tmp_path):
    stages = [gc.Stage("ok", f"{HERE}:_ok", 60), gc.Stage("needs-ok", f"{HERE}:_needs_ok", 60, ("ok",)),
              gc.Stage("boom", f"{HERE}:_boom", 60), gc.Stage("after-boom", f"{HERE}:_ok", 60, ("boom",)),
              gc.Stage("wrong", f"{HERE}:_wrong", 60), gc.Stage("hang", f"{HERE}:_hang", 5),
              gc.Stage("dies", f"{HERE}:_exit", 60), gc.Stage("last", f"{HERE}:_ok", 60),
              gc.Stage("late", f"{HERE}:_ok", 60, background_needs=("llama-cpp-cuda-build",))]
    seen = []
    results = gc.run_stages(stages, tmp_path, 120, on_result=lambda r, fin: seen.append(len(r)), background=False)
    by = {r.name: r for r in results}
    assert by["ok"].status == "ok" and by["ok"].details["answer"] == 42 and by["ok"].seconds is not None
    assert by["needs-ok"].status == "ok" and by["needs-ok"].details["saw"] == 42
    assert by["boom"].status == "failed" and by["boom"].error == "RuntimeError: the kernel said no"
    assert "Traceback" in Path(by["boom"].details["log"]).read_text()  # the whole story is in its log
    assert "RuntimeError: the kernel said no" in by["boom"].details["log_tail"]  # and its end in the report
    assert by["after-boom"].status == "skipped" and "needs boom" in by["after-boom"].error
    assert by["wrong"].status == "failed" and by["wrong"].error == "CheckFailed: loss not finite"
    assert by["wrong"].details["loss"] == "nan"
    # the hung path (a 60 s sleep) was stopped at its 5 s budget: an event, not the wall clock of a loaded machine
    assert by["hang"].status == "timeout" and "5 s budget" in by["hang"].error
    assert "compiling kernels" in by["hang"].error and by["hang"].details["log_tail"] == ["compiling kernels"]
    assert "log_tail" not in by["ok"].details
    assert by["dies"].status == "failed" and "exit 9" in by["dies"].error
    assert by["last"].status == "ok"  # nothing above hid it
    assert by["late"].status == "skipped" and "llama-cpp-cuda-build" in by["late"].error
    assert len(seen) == len(stages) and seen == sorted(seen)  # the report is rewritten after every path
    assert [r.name for r in results] == [s.name for s in stages] + ["llama-cpp-cuda-build"]  # never started
    assert results[-1].status == "skipped"


@pytest.mark.subprocess  # each path is a process (the slow group of pytest.ini)
def test_the_deadline_skips_what_no_longer_fits(tmp_path):
    stages = [gc.Stage("hang", f"{HERE}:_hang", 60), gc.Stage("next", f"{HERE}:_ok", 60)]
    results = gc.run_stages(stages, tmp_path, 6, background=False)
    assert [r.status for r in results] == ["timeout", "skipped"]
    assert "no time left in the 6 s budget" in results[1].error


def test_report_shape(tmp_path):
    paths = [gc.PathResult("env", "ok", None, 1.0, None, "versions", {"gpu": "NVIDIA H100 80GB HBM3",
                                                                      "capability": "9.0", "cuda": "13.0",
                                                                      "versions": {"torch": "2.11.0"}}),
             gc.PathResult("gptq", "failed", "KomtError: out of GPU memory", 12.5, 3 << 30, "GPTQ", {}),
             gc.PathResult("bench-speed-llama-cpp", "skipped", "needs gptq, which did not pass")]
    report = gc.build_report(paths, env=paths[0].details, commit={"commit": "abc", "dirty": False, "source": "git"},
                             budget_s=420, total_s=33.33, finished=True)
    assert report["kind"] == "gpu-check" and report["ok"] is False and report["finished"] is True
    assert report["gpu"] == "NVIDIA H100 80GB HBM3" and report["cuda"] == "13.0"
    assert report["versions"] == {"torch": "2.11.0"} and report["commit"] == "abc"
    assert report["counts"] == {"ok": 1, "failed": 1, "timeout": 0, "skipped": 1}
    assert [p["name"] for p in report["paths"]] == ["env", "gptq", "bench-speed-llama-cpp"]
    assert set(report["paths"][1]) == {"name", "status", "error", "seconds", "peak_gpu_bytes", "what", "details"}
    assert report["paths"][1]["peak_gpu_bytes"] == 3 << 30 and report["total_s"] == 33.3
    out = tmp_path / "r" / "gpu-check.json"
    gc.write_report(out, report)
    assert json.loads(out.read_text()) == report and not list(out.parent.glob(".*partial"))
    all_ok = gc.build_report(paths[:1], env=None, commit={}, budget_s=1, total_s=1, finished=True)
    assert all_ok["ok"] is True
    assert gc.build_report(paths[:1], env=None, commit={}, budget_s=1, total_s=1, finished=False)["ok"] is False


def test_every_path_has_its_function_and_known_prerequisites():
    names = [s.name for s in gc.STAGES]
    for i, stage in enumerate(gc.STAGES):
        module, func = stage.target.split(":")
        assert module == gc.MODULE and callable(getattr(gc, func)), stage
        assert all(n in names[:i] for n in stage.needs), stage
    assert {"train-qlora-4bit", "train-lora-8bit", "gptq", "gptq-transformers", "bench-speed-transformers",
            "bench-speed-llama-cpp"} <= set(names)
    assert sum(s.budget_s for s in gc.STAGES) >= gc.DEFAULT_SECONDS  # the total budget, not the sum, binds


def test_slim_wheel_drops_members_and_their_record_lines(tmp_path):
    import zipfile

    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/libpkg_cuda118.so", b"x" * 100)
        z.writestr("pkg/libpkg_cuda130.so", b"y")
        z.writestr("pkg-1.0.dist-info/RECORD", "pkg/__init__.py,,\npkg/libpkg_cuda118.so,sha256=a,100\n"
                   "pkg/libpkg_cuda130.so,sha256=b,1\npkg-1.0.dist-info/RECORD,,\n")
    gc._slim_wheel(whl, lambda n: n.endswith("_cuda118.so"))
    with zipfile.ZipFile(whl) as z:
        assert sorted(z.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py", "pkg/libpkg_cuda130.so"]
        assert "cuda118" not in z.read("pkg-1.0.dist-info/RECORD").decode()


@pytest.mark.subprocess  # each path is a process (the slow group of pytest.ini)
def test_run_writes_the_report_when_the_gpu_is_not_usable(tmp_path, monkeypatch, capsys):
    """CUDA said present but unusable (faked here): the env path fails in one line, the paths after it are skipped
    with the reason, the llama.cpp build is never started, and the report says all of that."""
    monkeypatch.setattr(gc, "no_cuda_reason", lambda: None)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GPTQMODEL_OFFLINE", "HF_DATASETS_OFFLINE",
                 "PYTHONUNBUFFERED"):  # run() sets these for its children: undone after the test, not left for
        monkeypatch.setenv(name, os.environ.get(name, "1"))  # later tests (a test Hub in offline mode fails them)
    report = tmp_path / "results" / "gpu-check.json"
    assert gc.run(report, tmp_path / "work", 60, None) == gc.FAILED_EXIT
    data = json.loads(report.read_text())
    assert data["finished"] is True and data["ok"] is False and data["gpu"] is None
    paths = {p["name"]: p for p in data["paths"]}
    assert paths["env"]["status"] == "failed" and "\n" not in paths["env"]["error"]
    assert all(paths[s.name]["status"] == "skipped" for s in gc.STAGES[1:])
    assert paths["llama-cpp-cuda-build"]["status"] == "skipped"
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gpu-check: env ... failed") and out[-1].startswith("gpu-check: 0/")
    assert len(out) == len(gc.STAGES) + 1  # one line per path, one summary
