"""The one error type the CLI turns into a one-line message and a non-zero exit, and how signals become errors."""

from __future__ import annotations

import signal
from typing import Callable

# Python functions that C calls through ctypes (llama.cpp's log and eval callbacks), by code object.
_C_CALLBACKS: set = set()
_pending: list[int] = []  # a signal that arrived inside such a callback, not raised yet
RECHECK_S = 0.02  # how often a deferred signal looks again for Python code outside a callback


class KomtError(Exception):
    """A user-facing failure: the message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP: raised in the main thread so that every ``with`` block cleans up as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def c_callback(func: Callable) -> Callable:
    """Mark ``func`` as called from C (a ctypes callback llama.cpp calls during its own functions).

    An exception raised inside a ctypes callback is printed and swallowed by ctypes, and the C function goes on.
    So a signal that arrives while such a callback (or anything it calls) runs is only recorded; it is raised as
    :class:`Interrupted` as soon as Python code outside every callback runs again: at :func:`raise_pending`, which
    komt-edge calls after each llama.cpp call that can call back, or at the latest ``RECHECK_S`` later. Callbacks
    that can end llama.cpp's work early check :func:`interrupt_pending`."""
    _C_CALLBACKS.add(func.__code__)
    return func


def interrupt_pending() -> bool:
    """Whether a signal arrived inside a C callback and waits to be raised (callbacks: stop the work)."""
    return bool(_pending)


def raise_pending() -> None:
    """Raise the interruption a C callback recorded; call it after the llama.cpp call returns."""
    if _pending:
        signum = _pending[0]
        _pending.clear()
        _stop_recheck()
        raise Interrupted(signum)


def _in_c_callback(frame) -> bool:
    while frame is not None:
        if frame.f_code in _C_CALLBACKS:
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame) -> None:
    if _in_c_callback(frame):
        if not _pending:
            _pending.append(signum)
        _recheck_later()
        return
    _pending.clear()
    _stop_recheck()
    raise Interrupted(signum)


def _on_recheck(_signum: int, frame) -> None:
    """SIGALRM, armed only while a signal is deferred: raise it unless still inside a C callback."""
    if _pending:
        _on_signal(_pending[0], frame)


def _recheck_later() -> None:
    if hasattr(signal, "setitimer"):
        if signal.getsignal(signal.SIGALRM) is not _on_recheck:
            signal.signal(signal.SIGALRM, _on_recheck)
        signal.setitimer(signal.ITIMER_REAL, RECHECK_S)


def _stop_recheck() -> None:
    if hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) is _on_recheck:
        signal.setitimer(signal.ITIMER_REAL, 0)


def handle_termination_signals() -> None:
    """Treat SIGTERM (timeout, systemd, Docker, CI) and SIGHUP (a closed terminal) like Ctrl-C: partial outputs are
    removed by the same cleanup, and the process exits with 128 + the signal number. SIGINT is raised the same way
    (as :class:`Interrupted`, a KeyboardInterrupt), so that it too survives arriving inside a C callback."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)
