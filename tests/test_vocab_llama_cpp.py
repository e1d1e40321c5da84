"""komt-llama2's tokenizer layout converts as llama.cpp's convert_hf_to_gguf.py converts it.

komt's trainer adds ``[PAD]`` at id 32000 (added_tokens.json, tokenizer_config.json) and maps bos = eos = unk to
``</s>``; some of its checkpoints resized the embedding (``vocab_size`` 32001), others did not (32000, the
``[PAD]`` id past the embedding). llama.cpp drops an added token past the vocabulary with a warning; so does
komt-edge, and both write the same vocabulary and the same tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import assert_one_line_error, assert_same_tensors, gguf_field, llama_cpp_convert, run_cli
from .identity import assert_identical

VOCAB_FIELDS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")


def unresized(tiny_llama: Path, out: Path) -> Path:
    """tiny Llama as komt's trainer leaves it without resizing: [PAD] at 32000, a 32000-row embedding."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_llama, out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 32001
    config["vocab_size"] = 32000
    config.pop("pad_token_id", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for shard in out.glob("*.safetensors"):
        tensors = load_file(str(shard))
        save_file({k: v[:32000].contiguous() if v.shape[0] == 32001 else v for k, v in tensors.items()}, str(shard),
                  metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("vocab_size", [32001, 32000])
def test_komt_llama2_tokenizer_converts_like_llama_cpp(vocab_size, tiny_llama, llama_cpp_ref, tmp_path, monkeypatch,
                                                      capsys):
    model = tiny_llama if vocab_size == 32001 else unresized(tiny_llama, tmp_path / "llama-32000")
    assert json.loads((model / "added_tokens.json").read_text()) == {"[PAD]": 32000}
    special = json.loads((model / "special_tokens_map.json").read_text())
    assert special["bos_token"] == special["eos_token"] == special["unk_token"] == "</s>"

    code, out, err = run_cli(monkeypatch, capsys, "gguf", str(model), "-q", "f32", "-o", str(tmp_path / "ours"))
    assert code == 0, err
    ours = Path(out.strip().splitlines()[-1])
    theirs = (llama_cpp_ref.convert(model, "f32") if model == tiny_llama
              else llama_cpp_convert(model, "f32", tmp_path / "llama-cpp.gguf"))
    dropped = "added token '[PAD]' has id 32000, past the model's vocabulary"
    assert (dropped in err) == (vocab_size == 32000), err
    for key in VOCAB_FIELDS:
        assert gguf_field(ours, key) == gguf_field(theirs, key), key
    tokens = gguf_field(ours, "tokenizer.ggml.tokens")
    assert len(tokens) == vocab_size and tokens[2] == "</s>"
    assert ("[PAD]" in tokens) == (vocab_size == 32001)
    assert gguf_field(ours, "tokenizer.ggml.bos_token_id") == 1 and gguf_field(ours, "tokenizer.ggml.eos_token_id") == 2
    assert_identical(ours, theirs)


def test_added_token_inside_the_vocabulary_that_disagrees_is_refused(tiny_llama, tmp_path, monkeypatch, capsys):
    """An added token claiming an id the SentencePiece model gives to another piece stays refused."""
    model = tmp_path / "llama-clash"
    shutil.copytree(tiny_llama, model)
    (model / "added_tokens.json").write_text(json.dumps({"[PAD]": 31999}))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model), "-q", "f32", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "'[PAD]' claims id 31999", "the tokenizer files disagree")
    assert not any((tmp_path / "out").glob("*.gguf"))


def test_bpe_added_token_past_the_vocabulary_stays_refused(smollm2, tmp_path, monkeypatch, capsys):
    """A byte-level BPE tokenizer.json with an added token past vocab_size: llama.cpp's converter refuses it (its
    vocabulary check fails), and so does komt-edge, in one line, writing nothing."""
    import subprocess
    import sys

    from .conftest import LLAMA_SRC

    model = tmp_path / "smollm2-extra"
    shutil.copytree(smollm2, model)
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    tj = json.loads((model / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": vocab_size, "content": "<|extra|>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    (model / "tokenizer.json").write_text(json.dumps(tj))
    theirs = subprocess.run([sys.executable, str(LLAMA_SRC / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32",
                             "--outfile", str(tmp_path / "llama-cpp.gguf")], capture_output=True, text=True)
    assert theirs.returncode != 0 and "AssertionError" in theirs.stderr, theirs.stderr[-1000:]  # its vocab check
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model), "-q", "f32", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, f"vocab_size={vocab_size}", "the tokenizer does not belong to this model")
    assert not any((tmp_path / "out").glob("*.gguf"))
