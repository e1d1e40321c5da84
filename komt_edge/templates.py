"""komt prompt templates: the one source of truth for inference, GGUF chat templates and training.

komt was trained with two prompt formats, one per model family:

- Llama family:   ``### instruction: {prompt}\n\n### Response: ``
- Mistral family: ``[INST]{prompt} [/INST]``

``PromptTemplate.format`` renders a single-turn prompt; ``PromptTemplate.chat_template`` is the same
format as a Jinja template, written into GGUF files as ``tokenizer.chat_template`` so that llama.cpp
and llama-cpp-python apply it themselves. Like Llama 2's and Mistral's own templates it starts with
``{{ bos_token }}``: llama-cpp-python's chat formatter and transformers' ``apply_chat_template(tokenize=True)``
add no BOS of their own, and komt answers garbage without one; llama.cpp's ``--jinja`` drops the rendered BOS
when it adds its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .converters.architectures import template_family


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    prefix: str  # text before the user's prompt
    suffix: str  # text after it; the model's answer starts right after the suffix

    def format(self, prompt: str) -> str:
        return f"{self.prefix}{prompt}{self.suffix}"

    @property
    def markers(self) -> tuple[str, str]:
        return self.prefix, self.suffix

    @property
    def stop(self) -> tuple[str, ...]:
        """Where a reply ends besides EOS: the literal ``</s>`` and the start of a next user turn (komt writes
        them when it runs on)."""
        return "</s>", self.prefix.strip()

    @property
    def chat_template(self) -> str:
        """Jinja chat template: BOS, then system text, then each user turn wrapped in the komt markers."""
        p, s = _jinja_str(self.prefix), _jinja_str(self.suffix)
        return (
            "{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
            f"{{% elif message['role'] == 'user' %}}{{{{ {p} + message['content'] + {s} }}}}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            "{% endif %}{% endfor %}"
        )


def _jinja_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


LLAMA = PromptTemplate("komt-llama", "### instruction: ", "\n\n### Response: ")
MISTRAL = PromptTemplate("komt-mistral", "[INST]", " [/INST]")

TEMPLATES = {"llama": LLAMA, "mistral": MISTRAL}


def template_option_error(template: str | None, *, allow_none: bool = False) -> str | None:
    """What is wrong with a ``--template`` value (None: the model's own; ``"none"`` where ``allow_none``), else
    None: ``--template 'x': choose llama or mistral``."""
    names = list(TEMPLATES) + (["none"] if allow_none else [])
    if template is None or template in names:
        return None
    return f"--template {template!r}: choose {', '.join(names[:-1])} or {names[-1]}"


def template_for(family: str) -> PromptTemplate:
    try:
        return TEMPLATES[family]
    except KeyError:
        raise ValueError(f"unknown template family {family!r}; known: {', '.join(TEMPLATES)}") from None


def family_for_architecture(architecture: str | None) -> str:
    """The komt family of a Hugging Face architecture name: the template of its family in the converter's table
    (``converters/architectures.py``: Mistral's format for Mistral*), komt-llama's otherwise."""
    return template_family(architecture) or "llama"


def family_from_chat_template(stored: str | None) -> str | None:
    """The komt family whose prompt format a chat template (as stored in a GGUF file) uses, else None.

    komt-edge's own files store :attr:`PromptTemplate.chat_template` exactly; files made by other tools (and by
    komt-edge before its template rendered BOS) are recognised by komt's markers."""
    if not stored:
        return None
    for family, t in TEMPLATES.items():
        if t.chat_template == stored:
            return family
    for family, t in TEMPLATES.items():
        if t.prefix.strip() in stored:
            return family
    return None


def gguf_template(path: str | Path, template: str | None = None) -> tuple[str | None, str | None]:
    """The template of a GGUF file: (chat template, komt family). ``template`` (a komt family, as ``--template``
    names it) is komt's template of that family and the file is not read; otherwise the file's
    ``tokenizer.chat_template`` and the komt family whose format it uses (None for another chat template, and
    (None, None) for a file that stores none). The one place komt-edge reads a GGUF file's template: chat, serve,
    verify, imatrix and bench's judge all ask here."""
    if template:
        return template_for(template).chat_template, template
    from .converters.gguf_file import GgufHeader  # llama.cpp's gguf reader: only when a file is read

    with GgufHeader(Path(path)) as header:
        stored = header.string("tokenizer.chat_template")
    return stored, family_from_chat_template(stored)

