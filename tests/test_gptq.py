"""`komt-edge gptq`: GPTQ v1 checkpoints of tiny komt-shaped models, on CPU, calibrated on Korean text.

Two quantizations per session (kept small: 16 × 128 calibration tokens): tiny Mistral with its komt-recipe LoRA
adapter merged first, through the CLI, with the default 4-bit g128; tiny Llama through the library with
--desc-act and group size 64. Everything else reads their outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from komt_edge.cli import main
from komt_edge.corpora import hangul_fraction, korean_examples
from komt_edge.errors import KomtError
from komt_edge.gptq import (CHECK_PROMPT, SUPPORTED_GROUP_SIZES, dequantize, gptq, load_tokenizer, output_name,
                            token_windows, unpack_rows)
from komt_edge.templates import LLAMA, MISTRAL


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
SAMPLES, SEQ_LEN = 16, 128


@pytest.fixture(scope="module", autouse=True)
def _cpu_workers():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTQMODEL_CPU_WORKERS", "2")
        yield


@contextlib.contextmanager
def spy_calibration(store: list):
    """Record the calibration that GPTQModel's quantize() is really given."""
    from gptqmodel.models.base import BaseQModel

    original = BaseQModel.quantize

    def spy(self, calibration=None, *args, **kwargs):
        store.append(calibration)
        return original(self, calibration, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BaseQModel, "quantize", spy)
        yield


@pytest.fixture(scope="module")
def mistral_run(tiny_mistral, mistral_adapter, tmp_path_factory):
    """CLI, default format, adapter merged first, with the post-quantization check."""
    out = tmp_path_factory.mktemp("gptq-mistral")
    seen: list = []
    argv = ["komt-edge", "gptq", str(tiny_mistral), "--adapter", str(mistral_adapter), "-o", str(out),
            "--device", "cpu", "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN), "--eval-tokens", "2048"]
    stdout = io.StringIO()
    with spy_calibration(seen), pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(sys, "argv", argv)
        try:
            main()
        except SystemExit as exc:
            pytest.fail(f"komt-edge gptq exited with {exc.code}")
    return out, out / "mistral-GPTQ-4bit-g128", stdout.getvalue(), seen


@pytest.fixture(scope="module")
def llama_run(tiny_llama, tmp_path_factory):
    """Library, --desc-act and group size 64, a smaller perplexity budget."""
    out = tmp_path_factory.mktemp("gptq-llama")
    seen: list = []
    with spy_calibration(seen):
        result = gptq(str(tiny_llama), out, group_size=64, desc_act=True, device="cpu", samples=SAMPLES,
                      seq_len=SEQ_LEN, eval_tokens=1024, progress=False)
    return out, result, seen


# --- helpers ------------------------------------------------------------------------------------------

def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def merged_reference(base: Path, adapter: Path | None) -> dict[str, torch.Tensor]:
    """The weights that were quantized: the base, with the LoRA adapter merged as `komt-edge merge` does."""
    from komt_edge.merge import load_adapter, merged_weight

    weights = tensors(base)
    if adapter is not None:
        for name, pair in load_adapter(adapter).pairs.items():
            weights[name] = merged_weight(weights[name], pair)
    return weights


# --- the checkpoint -----------------------------------------------------------------------------------

def test_output_folder_and_files(mistral_run):
    out, folder, _, _ = mistral_run
    assert [p.name for p in out.iterdir()] == [folder.name]  # no partial output, no merge/offload leftovers
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json", "komt_edge_gptq.json"} <= names
    assert "tokenizer.json" not in names  # the model's own SentencePiece files, not a re-conversion


def test_quantization_config_is_gptq_v1_without_calibration_text(mistral_run, llama_run):
    for folder, group, desc_act in ((mistral_run[1], 128, False), (llama_run[1].path, 64, True)):
        config = json.loads((folder / "config.json").read_text())
        q = config["quantization_config"]
        assert q["quant_method"] == "gptq" and q["checkpoint_format"] == "gptq"  # v1, not gptq_v2
        assert (q["bits"], q["group_size"], q["desc_act"], q["sym"], q["lm_head"]) == (4, group, desc_act, True, False)
        qc = json.loads((folder / "quantize_config.json").read_text())
        assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (4, group, desc_act, True)
        assert qc["checkpoint_format"] == "gptq"
        meta = q["meta"]["komt_edge"]
        assert meta["calibration"]["samples"] == SAMPLES and meta["calibration"]["seq_len"] == SEQ_LEN
        assert meta["calibration"]["source"].startswith("korean")
        for name in ("config.json", "quantize_config.json"):
            text = (folder / name).read_text(encoding="utf-8")
            assert not re.search(r"[\uac00-\ud7a3]", text), f"Korean text in {name}: the calibration set leaked"
            assert "/tmp" not in text and "offload_to_disk_path" not in text  # no local paths


def test_tokenizer_and_komt_chat_template(mistral_run, llama_run, tiny_mistral, tiny_llama):
    for folder, source, template in ((mistral_run[1], tiny_mistral, MISTRAL), (llama_run[1].path, tiny_llama, LLAMA)):
        assert (folder / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        assert cfg["chat_template"] == template.chat_template
        tok = load_tokenizer(folder)
        rendered = tok.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], tokenize=False)
        assert rendered == "<s>" + template.format(CHECK_PROMPT)
        ids = tok.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], tokenize=True, return_dict=True)
        assert ids["input_ids"] == tok(template.format(CHECK_PROMPT)).input_ids  # one BOS, as komt was trained
    # komt-llama's quirks survive: [PAD] at 32000 and the special-token map
    assert json.loads((llama_run[1].path / "added_tokens.json").read_text()) == {"[PAD]": 32000}
    assert (llama_run[1].path / "special_tokens_map.json").read_text() == (tiny_llama / "special_tokens_map.json").read_text()


