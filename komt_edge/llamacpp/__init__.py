"""llama.cpp access, in one place for every stage (bench, the imatrix, verify, chat/serve, the judge):

- :mod:`.log`: llama.cpp's log, routed once for the process (errors to stderr, the rest behind ``--verbose``) and
  collected while a model loads, so a refusal names llama.cpp's own reason;
- :mod:`.context`: :func:`library` (llama-cpp-python's bindings, initialised once), :class:`LlamaModel` and
  :class:`LlamaRunner` (a context that decodes batches and reads logits, as llama-bench and llama-perplexity do);
- :func:`open_llama`: llama-cpp-python's high-level ``Llama`` (chat, completions, logits), loaded quietly, a file it
  cannot load being one line that names the reason.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import KomtError
from .context import LlamaModel, LlamaRunner, gpu_offload_supported, library
from .log import load_errors, reason, route_llama_log

__all__ = ["LlamaModel", "LlamaRunner", "gpu_offload_supported", "library", "load_errors", "open_llama", "reason",
           "route_llama_log"]


def open_llama(path: str | Path, *, what: str | None = None, fix: str | None = None, **params):
    """``llama_cpp.Llama(model_path=path, verbose=False, **params)``, llama.cpp's log routed (behind ``--verbose``).
    A file llama.cpp refuses is a KomtError: "llama.cpp could not load WHAT: <llama.cpp's reason>[; FIX]"."""
    from llama_cpp import Llama

    route_llama_log()
    with load_errors() as lines:
        try:
            return Llama(model_path=str(path), verbose=False, **params)
        except (ValueError, RuntimeError) as err:
            message = f"llama.cpp could not load {what or path}: {reason(lines) or err}"
            raise KomtError(message + (f"; {fix}" if fix else "")) from None
