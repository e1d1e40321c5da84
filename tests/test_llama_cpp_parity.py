"""komt-edge's GGUF files are tensor-for-tensor identical to llama.cpp's own path from the same checkpoint.

f16/f32: convert_hf_to_gguf.py --outtype f16|f32. Quantized types: convert to the source precision (bf16 or f32)
with convert_hf_to_gguf.py, then llama-quantize with its default per-tensor mix (llama_model_quantize).
"""

from __future__ import annotations

import pytest

from komt_edge.gguf import convert
from komt_edge.merge import merge

from .conftest import assert_same_tensors, gguf_tensors
from .identity import assert_identical

SOURCE_PRECISION = {"mistral": "bf16", "llama": "f32"}


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_float_types_match_convert_hf_to_gguf(family, request, llama_cpp_ref, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    ours = convert(str(model), ["f16", "f32"], tmp_path, n_threads=2, progress=False)
    for qtype, path in zip(["f16", "f32"], ours):
        assert_identical(path, llama_cpp_ref.convert(model, qtype))


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_quantized_types_match_llama_quantize_default_mix(family, request, llama_cpp_ref, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    qtypes = ["q8_0", "q4_0", "q4_K_M", "q6_K"]
    ours = convert(str(model), qtypes, tmp_path, n_threads=2, progress=False)  # one read, four files
    for qtype, path in zip(qtypes, ours):
        assert_identical(path, llama_cpp_ref.quantize(model, SOURCE_PRECISION[family], qtype))
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


def test_real_weights_smollm2_match_llama_cpp(smollm2, llama_cpp_ref, tmp_path):
    """SmolLM2-135M: real weights, GQA, tied embeddings (token_embd takes the output's type), 576-wide rows."""
    ours = convert(str(smollm2), ["f16", "q8_0", "q4_0"], tmp_path, n_threads=2, progress=False)
    assert_identical(ours[0], llama_cpp_ref.convert(smollm2, "f16"))
    for qtype, path in zip(["q8_0", "q4_0"], ours[1:]):
        assert_identical(path, llama_cpp_ref.quantize(smollm2, "f32", qtype))
    # 576 is not a multiple of 256, so llama.cpp falls back from Q6_K to Q8_0 for the tied embedding.
    assert gguf_tensors(ours[2])["token_embd.weight"][0] == "Q8_0"


def test_quantize_all_is_quantize_of_the_widened_tensor_for_every_type():
    """The converter's one pass (a block at a time, widened in cache, every type) writes the bytes of widening the
    whole tensor and quantizing it type by type: bf16 bits, f16 and f32 sources, a permuted strided view, a 1-D
    tensor and float output types among quantized ones."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from komt_edge.converters import quantize as q
    from komt_edge.converters.hf_to_gguf import Converter, _permuted_view

    QT = q.GGMLQuantizationType
    types = [QT.Q4_0, QT.Q8_0, QT.F16, QT.Q6_K, QT.F32]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 768, generator=g) * 0.05  # 1.2 M weights: two blocks, the second partial
    sources = [weight.to(torch.bfloat16), weight.to(torch.float16), weight,
               _permuted_view(weight.to(torch.bfloat16), 8), torch.randn(3 * 256, generator=g).to(torch.bfloat16)]
    with ThreadPoolExecutor(2) as pool:
        for source in sources:
            flat = source.to(torch.float32).contiguous().reshape(-1, source.shape[-1]).numpy()
            got = Converter.encode(source, types, pool)
            for t, arr in zip(types, got):
                want = q.quantize(flat, t)
                assert arr.tobytes() == want.tobytes(), (source.dtype, tuple(source.shape), t.name)
