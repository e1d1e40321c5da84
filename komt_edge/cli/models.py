"""`komt-edge models`: the komt zoo."""

from __future__ import annotations

from pathlib import Path

import click

from . import options
from .common import STDOUT, emit_json


@click.command("models")
@options.json_out("the zoo")
@options.verbose(drives_libraries=False)
def models_cmd(json_out: Path | None) -> None:
    """List the published komt models, their Hub ids and prompt templates.

    Example: komt-edge models --json
    """
    from ..zoo import models

    zoo = models()
    if json_out is not None:
        emit_json([m.to_dict() for m in zoo], json_out)
    if json_out != STDOUT:
        for m in zoo:
            click.echo(m.summary())
