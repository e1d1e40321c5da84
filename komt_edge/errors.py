"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class KomtError(Exception):
    """A user-facing failure: the message names the problem and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
