"""Options of the two commands that run a GGUF file locally, `chat` and `serve`, defined once."""

from __future__ import annotations

import click

from . import options


def local_model(func):
    """MODEL and how it becomes a loaded llama.cpp model: --quant, --org, --revision, --template, --lora, --ctx,
    --threads, --verbose."""
    decorators = [
        click.argument("model"),
        # -q/--quant names a quantization type in every command (here: the one to run; param name as elsewhere)
        click.option("-q", "--quant", "quants", default=None, metavar="TYPE",
                     help="The file to use among a folder's or Hub repo's GGUF files, by its type (Q4_K_M, Q8_0, "
                          "...) [default: Q4_K_M if present, else the smallest file of 4 bits or more]."),
        click.option("--org", default=None, help="Hub user or organization whose ORG/<zoo name>-GGUF repo a zoo name "
                                                 "means [default: davidkim205]."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit) [default: main]."),
        options.template(),
        click.option("--lora", default=None, type=click.Path(dir_okay=False),
                     help="A LoRA adapter GGUF (general.type = adapter) to apply on top of MODEL."),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=0), default=None,
                     help="Context size in tokens, from 256 to the model's training context (0: that context) "
                          "[default: 2048, or the training context if smaller]."),
        options.threads(),
        options.verbose(),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func
