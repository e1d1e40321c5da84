"""`komt-edge train`: komt's recipe as the plan, prompt masking on komt's templates, located data errors, a CPU
run whose loss falls and whose adapter merges, converts and verifies, resume from a checkpoint, shipped configs.

Nothing here needs a GPU: the CUDA plan (4/8/16-bit loading, paged AdamW, gradient checkpointing) is checked as
the configuration objects that would be built.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from komt_edge.errors import KomtError
from komt_edge.records import Record, prompt_of
from komt_edge.templates import LLAMA, MISTRAL, template_for
from komt_edge.train_data import IGNORE_INDEX, Collator, TrainTokenizer, encode_record, load_records, prepare

from .conftest import N_THREADS, ROOT, run_cli

DATA = Path(__file__).parent / "data" / "ko_instruct.jsonl"
QUIET = dict(progress=False, log=lambda *_: None)
# Small and fast on 2 CPU cores: 4 records a step, short sequences, a high learning rate.
FAST = dict(lr=3e-3, batch_size=4, max_length=96, warmup_steps=1)


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err
    return lines[-1]


# -- data: the one template, masking, located errors -----------------------------------------------------

@pytest.mark.parametrize("family", ["mistral", "llama"])
def test_prompt_tokens_are_masked_and_match_inference(family, request):
    from komt_edge.verify import ReferenceTokenizer

    base = request.getfixturevalue(f"tiny_{family}")
    tok, tmpl = TrainTokenizer(base), template_for(family)
    reference = ReferenceTokenizer(base)  # what verify and llama.cpp feed the model at inference
    for record in load_records(DATA):
        ex = encode_record(tok, tmpl, record, max_length=2048)
        prompt_ids = reference.encode(tmpl.format(prompt_of(record)))
        assert ex.input_ids[: ex.prompt_len] == prompt_ids  # the mask covers exactly the inference prompt
        assert ex.labels[: ex.prompt_len] == [IGNORE_INDEX] * ex.prompt_len
        assert ex.labels[ex.prompt_len:] == ex.input_ids[ex.prompt_len:]
        assert ex.input_ids[0] == reference.bos_id and ex.input_ids[-1] == tok.eos_id
        # the answer, and only it, is learned
        assert tok.decode_continuation(ex.input_ids[ex.prompt_len:-1]) == record.output


def test_input_joins_the_instruction_inside_the_template():
    record = Record("다음 단어의 반대말을 쓰세요.", "작다", "크다")
    assert prompt_of(record) == "다음 단어의 반대말을 쓰세요.\n\n크다"
    assert prompt_of(Record("질문", "답")) == "질문"
    assert MISTRAL.format(prompt_of(record)) == "[INST]다음 단어의 반대말을 쓰세요.\n\n크다 [/INST]"
    assert template_for("llama") is LLAMA and template_for("mistral") is MISTRAL


def test_training_and_calibration_read_a_record_alike(tiny_llama, tmp_path):
    """One data file, one text: what `train` learns from a record is what `gptq --calibration` calibrates on."""
    from komt_edge.corpora import load_examples

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"instruction": "다음 단어를 영어로 번역하세요.", "input": "사과", "output": "apple"},
        {"instruction": "한국의 수도는 어디인가요?", "output": "서울입니다."},
        {"prompt": "인사해 주세요.", "response": "안녕하세요."},
        {"messages": [{"role": "user", "content": "김치는?"}, {"role": "assistant", "content": "발효 음식입니다."}]},
    ]), encoding="utf-8")
    records, examples = load_records(path), load_examples(path)
    assert [ex.prompt for ex in examples] == [prompt_of(r) for r in records] == [
        "다음 단어를 영어로 번역하세요.\n\n사과", "한국의 수도는 어디인가요?", "인사해 주세요.", "김치는?"]
    assert [ex.text for ex in examples] == [r.output for r in records] == [
        "apple", "서울입니다.", "안녕하세요.", "발효 음식입니다."]
    tok = TrainTokenizer(tiny_llama)
    for tmpl in (LLAMA, MISTRAL):
        for record, example in zip(records, examples):
            assert example.render(tmpl) == tmpl.format(prompt_of(record)) + record.output
            trained = encode_record(tok, tmpl, record, max_length=2048)  # the tokens between bos and eos
            assert tok.decode(trained.input_ids[1:-1]) == example.render(tmpl)


@pytest.mark.parametrize("output", [" 앞에 공백이 있는 답", "]]> 괄호로 시작하는 답"])
def test_sentencepiece_merge_across_the_boundary_keeps_the_prompt_tokens(output, tiny_llama):
    """The llama template ends in a space that SentencePiece joins to the answer's first piece: the prompt's
    tokens must still be the inference prompt's, and prompt + answer must decode to the whole text."""
    tok = TrainTokenizer(tiny_llama)
    record = Record("경계 테스트", output)
    prompt_text = LLAMA.format(prompt_of(record))
    joint = tok.encode(prompt_text + output)
    prompt_ids = tok.encode(prompt_text)
    assert joint[: len(prompt_ids)] != prompt_ids  # the case to handle: the joint tokenization merged
    ex = encode_record(tok, LLAMA, record, max_length=2048)
    assert ex.boundary_merge
    assert ex.input_ids[: ex.prompt_len] == prompt_ids
    assert set(ex.labels[: ex.prompt_len]) == {IGNORE_INDEX}
    assert tok.decode(ex.input_ids[1:-1]) == prompt_text + output


