"""Importance matrices: the statistics agree with an independent computation, the file is llama.cpp's, and
`gguf --imatrix` writes what llama-quantize --imatrix writes from llama.cpp's own conversion."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest

from komt_edge.gguf import convert
from komt_edge.imatrix import Imatrix, compute, korean_calibration_text

from .conftest import N_THREADS, assert_one_line_error, assert_same_tensors, gguf_field, run_cli
from .identity import IMATRIX_RECORD, assert_identical

SOURCE_PRECISION = {"mistral": "bf16", "llama": "f32"}
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
N_CTX, N_CHUNKS = 64, 3


@pytest.fixture(scope="module")
def korean_text() -> str:
    return korean_calibration_text()[0]


@pytest.fixture(scope="module")
def mistral_f32(tiny_mistral, tmp_path_factory):
    return convert(str(tiny_mistral), ["f32"], tmp_path_factory.mktemp("f32"), name="tiny", n_threads=N_THREADS,
                   progress=False)[0]


@pytest.fixture(scope="module")
def mistral_imatrix(mistral_f32, korean_text, tmp_path_factory):
    matrix = compute(mistral_f32, korean_text, dataset="korean test text", n_ctx=N_CTX, n_chunks=N_CHUNKS,
                     n_threads=N_THREADS, progress=False)
    return matrix.write(tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.gguf")


def _hf_sums(model_dir, chunks: list[list[int]]) -> dict[str, np.ndarray]:
    """Sums of squared inputs of every decoder-layer projection, from the Hugging Face model in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, np.ndarray] = {}

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().to(torch.float64).reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
        return record

    for i, layer in enumerate(model.model.layers):
        for hf, gguf_name in HF_TO_GGUF.items():
            layer.get_submodule(hf).register_forward_hook(hook(f"blk.{i}.{gguf_name}.weight"))
    with torch.no_grad():
        for ids in chunks:
            model(torch.tensor([ids]))
    return sums


def test_statistics_agree_with_an_independent_computation(tiny_mistral, mistral_f32, mistral_imatrix, korean_text):
    """llama.cpp's activations through the eval callback against the HF model's, on the same token chunks:
    every weight's mean squared input agrees to cosine ≥ 0.999 and norm within 1%; the counts are the tokens."""
    from komt_edge.llamacpp import LlamaRunner

    with LlamaRunner(mistral_f32, n_ctx=N_CTX, n_threads=N_THREADS) as runner:
        tokens = runner.tokenize(korean_text)
        bos = runner.bos
    chunks = [[bos, *tokens[i * N_CTX + 1:(i + 1) * N_CTX].tolist()] for i in range(N_CHUNKS)]
    reference = _hf_sums(tiny_mistral, chunks)
    matrix = Imatrix.read(mistral_imatrix)
    assert sorted(matrix.entries) == sorted(reference)  # every projection of every layer, nothing else
    for name, ref in reference.items():
        sums, counts = matrix.entries[name]
        assert counts.tolist() == [N_CTX * N_CHUNKS], name
        ours = sums.reshape(-1).astype(np.float64)
        cosine = ours @ ref / (np.linalg.norm(ours) * np.linalg.norm(ref))
        assert cosine >= 0.999, (name, cosine)
        assert abs(np.linalg.norm(ours) / np.linalg.norm(ref) - 1) <= 0.01, name
    assert matrix.chunk_count == N_CHUNKS and matrix.chunk_size == N_CTX
    assert matrix.datasets == ["korean test text"]


