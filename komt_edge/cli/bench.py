"""`komt-edge bench quality|speed|all|judge` (``komt_edge.bench``)."""

from __future__ import annotations

from pathlib import Path

import click

from . import options
from .common import show

TEXT = click.option("--text", "text", type=click.Path(path_type=Path), default=None,
                    help="Korean UTF-8 text file to evaluate on (default: the held-out split of --source).")
SOURCE = click.option("--source", default="konlpy", show_default=True,
                      help="Built-in Korean corpus for the default text (komt_edge.corpora).")
OUT = click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None,
                   help="Write OUT.md, OUT.json and OUT.png (e.g. -o dist/bench/komt-mistral-7b).")
REFERENCE = click.option("--reference", type=click.Path(path_type=Path), default=None,
                         help="Reference GGUF (f16 or f32 of the same model): adds llama-perplexity's KL-divergence "
                              "statistics.")
CTX = click.option("--ctx", "n_ctx", type=click.IntRange(min=8), default=512, show_default=True,
                   help="Tokens per chunk (llama-perplexity -c); the second half of each chunk is scored.")
CHUNKS = click.option("--chunks", "n_chunks", type=click.IntRange(min=0), default=0,
                      help="Score at most this many chunks (0 = all, as llama-perplexity --chunks).")
NGL = click.option("--ngl", "n_gpu_layers", type=int, default=0, show_default=True,
                   help="Layers to offload to a GPU.")
REPETITIONS = click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True,
                           help="Timed runs per test, as llama-bench -r.")
N_PROMPT = click.option("-p", "--n-prompt", "n_prompt", type=click.IntRange(min=1), default=512, show_default=True,
                        help="Prompt tokens of the pp test.")
N_GEN = click.option("-n", "--n-gen", "n_gen", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Generated tokens of the tg test.")
HF = click.option("--hf", default=None, help="HF model for the GPU rows (transformers fp16/bf16 generate).")
GPTQ = click.option("--gptq", default=None, help="GPTQ checkpoint for the GPU rows.")
NO_CUDA = click.option("--no-cuda", is_flag=True, help="Skip the GPU rows.")
FILES = click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))


def speed_options(command):
    """What `bench speed` measures with, shared by `bench all` (which exposes all of it)."""
    for option in reversed((options.threads(multiple=True), N_PROMPT, N_GEN, REPETITIONS, NGL, HF, GPTQ, NO_CUDA, TEXT,
                            SOURCE, OUT, options.json_out("the report"), options.verbose())):
        command = option(command)
    return command


@click.group("bench")
def bench_group() -> None:
    """Benchmarks: llama.cpp speed (llama-bench's pp/tg), Korean quality (perplexity, KL vs a reference),
    and komt's LLM-judged score."""


def _show(report, out: Path | None, title: str, json_out: Path | None) -> None:
    from ..bench import write_outputs

    show(report.summary(), report.to_dict(), json_out)
    if out is not None:
        for p in write_outputs(report, out, title=title):
            click.echo(f"wrote {p}", err=True)


@bench_group.command("quality")
@FILES
@REFERENCE
@TEXT
@SOURCE
@CTX
@CHUNKS
@options.threads()
@NGL
@OUT
@options.json_out("the report")
@options.verbose()
def quality_cmd(files: tuple[Path, ...], reference: Path | None, text: Path | None, source: str, n_ctx: int,
                n_chunks: int, n_threads: int | None, n_gpu_layers: int, out: Path | None,
                json_out: Path | None) -> None:
    """Korean perplexity of each GGUF FILE and, with --reference, KL divergence against it.

    Example: komt-edge bench quality dist/*-Q4_0.gguf dist/*-Q8_0.gguf --reference dist/*-F16.gguf -o dist/bench/q
    """
    from ..bench import quality

    report = quality(files, reference, text=text, source=source, n_ctx=n_ctx, n_chunks=n_chunks or None,
                     n_threads=n_threads, n_gpu_layers=n_gpu_layers)
    _show(report, out, "Korean quality", json_out)


@bench_group.command("speed")
@FILES
@speed_options
def speed_cmd(files: tuple[Path, ...], n_threads: tuple[int, ...], n_prompt: int, n_gen: int, repetitions: int,
              n_gpu_layers: int, hf: str | None, gptq: str | None, no_cuda: bool, text: Path | None, source: str,
              out: Path | None, json_out: Path | None) -> None:
    """Prompt and generation tokens/s of each GGUF FILE (llama-bench's pp512/tg128), Korean characters/s,
    bits per weight and the memory-bandwidth roofline; GPU rows say "no GPU" on CPU-only machines.

    Example: komt-edge bench speed dist/*.gguf -t 1 -t 2 -o dist/bench/speed
    """
    from ..bench import speed

    report = speed(files, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, n_threads=list(n_threads) or None,
                   n_gpu_layers=n_gpu_layers, text=text, source=source, cuda=not no_cuda, hf=hf, gptq=gptq)
    _show(report, out, "Speed", json_out)


@bench_group.command("all")
@FILES
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Reference GGUF for KL divergence (default: the F32/F16/BF16 file among FILES, if any).")
@CTX
@CHUNKS
@speed_options
def all_cmd(files: tuple[Path, ...], reference: Path | None, n_threads: tuple[int, ...], n_ctx: int, n_chunks: int,
            repetitions: int, n_prompt: int, n_gen: int, n_gpu_layers: int, hf: str | None, gptq: str | None,
            no_cuda: bool, text: Path | None, source: str, out: Path | None, json_out: Path | None) -> None:
    """Quality and speed of FILES in one run, one Markdown/JSON/PNG (what `make bench` runs).

    Example: komt-edge bench all dist/*.gguf -t 1 -o dist/bench/komt-mistral-7b
    """
    from ..bench import bench_all

    report = bench_all(files, reference=reference, n_threads=list(n_threads) or None, n_ctx=n_ctx,
                       n_chunks=n_chunks or None, repetitions=repetitions, n_prompt=n_prompt, n_gen=n_gen,
                       n_gpu_layers=n_gpu_layers, text=text, source=source, cuda=not no_cuda, hf=hf, gptq=gptq)
    _show(report, out, "komt-edge benchmark", json_out)


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
@options.template()
@click.option("--questions", "n_questions", type=click.IntRange(min=1), default=None,
              help="Ask only the first N questions.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest answer the model may give, in tokens.")
@options.threads()
@click.option("--show-prompt", is_flag=True, help="Print the judge prompt and the questions, then exit.")
@options.json_out("the report")
@options.verbose()
def judge_cmd(model: Path | None, judge_url: str | None, judge_model: str | None, judge_key: str | None,
              judge_gguf: Path | None, template: str | None, n_questions: int | None, max_tokens: int,
              n_threads: int | None, show_prompt: bool, json_out: Path | None) -> None:
    """komt's evaluation: MODEL (a GGUF) answers Korean questions in its komt template, an LLM judge scores each
    answer 0-5; prints score, average and percentage as komt reports them.

    Example: komt-edge bench judge dist/komt-mistral-7b-v1-Q4_0.gguf --judge-url http://127.0.0.1:8080/v1
    --judge-model local
    """
    from ..bench import judge, judge_prompt

    if show_prompt:
        click.echo(judge_prompt(n_questions))
        return
    report = judge(model, judge_url=judge_url, judge_model=judge_model, judge_key=judge_key, judge_gguf=judge_gguf,
                   template=template, n_questions=n_questions, max_tokens=max_tokens, n_threads=n_threads)
    show(report.summary(), report.to_dict(), json_out)