def test_truncation_and_skipped_records_are_reported(tiny_mistral):
    tok = TrainTokenizer(tiny_mistral)
    train, evals, stats = prepare(DATA, tok, MISTRAL, max_length=24, eval_split=0.0, seed=0)
    assert stats.truncated > 0 and all(len(e.input_ids) <= 24 for e in train)
    assert stats.longest > 24
    assert stats.skipped == stats.records - len(train) - len(evals)
    assert "truncated" in stats.describe()
    for e in train:  # a truncated record keeps its mask and some answer tokens
        assert any(x != IGNORE_INDEX for x in e.labels)
    batch = Collator(tok.pad_id)([{"input_ids": e.input_ids, "labels": e.labels} for e in train[:3]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


BAD_DATA = [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n{"instruction": "e",}\n',
     "line 4: not valid JSON"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "질문만 있어요"}\n',
     'line 2: "output" is missing'),
    ("bad.jsonl", '{"instruction": 3, "output": "b"}\n', 'line 1: "instruction" must be a string, got int'),
    ("bad.jsonl", '["instruction", "output"]\n', "line 1: expected a JSON object"),
    ("bad.jsonl", '{"instruction": "a", "output": "  "}\n', 'line 1: "output" is empty'),
    ("bad.json", '[{"instruction": "a", "output": "b"}, {"output": "c"}]', 'record 2: "instruction" is missing'),
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     "line 2: not valid JSON"),
    ("bad.json", '{"instruction": "a", "output": "b"}', "expected a JSON list"),
    ("empty.jsonl", "\n\n", "holds no records"),
]


@pytest.mark.parametrize("name,text,message", BAD_DATA)
def test_bad_rows_give_a_located_error(name, text, message, tmp_path):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KomtError, match=message.replace("(", r"\(")) as info:
        load_records(path)
    assert str(path) in str(info.value)


def test_json_list_and_input_field_are_read(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "번역하세요.", "input": "사과", "output": "apple"},
                                {"instruction": "인사", "output": "안녕하세요", "extra": 1}],
                               ensure_ascii=False))
    records = load_records(path)
    assert [prompt_of(r) for r in records] == ["번역하세요.\n\n사과", "인사"]
    assert records[1].where == "record 2"


def test_cli_bad_data_is_one_line_with_the_line_number(monkeypatch, capsys, tiny_mistral, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ["b"]}\n', encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", str(tiny_mistral), "--data", str(bad),
                           "-o", str(tmp_path / "out"))
    assert code == 1
    line = error_line(err)
    assert "bad.jsonl line 2" in line and '"output" must be a string' in line
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started


# -- the recipe ------------------------------------------------------------------------------------------