def test_file_is_llama_cpps_format_and_legacy_dat_reads(mistral_imatrix, tmp_path):
    from gguf import GGUFReader

    reader = GGUFReader(mistral_imatrix)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.chunk_count"].contents() == N_CHUNKS
    assert reader.fields["imatrix.chunk_size"].contents() == N_CTX
    names = [t.name for t in reader.tensors]
    assert names == sorted(names, key=lambda n: (n.rsplit(".", 1)[0], n.endswith(".counts")))
    t = {t.name: t for t in reader.tensors}
    assert t["blk.0.attn_q.weight.in_sum2"].shape.tolist() == [256, 1]  # ggml order: [columns, matrices]
    assert t["blk.0.attn_q.weight.counts"].shape.tolist() == [1, 1]

    # llama-imatrix --output-format dat: mean squares × ncall, then the chunk count and the dataset name.
    matrix = Imatrix.read(mistral_imatrix)
    legacy = tmp_path / "old.dat"
    ncall = 7
    with open(legacy, "wb") as f:
        f.write(struct.pack("<i", len(matrix.entries)))
        for name, (sums, counts) in matrix.entries.items():
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, sums.size))
            f.write((sums / counts[:, None] * ncall).astype(np.float32).tobytes())
        f.write(struct.pack("<ii", N_CHUNKS, 4) + b"text")
    old = Imatrix.read(legacy)
    assert old.legacy and old.datasets == ["text"] and old.chunk_count == N_CHUNKS
    for name in matrix.entries:
        np.testing.assert_allclose(old.weights(name), matrix.weights(name), rtol=1e-6)


IMATRIX_DATA = Path(__file__).parent / "data" / "imatrix"
# The tiny Mistral f32 file llama-imatrix read (tests/data/imatrix/README.md): its tensors' sha256.
DAT_SOURCE_TENSORS = "4929222e27dda2a6fbe88d3d6bbf4c7dc5e0570b4295c2bd46ba7cb4ebbd6306"


def test_legacy_dat_written_by_llama_imatrix_reads_as_its_gguf_and_as_ours(mistral_f32):
    """A .dat llama-imatrix itself wrote (--output-format dat, -c 64 --chunks 2, committed with the GGUF output of the
    same run and the command: tests/data/imatrix/README.md) reads to the same mean squared inputs as that GGUF, and
    as komt-edge's own imatrix of the same model and text. llama-imatrix (built with -march=native) and
    llama-cpp-python's libggml round floats differently: measured 8.3e-7 relative, allowed 1e-5."""
    import hashlib

    from gguf import GGUFReader

    digest = hashlib.sha256()
    for t in GGUFReader(mistral_f32).tensors:
        digest.update(t.name.encode())
        digest.update(t.data.tobytes())
    assert digest.hexdigest() == DAT_SOURCE_TENSORS, \
        "the tiny Mistral changed: regenerate tests/data/imatrix/ with the commands in its README.md"

    dat = Imatrix.read(IMATRIX_DATA / "tiny-mistral.imatrix.dat")
    gguf = Imatrix.read(IMATRIX_DATA / "tiny-mistral.imatrix.gguf")
    assert dat.legacy and not gguf.legacy
    assert dat.datasets == gguf.datasets == ["korean.txt"] and dat.chunk_count == gguf.chunk_count == 2
    assert sorted(dat.entries) == sorted(gguf.entries) and len(dat.entries) == 14
    # .dat keeps mean squares × ncall with ncall = ceil(tokens / chunk size) = 2, GGUF the sums and 128 tokens
    assert {float(c[0]) for _, c in dat.entries.values()} == {2.0}
    assert {float(c[0]) for _, c in gguf.entries.values()} == {128.0}
    text = (IMATRIX_DATA / "korean.txt").read_text(encoding="utf-8")
    ours = compute(mistral_f32, text, dataset="korean.txt", n_ctx=64, n_chunks=2, n_threads=N_THREADS,
                   progress=False)
    assert sorted(ours.entries) == sorted(dat.entries)
    for name in dat.entries:
        np.testing.assert_allclose(dat.weights(name), gguf.weights(name), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(dat.weights(name), ours.weights(name), rtol=1e-5, err_msg=name)


def _llama_quantize_with_imatrix(src, out, qtype, imatrix_file):
    """llama-quantize --imatrix FILE: the file read as llama-quantize reads it (sums / counts per matrix) with
    gguf-py, then llama.cpp's llama_model_quantize through llama-cpp-python's binding."""
    import llama_cpp
    from gguf import GGUFReader

    from komt_edge.converters.quantize import ftype_of

    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(imatrix_file).tensors}
    data = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            counts = tensors[f"{base}.counts"].reshape(-1)
            data[base] = (sums.reshape(len(counts), -1) / counts[:, None]).reshape(-1).astype(np.float32)
    entries = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
    keep = []
    for i, (name, values) in enumerate(data.items()):
        keep.append((name.encode(), values))
        entries[i].name, entries[i].data = keep[-1][0], values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = values.size
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype_of(qtype))
    params.nthread = N_THREADS
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_gguf_with_an_imatrix_is_llama_quantize_with_it(family, request, korean_text, llama_cpp_ref, tmp_path):
    """For the types an imatrix changes most, every tensor equals llama-quantize --imatrix applied to llama.cpp's
    own conversion of the checkpoint; the provenance keys are llama-quantize's."""
    model = request.getfixturevalue(f"tiny_{family}")
    qtypes = ["q4_K_M", "q3_K_M", "q2_K", "iq4_xs", "iq3_xxs", "iq2_xs"]
    f32 = convert(str(model), ["f32"], tmp_path / "f32", name="tiny", n_threads=N_THREADS, progress=False)[0]
    imatrix_file = compute(f32, korean_text, dataset="korean test text", n_ctx=N_CTX, n_chunks=N_CHUNKS,
                           n_threads=N_THREADS, progress=False).write(tmp_path / "tiny.imatrix.gguf")
    ours = convert(str(model), qtypes, tmp_path / "ours", name="tiny", n_threads=N_THREADS, progress=False,
                   imatrix=imatrix_file)
    source = llama_cpp_ref.convert(model, SOURCE_PRECISION[family])
    for qtype, path in zip(qtypes, ours):
        assert_identical(path, _llama_quantize_with_imatrix(source, tmp_path / f"ref-{qtype}.gguf", qtype,
                                                            imatrix_file), ignore=IMATRIX_RECORD)
    assert gguf_field(ours[0], "quantize.imatrix.file") == str(imatrix_file)
    assert gguf_field(ours[0], "quantize.imatrix.dataset") == "korean test text"
    assert gguf_field(ours[0], "quantize.imatrix.entries_count") == 14
    assert gguf_field(ours[0], "quantize.imatrix.chunks_count") == N_CHUNKS
    # The imatrix changes the bytes (it is not ignored on the way to the quantizer).
    plain = convert(str(model), ["q4_K_M"], tmp_path / "plain", name="tiny", n_threads=N_THREADS, progress=False)[0]
    from .conftest import gguf_tensors

    assert gguf_tensors(plain)["blk.0.attn_q.weight"] != gguf_tensors(ours[0])["blk.0.attn_q.weight"]


