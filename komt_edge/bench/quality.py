"""`komt-edge bench quality`: what each GGUF file loses in Korean, as perplexity and KL divergence.

:func:`quality` is llama-perplexity's protocol: the whole text is tokenized once (with BOS), cut into ``n_ctx``
chunks, the first token of each chunk replaced by BOS, and only the second half of each chunk is scored (positions
n_ctx/2 … n_ctx-2 predict the next token). Against a reference file it computes what ``llama-perplexity
--kl-divergence`` prints: mean/median/p99/max KL(reference ‖ file), same-top-token rate, RMS Δp, PPL ratio and ΔPPL,
with llama.cpp's uncertainty formulas. The reference's log-probabilities are kept for one chunk at a time and every
file is compared against them in the same pass: no logits file is written (llama.cpp's base file is ~3 GB per 12k
tokens for a 262k vocabulary). KL is computed from full float32 log-probabilities, where llama.cpp stores the
reference as 16-bit codes and drops p < e⁻¹⁶: the two agree to the precision that matters (README, "Benchmarks").
:func:`pick_reference` chooses the reference among the files: the first F32/F16/BF16 one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..converters.gguf_file import FileInfo, file_info
from ..errors import KomtError
from ..llamacpp import LlamaRunner
from .runner import environment, mem_available_bytes
from .table import MIB, type_label
from .text import korean_eval_text

DEFAULT_N_CTX = 512


@dataclass
class KLStats:
    """llama-perplexity --kl-divergence's statistics for one file against the reference."""
    mean_kld: float
    mean_kld_unc: float
    median_kld: float
    p90_kld: float
    p99_kld: float
    p999_kld: float
    max_kld: float
    same_top: float  # fraction of positions whose argmax equals the reference's
    same_top_unc: float
    rms_dp: float  # RMS of the change in the probability of the actual next token
    rms_dp_unc: float
    ppl_base: float
    ln_ppl_ratio: float
    ln_ppl_ratio_unc: float
    ppl_ratio: float
    ppl_ratio_unc: float
    delta_ppl: float
    delta_ppl_unc: float


@dataclass
class QualityResult:
    file: FileInfo
    tokens: int  # scored tokens
    ppl: float
    ppl_unc: float
    kl: KLStats | None = None
    seconds: float = 0.0


