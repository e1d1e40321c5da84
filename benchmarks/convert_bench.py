"""Conversion benchmark: komt-edge vs llama.cpp's own path, same synthetic checkpoint, same machine, one run.

    python -m komt_edge.benchmarks.convert_bench --shape tiny --shape 1b --shape mistral-7b --threads 2

For each shape a random bf16 checkpoint (Mistral layout, the real Mistral v0.1 tokenizer) is written locally,
then converted to q4_0 + q8_0 by

- komt-edge: ``komt-edge gguf DIR -q q4_0 -q q8_0`` (one read of the checkpoint, both files);
- llama.cpp: ``convert_hf_to_gguf.py --outtype bf16`` (the source precision), then ``llama-quantize`` for each
  type (``llama_model_quantize``, the same library llama-quantize links).

Wall time and peak anonymous memory (RssAnon, sampled every 20 ms over the process tree: pages of the
memory-mapped checkpoint are file-backed and don't count) are reported for each. ``--keep`` keeps the files.

In the same run, the bounds each is measured against, on the same disk:

- conversion: ``dd if=/dev/zero bs=16M`` writing as many bytes as komt-edge's two GGUF files, with
  ``conv=fdatasync`` (to the disk: compared with komt-edge followed by ``sync`` of its files) and without (to the
  page cache: compared with komt-edge alone, which does not fsync). The disk's speed varies several-fold from
  minute to minute on a shared machine: ``--rounds N`` repeats komt-edge and dd alternately and reports each
  pair;
- merge (komt's r=8 adapter on q/k/v/o/gate/up/down): ``cp`` of the checkpoint's shards, then ``sync`` of the
  copies (both times are kept: cp alone is the page-cache bound, cp + sync the disk bound);
- and the compute floor: llama.cpp's quantizer alone turning as many float32 weights, already in memory, into
  q4_0 and q8_0 with the same threads (no reading, upcasting or writing);

and the ratios komt-edge / dd, merge / cp and komt-edge / llama.cpp.
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
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA_SRC = ROOT / ".cache" / "llama.cpp-src"

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),  # TinyLlama-1.1B
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8),
}


def write_checkpoint(folder: Path, shape: dict, seed: int = 0) -> int:
    """A random bf16 Mistral-layout checkpoint, written one tensor at a time; returns the parameter count."""
    from komt_edge.merge import ShardWriter
    from komt_edge.tiny import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    h, ff, n_layer = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    plan = [("model.embed_tokens.weight", (32000, h))]
    for i in range(n_layer):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                 (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                 (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                 (p + "mlp.gate_proj.weight", (ff, h)), (p + "mlp.up_proj.weight", (ff, h)),
                 (p + "mlp.down_proj.weight", (h, ff))]
    plan += [("model.norm.weight", (h,)), ("lm_head.weight", (32000, h))]
    writer = ShardWriter(folder, [(n, s, torch.bfloat16) for n, s in plan], 4 * 1024 ** 3)
    gen = torch.Generator().manual_seed(seed)
    for shard in writer.shards:
        for name, shp, _dtype, _n in shard:
            t = torch.randn(shp, generator=gen, dtype=torch.float32).mul_(0.02)
            if name.endswith("norm.weight"):
                t.add_(1.0)
            writer.write(name, t.to(torch.bfloat16))
    writer.close()
    config = dict(architectures=["MistralForCausalLM"], model_type="mistral", max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=32000, tie_word_embeddings=False,
                  torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, **shape)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, "mistral")
    return sum(int(torch.Size(s).numel()) for _, s in plan)


def write_adapter(folder: Path, base: Path, shape: dict, r: int = 8, seed: int = 1) -> None:
    """A random komt-recipe LoRA adapter (r=8, alpha=32 on q/k/v/o/gate/up/down) for ``write_checkpoint``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    h, ff = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    dims = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, ff), "mlp.up_proj": (h, ff), "mlp.down_proj": (ff, h)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(shape["num_hidden_layers"]):
        for module, (d_in, d_out) in dims.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn((r, d_in), generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn((d_out, r), generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 32, "lora_dropout": 0.05, "bias": "none",
        "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "target_modules": [m.split(".")[-1] for m in dims]}))


def _rss_anon_kib(pid: int) -> int:
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                total += int(line.split()[1])
    except OSError:
        pass
    return total + sum(_rss_anon_kib(int(c)) for c in children)


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; return its wall time, peak RssAnon (process tree) and CPU time (user, and system: the kernel's
    copying of file data is counted there)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_anon_kib(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{err.decode(errors='replace')[-2000:]}")
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": seconds, "peak_rss_anon_mib": peak / 1024, "cpu_user_s": after.ru_utime - before.ru_utime,
            "cpu_sys_s": after.ru_stime - before.ru_stime}


def disk_bound(folder: Path, nbytes: int) -> dict:
    """Seconds for dd to write ``nbytes`` of zeros into ``folder``, to the disk (fdatasync) and to the page cache."""
    target = folder / "dd.bin"
    out = {"bytes": nbytes}
    for key, extra in (("fdatasync", ["conv=fdatasync"]), ("page_cache", [])):
        out[f"dd_{key}_s"] = measure(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={nbytes}",
                                      "iflag=count_bytes", *extra])["seconds"]
        target.unlink()
    return out


def quantize_bound(params: int, n_threads: int) -> dict:
    """The compute floor of komt-edge's conversion: seconds for ``quantize.quantize_all`` (komt-edge's own calls:
    bf16 widened a block at a time, llama.cpp's ``ggml_quantize_chunk`` for q4_0 and q8_0, ``n_threads`` threads)
    to turn ``params`` bf16 weights already in memory into q4_0 and q8_0, from the best of three passes over one
    14336 × 4096 matrix; no reading or writing. Also each type alone from float32 (``quantize.quantize``)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from komt_edge.converters import quantize as q

    data = np.random.default_rng(0).standard_normal((14336, 4096), dtype=np.float32) * 0.02
    bits = (data.view(np.uint32) >> 16).astype(np.uint16)  # bf16 (truncated: any bf16 values do)
    types = (q.GGMLQuantizationType.Q4_0, q.GGMLQuantizationType.Q8_0)

    def best(run) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times) * params / data.size

    with ThreadPoolExecutor(n_threads) as pool:
        alone = {t.name.lower(): best(lambda t=t: q.quantize(data, t, pool)) for t in types}
        both = best(lambda: q.quantize_all(bits, types, pool, bf16=True))
    return {**{f"{k}_from_f32_s": v for k, v in alone.items()}, "seconds": both}


def measure_synced(cmd: list[str], written: Path, pattern: str, env: dict | None = None) -> dict:
    """``measure(cmd)``, then the seconds to ``sync`` the files matching ``pattern`` it wrote in ``written``
    (``sync_s``): with them, a command's time compares with a bound that ends on the disk (cp + sync, dd
    conv=fdatasync). ``bytes``: what those files hold."""
    result = measure(cmd, env)
    files = sorted(written.glob(pattern))
    result["sync_s"] = measure(["sync", *map(str, files)])["seconds"]
    result["bytes"] = sum(f.stat().st_size for f in files)
    return result


def copy_bound(src: Path, folder: Path) -> dict:
    """Seconds to ``cp`` the checkpoint's shards into ``folder`` (same disk), and to ``sync`` the copies."""
    folder.mkdir(parents=True, exist_ok=True)
    cp = measure_synced(["cp", *map(str, sorted(src.glob("*.safetensors"))), str(folder)], folder, "*.safetensors")
    shutil.rmtree(folder)
    return {"bytes": cp["bytes"], "cp_s": cp["seconds"], "sync_s": cp["sync_s"],
            "cp_sync_s": cp["seconds"] + cp["sync_s"], "cp_cpu_sys_s": cp["cpu_sys_s"]}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors, type and bytes (memory-mapped, tensor by tensor)."""
    import numpy as np
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    return ta.keys() == tb.keys() and all(t.tensor_type == tb[n].tensor_type and np.array_equal(t.data, tb[n].data)
                                          for n, t in ta.items())


def time_merge(src: Path, work: Path, env: dict) -> dict:
    """``komt-edge merge`` of the adapter in ``work/lora`` into ``src``, timed, then ``sync`` of its shards (as
    ``copy_bound`` syncs the copies: both are then on the disk); the merged copy is removed after."""
    exe = str(Path(sys.executable).with_name("komt-edge"))
    merged = measure_synced([exe, "merge", str(src), str(work / "lora"), "-o", str(work / "merged")],
                            work / "merged", "*.safetensors", env)
    merged["merge_sync_s"] = merged["seconds"] + merged["sync_s"]
    shutil.rmtree(work / "merged")  # free the disk
    return merged


def time_convert(src: Path, out: Path, n_threads: int, env: dict) -> dict:
    """``komt-edge gguf SRC -q q4_0 -q q8_0 -o OUT``, timed, then ``sync`` of the two files (so that the time with
    the sync compares with ``dd conv=fdatasync``)."""
    exe = str(Path(sys.executable).with_name("komt-edge"))
    ours = measure_synced([exe, "gguf", str(src), "-q", "q4_0", "-q", "q8_0", "--template", "mistral",
                           "--threads", str(n_threads), "-o", str(out)], out, "*.gguf", env)
    ours["convert_sync_s"] = ours["seconds"] + ours["sync_s"]
    return ours


def run_shape(name: str, work: Path, n_threads: int, rounds: int = 1) -> dict:
    src = work / f"{name}-hf"
    t0 = time.perf_counter()
    params = write_checkpoint(src, SHAPES[name])
    gen_s = time.perf_counter() - t0
    env = {**os.environ, "OMP_NUM_THREADS": str(n_threads)}
    ours = time_convert(src, work / "komt-edge", n_threads, env)
    out_bytes = ours["bytes"]
    for extra in (work / "komt-edge").glob("*Q8_0.gguf"):
        extra.unlink()  # only the q4_0 files are compared: free the disk (a 7B shape needs it)
    # llama.cpp: convert to the source precision, then quantize each type.
    bf16 = work / "llama.cpp" / f"{name}-bf16.gguf"
    bf16.parent.mkdir(exist_ok=True)
    conv = measure([sys.executable, str(LLAMA_SRC / "convert_hf_to_gguf.py"), str(src), "--outtype", "bf16",
                    "--outfile", str(bf16)], env)
    quant, identical = {}, None
    for qtype, ftype in (("q4_0", 2), ("q8_0", 7)):
        code = ("import ctypes, llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                f"p.ftype = {ftype}; p.nthread = {n_threads}; "
                "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))")
        theirs = bf16.with_name(f"{name}-{qtype}.gguf")
        quant[qtype] = measure([sys.executable, "-c", code, str(bf16), str(theirs)], env)
        if qtype == "q4_0":
            identical = same_tensors(next((work / "komt-edge").glob("*Q4_0.gguf")), theirs)
        theirs.unlink()
    bf16.unlink()  # the intermediate is 2 bytes a weight: free the disk before the merge
    theirs_s = conv["seconds"] + sum(q["seconds"] for q in quant.values())
    theirs_mem = max([conv["peak_rss_anon_mib"]] + [q["peak_rss_anon_mib"] for q in quant.values()])
    shutil.rmtree(work / "llama.cpp")
    shutil.rmtree(work / "komt-edge")
    dd = disk_bound(work, out_bytes)
    converts, dds = [ours], [dd]
    for _ in range(rounds - 1):  # komt-edge and dd alternately: the disk's speed weighs on both alike
        converts.append(time_convert(src, work / "komt-edge", n_threads, env))
        shutil.rmtree(work / "komt-edge")
        dds.append(disk_bound(work, out_bytes))
    paired = [c["convert_sync_s"] / d["dd_fdatasync_s"] for c, d in zip(converts, dds)]
    write_adapter(work / "lora", src, SHAPES[name])
    merged = time_merge(src, work, env)
    copy = copy_bound(src, work / "copy")
    compute = quantize_bound(params, n_threads)
    ratios = {"komt_edge_over_quantize_bound": ours["seconds"] / compute["seconds"],
              "komt_edge_over_llama_cpp": ours["seconds"] / theirs_s,
              "komt_edge_over_dd_fdatasync": sorted(paired)[len(paired) // 2],  # the median pair (+ sync / dd)
              "komt_edge_over_dd_fdatasync_rounds": paired,
              "komt_edge_over_dd_page_cache": ours["seconds"] / dd["dd_page_cache_s"],
              "merge_over_cp_sync": merged["merge_sync_s"] / copy["cp_sync_s"],
              "merge_over_cp": merged["seconds"] / copy["cp_s"]}
    return {"shape": name, "params": params, "checkpoint_gib": sum(p.stat().st_size for p in src.glob("*.safetensors"))
            / 1024 ** 3, "generate_s": gen_s,
            "komt_edge": ours, "llama_cpp": {"convert_bf16": conv, **quant, "seconds": theirs_s,
                                             "peak_rss_anon_mib": theirs_mem},
            "q4_0_identical": identical, "merge": merged, "disk_bound": dd, "copy_bound": copy, "quantize_bound": compute,
            "rounds": {"komt_edge": converts, "disk_bound": dds},
            "ratios": ratios}


def each_shape(shapes: list[str], work: Path | None, keep: bool, run) -> list[dict]:
    """``run(shape, folder, ...)`` for each shape in a fresh folder under ``work`` (a temp folder when None); the
    folders are removed afterwards, even after a failure, unless ``keep``."""
    root = work or Path(tempfile.mkdtemp(prefix="komt-bench-"))
    results = []
    try:
        for shape in shapes:
            folder = root / shape
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            try:
                results.append(run(shape, folder))
            finally:
                if not keep:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not keep and work is None:
            shutil.rmtree(root, ignore_errors=True)
    return results


def merge_rounds(name: str, work: Path, n_threads: int, rounds: int) -> dict:
    """The merge alone against its copy bound: ``rounds`` times cp + sync then ``komt-edge merge`` + sync,
    alternating on the same checkpoint, so page-cache state, the disk's speed and other load weigh on both alike."""
    src = work / f"{name}-hf"
    params = write_checkpoint(src, SHAPES[name])
    write_adapter(work / "lora", src, SHAPES[name])
    env = {**os.environ, "OMP_NUM_THREADS": str(n_threads)}
    copies, merges = [], []
    for _ in range(rounds):
        copies.append(copy_bound(src, work / "copy"))
        merges.append(time_merge(src, work, env))
    best = min(m["merge_sync_s"] for m in merges) / min(c["cp_sync_s"] for c in copies)
    paired = [m["merge_sync_s"] / c["cp_sync_s"] for m, c in zip(merges, copies)]
    return {"shape": name, "params": params, "rounds": rounds, "copy_bound": copies, "merge": merges,
            "merge_over_cp_sync_best": best, "merge_over_cp_sync_rounds": paired}


