"""komt-edge's GGUF files are tensor-for-tensor identical to llama.cpp's own path from the same checkpoint.

f16/f32: convert_hf_to_gguf.py --outtype f16|f32. Quantized types: convert to the source precision (bf16 or f32)
with convert_hf_to_gguf.py, then llama-quantize with its default per-tensor mix (llama_model_quantize).
"""

from __future__ import annotations

import pytest

from komt_edge.gguf import convert
from komt_edge.merge import merge

from .conftest import assert_same_tensors, gguf_tensors, llama_cpp_convert, llama_cpp_quantize

SOURCE_PRECISION = {"mistral": "bf16", "llama": "f32"}


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_float_types_match_convert_hf_to_gguf(family, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    ours = convert(str(model), ["f16", "f32"], tmp_path, n_threads=2, progress=False)
    for qtype, path in zip(["f16", "f32"], ours):
        assert_same_tensors(path, llama_cpp_convert(model, qtype, tmp_path / f"llama.cpp-{qtype}.gguf"))


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_quantized_types_match_llama_quantize_default_mix(family, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    qtypes = ["q8_0", "q4_0", "q4_K_M", "q6_K"]
    ours = convert(str(model), qtypes, tmp_path, n_threads=2, progress=False)  # one read, four files
    source = llama_cpp_convert(model, SOURCE_PRECISION[family], tmp_path / "llama.cpp-source.gguf")
    for qtype, path in zip(qtypes, ours):
        assert_same_tensors(path, llama_cpp_quantize(source, tmp_path / f"llama.cpp-{qtype}.gguf", qtype))
    # The default mix, not --pure: q4_0 keeps output.weight in Q6_K and norms in F32.
    q4 = gguf_tensors(ours[1])
    assert q4["output.weight"][0] == "Q6_K"
    assert q4["blk.0.attn_q.weight"][0] == "Q4_0"
    assert q4["blk.0.attn_norm.weight"][0] == "F32"


def test_adapter_merged_on_the_fly_equals_merge_then_convert(tiny_mistral, mistral_adapter, tmp_path):
    on_the_fly = convert(str(tiny_mistral), ["q8_0"], tmp_path / "a", adapter=str(mistral_adapter),
                         n_threads=2, progress=False)[0]
    merged = merge(tiny_mistral, mistral_adapter, tmp_path / "merged")
    two_step = convert(str(merged), ["q8_0"], tmp_path / "b", n_threads=2, progress=False)[0]
    assert gguf_tensors(on_the_fly) == gguf_tensors(two_step)
    base_only = convert(str(tiny_mistral), ["q8_0"], tmp_path / "c", n_threads=2, progress=False)[0]
    assert gguf_tensors(base_only)["blk.0.attn_q.weight"] != gguf_tensors(on_the_fly)["blk.0.attn_q.weight"]


def test_real_weights_smollm2_match_llama_cpp(smollm2, tmp_path):
    """SmolLM2-135M: real weights, GQA, tied embeddings (token_embd takes the output's type), 576-wide rows."""
    ours = convert(str(smollm2), ["f16", "q8_0", "q4_0"], tmp_path, n_threads=2, progress=False)
    assert_same_tensors(ours[0], llama_cpp_convert(smollm2, "f16", tmp_path / "llama.cpp-f16.gguf"))
    source = llama_cpp_convert(smollm2, "f32", tmp_path / "llama.cpp-f32.gguf")
    for qtype, path in zip(["q8_0", "q4_0"], ours[1:]):
        assert_same_tensors(path, llama_cpp_quantize(source, tmp_path / f"llama.cpp-{qtype}.gguf", qtype))
    # 576 is not a multiple of 256, so llama.cpp falls back from Q6_K to Q8_0 for the tied embedding.
    assert gguf_tensors(ours[2])["token_embd.weight"][0] == "Q8_0"
