"""Reference benchmark for `komt-edge verify`: the layer-streamed HF reference vs the whole model in memory.

    python -m komt_edge.benchmarks.verify_bench --shape tiny --shape 1b --threads 2 --json benchmarks/results/verify-1b.json

For each shape a random bf16 checkpoint (Mistral layout, the real Mistral v0.1 tokenizer; ``write_checkpoint`` of
convert_bench) is written to a temp folder, then the float32 reference logits of verify's Korean prompts
(``verify.KOREAN_PROMPTS`` in the model's komt template, tokenized as verify tokenizes them) are computed by

- streamed: ``komt_edge.layer_reference.streamed_logits``, what ``verify`` runs: one decoder layer at a time from the
  memory-mapped checkpoint;
- whole model: ``whole_model_logits``, the former reference (``from_pretrained(dtype="auto")``, then the model
  cast to float32). Skipped, with the reason in the results, when the float32 model would not fit in the
  memory available (Mistral 7B in float32 needs ~29 GB; a 24 GiB machine has less).

Each runs in its own subprocess, so that the peaks are separate: wall time (with the interpreter's start and
imports), the time of the reference itself, and peak anonymous memory (RssAnon, sampled every 20 ms over the
process tree: pages of the memory-mapped checkpoint are file-backed and don't count) are reported, and the max
|Δlogit| between the two.

Shapes: tiny, 1b (TinyLlama-1.1B: a 2 GB checkpoint), mistral-7b (a 14 GB checkpoint; the whole-model side is
skipped below ~32 GB of available memory) and llama-30b (hidden 6656, intermediate 17920, 60 layers, 52 heads:
checks that the streamed reference of a 30B model stays under 8 GiB; the checkpoint alone needs ~65 GB of free
disk, and writing it takes a long while). The checkpoints are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from .convert_bench import SHAPES as CONVERT_SHAPES
from .convert_bench import each_shape, measure, shape_parser, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    **CONVERT_SHAPES,
    "llama-30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                      num_key_value_heads=52),
}
VOCAB = 32000  # write_checkpoint's vocabulary
CLAIM_GIB = 8.0  # the streamed reference of a 30B model stays under this


def shape_params(shape: dict) -> int:
    h, ff, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return 2 * VOCAB * h + h + n * (2 * h + 2 * h * h + 2 * kv * h + 3 * h * ff)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def verify_prompt_ids(folder: Path, n_ctx: int = 512) -> list[list[int]]:
    """verify's Korean prompts, in the model's komt template, tokenized by verify's reference tokenizer."""
    from komt_edge.verify import KOREAN_PROMPTS, ReferenceTokenizer
    from komt_edge.zoo import model_template, resolve

    resolved = resolve(str(folder))
    tokenizer = ReferenceTokenizer(resolved.path)
    tmpl = model_template(resolved)
    return [tokenizer.encode(tmpl.format(p))[:n_ctx] for p in KOREAN_PROMPTS]


def child(kind: str, model: Path, out: Path) -> None:
    """One reference in this process: the logits to ``out`` (.npz), with the time the reference took."""
    import numpy as np

    from komt_edge.layer_reference import streamed_logits, whole_model_logits

    ids = verify_prompt_ids(model)
    import accelerate  # noqa: F401  (imports outside the timed reference)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    AutoConfig.from_pretrained(model)
    start = time.perf_counter()
    if kind == "streamed":
        logits = streamed_logits(model, ids, dtype="float32", progress=False)
    else:
        logits = whole_model_logits(model, ids, dtype="float32")
    seconds = time.perf_counter() - start
    np.savez(out, seconds=np.float64(seconds), tokens=np.int64(sum(map(len, ids))),
             **{f"logits{i}": x for i, x in enumerate(logits)})


def run_reference(kind: str, model: Path, work: Path, env: dict) -> tuple[dict, list]:
    import numpy as np

    out = work / f"{kind}.npz"
    m = measure([sys.executable, "-m", "komt_edge.benchmarks.verify_bench", "--child", kind, "--model", str(model),
                 "--out", str(out)], env)
    with np.load(out) as data:
        logits = [data[f"logits{i}"] for i in range(len(data.files) - 2)]
        m.update(reference_s=float(data["seconds"]), tokens=int(data["tokens"]))
    out.unlink()
    return m, logits


def run_shape(name: str, work: Path, n_threads: int) -> dict:
    shape = SHAPES[name]
    params = shape_params(shape)
    need = params * 2 + (1 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"error: the {name} checkpoint needs {need / 1e9:.0f} GB of free disk in {work}, "
                         f"which has {free / 1e9:.0f} GB: pass --work on a larger disk")
    src = work / f"{name}-hf"
    t0 = time.perf_counter()
    written = write_checkpoint(src, shape)
    assert written == params, (written, params)
    gen_s = time.perf_counter() - t0
    env = {**os.environ, "OMP_NUM_THREADS": str(n_threads), "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    streamed, ours = run_reference("streamed", src, work, env)
    # The whole float32 model, plus the bf16 copy from_pretrained loads first and the activations.
    whole_need = params * 4 * 1.15
    available = mem_available()
    result = {"shape": name, "params": params,
              "checkpoint_gib": sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1024 ** 3,
              "generate_s": gen_s, "streamed": streamed}
    if whole_need > available:
        result["whole_model"] = {"skipped": f"the float32 model needs ~{whole_need / 2 ** 30:.1f} GiB; this machine "
                                           f"has {available / 2 ** 30:.1f} GiB available"}
        result["max_abs_diff"] = None
    else:
        whole, theirs = run_reference("whole", src, work, env)
        result["whole_model"] = whole
        result["max_abs_diff"] = max(float(abs(a - b).max()) for a, b in zip(ours, theirs))
    if name == "llama-30b":
        result["under_8_gib"] = streamed["peak_rss_anon_mib"] < CLAIM_GIB * 1024
    return result


def main(argv: list[str] | None = None) -> None:
    ap = shape_parser(__doc__, list(SHAPES), "the generated checkpoints")
    ap.add_argument("--child", choices=["streamed", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
        return child(args.child, args.model, args.out)
    results = each_shape(args.shape or ["tiny"], args.work, args.keep,
                         lambda shape, folder: run_shape(shape, folder, args.threads))
    import transformers

    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
            "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"threads={args.threads}, cpus={os.cpu_count()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("| shape | params | bf16 checkpoint | streamed (wall / reference) | peak RssAnon streamed | "
          "whole model (wall / reference) | peak RssAnon whole model | max |Δlogit| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        s, w = r["streamed"], r["whole_model"]
        whole = ("skipped: " + w["skipped"], "—") if "skipped" in w else \
            (f"{w['seconds']:.1f} s / {w['reference_s']:.1f} s", f"{w['peak_rss_anon_mib']:.0f} MiB")
        diff = "—" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
        print(f"| {r['shape']} | {r['params'] / 1e9:.2f} B | {r['checkpoint_gib']:.2f} GiB | "
              f"{s['seconds']:.1f} s / {s['reference_s']:.1f} s | {s['peak_rss_anon_mib']:.0f} MiB | {whole[0]} | "
              f"{whole[1]} | {diff} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
