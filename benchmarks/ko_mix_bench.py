"""Korean mixes on a real model (issue 26): llama.cpp's TYPE with the Korean imatrix against komt-edge's ko-TYPE.

    python -m komt_edge.benchmarks.ko_mix_bench [--types q3_K_M q2_K] [--chunks 8] [--threads 2]

Gemma 3 270M (its "F16" is the Q4_K_M release dequantized: 4-bit rows are near-lossless on it). For each TYPE:
``komt-edge gguf MODEL -q f16 -q TYPE -q ko-TYPE --imatrix korean`` (one run: the same Korean imatrix for both
quantized files; the ko- measurement uses the calibration split), then `bench quality` against the F16 on the
**held-out** Korean text (konlpy's held-out split, never seen by the imatrix or the sensitivity measurement): bytes,
mean KLD, same-top rate and PPL ratio of (a) TYPE and (c) KO-TYPE. Writes benchmarks/results/ko-mix-gemma3-270m.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".cache" / "bench-ko-mix"
RESULT = ROOT / "benchmarks" / "results" / "ko-mix-gemma3-270m"


def main() -> None:
    from komt_edge import korean_mix
    from komt_edge.bench.gemma import export_gemma3
    from komt_edge.bench.quality import quality
    from komt_edge.bench.runner import environment
    from komt_edge.gguf import convert

    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=["q3_K_M", "q2_K"])
    ap.add_argument("--chunks", type=int, default=8, help="held-out chunks of 512 tokens scored")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = WORK / "gemma-3-270m"
    if not (model / "config.json").is_file():
        export_gemma3(model)
    out = WORK / "out"
    rows = []
    for qtype in args.types:
        t0 = time.perf_counter()
        f16, plain, ko = convert(str(model), ["f16", qtype, f"ko-{qtype}"], out, name="gemma-3-270m",
                                 n_threads=args.threads, progress=False, imatrix="korean")
        seconds = time.perf_counter() - t0
        report = quality([plain, ko], reference=f16, n_ctx=512, n_chunks=args.chunks, n_threads=args.threads,
                         progress=False)
        cache = json.loads(korean_mix.cache_path(out, "gemma-3-270m", qtype.lower()).read_text())
        entry = {"type": qtype, "convert_seconds": round(seconds, 1), "heldout_corpus": report.corpus,
                 "heldout_chunks": report.n_chunks, "n_ctx": report.n_ctx,
                 "recipe": (out / f"{ko.name.removesuffix('.gguf')}.tensor-types.txt").read_text().split(),
                 "calibration_kld_base": cache["base"]["kld"],
                 "calibration_checked": {k.replace("\n", " ").strip(): v for k, v in cache["checked"].items()},
                 "sensitivity": cache["options"], "files": {}}
        for label, r in zip(("llama.cpp+korean-imatrix", "ko"), report.results):
            entry["files"][label] = {"file": Path(r.file.path).name,
                                     "bytes": r.file.size_bytes, "mean_kld": r.kl.mean_kld,
                                     "mean_kld_unc": r.kl.mean_kld_unc, "same_top": r.kl.same_top,
                                     "ppl_ratio": r.kl.ppl_ratio}
        a, c = entry["files"]["llama.cpp+korean-imatrix"], entry["files"]["ko"]
        entry["kld_change"] = c["mean_kld"] / a["mean_kld"] - 1
        entry["bytes_change"] = c["bytes"] / a["bytes"] - 1
        rows.append(entry)
        print(f"{qtype}: {a['bytes']:,} B KLD {a['mean_kld']:.4f} -> KO {c['bytes']:,} B KLD {c['mean_kld']:.4f} "
              f"({entry['kld_change']:+.1%}), {seconds:.0f} s", flush=True)
    settings = korean_mix.SETTINGS
    data = {"what": __doc__.split("\n\n")[0], "model": "Gemma 3 270M (F16 = the Q4_K_M release dequantized)",
            "measurement": {"n_ctx": settings.n_ctx, "n_chunks": settings.n_chunks, "steps": list(korean_mix.STEPS),
                            "text": "konlpy calibration split"},
            "rows": rows, "env": environment()}
    RESULT.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["| type | file | bytes | mean KLD (held-out Korean) | same top | PPL ratio |", "|---|---|---:|---:|---:|---:|"]
    for e in rows:
        for label, f in e["files"].items():
            lines.append(f"| {e['type']} | {label} | {f['bytes']:,} | {f['mean_kld']:.4f} ± {f['mean_kld_unc']:.4f} "
                         f"| {f['same_top']:.4f} | {f['ppl_ratio']:.4f} |")
    RESULT.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(RESULT.with_suffix(".json"))


if __name__ == "__main__":
    main()
