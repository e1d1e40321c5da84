"""Generation that streams in linear time: the token loop behind `komt-edge chat` and `komt-edge serve`.

The pinned llama-cpp-python streams a completion by detokenizing and re-decoding the whole reply again for every
new token, so a streamed reply of n tokens costs O(n²) in Python string work: 1,000 streamed tokens took 140 s on
the demo's model against 0.94 s unstreamed. Here each token's bytes are appended once, the stop strings are
searched only in the bytes that the new token can complete, and the text is decoded incrementally, so a token costs
the same at the end of a long Korean answer as at its start.

The text is the one llama-cpp-python's *unstreamed* ``create_completion`` returns for the same prompt and fields,
byte for byte (tests compare them): tokens come from ``Llama.generate`` with the same sampler settings and seed;
generation ends at an end-of-generation token, at the first stop string (the text is cut before it; with several
found at once, the first in the list wins), or at ``max_tokens`` (bounded by the context); a token that leaves a
UTF-8 character incomplete defers the stop-string and length checks by as many tokens as the character still
needs bytes, as llama-cpp-python does. A streamed piece holds back only the bytes that may still become part of a
stop string or of an incomplete character, so no piece carries half a Hangul syllable or the start of ``</s>``.

``cancelled`` is asked once per token: a client that leaves (or Ctrl-C in the chat) ends the generation within
one token's time.
"""

from __future__ import annotations

import codecs
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

# llama-cpp-python's defaults, by entry point: create_chat_completion and create_completion.
CHAT_DEFAULTS = dict(temperature=0.2, top_p=0.95, top_k=40, min_p=0.05, typical_p=1.0, repeat_penalty=1.0,
                     frequency_penalty=0.0, presence_penalty=0.0, max_tokens=None)
COMPLETION_DEFAULTS = dict(CHAT_DEFAULTS, temperature=0.8, max_tokens=16)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
                   "presence_penalty")


class TextAssembler:
    """Bytes of generated tokens in, text out, in O(1) per token (the stop strings' lengths bound the work).

    ``push(piece)`` appends one token's bytes and returns ``(text, done)``: the text that can be shown now, and
    whether a stop string has ended the reply. ``finish()`` returns what is left when generation ends otherwise."""

    def __init__(self, stop: list[str]):
        self.stops = [s.encode("utf-8") for s in stop]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.data = bytearray()
        self.shown = 0  # bytes handed to the decoder
        self.checked = 0  # bytes already searched for stop strings
        self.deferred = 0  # tokens whose checks wait for an incomplete UTF-8 character (llama-cpp-python's rule)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.checking = True  # whether the last token's checks (stop strings, length) ran, or wait for a character

    def push(self, piece: bytes) -> tuple[str, bool]:
        data = self.data
        data += piece
        # llama-cpp-python's unstreamed rule: a lead byte among the last three that needs more bytes than follow it
        # defers the checks by that many tokens (counted in tokens, as it counts them).
        tail = data[-3:]
        for k, byte in enumerate(tail):
            k = 3 - k
            for need, pattern in ((2, 0xC0), (3, 0xE0), (4, 0xF0)):
                if need > k and byte & pattern == pattern:
                    self.deferred = need - k
        if self.deferred > 0:
            self.deferred -= 1
            self.checking = False
            return "", False
        self.checking = True
        start = max(0, self.checked - self.longest + 1)
        self.checked = len(data)
        for stop in self.stops:
            if data.find(stop, start) >= 0:
                return self._show(data.index(stop), final=True), True
        return self._show(len(data) - self._held_back(), final=False), False

    def finish(self) -> str:
        """The rest of the text when generation ends without a stop string (EOS, length, cancelled)."""
        return self._show(len(self.data), final=True)

    def _held_back(self) -> int:
        """The longest end of the text that is the start of a stop string (it may still become one)."""
        data, held = self.data, 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(data)), held, -1):
                if data.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _show(self, end: int, *, final: bool) -> str:
        text = self.decoder.decode(bytes(self.data[self.shown:end]), final=final) if end > self.shown or final else ""
        self.shown = max(self.shown, end)
        return text


