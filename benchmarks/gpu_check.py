"""`make gpu-check`: every CUDA path of komt-edge, once, on one GPU, written to one JSON report.

The paths, each a call of the library (no CLI), each in its own child process with its own time budget, so that
one that fails or hangs neither hides nor blocks the others:

- ``env``: the GPU, its driver, CUDA and the library versions;
- ``models``: a small random Mistral (8 layers, 1024 wide, ~160M parameters, the real Mistral v0.1 tokenizer from
  mistral-common), Korean instruction records and its F16 GGUF, built on the spot: nothing is downloaded;
- ``train-qlora-4bit`` / ``train-lora-8bit``: :func:`komt_edge.train.train` on CUDA, the base loaded in 4-bit nf4
  and in 8-bit through bitsandbytes, a few optimizer steps (paged AdamW);
- ``gptq``: :func:`komt_edge.gptq.gptq` on CUDA with its check (reload with transformers, a Korean answer, held-out
  Korean perplexity against the unquantized model);
- ``bench-speed-transformers``: the transformers rows of ``komt-edge bench speed``
  (:func:`komt_edge.bench.gpu.cuda_rows`: fp16, bf16 and the GPTQ checkpoint);
- ``gptq-transformers``: the GPTQ checkpoint loaded by plain ``AutoModelForCausalLM.from_pretrained`` with the
  kernel GPTQModel picks for a user (on an H100 that is Marlin, compiled on first use), generating Korean;
- ``bench-speed-llama-cpp``: the llama.cpp row of ``bench speed`` (all layers on the GPU), with a llama-cpp-python
  built for CUDA from the pinned sdist while the other paths run (``llama-cpp-cuda-build``; without ggml's
  FlashAttention kernels unless ``GPU_CHECK_LLAMA_FA=1``, since they are most of its compile time).

In ``gptq`` and ``bench-speed-transformers`` GPTQModel's kernels that are compiled on first use (Marlin, Machete,
ExLlamaV2, BitBLAS, Swordfish) are held back (unless ``GPU_CHECK_JIT_KERNELS=1``), so that the Triton kernel
serves and a long compile cannot eat the budget of the paths that follow; ``gptq-transformers`` runs after them with
the user's default and says which kernel it got. The model's weights are random: the paths check that the CUDA code
runs and what it produces is sound (finite losses and logits, the GPTQ acceptance rule), not model quality.

Run it with ``make gpu-check`` (see the Makefile for the wheel bundle that the GPU machine needs, since it has no
network). Without a CUDA GPU it prints one line and exits with status 2, writing no report. The report
(``benchmarks/results/gpu-check.json`` by default) is rewritten after every path, so a run cut short still leaves
what it measured: per path its status (ok, failed, timeout, skipped), a one-line error, seconds, peak GPU memory and
details; plus the GPU, the versions, the commit and the budget.

This file runs in two ways: as a script (``python3 benchmarks/gpu_check.py``, standard library only) it checks for
CUDA, installs the bundle into a private folder and re-runs itself as ``komt_edge.benchmarks.gpu_check`` from there;
as that module it runs the paths. ``--stage`` is the child-process entry of one path.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPORT = Path("benchmarks/results/gpu-check.json")
NO_CUDA_EXIT = 2  # not run: no CUDA GPU (or no bundle); nothing written
FAILED_EXIT = 1  # ran, and at least one path did not pass
DEFAULT_SECONDS = 390.0  # all paths together; the installs before them take ~1 min more (Makefile)
MODULE = "komt_edge.benchmarks.gpu_check"
STATUSES = ("ok", "failed", "timeout", "skipped")
VERSIONS = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "gptqmodel", "optimum", "triton",
            "safetensors", "tokenizers", "huggingface_hub", "datasets", "pyarrow", "torchao", "numpy", "gguf",
            "pypcre", "scikit_build_core", "llama_cpp_python", "komt-edge")
JIT_KERNELS = (("marlin", "MarlinLinear"), ("machete", "MacheteLinear"), ("exllamav2", "ExllamaV2Linear"),
               ("bitblas", "BitblasLinear"), ("swordfish", "SwordfishLinear"))
KOREAN_PROMPT = "한국의 수도는 어디인가요?"
DEVICE = "cuda"  # where the paths run (a CPU smoke run of the stage functions may set "cpu")


def say(message: str, *, end: str = "\n") -> None:
    """One line of progress (``end=" "``: the line is finished by :func:`finish`, when the step is done)."""
    print(f"gpu-check: {message}", end=end, flush=True)


def finish(message: str) -> None:
    print(message, flush=True)


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """An error as one line: its type and the first non-empty line of its message."""
    if isinstance(err, BaseException):
        lines = [s.strip() for s in str(err).splitlines() if s.strip()]
        text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    else:
        text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# --- CUDA or not ------------------------------------------------------------------------------------------

def no_cuda_reason() -> str | None:
    """None when torch sees a CUDA GPU, else why not, in one line."""
    try:
        import torch
    except Exception as err:  # not installed, or a broken install
        return f"torch cannot be imported by {sys.executable} ({one_line(err)})"
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return None
    except Exception as err:  # pragma: no cover - a broken driver
        return f"torch {torch.__version__} cannot query CUDA ({one_line(err)})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU"


# --- the paths ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One path: ``target`` ("module:function", called in a child process with the context) within ``budget_s``."""
    name: str
    target: str
    budget_s: float
    needs: tuple[str, ...] = ()
    what: str = ""
    background_needs: tuple[str, ...] = ()  # background jobs (the llama.cpp build) waited for before it starts


