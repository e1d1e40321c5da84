"""One quantization plan (komt_edge.converters.plan): a new kind of plan is added in the planner alone, and a plan's
per-tensor types reach the file on both quantization paths exactly as llama-quantize --tensor-type writes them."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest

from komt_edge.converters import plan as planner
from komt_edge.converters.plan import QuantPlan, mix, parse_tensor_types, plan_kind, plans_for
from komt_edge.errors import KomtError

from .conftest import N_THREADS, assert_one_line_error, gguf_field, gguf_tensors, run_cli
from .identity import IMATRIX_RECORD, assert_identical

# llama-quantize --tensor-type-file's format: PATTERN=TYPE items, the pattern a regular expression searched in each
# tensor name, the first that matches deciding.
TENSOR_TYPES = r"""# a hand-made mix
blk\.0\.attn_q\.weight=q8_0
attn_v=Q6_K
ffn_up=q5_k
output\.weight=q8_0
"""


@pytest.fixture
def file_kind(monkeypatch):
    """A new kind of plan, added to the planner and nowhere else: ``tt:BASE:FILE`` is llama.cpp's BASE mix with the
    per-tensor types FILE lists, named BASE_TT."""
    monkeypatch.setattr(planner, "KINDS", list(planner.KINDS))  # the planner's kinds as they were, after the test

    @plan_kind
    def tensor_types_file(spec: str) -> QuantPlan | None:
        if not spec.startswith("tt:"):
            return None
        base, _, file = spec[len("tt:"):].partition(":")
        plain = mix(base)
        return QuantPlan(f"{plain.name}_TT", plain.base, parse_tensor_types(Path(file).read_text(), source=file),
                         made_by=f"{plain.name} with the per-tensor types of {Path(file).name}")

    return tensor_types_file


def _types_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mix.txt"
    path.write_text(TENSOR_TYPES)
    return path


def _llama_quantize(src: Path, out: Path, qtype: str, tensor_types: str, imatrix: dict | None = None) -> Path:
    """llama-quantize --tensor-type-file FILE [--imatrix] SRC OUT QTYPE, through llama-cpp-python's binding of the
    llama_model_quantize it calls, its parameters filled as tools/quantize/quantize.cpp fills them: each name
    lower-cased, each type found by its ggml name, the list ended by a null pattern."""
    import llama_cpp
    from gguf import GGMLQuantizationType, LlamaFileType

    items = [item.split("=", 1) for line in tensor_types.splitlines() if not line.startswith("#")
             for item in line.split()]
    names = [name.lower().encode() for name, _ in items]
    overrides = (llama_cpp.llama_model_tensor_override * (len(items) + 1))()
    for o, name, (_, type_name) in zip(overrides, names, items):
        o.pattern, o.type = name, int(GGMLQuantizationType[type_name.upper()])
    overrides[len(items)].pattern, overrides[len(items)].type = None, llama_cpp.GGML_TYPE_COUNT
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LlamaFileType[f"MOSTLY_{qtype.upper()}"])
    params.nthread = N_THREADS
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if imatrix:
        keep = {name.encode(): np.ascontiguousarray(v, dtype=np.float32) for name, v in sorted(imatrix.items())}
        entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
        for e, (name, values) in zip(entries, keep.items()):
            e.name, e.data, e.size = name, values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), values.size
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def _assert_types_follow(path: Path, plain: Path, tensor_types: tuple[tuple[str, str], ...]) -> None:
    """Each tensor a pattern matches has the first matching pattern's type; every other has the plain mix's."""
    ours, mix_types = gguf_tensors(path), gguf_tensors(plain)
    assert sorted(ours) == sorted(mix_types)
    changed = 0
    for name, (type_name, _, _) in ours.items():
        chosen = next((t for pattern, t in tensor_types if re.search(pattern, name)), None)
        if chosen is None or len(mix_types[name][1]) < 2:
            assert type_name == mix_types[name][0], name
        else:
            assert type_name == chosen, f"{name}: {type_name}, the plan says {chosen}"
            changed += chosen != mix_types[name][0]
    assert changed >= 4  # the plan does change the mix


def test_a_new_kind_of_plan_is_added_in_the_planner_alone(file_kind, tiny_mistral, llama_cpp_ref, monkeypatch,
                                                          capsys, tmp_path):
    """The kind above is all that was added; the command line, file naming, komt-edge's own writer, verify's
    bounds, runtime's file choice and the card take its plan as they take llama.cpp's mixes, and the file is
    llama-quantize --tensor-type-file's."""
    from komt_edge.card import CardRow
    from komt_edge.runtime import candidates, resolve_gguf
    from komt_edge.verify import bounds_for

    types_file = _types_file(tmp_path / "in")
    spec = f"tt:q4_K_M:{types_file}"
    plan = plans_for(spec)[0]
    assert (plan.name, plan.base, plan.key, plan.file_type) == ("Q4_K_M_TT", "q4_k_m", "Q4_K_M_TT", "MOSTLY_Q4_K_M")
    assert plan.tensor_types[0] == (r"blk\.0\.attn_q\.weight", "Q8_0")

    # the command line and komt-edge's own writer (no imatrix), one read for both files
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "-q", f"{spec},q8_0", "--name", "tiny",
                           "-o", str(out), "-t", str(N_THREADS))
    assert code == 0, err
    path = out / "tiny-Q4_K_M_TT.gguf"
    assert sorted(p.name for p in out.iterdir()) == [path.name, "tiny-Q8_0.gguf"]
    assert gguf_field(path, "general.file_type") == int(mix("q4_K_M").ftype)
    source = llama_cpp_ref.convert(tiny_mistral, "bf16")
    _assert_types_follow(path, llama_cpp_ref.quantize(tiny_mistral, "bf16", "q4_K_M"), plan.tensor_types)
    assert_identical(path, _llama_quantize(source, tmp_path / "ref.gguf", "q4_K_M", TENSOR_TYPES))

    # verify bounds it as its base; runtime finds it by its name; the card says how it was made
    assert bounds_for(plan) == bounds_for("MOSTLY_Q4_K_M")
    assert candidates({p.name: 1 for p in out.iterdir()})["Q4_K_M_TT"].files == [path.name]
    assert resolve_gguf(out, quant="q4_K_M_tt") == path
    from .test_card import _gguf_spec

    from komt_edge.card import render_card

    from komt_edge.release import release

    lines: list[str] = []
    result = release(str(tiny_mistral), "my-org", quants=[spec, "q8_0"], gptq=False, dry_run=True, name="tiny",
                     out=tmp_path / "release", log=lines.append)
    assert result.to_dict()["quants"] == ["Q4_K_M_TT", "q8_0"]
    assert "my-org/tiny-GGUF: would publish tiny-Q4_K_M_TT.gguf, tiny-Q8_0.gguf and README.md" in "\n".join(lines)
    row = CardRow(plan.name, [path.name], path.stat().st_size, 5.0, plan=plan.to_dict())
    card = render_card(_gguf_spec(rows=[row], files={path.name: (path.stat().st_size, "d" * 64)}))
    assert (f"`llama-quantize --tensor-type blk\\.0\\.attn_q\\.weight=q8_0 --tensor-type attn_v=q6_k "
            f"--tensor-type ffn_up=q5_k --tensor-type output\\.weight=q8_0 MODEL-F16.gguf {path.name} Q4_K_M`") in card