def shape_parser(description: str, shapes: list[str], keep: str) -> argparse.ArgumentParser:
    """The arguments every shape benchmark takes: --shape (repeatable), --threads, --work, --json, --keep (``keep``:
    what it keeps). Run the shapes with ``each_shape(args.shape or ["tiny"], args.work, args.keep, ...)``."""
    ap = argparse.ArgumentParser(description=description.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=sorted(shapes), help="repeatable (default: tiny)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help=f"keep {keep}")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = shape_parser(__doc__, list(SHAPES), "the generated checkpoints and GGUF files")
    ap.add_argument("--rounds", type=int, default=1, metavar="N",
                    help="komt-edge conversion (+ sync) and dd (fdatasync) N times each, alternating")
    ap.add_argument("--merge-rounds", type=int, default=0, metavar="N",
                    help="measure only the merge against cp, N alternating rounds per shape (written to --json)")
    args = ap.parse_args(argv)
    if args.merge_rounds:
        out = each_shape(args.shape or ["tiny"], args.work, args.keep,
                         lambda shape, folder: merge_rounds(shape, folder, args.threads, args.merge_rounds))
        for r in out:
            print(f"{r['shape']}: merge + sync " + ", ".join(f"{m['merge_sync_s']:.1f} s" for m in r["merge"])
                  + "; cp + sync " + ", ".join(f"{c['cp_sync_s']:.1f} s" for c in r["copy_bound"])
                  + "; round by round " + ", ".join(f"{x:.2f}×" for x in r["merge_over_cp_sync_rounds"])
                  + f"; best / best {r['merge_over_cp_sync_best']:.2f}×")
        if args.json:
            args.json.write_text(json.dumps({"threads": args.threads, "results": out}, indent=2))
        return
    if not (LLAMA_SRC / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"error: {LLAMA_SRC}/convert_hf_to_gguf.py is missing: run `make install`")
    results = each_shape(args.shape or ["tiny"], args.work, args.keep,
                         lambda shape, folder: run_shape(shape, folder, args.threads, args.rounds))
    import llama_cpp

    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
            "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
            "torch": torch.__version__}
    print(f"threads={args.threads}, cpus={os.cpu_count()}, llama-cpp-python {llama_cpp.__version__}")
    print("| shape | params | bf16 checkpoint | komt-edge q4_0+q8_0 | llama.cpp bf16 → q4_0, q8_0 | "
          "peak RssAnon komt-edge | peak RssAnon llama.cpp | q4_0 identical | komt-edge merge (time, RssAnon) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        print(f"| {r['shape']} | {r['params'] / 1e9:.2f} B | {r['checkpoint_gib']:.2f} GiB | "
              f"{r['komt_edge']['seconds']:.1f} s | {r['llama_cpp']['seconds']:.1f} s "
              f"({r['llama_cpp']['convert_bf16']['seconds']:.1f} + {r['llama_cpp']['q4_0']['seconds']:.1f} + "
              f"{r['llama_cpp']['q8_0']['seconds']:.1f}) | {r['komt_edge']['peak_rss_anon_mib']:.0f} MiB | "
              f"{r['llama_cpp']['peak_rss_anon_mib']:.0f} MiB | {'yes' if r['q4_0_identical'] else 'NO'} | "
              f"{r['merge']['seconds']:.1f} s, {r['merge']['peak_rss_anon_mib']:.0f} MiB |")
        d, c, x = r["disk_bound"], r["copy_bound"], r["ratios"]
        rows.append(f"| {r['shape']} | {x['komt_edge_over_llama_cpp']:.2f} | {d['bytes'] / 1024 ** 3:.2f} GiB: "
                    f"{d['dd_fdatasync_s']:.1f} s / {d['dd_page_cache_s']:.1f} s | "
                    f"{x['komt_edge_over_dd_fdatasync']:.2f} / {x['komt_edge_over_dd_page_cache']:.2f} | "
                    f"{c['bytes'] / 1024 ** 3:.2f} GiB: {c['cp_sync_s']:.1f} s / {c['cp_s']:.1f} s | "
                    f"{x['merge_over_cp_sync']:.2f} / {x['merge_over_cp']:.2f} | "
                    f"{r['quantize_bound']['seconds']:.1f} s | {x['komt_edge_over_quantize_bound']:.2f} |")
    print()
    print("| shape | komt-edge / llama.cpp | dd of the GGUF bytes (fdatasync / page cache) | komt-edge / dd | "
          "cp of the shards (+ sync / alone) | merge / cp | quantize-only floor | komt-edge / floor |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| shape | round | komt-edge + sync | dd (fdatasync) | ratio |")
    print("|---|---|---|---|---|")
    for r in results:
        for k, (c, d) in enumerate(zip(r["rounds"]["komt_edge"], r["rounds"]["disk_bound"]), 1):
            print(f"| {r['shape']} | {k} | {c['convert_sync_s']:.1f} s | {d['dd_fdatasync_s']:.1f} s | "
                  f"{c['convert_sync_s'] / d['dd_fdatasync_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
