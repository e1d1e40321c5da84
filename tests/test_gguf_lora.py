"""`komt-edge gguf-lora`: llama.cpp's LoRA adapter GGUF, tensor-identical to llama.cpp's convert_lora_to_gguf.py,
and applied by llama.cpp at run time like the HF base + peft adapter (`komt-edge verify --lora`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import N_THREADS, assert_same_tensors, gguf_field, llama_cpp_script, run_cli
from .identity import LORA_EXCEPTIONS, assert_identical

TRAIN_DATA = Path(__file__).parent / "data" / "ko_instruct.jsonl"


def llama_cpp_convert_lora(adapter: Path, base: Path, outtype: str, out: Path) -> Path:
    """llama.cpp's convert_lora_to_gguf.py from the pinned sdist (unpacked by `make install`)."""
    llama_cpp_script("convert_lora_to_gguf.py", adapter, "--base", base, "--outtype", outtype, "--outfile", out)
    return out


def _f_gguf(model: Path, qtype: str, out: Path) -> Path:
    from komt_edge.gguf import convert

    return convert(str(model), [qtype], out, n_threads=N_THREADS, progress=False)[0]


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_tensor_identical_to_llama_cpp(family, outtype, request, tmp_path):
    from komt_edge.gguf_lora import gguf_lora

    base, adapter = request.getfixturevalue(f"tiny_{family}"), request.getfixturevalue(f"{family}_adapter")
    result = gguf_lora(adapter, tmp_path / "o", outtype=outtype, progress=False)  # base from adapter_config.json
    assert result.path.name == f"{adapter.name}-LoRA-{outtype.upper()}.gguf"
    theirs = llama_cpp_convert_lora(adapter, base, outtype, tmp_path / "theirs.gguf")
    assert_identical(result.path, theirs, ignore=LORA_EXCEPTIONS)
    for key, want in (("general.type", "adapter"), ("general.architecture", "llama"), ("adapter.type", "lora"),
                      ("adapter.lora.alpha", 32.0)):
        assert gguf_field(result.path, key) == want == gguf_field(theirs, key), key
    assert result.tensors == 14 and result.ranks == [8] and result.folded == 0


@pytest.mark.train
def test_adapter_from_komt_edge_train_is_identical(tiny_llama, tmp_path):
    from komt_edge.gguf_lora import gguf_lora
    from komt_edge.train import train

    out = tmp_path / "my-lora"
    train(str(tiny_llama), TRAIN_DATA, out, max_steps=2, eval_split=0.0, lr=3e-3, batch_size=4, max_length=96,
          warmup_steps=1, progress=False, log=lambda *_: None)
    for outtype in ("f16", "q8_0"):
        result = gguf_lora(out, tmp_path / "o", outtype=outtype, progress=False)
        assert result.path.name == f"my-lora-LoRA-{outtype.upper()}.gguf"
        assert_identical(result.path, llama_cpp_convert_lora(out, tiny_llama, outtype, tmp_path / "t.gguf"),
                         ignore=LORA_EXCEPTIONS)


