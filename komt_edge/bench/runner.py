"""llama.cpp through its C API (llama-cpp-python's bindings), driven the way llama-bench and llama-perplexity drive it.

:class:`LlamaModel` is one loaded file, :class:`LlamaRunner` one context on it (tokenize, decode batches, read
logits; nothing is sampled). :func:`bench_pp` and :func:`bench_tg` are llama-bench's two timed tests (the protocol:
:mod:`komt_edge.bench.speed`). llama.cpp's log is cut down to its errors; :func:`environment` records the versions
and hardware every report carries.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..llamacpp import LlamaModel, LlamaRunner, gpu_offload_supported, library
from ..util import dist_version

PP_TOKENS = 512
TG_TOKENS = 128
REPETITIONS = 5


@dataclass
class Rate:
    """One llama-bench test: tokens per run, tokens/s per run, mean ± sample sd."""
    test: str  # "pp512" / "tg128"
    n_tokens: int
    samples_ts: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples_ts))

    @property
    def sd(self) -> float:
        return float(np.std(self.samples_ts, ddof=1)) if len(self.samples_ts) > 1 else 0.0


def _time_ns(fn: Callable[[], None]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def bench_pp(model: str | Path | LlamaModel, n_prompt: int = PP_TOKENS, *, repetitions: int = REPETITIONS,
             n_threads: int | None = None, n_gpu_layers: int = 0, n_batch: int = 2048, n_ubatch: int = 512,
             seed: int = 0) -> Rate:
    """llama-bench's pp test: a context of exactly n_prompt, random tokens (BOS first), decoded in n_batch
    batches with only the last logits requested; a warm-up run, then timed runs from an empty cache. ``model`` is a
    file (loaded with ``n_gpu_layers``) or a :class:`LlamaModel`."""
    rng = np.random.default_rng(seed)
    with LlamaRunner(model, n_ctx=n_prompt, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
                     n_gpu_layers=n_gpu_layers) as r:
        def run() -> None:
            done = 0
            while done < n_prompt:
                n = min(n_prompt - done, n_batch)
                toks = rng.integers(0, r.n_vocab, size=n)
                if done == 0 and r.add_bos:
                    toks[0] = r.bos
                r.decode(toks, done)
                done += n
            r.synchronize()

        r.clear()
        run()  # warm-up
        samples = []
        for _ in range(repetitions):
            r.clear(data=False)
            samples.append(_time_ns(run))
    return Rate(f"pp{n_prompt}", n_prompt, [n_prompt * 1e9 / ns for ns in samples])


def bench_tg(model: str | Path | LlamaModel, n_gen: int = TG_TOKENS, *, repetitions: int = REPETITIONS,
             n_threads: int | None = None, n_gpu_layers: int = 0, seed: int = 0) -> Rate:
    """llama-bench's tg test: a context of exactly n_gen, one token per decode (BOS, then random ids), logits
    computed for each; a one-token warm-up, then timed runs from an empty cache. ``model`` is a file (loaded with
    ``n_gpu_layers``) or a :class:`LlamaModel`."""
    rng = np.random.default_rng(seed)
    with LlamaRunner(model, n_ctx=n_gen, n_batch=2048, n_threads=n_threads, n_gpu_layers=n_gpu_layers) as r:
        def run(n: int) -> None:
            tok = r.bos if r.add_bos else int(rng.integers(r.n_vocab))
            for pos in range(n):
                r.decode((tok,), pos)
                r.synchronize()
                tok = int(rng.integers(r.n_vocab))

        r.clear()
        run(1)  # warm-up
        samples = []
        for _ in range(repetitions):
            r.clear(data=False)
            samples.append(_time_ns(lambda: run(n_gen)))
    return Rate(f"tg{n_gen}", n_gen, [n_gen * 1e9 / ns for ns in samples])


# ---------------------------------------------------------------------------------------------------
# This machine: versions and hardware, for every JSON report.
# ---------------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_bytes(field: str) -> int | None:
    """A line of /proc/meminfo (``MemTotal``, ``MemAvailable``) in bytes; None where there is no /proc."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_available_bytes() -> int | None:
    """Memory available to new processes now (the kernel's MemAvailable), or None where it cannot be read."""
    return _meminfo_bytes("MemAvailable")


def environment() -> dict:
    """Versions and hardware: what a reader needs to compare two benchmark JSON files."""
    gpus = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover - torch is a dependency, but a broken CUDA install must not stop a report
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "komt_edge": dist_version("komt-edge"),
        "llama_cpp_python": dist_version("llama-cpp-python"),
        "llama_cpp_system_info": library().llama_print_system_info().decode().strip(),
        "gguf": dist_version("gguf"),
        "torch": dist_version("torch"),
        "transformers": dist_version("transformers"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _meminfo_bytes("MemTotal"),
        "gpus": gpus,
        "gpu_offload_in_llama_cpp": gpu_offload_supported(),
        "load_average": list(load) if load else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
