"""The one error type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class KomtError(Exception):
    """A user-facing failure: the message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


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
