"""The komt model zoo, and turning MODEL (zoo name, Hub id or local folder) into a local folder."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .converters.gguf_file import is_gguf, not_a_model
from .errors import KomtError
from .hub import is_hub_id, snapshot
from .templates import PromptTemplate, family_for_architecture, template_for

ORG = "davidkim205"


@dataclass(frozen=True)
class ZooModel:
    name: str
    merged: str  # Hub id of the merged (full) model
    adapter: str | None  # Hub id of the LoRA adapter
    base: str  # Hub id of the model the adapter applies to
    architecture: str  # HF architecture
    family: str  # template family: "llama" or "mistral"
    license: str
    size_label: str
    aliases: tuple[str, ...] = field(default=())

    @property
    def template(self) -> PromptTemplate:
        return template_for(self.family)

    def declared_base(self) -> str | None:
        """``base_model_name_or_path`` of the adapter's adapter_config.json when huggingface_hub's cache holds it
        (no network), else None."""
        if not self.adapter:
            return None
        from huggingface_hub import constants

        # No folder in huggingface_hub's cache layout (<cache>/models--ORG--NAME): never downloaded, as most adapters
        # are when `komt-edge models` runs; answered without importing the download machinery (0.3 s).
        if not (Path(constants.HF_HUB_CACHE) / f"models--{self.adapter.replace('/', '--')}").is_dir():
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.adapter, "adapter_config.json")
        return _declared_base(Path(cached).parent) if isinstance(cached, str) else None

    def to_dict(self) -> dict:
        return {**asdict(self), "template": self.template.format("{prompt}"),
                "adapter_config_base": self.declared_base()}

    def summary(self) -> str:
        declared = self.declared_base()
        return "\n".join([
            f"{self.name}  ({self.size_label}, {self.architecture}, licence {self.license})",
            f"  aliases:  {', '.join(self.aliases) or '-'}",
            f"  merged:   {self.merged}",
            f"  adapter:  {self.adapter}",
            f"  base:     {self.base} (komt-edge's table); adapter_config.json: "
            + (declared or "not downloaded yet") + " (used when it is a Hub id)",
            f"  template: {self.template.format('{prompt}')!r}",
        ])


ZOO: tuple[ZooModel, ...] = (
    ZooModel("komt-llama2-7b-v1", f"{ORG}/komt-llama2-7b-v1", f"{ORG}/komt-llama2-7b-v1-lora",
             "meta-llama/Llama-2-7b-chat-hf", "LlamaForCausalLM", "llama", "llama2", "7B",
             aliases=("komt-llama2-7b",)),
    ZooModel("komt-llama2-13b-v1", f"{ORG}/komt-llama2-13b-v1", f"{ORG}/komt-llama2-13b-v1-lora",
             "meta-llama/Llama-2-13b-chat-hf", "LlamaForCausalLM", "llama", "llama2", "13B",
             aliases=("komt-llama2-13b",)),
    ZooModel("komt-llama-30b-v1", f"{ORG}/komt-llama-30b-v1", f"{ORG}/komt-llama-30b-v1-lora",
             "huggyllama/llama-30b", "LlamaForCausalLM", "llama", "other", "30B",
             aliases=("komt-llama-30b",)),
    ZooModel("komt-mistral-7b-v1", f"{ORG}/komt-mistral-7b-v1", f"{ORG}/komt-mistral-7b-v1-lora",
             "mistralai/Mistral-7B-Instruct-v0.1", "MistralForCausalLM", "mistral", "apache-2.0", "7B",
             aliases=("komt-mistral-7b",)),
    ZooModel("komt-Llama-2-7b-chat-hf", f"{ORG}/komt-Llama-2-7b-chat-hf", f"{ORG}/komt-Llama-2-7b-chat-hf-lora",
             "meta-llama/Llama-2-7b-chat-hf", "LlamaForCausalLM", "llama", "llama2", "7B",
             aliases=("komt-llama-2-7b-chat",)),
    ZooModel("komt-Llama-2-13b-hf", f"{ORG}/komt-Llama-2-13b-hf", f"{ORG}/komt-Llama-2-13b-hf-lora",
             "meta-llama/Llama-2-13b-hf", "LlamaForCausalLM", "llama", "llama2", "13B",
             aliases=("komt-llama-2-13b",)),
)


def models() -> tuple[ZooModel, ...]:
    """The published komt models (`komt-edge models`)."""
    return ZOO


def lookup(name: str) -> ZooModel | None:
    """A zoo entry by name, alias or Hub id (case-insensitive), else None."""
    key = name.strip().lower()
    for m in ZOO:
        if key in {m.name.lower(), m.merged.lower(), *(a.lower() for a in m.aliases)}:
            return m
    return None


# What a conversion needs from a Hub repo; pickles only when asked for.
_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
_PICKLE_PATTERNS = ["*.bin", "*.bin.index.json"]
_META_PATTERNS = ["*.json", "tokenizer.model", "*.txt", "*.md"]


def download(repo_id: str, *, weights: bool = True, allow_pickle: bool = False, revision: str | None = None) -> Path:
    """Fetch what a conversion needs of a Hub repo (weights unless ``weights=False``; pickles only when allowed)."""
    patterns = list(_META_PATTERNS)
    if weights:
        patterns += _WEIGHT_PATTERNS + (_PICKLE_PATTERNS if allow_pickle else [])
    return snapshot(repo_id, patterns, revision=revision)


def snapshot_revision(path: Path | None) -> str | None:
    """The commit of a huggingface_hub snapshot folder (…/snapshots/<sha>); None for a local folder."""
    if path is None:
        return None
    parts = Path(path).resolve().parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return parts[-1]
    return None


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # local folder with config.json, weights and tokenizer
    name: str  # display name used for output files
    zoo: ZooModel | None
    source: str  # Hub id or local folder as given
    adapter: Path | None = None  # LoRA adapter folder to merge before converting


def model_family(resolved: ResolvedModel, template: str | None = None) -> str:
    """The komt template family of a model: ``template`` when given, else its zoo entry's, else the one of the
    architecture in its config.json. The one rule every stage uses."""
    if template:
        template_for(template)  # an unknown family is an error here, not a silent fallback
        return template
    if resolved.zoo is not None:
        return resolved.zoo.family
    config = resolved.path / "config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        architectures = []
    return family_for_architecture(architectures[0] if architectures else None)


def model_template(resolved: ResolvedModel, template: str | None = None) -> PromptTemplate:
    """The komt prompt template of a model (see :func:`model_family`)."""
    return template_for(model_family(resolved, template))


def chat_template_for(resolved: ResolvedModel, template: str | None) -> str | None:
    """komt's template for zoo models; otherwise the checkpoint's own (Gemma's, Qwen2.5's, Llama 3 Instruct's), else
    komt's for a komt-family checkpoint (a SentencePiece Llama or Mistral), else none."""
    if template == "none":
        return None
    if template:
        return template_for(template).chat_template
    if resolved.zoo is not None:
        return resolved.zoo.template.chat_template
    own = own_chat_template(resolved.path)
    if own is not None:
        return own[0]
    # komt's prompt format belongs to komt's families (Llama 2 and Mistral, SentencePiece vocabularies); a Llama 3
    # or Qwen2 base without a template of its own gets none, as llama.cpp's converter writes none
    if not is_komt_family(resolved):
        return None
    return model_template(resolved).chat_template


def own_chat_template(folder: Path) -> tuple[str, str] | None:
    """The checkpoint's own chat template and the file it is in: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (as transformers reads them); None when it has neither."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja.name
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        own = json.loads(cfg_path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(own, str):
            return own, cfg_path.name
    return None


def is_komt_family(resolved: ResolvedModel) -> bool:
    """Whether komt's prompt format is the model's: a zoo model, or a checkpoint of komt's families (Llama 2 and
    Mistral, SentencePiece ``tokenizer.model`` vocabularies). Byte-level BPE checkpoints (Llama 3, Qwen2) are not."""
    return resolved.zoo is not None or (resolved.path / "tokenizer.model").is_file()


def resolve(model: str, *, adapter: str | None = None, allow_pickle: bool = False,
            prefer_adapter: bool = True) -> ResolvedModel:
    """MODEL is a local folder, a zoo name or alias, or a Hub id.

    A zoo name resolves to its base model plus its LoRA adapter (merged before conversion), the way
    komt publishes its models; ``prefer_adapter=False`` takes the merged Hub repo instead.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        adapter_path = resolve_adapter(adapter) if adapter else None
        return ResolvedModel(local, local.resolve().name, lookup(local.name), str(local), adapter_path)
    check_not_a_file(model)
    entry = lookup(model)
    if entry is not None:
        if adapter is None and prefer_adapter and entry.adapter:
            adapter_path = resolve_adapter(entry.adapter)
            choice = adapter_base(adapter_path, entry)
            if choice.note:
                print(f"note: {choice.note}", file=sys.stderr)
            base = download(choice.base or entry.base, allow_pickle=allow_pickle)
            return ResolvedModel(base, entry.name, entry, choice.base or entry.base, adapter_path)
        path = download(entry.merged, allow_pickle=allow_pickle)
        return ResolvedModel(path, entry.name, entry, entry.merged, resolve_adapter(adapter) if adapter else None)
    if is_hub_id(model):
        path = download(model, allow_pickle=allow_pickle)
        return ResolvedModel(path, model.split("/")[1], None, model, resolve_adapter(adapter) if adapter else None)
    known = ", ".join(m.name for m in ZOO)
    raise KomtError(f"unknown MODEL {model!r}: not a local folder, zoo name or Hub id (ORG/NAME); "
                    f"zoo names: {known}")


