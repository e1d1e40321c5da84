"""Bad input: a one-line error naming the problem and the fix, a non-zero exit, and no partial file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from .conftest import assert_one_line_error, run_cli


def assert_clean_failure(code: int, err: str, out_dir: Path | None, *needles: str) -> None:
    assert_one_line_error(code, err, *needles)
    if out_dir is not None and out_dir.exists():
        leftovers = [p.name for p in out_dir.iterdir()]
        assert not [n for n in leftovers if n.endswith(".gguf") or ".partial-" in n], leftovers


@pytest.fixture()
def model_copy(tiny_mistral, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_mistral, dst)
    return dst


def test_unknown_model_name(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "gguf", "komt-nonexistent-99b", "-o", str(tmp_path / "o"))
    assert_clean_failure(code, err, tmp_path / "o", "unknown MODEL", "komt-mistral-7b-v1")


def test_hub_unreachable_names_the_repo(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(monkeypatch, capsys, "gguf", "someorg/some-korean-model", "-o", str(tmp_path / "o"))
    assert_clean_failure(code, err, tmp_path / "o", "someorg/some-korean-model")


def test_truncated_safetensors(monkeypatch, capsys, model_copy, tmp_path):
    shard = model_copy / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model_copy), "-o", str(tmp_path / "o"))
    assert_clean_failure(code, err, tmp_path / "o", "truncated", "re-download")


def test_adapter_for_another_base(monkeypatch, capsys, tiny_mistral, llama_adapter, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "--adapter", str(llama_adapter),
                           "-o", str(tmp_path / "o"))
    assert_clean_failure(code, err, tmp_path / "o", "does not fit")


def test_missing_tokenizer(monkeypatch, capsys, model_copy, tmp_path):
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (model_copy / name).unlink()
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model_copy), "-o", str(tmp_path / "o"))
    assert_clean_failure(code, err, tmp_path / "o", "no tokenizer", "tokenizer.model")


def test_unsupported_architecture(monkeypatch, capsys, model_copy, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model_copy), "-o", str(tmp_path / "o"))
    assert_clean_failure(code, err, tmp_path / "o", "unsupported architecture", "GPT2LMHeadModel")


def test_unwritable_output_folder(monkeypatch, capsys, tiny_mistral, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "-o", str(blocker / "out"))
    assert_clean_failure(code, err, None, "cannot create the output folder", "-o")


def test_disk_full_leaves_no_partial_file(monkeypatch, capsys, tiny_mistral, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    # The temporary file komt-edge writes first is a link to /dev/full: every write fails with ENOSPC.
    partial = out / f".komt-tiny-Q8_0.gguf.partial-{os.getpid()}"
    partial.symlink_to("/dev/full")
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "-q", "q8_0", "--name", "komt-tiny",
                           "-o", str(out))
    assert_clean_failure(code, err, out, "no space left")
    assert not (out / "komt-tiny-Q8_0.gguf").exists() and not partial.exists()


def test_pickle_weights_need_the_flag_and_load_weights_only(monkeypatch, capsys, tiny_mistral, tmp_path):
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_mistral, model, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(tiny_mistral / "model.safetensors")), model / "pytorch_model.bin")
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model), "-o", str(tmp_path / "o"))
    assert_clean_failure(code, err, tmp_path / "o", "--allow-pickle")
    code, out, err = run_cli(monkeypatch, capsys, "gguf", str(model), "-q", "q8_0", "--allow-pickle",
                             "-o", str(tmp_path / "o"))
    assert code == 0, err
    assert Path(out.strip()).name == "pickled-Q8_0.gguf"


def test_malicious_pickle_is_refused(monkeypatch, capsys, tiny_mistral, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    model = tmp_path / "evil"
    shutil.copytree(tiny_mistral, model, ignore=shutil.ignore_patterns("*.safetensors"))
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model), "--allow-pickle", "-o", str(tmp_path / "o"))
    assert_clean_failure(code, err, tmp_path / "o", "could not be loaded safely")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("qtype,needle", [("q9_9", "unknown quantization type"),
                                          ("iq2_xxs", "importance matrix")])
def test_bad_quant_types(monkeypatch, capsys, tiny_mistral, tmp_path, qtype, needle):
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "-q", qtype, "-o", str(tmp_path / "o"))
    assert_clean_failure(code, err, tmp_path / "o", needle)


def test_verify_missing_file(monkeypatch, capsys, tiny_mistral, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "verify", str(tmp_path / "nope.gguf"), "--hf", str(tiny_mistral))
    assert_clean_failure(code, err, None, "does not exist")


def test_verify_exits_nonzero_when_a_bound_fails(monkeypatch, capsys, tiny_mistral, tmp_path):
    path = tmp_path / "komt-tiny-Q4_0.gguf"
    code, out, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "-q", "q4_0", "--name", "komt-tiny",
                             "-o", str(tmp_path))
    assert code == 0 and path.is_file(), err
    code, out, err = run_cli(monkeypatch, capsys, "verify", str(path), "--hf", str(tiny_mistral), "--threads", "1",
                             "--max-kl", "1e-9", "--json", str(tmp_path / "report.json"))
    assert "FAIL" in out
    assert_clean_failure(code, err, None, "verification failed", "komt-tiny-Q4_0.gguf")
    assert json.loads((tmp_path / "report.json").read_text())[0]["passed"] is False