def _peft_adapter(base: Path, out: Path, **lora_kwargs) -> Path:
    """A peft adapter with random A and B (init_lora_weights=False), saved as peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a delta the size of a trained one, so the logits stay comparable
    peft_model.save_pretrained(out)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    return out


def test_rslora_and_patterns_are_folded_exactly(tiny_mistral, tmp_path):
    """rsLoRA (alpha/√r), alpha_pattern and rank_pattern: llama.cpp's scale (file alpha / each tensor's rank) times
    the stored B equals peft's scale × B for every module; llama.cpp's own converter writes lora_alpha and gets the
    scale wrong, which verify catches, while ours passes the f32 bounds at run time."""
    from gguf import GGUFReader

    from komt_edge.converters.hf_to_gguf import permute_qk
    from komt_edge.gguf_lora import gguf_lora
    from komt_edge.merge import load_adapter
    from komt_edge.verify import load_reference, verify

    adapter = _peft_adapter(tiny_mistral, tmp_path / "rs-lora", use_rslora=True, rank_pattern={"q_proj": 4},
                            alpha_pattern={"v_proj": 8})
    result = gguf_lora(adapter, tmp_path / "o", outtype="f32", progress=False)
    assert result.ranks == [4, 8] and result.folded > 0
    reader = GGUFReader(result.path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    pairs = load_adapter(adapter).pairs
    layer = {"q_proj": ("attn_q", 4), "k_proj": ("attn_k", 2), "v_proj": ("attn_v", None),
             "o_proj": ("attn_output", None), "gate_proj": ("ffn_gate", None), "up_proj": ("ffn_up", None),
             "down_proj": ("ffn_down", None)}
    for hf_name, pair in pairs.items():
        i, proj = int(hf_name.split(".")[2]), hf_name.split(".")[-2]
        peft_scale = 32 / pair.a.shape[0] ** 0.5 * (8 / 32 if proj == "v_proj" else 1)  # rsLoRA, alpha_pattern
        assert pair.scale == pytest.approx(peft_scale, rel=1e-12)
        want = pair.scale * pair.b.double() @ pair.a.double()
        if layer[proj][1]:
            want = permute_qk(want, layer[proj][1])
        a = tensors[f"blk.{i}.{layer[proj][0]}.weight.lora_a"].astype(np.float64)
        b = tensors[f"blk.{i}.{layer[proj][0]}.weight.lora_b"].astype(np.float64)
        got = np.float32(alpha) / np.float32(b.shape[1]) * (b @ a)
        # float32 rounding of the folded B: about 1e-7 of the delta's size (a wrong scale is off by ≥ 40%)
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6 * float(want.abs().max()), err_msg=hf_name)

    base = _f_gguf(tiny_mistral, "f32", tmp_path / "base")
    ref = load_reference(str(tiny_mistral), adapter=str(adapter), merge_adapter=False)
    ours = verify(base, str(tiny_mistral), reference=ref, lora=result.path, n_threads=N_THREADS, max_new_tokens=4)
    assert ours.passed, ours.summary()
    theirs = llama_cpp_convert_lora(adapter, tiny_mistral, "f32", tmp_path / "theirs.gguf")
    wrong = verify(base, str(tiny_mistral), reference=ref, lora=theirs, n_threads=N_THREADS, max_new_tokens=4)
    assert not wrong.logits.passed, wrong.summary()


def test_runtime_lora_verifies_and_a_wrong_alpha_or_permutation_fails(tiny_mistral, mistral_adapter, tmp_path):
    """f16 base + f16 adapter, applied by llama.cpp, is within the f16 bounds of HF base + peft adapter; the same
    adapter with twice the alpha, or without the q/k rotary permutation of lora_b, fails them."""
    from komt_edge.converters.lora_to_gguf import LoraConverter
    from komt_edge.gguf_lora import gguf_lora
    from komt_edge.merge import load_adapter
    from komt_edge.verify import load_reference, verify

    base = _f_gguf(tiny_mistral, "f16", tmp_path / "base")
    good = gguf_lora(mistral_adapter, tmp_path / "o", outtype="f16", progress=False).path
    ref = load_reference(str(tiny_mistral), adapter=str(mistral_adapter), merge_adapter=False)
    report = verify(base, str(tiny_mistral), reference=ref, lora=good, n_threads=N_THREADS, max_new_tokens=4)
    assert report.file_type == "MOSTLY_F16" and report.logits.bounds.max_abs == 0.1
    assert report.passed, report.summary()

    doubled = tmp_path / "doubled"
    shutil.copytree(mistral_adapter, doubled)
    cfg = json.loads((doubled / "adapter_config.json").read_text())
    (doubled / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 2 * cfg["lora_alpha"]}))
    wrong_alpha = gguf_lora(doubled, tmp_path / "o", outtype="f16", progress=False).path

    conv = LoraConverter(load_adapter(mistral_adapter), json.loads((tiny_mistral / "config.json").read_text()),
                         tiny_mistral)
    conv.tensors = [dataclasses.replace(t, permute_heads=None) for t in conv.tensors]
    unpermuted = conv.write(tmp_path / "o" / "unpermuted.gguf", "f16", name="unpermuted", base_models=[],
                            tool_version="test")
    for bad in (wrong_alpha, unpermuted):
        report = verify(base, str(tiny_mistral), reference=ref, lora=bad, n_threads=N_THREADS, max_new_tokens=4)
        assert not report.logits.passed, f"{bad.name} passed: {report.summary()}"


def test_cli_writes_reruns_and_verifies(monkeypatch, capsys, tiny_llama, llama_adapter, tmp_path):
    out = tmp_path / "o"
    args = ["gguf-lora", str(llama_adapter), "--base", str(tiny_llama), "--outtype", "q8_0", "--name", "komt-tiny",
            "-o", str(out)]
    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    path = out / "komt-tiny-LoRA-Q8_0.gguf"
    assert str(path) in stdout and json.loads((tmp_path / "r.json").read_text())["path"] == str(path)
    code, _, err = run_cli(monkeypatch, capsys, *args)  # a re-run replaces its own file
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [path.name]
    base = _f_gguf(tiny_llama, "f16", tmp_path / "base")
    code, stdout, err = run_cli(monkeypatch, capsys, "verify", str(base), "--lora", str(path), "--hf", str(tiny_llama),
                                "--adapter", str(llama_adapter), "-t", "1")
    assert code == 0, err
    assert "+ komt-tiny-LoRA-Q8_0.gguf (MOSTLY_F16)" in stdout and "PASS" in stdout