@dataclass
class Generation:
    """One reply being generated: iterate for its text pieces; afterwards ``text``, ``finish_reason`` and the token
    counts are set. Build it with :func:`generate`."""

    pieces: Iterator[str]
    prompt_tokens: int
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4()}")
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def close(self) -> None:
        self.pieces.close()

    def run(self) -> str:
        """Generate to the end; the whole text."""
        for _ in self:
            pass
        return self.text

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def logit_bias_processor(bias: dict[int, float]):
    """A logits processor that adds ``bias`` to the scores of its token ids (OpenAI's ``logit_bias``)."""
    import numpy as np

    ids = np.array(list(bias), dtype=np.intc)
    values = np.array(list(bias.values()), dtype=np.single)

    def process(_input_ids, scores):
        scores = scores.copy()
        scores[ids] += values
        return scores

    return process


def end_of_generation_ids(llm) -> list[int]:
    """The token ids that end a generation on ``llm`` (EOS, end-of-turn tokens...): what a benchmark suppresses
    with ``logit_bias`` to get replies of an exact length."""
    from llama_cpp import llama_model_get_vocab, llama_vocab_is_eog

    vocab = llama_model_get_vocab(llm.model)
    return [i for i in range(llm.n_vocab()) if llama_vocab_is_eog(vocab, i)]


def generate(llm, prompt: list[int], *, stop: list[str] | tuple = (), max_tokens: int | None = None,
             seed: int | None = None, logit_bias: dict[int, float] | None = None, stop_token_ids: list[int] | tuple = (),
             cancelled: Callable[[], bool] = lambda: False, **sampling) -> Generation:
    """Generate after the token ids ``prompt`` on ``llm`` (a llama_cpp.Llama), as its unstreamed
    ``create_completion(prompt, stop=…, max_tokens=…, seed=…, logit_bias=…, **sampling)`` would (see the module
    docstring). ``stop_token_ids`` are a chat formatter's: generation ends when the last evaluated token is one.
    ``sampling`` takes the fields of :data:`SAMPLING_FIELDS`, with create_completion's defaults."""
    from llama_cpp import LogitsProcessorList, llama_model_get_vocab, llama_vocab_is_eog

    n_ctx = llm.n_ctx()
    if len(prompt) >= n_ctx:
        raise ValueError(f"Requested tokens ({len(prompt)}) exceed context window of {n_ctx}")
    if max_tokens is None or max_tokens <= 0:
        max_tokens = n_ctx - len(prompt)
    max_tokens = min(max_tokens, n_ctx - len(prompt))
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"generate() got unknown sampling fields: {', '.join(sorted(unknown))}")
    options = {k: v for k, v in {**COMPLETION_DEFAULTS, **sampling}.items() if k in SAMPLING_FIELDS}
    options["temp"] = options.pop("temperature")
    processors = LogitsProcessorList([logit_bias_processor(logit_bias)]) if logit_bias else None
    # create_completion's seeding: the given seed, else one drawn from the model's current seed, which advances
    # with every reply (llama-cpp-python keeps it in ``_seed`` and has no getter for it).
    llm.set_seed(seed if seed is not None else random.Random(llm._seed).randint(0, 2**32))
    vocab = llama_model_get_vocab(llm.model)
    stop_ids = set(stop_token_ids)
    last_evaluated = [prompt[-1] if prompt else -1]
    generation = Generation(iter(()), len(prompt))

    def halt(_input_ids, _logits) -> bool:
        return last_evaluated[0] in stop_ids or cancelled()

    def pieces() -> Iterator[str]:
        text = TextAssembler(list(stop))
        shown: list[str] = []
        finish, count, stopped = "length", 0, False
        try:
            for token in llm.generate(prompt, logits_processor=processors, stopping_criteria=halt, **options):
                if llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                count += 1
                generation.completion_tokens = count
                piece, stopped = text.push(llm.detokenize([token]))
                if piece:
                    shown.append(piece)
                    yield piece
                if stopped:
                    finish = "stop"
                    break
                if text.checking and count >= max_tokens:
                    break
                last_evaluated[0] = token  # generate evaluates it before it samples the next one
            if not stopped:
                if halt(None, None):  # a stop token id was evaluated, or cancelled: the text so far
                    finish = "stop"
                rest = text.finish()
                if rest:
                    shown.append(rest)
                    yield rest
        finally:
            generation.finish_reason = finish
            generation.text = "".join(shown)

    generation.pieces = pieces()
    return generation