def test_per_tensor_types_reach_the_file_through_llama_model_quantize_too(file_kind, tiny_mistral, llama_cpp_ref,
                                                                         tmp_path):
    """With an importance matrix the plan goes through llama.cpp's llama_model_quantize: the same per-tensor types,
    and the file llama-quantize --imatrix --tensor-type-file writes."""
    from gguf import GGUFReader

    from komt_edge.gguf import convert
    from komt_edge.imatrix import Imatrix

    source = llama_cpp_ref.convert(tiny_mistral, "bf16")
    rng = np.random.default_rng(0)
    columns = {t.name: int(t.shape[0]) for t in GGUFReader(source).tensors
               if t.name.startswith("blk.") and len(t.shape) == 2}
    matrix = Imatrix({name: (rng.uniform(0.5, 2.0, (1, cols)).astype(np.float32), np.array([64], np.float32))
                      for name, cols in columns.items()}, datasets=["synthetic"], chunk_count=1, chunk_size=64)
    imatrix_file = matrix.write(tmp_path / "tiny.imatrix.gguf")
    spec = f"tt:q4_K_M:{_types_file(tmp_path / 'in')}"
    ours = convert(str(tiny_mistral), [spec], tmp_path / "out", name="tiny", n_threads=N_THREADS, progress=False,
                   imatrix=imatrix_file)[0]
    assert ours.name == "tiny-Q4_K_M_TT.gguf"
    assert gguf_field(ours, "quantize.imatrix.file") == str(imatrix_file)
    weights = {name: matrix.weights(name) for name in columns}
    plain = _llama_quantize(source, tmp_path / "plain.gguf", "q4_K_M", "", weights)
    _assert_types_follow(ours, plain, plans_for(spec)[0].tensor_types)
    assert_identical(ours, _llama_quantize(source, tmp_path / "ref.gguf", "q4_K_M", TENSOR_TYPES, weights),
                     ignore=IMATRIX_RECORD)


