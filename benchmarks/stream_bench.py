"""Streaming costs what generation costs: long replies streamed by komt-edge against the same reply unstreamed and
against llama-bench's tg, on the same file and threads.

    python -m komt_edge.benchmarks.stream_bench --threads 1 --rounds 3 --tokens 1000

Models: Gemma 3 270M Q4_K_M (with Gemma's chat template stored in it, as serve_bench makes it) and the demo's tiny
komt-mistral (merged with the demo's adapter, Q8_0), where a token costs under a millisecond and any per-token
overhead shows. The same Korean prompt, greedy, every end-of-generation token suppressed (logit_bias -100), so
every side generates exactly ``--tokens`` tokens:

- **unstreamed**: llama-cpp-python's ``Llama.create_completion(tokens, max_tokens=N)``, the reference text;
- **komt-edge streamed**: ``LoadedModel.complete(...)``, the pieces `chat` and `serve` stream (komt_edge.generation);
- **llama-cpp-python streamed**: ``create_completion(stream=True)``, what chat and serve used before (tiny model
  only, at ``--legacy-tokens``: its cost grows with the square of the reply);
- **llama-bench** ``-p 0 -n N -fa off`` (tg N) on the same file and threads, flash attention off as
  llama-cpp-python opens models, when ``make llama-tools`` has built it (the binary linked to the wheel's own
  llama.cpp libraries when present, else the static one). The streamed time includes the prompt's evaluation,
  llama-bench's tg does not.

The unstreamed side opens the file with llama-cpp-python's defaults; komt-edge (``runtime.load``) keeps only the
window in a sliding-window layer's cache (Gemma 3), as llama-server does.

Each round runs the three sides (llama-bench with one repetition) in rotating order; medians over rounds, and the
medians of the per-round ratios. The streamed text must equal the unstreamed one. Writes benchmarks/results/stream.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LLAMA_BIN = ROOT / ".cache" / "llama-tools" / "build" / "bin"
PROMPT = "한국의 사계절에 대해 자세히 설명해 주세요. 봄에는"


def tiny_demo_gguf(work: Path) -> Path:
    """The demo's model: tiny komt-mistral merged with the demo's Korean adapter, as Q8_0."""
    from komt_edge.gguf import convert
    from komt_edge.merge import merge
    from komt_edge.tiny import build_tiny_adapter, build_tiny_model

    base = build_tiny_model(work / "base", "mistral")
    build_tiny_adapter(base, work / "lora", "mistral")
    merge(base, work / "lora", work / "merged")
    return convert(work / "merged", ["q8_0"], work, template="mistral", name="komt-tiny", progress=False)[0]


def llama_bench(path: Path, tokens: int, threads: int, reps: int) -> dict | None:
    """llama-bench's tg ``tokens`` on ``path``: tokens/s (mean and sd over ``reps``), or None when not built."""
    binary = next((b for b in (LLAMA_BIN / "llama-bench-wheel", LLAMA_BIN / "llama-bench") if b.is_file()), None)
    if binary is None:
        return None
    # -fa off: flash attention off, as llama-cpp-python (and so komt-edge) opens models
    out = subprocess.run([str(binary), "-m", str(path), "-p", "0", "-n", str(tokens), "-t", str(threads), "-r",
                          str(reps), "-fa", "off", "-o", "json"], check=True, capture_output=True, text=True).stdout
    row = json.loads(out)[0]
    return {"binary": binary.name, "tg_ts": row["avg_ts"], "tg_ts_sd": row["stddev_ts"]}


