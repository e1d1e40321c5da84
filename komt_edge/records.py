"""Instruction records: the one way every stage reads a record of a user's data file and turns it into text.

A record is an instruction, an optional input and the answer (:class:`Record`). In a JSON value it is an object
with an instruction (key ``instruction``, ``prompt``, ``question`` or ``query``), an optional ``input`` and an
answer (``output``, ``response``, ``answer``, ``completion`` or ``chosen``), or a chat (``messages`` /
``conversations``: each user turn answered by an assistant turn is one record; other turns are dropped).

A user's data file is read here and nowhere else (:func:`read_records`), for training (``komt_edge.train_data``:
instruction records only) and for calibration and evaluation text (``komt_edge.corpora``: prose as well):

- ``.jsonl`` / ``.ndjson``: JSON Lines, one value per line (blank lines skipped); errors name the line.
- ``.json``: a JSON list of values, or an object holding one under ``data``, ``train``, ``examples`` or
  ``records``; a file of several JSON values is JSON Lines under another name. Errors name the record (``record
  2``) or, for JSON syntax, the line.
- anything else: one text document (the whole file) where prose is read; JSON (as ``.json``) where it is not.

JSON files are UTF-8, with or without a byte-order mark; a text document is UTF-8 and read as it is. A blank file
is refused, and so is a file without a record.

The prompt is the instruction, then a blank line and the input when there is one (:func:`prompt_of`; a blank
line is what komt's own trainer puts between prompt parts: ``{instruction}\\n\\n### Response:``). A model reads
the prompt in its komt template with the answer right after it (:func:`render`), in training and calibration
alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

from .errors import KomtError
from .util import read_user_text

if TYPE_CHECKING:
    from .templates import PromptTemplate

PROMPT_KEYS = ("instruction", "prompt", "question", "query")
ANSWER_KEYS = ("output", "response", "answer", "completion", "chosen")
CHAT_KEYS = ("messages", "conversations")
USER_ROLES = frozenset({"user", "human", "prompter"})
ASSISTANT_ROLES = frozenset({"assistant", "gpt", "bot", "model"})
INPUT_SEPARATOR = "\n\n"  # between instruction and input, inside the template
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
LIST_KEYS = ("data", "train", "examples", "records")  # {"data": [...]}: the list of records under a key


@dataclass(frozen=True)
class Record:
    """What the user asks (the instruction, and an input if any) and the answer a model should give."""

    instruction: str
    output: str
    input: str = ""
    where: str = ""  # "line 3" or "record 2", for messages


def prompt_of(record: Record) -> str:
    """The user prompt that goes inside the komt template: instruction, then a blank line and input if any."""
    return record.instruction + INPUT_SEPARATOR + record.input if record.input else record.instruction


def render(template: PromptTemplate, prompt: str, answer: str = "") -> str:
    """The text a model reads: ``prompt`` in the komt template and ``answer`` right after it; without an answer,
    the prompt as inference sends it."""
    return template.format(prompt) + answer


# -- parsing one JSON value of a data file -------------------------------------------------------------------

def instruction_records(value: object, path: str | Path, where: str) -> list[Record]:
    """The records of one JSON value: one for an instruction object, one per answered user turn of a chat.

    Anything else is a KomtError that names ``path`` and ``where`` (``"line 3"``, ``"record 2"``)."""
    if not isinstance(value, dict):
        raise KomtError(f"{path} {where}: expected a JSON object with \"instruction\" and \"output\", "
                        f"got {type(value).__name__}")
    chat_key = _chat_key(value)
    if chat_key is not None:
        return _chat_records(value[chat_key], chat_key, path, where)
    prompt_key, answer_key = _first_key(value, PROMPT_KEYS), _first_key(value, ANSWER_KEYS)
    for name, key in (("instruction", prompt_key), ("output", answer_key)):
        if key is None:
            raise KomtError(f"{path} {where}: \"{name}\" is missing (each record needs \"instruction\" and "
                            "\"output\", optionally \"input\")")
    for key in (prompt_key, answer_key, "input"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise KomtError(f"{path} {where}: \"{key}\" must be a string, got {type(value[key]).__name__}")
    return [Record(value[prompt_key], value[answer_key], value.get("input") or "", where)]


def text_records(value: object, path: str | Path, where: str) -> list[Record | str]:
    """Like :func:`instruction_records`, and prose too: a string or an object with ``"text"`` (kept when it is
    not blank). An object with an instruction, an answer or a chat is an instruction record."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if not isinstance(value, dict):
        raise KomtError(f"{path} {where}: expected a string or an object, got {type(value).__name__}")
    has_prompt, has_answer = (_first_key(value, keys) is not None for keys in (PROMPT_KEYS, ANSWER_KEYS))
    if _chat_key(value) is None and not (has_prompt and has_answer):
        if isinstance(value.get("text"), str):
            return [value["text"]] if value["text"].strip() else []
        if not (has_prompt or has_answer):
            raise KomtError(f"{path} {where}: a record needs \"text\", an instruction (\"instruction\"/\"prompt\" "
                            f"with \"output\"/\"response\") or \"messages\"; found keys {sorted(value)[:6]}")
    return instruction_records(value, path, where)


