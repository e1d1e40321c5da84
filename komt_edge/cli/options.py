"""Options shared by several commands, defined once: one name, one syntax and one meaning everywhere.

- ``-t/--threads N``: the CPU threads a command computes on (llama.cpp's, the converter's, torch's in merge);
  bench speed/all take it repeatedly to compare counts.
- ``-o/--out``: where a command writes (a folder, or a path prefix for bench).
- ``-q/--quant``: output types, repeated or as one space/comma-separated list (``--quants`` is the same option).
- ``--template auto|llama|mistral``: the komt prompt format; auto is the model's own.
- ``--json [FILE]``: the result as JSON, to FILE or, without one, to standard output.
- ``--allow-pickle``, ``--force``, ``-v/--verbose``.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from ..output import configure_output
from ..templates import TEMPLATES

# The library treats None as "the model's own template"; "auto" is its name on the command line.
TEMPLATE_CHOICES = ("auto", *TEMPLATES)


# What torch, numpy's BLAS and OpenMP read, once, when first imported, for the threads they compute on.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _cap_threads(_ctx, _param, value):
    """-t N reaches every library the command computes with, not only the one it is passed to (llama.cpp, the
    converter, merge's torch): torch and the BLAS libraries, imported only once the command runs (starting
    komt-edge imports none of them: tests/test_cli.py), read these variables then. With torch already imported
    (a command run in-process, as the tests do) the variables would change nothing, and are left alone."""
    n = max(value, default=None) if isinstance(value, tuple) else value
    if n is not None and "torch" not in sys.modules:
        os.environ.update({name: str(n) for name in THREAD_VARIABLES})
    return value


def threads(*, multiple: bool = False, default: str = "all cores", passed: bool = True):
    """``-t/--threads N``: the CPU threads the command computes on, whatever computes (llama.cpp, komt-edge's
    quantizers, torch); ``default`` says what the command uses without it. ``passed=False``: the command's library
    takes no count (train, gptq and gguf-lora compute with torch alone), the capped variables are the whole effect."""
    repeat = "; repeat to compare counts (-t 1 -t 2), as llama-bench -t 1,2" if multiple else ""
    return click.option("-t", "--threads", "n_threads", type=click.IntRange(min=1), multiple=multiple,
                        default=None, callback=_cap_threads, expose_value=passed,
                        help=f"CPU threads the command computes on{repeat} (default: {default}).")


def out_dir(default: Path | None, help_: str, *, required: bool = False):
    return click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=default,
                        required=required, show_default=default is not None, help=help_)


def quants(default: tuple[str, ...] | None, what: str = "Output type"):
    shown = " ".join(default) if default else None
    return click.option("-q", "--quant", "--quants", "quants", multiple=True, default=default or (),
                        show_default=shown,
                        help=f"{what}: repeat (-q q4_0 -q q8_0) or give a list (--quants \"q4_0 q8_0\"); "
                             "f32 f16 bf16 q8_0 q4_0 q4_K_M q5_K_M q6_K ...")


def template(*, allow_none: bool = False):
    choices = TEMPLATE_CHOICES + (("none",) if allow_none else ())
    extra = "; none: embed no chat template" if allow_none else ""
    return click.option("--template", type=click.Choice(choices), default="auto", show_default=True,
                        callback=lambda _ctx, _param, value: None if value == "auto" else value,
                        help=f"komt prompt format: auto is the model's own (its zoo entry's, else its "
                             f"architecture's, or the one a GGUF file stores){extra}.")


def _json_target(ctx, _param, value: Path | None) -> Path | None:
    """Before any work, the --json FILE follows the output rule (``atomic.check_output_file``): no device or link,
    no folder; once every option is known (:func:`json_out`), never an input, and an existing file only when it
    is a report komt-edge wrote or with the command's --force. The command's library checks it against its own
    inputs and outputs."""
    from ..atomic import check_output_file, file_state
    from .common import JSON_STATE

    if value is None or value == Path("-"):
        return value
    checked = check_output_file(value, option="--json")  # what it is; whose it is once the inputs are known
    ctx.meta[JSON_STATE] = file_state(checked)  # emit_json refuses the path if the run itself wrote it since
    return checked


# The parameters that name what a command reads (files, folders): --json never overwrites one, or a file in one.
INPUT_PARAMS = ("model", "base", "adapter", "files", "hf", "lora", "reference", "text", "data", "folder",
                "imatrix", "calibration", "judge_gguf", "deepspeed")


def json_out(what: str = "the result"):
    option = click.option("--json", "json_out", type=click.Path(path_type=Path, allow_dash=True), default=None,
                          is_flag=False, flag_value="-", metavar="[FILE]", callback=_json_target,
                          help=f"Write {what} as JSON to FILE, or to standard output when no FILE is given.")

    def decorate(command):
        @functools.wraps(command)
        def checked(*args, **params):
            # Once every option is parsed (the option's callback sees only those before it) and before any work:
            # the report is not one of the inputs (--json MODEL/config.json), whatever the command.
            target = params.get("json_out")
            if target is not None and target != Path("-"):
                from ..atomic import JSON_REPORT, check_not_an_input, check_output_file, holds_json

                given = [params.get(name) for name in INPUT_PARAMS]
                check_not_an_input(target, [p for v in given for p in (v if isinstance(v, tuple) else (v,))],
                                   option="--json")
                ctx = click.get_current_context()
                check_output_file(target, option="--json", ours=holds_json, ours_kind=JSON_REPORT,
                                  force=bool(params.get("force")),
                                  can_force=any(p.name == "force" for p in ctx.command.params))
            return command(*args, **params)
        return option(checked)
    return decorate


def allow_pickle():
    return click.option("--allow-pickle", is_flag=True,
                        help="Also read pickle *.bin weights, with torch.load(weights_only=True).")


def force(help_: str):
    # eager: known to the other options' checks (--json) whatever the order on the command line
    return click.option("--force", is_flag=True, is_eager=True, help=help_)


def verbose(*, drives_libraries: bool = True):
    """Every command has it: its callback, run whether or not the flag is given (and before the command imports a
    library), is what quiets the libraries, or with the flag lets them speak. `komt-edge --help` and a command's
    --help exit before it, importing none of them. A command that drives none (``drives_libraries=False``:
    `models`) skips the quieting, which imports some of them (0.2 s of its start on a busy machine)."""
    def callback(_ctx, _param, value: bool) -> None:
        if value or drives_libraries:
            configure_output(verbose=value)

    return click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=callback,
                        help="Also show the logs, banners and warnings of the libraries komt-edge uses.")


def adapter():
    return click.option("--adapter", default=None,
                        help="LoRA adapter (folder or Hub id) to merge first (zoo names imply theirs).")


def name(what: str = "Model name for general.name and file names."):
    return click.option("--name", default=None, help=what)