def test_recipe_is_the_one_table_of_defaults():
    """train() and `komt-edge train` take their defaults from RECIPE, field by field."""
    import dataclasses
    import inspect

    from komt_edge.cli import cli
    from komt_edge.train import RECIPE, train

    keywords = inspect.signature(train).parameters
    options = {param.name: param.default for param in cli.commands["train"].params}
    for field in dataclasses.fields(RECIPE):
        value = getattr(RECIPE, field.name)
        assert keywords[field.name].default == value, field.name
        assert options[field.name] == (",".join(value) if field.name == "target_modules" else value), field.name



# komt's recipe as davidkim205/komt publishes it (finetune_with_lora.sh: --learning_rate 1e-5 --warmup_steps 2
# --save_steps 1000 --num_train_epochs 1 --per_device_train_batch_size 1 --gradient_accumulation_steps 1
# --model_max_length 2048 --logging_steps 1 --lr_scheduler_type cosine --gradient_checkpointing True;
# finetune_with_lora.py: LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, the seven projections), nf4 double
# quantization with bfloat16 compute). Written out here, not read from RECIPE, so that a changed default fails.
KOMT_RECIPE = dict(lora_r=8, lora_alpha=32, lora_dropout=0.05,
                   target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                   epochs=1.0, max_steps=None, lr=1e-5, batch_size=1, grad_accum=1, max_length=2048, warmup_steps=2,
                   save_steps=1000, logging_steps=1)
# komt-edge's own choices where komt's script has none that fits (README's table says so): komt evaluates nothing
# (--evaluation_strategy no) and keeps 100 checkpoints; komt-edge holds out 5% for eval at every save and keeps 3.
KOMT_EDGE_CHOICES = dict(eval_split=0.05, eval_steps=None, save_total_limit=3, seed=42, bits=None, optim=None,
                         gradient_checkpointing=None)


def test_recipe_defaults_are_komts_values_written_out():
    import dataclasses

    from komt_edge.train import RECIPE

    expected = {**KOMT_RECIPE, **KOMT_EDGE_CHOICES}
    assert set(expected) == {f.name for f in dataclasses.fields(RECIPE)}  # every default is pinned here
    for name, value in expected.items():
        assert getattr(RECIPE, name) == value and type(getattr(RECIPE, name)) is type(value), name


# -- the CUDA plan, checked without a GPU ----------------------------------------------------------------

