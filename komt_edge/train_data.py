"""Training data for `komt-edge train`: Korean instruction records → token ids with the prompt masked.

Records are read by :func:`komt_edge.records.read_records`, the reader calibration uses too: JSON objects
``{"instruction": str, "output": str}`` with an optional ``"input": str`` (or their synonyms, or chats), in a
JSON file (a list of records) or a JSON Lines file (one record per line). Other keys are ignored. A record needs
a non-empty instruction and output.

**Prompt.** ``instruction`` alone, or, when ``input`` is present and not empty,
``instruction + "\\n\\n" + input`` (:func:`komt_edge.records.prompt_of`). The prompt is wrapped in the model
family's komt template (``komt_edge.templates``, the same one the zoo and the GGUF chat template use), and the
answer follows it directly: ``template.format(prompt) + output`` (:func:`komt_edge.records.render`), then the eos
token.

**Tokens.** The prompt is tokenized exactly as llama.cpp and ``komt-edge verify`` tokenize a prompt at inference
time (bos + the tokenizer's ids for ``template.format(prompt)``). The mask covers exactly those tokens: labels
are -100 there and equal the input ids after. SentencePiece can merge characters across the prompt/answer
boundary (the Llama template ends in a space, ``"### Response: "``, that joins the answer's first word), so the
whole text is tokenized once and the prompt's ids must be a prefix of it; when they are not, the answer is
tokenized on its own as a continuation (SentencePiece without its dummy-prefix space) and appended to the
prompt's ids, so that training sees the same prompt tokens as inference. Those records are counted as
``boundary_merges``.

**A model's own chat template.** A checkpoint outside komt's families (byte-level BPE Llama 3, Qwen2/2.5) trains
on its own chat template instead (:class:`ChatFormat`): the prompt is the template rendered for the user message
with the generation prompt, exactly as inference renders it (llama-cpp-python's ``Jinja2ChatFormatter``, the
formatter of ``komt-edge chat``/``serve``, with the tokenizer's bos and eos texts) and tokenized as
llama-cpp-python tokenizes it (special tokens parsed; the model's BOS added by the tokenizer's post-processor unless
the rendered text begins with it). The answer is what the template writes for an assistant turn after that prompt,
up to and including its end-of-turn token (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``: the first special
token the template writes after the message), or the eos token for a template that writes none.

**Length.** Sequences longer than ``max_length`` tokens are cut at ``max_length`` (the end of the answer and its
eos are lost) and counted as ``truncated``; records whose prompt alone fills ``max_length`` have no answer
token left, and are skipped and counted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

from .errors import KomtError
from .records import Record, prompt_of, read_records, render
from .templates import PromptTemplate
from .util import sha256_file

IGNORE_INDEX = -100


# -- reading ----------------------------------------------------------------------------------------------

def load_records(path: str | Path) -> list[Record]:
    """The instruction records of a training data file (JSON list or JSON Lines), read by
    :func:`komt_edge.records.read_records`; errors name the line (JSONL) or the record."""
    return read_records(path, missing=f"data file {Path(path).expanduser()} does not exist")


# -- tokenizing -------------------------------------------------------------------------------------------

class TrainTokenizer:
    """Prompt ids exactly as inference sees them (komt_edge.verify.ReferenceTokenizer: SentencePiece for
    tokenizer.model, `tokenizers` for tokenizer.json, bos per tokenizer_config), plus eos and a continuation
    encoder for the answer."""

    def __init__(self, folder: str | Path):
        from .verify import ReferenceTokenizer

        folder = Path(folder)
        self.ref = ReferenceTokenizer(folder)
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        if (folder / "tokenizer.model").is_file():
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString((folder / "tokenizer.model").read_bytes())
            self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            self._tk = None
            self.eos_id = self._sp.eos_id()
        else:
            from tokenizers import Tokenizer

            self._sp = self._sp_cont = None
            self._tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
            eos = cfg.get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            eos_id = self._tk.token_to_id(eos) if eos else None
            if eos_id is None:
                model_cfg = folder / "config.json"
                eos_id = json.loads(model_cfg.read_text()).get("eos_token_id") if model_cfg.is_file() else None
                eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
            if eos_id is None:
                raise KomtError(f"{folder}: the tokenizer has no eos token; set eos_token in tokenizer_config.json")
            self.eos_id = int(eos_id)
        self.pad_id = self.eos_id  # padded positions are masked by attention_mask and labels alike

    def encode(self, text: str) -> list[int]:
        """bos (when the model adds one) + ids, as llama.cpp tokenizes a prompt."""
        return self.ref.encode(text)

    def encode_rendered(self, text: str, bos_token: str | None) -> list[int]:
        """A rendered chat prompt as llama-cpp-python tokenizes it for create_chat_completion: special tokens in
        the text parsed, and the model's own additions (BOS for Llama 3: what tokenizer.json's post-processor adds,
        which llama.cpp's converter writes as add_bos_token) unless the text begins with the BOS text."""
        if self._tk is None:
            raise KomtError("a model's own chat template is used with byte-level BPE tokenizers (tokenizer.json) "
                            "only")
        begins_with_bos = bool(bos_token) and text.startswith(bos_token)
        return list(self._tk.encode(text, add_special_tokens=not begins_with_bos).ids)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's special (control) tokens, eos among them."""
        if self._tk is None:
            return frozenset({self.eos_id})
        return frozenset({i for i, t in self._tk.get_added_tokens_decoder().items() if t.special} | {self.eos_id})

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of text that follows other text directly (no leading dummy space)."""
        if self._sp_cont is not None:
            return list(self._sp_cont.encode(text))
        return list(self._tk.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids that start a text (SentencePiece drops its dummy-prefix space)."""
        if self._sp is not None:
            return self._sp.decode(list(ids))
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def decode_continuation(self, ids: Sequence[int]) -> str:
        """Text of ids that continue a text (an answer after its prompt)."""
        if self._sp_cont is not None:
            return self._sp_cont.decode(list(ids))
        return self._tk.decode(list(ids), skip_special_tokens=False)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool = False
    boundary_merge: bool = False
    full_len: int = 0  # length before truncation


