"""The model families komt-edge handles: one table, owned by the converter, that every other list derives from.

A family is a Hugging Face architecture (``config.json``'s ``architectures[0]``) that ``komt-edge gguf`` converts;
what the rest of komt-edge may list is derived from :data:`ARCHITECTURES` here: the converter's GGUF architecture
map (``hf_to_gguf.ARCHITECTURES``), the adapters ``gguf-lora`` converts (those written as ``llama``), the
architectures ``gptq`` quantizes, the komt prompt format of a checkpoint (``templates.family_for_architecture``)
and ``komt-edge gguf --help``. Adding a family is one row here (and the converter code it needs).

This module imports nothing heavy: the CLI's help and the templates read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json's architectures[0]
    gguf_arch: str  # general.architecture of the GGUF file (llama.cpp's name, gguf.MODEL_ARCH_NAMES)
    models: str  # what it is, for --help
    template: str | None = None  # the komt prompt family of komt's checkpoints of it (komt_edge.templates)
    gptq: bool = False  # komt-edge gptq quantizes it

    @property
    def prefix(self) -> str:
        """The family's name in architecture names: ``Mistral`` for ``MistralForCausalLM``."""
        return self.name.removesuffix("ForCausalLM")


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("LlamaForCausalLM", "llama", "Llama 2 and Llama 3.x", template="llama", gptq=True),
    # llama.cpp runs Mistral 7B as llama (no sliding window key)
    Architecture("MistralForCausalLM", "llama", "written as llama, as llama.cpp does", template="mistral",
                 gptq=True),
    Architecture("Gemma3ForCausalLM", "gemma3", "Gemma 3"),
    Architecture("Qwen2ForCausalLM", "qwen2", "Qwen2, Qwen2.5"),
)

NAMES: tuple[str, ...] = tuple(a.name for a in ARCHITECTURES)
GPTQ_NAMES: tuple[str, ...] = tuple(a.name for a in ARCHITECTURES if a.gptq)


def template_family(architecture: str | None) -> str | None:
    """The komt prompt family of an architecture name: the template of the family whose name it starts with
    (``Mistral*``: ``mistral``), None for a family without one and for names of no family."""
    name = architecture or ""
    return next((a.template for a in ARCHITECTURES if name.startswith(a.prefix)), None)


def describe() -> str:
    """The families for --help: ``LlamaForCausalLM (Llama 2 and Llama 3.x), ... and Qwen2ForCausalLM (...)``."""
    items = [f"{a.name} ({a.models})" for a in ARCHITECTURES]
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]
