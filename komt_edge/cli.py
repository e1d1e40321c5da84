"""The `komt-edge` command. Each command parses its options, calls the stage function of the same name, prints."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .errors import KomtError, handle_termination_signals

THREADS = click.option("--threads", "-t", "n_threads", type=click.IntRange(min=1), default=None,
                       help="CPU threads for llama.cpp (default: all cores).")
ALLOW_PICKLE = click.option("--allow-pickle", is_flag=True,
                            help="Also read pickle *.bin weights, with torch.load(weights_only=True).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="komt-edge")
def cli() -> None:
    """komt-edge: take komt Korean LLMs from the Hub to verified llama.cpp files.

    MODEL is a zoo name (`komt-edge models`), a Hub id (ORG/NAME) or a local folder.
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the zoo as JSON.")
def models(as_json: bool) -> None:
    """List the published komt models, their Hub ids and prompt templates."""
    from dataclasses import asdict

    from .zoo import ZOO

    if as_json:
        click.echo(json.dumps([{**asdict(m), "template": m.template.format("{prompt}")} for m in ZOO],
                              ensure_ascii=False, indent=2))
        return
    for m in ZOO:
        click.echo(f"{m.name}  ({m.size_label}, {m.architecture}, licence {m.license})")
        click.echo(f"  aliases:  {', '.join(m.aliases) or '-'}")
        click.echo(f"  merged:   {m.merged}")
        click.echo(f"  adapter:  {m.adapter}  (applies to {m.base})")
        click.echo(f"  template: {m.template.format('{prompt}')!r}")


@cli.command("merge")
@click.argument("base")
@click.argument("adapter")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output safetensors shard.")
@click.option("--force", is_flag=True,
              help="Write into an existing folder holding other files: only the merge's own files are replaced.")
@ALLOW_PICKLE
def merge_cmd(base: str, adapter: str, out: Path, max_shard_size: str, force: bool, allow_pickle: bool) -> None:
    """Merge a LoRA ADAPTER into the full-precision BASE, tensor by tensor.

    BASE and ADAPTER are local folders or Hub ids. OUT must be new, empty or an earlier merge's output (which is
    replaced); a folder holding anything else is refused unless --force.

    Example: komt-edge merge mistralai/Mistral-7B-Instruct-v0.1 davidkim205/komt-mistral-7b-v1-lora -o merged/
    """
    from .merge import merge

    merge(base, adapter, out, allow_pickle=allow_pickle, max_shard_size=max_shard_size, force=force, progress=True)
    click.echo(f"merged model written to {out}")


@cli.command("gguf")
@click.argument("model")
@click.option("-q", "--quant", "quants", multiple=True, default=("q4_0", "q8_0"), show_default=True,
              help="Output type; repeat for several (f32 f16 bf16 q8_0 q4_0 q4_K_M q5_K_M q6_K ...).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
              help="Output folder.")
@click.option("--adapter", default=None, help="LoRA adapter (folder or Hub id) to merge first.")
@click.option("--template", type=click.Choice(["llama", "mistral", "none"]), default=None,
              help="Chat template to embed (default: the model's komt template).")
@click.option("--name", default=None, help="Model name for general.name and file names.")
@click.option("--force", is_flag=True,
              help="Replace files at the output names even when komt-edge did not write them for this model.")
@THREADS
@ALLOW_PICKLE
def gguf_cmd(model: str, quants: tuple[str, ...], out: Path, adapter: str | None, template: str | None,
             name: str | None, force: bool, n_threads: int | None, allow_pickle: bool) -> None:
    """Convert MODEL to GGUF, one file per -q type, from one read of the checkpoint.

    Files are named <name>-<TYPE>.gguf in OUT. A re-run replaces komt-edge's own files of the same model, each
    atomically (the old file stays until the new one is complete); any other file at those names is refused
    unless --force.

    Example: komt-edge gguf komt-mistral-7b -q q4_0 -q q8_0 -o dist/
    """
    from .gguf import convert

    quants = tuple(t for spec in quants for t in spec.replace(",", " ").split())
    for path in convert(model, quants, out, adapter=adapter, allow_pickle=allow_pickle, template=template,
                        name=name, n_threads=n_threads, force=force):
        click.echo(str(path))