class ChatFormat:
    """A model's own chat template (Qwen2.5's ChatML, Llama 3 Instruct's), rendered for one user turn as inference
    renders it: llama-cpp-python's Jinja2ChatFormatter (what ``komt-edge chat``/``serve`` and
    ``create_chat_completion`` format with), given the tokenizer's bos and eos texts as the GGUF file gives them."""

    name = "own"
    _SENTINEL = "\x00komt-edge-answer\x00"

    def __init__(self, chat_template: str, *, bos_token: str | None, eos_token: str | None, source: str = ""):
        from jinja2 import TemplateError
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.chat_template, self.source = chat_template, source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        try:
            self._prompt = Jinja2ChatFormatter(chat_template, eos_token=self.eos_token, bos_token=self.bos_token)
            self._turn = Jinja2ChatFormatter(chat_template, eos_token=self.eos_token, bos_token=self.bos_token,
                                             add_generation_prompt=False)
        except TemplateError as err:
            raise KomtError(f"the model's chat template ({source or 'its own'}) is not valid Jinja: {err}") from None
        # What the template writes after an assistant message that follows the generation prompt (ChatML:
        # "<|im_end|>\n", Llama 3: "<|eot_id|>"); what it writes before the message (none for either) is part of
        # the answer the model learns, since inference has the model write it.
        _, self.after_answer = self._answer_parts(self._SENTINEL)

    def _render(self, formatter, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return formatter(messages=messages).prompt
        except (TemplateError, ValueError, TypeError) as err:
            raise KomtError(f"the model's chat template ({self.source or 'its own'}) fails on a user turn: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None

    def format(self, prompt: str) -> str:
        """The user turn rendered with the generation prompt: the text inference feeds the model."""
        return self._render(self._prompt, [{"role": "user", "content": prompt}])

    def _answer_parts(self, answer: str, prompt: str = "한국의 수도는 어디인가요?") -> tuple[str, str]:
        """(text before ``answer``, text after it) in the assistant turn the template writes after the prompt."""
        head = self.format(prompt)
        turn = self._render(self._turn, [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": answer}])
        if not turn.startswith(head) or answer not in turn[len(head):]:
            raise KomtError(f"the model's chat template ({self.source or 'its own'}) does not write an assistant "
                            "turn after its generation prompt: it cannot be trained on as a single-turn chat")
        rest = turn[len(head):]
        at = rest.index(answer)
        return rest[:at], rest[at + len(answer):]

    def answer(self, prompt: str, output: str) -> str:
        """The assistant message as the template writes it (Llama 3's trims it), without what follows it."""
        head = self.format(prompt)
        turn = self._render(self._turn, [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": output}])
        body = turn[len(head):]
        if not turn.startswith(head) or not body.endswith(self.after_answer):
            raise KomtError(f"the model's chat template ({self.source or 'its own'}) writes the assistant turn "
                            f"of {output[:40]!r} in a way komt-edge cannot split into answer and end of turn")
        return body[: len(body) - len(self.after_answer)]

    def end_of_turn_ids(self, tok: TrainTokenizer) -> list[int]:
        """The template's end of turn: what it writes after the message up to and including its first special
        token (ChatML's <|im_end|>, Llama 3's <|eot_id|>); the eos token when it writes none."""
        ids = tok.encode_continuation(self.after_answer)
        special = tok.special_ids
        for i, t in enumerate(ids):
            if t in special:
                return ids[: i + 1]
        return [tok.eos_id]

    def end_of_turn(self, tok: TrainTokenizer) -> str:
        return tok.decode_continuation(self.end_of_turn_ids(tok))


def encode_record(tok: TrainTokenizer, template: PromptTemplate | ChatFormat, record: Record,
                  max_length: int) -> Example:
    """input_ids = prompt ids + answer ids + eos (a model's own template: + its end of turn); labels = -100 over
    the prompt ids, the ids after."""
    if isinstance(template, ChatFormat):
        return _encode_chat_record(tok, template, record, max_length)
    prompt = prompt_of(record)
    prompt_ids = tok.encode(render(template, prompt))
    full = tok.encode(render(template, prompt, record.output))
    merged = full[: len(prompt_ids)] != prompt_ids
    if merged:
        full = prompt_ids + tok.encode_continuation(record.output)
    assert full[: len(prompt_ids)] == prompt_ids, "the prompt's tokens must be a prefix of the training sequence"
    ids = full + [tok.eos_id]
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    n_prompt = min(len(prompt_ids), len(ids))
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return Example(ids, labels, n_prompt, truncated, merged, len(full) + 1)


def _encode_chat_record(tok: TrainTokenizer, fmt: ChatFormat, record: Record, max_length: int) -> Example:
    prompt = prompt_of(record)
    prompt_text = fmt.format(prompt)
    answer = fmt.answer(prompt, record.output)
    prompt_ids = tok.encode_rendered(prompt_text, fmt.bos_token)
    full = tok.encode_rendered(prompt_text + answer, fmt.bos_token)
    merged = full[: len(prompt_ids)] != prompt_ids
    if merged:
        full = prompt_ids + tok.encode_continuation(answer)
    ids = full + fmt.end_of_turn_ids(tok)
    truncated = len(ids) > max_length
    full_len = len(ids)
    ids = ids[:max_length]
    n_prompt = min(len(prompt_ids), len(ids))
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return Example(ids, labels, n_prompt, truncated, merged, full_len)


@dataclass
class DataStats:
    path: str
    sha256: str
    records: int
    train: int
    eval: int
    truncated: int
    skipped: int  # prompt alone fills max_length: no answer token left
    boundary_merges: int
    train_tokens: int  # tokens per epoch (non-padding)
    answer_tokens: int  # of which are trained on (labels != -100)
    max_length: int
    longest: int  # longest sequence before truncation
    skipped_where: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = (f"{self.records} records from {Path(self.path).name} (sha256 {self.sha256[:12]}): {self.train} train, "
                f"{self.eval} held out for eval; {self.train_tokens} train tokens per epoch, "
                f"{self.answer_tokens} of them answer tokens")
        if self.truncated:
            text += (f"; {self.truncated} records longer than --max-length {self.max_length} were truncated "
                     f"(longest {self.longest} tokens)")
        if self.skipped:
            text += (f"; {self.skipped} records skipped: their prompt alone fills --max-length "
                     f"({', '.join(self.skipped_where[:5])}{', ...' if self.skipped > 5 else ''})")
        return text


def split_indices(n: int, eval_split: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded shuffle; ``eval_split`` of the records (at least one when > 0 and n ≥ 2) are held out."""
    if not 0 <= eval_split < 1:
        raise KomtError(f"--eval-split {eval_split}: give a fraction in [0, 1), e.g. 0.05")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if eval_split > 0 and n >= 2:
        n_eval = min(n - 1, max(1, round(n * eval_split)))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def prepare(path: str | Path, tok: TrainTokenizer, template: PromptTemplate | ChatFormat, *, max_length: int,
            eval_split: float, seed: int, records: list[Record] | None = None
            ) -> tuple[list[Example], list[Example], DataStats]:
    """Load (unless ``records`` were read from ``path`` already), validate, split and tokenize:
    (train examples, eval examples, stats)."""
    if max_length < 8:
        raise KomtError(f"--max-length {max_length} is too short: give at least 8 tokens (komt uses 2048)")
    path = Path(path)
    records = load_records(path) if records is None else records
    train_idx, eval_idx = split_indices(len(records), eval_split, seed)
    encoded = [encode_record(tok, template, r, max_length) for r in records]
    skipped_where = [r.where for r, e in zip(records, encoded) if e.prompt_len >= len(e.input_ids)]
    keep = [e.prompt_len < len(e.input_ids) for e in encoded]
    train = [encoded[i] for i in train_idx if keep[i]]
    evals = [encoded[i] for i in eval_idx if keep[i]]
    if not train:
        raise KomtError(f"{path}: no training record has an answer token within --max-length {max_length}: "
                        "raise --max-length")
    stats = DataStats(
        path=str(path.resolve()), sha256=sha256_file(path), records=len(records), train=len(train), eval=len(evals),
        truncated=sum(e.truncated for e in encoded), skipped=len(skipped_where),
        boundary_merges=sum(e.boundary_merge for e in encoded),
        train_tokens=sum(len(e.input_ids) for e in train),
        answer_tokens=sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in train),
        max_length=max_length,
        longest=max(e.full_len for e in encoded),
        skipped_where=skipped_where)
    return train, evals, stats


class ExampleDataset:
    """A map-style dataset of Examples for transformers' Trainer."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


class Collator:
    """Right-pads a batch: pad id in input_ids, 0 in attention_mask, -100 in labels."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: Sequence[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
