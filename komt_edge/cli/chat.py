"""`komt-edge chat MODEL`."""

from __future__ import annotations

import click

from .model_options import local_model


@click.command("chat")
@local_model
@click.option("--system", default=None, help="System prompt, put in front of the conversation by the template.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None,
              help="Sampling temperature; 0 is greedy [default: llama-cpp-python's chat default, 0.2].")
@click.option("--top-p", type=click.FloatRange(0, 1), default=None, help="Nucleus sampling [default: 0.95].")
@click.option("--top-k", type=click.IntRange(min=0), default=None, help="Top-k sampling [default: 40].")
@click.option("--repeat-penalty", type=click.FloatRange(min=0), default=None,
              help="Penalty for repeated tokens [default: 1.0, none].")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Longest reply in tokens [default: until EOS or the context is full].")
@click.option("--seed", type=int, default=None, help="Sampling seed, for reproducible replies.")
def chat_cmd(model: str, quants: str | None, org: str | None, revision: str | None, template: str | None,
             lora: str | None, n_ctx: int, n_threads: int | None, system: str | None, temperature: float | None,
             top_p: float | None, top_k: int | None, repeat_penalty: float | None, max_tokens: int | None,
             seed: int | None) -> None:
    """Chat with MODEL in Korean in the terminal, formatted by the chat template stored in the file.

    MODEL is a GGUF file, a folder of them, a Hub GGUF repo (ORG/NAME-GGUF) or a zoo name. /reset clears the
    conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply. When standard input is not a terminal, each line
    is one user turn and only the replies are printed.

    Example: komt-edge chat dist/komt-mistral-7b-v1-Q4_K_M.gguf --temperature 0.7, or
    echo '한국의 수도는?' | komt-edge chat my-org/komt-mistral-7b-v1-GGUF --quant Q8_0 --temperature 0
    """
    from ..chat import chat

    chat(model, quant=quants, org=org, revision=revision, template=template, system=system, temperature=temperature,
         top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, max_tokens=max_tokens, seed=seed, n_ctx=n_ctx,
         n_threads=n_threads, lora=lora)
