"""llama.cpp's log, routed once for the whole process: its errors, and everything with ``--verbose``.

llama.cpp logs hundreds of lines per model load (tensor lists, buffer sizes, the SWA-cache notice) through one
process-wide callback. :func:`route_llama_log` installs komt-edge's callback: error lines go to stderr; the rest
only when :func:`komt_edge.output.configure_output` was told ``verbose``. While a model loads, :func:`load_errors`
collects the error lines instead, so komt-edge's one-line message can name llama.cpp's real reason for refusing a
file (``check_tensor_dims: tensor 'blk.0.ffn_up.weight' has wrong shape; ...``); the routing stays in place after.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Iterator

from ..errors import c_callback
from ..output import is_verbose

# ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (llama-cpp-python's own map predates CONT)
_GGML_LOG_LEVEL_ERROR = 4
_GGML_LOG_LEVEL_CONT = 5

_last_level = [0]
_collectors: list[list[str]] = []
_installed = []  # the ctypes thunk, kept alive while llama.cpp may call it


@c_callback  # a signal arriving in here is raised after llama.cpp returns (komt_edge.errors)
def _handle(level: int, text: bytes, _user_data) -> None:
    if level != _GGML_LOG_LEVEL_CONT:
        _last_level[0] = level
    line = text.decode("utf-8", errors="replace")
    error = _last_level[0] == _GGML_LOG_LEVEL_ERROR
    if error and _collectors:
        _collectors[-1].append(line)
    elif error or is_verbose():
        print(line, end="", file=sys.stderr, flush=True)


def route_llama_log() -> None:
    """Install komt-edge's llama.cpp log callback (once; llama-cpp-python installs its own on import)."""
    if _installed:
        return
    import llama_cpp

    callback = llama_cpp.llama_log_callback(_handle)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _installed.append(callback)


@contextlib.contextmanager
def load_errors() -> Iterator[list[str]]:
    """Collect llama.cpp's error lines while the block runs (they are not printed: the caller reports them)."""
    route_llama_log()
    lines: list[str] = []
    _collectors.append(lines)
    try:
        yield lines
    finally:
        _collectors.remove(lines)


def reason(lines: list[str]) -> str | None:
    """The most telling line of what ``load_errors`` collected: llama.cpp's "error loading model: ..." if any."""
    text = "".join(lines)
    for line in text.splitlines():
        if "error loading model:" in line:
            return " ".join(line.split("error loading model:", 1)[1].split())
    first = next((line.strip() for line in text.splitlines() if line.strip()), None)
    return " ".join(first.split()) if first else None