def measure(path: Path, *, tokens: int, threads: int, rounds: int, legacy_tokens: list[int]) -> dict:
    from llama_cpp import Llama

    from komt_edge.generation import end_of_generation_ids
    from komt_edge.runtime import load

    model = load(path, n_ctx=tokens + 256, n_threads=threads)
    ref = Llama(model_path=str(path), n_ctx=model.n_ctx, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    try:
        bias = {i: -100.0 for i in end_of_generation_ids(ref)}
        prompt = ref.tokenize(PROMPT.encode(), add_bos=True, special=True)
        fields = dict(temperature=0, max_tokens=tokens, logit_bias=bias)

        def unstreamed() -> tuple[float, str]:
            t0 = time.perf_counter()
            text = ref.create_completion(prompt, **fields)["choices"][0]["text"]
            return time.perf_counter() - t0, text

        def streamed() -> tuple[float, str]:
            t0 = time.perf_counter()
            generation = model.complete(PROMPT, **fields)
            pieces = list(generation)
            # at least N: an unfinished UTF-8 character defers the length check, as in create_completion
            assert generation.completion_tokens >= tokens, generation.completion_tokens
            return time.perf_counter() - t0, "".join(pieces)

        def bench() -> tuple[float | None, str]:
            result = llama_bench(path, tokens, threads, 1)
            return (result["tg_ts"] if result else None), (result["binary"] if result else "")

        unstreamed(), streamed()  # warm-up: both copies have seen the prompt once
        rows = []
        for r in range(rounds):
            # all three sides in every round, in rotating order, so that a change of load hits them alike
            sides = [("unstreamed", unstreamed), ("streamed", streamed), ("llama_bench", bench)]
            order = sides[r % 3:] + sides[:r % 3]
            done = dict((name, run()) for name, run in order)
            tg = done["llama_bench"][0]
            rows.append({"unstreamed_s": done["unstreamed"][0], "streamed_s": done["streamed"][0],
                         "llama_bench_tg_ts": tg, "llama_bench_binary": done["llama_bench"][1],
                         "same_text": done["unstreamed"][1] == done["streamed"][1], "load": os.getloadavg()[0]})
            print(f"  round {r + 1}/{rounds}: unstreamed {rows[-1]['unstreamed_s']:.2f} s, komt-edge streamed "
                  f"{rows[-1]['streamed_s']:.2f} s" + (f", llama-bench tg{tokens} {tg:.1f} t/s" if tg else ""),
                  flush=True)
        legacy = {}
        for n in legacy_tokens:
            t0 = time.perf_counter()
            for _ in ref.create_completion(prompt, **{**fields, "max_tokens": n}, stream=True):
                pass
            legacy[str(n)] = time.perf_counter() - t0
            print(f"  llama-cpp-python streamed, {n} tokens: {legacy[str(n)]:.2f} s", flush=True)
    finally:
        model.close()
        ref.close()
    median = statistics.median
    return {"file": path.name, "tokens": tokens, "rounds": rows,
            "unstreamed_s": median(x["unstreamed_s"] for x in rows),
            "streamed_s": median(x["streamed_s"] for x in rows),
            "streamed_over_unstreamed": median(x["streamed_s"] / x["unstreamed_s"] for x in rows),
            "same_text": all(x["same_text"] for x in rows), "legacy_streamed_s": legacy,
            "llama_bench": None if rows[0]["llama_bench_tg_ts"] is None else {
                "binary": rows[0]["llama_bench_binary"],
                "tg_ts": median(x["llama_bench_tg_ts"] for x in rows),
                "tg_ts_min": min(x["llama_bench_tg_ts"] for x in rows),
                "tg_ts_max": max(x["llama_bench_tg_ts"] for x in rows),
                # the streamed time over the time llama-bench takes for as many tokens, per round
                "streamed_over_tg": median(x["streamed_s"] * x["llama_bench_tg_ts"] / tokens for x in rows)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--legacy-tokens", type=int, nargs="*", default=[250, 1000],
                        help="reply lengths for llama-cpp-python's own streaming, on the tiny model only")
    parser.add_argument("--out", type=Path, default=RESULTS / "stream")
    args = parser.parse_args()

    from komt_edge.benchmarks.serve_bench import chat_gguf
    from komt_edge.output import configure_output
    from komt_edge.util import dist_versions

    configure_output(verbose=False)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for name, make, legacy in (("komt-tiny (demo)", lambda: tiny_demo_gguf(Path(work)), args.legacy_tokens),
                                   ("Gemma 3 270M", chat_gguf, [])):
            print(f"{name}:", flush=True)
            results.append({"model": name, **measure(make(), tokens=args.tokens, threads=args.threads,
                                                      rounds=args.rounds, legacy_tokens=legacy)})
    data = {"threads": args.threads, "rounds": args.rounds, "tokens": args.tokens, "cpus": os.cpu_count(),
            "prompt": PROMPT, "results": results, "versions": dist_versions("llama-cpp-python")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    lines = [f"# Streaming {args.tokens} tokens: komt-edge vs unstreamed vs llama-bench ({args.threads} thread(s), "
             f"greedy, median of {args.rounds} rounds)", "",
             "| model | unstreamed | komt-edge streamed | streamed / unstreamed | same text | llama-bench tg | "
             "komt-edge streamed t/s | streamed time / llama-bench's | llama-cpp-python streamed |",
             "| --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: | --- |"]
    for r in results:
        bench = r["llama_bench"]
        legacy = ", ".join(f"{n} tokens {s:.1f} s" for n, s in r["legacy_streamed_s"].items()) or "not run"
        lines.append(f"| {r['model']} | {r['unstreamed_s']:.2f} s | {r['streamed_s']:.2f} s | "
                     f"{r['streamed_over_unstreamed']:.3f}× | {'yes' if r['same_text'] else 'NO'} | "
                     + (f"{bench['tg_ts']:.1f} t/s [{bench['tg_ts_min']:.1f}–{bench['tg_ts_max']:.1f}]" if bench
                        else "not built") + " | "
                     f"{r['tokens'] / r['streamed_s']:.1f} t/s | "
                     + (f"{bench['streamed_over_tg']:.3f}×" if bench else "–") + f" | {legacy} |")
    loads = [x["load"] for r in results for x in r["rounds"]]
    lines += ["", f"Load average during the runs: {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