@cli.command("verify")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--hf", "hf", required=True, help="The original model: zoo name, Hub id or folder.")
@click.option("--adapter", default=None, help="LoRA adapter the file was merged with (zoo names imply it).")
@click.option("--template", type=click.Choice(["llama", "mistral"]), default=None,
              help="Prompt template for the logit prompts (default: the model's).")
@click.option("--hf-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Precision of the HF reference forward pass.")
@click.option("--max-kl", type=float, default=None, help="Override the mean-KL bound.")
@click.option("--min-top1", type=float, default=None, help="Override the top-1 agreement bound (0-1).")
@click.option("--max-abs", type=float, default=None, help="Override the max |Δlogit| bound.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the reports as JSON to this file.")
@THREADS
@ALLOW_PICKLE
def verify_cmd(files: tuple[Path, ...], hf: str, adapter: str | None, template: str | None, hf_dtype: str,
               max_kl: float | None, min_top1: float | None, max_abs: float | None, json_out: Path | None,
               n_threads: int | None, allow_pickle: bool) -> None:
    """Check that GGUF FILES tokenize and predict like the HF model, on Korean text.

    Exits non-zero when any bound fails. Example: komt-edge verify dist/*.gguf --hf komt-mistral-7b
    """
    from .atomic import atomic_file, check_output_file
    from .verify import BoundOverrides, load_reference, verify

    overrides = BoundOverrides(max_abs=max_abs, mean_kl=max_kl, min_top1=min_top1)  # checked before any work
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise KomtError(f"{missing[0]} does not exist: run `komt-edge gguf` first")
    if json_out:
        check_output_file(json_out, option="--json")
    reference = load_reference(hf, adapter=adapter, allow_pickle=allow_pickle, template=template, hf_dtype=hf_dtype)
    reports = []
    for f in files:
        report = verify(f, hf, n_threads=n_threads, overrides=overrides, reference=reference)
        click.echo(report.summary())
        reports.append(report)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(json_out) as tmp:
            tmp.write_text("[" + ",\n".join(r.to_json() for r in reports) + "]\n", encoding="utf-8")
    failed = [r.file for r in reports if not r.passed]
    if failed:
        raise KomtError(f"verification failed for {', '.join(Path(f).name for f in failed)}: see the report above")


@cli.command("demo")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("dist/demo"), show_default=True)
@THREADS
def demo_cmd(out: Path, n_threads: int | None) -> None:
    """Run merge → gguf → verify offline on a tiny komt-mistral-shaped model, then chat in Korean."""
    from .demo import run_demo

    result = run_demo(out, n_threads=n_threads)
    click.echo("\nllama-cpp-python chat, formatted by the komt template stored in each file:")
    click.echo(f"  user: {result.prompt}")
    for name, answer in result.answers.items():
        click.echo(f"  {name}: {answer}")
    if not result.passed:
        raise KomtError("the demo's verification failed: see the reports above")


@cli.command("train")
@click.option("--model", "model", required=True,
              help="What the adapter applies to: zoo name (its merged komt model), Hub id or local folder.")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help='JSON or JSONL records {"instruction", "output"} (optional "input").')
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: the adapter, checkpoints/ and logs/.")
@click.option("--bits", type=click.Choice(["4", "8", "16", "32"]), default=None,
              help="Base weights: 4 (nf4 QLoRA, default on CUDA), 8, 16 or 32; CPU trains in 32.")
@click.option("--lora-r", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=32, show_default=True,
              help="LoRA alpha (scale = alpha / r).")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True)
