"""`komt-edge verify`: tokenizer parity, logit parity and generation, with bounds that really discriminate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader

from komt_edge.errors import KomtError
from komt_edge.gguf import convert
from komt_edge.merge import merge
from komt_edge.tiny import DEMO_QA
from komt_edge.verify import (BOUNDS, DEFAULT_QUANT_BOUNDS, KOREAN_PROBES, LOW_BIT_BOUNDS, Bounds, bounds_for,
                              compare_logits, load_reference, verify)

from .conftest import N_THREADS


@pytest.fixture(scope="module")
def merged_files(tiny_mistral, mistral_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify")
    merged = merge(tiny_mistral, mistral_adapter, out / "merged")
    types = ["f32", "f16", "bf16", "q8_0", "q4_0"]
    files = convert(str(merged), types, out, template="mistral", n_threads=2, progress=False)
    return merged, dict(zip(types, files))


@pytest.fixture(scope="module")
def merged_reference(merged_files):
    merged, _ = merged_files
    return load_reference(str(merged), template="mistral", progress=False)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    return load_reference(str(smollm2), template="llama", progress=False)


DAMAGED_TENSOR = "blk.0.ffn_down.weight"


def damage(src: Path, dst: Path, tensor: str = DAMAGED_TENSOR, fraction: float = 0.25) -> str:
    """A copy of ``src`` whose ``tensor`` has its first ``fraction`` of data blocks zeroed (as a hole in a copied
    file would be); everything else, metadata included, is byte for byte the same. Returns the tensor's type."""
    info = next(t for t in GGUFReader(src).tensors if t.name == tensor)
    block_bytes = GGML_QUANT_SIZES[info.tensor_type][1]
    n = int(info.n_bytes * fraction) // block_bytes * block_bytes
    assert n > 0
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(info.data_offset)
        assert f.read(n) != bytes(n)  # the damage changes something
        f.seek(info.data_offset)
        f.write(bytes(n))
    assert dst.stat().st_size == src.stat().st_size
    return info.tensor_type.name


def assert_bound_rejects(clean, damaged, bounds: Bounds) -> None:
    """The file type's own default bounds: the clean file passes them, the damaged one fails them on mean KL, and
    the report's logit line names the bound it missed."""
    assert clean.logits.bounds == bounds and clean.passed, clean.summary()
    assert damaged.logits.bounds == bounds
    assert damaged.tokenizer.passed and damaged.generation.template_ok  # the damage is in the weights alone
    assert not damaged.logits.passed and not damaged.passed
    assert damaged.logits.mean_kl > bounds.mean_kl, damaged.summary()
    line = next(x for x in damaged.summary().splitlines() if "logit parity" in x)
    assert f"mean KL {damaged.logits.mean_kl:.3g} (≤ {bounds.mean_kl})" in line and line.endswith("FAIL"), line
    assert damaged.summary().splitlines()[-1].strip() == "FAIL"


def test_compare_logits_of_identical_arrays_is_exact():
    x = np.random.default_rng(0).normal(size=(7, 50)).astype(np.float32)
    r = compare_logits(x, x, Bounds(0.0, 0.0, 1.0))
    assert r.mean_kl == 0.0 and r.max_abs == 0.0 and r.top1 == 1.0 and r.passed


def test_float_files_match_hf_tightly(merged_files):
    merged, files = merged_files
    for qtype in ("f32", "f16"):
        report = verify(files[qtype], str(merged), template="mistral", n_threads=N_THREADS)
        assert report.passed, report.summary()
        assert report.tokenizer.probes == len(KOREAN_PROBES) and not report.tokenizer.mismatches
        assert report.logits.max_abs < (0.05 if qtype == "f32" else 0.1)
        assert report.logits.mean_kl < 1e-5
        # the adapter taught the model a Korean answer; llama.cpp reproduces it greedily
        assert report.generation.text.startswith(DEMO_QA[0][1][:12])


def test_quantized_files_report_kl_that_grows_with_fewer_bits(merged_files):
    merged, files = merged_files
    q8 = verify(files["q8_0"], str(merged), template="mistral", n_threads=N_THREADS)
    q4 = verify(files["q4_0"], str(merged), template="mistral", n_threads=N_THREADS)
    assert q8.passed and q4.passed, q8.summary() + "\n" + q4.summary()
    assert 0 < q8.logits.mean_kl < q4.logits.mean_kl
    assert q4.logits.top1 <= q8.logits.top1
    # The f16 bound rejects the q4_0 file: the bounds discriminate.
    strict = verify(files["q4_0"], str(merged), template="mistral", n_threads=N_THREADS,
                    bounds=Bounds(max_abs=0.1, mean_kl=1e-4, min_top1=0.98))
    assert not strict.passed and "FAIL" in strict.summary()
    data = json.loads(strict.to_json())
    assert data["passed"] is False and data["logits"]["mean_kl"] == pytest.approx(q4.logits.mean_kl)


