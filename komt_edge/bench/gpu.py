"""GPU rows of `komt-edge bench speed`: llama.cpp with every layer offloaded, transformers fp16/bf16 `generate`,
and the GPTQ checkpoint, side by side (prompt and generation tokens/s, peak GPU memory).

On a machine without a CUDA GPU every row says "no GPU" instead of failing. The llama.cpp row also needs a
llama-cpp-python built with CUDA (``CMAKE_ARGS="-DGGML_CUDA=on" pip install --no-cache-dir llama-cpp-python``);
the sdist build that ``make install`` does is CPU-only, and the row says so.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..zoo import resolve
from ..llamacpp import LlamaModel, gpu_offload_supported
from .runner import bench_pp, bench_tg

NO_GPU = "no GPU"


@dataclass
class CudaRow:
    """One side-by-side GPU measurement, or the reason there is none."""
    engine: str  # "llama.cpp (all layers on GPU)", "transformers fp16", ...
    model: str
    status: str  # "ok" or why not measured ("no GPU")
    pp_ts: float | None = None
    tg_ts: float | None = None
    peak_gpu_bytes: int | None = None


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken CUDA install counts as none
        return False


class _NvidiaSmiPeak:
    """Peak used GPU memory while a block runs, sampled with nvidia-smi (llama.cpp's allocations are not
    torch's, so torch.cuda.max_memory_allocated cannot see them)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "--id=0"], capture_output=True, text=True, timeout=5).stdout
            return int(out.strip().splitlines()[0]) * 1024 * 1024
        except Exception:
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            v = self._sample()
            if v is not None:
                self.peak = max(self.peak or 0, v)
            time.sleep(self.interval)

    def __enter__(self) -> "_NvidiaSmiPeak":
        self.base = self._sample() or 0
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.peak is not None:
            self.peak -= self.base


def _llama_cpp_rows(files: Sequence[str], n_prompt: int, n_gen: int, repetitions: int) -> list[CudaRow]:
    rows = []
    for f in files:
        name = Path(f).name
        if not cuda_available():
            rows.append(CudaRow("llama.cpp, all layers on GPU", name, NO_GPU))
            continue
        if not gpu_offload_supported():
            rows.append(CudaRow("llama.cpp, all layers on GPU", name,
                                "llama-cpp-python built without CUDA: reinstall with CMAKE_ARGS=-DGGML_CUDA=on"))
            continue
        peak = _NvidiaSmiPeak() if shutil.which("nvidia-smi") else None
        with peak or nullcontext(), LlamaModel(f, n_gpu_layers=999) as model:
            pp = bench_pp(model, n_prompt, repetitions=repetitions)
            tg = bench_tg(model, n_gen, repetitions=repetitions)
        rows.append(CudaRow("llama.cpp, all layers on GPU", name, "ok", pp.mean, tg.mean,
                            peak.peak if peak else None))
    return rows


def _transformers_row(engine: str, model: str, dtype: str, n_prompt: int, n_gen: int, repetitions: int) -> CudaRow:
    """Prefill tokens/s (one forward pass over n_prompt random tokens) and generation tokens/s (greedy
    ``generate`` of exactly n_gen new tokens from a one-token prompt; that one token's forward pass is included in
    the time, not subtracted), mean over repetitions after a warm-up."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(model).path
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    torch.cuda.reset_peak_memory_stats()
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map="cuda").eval()
    vocab = m.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (1, n_prompt), generator=gen).cuda()
    short = ids[:, :1]

    def prefill() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            m(ids)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def generate() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            m.generate(short, max_new_tokens=n_gen, min_new_tokens=n_gen, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    prefill()
    generate()
    pp = [n_prompt / prefill() for _ in range(repetitions)]
    tg = [n_gen / generate() for _ in range(repetitions)]
    peak = int(torch.cuda.max_memory_allocated())
    m = None  # free the weights before the next row
    torch.cuda.empty_cache()
    return CudaRow(engine, str(model), "ok", sum(pp) / len(pp), sum(tg) / len(tg), peak)


def cuda_rows(files: Sequence[str], *, hf: str | None = None, gptq: str | None = None, n_prompt: int = 512,
              n_gen: int = 128, repetitions: int = 5) -> list[CudaRow]:
    """Every GPU row; rows that cannot run say why (``"no GPU"`` on CPU-only machines)."""
    rows = _llama_cpp_rows(files, n_prompt, n_gen, repetitions)
    gpu = cuda_available()
    runs = [(f"transformers {dtype} generate", hf, dtype, "not run: pass --hf MODEL")
            for dtype in ("float16", "bfloat16")]
    runs.append(("transformers GPTQ generate", gptq, "float16", "not run: pass --gptq CHECKPOINT"))
    for engine, model, dtype, hint in runs:
        if not gpu:
            rows.append(CudaRow(engine, model or "-", NO_GPU))
        elif model is None:
            rows.append(CudaRow(engine, "-", hint))
        else:
            try:
                rows.append(_transformers_row(engine, model, dtype, n_prompt, n_gen, repetitions))
            except Exception as err:  # a model that does not fit, a dtype the GPU lacks: report, keep the rest
                rows.append(CudaRow(engine, model, f"failed: {type(err).__name__}: {err}"[:200]))
    return rows