def test_the_planner_makes_llama_cpp_mixes_and_refuses_what_llama_cpp_could_not_read():
    plans = plans_for(["q4_K_M, q8_0", "F16", "q8_0"])
    assert [p.name for p in plans] == ["Q4_K_M", "Q8_0", "F16"]
    assert [p.key for p in plans] == ["q4_k_m", "q8_0", "f16"] == planner.parse_types(["q4_K_M, q8_0", "F16"])
    assert all(p.is_plain_mix and p.imatrix is None for p in plans)
    assert [p.imatrix for p in plans_for("q4_0 q4_K_M f16", imatrix="korean")] == ["korean", "korean", None]
    assert [p.imatrix for p in plans_for("q4_0 q4_K_M f16", imatrix="korean", imatrix_for=planner.kquant_or_iq)] \
        == [None, "korean", None]
    custom = QuantPlan("Q4_K_M_X", "q4_k_m", (("attn_v", "q8_0"),))
    assert plans_for([custom], imatrix="m.gguf")[0] == custom.uses("m.gguf")  # a plan without one takes the run's
    assert plans_for([custom.uses("korean")], imatrix="m.gguf")[0].imatrix == "korean"  # one with its own keeps it
    with pytest.raises(KomtError, match="unknown quantization type 'q9'; known: f32"):
        plans_for("q4_0 q9")
    refused = [
        (lambda: QuantPlan("Q4_K_M", "q4_k_m", (("attn_v", "q8_0"),)), "give it its own name"),
        (lambda: QuantPlan("Q8_0", "q4_k_m"), "that name is llama.cpp's Q8_0 mix"),
        (lambda: QuantPlan("KOREAN-4", "q4_k_m"), "must read like llama.cpp's type names"),
        (lambda: QuantPlan("Q8_0_F16", "f16", (("attn_v", "q8_0"),)), "need a quantized base type"),
        (lambda: QuantPlan("F16", "f16", imatrix="korean"), "not quantized with an importance matrix"),
        (lambda: parse_tensor_types("attn_v=q9_9"), "unknown tensor type 'q9_9'"),
        (lambda: parse_tensor_types("attn_v"), "is not PATTERN=TYPE"),
        (lambda: parse_tensor_types("blk.(0=q8_0"), "is not a regular expression"),
        (lambda: parse_tensor_types(r"(?P<x>attn_v)=q8_0"), "is not a regular expression"),
        (lambda: parse_tensor_types(r"\Aattn_v=q8_0"), "does not read as Python does"),
        (lambda: parse_tensor_types(r"(?i)attn_v=q8_0"), "does not read as Python does"),
        (lambda: plans_for([QuantPlan("Q4_K_M_X", "q4_k_m", (("attn_v", "q8_0"),)),
                            QuantPlan("Q4_K_M_X", "q4_k_m", (("attn_v", "q6_k"),))]), "two different"),
    ]
    for make, needle in refused:
        with pytest.raises(KomtError, match=re.escape(needle)):
            make()
    assert parse_tensor_types(r"BLK\.\d+\.ATTN_V=Q8_0 (?:ffn_up|ffn_gate)=q5_k") == (
        (r"blk\.\d+\.attn_v", "Q8_0"), ("(?:ffn_up|ffn_gate)", "Q5_K"))  # lower-cased, as llama-quantize does


def test_a_plan_kind_error_is_one_line(file_kind, tiny_mistral, monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("attn_v=q9_9\n")
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(tiny_mistral), "-q", f"tt:q4_K_M:{bad}",
                           "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "unknown tensor type 'q9_9'")
    assert not (tmp_path / "out").exists()
