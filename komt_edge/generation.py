"""Generation that streams in linear time: the token loop behind `komt-edge chat` and `komt-edge serve`.

The pinned llama-cpp-python streams a completion by detokenizing and re-decoding the whole reply again for every
new token, so a streamed reply of n tokens costs O(n²) in Python string work: 1,000 streamed tokens took 140 s on
the demo's model against 0.94 s unstreamed. Here each token's bytes are appended once, the stop strings are
searched only in the bytes that the new token can complete, and the text is decoded incrementally, so a token costs
the same at the end of a long Korean answer as at its start.

The text is the one llama-cpp-python's *unstreamed* ``create_completion`` returns for the same prompt and fields,
byte for byte (tests compare them): tokens come from the same llama.cpp sampler chain with the same seed, over the
same cache (the prompt prefix the cache holds is reused as ``Llama.generate`` reuses it);
generation ends at an end-of-generation token, at the first stop string (the text is cut before it; with several
found at once, the first in the list wins), or at ``max_tokens`` (bounded by the context); a token that leaves a
UTF-8 character incomplete defers the stop-string and length checks by as many tokens as the character still
needs bytes, as llama-cpp-python does. A streamed piece holds back only the bytes that may still become part of a
stop string or of an incomplete character, so no piece carries half a Hangul syllable or the start of ``</s>``.

The loop itself is llama.cpp's decode and sampler chain, with no Python over the vocabulary: on the demo's tiny
model, where a token costs under a millisecond, llama-cpp-python's own loop with a ``logit_bias`` spends a quarter
of the time in Python (benchmarks/stream_bench.py measures the stream against llama-bench).

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


def end_of_generation_ids(llm) -> list[int]:
    """The token ids that end a generation on ``llm`` (EOS, end-of-turn tokens...): what a benchmark suppresses
    with ``logit_bias`` to get replies of an exact length."""
    from llama_cpp import llama_model_get_vocab, llama_vocab_is_eog

    vocab = llama_model_get_vocab(llm.model)
    return [i for i in range(llm.n_vocab()) if llama_vocab_is_eog(vocab, i)]


def sampler_chain(llm, *, temp: float, top_k: int, top_p: float, min_p: float, typical_p: float,
                  repeat_penalty: float, frequency_penalty: float, presence_penalty: float, seed: int,
                  logit_bias: dict[int, float] | None = None):
    """The llama.cpp sampler chain create_completion samples with (llama-cpp-python's ``Llama._init_sampler``,
    built here from llama.cpp's public sampler API), except that ``logit_bias`` is llama.cpp's own logit-bias
    sampler, which touches only the biased tokens, where llama-cpp-python runs a Python logits processor over the
    whole vocabulary for every token (the same float addition, so the same tokens). Free it with
    ``llama_sampler_free``."""
    import llama_cpp as L

    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    n_vocab = llm.n_vocab()

    def add(sampler) -> None:
        L.llama_sampler_chain_add(chain, sampler)

    if logit_bias:
        biases = (L.llama_logit_bias * len(logit_bias))(*(L.llama_logit_bias(t, b) for t, b in logit_bias.items()))
        add(L.llama_sampler_init_logit_bias(n_vocab, len(logit_bias), biases))
    add(L.llama_sampler_init_penalties(n_vocab, llm.last_n_tokens_size, repeat_penalty, frequency_penalty,
                                       presence_penalty))
    if temp < 0.0:
        add(L.llama_sampler_init_dist(seed))
    elif temp == 0.0:
        add(L.llama_sampler_init_greedy())
    else:
        add(L.llama_sampler_init_top_k(top_k))
        add(L.llama_sampler_init_typical(typical_p, 1))
        add(L.llama_sampler_init_top_p(top_p, 1))
        add(L.llama_sampler_init_min_p(min_p, 1))
        add(L.llama_sampler_init_temp(temp))
        add(L.llama_sampler_init_dist(seed))
    return chain


def evaluate_prompt(llm, prompt: list[int]) -> int:
    """Evaluate ``prompt`` on ``llm``, reusing the longest prefix its KV cache already holds, as ``Llama.generate``
    does (the last prompt token is always evaluated, so the logits are fresh); returns the number of tokens reused.

    On a model with sliding-window attention layers (Gemma 3) whose cache keeps only the window (``swa_full``
    off, as :func:`komt_edge.runtime.load` opens models), a prefix is reused only while the cache still holds the
    window before it — llama-server's rule; otherwise the prompt is evaluated whole (llama-cpp-python, which
    assumes a full-size cache, would reuse it and attend to keys that are gone)."""
    import llama_cpp as L

    reuse = 0
    if llm.n_tokens > 0:
        for cached, token in zip(llm.input_ids[:llm.n_tokens].tolist(), prompt[:-1]):
            if cached != token:
                break
            reuse += 1
    if reuse > 0:
        memory = L.llama_get_memory(llm.ctx)
        n_swa = L.llama_model_n_swa(llm.model)
        if n_swa > 0 and L.llama_memory_seq_pos_min(memory, 0) > max(0, reuse - n_swa):
            reuse = 0
        elif not L.llama_memory_seq_rm(memory, -1, reuse, -1):  # a recurrent model cannot drop a suffix
            reuse = 0
    if reuse == 0:
        llm.reset()
    else:
        llm.n_tokens = reuse
    llm.eval(prompt[reuse:])
    return reuse


def generate(llm, prompt: list[int], *, stop: list[str] | tuple = (), max_tokens: int | None = None,
             seed: int | None = None, logit_bias: dict[int, float] | None = None, stop_token_ids: list[int] | tuple = (),
             cancelled: Callable[[], bool] = lambda: False, **sampling) -> Generation:
    """Generate after the token ids ``prompt`` on ``llm`` (a llama_cpp.Llama), as its unstreamed
    ``create_completion(prompt, stop=…, max_tokens=…, seed=…, logit_bias=…, **sampling)`` would (see the module
    docstring). ``stop_token_ids`` are a chat formatter's: generation ends when the last evaluated token is one.
    ``sampling`` takes the fields of :data:`SAMPLING_FIELDS`, with create_completion's defaults.

    The loop is llama.cpp's: ``llama_decode`` one token (through ``Llama.eval``, which keeps llama-cpp-python's
    record of the cache), ``llama_sampler_sample`` on the context's logits; Python adds only the text assembly."""
    import llama_cpp as L

    if not prompt:
        raise ValueError("the prompt has no tokens")
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
    # create_completion's seeding: the given seed, else one drawn from the model's current seed, which advances
    # with every reply (llama-cpp-python keeps it in ``_seed`` and has no getter for it).
    llm.set_seed(seed if seed is not None else random.Random(llm._seed).randint(0, 2**32))
    seed = llm._seed
    vocab = L.llama_model_get_vocab(llm.model)
    stop_ids = set(stop_token_ids)
    last_evaluated = prompt[-1]
    generation = Generation(iter(()), len(prompt))

    def halt() -> bool:
        return last_evaluated in stop_ids or cancelled()

    def pieces() -> Iterator[str]:
        nonlocal last_evaluated
        text = TextAssembler(list(stop))
        shown: list[str] = []
        finish, count, stopped = "length", 0, False
        chain = None
        try:
            evaluate_prompt(llm, prompt)
            chain = sampler_chain(llm, seed=seed, logit_bias=logit_bias, **options)
            while True:
                token = L.llama_sampler_sample(chain, llm.ctx, -1)
                if halt():  # checked after sampling, as Llama.generate's stopping criteria are
                    break
                if L.llama_vocab_is_eog(vocab, token):
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
                llm.eval([token])
                last_evaluated = token
            if not stopped:
                if halt():  # a stop token id was evaluated, or cancelled: the text so far
                    finish = "stop"
                rest = text.finish()
                if rest:
                    shown.append(rest)
                    yield rest
        finally:
            if chain is not None:
                L.llama_sampler_free(chain)
            generation.finish_reason = finish
            generation.text = "".join(shown)

    generation.pieces = pieces()
    return generation