def test_types_that_need_an_imatrix_say_so_and_work_with_korean(monkeypatch, capsys, tiny_mistral, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "-q", "iq2_xs", "-o", str(tmp_path / "a"),
                           "-t", "1")
    assert_one_line_error(code, err, "iq2_xs needs an importance matrix", "--imatrix")
    assert not (tmp_path / "a").exists()
    code, out, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "-q", "iq2_xs", "-q", "q3_K_M",
                             "--imatrix", "korean", "--name", "komt-tiny", "-o", str(tmp_path / "b"), "-t", "1")
    assert code == 0, err
    cached = tmp_path / "b" / "komt-tiny-korean.imatrix.gguf"
    assert cached.is_file()
    assert gguf_field(tmp_path / "b" / "komt-tiny-IQ2_XS.gguf", "quantize.imatrix.file") == cached.name
    assert gguf_field(cached, "imatrix.datasets")[0].startswith("konlpy")
    stamp = cached.stat().st_mtime_ns
    code, out, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "-q", "q2_K", "--imatrix", "korean",
                             "--name", "komt-tiny", "-o", str(tmp_path / "b"), "-t", "1")
    assert code == 0, err
    assert cached.stat().st_mtime_ns == stamp  # same model, same text: reused, not computed again


@pytest.mark.parametrize("qtype", ["iq3_xxs", "iq2_s", "q2_K_S", "q2_K", "iq3_s"])
def test_refuses_without_an_imatrix_exactly_what_llama_cpp_refuses(qtype, tiny_mistral, mistral_f32, tmp_path):
    """komt-edge's own quantizer and llama.cpp's llama_model_quantize agree on which files need a matrix."""
    from komt_edge.errors import KomtError
    from komt_edge.gguf import convert as gguf_convert
    from komt_edge.converters.quantize import quantize_file

    try:
        quantize_file(mistral_f32, tmp_path / "llama.gguf", qtype, imatrix={}, metadata={}, n_threads=N_THREADS)
        llama_cpp_refuses = False
    except KomtError:
        llama_cpp_refuses = True
    try:
        gguf_convert(str(tiny_mistral), [qtype], tmp_path / "ours", name="tiny", n_threads=N_THREADS, progress=False)
        we_refuse = False
    except KomtError as err:
        assert "--imatrix" in str(err)
        we_refuse = True
    assert we_refuse == llama_cpp_refuses == (qtype not in ("q2_K", "iq3_s"))


