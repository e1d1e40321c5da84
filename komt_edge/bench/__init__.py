"""`komt-edge bench`: what each GGUF file costs (speed), what it loses in Korean (quality), komt's judged score.

One import direction, bottom to top: a module imports only from the layers listed before its own (in layer 2,
``speed`` also imports ``gpu``):

1. ``runner`` (llama.cpp: models, contexts, llama-bench's pp/tg timing, the environment), ``text`` (the Korean
   evaluation text), ``table`` (how the tables write types and numbers);
2. ``gpu`` (the CUDA rows), ``speed``, ``quality`` (perplexity, KL), ``judge`` (komt's LLM-judged score);
3. ``report`` (OUT.md, OUT.json, OUT.png; :class:`BenchReport`);
4. this module: the public API, and :func:`bench_all`.

``gemma`` (Gemma 3 270M as a Hugging Face folder, for the converter tests and benchmarks) stands apart.
Every command of `komt-edge bench` calls one function here and prints its report's ``summary()``. Here
``quality``, ``speed`` and ``judge`` name the functions; ``from komt_edge.bench.quality import ...`` reaches a module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .judge import JudgeReport, judge, judge_prompt
from .quality import DEFAULT_N_CTX, QualityReport, pick_reference, quality
from .report import BenchReport, write_outputs
from ..llamacpp import LlamaModel, LlamaRunner
from .runner import PP_TOKENS, REPETITIONS, TG_TOKENS, environment
from .speed import SpeedReport, speed
from .text import korean_eval_text

__all__ = ["BenchReport", "JudgeReport", "LlamaModel", "LlamaRunner", "QualityReport", "SpeedReport", "bench_all",
           "environment", "judge", "judge_prompt", "korean_eval_text", "pick_reference", "quality", "speed",
           "write_outputs"]


def bench_all(files: Sequence[str | Path], *, reference: str | Path | None = None,
              n_threads: list[int] | None = None, n_ctx: int = DEFAULT_N_CTX, n_chunks: int | None = None,
              repetitions: int = REPETITIONS, n_prompt: int = PP_TOKENS, n_gen: int = TG_TOKENS,
              n_gpu_layers: int = 0, text: str | Path | None = None, source: str = "konlpy", cuda: bool = True,
              hf: str | None = None, gptq: str | None = None, progress: bool = True) -> BenchReport:
    """Quality, then speed, of ``files`` (`komt-edge bench all`, what `make bench` runs).

    The KL reference is ``reference``, else :func:`pick_reference` (the first F32/F16/BF16 file; none: perplexity
    only). Quality runs at the largest of ``n_threads``, speed at each of them (default: all cores)."""
    if reference is None:
        reference = pick_reference(files)
    q = quality(files, reference, text=text, source=source, n_ctx=n_ctx, n_chunks=n_chunks,
                n_threads=max(n_threads) if n_threads else None, n_gpu_layers=n_gpu_layers, progress=progress)
    s = speed(files, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, n_threads=n_threads,
              n_gpu_layers=n_gpu_layers, text=text, source=source, cuda=cuda, hf=hf, gptq=gptq, progress=progress)
    return BenchReport(q, s)