def test_tensor_dtypes_shapes_and_names(mistral_run, llama_run):
    """The layout vLLM's and transformers' GPTQ loaders declare for every quantized linear layer."""
    for folder, group in ((mistral_run[1], 128), (llama_run[1].path, 64)):
        config = json.loads((folder / "config.json").read_text())
        t = tensors(folder)
        for layer in range(config["num_hidden_layers"]):
            for lin in LINEARS:
                base = f"model.layers.{layer}.{lin}"
                assert f"{base}.weight" not in t
                qweight, qzeros, scales, g_idx = (t[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
                n_out = qweight.shape[1]
                n_in = qweight.shape[0] * 8
                assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32
                assert scales.dtype == torch.float16
                assert tuple(qzeros.shape) == (n_in // group, n_out // 8)
                assert tuple(scales.shape) == (n_in // group, n_out)
                assert tuple(g_idx.shape) == (n_in,)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert t[name].is_floating_point()


def test_g_idx_and_zero_points(mistral_run, llama_run):
    t = tensors(mistral_run[1])
    g_idx = t["model.layers.0.mlp.down_proj.g_idx"]
    assert torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // 128)  # vLLM ignores it: trivial
    lt = tensors(llama_run[1].path)
    g = lt["model.layers.0.self_attn.q_proj.g_idx"]
    assert sorted(torch.bincount(g.long()).tolist()) == [64] * (g.numel() // 64)  # act-order: permuted groups
    for tt in (t, lt):
        zeros = unpack_rows(tt["model.layers.1.mlp.up_proj.qzeros"].T.contiguous(), 4)
        assert set(zeros.unique().tolist()) == {7}  # symmetric 4-bit: zero point 8, stored minus one (v1)


@pytest.mark.parametrize("which", ["mistral", "llama"])
def test_dequantized_weights_match_the_originals(which, mistral_run, llama_run, tiny_mistral, tiny_llama,
                                                 mistral_adapter):
    if which == "mistral":
        folder, reference = mistral_run[1], merged_reference(tiny_mistral, mistral_adapter)
    else:
        folder, reference = llama_run[1].path, merged_reference(tiny_llama, None)
    t = tensors(folder)
    checked = 0
    for name in (n for n in t if n.endswith(".qweight")):
        base = name[: -len(".qweight")]
        w = dequantize(t[f"{base}.qweight"], t[f"{base}.qzeros"], t[f"{base}.scales"], t[f"{base}.g_idx"], 4)
        original = reference[f"{base}.weight"].float()
        assert w.shape == original.shape
        step = t[f"{base}.scales"].float()[t[f"{base}.g_idx"].long()].T  # the quantization step of each weight
        err = (w - original).abs() / step
        # GPTQ rounds each weight to the grid after compensating earlier columns' errors, so a weight may land
        # on a grid point next to its nearest one: most are within half a step (plain rounding), nearly all
        # within one step, and none far off (a packing or zero-point error would be off by many steps).
        assert (err <= 0.5).float().mean() > 0.75, base
        assert (err <= 1.0).float().mean() > 0.97, base
        assert err.max() < 3.0, f"{base}: {err.max():.2f} steps"
        assert (w - original).norm() / original.norm() < 0.25, base
        checked += 1
    assert checked == 2 * len(LINEARS)


# --- reload, generate, perplexity ----------------------------------------------------------------------

def test_reloads_in_transformers_and_generates(mistral_run):
    from transformers import AutoModelForCausalLM

    folder = mistral_run[1]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("gptqmodel.nn_modules.qlinear")
    # the kernel computes with the weights our unpacking reads (it multiplies in bf16: ~0.3% relative error);
    # reading the zero points one step off, as a gptq_v2 reader would, is off by ~30%
    t = tensors(folder)
    parts = [t[f"model.layers.0.self_attn.q_proj.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")]
    w = dequantize(*parts, 4)
    step = parts[2].float()[parts[3].long()].T
    torch.manual_seed(0)
    x = torch.randn(4, w.shape[1])
    with torch.inference_mode():
        y = layer(x)

    def rel(ref: torch.Tensor) -> float:
        return ((y - ref).norm() / ref.norm()).item()

    assert rel(x @ w.T) < 0.01
    assert rel(x @ (w + step).T) > 10 * rel(x @ w.T)
    tok = load_tokenizer(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "김치는 어떻게 만드나요?"}], return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]


def test_check_reports_finite_korean_perplexity(mistral_run, llama_run):
    _, folder, stdout, _ = mistral_run
    assert "Korean perplexity, held-out" in stdout and "GPTQ" in stdout and "vs unquantized" in stdout
    assert "chat template renders the komt prompt: yes" in stdout
    report = json.loads((folder / "komt_edge_gptq.json").read_text())
    check = report["check"]
    assert check["template_ok"] and "held-out split" in check["eval_source"]
    assert math.isfinite(check["ppl_gptq"]) and check["ppl_gptq"] > 1
    assert math.isfinite(check["ppl_reference"]) and check["ppl_reference"] > 1
    assert check["eval_tokens"] == 2048 and check["eval_windows"] == 4  # 512-token windows of held-out text
    k = llama_run[1].check
    assert k is not None and math.isfinite(k.ppl_gptq) and math.isfinite(k.ppl_reference) and k.eval_tokens == 1024
    assert k.template_ok and k.rendered == "<s>" + LLAMA.format(CHECK_PROMPT)


# --- Korean calibration is what GPTQModel quantized with ---------------------------------------------

def test_korean_calibration_is_really_used(mistral_run, tiny_mistral):
    _, folder, _, seen = mistral_run
    assert len(seen) == 1
    given = [list(map(int, sample["input_ids"])) for sample in seen[0]]
    assert len(given) == SAMPLES and all(len(ids) == SEQ_LEN for ids in given)
    tok = load_tokenizer(folder)
    expected = token_windows(tok, korean_examples("calibration"), seq_len=SEQ_LEN, samples=SAMPLES,
                             template=MISTRAL)
    assert given == expected.windows  # the built-in Korean calibration split, in this tokenizer, as drawn
    text = tok.decode([i for ids in given for i in ids], skip_special_tokens=True)
    assert hangul_fraction(text) > 0.5
    heldout = token_windows(tok, korean_examples("heldout"), seq_len=SEQ_LEN, max_tokens=10**9)
    held_grams = {tuple(w[i:i + 24]) for w in heldout.windows for i in range(1, len(w) - 24)}
    assert not any(tuple(ids[i:i + 24]) in held_grams for ids in given for i in range(1, len(ids) - 24))


def test_calibration_renders_instruction_data_in_the_template(tiny_mistral, tiny_llama):
    for folder, template, marker in ((tiny_mistral, MISTRAL, "[INST]"), (tiny_llama, LLAMA, "### Response:")):
        tok = load_tokenizer(folder)
        windows = token_windows(tok, korean_examples("calibration"), seq_len=SEQ_LEN, template=template,
                                max_tokens=10**9)
        text = tok.decode([i for w in windows.windows for i in w], skip_special_tokens=True)
        assert text.count(marker) >= 10
        assert tok.bos_token_id == 1 and all(w[0] == tok.bos_token_id for w in windows.windows)


def test_user_calibration_file(tiny_mistral, tmp_path):
    tok = load_tokenizer(tiny_mistral)
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"질문 {i}", "output": "대답입니다. " * 20},
                                         ensure_ascii=False) for i in range(40)), encoding="utf-8")
    from komt_edge.gptq import calibration_examples

    examples, source = calibration_examples(str(path))
    assert source == "cal.jsonl" and len(examples) == 40
    windows = token_windows(tok, examples, seq_len=64, samples=8, template=MISTRAL, source=source)
    assert len(windows.windows) == 8 and windows.instruction_examples == 40
    with pytest.raises(KomtError, match="too short for --samples 500"):
        token_windows(tok, examples, seq_len=64, samples=500, template=MISTRAL, source=source)