@dataclass
class PathResult:
    name: str
    status: str  # ok, failed, timeout, skipped
    error: str | None = None
    seconds: float | None = None
    peak_gpu_bytes: int | None = None
    what: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """The one line printed when the path is done."""
        parts = [self.status]
        if self.seconds is not None:
            parts.append(f"{self.seconds:.1f} s")
        if self.peak_gpu_bytes:
            parts.append(f"peak GPU {self.peak_gpu_bytes / 2**30:.2f} GiB")
        text = ", ".join(parts)
        return f"{text}: {self.error}" if self.error else text


def _stage(name: str, budget: float, needs: tuple[str, ...] = (), what: str = "", **kw) -> Stage:
    return Stage(name, f"{MODULE}:stage_{name.replace('-', '_')}", budget, needs, what, **kw)


STAGES: tuple[Stage, ...] = (
    _stage("env", 60, (), "the GPU, driver and library versions"),
    _stage("models", 120, ("env",), "small random Mistral (~160M, bf16), Korean records and its F16 GGUF, built here"),
    _stage("train-qlora-4bit", 120, ("models",), "komt_edge.train on CUDA: 4-bit nf4 base (bitsandbytes), LoRA steps"),
    _stage("train-lora-8bit", 120, ("models",), "komt_edge.train on CUDA: 8-bit base (bitsandbytes), LoRA steps"),
    _stage("gptq", 200, ("models",), "komt_edge.gptq on CUDA (GPTQModel) with its check: reload, Korean answer, "
           "perplexity"),
    _stage("bench-speed-transformers", 120, ("models",), "bench speed's CUDA rows: transformers fp16, bf16, GPTQ"),
    _stage("gptq-transformers", 120, ("gptq",), "the GPTQ checkpoint loaded by transformers with its default kernel, "
           "generating Korean on CUDA"),
    _stage("bench-speed-llama-cpp", 120, ("models",), "bench speed's CUDA row: llama.cpp with all layers on the GPU",
           background_needs=("llama-cpp-cuda-build",)),
)


def _cuda_peak_reset() -> None:
    import torch

    torch.cuda.reset_peak_memory_stats()


def _peak() -> int | None:
    """Peak GPU memory torch allocated in this process, if it used CUDA."""
    torch = sys.modules.get("torch")
    try:
        return int(torch.cuda.max_memory_allocated()) if torch is not None and torch.cuda.is_initialized() else None
    except Exception:
        return None


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def stage_env(ctx: dict) -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    driver = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "--id=0"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        driver = out.splitlines()[0] if out else None
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
    if nvcc:  # GPTQModel's kernels and the llama.cpp build compile with it
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
        nvcc = out.splitlines()[-1] if out else nvcc
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "gpu_memory_bytes": props.total_memory,
            "nvcc": nvcc,
            "multiprocessors": props.multi_processor_count, "driver": driver, "cuda": torch.version.cuda,
            "bf16": bool(torch.cuda.is_bf16_supported()), "python": platform.python_version(),
            "cpus": os.cpu_count(), "versions": {n: _dist_version(n) for n in VERSIONS}}


SMALL_MISTRAL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                     num_key_value_heads=8)


