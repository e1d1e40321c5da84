"""The README's identity claims not covered by tests/test_llama_cpp_parity.py: bf16 and q5_K_M (in the default
release set) on the tiny komt-shaped models, and f32, q4_K_M and q6_K on real SmolLM2-135M weights, each tensor for
tensor identical to llama.cpp's convert_hf_to_gguf.py (+ llama-quantize's default mix)."""

from __future__ import annotations

import pytest

from komt_edge.gguf import convert

from .conftest import assert_same_tensors, gguf_tensors
from .identity import assert_identical

SOURCE_PRECISION = {"mistral": "bf16", "llama": "f32"}


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_bf16_and_q5_K_M_match_llama_cpp(family, request, llama_cpp_ref, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    bf16, q5 = convert(str(model), ["bf16", "q5_K_M"], tmp_path, n_threads=2, progress=False)
    assert_identical(bf16, llama_cpp_ref.convert(model, "bf16"))
    assert_identical(q5, llama_cpp_ref.quantize(model, SOURCE_PRECISION[family], "q5_K_M"))
    assert gguf_tensors(bf16)["blk.0.attn_q.weight"][0] == "BF16"
    assert gguf_tensors(q5)["blk.0.attn_q.weight"][0] == "Q5_K"


def test_real_weights_smollm2_f32_q4_K_M_q6_K_match_llama_cpp(smollm2, llama_cpp_ref, tmp_path):
    f32, q4, q6 = convert(str(smollm2), ["f32", "q4_K_M", "q6_K"], tmp_path, n_threads=2, progress=False)
    assert_identical(f32, llama_cpp_ref.convert(smollm2, "f32"))
    for qtype, path in (("q4_K_M", q4), ("q6_K", q6)):
        assert_identical(path, llama_cpp_ref.quantize(smollm2, "f32", qtype))
