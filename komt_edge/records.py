"""Instruction records: the one way every stage reads a record of a user's data file and turns it into text.

A record is an instruction, an optional input and the answer (:class:`Record`). In a JSON value it is an object
with an instruction (key ``instruction``, ``prompt``, ``question`` or ``query``), an optional ``input`` and an
answer (``output``, ``response``, ``answer``, ``completion`` or ``chosen``), or a chat (``messages`` /
``conversations``: each user turn answered by an assistant turn is one record; other turns are dropped).
Training (``komt_edge.train_data``) reads these; calibration and evaluation text (``komt_edge.corpora``) reads
them and prose as well.

The prompt is the instruction, then a blank line and the input when there is one (:func:`prompt_of`; a blank
line is what komt's own trainer puts between prompt parts: ``{instruction}\\n\\n### Response:``). A model reads
the prompt in its komt template with the answer right after it (:func:`render`), in training and calibration
alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KomtError

if TYPE_CHECKING:
    from .templates import PromptTemplate

PROMPT_KEYS = ("instruction", "prompt", "question", "query")
ANSWER_KEYS = ("output", "response", "answer", "completion", "chosen")
CHAT_KEYS = ("messages", "conversations")
USER_ROLES = frozenset({"user", "human", "prompter"})
ASSISTANT_ROLES = frozenset({"assistant", "gpt", "bot", "model"})
INPUT_SEPARATOR = "\n\n"  # between instruction and input, inside the template


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
