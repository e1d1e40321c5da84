"""What every command does with a result: print its summary, or its JSON to a file or standard output."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..atomic import ensure_writable_dir, file_state, write_json_report
from ..errors import KomtError

STDOUT = Path("-")
JSON_STATE = "komt_edge.json_state"  # ctx.meta: the --json path's state when it was checked (atomic.file_state)


def show(summary: str, data, target: Path | None) -> None:
    """A command's result: its summary, and with ``--json`` its JSON (``data``, the result's ``to_dict()``).
    ``--json`` alone prints the JSON only, so that standard output parses."""
    if target != STDOUT:
        click.echo(summary)
    emit_json(data, target)


def progress_log(target: Path | None):
    """Where a command's progress lines go: standard output, or standard error while the JSON goes there."""
    return lambda message: click.echo(message, err=target == STDOUT)


def emit_json(data, target: Path | None) -> None:
    """``data`` as JSON: to standard output for ``--json`` alone, else atomically to the file."""
    if target is None:
        return
    text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    if target == STDOUT:
        click.echo(text, nl=False)
        return
    ctx = click.get_current_context(silent=True)
    if ctx is not None and JSON_STATE in ctx.meta and file_state(target) != ctx.meta[JSON_STATE]:
        # the path was free (or a report) when checked; this run wrote it since: it is one of the run's outputs
        raise KomtError(f"--json {target} is a file this run has just written (one of its outputs), kept as it is: "
                        "give the JSON report a name of its own")
    ensure_writable_dir(target.parent, option="--json")
    write_json_report(target, text)