# --- names and bad input ---------------------------------------------------------------------------------

def test_output_name():
    assert output_name("komt-mistral-7b-v1") == "komt-mistral-7b-v1-GPTQ-4bit-g128"
    assert output_name("x", 8, -1) == "x-GPTQ-8bit-gchannel"
    assert output_name("org/x y", 4, 32, True) == "org-x-y-GPTQ-4bit-g32-actorder"


def test_supported_bits_and_group_sizes_are_what_the_format_reader_reads(tmp_path):
    """Every accepted --bits round-trips through unpack_rows (GPTQ v1 packing, lowest bits first); the refused
    ones are refused before any work (here: before the model is even looked up)."""
    from komt_edge.gptq import SUPPORTED_BITS

    torch.manual_seed(0)
    missing = str(tmp_path / "no-such-model")
    for bits in SUPPORTED_BITS:
        k = 32 // bits
        values = torch.randint(0, 1 << bits, (4 * k, 3), dtype=torch.int64)
        packed = sum(values[j::k] << (bits * j) for j in range(k))  # row r holds rows r*k … r*k+k-1
        packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
        assert torch.equal(unpack_rows(packed, bits).long(), values), bits
    for bits, group in [(b, 128) for b in SUPPORTED_BITS] + [(4, g) for g in SUPPORTED_GROUP_SIZES]:
        with pytest.raises(KomtError, match="unknown MODEL"):  # accepted: it went on to look for the model
            gptq(missing, tmp_path / "out", bits=bits, group_size=group, device="cpu", progress=False)
    for bits, group in ((3, 128), (5, 128), (4, 16), (4, 256)):
        with pytest.raises(KomtError, match="is not supported"):
            gptq(missing, tmp_path / "out", bits=bits, group_size=group, device="cpu", progress=False)