def build_small_model(out: Path, *, seed: int = 0, init_std: float = 0.02) -> Path:
    """A random Mistral of ~160M parameters in bf16 with komt's tokenizer files (the real Mistral v0.1 tokenizer):
    big enough that the CUDA kernels and memory are exercised, built in seconds, nothing downloaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from komt_edge.tiny import TINY_CONFIGS, write_tokenizer

    cfg = {**TINY_CONFIGS["mistral"], **SMALL_MISTRAL}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, init_std)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, "mistral")
    return out


def stage_models(ctx: dict) -> dict:
    from komt_edge.corpora import KOREAN_INSTRUCTIONS
    from komt_edge.gguf import convert

    work = Path(ctx["work"])
    model = build_small_model(work / "small-mistral")
    data = work / "train-ko.jsonl"
    records = [{"instruction": q, "output": a} for q, a in KOREAN_INSTRUCTIONS] * 4
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    gguf = convert(str(model), ["f16"], work / "gguf", progress=False)[0]
    cfg = json.loads((model / "config.json").read_text())
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    params = 2 * v * h + n * (2 * h * h + 2 * h * kv + 3 * h * i)
    return {"model": str(model), "data": str(data), "records": len(records), "gguf": str(gguf),
            "gguf_bytes": gguf.stat().st_size, "parameters": params,
            "config": {k: cfg[k] for k in ("architectures", *SMALL_MISTRAL, "vocab_size", "torch_dtype")
                       if k in cfg}}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _train(ctx: dict, bits: int) -> dict:
    from komt_edge.train import RESULT_FILE, train

    work = Path(ctx["work"])
    model = ctx["results"]["models"]["model"]
    out = work / f"train-{bits}bit"
    shutil.rmtree(out, ignore_errors=True)
    lines: list[str] = []
    _cuda_peak_reset()
    r = train(model, ctx["results"]["models"]["data"], out, bits=bits, device="cuda", max_steps=8, max_length=256,
              lr=1e-4, save_steps=1000, eval_steps=1000, progress=False, log=lines.append)
    record = json.loads((out / RESULT_FILE).read_text(encoding="utf-8"))
    details = {"mode": r.mode, "steps": r.steps, "first_loss": r.first_loss, "last_loss": r.last_loss,
               "eval_loss": r.eval_loss, "runtime_s": r.runtime_s, "tokens_per_s": r.tokens_per_s,
               "optim": record["arguments"]["optim"], "versions": record.get("versions"),
               "adapter_files": sorted(p.name for p in out.iterdir() if p.name.startswith("adapter_"))}
    problems = []
    if r.steps != 8:
        problems.append(f"ran {r.steps} steps, not 8")
    if not (_finite(r.first_loss) and _finite(r.last_loss)):
        problems.append(f"loss not finite ({r.first_loss} → {r.last_loss})")
    if "adapter_model.safetensors" not in details["adapter_files"]:
        problems.append("no adapter_model.safetensors written")
    if f"{bits}-bit" not in r.mode:
        problems.append(f"trained as {r.mode!r}")
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return details


def stage_train_qlora_4bit(ctx: dict) -> dict:
    return _train(ctx, 4)


def stage_train_lora_8bit(ctx: dict) -> dict:
    return _train(ctx, 8)


class CheckFailed(Exception):
    """A path ran but what it produced is wrong; carries the details measured so far."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def hold_back_jit_kernels() -> list[str]:
    """Make GPTQModel's auto kernel choice skip the kernels it compiles on first use (minutes of nvcc), so that
    the Triton kernel serves; returns the names held back."""
    held = []
    for module, cls_name in JIT_KERNELS:
        try:
            cls = getattr(importlib.import_module(f"gptqmodel.nn_modules.qlinear.{module}"), cls_name)
        except Exception:  # GPTQModel missing or another layout: the gptq path reports that itself
            continue
        cls.validate_once = classmethod(lambda c: (False, ImportError("held back by gpu-check (compiled on use)")))
        held.append(cls_name)
    return held