@click.option("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
              show_default=True, help="Comma-separated module names to adapt.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True,
              help="Peak learning rate (cosine schedule).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Per device.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Gradient accumulation steps.")
@click.option("--max-length", type=click.IntRange(min=8), default=2048, show_default=True,
              help="Tokens per record; longer records are truncated (reported).")
@click.option("--eval-split", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
              help="Fraction of records held out for the eval loss (0: none).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in OUT/checkpoints.")
@click.option("--template", type=click.Choice(["llama", "mistral"]), default=None,
              help="komt prompt template (default: the model's family).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--save-steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Checkpoint every N steps.")
@click.option("--save-total-limit", type=click.IntRange(min=1), default=3, show_default=True,
              help="Checkpoints kept.")
@click.option("--eval-steps", type=click.IntRange(min=1), default=None,
              help="Eval every N steps (default: --save-steps).")
@click.option("--logging-steps", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--optim", default=None,
              help="transformers optimizer name (default: paged_adamw_32bit on CUDA, adamw_torch on CPU).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Default: on for CUDA, off on CPU.")
@click.option("--deepspeed", default=None,
              help="DeepSpeed JSON config, or 'zero3' for the shipped ZeRO-3 CPU-offload config.")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard logs to OUT/logs/tensorboard.")
@ALLOW_PICKLE
def train_cmd(model: str, data: Path, out: Path, bits: str | None, lora_r: int, lora_alpha: float,
              lora_dropout: float, target_modules: str, epochs: float, max_steps: int | None, lr: float,
              batch_size: int, grad_accum: int, max_length: int, eval_split: float, resume: bool,
              template: str | None, device: str, warmup_steps: int, save_steps: int, save_total_limit: int,
              eval_steps: int | None, logging_steps: int, seed: int, optim: str | None,
              gradient_checkpointing: bool | None, deepspeed: str | None, tensorboard: bool,
              allow_pickle: bool) -> None:
    """Train a komt-style LoRA adapter on Korean instruction data (komt's QLoRA recipe by default).

    Example: komt-edge train --model komt-mistral-7b --data ko.jsonl -o out/my-lora, then
    komt-edge gguf komt-mistral-7b --adapter out/my-lora. Multi-GPU:
    accelerate launch --config_file "$(python -m komt_edge.configs multi-gpu)" -m komt_edge.cli train ...
    """
    from .train import train

    result = train(model, data, out, bits=int(bits) if bits else None, lora_r=lora_r, lora_alpha=lora_alpha,
                   lora_dropout=lora_dropout, target_modules=target_modules.split(","), epochs=epochs,
                   max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                   eval_split=eval_split, resume=resume, template=template, device=device,
                   warmup_steps=warmup_steps, save_steps=save_steps, save_total_limit=save_total_limit,
                   eval_steps=eval_steps, logging_steps=logging_steps, seed=seed, optim=optim,
                   gradient_checkpointing=gradient_checkpointing, deepspeed=deepspeed, tensorboard=tensorboard,
                   allow_pickle=allow_pickle, log=click.echo)
    click.echo(result.summary())
    click.echo(f"next: komt-edge gguf {model} --adapter {out} --template {result.template} -q q4_0 -q q8_0 -o dist")


@cli.command("gptq")
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
              help="Parent folder; the checkpoint goes to OUT/<model>-GPTQ-<bits>bit-g<group size>.")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits: 2, 3, 4 or 8.")
@click.option("--group-size", type=int, default=128, show_default=True, help="32, 64, 128 or -1 (per channel).")
@click.option("--desc-act/--no-desc-act", default=False, show_default=True,
              help="Quantize columns in activation order (writes a permuted g_idx).")
@click.option("--calibration", default="korean", show_default=True,
              help="'korean' (built-in Korean set) or a text / JSON / JSONL file.")