def _first_key(obj: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if obj.get(k) is not None), None)


def _chat_key(obj: dict) -> str | None:
    """``"messages"`` or ``"conversations"`` when the first of them present holds a list of turns."""
    key = next((k for k in CHAT_KEYS if k in obj), None)
    return key if key is not None and isinstance(obj[key], list) else None


def _chat_records(turns: list, key: str, path: str | Path, where: str) -> list[Record]:
    records: list[Record] = []
    pending: str | None = None
    for turn in turns:
        if not isinstance(turn, dict):
            raise KomtError(f"{path} {where}: every message must be an object with role and content")
        role = str(turn.get("role", turn.get("from", ""))).lower()
        content = turn.get("content", turn.get("value"))
        if not isinstance(content, str):
            continue
        if role in USER_ROLES:
            pending = content
        elif role in ASSISTANT_ROLES and pending is not None:
            records.append(Record(pending, content, "", where))
            pending = None
    if not records:
        raise KomtError(f"{path} {where}: no user turn followed by an assistant turn in {key!r}")
    return records


def trainable(records: list[Record], path: str | Path) -> list[Record]:
    """``records``, refused when one has nothing to learn from (a blank instruction or answer)."""
    for record in records:
        if not record.instruction.strip():
            raise KomtError(f"{path} {record.where}: \"instruction\" is empty")
        if not record.output.strip():
            raise KomtError(f"{path} {record.where}: \"output\" is empty: there is nothing to learn from this "
                            "record")
    return records


# -- reading a user's data file --------------------------------------------------------------------------------

@overload
def read_records(path: str | Path, *, prose: Literal[False] = ..., missing: str | None = ...) -> list[Record]: ...
@overload
def read_records(path: str | Path, *, prose: Literal[True], missing: str | None = ...) -> list[Record | str]: ...


def read_records(path: str | Path, *, prose: bool = False, missing: str | None = None) -> list:
    """The records of a user's data file (see the module docstring for the formats), in file order.

    ``prose=False`` (training): instruction records and chats only, each with a non-blank instruction and answer
    (:func:`instruction_records`, :func:`trainable`). ``prose=True`` (calibration, evaluation): prose as well
    (:func:`text_records`), and a file that is not JSON is one text document. ``missing`` is the error for a
    path that is not a file. Every error is one line that names the file and, where there is one, the line or
    record."""
    path = Path(path).expanduser()
    missing = missing or f"{path} is not a file"
    suffix = path.suffix.lower()
    if prose and suffix not in JSON_LINES_SUFFIXES + (".json",):
        text = read_user_text(path, missing=missing)
        if not text.strip():
            raise KomtError(f"{path} is empty")
        return [text]
    text = read_user_text(path, missing=missing, encoding="utf-8-sig")
    if not text.strip():
        raise KomtError(f"{path} is empty: it holds no records")
    parse = text_records if prose else (lambda v, p, w: trainable(instruction_records(v, p, w), p))
    records: list = []
    for value, where in _values(text, path, suffix in JSON_LINES_SUFFIXES, prose):
        records += parse(value, path, where)
    if not records:
        kind = "text records" if prose else 'records: expected {"instruction": ..., "output": ...} objects'
        raise KomtError(f"{path} holds no {kind}")
    return records


def _values(text: str, path: Path, json_lines: bool, prose: bool):
    """(JSON value, where) of each record of a data file's text: ``"line 3"`` in JSON Lines, ``"record 2"`` in a
    JSON list."""
    if not json_lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                raise KomtError(f"{path} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
                                ) from None
            # several top-level values: JSON Lines under another name
        else:
            if isinstance(data, dict):
                data = next((data[k] for k in LIST_KEYS if isinstance(data.get(k), list)), data)
            if not isinstance(data, list):
                raise KomtError(f"{path}: expected a JSON list of records (or JSON Lines, one record per line)")
            yield from ((value, f"record {i}") for i, value in enumerate(data, start=1))
            return
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            # the wording each caller's tests pin: "data.jsonl line 3: not valid JSON (...)" for training data,
            # "text.jsonl:3 is not valid JSON (...)" for calibration text
            if prose:
                raise KomtError(f"{path}:{no} is not valid JSON ({err.msg})") from None
            raise KomtError(f"{path} line {no}: not valid JSON ({err.msg} at column {err.colno})") from None
        yield value, f"line {no}"