def _quant_kernels(model) -> dict[str, int]:
    """The classes of the model's quantized linear layers, counted."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if hasattr(m, "qweight"):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def stage_gptq(ctx: dict) -> dict:
    import torch

    from komt_edge.gptq import gptq

    work = Path(ctx["work"])
    os.environ.setdefault("GPTQMODEL_OFFLINE", "1")
    held = hold_back_jit_kernels() if not os.environ.get("GPU_CHECK_JIT_KERNELS") else []
    out = work / "gptq"
    shutil.rmtree(out, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    r = gptq(ctx["results"]["models"]["model"], out, bits=4, group_size=128, device="cuda", progress=False)
    d = r.to_dict()
    return {"checkpoint": str(r.path), "device": r.device, "quantize_seconds": r.quantize_seconds,
            "total_seconds": r.total_seconds, "peak_gpu_bytes_quantize": r.peak_gpu_bytes,
            "calibration": r.calibration, "check": d.get("check"), "warnings": r.warnings,
            "kernels_held_back": held}


def stage_bench_speed_transformers(ctx: dict) -> dict:
    from komt_edge.bench.gpu import cuda_rows

    os.environ.setdefault("GPTQMODEL_OFFLINE", "1")
    held = hold_back_jit_kernels() if not os.environ.get("GPU_CHECK_JIT_KERNELS") else []
    gptq = (ctx["results"].get("gptq") or {}).get("checkpoint")
    rows = [asdict(r) for r in cuda_rows([], hf=ctx["results"]["models"]["model"], gptq=gptq, n_prompt=512,
                                         n_gen=64, repetitions=3)]
    details = {"rows": rows, "n_prompt": 512, "n_gen": 64, "repetitions": 3, "kernels_held_back": held}
    bad = [f"{r['engine']}: {r['status']}" for r in rows if r["status"] != "ok"]
    if gptq is None:
        bad.append("no GPTQ checkpoint (the gptq path did not pass)")
    if bad:
        raise CheckFailed("; ".join(bad), details)
    return details


def stage_gptq_transformers(ctx: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("GPTQMODEL_OFFLINE", "1")
    path = ctx["results"]["gptq"]["checkpoint"]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map=DEVICE).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": KOREAN_PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].to(DEVICE)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)  # kernels warm
        load_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False, pad_token_id=tok.eos_token_id)
        torch.cuda.synchronize()
        gen_s = time.perf_counter() - t1
        logits = model(out).logits
    new = out[0, ids.shape[1]:]
    # random weights: the answer is noise; what is checked is 32 tokens out of the quantized kernels, finite logits
    details = {"kernels": _quant_kernels(model), "load_and_warm_s": load_s, "new_tokens": int(new.numel()),
               "tokens_per_s": new.numel() / gen_s, "answer_chars": len(tok.decode(new, skip_special_tokens=True)),
               "logits_finite": bool(torch.isfinite(logits).all())}
    problems = []
    if not details["kernels"]:
        problems.append("no quantized linear layers in the loaded model")
    if new.numel() != 32:
        problems.append(f"generated {new.numel()} tokens, not 32")
    if not details["logits_finite"]:
        problems.append("logits not finite")
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return details


def stage_bench_speed_llama_cpp(ctx: dict) -> dict:
    from komt_edge.bench.gpu import cuda_rows
    from komt_edge.llamacpp import gpu_offload_supported

    import llama_cpp

    details: dict[str, Any] = {"llama_cpp": str(Path(llama_cpp.__file__).parent),
                               "gpu_offload": bool(gpu_offload_supported())}
    rows = [asdict(r) for r in cuda_rows([ctx["results"]["models"]["gguf"]], n_prompt=512, n_gen=128,
                                         repetitions=3) if r.engine.startswith("llama.cpp")]
    details["rows"] = rows
    bad = [r["status"] for r in rows if r["status"] != "ok"]
    if bad or not rows:
        raise CheckFailed("; ".join(bad) or "no llama.cpp row", details)
    return details


# --- one path in a child process -----------------------------------------------------------------------------

def run_child(target: str, ctx_file: Path, result_file: Path) -> int:
    """The child's side: call ``target`` with the context, write a result file. Exit 0 whatever happened (the
    result says it); a crash that leaves no result file is the parent's to report."""
    ctx = json.loads(ctx_file.read_text(encoding="utf-8"))
    started = time.perf_counter()
    try:
        module, func = target.split(":")
        details = getattr(importlib.import_module(module), func)(ctx)
        result = {"status": "ok", "details": details or {}}
    except BaseException as err:  # whatever a library raises: one line here, the traceback in the log
        # CheckFailed by name: run as ``-m`` this module is __main__, and the stages' copy is another class object
        checked = type(err).__name__ == CheckFailed.__name__
        if not checked:
            traceback.print_exc()
        result = {"status": "failed", "error": one_line(err), "details": getattr(err, "details", {}) if checked else {}}
    result.update(seconds=time.perf_counter() - started, peak_gpu_bytes=_peak())
    tmp = result_file.with_suffix(".partial")
    tmp.write_text(json.dumps(result, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, result_file)
    return 0


def _tail_lines(log: Path, n: int = 12) -> list[str]:
    try:
        lines = [s.rstrip() for s in log.read_text(encoding="utf-8", errors="replace").splitlines() if s.strip()]
    except OSError:
        return []
    return [line if len(line) <= 300 else line[:299] + "…" for line in lines[-n:]]


def _tail(log: Path, n: int = 1) -> str:
    try:
        lines = [s.strip() for s in log.read_text(encoding="utf-8", errors="replace").splitlines() if s.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _child_command() -> list[str]:
    return [sys.executable, *(["-P"] if sys.flags.safe_path else []), "-m", MODULE]


def run_stage(stage: Stage, ctx: dict, work: Path, timeout: float, env: dict | None = None) -> PathResult:
    """Run one path in a child process (its own process group) for at most ``timeout`` seconds."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ctx_file, result_file, log = logs / f"{stage.name}.ctx.json", logs / f"{stage.name}.result.json", \
        logs / f"{stage.name}.log"
    ctx_file.write_text(json.dumps(ctx, ensure_ascii=False, default=str), encoding="utf-8")
    result_file.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*_child_command(), "--stage", stage.target, "--ctx", str(ctx_file), "--result",
                                 str(result_file)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except BaseException as err:  # its budget, or the run itself stopped (SIGTERM from the hard limit)
            _kill_group(proc)
            if not isinstance(err, subprocess.TimeoutExpired):
                raise
            last = _tail(log)
            return PathResult(stage.name, "timeout", f"ran past its {timeout:.0f} s budget"
                              + (f"; last log line: {one_line(last, 200)}" if last else ""),
                              time.perf_counter() - started, what=stage.what,
                              details={"log": str(log), "log_tail": _tail_lines(log)})
    if not result_file.is_file():
        last = _tail(log)
        return PathResult(stage.name, "failed", f"the child process died (exit {proc.returncode})"
                          + (f"; last log line: {one_line(last, 200)}" if last else ""),
                          time.perf_counter() - started, what=stage.what,
                          details={"log": str(log), "log_tail": _tail_lines(log)})
    r = json.loads(result_file.read_text(encoding="utf-8"))
    details = dict(r.get("details") or {})
    details["log"] = str(log)
    if r["status"] != "ok":  # the report is what comes back from the GPU machine: the end of the story with it
        details["log_tail"] = _tail_lines(log)
    return PathResult(stage.name, r["status"], r.get("error"), r.get("seconds"), r.get("peak_gpu_bytes"),
                      stage.what, details)


# --- the background build of llama-cpp-python for CUDA ----------------------------------------------------------

@dataclass
class Background:
    """A job started early and waited for by the paths that need it (the llama.cpp CUDA build)."""
    name: str
    what: str
    proc: subprocess.Popen | None = None
    started: float = 0.0
    log: Path | None = None
    result: PathResult | None = None  # set once finished (or if it never started)
    pythonpath: str | None = None
    details: dict[str, Any] = field(default_factory=dict)  # how it was started, in every result

    def wait(self, timeout: float) -> PathResult:
        if self.result is not None:
            return self.result
        assert self.proc is not None and self.log is not None
        try:
            self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return PathResult(self.name, "timeout", "still building", time.perf_counter() - self.started,
                              what=self.what, details={**self.details, "log": str(self.log)})
        seconds = time.perf_counter() - self.started
        if self.proc.returncode == 0:
            self.result = PathResult(self.name, "ok", None, seconds, what=self.what,
                                     details={**self.details, "log": str(self.log)})
        else:
            self.result = PathResult(self.name, "failed", f"pip exit {self.proc.returncode}; last log line: "
                                     + one_line(_tail(self.log), 200), seconds, what=self.what,
                                     details={**self.details, "log": str(self.log),
                                              "log_tail": _tail_lines(self.log, 30)})
        return self.result

    def stop(self) -> PathResult:
        if self.result is None and self.proc is not None:
            if self.proc.poll() is None:
                _kill_group(self.proc)
                last = one_line(_tail(self.log), 200) if self.log else ""
                self.result = PathResult(self.name, "timeout", "not finished within the check's budget"
                                         + (f"; last log line: {last}" if last else ""),
                                         time.perf_counter() - self.started, what=self.what,
                                         details={**self.details, "log": str(self.log),
                                                  "log_tail": _tail_lines(self.log, 5) if self.log else []})
            else:
                self.wait(0)
        return self.result  # type: ignore[return-value]


def start_llama_cuda_build(bundle: Path | None, work: Path, capability: str | None) -> Background:
    """pip-build llama-cpp-python with GGML_CUDA from the bundle's source into WORK/llama-cuda, in the background."""
    job = Background("llama-cpp-cuda-build", "llama-cpp-python built with CUDA from the pinned llama.cpp source "
                     "(runs beside the other paths)")
    sdists = sorted(bundle.glob("llama_cpp_python-*.tar.gz")) if bundle else []
    if not sdists:
        job.result = PathResult(job.name, "skipped", f"no llama_cpp_python source in the bundle ({bundle})",
                                what=job.what)
        return job
    if os.environ.get("GPU_CHECK_LLAMA_CPP") == "0":
        job.result = PathResult(job.name, "skipped", "GPU_CHECK_LLAMA_CPP=0", what=job.what)
        return job
    target = work / "llama-cuda"
    shutil.rmtree(target, ignore_errors=True)
    arch = capability.replace(".", "") if capability else "native"
    # FlashAttention's ~80 template instances are most of ggml-cuda's compile time: off unless GPU_CHECK_LLAMA_FA=1,
    # so that the build can finish beside the other paths (the row then measures llama.cpp without FA kernels).
    fa = "ON" if os.environ.get("GPU_CHECK_LLAMA_FA") == "1" else "OFF"
    cmake_args = (f"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES={arch} -DGGML_CUDA_FA={fa} -DLLAVA_BUILD=OFF "
                  "-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF")
    jobs = max(1, (os.cpu_count() or 2) - 2)  # two cores left to the paths (whose own nvcc compiles then queue)
    env = dict(os.environ, CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
    if not shutil.which("nvcc") and Path("/usr/local/cuda/bin/nvcc").is_file():  # the toolkit, off the PATH
        env.update(CUDACXX="/usr/local/cuda/bin/nvcc", PATH=f"/usr/local/cuda/bin{os.pathsep}{env.get('PATH', '')}")
    job.details = {"cmake_args": cmake_args, "parallel_jobs": jobs, "source": sdists[-1].name}
    job.log = work / "logs" / f"{job.name}.log"
    job.log.parent.mkdir(parents=True, exist_ok=True)
    job.started = time.perf_counter()
    with open(job.log, "wb") as out:
        job.proc = subprocess.Popen([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                                     "--no-index", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                                     "--target", str(target), str(sdists[-1])], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    job.pythonpath = str(target)
    return job


# --- the report ----------------------------------------------------------------------------------------------

def commit_of(root: Path, bundle: Path | None = None) -> dict[str, Any]:
    """The commit checked: git's view when the tree is a checkout; else what the bundle recorded, or the
    GPU_CHECK_COMMIT variable (the GPU machine receives a copy of the tree without .git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=30).stdout.strip()
            return {"commit": head.stdout.strip(), "dirty": bool(dirty), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("GPU_CHECK_COMMIT"):
        return {"commit": os.environ["GPU_CHECK_COMMIT"], "dirty": None, "source": "GPU_CHECK_COMMIT"}
    stamp = bundle / "commit.json" if bundle else None
    if stamp and stamp.is_file():
        return {**json.loads(stamp.read_text()), "source": "bundle (the commit the wheel bundle was made at)"}
    return {"commit": None, "dirty": None, "source": "unknown"}


def build_report(paths: list[PathResult], *, env: dict | None, commit: dict, budget_s: float, total_s: float,
                 finished: bool) -> dict[str, Any]:
    """The report: one entry per path, in order, and what the run was."""
    env = env or {}
    return {
        "kind": "gpu-check",
        "ok": finished and bool(paths) and all(p.status == "ok" for p in paths),
        "finished": finished,
        "gpu": env.get("gpu"), "capability": env.get("capability"), "gpu_memory_bytes": env.get("gpu_memory_bytes"),
        "driver": env.get("driver"), "cuda": env.get("cuda"), "nvcc": env.get("nvcc"), "python": env.get("python"),
        "versions": env.get("versions", {}),
        **commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": budget_s, "total_s": round(total_s, 1),
        "counts": {s: sum(p.status == s for p in paths) for s in STATUSES},
        "paths": [asdict(p) for p in paths],
    }


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(report, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- the run -------------------------------------------------------------------------------------------------

def run_stages(stages: tuple[Stage, ...] | list[Stage], work: Path, seconds: float, *,
               on_result: Callable[[list[PathResult], bool], None] | None = None, bundle: Path | None = None,
               background: bool = True, results: list[PathResult] | None = None) -> list[PathResult]:
    """Every path in order, each within its budget and the time left; a path whose prerequisite did not pass is
    skipped with the reason. ``on_result`` sees the results after each path (the report is rewritten there)."""
    deadline = time.perf_counter() + seconds
    results: list[PathResult] = [] if results is None else results
    done: dict[str, PathResult] = {}
    jobs: dict[str, Background] = {}
    ctx: dict[str, Any] = {"work": str(work), "results": {}}
    try:
        _run_stages(stages, work, seconds, deadline, results, done, jobs, ctx, on_result, bundle, background)
    except BaseException as err:  # stopped from outside: the path in progress says so, and its process is gone
        stage = next((s for s in stages if s.name not in done), None)
        if stage is not None:
            finish(f"stopped ({one_line(err) if str(err) else type(err).__name__})")
            results.append(PathResult(stage.name, "timeout", f"the run was stopped ({type(err).__name__}"
                                      f"{' ' + str(err) if str(err) else ''}) while this path ran", what=stage.what))
        raise
    finally:
        for job in jobs.values():
            r = job.stop()
            if r is not None and r not in results:
                results.append(r)
    return results


def _run_stages(stages, work, seconds, deadline, results, done, jobs, ctx, on_result, bundle, background) -> None:
    for stage in stages:
        for job_name in stage.background_needs:
            if job_name not in jobs:
                jobs[job_name] = Background(job_name, "", result=PathResult(job_name, "skipped", "not started"))
        left = deadline - time.perf_counter()
        missing = [n for n in stage.needs if done.get(n) is None or done[n].status != "ok"]
        say(f"{stage.name} ...", end=" ")
        if missing:
            r = PathResult(stage.name, "skipped", f"needs {', '.join(missing)}, which did not pass", what=stage.what)
        elif left < 5:
            r = PathResult(stage.name, "skipped", f"no time left in the {seconds:.0f} s budget", what=stage.what)
        else:
            env = None
            blocked = None
            for job_name in stage.background_needs:
                job = jobs[job_name]
                j = job.wait(min(left - 5, stage.budget_s))  # the build's time, bounded
                left = deadline - time.perf_counter()
                if j.status != "ok":
                    blocked = f"{job_name}: {j.status}" + (f" ({j.error})" if j.error else "")
                elif job.pythonpath:
                    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                        p for p in (job.pythonpath, os.environ.get("PYTHONPATH")) if p))
            if blocked:
                r = PathResult(stage.name, "skipped", f"needs {blocked}", what=stage.what)
            elif left < 5:
                r = PathResult(stage.name, "skipped", f"no time left in the {seconds:.0f} s budget", what=stage.what)
            else:
                r = run_stage(stage, ctx, work, min(stage.budget_s, left), env)
        finish(r.line())
        results.append(r)
        done[stage.name] = r
        if r.status == "ok":
            ctx["results"][stage.name] = r.details
        if stage.name == "env" and r.status == "ok" and background:
            jobs["llama-cpp-cuda-build"] = start_llama_cuda_build(bundle, work, r.details.get("capability"))
        if on_result:
            on_result(results + [j.result for j in jobs.values() if j.result is not None and j.result not in results],
                      False)


def run(report_path: Path, work: Path, seconds: float, bundle: Path | None) -> int:
    reason = no_cuda_reason()
    if reason:
        print(f"gpu-check: no CUDA GPU: {reason}; nothing run, no report written", file=sys.stderr)
        return NO_CUDA_EXIT
    started = time.perf_counter()
    commit = commit_of(Path.cwd(), bundle)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GPTQMODEL_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    def save(results: list[PathResult], finished: bool) -> None:
        env = next((p.details for p in results if p.name == "env" and p.status == "ok"), None)
        write_report(report_path, build_report(results, env=env, commit=commit, budget_s=seconds,
                                               total_s=time.perf_counter() - started, finished=finished))

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)  # `timeout` (the Makefile's hard limit): stop the path, keep the report
    results: list[PathResult] = []
    finished = False
    try:
        run_stages(STAGES, work, seconds, on_result=save, bundle=bundle, results=results)
        finished = True
    finally:
        save(results, finished)
    bad = [p.name for p in results if p.status != "ok"]
    say(f"{len(results) - len(bad)}/{len(results)} paths ok in {time.perf_counter() - started:.0f} s; report "
        f"{report_path}" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return FAILED_EXIT if bad else 0


# --- installing the bundle (script mode, before komt_edge is importable) --------------------------------------

def _wheel_dist(path: Path) -> tuple[str, str] | None:
    m = re.match(r"^([A-Za-z0-9_.]+?)-([0-9][^-]*)(?:-|\.tar\.gz$)", path.name)
    return (m.group(1), m.group(2)) if m else None


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [s for s in (proc.stderr or proc.stdout or "").splitlines() if s.strip()]
    return one_line(lines[-1] if lines else f"exit {proc.returncode}", 200)


def install_bundle(bundle: Path, site: Path, root: Path) -> None:
    """Install into ``site`` each wheel/sdist of the bundle that this Python lacks at that version, then
    komt-edge itself from ``root``; offline (--no-index). Skipped when ``site`` was made from the same bundle."""
    from importlib import metadata

    files = sorted(p for p in bundle.iterdir() if p.suffix == ".whl" or p.name.endswith(".tar.gz"))
    files = [p for p in files if not p.name.startswith("llama_cpp_python-")]  # built later, in the background
    digest = hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in files).encode())
    for folder in ("komt_edge", "converters", "benchmarks"):
        for p in sorted((root / folder).rglob("*.py")):
            digest.update(p.read_bytes())
    stamp = site / ".gpu-check-installed"
    if stamp.is_file() and stamp.read_text() == digest.hexdigest():
        say(f"install: {site} is up to date")
        return
    shutil.rmtree(site, ignore_errors=True)
    needed = []
    for p in files:
        dist = _wheel_dist(p)
        try:
            have = metadata.version(dist[0]) if dist else None
        except metadata.PackageNotFoundError:
            have = None
        if dist is None or have != dist[1]:
            needed.append(p)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
           "--no-build-isolation", "--no-cache-dir", "--target", str(site)]
    t0 = time.perf_counter()
    say(f"install: {len(needed)} of {len(files)} bundled packages into {site} ...", end=" ")
    proc = subprocess.run([*pip, *map(str, needed)], capture_output=True, text=True)
    if proc.returncode == 0:
        finish(f"done in {time.perf_counter() - t0:.0f} s")
    else:  # one at a time: what does not install fails the paths that need it, not the others
        finish(f"failed together ({_last_line(proc)}); one at a time:")
        for p in needed:
            say(f"install: {p.name} ...", end=" ")
            one = subprocess.run([*pip, "--upgrade", str(p)], capture_output=True, text=True)
            finish("done" if one.returncode == 0 else f"failed: {_last_line(one)}")
    t0 = time.perf_counter()
    say("install: komt-edge from this tree ...", end=" ")
    proc = subprocess.run([*pip, "--upgrade", str(root)], capture_output=True, text=True, cwd=root)
    if proc.returncode:
        finish(f"failed: {_last_line(proc)}")
        raise SystemExit(FAILED_EXIT)
    shutil.rmtree(root / "build", ignore_errors=True)
    finish(f"done in {time.perf_counter() - t0:.0f} s")
    stamp.write_text(digest.hexdigest())


# --- the bundle (made where PyPI is reachable: `make gpu-wheels`) ----------------------------------------------

# What the GPU machine's image lacks, at the versions the CPU tests run. Its torch, triton, transformers, peft,
# accelerate, huggingface_hub, tokenizers, safetensors, numpy, pyarrow and the CUDA toolkit are used as they are
# there (the report records their versions): transformers 5.25, which the CPU tests run, needs huggingface_hub 2.4,
# which needs httpx2 and a newer click, and so on; the image's transformers 5.x is within komt-edge's range.
BUNDLE_WHEELS = ("bitsandbytes==0.50.2", "optimum==2.3.0", "gguf==0.19.0", "datasets==5.2.0", "dill==0.4.1",
                 "multiprocess==0.70.19", "torchao==0.18.0", "diskcache==5.6.3", "konlpy==0.6.0",
                 "mistral-common==1.13.1")
BUNDLE_BUILT = ("gptqmodel==7.6.0", "tokenicer==0.0.14", "logbar==0.4.15", "defuser==0.0.28", "device-smi==0.5.7")
BUNDLE_SDISTS = ("pypcre==0.6.4",)  # a C extension with no wheel for the GPU machine's Python: built there
# Kept out of the 64 MiB the GPU machine receives: bitsandbytes' libraries for other CUDA versions and ROCm/XPU,
# konlpy's Java and mistral-common's other tokenizers (komt-edge reads konlpy's text files and tokenizer.model.v1
# only), and what the sdist holds beside the sources a CUDA build of the Python package compiles (a .git folder,
# vocabularies, docs, tests, examples, the tools and their web UI; LLAVA_BUILD is off).
BNB_KEEP = ("cuda128", "cuda130", "cuda132", "cpu")  # the image's torch was built for CUDA 13.0
SDIST_DROP = ("vendor/llama.cpp/models/", "vendor/llama.cpp/docs/", "vendor/llama.cpp/tests/",
              "vendor/llama.cpp/benches/", "vendor/llama.cpp/media/", "vendor/llama.cpp/examples/",
              "vendor/llama.cpp/tools/", "vendor/llama.cpp/gguf-py/", "vendor/llama.cpp/conversion/",
              "vendor/llama.cpp/.git", ".git", "examples/", "docs/", "tests/")


def _slim_wheel(path: Path, drop: Callable[[str], bool]) -> None:
    """Rewrite a wheel without the members ``drop`` names (and their RECORD lines)."""
    import zipfile

    tmp = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if drop(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not drop(line.split(",")[0])).encode()
            dst.writestr(info, data)
    os.replace(tmp, path)


def _trim_sdist(src: Path, dst: Path) -> None:
    import tarfile

    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            rel = m.name.split("/", 1)[1] if "/" in m.name else ""
            if any(rel.startswith(d) for d in SDIST_DROP):
                continue
            tout.addfile(m, tin.extractfile(m) if m.isfile() else None)


def make_bundle(bundle: Path, llama_sdist: Path | None, python_version: str = "3.12") -> None:
    """Download (for CPython ``python_version`` on manylinux x86-64) and build what ``make gpu-check`` installs on
    a machine without network; slim the big ones; record the commit."""
    bundle.mkdir(parents=True, exist_ok=True)
    for old in bundle.iterdir():
        old.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
    steps = [("download wheels", [*pip, "download", "-q", "--no-deps", "--only-binary=:all:",
                                  f"--python-version={python_version}", "--implementation=cp", *platforms,
                                  "--platform=manylinux2014_x86_64", "-d", str(bundle), *BUNDLE_WHEELS]),
             ("build pure-Python wheels", [*pip, "wheel", "-q", "--no-deps", "-w", str(bundle), *BUNDLE_BUILT]),
             ("download sources", [*pip, "download", "-q", "--no-deps", "--no-binary=:all:", "--no-build-isolation",
                                   "-d", str(bundle), *BUNDLE_SDISTS])]
    for what, cmd in steps:
        say(f"bundle: {what} ...", end=" ")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            finish(f"failed: {one_line(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip')}")
            raise SystemExit(FAILED_EXIT)
        finish("done")
    for whl in bundle.glob("bitsandbytes-*.whl"):
        _slim_wheel(whl, lambda n: bool(re.match(r"bitsandbytes/libbitsandbytes_\w+\.so$", n))
                    and not any(f"_{k}." in n for k in BNB_KEEP))
    for whl in bundle.glob("konlpy-*.whl"):
        _slim_wheel(whl, lambda n: n.startswith("konlpy/java/"))
    for whl in bundle.glob("mistral_common-*.whl"):
        _slim_wheel(whl, lambda n: n.startswith("mistral_common/data/") and not n.endswith("/tokenizer.model.v1"))
    if llama_sdist is not None and llama_sdist.is_file():
        _trim_sdist(llama_sdist, bundle / llama_sdist.name)
    else:
        say(f"bundle: no llama-cpp-python source at {llama_sdist}: the llama.cpp CUDA row will be skipped")
    (bundle / "commit.json").write_text(json.dumps(commit_of(Path.cwd())) + "\n")
    size = sum(p.stat().st_size for p in bundle.iterdir())
    say(f"bundle: {bundle} holds {len(list(bundle.iterdir()))} files, {size / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--report", type=Path, default=REPORT, help="the JSON report (default %(default)s)")
    parser.add_argument("--work", type=Path, default=Path(".cache/gpu-check"), help="models, outputs and logs")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="time for all paths together")
    parser.add_argument("--bundle", type=Path, default=None, help="the bundle from --make-bundle: install it into "
                        "--site, then run from there")
    parser.add_argument("--site", type=Path, default=Path(".cache/gpu-site"))
    parser.add_argument("--make-bundle", type=Path, metavar="DIR", help="download/build the bundle into DIR and stop")
    parser.add_argument("--llama-sdist", type=Path, help="llama-cpp-python's sdist, trimmed into the bundle")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (for --make-bundle)")
    parser.add_argument("--bundle-used", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return run_child(args.stage, args.ctx, args.result)
    if args.make_bundle:
        make_bundle(args.make_bundle, args.llama_sdist, args.python_version)
        return 0
    reason = no_cuda_reason()
    if reason:  # before any install: one line, no report
        print(f"gpu-check: no CUDA GPU: {reason}; nothing run, no report written", file=sys.stderr)
        return NO_CUDA_EXIT
    if args.bundle is None:
        return run(args.report, args.work, args.seconds, args.bundle_used)
    if not args.bundle.is_dir() or not any(args.bundle.glob("*.whl")):
        print(f"gpu-check: no wheel bundle at {args.bundle}: run `make gpu-wheels` where PyPI is reachable and "
              "carry that folder", file=sys.stderr)
        return NO_CUDA_EXIT
    root = Path(__file__).resolve().parent.parent
    install_bundle(args.bundle, args.site.resolve(), root)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(args.site.resolve()),
                                                                   os.environ.get("PYTHONPATH")) if p))
    return subprocess.call([sys.executable, "-P", "-m", MODULE, "-o", str(args.report), "--work", str(args.work),
                            "--seconds", str(args.seconds), "--bundle-used", str(args.bundle.resolve())], env=env)


if __name__ == "__main__":
    sys.exit(main())