@click.option("--samples", type=int, default=96, show_default=True, help="Calibration windows.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per calibration window.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--adapter", default=None, help="LoRA adapter (folder or Hub id) to merge first.")
@click.option("--name", default=None, help="Model name for the output folder.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Reload, generate in Korean and compare held-out Korean perplexity with the original.")
@click.option("--eval-tokens", type=click.IntRange(min=16), default=8192, show_default=True,
              help="Held-out Korean tokens the check scores (the split holds ~7.7k).")
@click.option("--verbose", is_flag=True, help="Show GPTQModel's own logs and progress bars.")
@click.option("--force", is_flag=True,
              help="Write into an existing checkpoint folder komt-edge did not make (only its own files replaced).")
@ALLOW_PICKLE
def gptq_cmd(model: str, out: Path, bits: int, group_size: int, desc_act: bool, calibration: str, samples: int,
             seq_len: int, device: str, adapter: str | None, name: str | None, check: bool, eval_tokens: int,
             verbose: bool, force: bool, allow_pickle: bool) -> None:
    """Quantize MODEL to a GPTQ checkpoint (transformers, vLLM), calibrated on Korean text.

    Example: komt-edge gptq komt-mistral-7b -o dist/
    """
    from .gptq import gptq

    result = gptq(model, out, bits=bits, group_size=group_size, desc_act=desc_act, calibration=calibration,
                  samples=samples, seq_len=seq_len, device=device, adapter=adapter, name=name, check=check,
                  eval_tokens=eval_tokens, allow_pickle=allow_pickle, verbose=verbose, force=force)
    click.echo(result.summary())


# --- komt-edge bench: speed, quality, judge (komt_edge.bench*) ---------------------------------------

BENCH_TEXT = click.option("--text", "text", type=click.Path(path_type=Path), default=None,
                          help="Korean UTF-8 text file to evaluate on (default: the held-out split of --source).")
BENCH_SOURCE = click.option("--source", default="konlpy", show_default=True,
                            help="Built-in Korean corpus for the default text (komt_edge.corpora).")
BENCH_OUT = click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None,
                         help="Write OUT.md, OUT.json and OUT.png (e.g. -o dist/bench/komt-mistral-7b).")


def _thread_list(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    try:
        values = [int(x) for x in spec.replace(",", " ").split()]
    except ValueError:
        raise KomtError(f"--threads {spec!r}: give thread counts such as 1,2,4") from None
    if not values or min(values) < 1:
        raise KomtError(f"--threads {spec!r}: thread counts must be ≥ 1")
    return values


def _write_bench(reports: list, out: Path | None, title: str) -> None:
    from .bench_report import write_outputs

    if out is not None:
        for p in write_outputs(reports, out, title=title):
            click.echo(f"wrote {p}", err=True)


@cli.group("bench")
def bench_group() -> None:
    """Benchmarks: llama.cpp speed (llama-bench's pp/tg), Korean quality (perplexity, KL vs a reference),
    and komt's LLM-judged score."""


@bench_group.command("quality")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--reference", "-r", type=click.Path(path_type=Path), default=None,
              help="Reference GGUF (f16 or f32 of the same model): adds llama-perplexity's KL-divergence statistics.")
@BENCH_TEXT
@BENCH_SOURCE
@click.option("--ctx", "n_ctx", type=click.IntRange(min=8), default=512, show_default=True,
              help="Tokens per chunk (llama-perplexity -c); the second half of each chunk is scored.")
@click.option("--chunks", "n_chunks", type=click.IntRange(min=0), default=0,
              help="Score at most this many chunks (0 = all, as llama-perplexity --chunks).")
