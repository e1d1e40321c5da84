"""The `komt-edge` command: one module per command or command group, over one library function each.

Each command parses its options (shared ones are defined once, in ``options``), calls the library function of
its stage, prints the result's summary (or its JSON) and lets ``main`` turn a ``KomtError`` into one
``error: ...`` line and a non-zero exit. No stage rule is written here.
"""

from __future__ import annotations

import signal
import sys

import click

from .. import __version__
from ..errors import KomtError, handle_termination_signals
from .bench import bench_group
from .chat import chat_cmd
from .demo import demo_cmd
from .gguf import gguf_cmd
from .gguf_lora import gguf_lora_cmd
from .gptq import gptq_cmd
from .hub import push_cmd, release_cmd
from .imatrix import imatrix_cmd
from .merge import merge_cmd
from .models import models_cmd
from .serve import serve_cmd
from .train import train_cmd
from .verify import verify_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="komt-edge")
def cli() -> None:
    """komt-edge: take komt Korean LLMs from the Hub to verified llama.cpp files.

    MODEL is a zoo name (`komt-edge models`), a Hub id (ORG/NAME) or a local folder.
    """


for command in (models_cmd, merge_cmd, gguf_cmd, gguf_lora_cmd, imatrix_cmd, verify_cmd, demo_cmd, train_cmd, gptq_cmd, bench_group, push_cmd,
                release_cmd, chat_cmd, serve_cmd):
    cli.add_command(command)


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
