"""`komt-edge chat MODEL`: a Korean chat in the terminal, on llama-cpp-python.

Each turn is generated as ``Llama.create_chat_completion`` would generate it (the history formatted by the chat
template stored in the file, or ``--template``'s, stopped at the template's stop strings and EOS), but streamed
through :mod:`komt_edge.generation`, whose cost per token does not grow with the reply, and printed piece by
piece. A piece never holds half a character (byte-fallback tokens of rare Hangul and emoji) or the start of a stop
string; the tests check that the pieces add up to llama-cpp-python's non-streamed reply.

Interactive (a terminal): ``/reset`` clears the conversation, ``/exit`` or Ctrl-D quits, Ctrl-C stops the reply
being written and keeps the session. Not a terminal (a pipe, a file): each input line is one user turn (blank
lines are skipped; the input must be UTF-8) and only the replies are printed, one after the other, each followed
by a newline.

When the conversation no longer fits the context (``--ctx``), the oldest turns are dropped (the system prompt
stays), with one notice.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

from .errors import KomtError
from .runtime import LoadedModel, load, resolve_gguf

# A reply keeps at least this much of the context free, when --max-tokens does not say.
MIN_REPLY_TOKENS = 256


@dataclass
class Sampling:
    """Sampling options; None leaves llama-cpp-python's create_chat_completion default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None
    seed: int | None = None

    def kwargs(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ChatSession:
    """A multi-turn conversation with a loaded model."""

    model: LoadedModel
    system: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    log: Callable[[str], None] = print
    history: list[dict] = field(default_factory=list)
    dropped_notice: bool = False

    def reset(self) -> None:
        self.history.clear()

    def messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def _fit(self, turns: list[dict]) -> list[dict]:
        """Drop the oldest turns until the formatted chat leaves room for a reply in the context."""
        n_ctx = self.model.n_ctx
        room = self.sampling.max_tokens or min(MIN_REPLY_TOKENS, n_ctx // 4)
        while self.model.prompt_tokens(self.messages(turns)) + room > n_ctx:
            if len(turns) <= 1:
                raise KomtError(f"this message does not fit the context ({n_ctx} tokens with room for the reply): "
                                "shorten it, or raise --ctx")
            turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
            if not self.dropped_notice:
                self.dropped_notice = True
                self.log(f"(the conversation is longer than the context of {n_ctx} tokens: the oldest turns are "
                         "dropped from now on)")
        return turns

    def reply(self, text: str, *, stop_requested: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Stream the answer to ``text``; the turn (with what was written, if stopped) joins the history."""
        turns = self._fit(self.history + [{"role": "user", "content": text}])
        generation = self.model.chat(self.messages(turns), stop=self.model.stop, cancelled=stop_requested,
                                     **self.sampling.kwargs())
        try:
            yield from generation
        finally:
            generation.close()
            self.history[:] = turns + [{"role": "assistant", "content": generation.text}]


@contextlib.contextmanager
def ctrl_c_stops(flag: threading.Event) -> Iterator[None]:
    """While the block runs, Ctrl-C sets ``flag`` instead of raising KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def run_session(session: ChatSession, stdin: TextIO, stdout: TextIO, *, interactive: bool) -> int:
    """The read-reply loop; returns the number of replies written."""
    replies = 0
    while True:
        if interactive:
            try:
                line = input("\n> ")
            except EOFError:
                stdout.write("\n")
                return replies
            except KeyboardInterrupt as err:
                if getattr(err, "signum", signal.SIGINT) != signal.SIGINT:
                    raise  # SIGTERM/SIGHUP end the session
                stdout.write(f"\n({HELP})\n")
                continue
        else:
            try:
                line = stdin.readline()
            except UnicodeDecodeError as err:
                raise KomtError(f"standard input is not UTF-8 text ({err.reason} at byte {err.start} of a line): "
                                "give the turns as UTF-8 lines") from None
            if not line:
                return replies
        text = line.rstrip("\n")
        command = text.strip()
        if not command:  # a blank line is no turn
            continue
        if interactive and command in ("/exit", "/quit"):
            return replies
        if interactive and command == "/reset":
            session.reset()
            stdout.write("(conversation cleared)\n")
            continue
        stop = threading.Event()
        try:
            with ctrl_c_stops(stop):
                for piece in session.reply(text, stop_requested=stop.is_set):
                    stdout.write(piece)
                    stdout.flush()
        except KomtError as err:
            if not interactive:
                raise
            stdout.write(f"error: {err}\n")
            continue
        stdout.write(" [stopped]\n" if stop.is_set() else "\n")
        stdout.flush()
        replies += 1


def chat(model: str, *, quant: str | None = None, org: str | None = None, revision: str | None = None,
         template: str | None = None, system: str | None = None, temperature: float | None = None,
         top_p: float | None = None, top_k: int | None = None, repeat_penalty: float | None = None,
         max_tokens: int | None = None, seed: int | None = None, n_ctx: int | None = None,
         n_threads: int | None = None, lora: str | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None, log: Callable[[str], None] | None = None) -> int:
    """Chat with MODEL in the terminal (see the module docstring); returns the number of replies."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    path = resolve_gguf(model, quant=quant, org=org, revision=revision, log=log)
    loaded = load(path, template=template, n_ctx=n_ctx, n_threads=n_threads, lora=lora, seed=seed)
    try:
        if interactive:
            what = f"komt-{loaded.family} template" if loaded.family else "the file's chat template"
            stdout.write(f"komt-edge chat: {path.name} ({what}, context {loaded.n_ctx})\n{HELP}\n")
        sampling = Sampling(temperature, top_p, top_k, repeat_penalty, max_tokens, seed)
        session = ChatSession(loaded, system=system, sampling=sampling, log=log)
        return run_session(session, stdin, stdout, interactive=interactive)
    finally:
        loaded.close()
