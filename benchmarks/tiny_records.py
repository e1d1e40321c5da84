"""The README's small CPU results on the tests' tiny Mistral-shaped model, recorded from the commands a user runs.

    python -m komt_edge.benchmarks.tiny_records --threads 2

- ``train``: ``komt-edge train`` for 10 steps on ``tests/data/ko_instruct.jsonl`` (the README's ``make train``
  example: ``--max-steps 10 --lr 3e-3 --batch-size 4 --max-length 96 --eval-split 0.25 --save-steps 5
  --warmup-steps 1``), then ``komt-edge gguf`` of the model + adapter to q4_0 and q8_0 and ``komt-edge verify``
  of both against the HF model with the adapter, as ``make train`` does;
- ``lora``: the run-time LoRA check of ``gguf-lora``: an f16 GGUF of the base, the komt-recipe adapter as
  llama.cpp's LoRA GGUF (f16), and ``komt-edge verify BASE-F16.gguf --lora ADAPTER.gguf --hf BASE --adapter
  ADAPTER``.

Each step's command line, wall time and JSON report go into ``--out`` (default
``benchmarks/results/tiny-train-cpu.json`` and ``tiny-lora-runtime.json``). Takes about a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--max-steps", "10", "--lr", "3e-3", "--batch-size", "4", "--max-length", "96", "--eval-split", "0.25",
              "--save-steps", "5", "--warmup-steps", "1"]


def run(cmd: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {"command": " ".join(["komt-edge", *cmd[1:]]), "seconds": seconds, "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--skip", default="", help="comma-separated: train, lora")
    args = ap.parse_args(argv)
    import torch

    from komt_edge.tiny import build_tiny_adapter, build_tiny_model

    exe = str(Path(sys.executable).with_name("komt-edge"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    t = ["-t", str(args.threads)]
    meta = {"command": " ".join(["python -m komt_edge.benchmarks.tiny_records", *(sys.argv[1:] if argv is None
                                                                                   else argv)]),
            "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "model": "komt_edge.tiny.build_tiny_model(family='mistral', dtype=bfloat16), the tests' tiny_mistral"}
    work = Path(tempfile.mkdtemp(prefix="komt-tiny-records-"))
    try:
        model = build_tiny_model(work / "tiny-mistral", "mistral", dtype=torch.bfloat16)
        skip = set(filter(None, args.skip.split(",")))
        if "train" not in skip:
            data = ROOT / "tests" / "data" / "ko_instruct.jsonl"
            adapter = work / "tiny-lora"
            train = run([exe, "train", "--model", str(model), "--data", str(data), "-o", str(adapter),
                         "--device", "cpu", *TRAIN_ARGS], env)
            report = json.loads((adapter / "komt_edge_train.json").read_text())
            gguf = run([exe, "gguf", str(model), "--adapter", str(adapter), "--template", report["template"],
                        "--name", "tiny-lora", "-q", "q4_0", "-q", "q8_0", "-o", str(work / "dist"), *t], env)
            files = sorted(str(p) for p in (work / "dist").glob("tiny-lora-*.gguf"))
            verify_json = work / "train-verify.json"
            verify = run([exe, "verify", *files, "--hf", str(model), "--adapter", str(adapter), "--template",
                          report["template"], *t, "--json", str(verify_json)], env)
            out = {"meta": meta, "train": {**train, "report": report}, "gguf": gguf,
                   "verify": {**verify, "report": json.loads(verify_json.read_text())}}
            (args.out / "tiny-train-cpu.json").write_text(json.dumps(out, indent=2, ensure_ascii=False,
                                                                     default=str))
        if "lora" not in skip:
            adapter = build_tiny_adapter(model, work / "mistral-lora", "mistral")
            gguf = run([exe, "gguf", str(model), "-q", "f16", "-o", str(work / "base"), *t], env)
            lora = run([exe, "gguf-lora", str(adapter), "--outtype", "f16", "-o", str(work / "lora")], env)
            base_file = next((work / "base").glob("*.gguf"))
            lora_file = next((work / "lora").glob("*.gguf"))
            verify_json = work / "lora-verify.json"
            verify = run([exe, "verify", str(base_file), "--lora", str(lora_file), "--hf", str(model), "--adapter",
                          str(adapter), *t, "--json", str(verify_json)], env)
            out = {"meta": meta, "adapter": "komt_edge.tiny.build_tiny_adapter(family='mistral'), the tests' "
                   "mistral_adapter", "gguf": gguf, "gguf_lora": lora,
                   "verify": {**verify, "report": json.loads(verify_json.read_text())}}
            (args.out / "tiny-lora-runtime.json").write_text(json.dumps(out, indent=2, ensure_ascii=False,
                                                                        default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