def test_device_selection(monkeypatch):
    from komt_edge.gptq import compute_dtype, select_device

    assert select_device("cpu") == torch.device("cpu")
    assert compute_dtype(torch.device("cpu")) == torch.bfloat16
    assert compute_dtype(torch.device("cuda:0")) == torch.float16
    with pytest.raises(KomtError, match="choose auto, cpu, cuda or cuda:N"):
        select_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("auto") == torch.device("cuda:0")
    assert select_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(KomtError, match="only 2 CUDA device"):
        select_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")


# --- acceptance: a checkpoint that fails its check is not published -----------------------------------------

def _damaged_copy(folder: Path, dest: Path, **changes) -> Path:
    """A copy of a GPTQ checkpoint with some tensors replaced (name → function of the tensor)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    for shard in dest.glob("*.safetensors"):
        t = load_file(str(shard))
        t.update({name: fn(t[name]).contiguous() for name, fn in changes.items() if name in t})
        save_file(t, str(shard), metadata={"format": "pt"})
    return dest


def test_cli_max_ppl_ratio_default_is_the_librarys():
    from komt_edge.cli.gptq import gptq_cmd
    from komt_edge.gptq import GPTQ_MAX_PPL_RATIO

    option = next(p for p in gptq_cmd.params if p.name == "max_ppl_ratio")
    assert option.default == GPTQ_MAX_PPL_RATIO == 1.5


@pytest.mark.gptq
def test_a_damaged_quantization_fails_the_command(tiny_mistral, tmp_path, monkeypatch, capsys):
    """GPTQ scales of one layer turned to NaN after quantizing: the check finds a non-finite perplexity, the
    command exits 1 with one line, and no checkpoint (nor any partial) is left."""
    import komt_edge.gptq as g
    from safetensors.torch import load_file, save_file

    from .conftest import run_cli

    finish = g._finish_checkpoint

    def finish_then_damage(folder, *args, **kwargs):
        finish(folder, *args, **kwargs)
        shard = folder / "model.safetensors"
        t = load_file(str(shard))
        t["model.layers.0.mlp.down_proj.scales"] = torch.full_like(t["model.layers.0.mlp.down_proj.scales"],
                                                                   float("nan"))
        save_file(t, str(shard), metadata={"format": "pt"})

    monkeypatch.setattr(g, "_finish_checkpoint", finish_then_damage)
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "gptq", str(tiny_mistral), "-o", str(out), "--device", "cpu",
                           "--samples", "4", "--seq-len", "64", "--eval-tokens", "256")
    assert code == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # progress above, then one line
    assert "GPTQ checkpoint rejected" in errors[0] and "perplexity is not finite" in errors[0]
    assert list(out.iterdir()) == []


def test_acceptance_rule_on_damaged_checkpoints(mistral_run, tiny_mistral, mistral_adapter, tmp_path):
    """The rule the command and the release apply, on the real check of real (then damaged) checkpoints."""
    from komt_edge.gptq import GptqRejected, acceptance_failure, check_checkpoint
    from komt_edge.merge import merge

    folder = mistral_run[1]
    reference = merge(tiny_mistral, mistral_adapter, tmp_path / "merged", progress=False)
    cpu = torch.device("cpu")
    good = check_checkpoint(folder, reference, MISTRAL, cpu, eval_tokens=512)
    assert acceptance_failure(good) is None and 0.8 < good.ppl_ratio < 1.25
    assert acceptance_failure(None) == "the GPTQ checkpoint was not checked"

    # output layer ×40 after quantizing: confident wrong answers, a finite perplexity many times the original's
    loud = _damaged_copy(folder, tmp_path / "loud", **{"lm_head.weight": lambda w: w * 40})
    k = check_checkpoint(loud, reference, MISTRAL, cpu, eval_tokens=512)
    assert math.isfinite(k.ppl_gptq) and k.ppl_ratio > 3, k.ppl_ratio
    failure = acceptance_failure(k)
    assert failure is not None and f"×{k.ppl_ratio:.2f} the original's" in failure and "(bound ×1.5)" in failure
    assert acceptance_failure(k, max_ppl_ratio=k.ppl_ratio * 1.01) is None  # the bound is the one applied

    # a chat template that does not render the komt prompt
    wrong = _damaged_copy(folder, tmp_path / "template")
    cfg = json.loads((wrong / "tokenizer_config.json").read_text())
    cfg["chat_template"] = LLAMA.chat_template
    (wrong / "tokenizer_config.json").write_text(json.dumps(cfg))
    k = check_checkpoint(wrong, reference, MISTRAL, cpu, eval_tokens=256)
    assert not k.template_ok and "chat template does not render the komt prompt" in acceptance_failure(k)

    # weights that do not load: a one-line rejection, not a traceback
    broken = _damaged_copy(folder, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:4096])
    with pytest.raises(GptqRejected, match="does not reload in transformers"):
        check_checkpoint(broken, reference, MISTRAL, cpu, eval_tokens=256)


def test_cpu_reference_perplexity_streams_layers_and_equals_the_whole_model(tiny_mistral, monkeypatch):
    """On a CPU the unquantized reference runs one layer at a time, with the whole model's perplexity."""
    import komt_edge.gptq as gptq

    windows = [list(range(5, 69)), list(range(100, 140))]
    cpu = torch.device("cpu")
    whole = gptq.perplexity(gptq._load_causal_lm(tiny_mistral, cpu, torch.bfloat16), windows, cpu)
    monkeypatch.setattr(gptq, "_load_causal_lm", lambda *a: pytest.fail("the CPU reference loaded the whole model"))
    streamed = gptq.reference_perplexity(tiny_mistral, windows, cpu, torch.bfloat16)
    assert math.isfinite(streamed) and abs(streamed / whole - 1) < 1e-6, (streamed, whole)
