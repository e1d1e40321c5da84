"""Identity with llama.cpp beyond the tensors: every metadata key of a GGUF komt-edge wrote, value type and bytes,
equals the one llama.cpp's own tools wrote, except the keys below, each left out for a stated reason.

``assert_same_metadata`` goes next to ``assert_same_tensors`` in the identity tests of the SentencePiece families
(tiny Llama and Mistral, Gemma 3), SmolLM2 and the LoRA and imatrix files; the byte-level BPE families (Llama 3,
Qwen2) compare whole files with ``komt_edge.converters.gguf_file.gguf_differences`` in tests/test_bpe_families.py,
with the same provenance list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from komt_edge.converters.gguf_file import PROVENANCE_KEYS, RawGguf

# Provenance (komt_edge.converters.gguf_file.PROVENANCE_KEYS, prefixes): gguf-py's GGUF.* header fields; the name
# fields llama.cpp derives from the folder name and komt-edge from the resolved model (general.name, basename,
# finetune, size_label); who quantized the file (general.quantized_by); license, source and base-model fields,
# which say where the weights came from; komt-edge's own komt_edge.* keys (its version, the source revision).
# llama.cpp reads none of them to load or run a model.
# Plus general.version, another field llama.cpp parses out of the folder name (a folder "llama-32000" gets version
# "32000"), missing from that list.
PROVENANCE = (*PROVENANCE_KEYS, "general.version")

# Keys komt-edge writes and llama.cpp's converter does not (or the reverse), whose value is what llama.cpp's loader
# assumes when the key is absent (src/llama-vocab.cpp, llama_vocab::impl::load, in the pinned llama.cpp): the file
# behaves the same either way. Keyed by tokenizer.ggml.model, then tokenizer.ggml.pre (None: any).
LOADER_DEFAULTS: dict[tuple[str, str | None], dict[str, object]] = {
    # SentencePiece: special_unk_id = 0; add_space_prefix = true, add_bos = true for LLAMA_VOCAB_TYPE_SPM.
    # komt-edge writes the unknown id and the dummy-prefix flag from tokenizer.model itself.
    ("llama", None): {"tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": True,
                      "tokenizer.ggml.add_bos_token": True},
    # byte-level BPE, pre-tokenizer "smollm": add_bos stays false (only llama3/llama-bpe/tekken/chameleon/... set it),
    # add_space_prefix = false for LLAMA_VOCAB_TYPE_BPE. llama.cpp's converter copies add_bos_token = false from
    # tokenizer_config.json; komt-edge leaves the default.
    ("gpt2", "smollm"): {"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_space_prefix": False},
}

# What komt-edge adds on purpose, compared only when llama.cpp's file has the key too.
ADDITIONS = {
    "tokenizer.chat_template": "komt's prompt template, embedded for komt-family checkpoints that carry none "
                               "(README, `komt-edge gguf`: Metadata); llama.cpp's converter writes a template only "
                               "from the checkpoint's own files",
}


def metadata_differences(ours: Path, theirs: Path, *, ignore: Mapping[str, str] | None = None) -> list[str]:
    """Each metadata key whose value type or bytes differ, or that one file lacks, between komt-edge's ``ours`` and
    llama.cpp's ``theirs``; provenance, the loader defaults above, komt-edge's additions (when llama.cpp wrote
    none) and ``ignore`` (key prefix → reason, for a test's own documented exception) left out."""
    a, b = RawGguf(ours), RawGguf(theirs)
    skip = (*PROVENANCE, *(ignore or {}))
    ka, kb = a.metadata(skip), b.metadata(skip)
    model = a.value("tokenizer.ggml.model") if "tokenizer.ggml.model" in a.kv else None
    pre = a.value("tokenizer.ggml.pre") if "tokenizer.ggml.pre" in a.kv else None
    defaults = {**LOADER_DEFAULTS.get((model, None), {}), **LOADER_DEFAULTS.get((model, pre), {})}
    found = []
    for key in sorted(ka.keys() | kb.keys()):
        if key in ka and key in kb:
            if ka[key] != kb[key]:
                found.append(f"{key}: {_show(a, key)} != llama.cpp's {_show(b, key)}")
            continue
        present, other = (a, "llama.cpp has none") if key in ka else (b, "komt-edge wrote none")
        if key in ADDITIONS and present is a:
            continue
        if key in defaults and present.value(key) == defaults[key] and type(present.value(key)) is type(defaults[key]):
            continue
        found.append(f"{key}: {_show(present, key)} only in {'ours' if present is a else 'llama.cpp'}'s ({other})")
    return found


def assert_same_metadata(ours: Path, theirs: Path, *, ignore: Mapping[str, str] | None = None) -> None:
    """Every non-provenance key-value pair of ``ours`` equals llama.cpp's ``theirs`` (see metadata_differences)."""
    found = metadata_differences(ours, theirs, ignore=ignore)
    assert not found, f"{Path(ours).name}: metadata differs from llama.cpp's {Path(theirs).name}:\n  " + \
        "\n  ".join(found[:20])


def _show(f: RawGguf, key: str) -> str:
    kind, raw = f.kv[key]
    if kind == RawGguf._ARRAY:
        return f"array of {len(raw)} bytes (type {kind})"
    text = repr(f.value(key))
    return text if len(text) <= 60 else text[:57] + "..."


# Gemma 3: where komt-edge's file knowingly differs from llama.cpp's converter (README, "Gemma 3 270M in Korean").
GEMMA3_EXCEPTIONS = {
    "tokenizer.ggml.token_type": "komt-edge keeps the release's user-defined pieces (\"\\n\\n\", ...) as "
                                 "USER_DEFINED; llama.cpp's converter makes them NORMAL",
    "tokenizer.ggml.unknown_token_id": "komt-edge keeps the release's <unk> id (3); llama.cpp's converter writes none",
    "gemma3.attention.sliding_window_pattern": "komt-edge writes config.json's layer_types when they differ from "
                                               "the 5:1 local/global pattern llama.cpp's converter assumes",
    "gemma3.vocab_size": "not deliberate, no effect: komt-edge writes {arch}.vocab_size for every architecture "
                         "but qwen2, llama.cpp's gemma3 converter writes none, and llama.cpp reads the key only "
                         "for a file without a vocabulary (src/llama-vocab.cpp, tokenizer model \"none\")",
}


def assert_identical(ours: Path, theirs: Path, *, ignore: Mapping[str, str] | None = None) -> None:
    """llama.cpp's file, tensor for tensor and key for key (provenance aside): ``assert_same_tensors`` and
    ``assert_same_metadata``."""
    from .conftest import assert_same_tensors

    assert_same_tensors(ours, theirs)
    assert_same_metadata(ours, theirs, ignore=ignore)


# A file quantized with an importance matrix: komt-edge records it as llama-quantize (the tool) does
# (quantize.imatrix.file/.dataset/.entries_count/.chunks_count, checked by the imatrix tests themselves); the
# reference made through the library call llama_model_quantize writes none.
IMATRIX_RECORD = {"quantize.imatrix.": "komt-edge's record of the imatrix, as the llama-quantize tool writes it"}


# LoRA adapter GGUFs (komt-edge gguf-lora against llama.cpp's convert_lora_to_gguf.py). llama.cpp reads only
# general.type, general.architecture, adapter.type, adapter.lora.alpha (and adapter.alora.invocation_tokens) from an
# adapter (src/llama-adapter.cpp, llama_adapter_lora_init_impl); these three keys differ and are never read:
LORA_EXCEPTIONS = {
    "general.tags": "provenance: llama.cpp's converter copies the tags of peft's README model card "
                    "(base_model:adapter:<base path>, lora, transformers)",
    "general.file_type": "komt-edge records the type it wrote; llama.cpp's LoRA converter writes none",
    "general.quantization_version": "llama.cpp's LoRA converter writes it for every type, komt-edge for q8_0 only",
}