@dataclass
class QualityReport:
    results: list[QualityResult]
    reference: str | None
    corpus: str
    n_ctx: int
    n_chunks: int
    tokens_total: int
    env: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": "quality", **asdict(self)}

    def summary(self) -> str:
        """The Markdown table `komt-edge bench quality` prints: PPL, and with a reference the KL statistics."""
        ref = Path(self.reference).name if self.reference else None
        lines = [f"Korean text: {self.corpus}; {self.n_chunks} chunks of {self.n_ctx} tokens, the second half of "
                 f"each scored ({self.results[0].tokens if self.results else 0} tokens)"
                 + (f"; reference {ref}" if ref else "") + ".", ""]
        if ref:
            lines += ["| file | type | size (MiB) | bpw | PPL | ΔPPL | PPL ratio | mean KLD | p99 KLD | max KLD | "
                      "same top |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for r in self.results:
                k = r.kl
                lines.append(
                    f"| {r.file.name} | {type_label(r.file)} | {r.file.size_bytes / MIB:.1f} | {r.file.bpw:.2f} | "
                    f"{r.ppl:.4f} ± {r.ppl_unc:.4f} | {k.delta_ppl:+.4f} | {k.ppl_ratio:.4f} | "
                    f"{k.mean_kld:.5f} ± {k.mean_kld_unc:.5f} | {k.p99_kld:.4f} | {k.max_kld:.4f} | "
                    f"{100 * k.same_top:.2f}% |")
        else:
            lines += ["| file | type | size (MiB) | bpw | PPL |", "| --- | --- | ---: | ---: | ---: |"]
            for r in self.results:
                lines.append(f"| {r.file.name} | {type_label(r.file)} | {r.file.size_bytes / MIB:.1f} | "
                             f"{r.file.bpw:.2f} | {r.ppl:.4f} ± {r.ppl_unc:.4f} |")
        return "\n".join(lines) + "\n"


class _Acc:
    """Running sums, as llama.cpp's kl_divergence_result."""

    def __init__(self) -> None:
        self.nll: list[np.ndarray] = []
        self.nll_base: list[np.ndarray] = []
        self.kld: list[np.ndarray] = []
        self.dp: list[np.ndarray] = []
        self.same_top = 0
        self.count = 0


def _mean_unc(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: mean and standard error (0 for ≤ 10 values)."""
    n = len(values)
    if n < 1:
        return 0.0, 0.0
    f = float(values.sum(dtype=np.float64) / n)
    df = float((values.astype(np.float64) ** 2).sum() / n - f * f)
    return f, (np.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _log_softmax_rows(x: np.ndarray):
    """Row-wise log-softmax of a logits block as llama.cpp computes it (float32 exponentials summed in float64),
    with torch's vectorised kernels; a new tensor, sharing nothing with llama.cpp's buffer."""
    import torch

    z = torch.from_numpy(x)
    z = z - z.max(dim=1, keepdim=True).values
    lse = torch.log(torch.exp(z).sum(dim=1, keepdim=True, dtype=torch.float64)).to(torch.float32)
    return z.sub_(lse)


_ROW_BLOCK = 32  # rows per block of vocabulary-wide arithmetic: bounds temporaries for 262k vocabularies


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    out = np.empty(len(targets), dtype=np.float64)
    for s in range(0, len(targets), _ROW_BLOCK):
        lp = _log_softmax_rows(logits[s:s + _ROW_BLOCK]).numpy()
        out[s:s + _ROW_BLOCK] = -lp[np.arange(len(lp)), targets[s:s + _ROW_BLOCK]]
    return out


def chunk_plan(n_tokens: int, n_ctx: int, n_chunks: int | None = None) -> int:
    """How many chunks llama-perplexity scores: all whole chunks, at least two."""
    if n_ctx < 8:
        raise KomtError(f"--ctx {n_ctx} is too small: use at least 8 (llama-perplexity's default is 512)")
    if n_tokens < 2 * n_ctx:
        raise KomtError(f"the text is {n_tokens} tokens, shorter than two chunks of {n_ctx}: llama-perplexity needs "
                        f"at least {2 * n_ctx}; pass a longer text or a smaller --ctx")
    total = n_tokens // n_ctx
    return total if n_chunks is None or n_chunks <= 0 else min(n_chunks, total)


def _plan_groups(sizes: list[int], ref_size: int, budget: int | None) -> list[list[int]]:
    """Files evaluated together in one pass over the text, so that the reference runs once per group."""
    if budget is None:
        return [list(range(len(sizes)))]
    groups: list[list[int]] = []
    current: list[int] = []
    used = ref_size
    for i, s in enumerate(sizes):
        if current and used + s > budget:
            groups.append(current)
            current, used = [], ref_size
        current.append(i)
        used += s
    if current:
        groups.append(current)
    return groups


def pick_reference(files: Sequence[str | Path]) -> Path | None:
    """The KL-divergence reference among ``files``: the first F32, F16 or BF16 file; None when all are quantized.
    Paths that are not files are skipped (:func:`quality` reports them)."""
    return next((Path(f) for f in files if Path(f).is_file() and file_info(f).is_float), None)


def quality(files: Sequence[str | Path], reference: str | Path | None = None, *, text: str | Path | None = None,
            source: str = "konlpy", n_ctx: int = DEFAULT_N_CTX, n_chunks: int | None = None,
            n_threads: int | None = None, n_gpu_layers: int = 0, progress: bool = True,
            memory_budget: int | None = None) -> QualityReport:
    """Perplexity of every file on Korean text and, with a reference, llama-perplexity's KL statistics.

    ``text`` is a UTF-8 file (default: the held-out split of the built-in corpus ``source``). Files and the
    reference are loaded together when they fit in ``memory_budget`` bytes (default: 90% of available memory);
    otherwise they are compared in groups and the reference is re-evaluated per group.
    """
    from tqdm.auto import tqdm

    if not files:
        raise KomtError("no GGUF file given: pass one or more files to benchmark")
    paths = [Path(f) for f in files]
    infos = [file_info(p) for p in paths]
    ref_info = file_info(reference) if reference is not None else None
    body, corpus = korean_eval_text(text, source=source)

    opts = dict(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(512, n_ctx), n_threads=n_threads, n_gpu_layers=n_gpu_layers)
    # Tokenize with the reference (or the first file); every file must tokenize the text identically.
    tok_path = Path(reference) if reference is not None else paths[0]
    with LlamaRunner(tok_path, **opts) as first:
        tokens = first.tokenize(body)
        prefix = first.tokenize(body[:4000])
        n_vocab, add_bos, bos = first.n_vocab, first.add_bos, first.bos
    chunks = chunk_plan(len(tokens), n_ctx, n_chunks)
    half = n_ctx // 2
    scored_per_chunk = n_ctx - 1 - half

    if memory_budget is None:
        avail = mem_available_bytes()
        memory_budget = int(avail * 0.9) if avail else None
    groups = _plan_groups([i.size_bytes for i in infos], ref_info.size_bytes if ref_info else 0, memory_budget)

    accs = [_Acc() for _ in paths]
    seconds = [0.0 for _ in paths]
    bar = tqdm(total=chunks * (len(paths) + (len(groups) if reference is not None else 0)), unit="chunk",
               desc="quality", disable=not progress)
    try:
        for group in groups:
            runners: list[LlamaRunner] = []
            ref = None
            try:
                if reference is not None:
                    ref = LlamaRunner(reference, **opts)
                for i in group:
                    r = LlamaRunner(paths[i], **opts)
                    runners.append(r)
                    if r.n_vocab != n_vocab:
                        raise KomtError(f"{paths[i].name} has {r.n_vocab} tokens in its vocabulary but "
                                        f"{tok_path.name} has {n_vocab}: compare files of the same model")
                    if not np.array_equal(r.tokenize(body[:4000]), prefix):
                        raise KomtError(f"{paths[i].name} tokenizes the text differently from {tok_path.name}: "
                                        "compare files made from the same model")
                for c in range(chunks):
                    chunk = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
                    if add_bos:
                        chunk[0] = bos
                    targets = chunk[half + 1:]
                    ref_lp = None
                    nll_base = None
                    if ref is not None:
                        ref.clear()
                        n_out = ref.decode(chunk, 0, logits_from=half)
                        ref_logits = ref.logits(n_out)[:scored_per_chunk]
                        ref_lp = np.empty((scored_per_chunk, n_vocab), dtype=np.float32)
                        for s in range(0, scored_per_chunk, _ROW_BLOCK):
                            ref_lp[s:s + _ROW_BLOCK] = _log_softmax_rows(ref_logits[s:s + _ROW_BLOCK]).numpy()
                        nll_base = -ref_lp[np.arange(scored_per_chunk), targets].astype(np.float64)
                        bar.update(1)
                    for r, i in zip(runners, group):
                        t0 = time.perf_counter()
                        r.clear()
                        n_out = r.decode(chunk, 0, logits_from=half)
                        logits = r.logits(n_out)[:scored_per_chunk]
                        acc = accs[i]
                        if ref_lp is None:
                            acc.nll.append(_nll_rows(logits, targets))
                        else:
                            _compare_chunk(acc, logits, ref_lp, targets, nll_base)
                        acc.count += scored_per_chunk
                        seconds[i] += time.perf_counter() - t0
                        bar.update(1)
            finally:
                for r in runners:
                    r.close()
                if ref is not None:
                    ref.close()
    finally:
        bar.close()

    results = []
    for info, acc, secs in zip(infos, accs, seconds):
        nll = np.concatenate(acc.nll)
        lnppl, lnppl_unc = _mean_unc(nll)
        ppl = float(np.exp(lnppl))
        res = QualityResult(info, int(len(nll)), ppl, ppl * lnppl_unc, seconds=secs)
        if reference is not None:
            res.kl = _kl_stats(acc, nll)
        results.append(res)
    return QualityReport(results, str(reference) if reference is not None else None, corpus, n_ctx, chunks,
                         int(len(tokens)), environment())


def _compare_chunk(acc: _Acc, logits: np.ndarray, ref_lp: np.ndarray, targets: np.ndarray,
                   nll_base: np.ndarray) -> None:
    import torch

    n = len(targets)
    kld = np.empty(n, dtype=np.float64)
    nll = np.empty(n, dtype=np.float64)
    same = 0
    for s in range(0, n, _ROW_BLOCK):
        lq = _log_softmax_rows(logits[s:s + _ROW_BLOCK])
        lp = torch.from_numpy(ref_lp[s:s + _ROW_BLOCK])
        kld[s:s + _ROW_BLOCK] = (lp.exp() * (lp - lq)).sum(dim=1, dtype=torch.float64).numpy()
        rows = torch.arange(len(lq))
        nll[s:s + _ROW_BLOCK] = -lq[rows, torch.from_numpy(targets[s:s + _ROW_BLOCK]).long()].double().numpy()
        same += int((lq.argmax(dim=1) == lp.argmax(dim=1)).sum())
    acc.kld.append(np.maximum(kld, 0.0))  # rounding can make a zero KL slightly negative
    acc.nll.append(nll)
    acc.nll_base.append(nll_base)
    acc.dp.append(np.exp(-nll) - np.exp(-nll_base))
    acc.same_top += same


def _kl_stats(acc: _Acc, nll: np.ndarray) -> KLStats:
    kld = np.concatenate(acc.kld)
    base = np.concatenate(acc.nll_base)
    dp = np.concatenate(acc.dp)
    n = len(kld)
    ln, ln_unc = _mean_unc(nll)
    lb, lb_unc = _mean_unc(base)
    cov = 0.0
    if n >= 10:
        cov = float(((nll * base).sum() / n - (nll.sum() / n) * (base.sum() / n)) / (n - 1))
    ratio_ln = ln - lb
    ratio_ln_unc = float(np.sqrt(max(ln_unc ** 2 + lb_unc ** 2 - 2 * cov, 0.0)))
    ppl, ppl_base = float(np.exp(ln)), float(np.exp(lb))
    ppl_unc, base_unc = ppl * ln_unc, ppl_base * lb_unc
    ppl_cov = ppl * ppl_base * cov
    mean_kld, mean_kld_unc = _mean_unc(kld)
    mse, mse_unc = _mean_unc(dp ** 2)
    rms = float(np.sqrt(mse))
    top = acc.same_top / n
    return KLStats(
        mean_kld=mean_kld, mean_kld_unc=mean_kld_unc,
        median_kld=float(np.median(kld)), p90_kld=float(np.percentile(kld, 90)),
        p99_kld=float(np.percentile(kld, 99)), p999_kld=float(np.percentile(kld, 99.9)), max_kld=float(kld.max()),
        same_top=top, same_top_unc=float(np.sqrt(top * (1 - top) / (n - 1))) if n > 1 else 0.0,
        rms_dp=rms, rms_dp_unc=(0.5 / rms * mse_unc) if rms > 0 else 0.0,
        ppl_base=ppl_base, ln_ppl_ratio=ratio_ln, ln_ppl_ratio_unc=ratio_ln_unc,
        ppl_ratio=float(np.exp(ratio_ln)), ppl_ratio_unc=float(np.exp(ratio_ln)) * ratio_ln_unc,
        delta_ppl=ppl - ppl_base,
        delta_ppl_unc=float(np.sqrt(max(ppl_unc ** 2 + base_unc ** 2 - 2 * ppl_cov, 0.0))),
    )
