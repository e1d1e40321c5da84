"""The one error type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path


class KomtError(Exception):
    """A user-facing failure: the message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def read_user_text(path: Path, *, missing: str, encoding: str = "utf-8") -> str:
    """A user's text file, or a KomtError: ``missing`` when it is not a file, the byte offset when it is not
    UTF-8, the OS's reason when it cannot be read."""
    if not path.is_file():
        raise KomtError(missing)
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise KomtError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except OSError as err:
        raise KomtError(f"cannot read {path}: {err.strerror or err}") from None


def package_dir(module: str, *, missing: str) -> Path:
    """The folder of an installed package whose data files komt-edge reads, or KomtError(``missing``)."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise KomtError(missing)
    return Path(list(spec.submodule_search_locations)[0])


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: raised in the main thread so that every ``with`` block cleans up as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def handle_termination_signals() -> None:
    """Treat SIGTERM (timeout, systemd, Docker, CI) and SIGHUP (a closed terminal) like Ctrl-C: partial outputs are
    removed by the same cleanup, and the process exits with 128 + the signal number."""
    import signal

    def raise_interrupted(signum, _frame):
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupted)
