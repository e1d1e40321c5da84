"""Laptop inference, shared by `komt-edge chat` and `komt-edge serve`: which GGUF file MODEL means, and loading it.

MODEL is, in this order:

- a GGUF file (``dist/komt-mistral-7b-v1-Q4_K_M.gguf``);
- a folder holding GGUF files (``dist/``), one of which ``--quant`` chooses;
- a zoo name (``komt-mistral-7b``): the GGUF repo ``komt-edge release`` publishes for it, ``ORG/<name>-GGUF``,
  with ORG from ``--org`` (default: komt's own organization);
- a Hub GGUF repo (``ORG/NAME-GGUF``), like ``llama-server -hf``.

Hub files come through huggingface_hub (its cache, ``HF_TOKEN``, ``HF_ENDPOINT``); when the Hub cannot be reached
the files already in the cache are chosen from. ``--quant`` picks the file by its type in the file name
(``-Q4_K_M.gguf``, ``.Q4_K_M.gguf``, gguf-split shards ``-Q8_0-00001-of-00002.gguf``); the default is Q4_K_M when
there is one, else the smallest file of at least 4 bits per weight. Importance-matrix and LoRA-adapter files
(``*.imatrix.gguf``, ``*-LoRA-*.gguf``) are never chosen.

:func:`load` opens the file in llama-cpp-python with the chat template stored in it (the komt template for komt
files) or a komt family's template (``--template llama|mistral``), and the template's stop strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from .converters.gguf_file import GgufHeader, is_gguf, not_a_model
from .converters.plan import file_label, label_bits
from .errors import KomtError
from .generation import CHAT_DEFAULTS, COMPLETION_DEFAULTS, Generation, generate
from .llamacpp import open_llama
from .hub import download_files, gguf_files, is_hub_id
from .templates import gguf_template, template_for
from .zoo import ORG, lookup

DEFAULT_QUANT = "Q4_K_M"
DEFAULT_CTX = 2048
CTX_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of this


@dataclass
class Candidate:
    """One quantization of a model: a file, or the gguf-split shards of one."""

    quant: str  # the name of the plan it was made with (converters.plan), as its file name carries it
    files: list[str] = field(default_factory=list)
    size: int = 0

    @property
    def bits(self) -> int:
        return label_bits(self.quant)


def candidates(files: dict[str, int]) -> dict[str, Candidate]:
    """Group file names (→ sizes) by quantization plan; files that name none (imatrix, adapters...) are left out."""
    found: dict[str, Candidate] = {}
    for name in sorted(files):
        base = name.rsplit("/", 1)[-1]
        label = file_label(base)
        if label is None or base.startswith(".") or re.search(r"imatrix|[-.]lora[-.]", base, re.IGNORECASE):
            continue
        quant, part = label
        if part not in (None, "00001") and quant not in found:
            continue  # a later shard without its first: not a usable file
        c = found.setdefault(quant, Candidate(quant))
        c.files.append(name)
        c.size += files[name]
    return found


def choose(found: dict[str, Candidate], quant: str | None, source: str) -> Candidate:
    """``quant``'s file, or the default (Q4_K_M, else the smallest ≥ 4-bit file); a missing choice lists them."""
    have = ", ".join(sorted(found)) or "no GGUF model files"
    if quant:
        c = found.get(quant.upper())
        if c is None:
            raise KomtError(f"{source} has no {quant} file; it has: {have} (choose one with --quant)")
        return c
    if DEFAULT_QUANT in found:
        return found[DEFAULT_QUANT]
    usable = [c for c in found.values() if c.bits >= 4]
    if not usable:
        raise KomtError(f"{source} has no file of 4 bits or more; it has: {have} (choose one with --quant)")
    return min(usable, key=lambda c: (c.size, c.quant))


def _folder_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("*.gguf") if p.is_file()}


def hub_repo(model: str, org: str | None = None) -> str | None:
    """The Hub GGUF repo MODEL names: a zoo name's ``ORG/<name>-GGUF``, or MODEL itself when it is ORG/NAME."""
    zoo = lookup(model)
    if zoo is not None and not Path(model).exists():
        return f"{org or ORG}/{zoo.name}-GGUF"
    if is_hub_id(model):
        return model
    return None


