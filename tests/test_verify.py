"""`komt-edge verify`: tokenizer parity, logit parity and generation, with bounds that really discriminate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from komt_edge.errors import KomtError
from komt_edge.gguf import convert
from komt_edge.merge import merge
from komt_edge.tiny import DEMO_QA
from komt_edge.verify import KOREAN_PROBES, Bounds, compare_logits, verify

from .conftest import N_THREADS


@pytest.fixture(scope="module")
def merged_files(tiny_mistral, mistral_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify")
    merged = merge(tiny_mistral, mistral_adapter, out / "merged")
    files = convert(str(merged), ["f32", "f16", "q8_0", "q4_0"], out, template="mistral", n_threads=2,
                    progress=False)
    return merged, dict(zip(["f32", "f16", "q8_0", "q4_0"], files))


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


def test_real_weights_smollm2_korean_parity(smollm2, tmp_path):
    """A real model with a byte-level BPE tokenizer: Korean falls back to bytes, and must still match."""
    path = convert(str(smollm2), ["f16"], tmp_path, template="llama", n_threads=2, progress=False)[0]
    report = verify(path, str(smollm2), template="llama", n_threads=N_THREADS)
    assert not report.tokenizer.mismatches, report.summary()
    assert report.logits.passed, report.summary()
    assert report.logits.max_abs < 0.1 and report.logits.top1 > 0.98
