"""The layer-streamed HF reference equals the whole model in memory, and holds one decoder layer at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from komt_edge.layer_reference import materialized_parameters, streamed_logits, whole_model_logits

TOL = 1e-4  # max |Δlogit| in float32


def _prompts(vocab: int, bos: int = 1) -> list[list[int]]:
    # one short prompt, one longer than the tiny Gemma 3's 64-token sliding window
    return [[bos, 100, 200, 300, 4000 % vocab, 5, 6], [bos] + [(17 * k + 3) % vocab for k in range(90)]]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    assert all(x.dtype == np.float32 for x in a)
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _from_pretrained_f32(folder: Path, prompts) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].numpy() for ids in prompts]


@pytest.fixture(scope="module")
def gemma3_adapter(tiny_gemma3, tmp_path_factory) -> Path:
    """A random (non-zero B) LoRA adapter on every Gemma 3 projection, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    out = tmp_path_factory.mktemp("lora") / "gemma3-lora"
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory) -> Path:
    """Google's Gemma 3 270M from the gemma3-270m package (its Q4_K_M GGUF, dequantized to float32)."""
    from komt_edge.bench.gemma import export_gemma3

    return export_gemma3(tmp_path_factory.mktemp("real") / "gemma3-270m")


@pytest.mark.parametrize("family", ["mistral", "llama", "gemma3"])
def test_streamed_equals_the_whole_model_in_float32(family, request):
    folder = request.getfixturevalue({"mistral": "tiny_mistral", "llama": "tiny_llama",
                                      "gemma3": "tiny_gemma3"}[family])
    prompts = _prompts(8192 if family == "gemma3" else 32000, bos=2 if family == "gemma3" else 1)
    ours = streamed_logits(folder, prompts, progress=False)
    assert _max_diff(ours, _from_pretrained_f32(folder, prompts)) <= TOL


@pytest.mark.parametrize("family", ["mistral", "llama", "gemma3"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_streamed_adapter_equals_peft(family, merge, request):
    """Merged: peft's merge_and_unload in the checkpoint's dtype (bf16 for mistral and gemma3, f32 for llama),
    then float32. Unmerged: peft's LoRA layers on the float32 base, as llama.cpp applies a LoRA file."""
    base, adapter = {"mistral": ("tiny_mistral", "mistral_adapter"), "llama": ("tiny_llama", "llama_adapter"),
                     "gemma3": ("tiny_gemma3", "gemma3_adapter")}[family]
    base, adapter = request.getfixturevalue(base), request.getfixturevalue(adapter)
    prompts = _prompts(8192 if family == "gemma3" else 32000, bos=2 if family == "gemma3" else 1)
    ours = streamed_logits(base, prompts, adapter=adapter, merge_in_base_dtype=merge, progress=False)
    theirs = whole_model_logits(base, prompts, adapter=adapter, merge=merge)
    assert _max_diff(ours, theirs) <= TOL
    # the adapter changes the logits by far more than the tolerance: it was applied
    assert _max_diff(ours, streamed_logits(base, prompts, progress=False)) > 100 * TOL


def test_streamed_bfloat16_equals_the_whole_model_cast(tiny_mistral, mistral_adapter):
    prompts = _prompts(32000)
    for merge in (True, False):
        ours = streamed_logits(tiny_mistral, prompts, dtype="bfloat16", adapter=mistral_adapter,
                               merge_in_base_dtype=merge, progress=False)
        theirs = whole_model_logits(tiny_mistral, prompts, dtype="bfloat16", adapter=mistral_adapter, merge=merge)
        assert _max_diff(ours, theirs) <= TOL


def test_gemma3_270m_real_weights(gemma3_270m):
    """Gemma 3 270M (sliding and full layers, scaled and tied embedding, 1 + w norms), on Korean text."""
    from komt_edge.verify import KOREAN_PROMPTS, ReferenceTokenizer

    tok = ReferenceTokenizer(gemma3_270m)
    prompts = [tok.encode(p) for p in KOREAN_PROMPTS[:2]]
    ours = streamed_logits(gemma3_270m, prompts, progress=False)
    assert _max_diff(ours, _from_pretrained_f32(gemma3_270m, prompts)) <= TOL


def test_one_decoder_layer_is_materialized_at_a_time(tiny_gemma3, gemma3_adapter):
    seen = []

    def on_layer(i, model):
        layers = model.get_decoder().layers
        real = [j for j, layer in enumerate(layers) if materialized_parameters(layer)]
        seen.append(i)
        assert real == [i], f"while layer {i} runs, layers {real} hold real parameters"
        # besides that layer, only the embedding (tied to the output: it is needed at the end) is real
        assert materialized_parameters(model) == (materialized_parameters(layers[i])
                                                  + model.get_input_embeddings().weight.numel())

    streamed_logits(tiny_gemma3, _prompts(8192, bos=2), adapter=gemma3_adapter, progress=False, on_layer=on_layer)
    assert seen == [0, 1, 2]


def test_untied_input_embedding_is_freed_after_the_capture(tiny_mistral):
    sizes = []
    streamed_logits(tiny_mistral, _prompts(32000), progress=False,
                    on_layer=lambda i, model: sizes.append(
                        (materialized_parameters(model), materialized_parameters(model.get_decoder().layers[i]))))
    assert sizes and all(total == layer for total, layer in sizes)  # no embedding, no other layer


def test_no_log_noise_and_a_layer_progress_bar(tiny_mistral, capfd):
    streamed_logits(tiny_mistral, _prompts(32000), progress=False)  # imports done
    capfd.readouterr()
    streamed_logits(tiny_mistral, _prompts(32000), progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    streamed_logits(tiny_mistral, _prompts(32000), progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "reference" in err and "layer" in err


def test_load_reference_streams_and_never_loads_the_whole_model(tiny_mistral, mistral_adapter, monkeypatch):
    import transformers

    from komt_edge.verify import load_reference

    def forbidden(*args, **kwargs):
        raise AssertionError("load_reference loaded the whole model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    refs = {merge: load_reference(str(tiny_mistral), adapter=str(mistral_adapter), template="mistral",
                                  merge_adapter=merge, progress=False) for merge in (True, False)}
    monkeypatch.undo()
    for merge, ref in refs.items():
        assert len(ref.prompt_ids) == len(ref.logits) == 3
        theirs = whole_model_logits(tiny_mistral, ref.prompt_ids, adapter=mistral_adapter, merge=merge)
        assert _max_diff(ref.logits, theirs) <= TOL


def test_bad_inputs_are_one_line_errors(tiny_mistral, llama_adapter, tmp_path):
    import json
    import shutil

    from komt_edge.errors import KomtError

    quantized = tmp_path / "gptq"
    shutil.copytree(tiny_mistral, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(KomtError, match="quantized checkpoint .gptq."):
        streamed_logits(quantized, [[1, 2]], progress=False)

    with pytest.raises(KomtError, match="dtype"):
        streamed_logits(tiny_mistral, [[1, 2]], dtype="int8", progress=False)
    with pytest.raises(KomtError, match="at least one token"):
        streamed_logits(tiny_mistral, [[]], progress=False)
    with pytest.raises(KomtError, match="does not fit"):  # a llama adapter (4 kv heads) on the mistral base (2)
        streamed_logits(tiny_mistral, [[1, 2]], adapter=llama_adapter, progress=False)
