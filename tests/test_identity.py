"""tests/identity.py's metadata comparison rejects what it should: a changed value, a changed value type, a key one
side lacks; and lets through only provenance, llama.cpp's loader defaults and komt-edge's documented additions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter

from .identity import assert_same_metadata, metadata_differences


def _write(path: Path, **changes) -> Path:
    """A small llama GGUF with a SentencePiece-like vocabulary; ``changes``: key → value (None drops the key,
    a (value, GGUFValueType) pair sets the type)."""
    kv = {
        "general.name": "tiny", "llama.context_length": 2048, "llama.rope.freq_base": 10000.0,
        "llama.block_count": 2, "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁안녕"],
    }
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = value
    w = GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        if key == "general.architecture":
            continue
        if isinstance(value, tuple):
            w.add_key_value(key, value[0], value[1])
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_string(key, value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_only_provenance_differs(tmp_path):
    theirs = _write(tmp_path / "theirs.gguf", general__name="Tiny")
    ours = _write(tmp_path / "ours.gguf", komt_edge__version="9.9", general__quantized_by="komt-edge")
    assert_same_metadata(ours, theirs)


@pytest.mark.parametrize("change, needle", [
    (dict(llama__rope__freq_base=500000.0), "llama.rope.freq_base: 500000.0 != llama.cpp's 10000.0"),
    (dict(llama__context_length=(2048, GGUFValueType.INT32)), "llama.context_length"),  # same number, other type
    (dict(tokenizer__ggml__tokens=["<unk>", "<s>", "</s>", "▁안"]), "tokenizer.ggml.tokens"),
    (dict(llama__block_count=None), "llama.block_count: 2 only in llama.cpp's"),
    (dict(llama__expert_count=8), "llama.expert_count: 8 only in ours"),
    (dict(tokenizer__ggml__add_space_prefix=False), "tokenizer.ggml.add_space_prefix"),  # not llama.cpp's default
    (dict(tokenizer__ggml__unknown_token_id=3), "tokenizer.ggml.unknown_token_id"),
])
def test_each_kind_of_difference_is_reported(change, needle, tmp_path):
    theirs = _write(tmp_path / "theirs.gguf")
    ours = _write(tmp_path / "ours.gguf", **change)
    found = metadata_differences(ours, theirs)
    assert len(found) == 1 and needle in found[0], found
    with pytest.raises(AssertionError, match="metadata differs from llama.cpp's"):
        assert_same_metadata(ours, theirs)


def test_loader_defaults_and_additions_pass_only_as_documented(tmp_path):
    theirs = _write(tmp_path / "theirs.gguf")
    # SentencePiece defaults llama.cpp's loader assumes (unk 0, add_space_prefix true) and komt's template: equal
    ours = _write(tmp_path / "ours.gguf", tokenizer__ggml__unknown_token_id=0, tokenizer__ggml__add_space_prefix=True,
                  tokenizer__chat_template="{{ messages }}")
    assert metadata_differences(ours, theirs) == []
    # a template llama.cpp also wrote is compared
    both = _write(tmp_path / "theirs-template.gguf", tokenizer__chat_template="{{ other }}")
    assert [d.split(":")[0] for d in metadata_differences(ours, both)] == ["tokenizer.chat_template"]
    # a test's own exception, with its reason
    odd = _write(tmp_path / "odd.gguf", llama__expert_count=8)
    assert metadata_differences(odd, theirs, ignore={"llama.expert_count": "why this file may differ"}) == []
