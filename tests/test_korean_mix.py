"""Korean mixes (komt_edge.korean_mix, issue 26): ``-q ko-TYPE`` chooses per-tensor types by measured Korean KLD,
stays within llama.cpp's TYPE file, reproduces through llama-quantize's --tensor-type-file, and keeps its
measurements per model, imatrix and text.

One measurement (a tiny Llama whose attn_output weights are scaled ×8, so that the other kinds lose sensitivity
and attn_output keeps it; 2 chunks of 64 tokens, one step down and one up per kind) is shared by the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from komt_edge import korean_mix
from komt_edge.converters.plan import file_label, label_bits, plans_for
from komt_edge.errors import KomtError

from .conftest import N_THREADS, assert_one_line_error, gguf_field, gguf_tensors, run_cli
from .identity import IMATRIX_RECORD, assert_identical
from .test_plan import _llama_quantize

SETTINGS = korean_mix.Settings(n_ctx=64, n_chunks=2, checks=2)


@pytest.fixture(autouse=True)
def small_measurement(monkeypatch):
    monkeypatch.setattr(korean_mix, "SETTINGS", SETTINGS)
    monkeypatch.setattr(korean_mix, "STEPS", (-1, 1))


def _scaled_llama(folder: Path, scale: float) -> Path:
    from safetensors.torch import load_file, save_file

    from komt_edge.tiny import build_tiny_model

    model = build_tiny_model(folder, "llama", dtype=torch.float32, seed=3)
    weights = load_file(model / "model.safetensors")
    for name in weights:
        if name.endswith("o_proj.weight"):
            weights[name] = weights[name] * scale
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """ko-q3_K_M and llama.cpp's q3_K_M, both with the Korean imatrix, of the scaled model, in one OUT."""
    from komt_edge.gguf import convert

    mp = pytest.MonkeyPatch()
    mp.setattr(korean_mix, "SETTINGS", SETTINGS)
    mp.setattr(korean_mix, "STEPS", (-1, 1))
    try:
        root = tmp_path_factory.mktemp("ko")
        model = _scaled_llama(root / "model", 8.0)
        out = root / "out"
        ko, plain = convert(str(model), ["ko-q3_K_M", "q3_K_M"], out, name="tiny", n_threads=N_THREADS,
                            progress=False, imatrix="korean")
    finally:
        mp.undo()
    return model, out, ko, plain


def test_the_plan_is_chosen_by_measurement_within_llama_cpp_s_file(measured):
    model, out, ko, plain = measured
    assert ko.name == "tiny-KO-Q3_K_M.gguf" and plain.name == "tiny-Q3_K_M.gguf"
    assert ko.stat().st_size <= plain.stat().st_size  # no larger than llama.cpp's Q3_K_M with the same imatrix
    cache = json.loads((out / "tiny-KO-Q3_K_M.sensitivity.json").read_text())
    assert cache["base"]["bytes"] == plain.stat().st_size  # the budget is that very file
    # attn_output, the kind the scaling left sensitive, is given more bits than llama.cpp's mix gives it
    ours, theirs = gguf_tensors(ko), gguf_tensors(plain)
    name = "blk.0.attn_output.weight"
    assert (theirs[name][0], ours[name][0]) == ("Q4_K", "Q5_K")
    # the recipe is the measured best: what the file carries, beside it and in its metadata
    recipe = (out / "tiny-KO-Q3_K_M.tensor-types.txt").read_text()
    assert r"^blk\.\d+\.attn_output\.weight$=q5_k" in recipe.split()
    checked = cache["checked"]
    assert checked[recipe]["kld"] == min(v["kld"] for v in checked.values()) < cache["base"]["kld"]
    items = recipe.split()
    assert gguf_field(ko, "komt_edge.plan.tensor_type_count") == len(items)
    assert [gguf_field(ko, f"komt_edge.plan.tensor_type.{i}") for i in range(len(items))] == items
    assert gguf_field(ko, "komt_edge.plan.name") == "KO-Q3_K_M"
    assert gguf_field(ko, "general.file_type") == gguf_field(plain, "general.file_type")


def test_the_recipe_reproduces_the_file_through_llama_quantize(measured, tmp_path):
    """llama-quantize --imatrix IMATRIX --tensor-type-file RECIPE F32.gguf OUT Q3_K_M (its llama_model_quantize,
    filled as quantize.cpp fills it) writes the KO file's tensors."""
    from komt_edge.gguf import convert
    from komt_edge.imatrix import Imatrix

    model, out, ko, _ = measured
    source = convert(str(model), ["f32"], tmp_path, name="tiny", n_threads=N_THREADS, progress=False)[0]
    matrix = Imatrix.read(out / "tiny-korean.imatrix.gguf")
    weights = {name: matrix.weights(name) for name in matrix.entries}
    recipe = (out / "tiny-KO-Q3_K_M.tensor-types.txt").read_text()
    theirs = _llama_quantize(source, tmp_path / "llama-quantize.gguf", "q3_K_M", recipe, weights)
    assert_identical(ko, theirs, ignore=IMATRIX_RECORD)


