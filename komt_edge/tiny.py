"""Tiny komt-shaped models built offline: the embedded default for `make demo`, and the tests' fixtures.

The weights are random, but everything around them is real: the Mistral v0.1 SentencePiece tokenizer (the
komt-mistral tokenizer) that the PyPI package mistral-common ships, komt's tokenizer files and quirks (the
``[PAD]`` token at 32000 and a special_tokens_map with bos = eos = unk = ``</s>`` for the llama family), and a
LoRA adapter made with peft, as komt publishes its models.
"""

from __future__ import annotations

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import torch

from .errors import KomtError

TINY_CONFIGS = {
    # hidden 256 keeps every llama.cpp block size (32 and 256) in play; GQA like Mistral 7B.
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=256,
                    intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                    vocab_size=32000, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
                  intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                  vocab_size=32001, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=32000),
}


def mistral_tokenizer_model() -> Path:
    """The Mistral-7B v0.1 SentencePiece model shipped by mistral-common (Apache-2.0)."""
    spec = find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise KomtError("the demo needs the mistral-common package for its real tokenizer: "
                        "pip install --no-deps mistral-common (make install does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise KomtError(f"{path} is missing: reinstall mistral-common")
    return path


def write_tokenizer(folder: Path, family: str) -> None:
    """tokenizer.model plus explicit tokenizer files, as komt ships them."""
    folder = Path(folder)
    shutil.copyfile(mistral_tokenizer_model(), folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 2048}
    if family == "llama":
        # komt-llama2: an added [PAD] at id 32000, and every special token mapped to </s>.
        config.update(pad_token="[PAD]", added_tokens_decoder={
            "32000": {"content": "[PAD]", "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False}})
        (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": 32000}))
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"}))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_tiny_model(out: Path, family: str = "mistral", *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     num_hidden_layers: int | None = None) -> Path:
    """A random komt-shaped model saved like a Hub checkpoint (safetensors, config, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(TINY_CONFIGS[family])
    if num_hidden_layers:
        cfg_dict["num_hidden_layers"] = num_hidden_layers
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model = model.to(dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, family)
    return out


def build_tiny_adapter(base: Path, out: Path, *, seed: int = 1, r: int = 8, alpha: int = 32) -> Path:
    """A komt-recipe LoRA adapter (r=8, alpha=32, q/k/v/o/gate/up/down) with non-zero B, saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    out = Path(out)
    peft_model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2))
    return out
