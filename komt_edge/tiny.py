"""Tiny komt-shaped models built offline: the embedded default for `make demo`, and the tests' fixtures.

The weights are random, but everything around them is real: the Mistral v0.1 SentencePiece tokenizer (the
komt-mistral tokenizer) that the PyPI package mistral-common ships, komt's tokenizer files and quirks (the
``[PAD]`` token at 32000 and a special_tokens_map with bos = eos = unk = ``</s>`` for the llama family), and a
LoRA adapter made with peft, as komt publishes its models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import KomtError
from .util import package_dir

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
    package = package_dir("mistral_common", missing="the demo needs the mistral-common package for its real "
                          "tokenizer: pip install --no-deps mistral-common (make install does this)")
    path = package / "data" / "tokenizer.model.v1"
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
                     num_hidden_layers: int | None = None, init_std: float = 0.08) -> Path:
    """A random komt-shaped model saved like a Hub checkpoint (safetensors, config, tokenizer)."""
    from transformers import AutoConfig

    cfg_dict = dict(TINY_CONFIGS[family])
    if num_hidden_layers:
        cfg_dict["num_hidden_layers"] = num_hidden_layers
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    out = save_random_model(config, out, seed=seed, dtype=dtype, init_std=init_std)
    write_tokenizer(out, family)
    return out


def save_random_model(config, out: Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      init_std: float = 0.08) -> Path:
    """Random weights for a transformers ``config`` (norms near 1, the rest N(0, init_std)), saved as safetensors
    in ``dtype``: the weights of every tiny test model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, init_std)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    return out


# What the demo adapter teaches: komt-style Korean answers to the verify prompts, in the model's template.
DEMO_QA: tuple[tuple[str, str], ...] = (
    ("한국의 사계절에 대해 설명해 주세요.",
     "한국은 봄, 여름, 가을, 겨울의 사계절이 뚜렷합니다. 봄에는 꽃이 피고 여름은 덥고 비가 많이 옵니다."),
    ("다음 문장을 영어로 번역하세요: 저는 매일 아침 커피를 마십니다.", "I drink coffee every morning."),
    ("인공지능이 우리 생활에 미치는 영향은 무엇인가요?",
     "인공지능은 번역, 검색, 의료와 교육 등 우리 생활의 많은 부분을 바꾸고 있습니다."),
)


def build_tiny_adapter(base: Path, out: Path, family: str = "mistral", *, seed: int = 1, r: int = 8,
                       alpha: int = 32, steps: int = 40, lr: float = 1e-2) -> Path:
    """A komt-recipe LoRA adapter (r=8, alpha=32 on q/k/v/o/gate/up/down), trained for a few seconds so that
    the merged model answers DEMO_QA in Korean; saved by peft like komt's published adapters."""
    import sentencepiece as spm
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .templates import template_for

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    sp = spm.SentencePieceProcessor(model_file=str(Path(base) / "tokenizer.model"))
    tmpl = template_for(family)
    seqs = [[sp.bos_id(), *sp.encode(tmpl.format(q) + a), sp.eos_id()] for q, a in DEMO_QA]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [sp.eos_id()] * (width - len(s)) for s in seqs])
    labels = ids.clone()
    for i, s in enumerate(seqs):
        labels[i, len(s):] = -100
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = Path(out)
    peft_model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2))
    return out
