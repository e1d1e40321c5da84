"""How fast `komt-edge` answers before doing any work: `--help` and `models`, against the floor and a neighbour.

    python -m komt_edge.benchmarks.cli_bench --rounds 21 [--before DIR]

Each round starts, in a fresh process each and in an order that rotates from round to round:

- **python -c pass**: the interpreter alone, the floor of any Python command;
- **komt-edge --help** and **komt-edge models** (the console script of this virtualenv);
- **hf --help**: huggingface_hub's own command line, for comparison;
- with ``--before DIR`` (a checkout of an older komt-edge, e.g. ``git archive REV | tar -x -C DIR``): the same two
  commands run there as ``python -m komt_edge.cli``, to show what changed.

Wall time from start to exit and the process's peak RSS (``os.wait4``) are recorded per run; the medians are
reported with the load average (a shared machine drifts). Writes benchmarks/results/cli-start.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def run_once(argv: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one run of ``argv``, output discarded; fails on a non-zero exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return seconds, usage.ru_maxrss * 1024


def commands(before: Path | None) -> dict[str, tuple[list[str], Path | None]]:
    cmds = {
        "python -c pass": ([sys.executable, "-c", "pass"], None),
        "komt-edge --help": ([str(BIN / "komt-edge"), "--help"], None),
        "komt-edge models": ([str(BIN / "komt-edge"), "models"], None),
        "hf --help": ([str(BIN / "hf"), "--help"], None),
    }
    if before is not None:
        cmds["before: komt-edge --help"] = ([sys.executable, "-m", "komt_edge.cli", "--help"], before)
        cmds["before: komt-edge models"] = ([sys.executable, "-m", "komt_edge.cli", "models"], before)
    return cmds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--before", type=Path, default=None,
                        help="An older komt-edge tree (holding komt_edge/) to time the same commands in.")
    parser.add_argument("--out", type=Path, default=RESULTS / "cli-start")
    args = parser.parse_args()

    from komt_edge import __version__
    from komt_edge.util import dist_versions

    cmds = commands(args.before)
    names = list(cmds)
    for name in names:  # warm-up, untimed: the page cache holds every module and .pyc afterwards
        run_once(*cmds[name])
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seconds, rss = run_once(*cmds[name])
            runs[name].append({"s": seconds, "rss": rss, "load": os.getloadavg()[0]})
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {runs[n][-1]['s']:.3f} s" for n in names),
              flush=True)

    summary = {name: {"median_s": statistics.median(x["s"] for x in rows),
                      "min_s": min(x["s"] for x in rows),
                      "max_s": max(x["s"] for x in rows),
                      "median_rss_mib": statistics.median(x["rss"] for x in rows) / 2**20}
               for name, rows in runs.items()}
    loads = [x["load"] for rows in runs.values() for x in rows]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or None
    data = {"komt_edge": __version__, "commit": commit, "rounds": args.rounds, "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "before": str(args.before) if args.before else None, "load_min": min(loads), "load_max": max(loads),
            "summary": summary, "runs": runs, "versions": dist_versions("click", "huggingface_hub")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# komt-edge start-up: median of {args.rounds} runs each, {os.cpu_count()} CPUs, "
             f"load average {min(loads):.1f}–{max(loads):.1f}", "",
             "| command | median | min | max | peak RSS |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| `{name}` | {s['median_s']:.3f} s | {s['min_s']:.3f} s | {s['max_s']:.3f} s | "
              f"{s['median_rss_mib']:.0f} MiB |" for name, s in summary.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