def test_a_second_budget_reuses_the_measurements(measured, monkeypatch):
    from komt_edge.gguf import convert

    model, out, ko, plain = measured

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(korean_mix, "measure", no_measuring)
    budget = plain.stat().st_size - 200_000
    path = convert(str(model), [f"ko-q3_K_M@{budget / 1e6}MB"], out, name="tiny", n_threads=N_THREADS,
                   progress=False)[0]
    assert path.name == f"tiny-KO-Q3_K_M-{budget / 1e6}MB.gguf"
    assert path.stat().st_size <= budget
    assert file_label(path.name)[0] == f"KO-Q3_K_M-{budget / 1e6}MB" and label_bits("KO-Q3_K_M") == 3


class _Measured(Exception):
    pass


def _measure_raises(exc):
    def measure(*args, **kwargs):
        raise exc
    return measure


def test_measurements_of_another_model_or_imatrix_are_never_used(measured, tiny_llama, monkeypatch, tmp_path):
    from komt_edge.gguf import convert
    from komt_edge.imatrix import Imatrix

    model, out, _, _ = measured
    monkeypatch.setattr(korean_mix, "measure", _measure_raises(_Measured()))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "tiny-KO-Q3_K_M.sensitivity.json", other)  # the scaled model's, named as this model's
    with pytest.raises(_Measured):  # another model (tiny_llama: the same but unscaled)
        convert(str(tiny_llama), ["ko-q3_K_M"], other, name="tiny", n_threads=N_THREADS, progress=False)
    # the same model with another importance matrix: the Korean one with every column weighted the same
    import numpy as np

    korean = Imatrix.read(out / "tiny-korean.imatrix.gguf")
    flat = Imatrix({name: (np.ones_like(sums) * counts.reshape(-1, 1), np.array(counts))
                    for name, (sums, counts) in korean.entries.items()}, datasets=["flat"], chunk_count=1,
                   chunk_size=64).write(tmp_path / "flat.imatrix.gguf")
    with pytest.raises(_Measured):
        convert(str(model), ["ko-q3_K_M"], out, name="tiny", n_threads=N_THREADS, progress=False, imatrix=flat)
    assert not list(out.glob(".*partial*")) and not list(out.glob(".ko-measure-*"))


def test_an_interrupted_measurement_leaves_no_cache(tiny_llama, monkeypatch, tmp_path):
    from komt_edge.gguf import convert

    monkeypatch.setattr(korean_mix, "measure", _measure_raises(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny_llama), ["ko-q3_K_M"], tmp_path / "out", name="tiny", n_threads=N_THREADS, progress=False)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == ["tiny-korean.imatrix.gguf"]  # the imatrix (complete, reusable); no measurement, no KO file


def test_the_allocation_spends_bytes_where_the_measurements_say():
    """Given measurements, the plan is the combination with the least predicted KLD within the budget."""
    def option(kind, type_name, n_bytes, kld):
        return {"kind": kind, "pattern": korean_mix.pattern_of(kind), "type": type_name, "bytes": n_bytes,
                "kld": kld}

    options = [option("ffn_up", "Q5_K", 100, -0.5), option("ffn_up", "Q2_K", -100, 0.4),
               option("attn_k", "Q5_K", 10, -0.2), option("attn_k", "Q2_K", -10, 0.01),
               option("output", "Q4_K", -1000, 0.05), option("output", "Q8_0", 1000, -0.01)]
    best = min((p for p in korean_mix.frontier(options) if p[0] <= 0), key=lambda p: p[1])
    assert sorted((o["kind"], o["type"]) for o in best[2]) == [("attn_k", "Q5_K"), ("ffn_up", "Q5_K"),
                                                                ("output", "Q4_K")]
    assert korean_mix.recipe_text(korean_mix.recipe_items(best[2])).splitlines()[0] == r"^blk\.\d+\.attn_k\.weight$=q5_k"


def test_ko_plans_and_their_bad_input(measured, monkeypatch, capsys):
    plan = plans_for("ko-q3_K_M")[0]
    assert (plan.name, plan.base, plan.imatrix, plan.pending) == ("KO-Q3_K_M", "q3_k_m", "korean", True)
    assert plans_for("ko-iq4_xs", imatrix="m.gguf")[0].imatrix == "m.gguf"  # another imatrix is kept
    assert file_label("llama-3-ko-Q4_K_M.gguf")[0] == "Q4_K_M"  # a model named ...-ko keeps its plain label
    for spec, needle in [("ko-q9_K", "known: ko-q2_k"), ("ko-q4_0", "known: ko-q2_k"),
                         ("ko-q3_K_M@99bpw", "out of range: give 1.5 to 16 bpw"), ("ko-q3_K_M@", "ko-TYPE@SIZE")]:
        with pytest.raises(KomtError, match=needle.replace("(", r"\(")):
            plans_for(spec)
    model, out, _, _ = measured
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model), "-q", "ko-q9_K", "-o", str(out))
    assert_one_line_error(code, err, "ko-q9_K: a Korean mix starts from a k-quant or IQ mix", "known: ko-q2_k")
    # a budget the measured types cannot reach (this tiny Llama's conversion warns about its tokens, so the one-line
    # error is checked on the library's message: the CLI prints it as `error: MESSAGE`)
    from komt_edge.gguf import convert

    with pytest.raises(KomtError) as err:
        convert(str(model), ["ko-q3_K_M@1kB"], out, name="tiny", n_threads=N_THREADS, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("KO-Q3_K_M-1KB: a budget of 1,000 bytes is out of range")
    assert "reachable range is" in message
    assert not (out / "tiny-KO-Q3_K_M-1KB.gguf").exists() and not list(out.glob(".*partial*"))