def test_cuda_plan_is_komts_qlora_recipe(tmp_path):
    import torch

    from komt_edge.train import (choose_precision, model_load_kwargs, quantization_config,
                                 training_arguments_kwargs)

    p = choose_precision(None, "auto", cuda_available=True, bf16_supported=True)
    assert (p.device, p.bits, p.compute_dtype) == ("cuda", 4, "bfloat16")
    q = quantization_config(p)
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    kw = model_load_kwargs(p, local_rank=1)
    assert kw["device_map"] == {"": 1} and kw["dtype"] == torch.bfloat16 and kw["quantization_config"].load_in_4bit
    ds = model_load_kwargs(p, deepspeed=True)  # ZeRO-3 shards the model itself; 4-bit storage must match
    assert "device_map" not in ds and ds["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16

    ta = training_arguments_kwargs(p, output_dir=tmp_path, epochs=1, max_steps=None, lr=1e-5, batch_size=1,
                                   grad_accum=1, warmup_steps=2, logging_steps=1, save_steps=1000, save_total_limit=3,
                                   eval_steps=None, has_eval=True, seed=42)
    assert ta["optim"] == "paged_adamw_32bit"
    assert ta["gradient_checkpointing"] and ta["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert ta["bf16"] and not ta["fp16"] and not ta["use_cpu"]
    assert ta["lr_scheduler_type"] == "cosine" and ta["eval_strategy"] == "steps" and ta["eval_steps"] == 1000
    assert ta["eval_on_start"] and ta["max_steps"] == -1 and ta["num_train_epochs"] == 1.0

    p8 = choose_precision(8, "cuda", cuda_available=True, bf16_supported=True)
    assert quantization_config(p8).load_in_8bit
    p16 = choose_precision(16, "cuda", cuda_available=True, bf16_supported=False)  # e.g. a V100: fp16
    assert quantization_config(p16) is None and model_load_kwargs(p16)["dtype"] == torch.float16
    ta16 = training_arguments_kwargs(p16, output_dir=tmp_path, epochs=1, max_steps=5, lr=1e-4, batch_size=2,
                                     grad_accum=4, warmup_steps=0, logging_steps=1, save_steps=10,
                                     save_total_limit=None, eval_steps=None, has_eval=False, seed=0,
                                     deepspeed_config="ds.json")
    assert ta16["fp16"] and not ta16["bf16"] and ta16["eval_strategy"] == "no"
    assert ta16["optim"] == "adamw_torch" and ta16["deepspeed"] == "ds.json"  # DeepSpeed brings its AdamW


def test_cpu_fallback_plan_builds_real_training_arguments(tmp_path):
    from komt_edge.train import build_training_arguments, choose_precision, model_load_kwargs, training_arguments_kwargs

    p = choose_precision(None, "auto", cuda_available=False)
    assert (p.device, p.bits, p.compute_dtype) == ("cpu", 32, "float32")
    assert "full-precision" in p.description and "CUDA" in p.description
    assert "quantization_config" not in model_load_kwargs(p) and "device_map" not in model_load_kwargs(p)
    args = build_training_arguments(training_arguments_kwargs(
        p, output_dir=tmp_path, epochs=2, max_steps=None, lr=1e-4, batch_size=2, grad_accum=2, warmup_steps=2,
        logging_steps=1, save_steps=5, save_total_limit=2, eval_steps=3, has_eval=True, seed=1, resume=True))
    assert args.use_cpu and args.optim == "adamw_torch" and not args.gradient_checkpointing
    assert args.eval_steps == 3 and not args.eval_on_start  # a resumed run does not re-evaluate step 0


def test_cuda_asked_for_but_absent_is_a_clear_error(monkeypatch, capsys, tiny_mistral, tmp_path):
    from komt_edge.train import choose_precision

    with pytest.raises(KomtError, match="--device cuda: torch sees no CUDA GPU"):
        choose_precision(None, "cuda", cuda_available=False)
    with pytest.raises(KomtError, match="--bits 4 needs a CUDA GPU"):
        choose_precision(4, "auto", cuda_available=False)
    with pytest.raises(KomtError, match="--bits 16 needs a CUDA GPU"):
        choose_precision(16, "cpu", cuda_available=True)
    # Through the CLI on a machine without a GPU (torch made to see none, so that a GPU machine runs it too): one
    # line, before anything is loaded.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", str(tiny_mistral), "--data", str(DATA),
                           "-o", str(tmp_path / "out"), "--device", "cuda")
    assert code == 1 and "--device cuda" in error_line(err)
    assert not (tmp_path / "out").exists()


# -- shipped multi-GPU configs ---------------------------------------------------------------------------

DS_VALIDATE = r"""
import json, sys
from transformers import TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
from deepspeed.runtime.config import DeepSpeedConfig

args = TrainingArguments(output_dir=sys.argv[2], use_cpu=True, report_to="none", per_device_train_batch_size=2,
                         gradient_accumulation_steps=4, learning_rate=1e-4, bf16=False)
hf = HfTrainerDeepSpeedConfig(sys.argv[1])  # how the Trainer reads it: "auto" values filled from the arguments
hf.trainer_config_process(args)
class Model:
    class config:
        hidden_size = 4096
hf.trainer_config_finalize(args, Model(), 100)
assert "auto" not in json.dumps(hf.config), hf.config
ds = DeepSpeedConfig(hf.config)  # DeepSpeed's own parser: unknown or ill-typed keys are errors
z = ds.zero_config
device = lambda d: str(getattr(d, "value", d))
print(json.dumps({"stage": int(z.stage), "offload_param": device(z.offload_param.device),
                  "offload_optimizer": device(z.offload_optimizer.device), "train_batch_size": ds.train_batch_size,
                  "gather_on_save": z.gather_16bit_weights_on_model_save, "zero3": hf.is_zero3(),
                  "offload": hf.is_offload()}))
bad = json.loads(json.dumps(hf.config))
bad["zero_optimization"]["offload_parm"] = bad["zero_optimization"].pop("offload_param")  # a typo is caught
try:
    DeepSpeedConfig(bad)
except Exception as err:
    print(json.dumps({"typo_rejected": "offload_parm" in str(err)}))
"""


@pytest.mark.subprocess
def test_deepspeed_zero3_offload_config_is_valid(tmp_path):
    from komt_edge.configs import config_path

    path = config_path("zero3")
    cfg = json.loads(path.read_text())  # valid JSON (komt's own config is not)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3
    assert z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"] is True  # the adapter can be saved from ZeRO-3

    # Validated by DeepSpeed itself, as the Trainer would hand it over. DeepSpeed is installed by `make install`
    # into .cache/deepspeed, outside the virtualenv, only for this check (no ops are built).
    target = ROOT / ".cache" / "deepspeed"
    if not (target / "deepspeed" / "__init__.py").is_file():
        pytest.fail(f"{target} is missing: run `make install`")
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", DS_VALIDATE, str(path), str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, line, typo = proc.stdout.strip().splitlines()
    assert json.loads(typo) == {"typo_rejected": True}
    got = json.loads(line)
    assert got == {"stage": 3, "offload_param": "cpu", "offload_optimizer": "cpu", "train_batch_size": 8,
                   "gather_on_save": True, "zero3": True, "offload": True}


def test_deepspeed_option_errors(tmp_path):
    from komt_edge.train import resolve_deepspeed

    assert resolve_deepspeed(None) is None
    with pytest.raises(KomtError, match="no such file"):
        resolve_deepspeed(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"optimizer": {"params": {"eps": "auto",, "weight_decay": 0}}}')  # komt's own mistake
    with pytest.raises(KomtError, match="not valid JSON"):
        resolve_deepspeed(str(broken))


def test_accelerate_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig

    from komt_edge.configs import config_path

    multi = ClusterConfig.from_yaml_file(str(config_path("multi-gpu")))
    assert multi.distributed_type == "MULTI_GPU" and multi.mixed_precision == "bf16"
    zero3 = ClusterConfig.from_yaml_file(str(config_path("accelerate-zero3")))
    assert zero3.distributed_type == "DEEPSPEED"
    assert zero3.deepspeed_config["zero_stage"] == 3
    assert zero3.deepspeed_config["offload_param_device"] == "cpu"
    assert zero3.deepspeed_config["offload_optimizer_device"] == "cpu"


# -- training on CPU -------------------------------------------------------------------------------------

@pytest.mark.train
def test_train_merge_gguf_verify(monkeypatch, capsys, tiny_mistral, tmp_path):
    """CLI → adapter whose loss fell → merge → GGUF q8_0 with the adapter → verify passes."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from safetensors.torch import load_file

    from komt_edge.gguf import convert
    from komt_edge.merge import merge
    from komt_edge.verify import verify

    adapter = tmp_path / "komt-tiny-lora"
    code, out, err = run_cli(monkeypatch, capsys, "train", "--model", str(tiny_mistral), "--data", str(DATA),
                             "-o", str(adapter), "--max-steps", "8", "--lr", "3e-3", "--batch-size", "4",
                             "--max-length", "96", "--eval-split", "0.25", "--save-steps", "4",
                             "--warmup-steps", "1", "--json", str(tmp_path / "train.json"))
    assert code == 0, err
    assert "CPU: full-precision (float32) LoRA" in out  # the fallback is announced
    assert f"komt-edge gguf {tiny_mistral} --adapter {adapter} --template mistral" in out
    reported = json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))  # TrainResult.to_dict()
    assert reported["out"] == str(adapter) and reported["steps"] == 8 and reported["data"]["eval"] == 3

    record = json.loads((adapter / "komt_edge_train.json").read_text())
    res = record["results"]
    assert res["steps"] == 8
    assert res["last_loss"] < res["first_loss"] - 0.5, res  # loss decreases
    assert res["eval_loss"] < res["eval_loss_before"], res  # on the held-out records too
    assert record["data"]["sha256"] == hashlib.sha256(DATA.read_bytes()).hexdigest()
    assert (record["data"]["train"], record["data"]["eval"]) == (9, 3)
    assert record["arguments"]["lora_r"] == 8 and record["arguments"]["lora_alpha"] == 32
    assert record["arguments"]["lora_dropout"] == 0.05 and record["template"] == "mistral"

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_mistral.resolve())
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 32)
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name in ("tokenizer.model", "tokenizer_config.json", "training_args.json", "chat_template.jinja"):
        assert (adapter / name).is_file(), name
    assert not (adapter / "training_args.bin").exists()
    assert (adapter / "checkpoints" / "checkpoint-8").is_dir()
    assert json.loads((adapter / "training_args.json").read_text())["optim"] == "adamw_torch"
    rows = list(csv.DictReader(open(adapter / "logs" / "metrics.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in rows if r["split"] == "train"] == list(range(1, 9))
    assert [int(r["step"]) for r in rows if r["split"] == "eval"] == [0, 4, 8]
    lora_b = [t for k, t in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7 and all(t.abs().max() > 0 for t in lora_b)  # trained, not the zero init

    # The chat template shipped with the adapter renders the prompt the adapter was trained on.
    rendered = ImmutableSandboxedEnvironment().from_string((adapter / "chat_template.jinja").read_text()).render(
        messages=[{"role": "user", "content": "한국의 수도는 어디인가요?"}], eos_token="</s>")
    assert rendered == MISTRAL.format("한국의 수도는 어디인가요?")

    merged = merge(tiny_mistral, adapter, tmp_path / "merged")
    assert json.loads((merged / "komt_edge_merge.json").read_text())["merged_modules"] == 14
    files = convert(str(tiny_mistral), ["q8_0"], tmp_path / "gguf", adapter=str(adapter), template="mistral",
                    n_threads=2, progress=False)
    report = verify(files[0], str(tiny_mistral), adapter=str(adapter), template="mistral", n_threads=N_THREADS)
    assert report.passed, report.summary()


@pytest.mark.train
def test_resume_continues_from_the_saved_step(tiny_llama, tmp_path):
    """An interrupted run resumed from its step-2 checkpoint ends where the uninterrupted run ended."""
    from safetensors.torch import load_file

    from komt_edge.train import train

    out = tmp_path / "llama-lora"
    full = train(str(tiny_llama), DATA, out, max_steps=4, save_steps=2, eval_split=0.0, **FAST, **QUIET)
    assert full.steps == 4 and full.resumed_from is None and full.template == "llama"
    uninterrupted = load_file(str(out / "adapter_model.safetensors"))

    # Interrupt after step 2: the step-4 checkpoint and the final adapter never got written.
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    with pytest.raises(KomtError, match="pass --resume"):
        train(str(tiny_llama), DATA, out, max_steps=4, save_steps=2, eval_split=0.0, **FAST, **QUIET)
    with pytest.raises(KomtError, match="--lora-r differs"):
        train(str(tiny_llama), DATA, out, max_steps=4, save_steps=2, eval_split=0.0, lora_r=4, resume=True,
              **FAST, **QUIET)

    resumed = train(str(tiny_llama), DATA, out, max_steps=4, save_steps=2, eval_split=0.0, resume=True,
                    **FAST, **QUIET)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert [e["step"] for e in resumed.log_history if "loss" in e] == [1, 2, 3, 4]
    assert resumed.first_loss == full.first_loss  # the history before the checkpoint is kept
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv", encoding="utf-8")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    after = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(after) == sorted(uninterrupted)
    for name, tensor in after.items():  # same optimizer, scheduler, data order and dropout RNG as the full run
        assert (tensor - uninterrupted[name]).abs().max() < 1e-5, name
    assert abs(resumed.last_loss - full.last_loss) < 1e-4


def test_resume_without_checkpoint_is_refused(tiny_mistral, tmp_path):
    from komt_edge.train import train

    with pytest.raises(KomtError, match="no checkpoint-N folder"):
        train(str(tiny_mistral), DATA, tmp_path / "new", resume=True, **QUIET)
