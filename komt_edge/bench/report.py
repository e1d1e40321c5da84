"""Benchmark output: OUT.md (the reports' Markdown), OUT.json (with versions and hardware) and OUT.png (quality and
speed vs size); and :class:`BenchReport`, quality and speed of the same files (`komt-edge bench all`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .quality import QualityReport
from .speed import SpeedReport
from .table import MIB, type_label


@dataclass
class BenchReport:
    """Quality, then speed, of the same files: what `komt-edge bench all` measures."""
    quality: QualityReport
    speed: SpeedReport

    def summary(self) -> str:
        """What `komt-edge bench all` prints: the quality tables, then the speed tables."""
        return self.quality.summary() + "\n" + self.speed.summary()

    def to_dict(self) -> dict:
        return {"quality": self.quality.to_dict(), "speed": self.speed.to_dict()}

    def rows(self) -> dict[str, dict]:
        """file name → its numbers, as a release records them (and the card shows them): perplexity, KL divergence
        and same-top rate against the reference, tokens/s."""
        files: dict[str, dict] = {}
        for r in self.quality.results:
            files.setdefault(Path(r.file.path).name, {}).update(
                ppl=r.ppl, ppl_unc=r.ppl_unc, kld_f16=r.kl.mean_kld if r.kl else None,
                same_top=r.kl.same_top if r.kl else None, ppl_tokens=r.tokens)
        for r in self.speed.results:
            files.setdefault(Path(r.file.path).name, {}).update(tokens_per_s=r.tg.mean, tokens_per_s_sd=r.tg.sd,
                                                                prompt_tokens_per_s=r.pp.mean)
        return files

    def machine(self) -> str:
        """Where and how the numbers were measured, in one line."""
        env = self.speed.env or {}
        threads = self.speed.results[-1].n_threads if self.speed.results else None
        return (f"{env.get('cpu') or 'CPU'}, {threads} thread(s), llama.cpp (llama-cpp-python "
                f"{env.get('llama_cpp_python')}); tg128/pp512 as llama-bench; perplexity and KL over "
                f"{self.quality.tokens_total} tokens of {self.quality.corpus}")


def to_json(report: QualityReport | SpeedReport) -> str:
    """A report as OUT.json holds it: ``to_dict()``, each quality row's file with its bpw and short type."""
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


def write_outputs(reports: QualityReport | SpeedReport | BenchReport | Sequence[QualityReport | SpeedReport],
                  out_prefix: str | Path, *, title: str = "") -> list[Path]:
    """``PREFIX.md``, ``PREFIX.json`` and ``PREFIX.png`` for a report or several (quality and/or speed)."""
    if isinstance(reports, BenchReport):
        reports = [reports.quality, reports.speed]
    elif isinstance(reports, (QualityReport, SpeedReport)):
        reports = [reports]
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    quality = next((r for r in reports if isinstance(r, QualityReport)), None)
    speed = next((r for r in reports if isinstance(r, SpeedReport)), None)
    md = []
    if quality:
        md += ["## Korean quality", "", quality.summary()]
    if speed:
        md += ["## Speed", "", speed.summary()]
    paths = [prefix.with_suffix(".md"), prefix.with_suffix(".json")]
    paths[0].write_text((f"# {title}\n\n" if title else "") + "\n".join(md), encoding="utf-8")
    data = [json.loads(to_json(r)) for r in reports]
    paths[1].write_text(json.dumps(data[0] if len(data) == 1 else data, ensure_ascii=False, indent=2) + "\n",
                        encoding="utf-8")
    paths.append(plot(quality, speed, prefix.with_suffix(".png"), title=title))
    return paths
