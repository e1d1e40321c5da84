"""llama.cpp's own words when it refuses a file.

llama-cpp-python sends llama.cpp's log to stderr only when verbose, so a failed load says just "Failed to load
model". ``load_errors`` collects the error lines llama.cpp logs meanwhile, so komt-edge's one-line message can
name the real cause (``check_tensor_dims: tensor 'blk.0.ffn_up.weight' has wrong shape; ...``).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator

_GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_GGML_LOG_LEVEL_CONT = 5


@contextlib.contextmanager
def load_errors() -> Iterator[list[str]]:
    """Collect llama.cpp's error lines while the block runs; llama-cpp-python's own logger is restored after."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []
    last = [0]

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, _user_data) -> None:
        level = last[0] if level == _GGML_LOG_LEVEL_CONT else level
        last[0] = level
        if level == _GGML_LOG_LEVEL_ERROR:
            lines.append(text.decode("utf-8", errors="replace"))
        _logger.llama_log_callback(level, text, _user_data)  # llama-cpp-python's own handling (verbose or not)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def reason(lines: list[str]) -> str | None:
    """The most telling line of what ``load_errors`` collected: llama.cpp's "error loading model: ..." if any."""
    text = "".join(lines)
    for line in text.splitlines():
        if "error loading model:" in line:
            return " ".join(line.split("error loading model:", 1)[1].split())
    first = next((line.strip() for line in text.splitlines() if line.strip()), None)
    return " ".join(first.split()) if first else None