def test_tokenizer_mismatches_are_listed(tiny_mistral, tmp_path):
    # A GGUF whose tokenizer lacks SentencePiece's dummy prefix tokenizes differently from the original.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mistral, broken)
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    cfg["add_prefix_space"] = False
    (broken / "tokenizer_config.json").write_text(json.dumps(cfg))
    path = convert(str(broken), ["q8_0"], tmp_path, template="mistral", n_threads=2, progress=False)[0]
    report = verify(path, str(tiny_mistral), template="mistral", n_threads=N_THREADS)
    assert not report.tokenizer.passed and not report.passed
    assert len(report.tokenizer.mismatches) >= len(KOREAN_PROBES) // 2
    first = report.tokenizer.mismatches[0]
    assert first["gguf"] != first["reference"] and "mismatch" in report.summary()


def test_reference_with_another_vocabulary_is_an_error(merged_files, tiny_llama):
    _, files = merged_files
    with pytest.raises(KomtError, match="not made from this model"):
        verify(files["q8_0"], str(tiny_llama), n_threads=N_THREADS)


def test_real_weights_smollm2_korean_parity(smollm2, smollm2_reference, tmp_path):
    """A real model with a byte-level BPE tokenizer: Korean falls back to bytes, and must still match."""
    path = convert(str(smollm2), ["f16"], tmp_path, template="llama", n_threads=2, progress=False)[0]
    report = verify(path, str(smollm2), n_threads=N_THREADS, reference=smollm2_reference)
    assert not report.tokenizer.mismatches, report.summary()
    assert report.logits.passed, report.summary()
    assert report.logits.max_abs < 0.1 and report.logits.top1 > 0.98


# -- each family's bounds reject a damaged file of that family ------------------------------------------------

@pytest.mark.parametrize("qtype, file_type, bounds", [
    ("f32", "ALL_F32", BOUNDS["ALL_F32"]),
    ("f16", "MOSTLY_F16", BOUNDS["MOSTLY_F16"]),
    ("bf16", "MOSTLY_BF16", BOUNDS["MOSTLY_BF16"]),
    ("q8_0", "MOSTLY_Q8_0", BOUNDS["MOSTLY_Q8_0"]),
    ("q4_0", "MOSTLY_Q4_0", DEFAULT_QUANT_BOUNDS),  # the 4-6-bit bounds
])
def test_each_float_and_4_to_8_bit_bound_rejects_a_damaged_file(qtype, file_type, bounds, merged_files,
                                                                merged_reference, tmp_path):
    """A quarter of blk.0.ffn_down's blocks zeroed in a copy of a file komt-edge wrote: the file type's default
    bounds, which the intact file passes, reject it."""
    merged, files = merged_files
    assert bounds_for(file_type) == bounds
    broken = tmp_path / f"damaged-{files[qtype].name}"
    damage(files[qtype], broken)
    clean = verify(files[qtype], str(merged), n_threads=N_THREADS, reference=merged_reference)
    damaged = verify(broken, str(merged), n_threads=N_THREADS, reference=merged_reference)
    assert clean.file_type == damaged.file_type == file_type
    assert_bound_rejects(clean, damaged, bounds)


def test_low_bit_bound_rejects_a_damaged_q3_K_M_file_of_real_weights(smollm2, smollm2_reference, tmp_path):
    """The 1-3-bit bounds on real weights (SmolLM2-135M; the tiny random model's q3/q2 files miss them even intact:
    random weights lose more to 3 bits than a trained model). The damaged tensor is one llama.cpp's Q3_K_M mix
    keeps at 5 bits (Q5_K): the damage, not the type, is what fails."""
    path = convert(str(smollm2), ["q3_K_M"], tmp_path, template="llama", n_threads=2, progress=False)[0]
    assert bounds_for("MOSTLY_Q3_K_M") == LOW_BIT_BOUNDS
    broken = tmp_path / "damaged.gguf"
    damage(path, broken)
    clean = verify(path, str(smollm2), n_threads=N_THREADS, reference=smollm2_reference)
    damaged = verify(broken, str(smollm2), n_threads=N_THREADS, reference=smollm2_reference)
    assert clean.file_type == damaged.file_type == "MOSTLY_Q3_K_M"
    assert_bound_rejects(clean, damaged, LOW_BIT_BOUNDS)