@click.option("--threads", "-t", "n_threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for llama.cpp (default: all cores).")
@click.option("--ngl", "n_gpu_layers", type=int, default=0, show_default=True, help="Layers to offload to a GPU.")
@BENCH_OUT
def bench_quality_cmd(files: tuple[Path, ...], reference: Path | None, text: Path | None, source: str, n_ctx: int,
                      n_chunks: int, n_threads: int | None, n_gpu_layers: int, out: Path | None) -> None:
    """Korean perplexity of each GGUF FILE and, with --reference, KL divergence against it.

    Example: komt-edge bench quality dist/*-Q4_0.gguf dist/*-Q8_0.gguf --reference dist/*-F16.gguf -o dist/bench/q
    """
    from .bench import quality
    from .bench_report import quality_markdown

    report = quality(files, reference, text=text, source=source, n_ctx=n_ctx, n_chunks=n_chunks or None,
                     n_threads=n_threads, n_gpu_layers=n_gpu_layers)
    click.echo(quality_markdown(report))
    _write_bench([report], out, "Korean quality")


@bench_group.command("speed")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--threads", "-t", "threads", default=None,
              help="Thread counts, comma-separated (default: all cores), as llama-bench -t.")
@click.option("-p", "--n-prompt", "n_prompt", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens of the pp test.")
@click.option("-n", "--n-gen", "n_gen", type=click.IntRange(min=1), default=128, show_default=True,
              help="Generated tokens of the tg test.")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--ngl", "n_gpu_layers", type=int, default=0, show_default=True, help="Layers to offload to a GPU.")
@click.option("--hf", default=None, help="HF model for the GPU rows (transformers fp16/bf16 generate).")
@click.option("--gptq", default=None, help="GPTQ checkpoint for the GPU rows.")
@click.option("--no-cuda", is_flag=True, help="Skip the GPU rows.")
@BENCH_TEXT
@BENCH_SOURCE
@BENCH_OUT
def bench_speed_cmd(files: tuple[Path, ...], threads: str | None, n_prompt: int, n_gen: int, repetitions: int,
                    n_gpu_layers: int, hf: str | None, gptq: str | None, no_cuda: bool, text: Path | None,
                    source: str, out: Path | None) -> None:
    """Prompt and generation tokens/s of each GGUF FILE (llama-bench's pp512/tg128), Korean characters/s,
    bits per weight and the memory-bandwidth roofline; GPU rows say "no GPU" on CPU-only machines.

    Example: komt-edge bench speed dist/*.gguf -t 1,2 -o dist/bench/speed
    """
    from .bench import speed
    from .bench_report import speed_markdown

    report = speed(files, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, n_threads=_thread_list(threads),
                   n_gpu_layers=n_gpu_layers, text=text, source=source, cuda=not no_cuda, hf=hf, gptq=gptq)
    click.echo(speed_markdown(report))
    _write_bench([report], out, "Speed")


@bench_group.command("all")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Reference GGUF for KL divergence (default: the F32/F16/BF16 file among FILES, if any).")
@click.option("--threads", "-t", "threads", default=None, help="Thread counts for speed, comma-separated.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=8), default=512, show_default=True)
@click.option("--chunks", "n_chunks", type=click.IntRange(min=0), default=0, help="0 = all chunks.")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True)
@BENCH_TEXT
@BENCH_SOURCE
@BENCH_OUT
def bench_all_cmd(files: tuple[Path, ...], reference: Path | None, threads: str | None, n_ctx: int, n_chunks: int,
                  repetitions: int, text: Path | None, source: str, out: Path | None) -> None:
    """Quality and speed of FILES in one run, one Markdown/JSON/PNG (what `make bench` runs)."""
    from .bench import file_info, quality, speed
    from .bench_report import quality_markdown, speed_markdown

    if reference is None:
        floats = [f for f in files if f.is_file() and file_info(f).file_type in ("ALL_F32", "MOSTLY_F16",
                                                                                  "MOSTLY_BF16")]
        reference = floats[0] if floats else None
    threads_list = _thread_list(threads)
    q = quality(files, reference, text=text, source=source, n_ctx=n_ctx, n_chunks=n_chunks or None,
                n_threads=max(threads_list) if threads_list else None)
    click.echo(quality_markdown(q))
    s = speed(files, repetitions=repetitions, n_threads=threads_list, text=text, source=source)
    click.echo(speed_markdown(s))
    _write_bench([q, s], out, "komt-edge benchmark")


@bench_group.command("judge")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--judge-url", envvar="KOMT_JUDGE_URL", default=None,
              help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 [env KOMT_JUDGE_URL].")
@click.option("--judge-model", envvar="KOMT_JUDGE_MODEL", default=None,
              help="Judge model name, e.g. gpt-4o [env KOMT_JUDGE_MODEL].")
@click.option("--judge-key", default=None,
              help="API key [env KOMT_JUDGE_API_KEY or OPENAI_API_KEY].")
@click.option("--judge-gguf", type=click.Path(path_type=Path), default=None,
              help="Offline judge: serve this GGUF on 127.0.0.1 for the run instead of --judge-url.")
@click.option("--template", type=click.Choice(["auto", "llama", "mistral"]), default="auto", show_default=True,
              help="komt prompt template for the questions (auto: the one stored in the file).")
@click.option("--questions", "n_questions", type=click.IntRange(min=1), default=None,
              help="Ask only the first N questions.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--threads", "-t", "n_threads", type=click.IntRange(min=1), default=None)
@click.option("--show-prompt", is_flag=True, help="Print the judge prompt and the questions, then exit.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report as JSON.")
def bench_judge_cmd(model: Path | None, judge_url: str | None, judge_model: str | None, judge_key: str | None,
                    judge_gguf: Path | None, template: str, n_questions: int | None, max_tokens: int,
                    n_threads: int | None, show_prompt: bool, json_out: Path | None) -> None:
    """komt's evaluation: MODEL (a GGUF) answers Korean questions in its komt template, an LLM judge scores each
    answer 0-5; prints score, average and percentage as komt reports them.

    Example: komt-edge bench judge dist/komt-mistral-7b-v1-Q4_0.gguf --judge-url http://127.0.0.1:8080/v1
    --judge-model local
    """
    from .bench_judge import JUDGE_PROMPT, JUDGE_SYSTEM, KOREAN_QUESTIONS, judge

    if show_prompt:
        click.echo(f"system: {JUDGE_SYSTEM}\n\n{JUDGE_PROMPT}\n")
        for i, (cat, q) in enumerate(KOREAN_QUESTIONS, 1):
            click.echo(f"{i:2d}. [{cat}] {q}")
        return
    if model is None:
        raise KomtError("pass the GGUF file to evaluate: komt-edge bench judge MODEL.gguf --judge-url ...")
    questions = KOREAN_QUESTIONS[:n_questions] if n_questions else None
    report = judge(model, judge_url=judge_url, judge_model=judge_model, judge_key=judge_key, judge_gguf=judge_gguf,
                   template=template, questions=questions, max_tokens=max_tokens, n_threads=n_threads)
    click.echo(report.markdown())
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --- komt-edge push / release: the Hub (komt_edge.push, komt_edge.release, komt_edge.card) -------------

@cli.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True, help="Hub model repo ORG/NAME; created when missing.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (created from main when missing).")
@click.option("--dry-run", is_flag=True, help="List what would be created and uploaded; send nothing.")
@click.option("--force", is_flag=True, help="Publish into a repo holding files komt-edge did not make (kept).")
@click.option("-m", "--message", default=None, help="Commit message.")
def push_cmd(folder: Path, repo_id: str, private: bool, revision: str | None, dry_run: bool, force: bool,
             message: str | None) -> None:
    """Upload FOLDER to a Hub repo, resumably: files the Hub already has are not sent again.

    The token comes from HF_TOKEN or `hf auth login`, nowhere else. Example:
    komt-edge push dist/release/komt-mistral-7b-v1/komt-mistral-7b-v1-GGUF --repo my-org/komt-mistral-7b-v1-GGUF
    """
    from .push import push

    result = push(folder, repo_id, private=private, revision=revision, dry_run=dry_run, force=force,
                  commit_message=message, log=click.echo)
    click.echo(result.summary())


