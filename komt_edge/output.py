"""What a komt-edge command prints: its own progress and results; the libraries' noise only with ``--verbose``.

Quiet by default means: the import-time chatter and INFO logs of the libraries komt-edge drives (transformers,
gguf-py's writer, torchao's optional-kernel probes, GPTQModel's banner, huggingface_hub's advice) go to the log
at WARNING and above, and deprecation warnings raised inside those libraries (about their own internals, not the
user's model) are hidden. Warnings about the user's model that the libraries log at WARNING or ERROR still show.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from importlib.util import find_spec

# Loggers whose INFO output is library chatter, and the level they get by default.
NOISY_LOGGERS = {
    "gguf": logging.WARNING,  # INFO:gguf.gguf_writer:... per file written
    "transformers": logging.ERROR,  # deprecation advice, generation-config notes
    "torchao": logging.ERROR,  # "Failed to load ... .so" probes of optional kernels
    "torch.utils._pytree": logging.ERROR,  # torchao's enum registrations, on import
    "tokenicer": logging.ERROR,
    "DeepSpeed": logging.ERROR,
    "gptqmodel": logging.WARNING,
    "accelerate": logging.WARNING,
    "huggingface_hub": logging.WARNING,
    "urllib3": logging.WARNING,
    "httpx": logging.WARNING,
}

# Modules whose own deprecation warnings are not the user's business.
LIBRARY_MODULES = r"(transformers|torch|torchao|peft|accelerate|gptqmodel|optimum|huggingface_hub|gguf)(\.|$)"

_verbose = False


def configure_output(*, verbose: bool = False) -> None:
    """Set the libraries' verbosity for this process (called once, before a command imports them)."""
    global _verbose
    _verbose = verbose
    if verbose:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
        if find_spec("logbar") is not None:
            from logbar import LogBar

            LogBar.shared().setLevel(logging.INFO)
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN_WARNING", "1")
    os.environ.setdefault("GPTQMODEL_LOG_LEVEL", "WARNING")
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)
    _quiet_progress_bars()
    _quiet_logbar()


def _quiet_progress_bars() -> None:
    """transformers' own bars ("Loading weights", "Writing model shards") follow huggingface_hub's global switch,
    read when transformers is imported: turn it off, and keep the download bars (huggingface_hub's named group)."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    disable_progress_bars()
    enable_progress_bars("huggingface_hub")


def _quiet_logbar() -> None:
    """GPTQModel logs through LogBar (its banner, its environment notes, the GIL advice), imported by peft and
    transformers whenever GPTQModel is installed."""
    if find_spec("logbar") is None:
        return
    with contextlib.redirect_stdout(io.StringIO()):  # its import writes a blank line to stdout
        from logbar import LogBar

        LogBar.shared().setLevel(logging.ERROR)


def is_verbose() -> bool:
    return _verbose