def resolve_gguf(model: str | Path, *, quant: str | None = None, org: str | None = None,
                 revision: str | None = None, log=print) -> Path:
    """The local GGUF file MODEL means (see the module docstring); Hub files are downloaded into the cache."""
    path = Path(model).expanduser()
    if path.is_file():
        if not is_gguf(path):
            raise KomtError(f"{path} is not a GGUF file: give a .gguf file, a folder of them, a Hub GGUF repo "
                            "(ORG/NAME-GGUF) or a zoo name")
        if quant:
            raise KomtError(f"--quant {quant} chooses among the files of a folder or Hub repo, but {path} is a file")
        return path
    if path.is_dir():
        chosen = choose(candidates(_folder_files(path)), quant, str(path))
        return path / chosen.files[0]
    repo = hub_repo(str(model), org)
    if repo is None:
        raise KomtError(f"unknown MODEL {str(model)!r}: give a GGUF file, a folder of them, a Hub GGUF repo "
                        "(ORG/NAME-GGUF) or a zoo name (`komt-edge models`)")
    files, cached = gguf_files(repo, revision)
    chosen = choose(candidates(files), quant, repo)
    if cached is not None:
        log(f"the Hub is unreachable: using {chosen.files[0]} from the local cache")
        return cached / chosen.files[0]
    return download_files(repo, chosen.files, revision)


