"""`komt-edge merge` equals peft's merge_and_unload, streams into shards, and refuses adapters that don't fit."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from komt_edge.errors import KomtError
from komt_edge.merge import merge


def _peft_merged(base, adapter, dtype):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


@pytest.mark.parametrize("family,dtype", [("mistral", torch.bfloat16), ("llama", torch.float32)])
def test_merge_equals_peft_merge_and_unload(family, dtype, request, tmp_path):
    base = request.getfixturevalue(f"tiny_{family}")
    adapter = request.getfixturevalue(f"{family}_adapter")
    out = merge(base, adapter, tmp_path / "merged")
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    ref = _peft_merged(base, adapter, dtype)
    a, b = ours.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == dtype
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    ids = torch.tensor([[1, 3000, 12000, 28000, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours.float()(ids).logits, ref.float()(ids).logits, rtol=0, atol=1e-4)
    # the tokenizer travels with the weights, tokenizer.model included
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()


def test_merge_writes_shards_with_an_index(tiny_mistral, mistral_adapter, tmp_path):
    out = merge(tiny_mistral, mistral_adapter, tmp_path / "sharded", max_shard_size="8MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    AutoModelForCausalLM.from_pretrained(out)  # transformers loads the sharded result


def test_adapter_for_another_base_is_refused(tiny_mistral, llama_adapter, tmp_path):
    with pytest.raises(KomtError, match="does not fit"):
        merge(tiny_mistral, llama_adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantized_base_is_refused(tiny_mistral, mistral_adapter, tmp_path):
    import shutil

    base = tmp_path / "bnb-base"
    shutil.copytree(tiny_mistral, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KomtError, match="full-precision base"):
        merge(base, mistral_adapter, tmp_path / "out")


def test_fan_in_fan_out_on_linear_layers_merges_as_peft_does(tiny_mistral, mistral_adapter, tmp_path, capsys):
    """peft ignores fan_in_fan_out on nn.Linear (it is for GPT-2's Conv1D) and warns; komt-edge does the same."""
    import shutil
    import warnings

    adapter = tmp_path / "fifo-lora"
    shutil.copytree(mistral_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    out = merge(tiny_mistral, adapter, tmp_path / "merged")
    assert "fan_in_fan_out" in capsys.readouterr().err
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _peft_merged(tiny_mistral, adapter, torch.bfloat16).state_dict()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.bfloat16).state_dict()
    changed = sum(not torch.equal(base[n], ours[n]) for n in base)
    assert changed >= 14  # q/k/v/o/gate/up/down of both layers were merged, not skipped


@pytest.mark.parametrize("variant", ["rslora", "rank_and_alpha_pattern", "modules_to_save"])
def test_peft_variants_merge_like_peft(variant, tiny_llama, tmp_path):
    """rsLoRA (scale α/√r), per-module rank_pattern / alpha_pattern, and modules_to_save (a full replacement
    tensor) merge exactly as peft's merge_and_unload does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    if variant == "rslora":
        kwargs["use_rslora"] = True
    elif variant == "rank_and_alpha_pattern":
        kwargs.update(rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 2},
                      alpha_pattern={"down_proj": 64, "layers.0.self_attn.q_proj": 3})
    else:
        kwargs["modules_to_save"] = ["lm_head"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), LoraConfig(**kwargs))
    if variant == "modules_to_save":
        with torch.no_grad():
            saved = model.base_model.model.lm_head.modules_to_save["default"].weight
            saved.add_(torch.randn_like(saved) * 0.05)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    if variant == "rslora":
        assert config["use_rslora"] is True
    elif variant == "rank_and_alpha_pattern":
        assert config["rank_pattern"] and config["alpha_pattern"]
    else:
        assert config["modules_to_save"] == ["lm_head"]

    out = merge(tiny_llama, adapter, tmp_path / "merged")
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    ref = _peft_merged(tiny_llama, adapter, torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    assert sorted(ours) == sorted(ref)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-6)
    changed = {n for n in ours if not torch.equal(ref[n], base[n])}
    if variant == "modules_to_save":
        assert "lm_head.weight" in changed
    assert "model.layers.1.self_attn.q_proj.weight" in changed and "model.layers.0.mlp.down_proj.weight" in changed


@pytest.mark.parametrize("rows,cols,dtype", [(6000, 96, torch.bfloat16), (4200, 64, torch.float16),
                                             (7000, 40, torch.float32), (7, 33, torch.bfloat16),
                                             (3, 300_000, torch.bfloat16)])
def test_merged_weight_is_the_plain_formula_bit_for_bit(rows, cols, dtype):
    """The row-blocked merge (a cache-sized block at a time) gives the bits of the one-shot formula."""
    from komt_edge.merge import MERGE_BLOCK_ELEMENTS, LoraPair, merged_weight
    from komt_edge.tensor_pipeline import BufferPool

    step = max(1, MERGE_BLOCK_ELEMENTS // cols)
    assert rows > step or rows < 16  # several blocks, a partial last one, a single short one, or a row a block
    g = torch.Generator().manual_seed(rows)
    base = torch.randn(rows, cols, generator=g).to(dtype)
    pair = LoraPair(a=(torch.randn(8, cols, generator=g) * 0.05).to(dtype),
                    b=(torch.randn(rows, 8, generator=g) * 0.05).to(dtype), scale=32 / 8 * 0.37)
    plain = (base.to(torch.float32) + (pair.b.to(torch.float32) @ pair.a.to(torch.float32)) * pair.scale).to(dtype)
    assert torch.equal(merged_weight(base, pair).view(torch.uint8), plain.view(torch.uint8))
    pooled = merged_weight(base, pair, BufferPool(min_bytes=0))
    assert torch.equal(pooled.view(torch.uint8), plain.view(torch.uint8))


def test_merge_threads_keep_the_bits_and_the_callers_setting(tiny_mistral, mistral_adapter, tmp_path):
    """-t chooses the torch threads of the arithmetic only: the same bytes with 1 or 2, and the caller's torch thread
    count is back afterwards."""
    before = torch.get_num_threads()
    one = merge(tiny_mistral, mistral_adapter, tmp_path / "one", n_threads=1)
    assert torch.get_num_threads() == before
    two = merge(tiny_mistral, mistral_adapter, tmp_path / "two", n_threads=2)
    assert torch.get_num_threads() == before
    shards = sorted(p.name for p in one.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in two.glob("*.safetensors"))
    assert all((one / s).read_bytes() == (two / s).read_bytes() for s in shards)