@cli.command("release")
@click.argument("model")
@click.option("--org", required=True, help="Hub user or organization that gets the repos.")
@click.option("--quants", default=None,
              help='GGUF types, space- or comma-separated  [default: "q4_0 q4_K_M q5_K_M q8_0"].')
@click.option("--gptq/--no-gptq", default=True, show_default=True,
              help="Also build and publish the GPTQ repo (when the GPTQ stage is installed).")
@click.option("--bench/--no-bench", default=True, show_default=True,
              help="Measure Korean perplexity, KL vs f16 and tokens/s for the cards (when installed).")
@click.option("--dry-run", is_flag=True, help="Show the stages, repos and uploads; do nothing.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Output folder, reused by re-runs  [default: dist/release/NAME].")
@click.option("--adapter", default=None, help="LoRA adapter (folder or Hub id) to merge (zoo names imply it).")
@click.option("--template", type=click.Choice(["llama", "mistral"]), default=None,
              help="komt prompt template (default: the model's).")
@click.option("--name", default=None, help="Release name, for files and repos (default: the model's).")
@click.option("--base-model", default=None, help="Hub id the cards name as base_model (for a local MODEL).")
@click.option("--license", "license_", default=None, help="Licence id for the cards (default: the model's).")
@click.option("--gguf-repo", default=None, help="GGUF repo id  [default: ORG/NAME-GGUF].")
@click.option("--gptq-repo", default=None, help="GPTQ repo id  [default: ORG/NAME-GPTQ].")
@click.option("--private", is_flag=True, help="Create the repos private.")
@click.option("--force", is_flag=True,
              help="Release into repos, or an -o folder, holding files komt-edge did not make (they are kept).")