@dataclass
class LoadedModel:
    """A GGUF file open in llama-cpp-python, with the chat template that formats its chats."""

    path: Path
    llm: object  # llama_cpp.Llama
    chat_template: str
    family: str | None  # the komt family of the template, None for another model's own template
    stop: list[str]
    lora: Path | None = None

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    @cached_property
    def formatter(self):
        """The chat formatter create_chat_completion formats with: llama-cpp-python's Jinja2 formatter for this
        template, except that the model's BOS is added when the template renders none.

        llama-cpp-python's formatter never adds BOS itself, and leaves it to the template; komt's templates render
        ``{{ bos_token }}``, but files written before they did, and other models' templates, may not."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self.llm
        eos, bos = llm.token_eos(), llm.token_bos()

        def text(token: int) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", errors="ignore") if token >= 0 else ""

        jinja = Jinja2ChatFormatter(template=self.chat_template, eos_token=text(eos), bos_token=text(bos),
                                    stop_token_ids=[eos])
        bos_text = text(bos)

        def format_chat(**kwargs):
            response = jinja(**kwargs)
            # added_special=False: create_chat_completion tokenizes with add_bos (the model's BOS, if it has one)
            response.added_special = bool(bos_text) and response.prompt.startswith(bos_text)
            return response

        return format_chat

    def prompt_token_ids(self, messages: list[dict]) -> list[int]:
        """The formatted chat, tokenized as create_chat_completion tokenizes it."""
        response = self.formatter(messages=messages)
        return self.llm.tokenize(response.prompt.encode("utf-8"), add_bos=not response.added_special, special=True)

    def prompt_tokens(self, messages: list[dict]) -> int:
        """How many tokens the formatted chat takes, as create_chat_completion tokenizes it."""
        return len(self.prompt_token_ids(messages))

    def chat(self, messages: list[dict], *, stop: list[str] | None = None,
             cancelled: Callable[[], bool] = lambda: False, **fields) -> Generation:
        """The reply to ``messages``, generated as ``llm.create_chat_completion`` would (the file's template, its
        stop strings after ``stop``, create_chat_completion's defaults for the ``fields`` left out), streaming in
        linear time (:mod:`komt_edge.generation`)."""
        response = self.formatter(messages=messages)
        prompt = self.llm.tokenize(response.prompt.encode("utf-8"), add_bos=not response.added_special, special=True)
        stops = list(stop or []) + [s for s in (response.stop or []) if s]
        return generate(self.llm, prompt, stop=stops, stop_token_ids=[self.llm.token_eos()], cancelled=cancelled,
                        **{**CHAT_DEFAULTS, **fields})

    def complete(self, prompt: str, *, cancelled: Callable[[], bool] = lambda: False, **fields) -> Generation:
        """The completion of the text ``prompt`` (BOS first when the model adds one), as ``llm.create_completion``
        would, with its defaults for the ``fields`` left out."""
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        return generate(self.llm, tokens, cancelled=cancelled, **{**COMPLETION_DEFAULTS, **fields})

    def close(self) -> None:
        self.llm.close()


def check_lora(lora: str | Path | None, base: Path) -> Path | None:
    """The LoRA adapter GGUF ``--lora`` names, refused before llama.cpp loads it unless it fits ``base`` (llama.cpp
    would crash on an adapter made for another base)."""
    if lora is None:
        return None
    from .converters.lora_to_gguf import check_lora_fits

    path = Path(lora).expanduser()
    if not path.exists():
        raise KomtError(f"--lora {lora} does not exist: give the LoRA adapter GGUF (`komt-edge gguf-lora` makes one)")
    if not path.is_file() or not is_gguf(path):
        raise KomtError(f"--lora {lora} is not a GGUF file: convert the adapter with `komt-edge gguf-lora` first")
    with GgufHeader(path) as h:
        kind = h.string("general.type")
    if kind != "adapter":
        raise KomtError(f"--lora {lora} is not a LoRA adapter GGUF (general.type is {kind!r}); give the model as MODEL")
    check_lora_fits(path, base)
    return path


def context_size(n_ctx: int | None, trained: int | None, path: Path) -> int:
    """The context to open ``path`` with: ``n_ctx`` (None: DEFAULT_CTX or the training context if smaller; 0: the
    training context), within what llama.cpp accepts and the model was trained for, padded as llama.cpp pads it."""
    if n_ctx is None:
        n_ctx = min(DEFAULT_CTX, trained or DEFAULT_CTX)
    elif n_ctx == 0:
        n_ctx = trained or DEFAULT_CTX
    if n_ctx < CTX_PAD:
        raise KomtError(f"--ctx {n_ctx} is below llama.cpp's smallest context, {CTX_PAD} tokens: give {CTX_PAD} or "
                        "more")
    if trained and n_ctx > trained:
        raise KomtError(f"--ctx {n_ctx} is more than {path.name} was trained for ({trained} tokens): give at most "
                        f"{trained} (or 0 for exactly that)")
    # llama.cpp pads the context to a multiple of 256, but llama-cpp-python sizes its token buffer by the value
    # asked for and checks prompts against the padded one: a prompt in between crashes it. Ask for the padded size.
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def load(path: str | Path, *, template: str | None = None, n_ctx: int | None = None, n_threads: int | None = None,
         lora: str | Path | None = None, seed: int | None = None) -> LoadedModel:
    """Open a GGUF file for chat. ``template``: a komt family to format with instead of the file's own template;
    ``n_ctx``: see :func:`context_size`."""
    from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

    path = Path(path)
    with GgufHeader(path) as h:
        trained = h.u32(f"{h.string('general.architecture')}.context_length")
    if (message := not_a_model(path)) is not None:  # an importance matrix or a LoRA adapter
        raise KomtError(message)
    chat_template, family = gguf_template(path, template)
    if not chat_template:
        raise KomtError(f"{path} stores no chat template: choose komt's with --template llama or --template mistral")
    lora_path = check_lora(lora, path)
    n_ctx = context_size(n_ctx, trained, path)
    # swa_full off: a model with sliding-window layers (Gemma 3) keeps only the window in their cache, as
    # llama-server does: less memory, and long replies as fast as llama-bench's (komt_edge.generation reuses a
    # cached prompt prefix only while the window before it is still there).
    kwargs = dict(n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, swa_full=False)
    if lora_path is not None:
        kwargs["lora_path"] = str(lora_path)
    if seed is not None:
        kwargs["seed"] = seed
    llm = open_llama(path, **kwargs)
    model = LoadedModel(path, llm, chat_template, family, list(template_for(family).stop) if family else [], lora_path)
    llm.chat_handler = chat_formatter_to_chat_completion_handler(model.formatter)
    return model
