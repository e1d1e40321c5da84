"""`komt-edge bench speed`: what each GGUF file costs, in tokens and Korean characters per second.

:func:`speed` follows llama-bench's protocol, each file loaded once for all its tests: ``pp512`` decodes 512 random
tokens in one batch (n_batch 2048, n_ubatch 512, a context of exactly 512), ``tg128`` decodes 128 random tokens one
at a time (a context of 128); one warm-up run, then ``repetitions`` timed runs from an empty KV cache; tokens/s is
computed per run and reported as mean ± sample sd. Tokenization and sampling are not timed (random token ids, no
sampler); the timed tests are :func:`~komt_edge.bench.runner.bench_pp` and :func:`~komt_edge.bench.runner.bench_tg`.
Added: Korean characters per second (tokens/s × the file's characters per token on held-out Korean text), bits per
weight, and tg as a fraction of the memory-bandwidth roofline (bytes read per generated token ÷ the measured read
bandwidth of this machine at the same thread count); and the GPU rows of :mod:`komt_edge.bench.gpu`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..converters.gguf_file import FileInfo, file_info
from ..errors import KomtError
from .gpu import CudaRow, cuda_rows
from ..llamacpp import LlamaModel, LlamaRunner
from .runner import PP_TOKENS, REPETITIONS, TG_TOKENS, Rate, bench_pp, bench_tg, environment
from .table import MIB, cell, type_label
from .text import korean_eval_text


@dataclass
class SpeedResult:
    file: FileInfo
    backend: str  # "CPU" or the GPU name
    n_threads: int
    n_gpu_layers: int
    pp: Rate
    tg: Rate
    chars_per_token: float | None  # Korean characters per token with this file's tokenizer
    bandwidth_bytes_s: float | None  # measured read bandwidth at n_threads
    load_average: list[float] | None = None

    @property
    def pp_chars_s(self) -> float | None:
        return self.pp.mean * self.chars_per_token if self.chars_per_token else None

    @property
    def tg_chars_s(self) -> float | None:
        return self.tg.mean * self.chars_per_token if self.chars_per_token else None

    @property
    def roofline_tg(self) -> float | None:
        """The bandwidth-bound generation rate: bandwidth ÷ bytes read per token."""
        if not self.bandwidth_bytes_s:
            return None
        return self.bandwidth_bytes_s / self.file.bytes_per_token

    @property
    def roofline_fraction(self) -> float | None:
        roof = self.roofline_tg
        return self.tg.mean / roof if roof else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["file"]["bpw"] = self.file.bpw
        for k in ("pp", "tg"):
            d[k].update(mean=getattr(self, k).mean, sd=getattr(self, k).sd)
        d.update(pp_chars_s=self.pp_chars_s, tg_chars_s=self.tg_chars_s, roofline_tg=self.roofline_tg,
                 roofline_fraction=self.roofline_fraction)
        return d


@dataclass
class SpeedReport:
    results: list[SpeedResult]
    bandwidth: dict[int, float]  # threads → read bytes/s
    cuda: list[CudaRow]
    korean_text: str
    env: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": "speed", "results": [r.to_dict() for r in self.results],
                "bandwidth_bytes_s": {str(k): v for k, v in self.bandwidth.items()},
                "cuda": [asdict(c) for c in self.cuda], "korean_text": self.korean_text, "env": self.env}

    def summary(self) -> str:
        """The Markdown tables `komt-edge bench speed` prints: the CPU rows, then the GPU rows."""
        bw = ", ".join(f"{t} thread{'s' if t > 1 else ''}: {v / 1e9:.1f} GB/s" for t, v in self.bandwidth.items())
        lines = [f"Measured memory read bandwidth: {bw or 'not measured'}. Korean characters per token from "
                 f"{self.korean_text}.", ""]
        if self.results:
            pp_name, tg_name = self.results[0].pp.test, self.results[0].tg.test
            lines += [f"| file | type | size (MiB) | bpw | threads | {pp_name} t/s | {tg_name} t/s | chars/token | "
                      f"{pp_name} chars/s | {tg_name} chars/s | tg roofline t/s | of roofline |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for r in self.results:
                roof = r.roofline_fraction and 100 * r.roofline_fraction
                lines.append(
                    f"| {r.file.name} | {type_label(r.file)} | {r.file.size_bytes / MIB:.1f} | {r.file.bpw:.2f} | "
                    f"{r.n_threads} | {r.pp.mean:.2f} ± {r.pp.sd:.2f} | {r.tg.mean:.2f} ± {r.tg.sd:.2f} | "
                    f"{cell(r.chars_per_token, '.3f')} | {cell(r.pp_chars_s, '.1f')} | {cell(r.tg_chars_s, '.1f')} | "
                    f"{cell(r.roofline_tg, '.1f')} | {cell(roof, '.0f')}% |")
        if self.cuda:
            lines += ["", "GPU (CUDA):", "", "| engine | model | pp t/s | tg t/s | peak GPU memory (MiB) | status |",
                      "| --- | --- | ---: | ---: | ---: | --- |"]
            for c in self.cuda:
                lines.append(f"| {c.engine} | {c.model} | {cell(c.pp_ts, '.1f')} | {cell(c.tg_ts, '.1f')} | "
                             f"{cell(c.peak_gpu_bytes and c.peak_gpu_bytes / MIB, '.0f')} | {c.status} |")
        return "\n".join(lines) + "\n"


def measure_bandwidth(n_threads: int = 1, size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory read bandwidth (bytes/s): ``n_threads`` threads each reduce their slice of a buffer far larger than
    the caches (numpy releases the GIL); best of ``repeats``, as STREAM reports."""
    words = np.ones(size_bytes // 8, dtype=np.uint64)
    parts = np.array_split(words, n_threads)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        barrier = threading.Barrier(n_threads + 1)

        def work(a: np.ndarray) -> None:
            barrier.wait()
            np.bitwise_or.reduce(a)

        threads = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return words.nbytes / best


def korean_chars_per_token(model: str | Path | LlamaModel, text: str) -> float:
    """Characters per token of ``text`` with the file's tokenizer (no BOS): converts tokens/s to characters/s."""
    with LlamaRunner(model, n_ctx=64, n_batch=64, n_threads=1) as r:
        n = len(r.tokenize(text, add_special=False))
    return len(text) / n if n else float("nan")


def speed(files: Sequence[str | Path], *, n_prompt: int = PP_TOKENS, n_gen: int = TG_TOKENS,
          repetitions: int = REPETITIONS, n_threads: Iterable[int] | int | None = None, n_gpu_layers: int = 0,
          text: str | Path | None = None, source: str = "konlpy", bandwidth: bool = True,
          cuda: bool = True, hf: str | None = None, gptq: str | None = None,
          progress: bool = True) -> SpeedReport:
    """llama-bench's pp/tg for every file at every thread count (default: all cores), with Korean characters/s
    and the roofline; with ``cuda``, the GPU rows (``hf``, ``gptq``: the checkpoints for the transformers rows)."""
    from tqdm.auto import tqdm

    if not files:
        raise KomtError("no GGUF file given: pass one or more files to benchmark")
    if repetitions < 1:
        raise KomtError("--repetitions must be at least 1")
    infos = [file_info(f) for f in files]
    threads = [n_threads] if isinstance(n_threads, int) else list(n_threads or [os.cpu_count() or 1])
    body, described = korean_eval_text(text, source=source)
    sample = body[:20000]
    bw = {t: measure_bandwidth(t) for t in threads} if bandwidth and n_gpu_layers == 0 else {}
    results = []
    with tqdm(total=len(infos) * len(threads) * 2, desc="speed", unit="test", disable=not progress) as bar:
        for info in infos:
            with LlamaModel(info.path, n_gpu_layers=n_gpu_layers) as model:  # one load per file, as llama-bench
                cpt = korean_chars_per_token(model, sample)
                for t in threads:
                    bar.set_postfix_str(f"{info.name} t={t} pp")
                    pp = bench_pp(model, n_prompt, repetitions=repetitions, n_threads=t)
                    bar.update(1)
                    bar.set_postfix_str(f"{info.name} t={t} tg")
                    tg = bench_tg(model, n_gen, repetitions=repetitions, n_threads=t)
                    bar.update(1)
                    backend = "CPU" if n_gpu_layers == 0 else "GPU"
                    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
                    results.append(SpeedResult(info, backend, t, n_gpu_layers, pp, tg, cpt, bw.get(t), load))
    gpu_rows = cuda_rows([i.path for i in infos], hf=hf, gptq=gptq, n_prompt=n_prompt, n_gen=n_gen,
                         repetitions=repetitions) if cuda else []
    return SpeedReport(results, bw, gpu_rows, described, environment())