def _declared_base(adapter_dir: Path) -> str | None:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


@dataclass(frozen=True)
class AdapterBase:
    """The model a LoRA adapter applies to, and where that answer came from."""

    base: str | None  # the Hub id used; None when neither source names one
    declared: str | None  # the adapter's adapter_config.json base_model_name_or_path, as written
    table: str | None  # komt-edge's zoo table
    note: str | None = None  # set when both exist and disagree: which was used and why


def adapter_base(adapter_dir: Path, entry: ZooModel | None = None) -> AdapterBase:
    """The rule: the adapter's own ``base_model_name_or_path`` when it is a Hub id (the model it was trained on);
    otherwise komt-edge's zoo table (komt's adapters may name a local training path)."""
    declared = _declared_base(adapter_dir)
    table = entry.base if entry is not None else None
    if declared is not None and is_hub_id(declared):
        note = None
        if table is not None and declared.lower() != table.lower():
            note = (f"the adapter's adapter_config.json names {declared} as its base, komt-edge's zoo table "
                    f"says {table}: using {declared}, the model the adapter was trained on")
        return AdapterBase(declared, declared, table, note)
    note = None
    if table is not None and declared is not None:
        note = (f"the adapter's adapter_config.json names {declared!r} as its base, which is not a Hub id: "
                f"using {table} from komt-edge's zoo table")
    return AdapterBase(table, declared, table, note)


