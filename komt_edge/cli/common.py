"""What every command does with a result: print its summary, or its JSON to a file or standard output."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..atomic import atomic_file

STDOUT = Path("-")


def emit_json(data, target: Path | None) -> None:
    """``data`` as JSON: to standard output for ``--json`` alone, else atomically to the file."""
    if target is None:
        return
    text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    if target == STDOUT:
        click.echo(text, nl=False)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