def test_imatrix_command_on_a_gguf_and_on_a_hf_folder(monkeypatch, capsys, tiny_mistral, mistral_f32, tmp_path):
    out = tmp_path / "m.imatrix.gguf"
    code, stdout, err = run_cli(monkeypatch, capsys, "imatrix", str(mistral_f32), "-o", str(out), "--ctx", "64",
                                "--chunks", "2", "-t", "1")
    assert code == 0, err
    assert "2 chunks of 64 tokens" in stdout
    from_gguf = Imatrix.read(out)
    code, stdout, err = run_cli(monkeypatch, capsys, "imatrix", str(tiny_mistral), "-o", str(tmp_path / "h.gguf"),
                                "--ctx", "64", "--chunks", "2", "-t", "1")
    assert code == 0, err
    from_hf = Imatrix.read(tmp_path / "h.gguf")  # through a temporary f16 GGUF, removed afterwards
    assert sorted(from_hf.entries) == sorted(from_gguf.entries)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    name = "blk.1.ffn_down.weight"
    a, b = from_gguf.weights(name), from_hf.weights(name)
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999


def test_reruns_replace_their_own_files_and_llama_cpps_log_stays_behind_verbose(monkeypatch, capsys, tiny_mistral,
                                                                                   mistral_f32, mistral_imatrix,
                                                                                   tmp_path):
    """`imatrix -o` replaces the importance matrix (and --json the report) an earlier run wrote, as `gguf` replaces
    its own files; `gguf --imatrix FILE` prints none of llama.cpp's quantize log without -v, all of it with -v."""
    import json

    out, report = tmp_path / "m.imatrix.gguf", tmp_path / "m.json"
    args = ["imatrix", str(mistral_f32), "-o", str(out), "--ctx", "32", "--chunks", "2", "-t", "1", "--json",
            str(report)]
    for _ in range(2):
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 0, err
    assert Imatrix.read(out).chunk_count == 2 and json.loads(report.read_text(encoding="utf-8"))["chunks"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.imatrix.gguf", "m.json"]

    args = ["gguf", str(tiny_mistral), "-q", "q4_K_M", "--imatrix", str(mistral_imatrix), "--name", "komt-tiny",
            "-t", "1", "-o", str(tmp_path / "g")]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line] == []
    code, _, err = run_cli(monkeypatch, capsys, *args, "-v")
    assert code == 0, err
    assert "llama_model_quantize" in err


def test_a_text_file_is_read_as_llama_imatrix_reads_it(mistral_f32, korean_text, tmp_path):
    """`imatrix --text FILE` reads the file as llama-imatrix's -f does: Windows line ends kept (Python's text mode
    would make them \\n, other tokens), one final \\n dropped. The matrix is the one computed on those characters,
    and not the one of the same text with \\n line ends."""
    from komt_edge.imatrix.command import imatrix

    body = korean_text.replace("\n", "\r\n")
    path = tmp_path / "crlf.txt"
    path.write_bytes((body + "\n").encode("utf-8"))
    settings = dict(n_ctx=N_CTX, n_chunks=N_CHUNKS, n_threads=N_THREADS, progress=False)
    imatrix(str(mistral_f32), tmp_path / "file.imatrix.gguf", text=str(path), **settings)
    got = Imatrix.read(tmp_path / "file.imatrix.gguf")
    want = compute(mistral_f32, body, dataset="crlf", **settings)
    unix = compute(mistral_f32, korean_text, dataset="lf", **settings)
    name = "blk.0.attn_q.weight"
    assert set(got.entries) == set(want.entries)
    for key, (sums, counts) in want.entries.items():
        assert np.array_equal(got.entries[key][0], sums) and np.array_equal(got.entries[key][1], counts), key
    assert not np.array_equal(unix.entries[name][0], want.entries[name][0])