def check_not_a_file(model: str, what: str = "MODEL") -> None:
    """A file (or a path that looks like one) where a model folder or a Hub id is expected: say what to pass."""
    local = Path(model).expanduser()
    if local.is_file() and is_gguf(local) and (message := not_a_model(local, f"{what} (a Hugging Face model)")):
        raise KomtError(message)
    if local.suffix.lower() == ".gguf" or (local.is_file() and is_gguf(local)):
        raise KomtError(f"{model} is a GGUF file, where {what} is a Hugging Face model (folder, Hub id or zoo name): "
                        "pass the Hugging Face folder it came from" if local.exists() else
                        f"{model} does not exist, and {what} is a Hugging Face model, not a GGUF file: pass the "
                        "Hugging Face folder, Hub id or zoo name")
    if local.is_file():
        raise KomtError(f"{model} is a file, where {what} is a Hugging Face model: pass its folder, a Hub id or a "
                        "zoo name")


def resolve_adapter(adapter: str) -> Path:
    local = Path(adapter).expanduser()
    if local.is_dir():
        if not (local / "adapter_config.json").is_file():
            raise KomtError(f"{local} is not a LoRA adapter folder: adapter_config.json is missing")
        return local
    check_not_a_file(adapter, "ADAPTER")
    if is_hub_id(adapter):
        return download(adapter)
    raise KomtError(f"adapter {adapter!r} is neither a local folder nor a Hub id (ORG/NAME)")

