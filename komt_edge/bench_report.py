"""Benchmark output: Markdown tables, JSON (with versions and hardware) and a PNG of quality and speed vs size."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from .bench import FileInfo, QualityReport, SpeedReport

MIB = 1024 * 1024


def type_label(info: FileInfo) -> str:
    """The short type name: MOSTLY_Q4_K_M → Q4_K_M, ALL_F32 → F32."""
    ft = info.file_type
    for prefix in ("MOSTLY_", "ALL_"):
        if ft.startswith(prefix):
            return ft[len(prefix):]
    return ft


def _f(x: float | None, spec: str = ".4g", empty: str = "–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return empty
    return format(x, spec)


def quality_markdown(report: QualityReport) -> str:
    ref = Path(report.reference).name if report.reference else None
    lines = [f"Korean text: {report.corpus}; {report.n_chunks} chunks of {report.n_ctx} tokens, the second half of "
             f"each scored ({report.results[0].tokens if report.results else 0} tokens)"
             + (f"; reference {ref}" if ref else "") + ".", ""]
    if ref:
        lines += ["| file | type | size (MiB) | bpw | PPL | ΔPPL | PPL ratio | mean KLD | p99 KLD | max KLD | "
                  "same top |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in report.results:
            k = r.kl
            lines.append(
                f"| {r.file.name} | {type_label(r.file)} | {r.file.size_bytes / MIB:.1f} | {r.file.bpw:.2f} | "
                f"{r.ppl:.4f} ± {r.ppl_unc:.4f} | {k.delta_ppl:+.4f} | {k.ppl_ratio:.4f} | "
                f"{k.mean_kld:.5f} ± {k.mean_kld_unc:.5f} | {k.p99_kld:.4f} | {k.max_kld:.4f} | "
                f"{100 * k.same_top:.2f}% |")
    else:
        lines += ["| file | type | size (MiB) | bpw | PPL |", "| --- | --- | ---: | ---: | ---: |"]
        for r in report.results:
            lines.append(f"| {r.file.name} | {type_label(r.file)} | {r.file.size_bytes / MIB:.1f} | "
                         f"{r.file.bpw:.2f} | {r.ppl:.4f} ± {r.ppl_unc:.4f} |")
    return "\n".join(lines) + "\n"


def speed_markdown(report: SpeedReport) -> str:
    bw = ", ".join(f"{t} thread{'s' if t > 1 else ''}: {v / 1e9:.1f} GB/s" for t, v in report.bandwidth.items())
    lines = [f"Measured memory read bandwidth: {bw or 'not measured'}. Korean characters per token from "
             f"{report.korean_text}.", ""]
    if report.results:
        pp_name, tg_name = report.results[0].pp.test, report.results[0].tg.test
        lines += [f"| file | type | size (MiB) | bpw | threads | {pp_name} t/s | {tg_name} t/s | chars/token | "
                  f"{pp_name} chars/s | {tg_name} chars/s | tg roofline t/s | of roofline |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in report.results:
            lines.append(
                f"| {r.file.name} | {type_label(r.file)} | {r.file.size_bytes / MIB:.1f} | {r.file.bpw:.2f} | "
                f"{r.n_threads} | {r.pp.mean:.2f} ± {r.pp.sd:.2f} | {r.tg.mean:.2f} ± {r.tg.sd:.2f} | "
                f"{_f(r.chars_per_token, '.3f')} | {_f(r.pp_chars_s, '.1f')} | {_f(r.tg_chars_s, '.1f')} | "
                f"{_f(r.roofline_tg, '.1f')} | {_f(r.roofline_fraction and 100 * r.roofline_fraction, '.0f')}% |")
    if report.cuda:
        lines += ["", "GPU (CUDA):", "", "| engine | model | pp t/s | tg t/s | peak GPU memory (MiB) | status |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for c in report.cuda:
            lines.append(f"| {c.engine} | {c.model} | {_f(c.pp_ts, '.1f')} | {_f(c.tg_ts, '.1f')} | "
                         f"{_f(c.peak_gpu_bytes and c.peak_gpu_bytes / MIB, '.0f')} | {c.status} |")
    return "\n".join(lines) + "\n"


def to_json(report: QualityReport | SpeedReport) -> str:
    data = report.to_dict()
    if isinstance(report, QualityReport):
        for r, d in zip(report.results, data["results"]):
            d["file"]["bpw"] = r.file.bpw
            d["file"]["type"] = type_label(r.file)
    return json.dumps(data, ensure_ascii=False, indent=2, default=float)


def plot(quality: QualityReport | None, speed: SpeedReport | None, out: Path, *, title: str = "") -> Path:
    """Quality vs size (mean KLD, or PPL without a reference) and generation speed vs size, one point per file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (quality, speed) if p is not None and p.results]
    if not panels:
        raise ValueError("nothing to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    col = 0
    if quality is not None and quality.results:
        ax = axes[0][col]
        col += 1
        use_kl = quality.reference is not None
        results = sorted(quality.results, key=lambda r: r.file.size_bytes)
        xs = [r.file.size_bytes / MIB for r in results]
        ys = [(r.kl.mean_kld if use_kl else r.ppl) for r in results]
        ax.plot(xs, ys, "o-" if len(xs) > 1 else "o")
        for x, y, r in zip(xs, ys, results):
            ax.annotate(type_label(r.file), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("file size (MiB)")
        if use_kl:
            ax.set_yscale("symlog", linthresh=1e-4)
            ax.set_ylabel(f"mean KL divergence vs {Path(quality.reference).name}")
        else:
            ax.set_ylabel("perplexity")
        ax.set_title(f"Korean quality (n_ctx {quality.n_ctx})")
        ax.grid(alpha=0.3)
    if speed is not None and speed.results:
        ax = axes[0][col]
        by_threads: dict[int, list] = {}
        for r in speed.results:
            by_threads.setdefault(r.n_threads, []).append(r)
        for t, rs in sorted(by_threads.items()):
            rs = sorted(rs, key=lambda r: r.file.size_bytes)
            xs = [r.file.size_bytes / MIB for r in rs]
            ax.errorbar(xs, [r.tg.mean for r in rs], yerr=[r.tg.sd for r in rs], fmt="o-", capsize=3,
                        label=f"{rs[0].tg.test}, {t} thr")
            ax.errorbar(xs, [r.pp.mean for r in rs], yerr=[r.pp.sd for r in rs], fmt="s--", capsize=3,
                        label=f"{rs[0].pp.test}, {t} thr")
            roof = [(r.roofline_tg, r) for r in rs if r.roofline_tg]
            if roof:
                ax.plot([r.file.size_bytes / MIB for _, r in roof], [v for v, _ in roof], ":", color="gray",
                        label=f"bandwidth roofline, {t} thr")
            for r in rs:
                ax.annotate(type_label(r.file), (r.file.size_bytes / MIB, r.tg.mean), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel("tokens / s")
        ax.set_title("llama.cpp speed (CPU)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(reports: Sequence[QualityReport | SpeedReport], out_prefix: str | Path, *,
                  title: str = "") -> list[Path]:
    """``PREFIX.md``, ``PREFIX.json`` and ``PREFIX.png`` for the given reports (quality and/or speed)."""
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    quality = next((r for r in reports if isinstance(r, QualityReport)), None)
    speed = next((r for r in reports if isinstance(r, SpeedReport)), None)
    md = []
    if quality:
        md += ["## Korean quality", "", quality_markdown(quality)]
    if speed:
        md += ["## Speed", "", speed_markdown(speed)]
    paths = [prefix.with_suffix(".md"), prefix.with_suffix(".json")]
    paths[0].write_text((f"# {title}\n\n" if title else "") + "\n".join(md), encoding="utf-8")
    data = [json.loads(to_json(r)) for r in reports]
    paths[1].write_text(json.dumps(data[0] if len(data) == 1 else data, ensure_ascii=False, indent=2) + "\n",
                        encoding="utf-8")
    paths.append(plot(quality, speed, prefix.with_suffix(".png"), title=title))
    return paths