@click.option("--push/--no-push", default=True, show_default=True, help="Publish (--no-push: build and card only).")
@click.option("--keep-merged", is_flag=True, help="Also write the merged full-precision checkpoint to OUT/merged.")
@THREADS
@ALLOW_PICKLE
def release_cmd(model: str, org: str, quants: str | None, gptq: bool, bench: bool, dry_run: bool, out: Path | None,
                adapter: str | None, template: str | None, name: str | None, base_model: str | None,
                license_: str | None, gguf_repo: str | None, gptq_repo: str | None, private: bool, force: bool,
                push: bool, keep_merged: bool, n_threads: int | None, allow_pickle: bool) -> None:
    """Build, verify, benchmark and publish MODEL's GGUF and GPTQ repos with model cards.

    Stages merge → gguf → gptq → verify → bench → card → push, recorded in OUT/release-manifest.json: a re-run
    skips finished stages and resumes after a crash, a network failure or Ctrl-C. Nothing is pushed unless every
    file passed verification. Example: komt-edge release komt-mistral-7b --org my-org --quants "q4_0 q8_0"
    """
    from .release import DEFAULT_RELEASE_QUANTS, release

    result = release(model, org, quants=(quants,) if quants else DEFAULT_RELEASE_QUANTS, gptq=gptq, bench=bench,
                     dry_run=dry_run, out=out, adapter=adapter, template=template, name=name, base_model=base_model,
                     license=license_, gguf_repo=gguf_repo, gptq_repo=gptq_repo, private=private, force=force,
                     push=push, keep_merged=keep_merged, allow_pickle=allow_pickle, n_threads=n_threads,
                     log=click.echo)
    click.echo(result.summary())


def main() -> None:
    handle_termination_signals()
    try:
        cli.main(standalone_mode=False)
    except KomtError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as err:
        # click turns KeyboardInterrupt (Ctrl-C, or SIGTERM/SIGHUP through handle_termination_signals) into Abort.
        signum = getattr(err.__cause__, "signum", getattr(err, "signum", signal.SIGINT))
        click.echo(f"error: interrupted ({signal.Signals(signum).name}): no partial output was left", err=True)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
