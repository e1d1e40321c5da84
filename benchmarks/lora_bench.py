"""Run-time LoRA on a CPU: what applying a komt adapter GGUF to a q4_K_M base costs, next to the merged q4_K_M file.

    python -m komt_edge.benchmarks.lora_bench --shape mistral-7b --threads 2 --json benchmarks/results/lora-mistral-7b.json

For the shape, a random bf16 Mistral-layout checkpoint and a komt-recipe adapter (r=8, alpha=32 on q/k/v/o/gate/
up/down; random A and B) are written locally (``convert_bench``'s generators), then, in one run on one machine:

1. **adapter GGUF**: ``komt-edge gguf-lora`` to f16 and q8_0 — file size and conversion time, next to llama.cpp's
   ``convert_lora_to_gguf.py`` for the same adapter (wall time of each process, Python start and imports included);
2. **files**: the base as q4_K_M (``komt-edge gguf``) and the merged model as q4_K_M (``komt-edge gguf --adapter``);
3. **speed**: llama-bench's pp512 and tg128 (``komt_edge.bench.runner``'s protocol: a warm-up, then
   ``--repetitions`` timed runs from an empty cache) for the merged q4_K_M file, and for the q4_K_M base with the
   f16 adapter applied by llama.cpp (``llama_adapter_lora_init`` + ``llama_set_adapters_lora``, scale 1), with the
   same threads, alternating merged / LoRA test by test so that a busy machine weighs on both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import convert_bench


@contextlib.contextmanager
def lora_applied(model, adapter_path: Path):
    """Every llama.cpp context komt_edge.bench.runner creates for ``model`` inside the block gets the adapter
    (scale 1), as ``llama-bench``/``llama-cli --lora`` attach it."""
    import llama_cpp

    from komt_edge.bench import runner

    adapter = llama_cpp.llama_adapter_lora_init(model.model, str(adapter_path).encode())
    if not adapter:
        raise RuntimeError(f"llama.cpp could not load the adapter {adapter_path}")
    plain = runner.LlamaRunner

    class WithLora(plain):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            if llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
                raise RuntimeError("llama_set_adapters_lora failed")

    runner.LlamaRunner = WithLora
    try:
        yield
    finally:
        runner.LlamaRunner = plain
        llama_cpp.llama_adapter_lora_free(adapter)


def run(shape: str, work: Path, n_threads: int, repetitions: int) -> dict:
    from komt_edge.bench.runner import environment
    from komt_edge.gguf import convert, output_name

    src, lora = work / f"{shape}-hf", work / "lora"
    t0 = time.perf_counter()
    params = convert_bench.write_checkpoint(src, convert_bench.SHAPES[shape])
    convert_bench.write_adapter(lora, src, convert_bench.SHAPES[shape])
    print(f"[{shape}] checkpoint and adapter written in {time.perf_counter() - t0:.0f} s", flush=True)

    adapters = {}
    for outtype in ("f16", "q8_0"):
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("komt-edge")), "gguf-lora", str(lora), "--outtype", outtype,
                        "-o", str(work / "lora-gguf")], check=True, capture_output=True)
        ours = time.perf_counter() - t0
        path = work / "lora-gguf" / output_name("lora-LoRA", outtype)
        theirs_file = work / f"llama.cpp-lora-{outtype}.gguf"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(convert_bench.LLAMA_SRC / "convert_lora_to_gguf.py"), str(lora), "--base",
                        str(src), "--outtype", outtype, "--outfile", str(theirs_file)], check=True,
                       capture_output=True)
        theirs = time.perf_counter() - t0
        adapters[outtype] = {"file": path.name, "bytes": path.stat().st_size,
                             "komt_edge_s": ours, "llama_cpp_convert_lora_s": theirs,
                             "adapter_safetensors_bytes": (lora / "adapter_model.safetensors").stat().st_size}
        print(f"[{shape}] adapter {outtype}: {adapters[outtype]}", flush=True)

    t0 = time.perf_counter()
    base = convert(str(src), ["q4_K_M"], work / "base", name=f"{shape}-base", n_threads=n_threads, progress=False)[0]
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = convert(str(src), ["q4_K_M"], work / "merged", adapter=str(lora), name=f"{shape}-merged",
                     n_threads=n_threads, progress=False)[0]
    merged_s = time.perf_counter() - t0
    print(f"[{shape}] q4_K_M base {base_s:.0f} s, merged {merged_s:.0f} s", flush=True)

    lora_file = work / "lora-gguf" / adapters["f16"]["file"]
    return {"shape": shape, "params": params, "threads": n_threads, "repetitions": repetitions,
            "adapter": adapters, "q4_K_M_bytes": {"base": base.stat().st_size, "merged": merged.stat().st_size},
            "conversion_s": {"base_q4_K_M": base_s, "merged_q4_K_M": merged_s},
            "speed": measure_speed(base, merged, lora_file, shape, n_threads, repetitions),
            "load_average_after": os.getloadavg(), "env": environment()}


def measure_speed(base: Path, merged: Path, lora_file: Path, shape: str, n_threads: int, repetitions: int) -> dict:
    """pp512 and tg128 of the merged file and of the base with the adapter, alternating test by test."""
    from komt_edge.bench.runner import bench_pp, bench_tg
    from komt_edge.llamacpp import LlamaModel

    speed: dict[str, dict] = {"merged": {}, "base+lora": {}}
    with LlamaModel(merged) as m_merged, LlamaModel(base) as m_base:
        for test in ("pp512", "tg128"):
            for label, model in (("merged", m_merged), ("base+lora", m_base)):
                ctx = lora_applied(model, lora_file) if label == "base+lora" else contextlib.nullcontext()
                with ctx:
                    rate = (bench_pp(model, 512, repetitions=repetitions, n_threads=n_threads) if test == "pp512"
                            else bench_tg(model, 128, repetitions=repetitions, n_threads=n_threads))
                speed[label][test] = {"mean": rate.mean, "sd": rate.sd, "samples": rate.samples_ts}
                print(f"[{shape}] {label} {test}: {rate.mean:.2f} ± {rate.sd:.2f} t/s", flush=True)
    return speed


def markdown(r: dict) -> str:
    a, s = r["adapter"], r["speed"]
    lines = [f"Shape {r['shape']} ({r['params'] / 1e9:.2f} B parameters, random weights), komt's r=8 adapter on all "
             f"7 projections, {r['threads']} thread(s), {r['repetitions']} repetitions; "
             f"{r['env'].get('cpu') or 'CPU'}, load average after the run {r['load_average_after'][0]:.1f}.", "",
             "| adapter GGUF | size | komt-edge gguf-lora | llama.cpp convert_lora_to_gguf.py |",
             "| --- | ---: | ---: | ---: |"]
    for t, v in a.items():
        lines.append(f"| {v['file']} | {v['bytes'] / 1e6:.1f} MB | {v['komt_edge_s']:.1f} s | "
                     f"{v['llama_cpp_convert_lora_s']:.1f} s |")
    lines += ["", f"(peft's adapter_model.safetensors: {a['f16']['adapter_safetensors_bytes'] / 1e6:.1f} MB; the "
              f"q4_K_M files: base {r['q4_K_M_bytes']['base'] / 1e9:.2f} GB, merged "
              f"{r['q4_K_M_bytes']['merged'] / 1e9:.2f} GB)", "",
              "| q4_K_M | pp512 t/s | tg128 t/s |", "| --- | ---: | ---: |"]
    for label, name in (("merged", "merged file"), ("base+lora", "base + LoRA F16 at run time")):
        pp, tg = s[label]["pp512"], s[label]["tg128"]
        lines.append(f"| {name} | {pp['mean']:.2f} ± {pp['sd']:.2f} | {tg['mean']:.2f} ± {tg['sd']:.2f} |")
    if r.get("speed_measured_again"):
        lines += ["", "(speed measured again with `--speed-again` on the same files, after the first run's timings "
                  "were taken on a machine shared with other jobs)"]
    parts = []
    for t in ("pp512", "tg128"):
        a, b = s["base+lora"][t], s["merged"][t]
        within = abs(a["mean"] - b["mean"]) <= a["sd"] + b["sd"]
        parts.append(f"{t} at {a['mean'] / b['mean']:.0%}" + (" (within the run-to-run spread)" if within else ""))
    lines += ["", f"With the adapter applied at run time, llama.cpp ran {' and '.join(parts)} of the merged file's "
              "speed."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(convert_bench.SHAPES), default="mistral-7b")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here (and .md beside it)")
    ap.add_argument("--speed-again", type=Path, default=None, metavar="JSON",
                    help="measure the speed again on the files an earlier run kept in --work, and update its JSON")
    args = ap.parse_args(argv)
    if args.speed_again:
        from komt_edge.bench.runner import environment

        result = json.loads(args.speed_again.read_text())
        work = args.work
        result["speed"] = measure_speed(next((work / "base").glob("*.gguf")), next((work / "merged").glob("*.gguf")),
                                        work / "lora-gguf" / result["adapter"]["f16"]["file"], result["shape"],
                                        args.threads, args.repetitions)
        result.update(threads=args.threads, repetitions=args.repetitions, load_average_after=os.getloadavg(),
                      env=environment(), speed_measured_again=True)
        args.speed_again.write_text(json.dumps(result, indent=2, default=str) + "\n")
        args.speed_again.with_suffix(".md").write_text(markdown(result) + "\n")
        print(markdown(result))
        return
    if not (convert_bench.LLAMA_SRC / "convert_lora_to_gguf.py").is_file():
        sys.exit(f"error: {convert_bench.LLAMA_SRC}/convert_lora_to_gguf.py is missing: run `make install`")
    work = args.work or Path(tempfile.mkdtemp(prefix="komt-lora-bench-"))
    try:
        result = run(args.shape, work, args.threads, args.repetitions)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(result)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        args.json.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
