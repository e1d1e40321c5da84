"""`komt-edge train --model MODEL --data FILE -o OUT`: a komt-style LoRA adapter from Korean instruction data.

komt's recipe is the default (``davidkim205/komt`` finetune_with_lora.py/.sh): the base loaded in 4-bit nf4 with
double quantization and bfloat16 compute, LoRA r=8, alpha=32, dropout 0.05 on q/k/v/o/gate/up/down, prompt
tokens masked, 1 epoch, learning rate 1e-5 with a cosine schedule and 2 warmup steps, batch 1, 2048 tokens,
gradient checkpointing. Every value is an option; their defaults are :data:`RECIPE`, which ``train()`` and the
CLI both read.

Where it runs:

- CUDA: the base in 4-bit nf4 (double quant, bf16 compute; fp16 on GPUs without bf16), 8-bit or 16-bit, or
  32-bit; gradient checkpointing; paged AdamW (bitsandbytes). Multi-GPU through ``accelerate launch`` (data
  parallel) and DeepSpeed ZeRO-3 with CPU offload (``--deepspeed zero3``, the config in
  ``komt_edge/configs``).
- CPU (no CUDA GPU, or ``--device cpu``): a full-precision float32 LoRA, announced as such; meant for small
  models (the tests' tiny models). Quantized loading needs CUDA and is refused on CPU.

MODEL is what the adapter applies to: a local folder, a Hub id, or a zoo name (the merged komt model, as komt
fine-tuned its own models), so that ``komt-edge gguf MODEL --adapter OUT`` and ``komt-edge merge`` take it
directly. OUT holds the adapter (adapter_config.json with the base recorded, adapter_model.safetensors), the
tokenizer and the chat template trained on, ``komt_edge_train.json`` (every argument, the data's sha256 and counts,
the results), ``training_args.json``, ``checkpoints/`` (for ``--resume``) and ``logs/metrics.csv``
(plus ``logs/tensorboard/`` with ``--tensorboard``). The data format and the masking are described in
``komt_edge.train_data``.

The prompt format (:func:`prompt_format`): komt's template for komt's models and families (zoo models, SentencePiece
Llama 2 and Mistral checkpoints) or when ``--template`` names one; a byte-level BPE Llama 3 or Qwen2/2.5 checkpoint
trains on its own chat template (ChatML for Qwen2.5, Llama 3 Instruct's headers), the one its GGUF file carries,
and one without a template of its own is refused unless ``--template llama`` asks for komt's.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from . import __version__
from .atomic import ensure_writable_dir
from .errors import KomtError
from .records import INPUT_SEPARATOR
from .templates import template_option_error
from .train_data import DataStats, load_records, prepare
from .util import dist_versions

if TYPE_CHECKING:
    from .templates import PromptTemplate
    from .train_data import ChatFormat, TrainTokenizer
    from .zoo import ResolvedModel

RUN_FILE = "komt_edge_run.json"  # written when a run starts; --resume checks it
RESULT_FILE = "komt_edge_train.json"  # written with the adapter
CPU_LARGE_MODEL = 3_000_000_000  # parameters: past this the CPU fallback warns that it is meant for small models
RECORDED_VERSIONS = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed")  # in RESULT_FILE


@dataclass(frozen=True)
class Recipe:
    """komt's recipe (finetune_with_lora.py / finetune_with_lora.sh): the defaults of :func:`train` and of
    ``komt-edge train``, one field per keyword of :func:`train`. A None is decided by the run (see its comment)."""

    bits: int | None = None  # 4 (nf4 QLoRA) on CUDA, 32 on CPU
    lora_r: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    epochs: float = 1.0
    max_steps: int | None = None  # None: run the epochs
    lr: float = 1e-5  # peak, cosine schedule
    batch_size: int = 1  # per device
    grad_accum: int = 1
    max_length: int = 2048  # tokens per record
    eval_split: float = 0.05
    warmup_steps: int = 2
    save_steps: int = 1000
    save_total_limit: int | None = 3
    eval_steps: int | None = None  # None: every save_steps
    logging_steps: int = 1
    seed: int = 42
    optim: str | None = None  # paged_adamw_32bit on CUDA, adamw_torch on CPU and under DeepSpeed
    gradient_checkpointing: bool | None = None  # on for CUDA, off on CPU


RECIPE = Recipe()


# -- where and how the base is loaded -----------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    device: str  # "cuda" or "cpu"
    bits: int  # 4, 8, 16 or 32: how the base weights are held
    compute_dtype: str  # "bfloat16", "float16" or "float32"

    @property
    def description(self) -> str:
        if self.device == "cpu":
            return ("CPU: full-precision (float32) LoRA, the fallback for small models; 4/8-bit QLoRA needs a "
                    "CUDA GPU")
        base = {4: "4-bit nf4 QLoRA (double quantization)", 8: "8-bit LoRA (LLM.int8)",
                16: "16-bit LoRA", 32: "32-bit LoRA"}[self.bits]
        return f"CUDA: {base}, {self.compute_dtype} compute"


def choose_precision(bits: int | None, device: str = "auto", *, cuda_available: bool | None = None,
                     bf16_supported: bool | None = None) -> Precision:
    """bits None: 4 on CUDA (komt's recipe), 32 on CPU. ``device="cuda"`` without a GPU is an error."""
    import torch

    if device not in ("auto", "cuda", "cpu"):
        raise KomtError(f"--device {device!r}: choose auto, cuda or cpu")
    if bits not in (None, 4, 8, 16, 32):
        raise KomtError(f"--bits {bits}: choose 4, 8, 16 or 32")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "cuda" and not cuda_available:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise KomtError(f"--device cuda: torch sees no CUDA GPU (torch {torch.__version__}, {build}); install a CUDA "
                        "build of torch and check CUDA_VISIBLE_DEVICES, or use --device cpu for the full-precision "
                        "LoRA fallback on small models")
    use_cuda = device == "cuda" or (device == "auto" and cuda_available)
    if not use_cuda:
        if bits not in (None, 32):
            why = "no CUDA GPU is available" if device == "auto" else "--device cpu was given"
            raise KomtError(f"--bits {bits} needs a CUDA GPU (bitsandbytes / half-precision training) but {why}: "
                            "leave --bits out (or give --bits 32) for the full-precision CPU LoRA on a small model")
        return Precision("cpu", 32, "float32")
    bits = 4 if bits is None else bits
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    compute = "float32" if bits == 32 else ("bfloat16" if bf16_supported else "float16")
    return Precision("cuda", bits, compute)


def quantization_config(precision: Precision, *, deepspeed: bool = False):
    """The BitsAndBytesConfig for a 4/8-bit base (komt's: nf4, double quant, bf16 compute), else None."""
    from transformers import BitsAndBytesConfig

    if precision.bits == 4:
        extra = {"bnb_4bit_quant_storage": precision.compute_dtype} if deepspeed else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=precision.compute_dtype, **extra)
    if precision.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def model_load_kwargs(precision: Precision, *, deepspeed: bool = False, local_rank: int = 0) -> dict:
    """Keyword arguments for AutoModelForCausalLM.from_pretrained."""
    import torch

    dtype = getattr(torch, precision.compute_dtype)
    kwargs: dict = {"dtype": dtype}
    qcfg = quantization_config(precision, deepspeed=deepspeed)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if precision.device == "cuda" and not deepspeed:
        kwargs["device_map"] = {"": local_rank}  # one full copy per process (data parallel)
    return kwargs


def default_optim(precision: Precision, deepspeed: bool) -> str:
    if deepspeed:
        return "adamw_torch"  # the DeepSpeed config's own (CPU-offloaded) AdamW replaces it
    return "paged_adamw_32bit" if precision.device == "cuda" else "adamw_torch"


def training_arguments_kwargs(precision: Precision, *, output_dir: str | Path, epochs: float, max_steps: int | None,
                              lr: float, batch_size: int, grad_accum: int, warmup_steps: int, logging_steps: int,
                              save_steps: int, save_total_limit: int | None, eval_steps: int | None, has_eval: bool,
                              seed: int, optim: str | None = None, gradient_checkpointing: bool | None = None,
                              deepspeed_config: str | None = None, resume: bool = False) -> dict:
    """The transformers.TrainingArguments of a run, as a dict (testable without a GPU)."""
    gc = precision.device == "cuda" if gradient_checkpointing is None else gradient_checkpointing
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=float(epochs),
        max_steps=int(max_steps) if max_steps else -1,
        learning_rate=float(lr),
        lr_scheduler_type="cosine",
        warmup_steps=int(warmup_steps),
        weight_decay=0.0,
        per_device_train_batch_size=int(batch_size),
        per_device_eval_batch_size=int(batch_size),
        gradient_accumulation_steps=int(grad_accum),
        optim=optim or default_optim(precision, bool(deepspeed_config)),
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        bf16=precision.device == "cuda" and precision.compute_dtype == "bfloat16",
        fp16=precision.device == "cuda" and precision.compute_dtype == "float16",
        use_cpu=precision.device == "cpu",
        logging_steps=int(logging_steps),
        logging_first_step=True,
        save_strategy="steps",
        save_steps=int(save_steps),
        save_total_limit=save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=int(eval_steps or save_steps) if has_eval else None,
        eval_on_start=has_eval and not resume,
        seed=int(seed),
        data_seed=int(seed),
        report_to="none",  # CSV and TensorBoard are added as callbacks, written under OUT/logs
        disable_tqdm=True,  # komt-edge draws its own progress bar
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        deepspeed=deepspeed_config,
    )


def build_training_arguments(kwargs: dict):
    """transformers.TrainingArguments from ``training_arguments_kwargs``; newer transformers call gradient
    checkpointing activation checkpointing."""
    import dataclasses

    from transformers import TrainingArguments

    kwargs = dict(kwargs)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in names:
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    return TrainingArguments(**kwargs)


def resolve_deepspeed(deepspeed: str | None) -> str | None:
    """None, a shipped config's short name (zero3) or a JSON file; returns a path."""
    if not deepspeed:
        return None
    from .configs import CONFIGS, config_path

    if deepspeed in CONFIGS:
        path = config_path(deepspeed)
    else:
        path = Path(deepspeed)
        if not path.is_file():
            raise KomtError(f"--deepspeed {deepspeed}: no such file; give a DeepSpeed JSON config or 'zero3' for the "
                            "shipped ZeRO-3 CPU-offload config")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KomtError(f"--deepspeed {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if importlib.util.find_spec("deepspeed") is None:
        raise KomtError("--deepspeed needs the deepspeed package: pip install deepspeed "
                        "(or pip install 'komt-edge[gpu]')")
    return str(path)


def _require_bitsandbytes(reason: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise KomtError(f"{reason} needs bitsandbytes: pip install 'komt-edge[gpu]' (or pip install bitsandbytes)")


# -- logging ---------------------------------------------------------------------------------------------

CSV_FIELDS = ("step", "epoch", "split", "loss", "learning_rate", "grad_norm", "tokens_seen", "elapsed_s")


def _callbacks(csv_path: Path, total_hint: int, progress: bool, log: Callable[[str], None], resumed_step: int):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class KomtLogger(TrainerCallback):
        """Console lines and a progress bar on the main process, and OUT/logs/metrics.csv."""

        def __init__(self):
            self.bar = None
            self.start = time.monotonic()

        def _emit(self, line: str) -> None:
            if self.bar is not None:
                self.bar.write(line)
            else:
                log(line)

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            csv_path.parent.mkdir(parents=True, exist_ok=True)
            rows = []
            if csv_path.is_file():  # resumed: keep what was logged up to the checkpoint, drop what follows it
                with open(csv_path, newline="", encoding="utf-8") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resumed_step]
            with open(csv_path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, CSV_FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            if progress:
                self.bar = tqdm(total=state.max_steps or total_hint, initial=state.global_step, unit="step",
                                desc="train", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            elapsed = time.monotonic() - self.start
            rows = []
            if "loss" in logs:
                rows.append(("train", logs["loss"]))
            if "eval_loss" in logs:
                rows.append(("eval", logs["eval_loss"]))
            with open(csv_path, "a", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, CSV_FIELDS)
                for split, loss in rows:
                    writer.writerow({"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "split": split,
                                     "loss": loss, "learning_rate": logs.get("learning_rate", ""),
                                     "grad_norm": logs.get("grad_norm", ""),
                                     "tokens_seen": state.num_input_tokens_seen, "elapsed_s": round(elapsed, 3)})
            for split, loss in rows:
                line = f"step {state.global_step}/{state.max_steps}  {split} loss {loss:.4f}"
                if split == "train":
                    if "learning_rate" in logs:
                        line += f"  lr {logs['learning_rate']:.3g}"
                    if logs.get("grad_norm") is not None:
                        line += f"  grad norm {logs['grad_norm']:.3g}"
                self._emit(line)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return KomtLogger()


# -- the run ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out: Path
    base_model: str  # recorded in adapter_config.json
    template: str  # komt template family (llama or mistral), or "own": the model's own chat template
    mode: str  # Precision.description
    steps: int
    resumed_from: int | None  # the checkpoint step a --resume run started from
    first_loss: float | None  # first logged train loss (of the whole run, across resumes)
    last_loss: float | None  # last logged train loss
    eval_loss_before: float | None  # held-out loss before training
    eval_loss: float | None  # held-out loss after training
    tokens_seen: int  # non-padding tokens through the model (whole run)
    runtime_s: float  # of this process's training loop
    tokens_per_s: float  # this process's tokens / runtime
    steps_per_s: float
    data: DataStats
    log_history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out)}

    def summary(self) -> str:
        def f(x):
            return "-" if x is None else f"{x:.4f}"
        lines = [f"adapter written to {self.out}",
                 f"  {self.mode}",
                 f"  steps {self.steps}" + (f" (resumed from step {self.resumed_from})" if self.resumed_from else ""),
                 f"  train loss {f(self.first_loss)} → {f(self.last_loss)}",
                 f"  eval loss {f(self.eval_loss_before)} → {f(self.eval_loss)} on {self.data.eval} held-out records",
                 f"  {self.tokens_per_s:.1f} tokens/s, {self.steps_per_s:.3f} steps/s over {self.runtime_s:.1f} s"]
        return "\n".join(lines)


def _check_out(out: Path, resume: bool) -> str | None:
    """The checkpoint to resume from, or None; refuses to mix runs."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = out / "checkpoints"
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if resume:
        if last is None:
            raise KomtError(f"--resume: {ckpt_dir} holds no checkpoint-N folder to resume from; start without "
                            "--resume")
        return last
    if last is not None:
        raise KomtError(f"{out} already holds checkpoints of a run ({Path(last).name}): pass --resume to continue it, "
                        "or choose a new -o folder")
    if (out / "adapter_config.json").is_file():
        raise KomtError(f"{out} already holds an adapter: choose a new -o folder (or delete it)")
    return None


RESUME_KEYS = ("base_model", "data_sha256", "template", "bits", "lora_r", "lora_alpha", "lora_dropout",
               "target_modules", "max_length", "eval_split", "seed", "batch_size", "grad_accum",
               "chat_template_sha256")


def _check_resume(run_file: Path, run: dict) -> None:
    if not run_file.is_file():
        return
    old = json.loads(run_file.read_text(encoding="utf-8"))
    for key in RESUME_KEYS:
        if key in old and old[key] != run.get(key):
            option = {"data_sha256": "--data", "base_model": "--model",
                      "chat_template_sha256": "the model's chat template"}.get(key, "--" + key.replace("_", "-"))
            raise KomtError(f"--resume: {option} differs from the checkpointed run ({run.get(key)!r} now, {old[key]!r} "
                            "then): resume with the same settings, or start a new -o folder")


def _copy_tokenizer(base: Path, dst: Path, chat_template: str) -> None:
    from .merge import TOKENIZER_FILES

    for fname in TOKENIZER_FILES:
        if fname != "chat_template.jinja" and (base / fname).is_file():
            shutil.copyfile(base / fname, dst / fname)
    cfg_path = dst / "tokenizer_config.json"
    if cfg_path.is_file():  # the template trained on travels as chat_template.jinja; drop tokenizer_config's copy
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    (dst / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def prompt_format(resolved: ResolvedModel, template: str | None,
                  tok: TrainTokenizer) -> tuple[str, PromptTemplate | ChatFormat]:
    """(name, format) of the prompts a run trains on: komt's template (``llama`` or ``mistral``) for komt's models
    and families (zoo models, SentencePiece Llama 2 / Mistral checkpoints) or when ``--template`` asks for it;
    otherwise (byte-level BPE Llama 3, Qwen2/2.5) the checkpoint's own chat template (``own``), rendered as
    inference renders it. A checkpoint of neither kind, without a template of its own, is refused."""
    from .templates import template_for
    from .train_data import ChatFormat
    from .zoo import is_komt_family, model_family, own_chat_template

    if template or is_komt_family(resolved):
        family = model_family(resolved, template)
        return family, template_for(family)
    own = own_chat_template(resolved.path)
    if own is None:
        raise KomtError(f"{resolved.source} has no chat template of its own (no chat_template.jinja, no chat_template "
                        "in tokenizer_config.json), and komt's prompt format is for komt's models: pass --template "
                        "llama to train it on komt's format, or train a checkpoint that carries its chat template "
                        "(an Instruct model's)")
    cfg_path = resolved.path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}

    def text(key: str) -> str | None:
        value = cfg.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return ChatFormat.name, ChatFormat(own[0], bos_token=text("bos_token"), eos_token=tok.decode_continuation(
        [tok.eos_id]), source=own[1])


def _first(history: list[dict], key: str, *, step: int | None = None) -> float | None:
    for entry in history:
        if key in entry and (step is None or entry.get("step") == step):
            return float(entry[key])
    return None


def _last(history: list[dict], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return float(entry[key])
    return None


def train(model: str, data: str | Path, out: str | Path, *, bits: int | None = RECIPE.bits,
          lora_r: int = RECIPE.lora_r, lora_alpha: float = RECIPE.lora_alpha, lora_dropout: float = RECIPE.lora_dropout,
          target_modules: Sequence[str] = RECIPE.target_modules, epochs: float = RECIPE.epochs,
          max_steps: int | None = RECIPE.max_steps, lr: float = RECIPE.lr, batch_size: int = RECIPE.batch_size,
          grad_accum: int = RECIPE.grad_accum, max_length: int = RECIPE.max_length,
          eval_split: float = RECIPE.eval_split, resume: bool = False, template: str | None = None,
          device: str = "auto", warmup_steps: int = RECIPE.warmup_steps, save_steps: int = RECIPE.save_steps,
          save_total_limit: int | None = RECIPE.save_total_limit, eval_steps: int | None = RECIPE.eval_steps,
          logging_steps: int = RECIPE.logging_steps, seed: int = RECIPE.seed, optim: str | None = RECIPE.optim,
          gradient_checkpointing: bool | None = RECIPE.gradient_checkpointing, deepspeed: str | None = None,
          tensorboard: bool = False, allow_pickle: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train a LoRA adapter for MODEL on the instruction records in DATA and write it to OUT."""
    from .checkpoint import read_config
    from .train_data import ChatFormat, Collator, ExampleDataset, TrainTokenizer
    from .zoo import resolve

    # -- arguments ------------------------------------------------------------------------------------------
    target_modules = [m for spec in target_modules for m in str(spec).replace(",", " ").split()]
    checks = [(lora_r >= 1, f"--lora-r {lora_r}: give a rank of at least 1"),
              (lora_alpha > 0, f"--lora-alpha {lora_alpha}: give a positive value"),
              (0 <= lora_dropout < 1, f"--lora-dropout {lora_dropout}: give a value in [0, 1)"),
              (bool(target_modules), "--target-modules: give at least one module name, e.g. q_proj,v_proj"),
              (epochs > 0, f"--epochs {epochs}: give a positive number"),
              (max_steps is None or max_steps >= 1, f"--max-steps {max_steps}: give at least 1"),
              (lr > 0, f"--lr {lr}: give a positive learning rate"),
              (batch_size >= 1 and grad_accum >= 1, "--batch-size and --grad-accum must be at least 1"),
              (save_steps >= 1 and logging_steps >= 1, "--save-steps and --logging-steps must be at least 1"),
              (eval_steps is None or eval_steps >= 1, "--eval-steps must be at least 1"),
              (template_option_error(template) is None, template_option_error(template))]
    for ok, message in checks:
        if not ok:
            raise KomtError(message)
    precision = choose_precision(bits, device)
    ds_config = resolve_deepspeed(deepspeed)
    if precision.bits in (4, 8):
        _require_bitsandbytes(f"--bits {precision.bits}")
    optim_name = optim or default_optim(precision, bool(ds_config))
    if "paged" in optim_name or "8bit" in optim_name:
        _require_bitsandbytes(f"the {optim_name} optimizer")
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise KomtError("--tensorboard needs the tensorboard package: pip install tensorboard") from None

    if float(lora_alpha).is_integer():
        lora_alpha = int(lora_alpha)  # adapter_config.json says 32, as komt's adapters do
    out = Path(out)
    last_checkpoint = _check_out(out, resume)
    records = load_records(data)  # malformed data fails here, before a model is downloaded

    # -- model, template and data ---------------------------------------------------------------------------
    resolved = resolve(model, allow_pickle=allow_pickle, prefer_adapter=False)
    base_path = resolved.path
    config = read_config(base_path)
    qcfg = config.get("quantization_config") or {}
    if qcfg:
        raise KomtError(f"{model} is a quantized checkpoint ({qcfg.get('quant_method', 'unknown')}): train on the "
                        "full-precision model (komt-edge quantizes it while loading with --bits 4/8)")
    from_hub = not Path(resolved.source).expanduser().exists()
    base_model = resolved.source if from_hub else str(base_path.resolve())
    tok = TrainTokenizer(base_path)
    family, tmpl = prompt_format(resolved, template, tok)
    own_template = family == ChatFormat.name
    train_ex, eval_ex, stats = prepare(data, tok, tmpl, max_length=max_length, eval_split=eval_split, seed=seed,
                                       records=records)
    ensure_writable_dir(out)

    arguments = dict(model=model, data=str(data), out=str(out), bits=precision.bits, lora_r=lora_r,
                     lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, epochs=epochs,
                     max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                     eval_split=eval_split, template=family, device=precision.device, warmup_steps=warmup_steps,
                     save_steps=save_steps, save_total_limit=save_total_limit, eval_steps=eval_steps,
                     logging_steps=logging_steps, seed=seed, optim=optim_name,
                     gradient_checkpointing=gradient_checkpointing, deepspeed=ds_config, tensorboard=tensorboard)
    run = {**arguments, "base_model": base_model, "data_sha256": stats.sha256}
    if own_template:
        run["chat_template_sha256"] = hashlib.sha256(tmpl.chat_template.encode("utf-8")).hexdigest()
    run_file = out / RUN_FILE
    if resume:
        _check_resume(run_file, run)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    main_process = int(os.environ.get("RANK", "0")) == 0
    if not resume and main_process:
        run_file.write_text(json.dumps(run, indent=2, ensure_ascii=False), encoding="utf-8")

    say = log if main_process else (lambda *_: None)
    if own_template:
        say(f"base: {base_model} (its own chat template, from {tmpl.source}: {tmpl.format('{prompt}')!r}, the "
            f"answer ending in {tmpl.end_of_turn(tok)!r})")
    else:
        say(f"base: {base_model} ({family} family, template {tmpl.format('{prompt}')!r})")
    say(f"data: {stats.describe()}")
    if stats.boundary_merges:
        say(f"data: {stats.boundary_merges} records had the answer's first characters merge into the prompt's last "
            "token; their answers were tokenized as a continuation so the prompt tokens match inference")
    say(f"device: {precision.description}")

    # -- load -----------------------------------------------------------------------------------------------
    import torch
    from transformers import AutoModelForCausalLM, Trainer, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    ckpt_dir = out / "checkpoints"
    resumed_step = 0
    if last_checkpoint:
        state_file = Path(last_checkpoint) / "trainer_state.json"
        resumed_step = json.loads(state_file.read_text())["global_step"] if state_file.is_file() else 0
        say(f"resuming from {last_checkpoint} (step {resumed_step})")
    ta_kwargs = training_arguments_kwargs(
        precision, output_dir=ckpt_dir, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, warmup_steps=warmup_steps, logging_steps=logging_steps, save_steps=save_steps,
        save_total_limit=save_total_limit, eval_steps=eval_steps, has_eval=bool(eval_ex), seed=seed, optim=optim_name,
        gradient_checkpointing=gradient_checkpointing, deepspeed_config=ds_config, resume=bool(last_checkpoint))
    # Before the model is loaded: with a ZeRO-3 config the arguments make from_pretrained partition the weights.
    args = build_training_arguments(ta_kwargs)

    weight_bytes = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in base_path.glob(pattern)
                       if f.name != "training_args.bin")
    if precision.device == "cpu" and weight_bytes > 2 * CPU_LARGE_MODEL:  # ~3B parameters in 16 bits
        say(f"warning: {weight_bytes / 2**30:.1f} GiB of weights on CPU: a float32 LoRA needs several times that in "
            "RAM and will be very slow; the CPU fallback is meant for small models: train on a CUDA GPU")
    set_seed(seed)
    try:
        base = AutoModelForCausalLM.from_pretrained(
            base_path, **model_load_kwargs(precision, deepspeed=bool(ds_config), local_rank=local_rank))
    except (OSError, ValueError) as err:
        raise KomtError(f"could not load {model} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())  # ds_numel: ZeRO-3
    base.config.use_cache = False
    gc = precision.device == "cuda" if gradient_checkpointing is None else gradient_checkpointing
    if precision.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gc,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc:
        base.enable_input_require_grads()

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(base, lora)
    except ValueError as err:
        if "not found" in str(err) or "Target modules" in str(err):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                            if isinstance(m, torch.nn.Linear)})
            raise KomtError(f"--target-modules {','.join(target_modules)}: not found in {model}; its linear layers "
                            f"are {', '.join(names)}") from None
        raise
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in peft_model.parameters() if p.requires_grad)
    say(f"LoRA r={lora_r} alpha={lora_alpha:g} dropout={lora_dropout:g} on {', '.join(target_modules)}: "
        f"{trainable:,} trainable parameters ({trainable / max(n_params, 1):.3%} of {n_params:,})")

    # -- train ----------------------------------------------------------------------------------------------
    steps_per_epoch = max(1, -(-len(train_ex) // (batch_size * grad_accum)))
    total_hint = max_steps or int(steps_per_epoch * epochs + 0.999)
    callbacks = [_callbacks(out / "logs" / "metrics.csv", total_hint, progress and main_process, say, resumed_step)]
    if tensorboard and main_process:
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "logs" / "tensorboard"))))
    trainer = Trainer(model=peft_model, args=args, train_dataset=ExampleDataset(train_ex),
                      eval_dataset=ExampleDataset(eval_ex) if eval_ex else None,
                      data_collator=Collator(tok.pad_id, 8 if precision.device == "cuda" else None),
                      callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    started = time.monotonic()
    tokens_before = 0
    if last_checkpoint:
        state_file = Path(last_checkpoint) / "trainer_state.json"
        tokens_before = int(json.loads(state_file.read_text()).get("num_input_tokens_seen", 0) or 0)
    try:
        trainer.train(resume_from_checkpoint=last_checkpoint)
    except torch.cuda.OutOfMemoryError:
        raise KomtError("CUDA out of memory: lower --batch-size or --max-length, raise --grad-accum, or use --bits 4"
                        ) from None
    runtime = time.monotonic() - started
    eval_loss = None
    if eval_ex:
        done = [e for e in trainer.state.log_history if "eval_loss" in e]
        if done and done[-1].get("step") == trainer.state.global_step:
            eval_loss = float(done[-1]["eval_loss"])  # the last step was just evaluated
        else:
            eval_loss = float(trainer.evaluate()["eval_loss"])

    # -- save -----------------------------------------------------------------------------------------------
    history = list(trainer.state.log_history)
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    steps_run = trainer.state.global_step - resumed_step
    result = TrainResult(
        out=out, base_model=base_model, template=family, mode=precision.description, steps=trainer.state.global_step,
        resumed_from=resumed_step if last_checkpoint else None,
        first_loss=_first(history, "loss"), last_loss=_last(history, "loss"),
        eval_loss_before=_first(history, "eval_loss", step=0), eval_loss=eval_loss, tokens_seen=tokens_seen,
        runtime_s=runtime, tokens_per_s=(tokens_seen - tokens_before) / runtime if runtime > 0 else 0.0,
        steps_per_s=steps_run / runtime if runtime > 0 else 0.0, data=stats, log_history=history)
    tmp = out / ".adapter.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # every process: under ZeRO-3 the weights are gathered here
    if trainer.is_world_process_zero():
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; training_args.json replaces it
        cfg_path = tmp / "adapter_config.json"
        adapter_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        adapter_cfg["base_model_name_or_path"] = base_model
        cfg_path.write_text(json.dumps(adapter_cfg, indent=2), encoding="utf-8")
        _copy_tokenizer(base_path, tmp, tmpl.chat_template)
        (tmp / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
        if own_template:
            prompt_format_record = {
                "template": tmpl.format("{prompt}"), "chat_template": f"the model's own, from {tmpl.source}",
                "chat_template_sha256": run["chat_template_sha256"],
                "prompt": f"instruction, or instruction + {INPUT_SEPARATOR!r} + input, as the user message",
                "answer": f"output + {tmpl.end_of_turn(tok)!r} (the template's end of turn); prompt tokens masked "
                          "with -100"}
        else:
            prompt_format_record = {"template": tmpl.format("{prompt}"),
                                    "prompt": f"instruction, or instruction + {INPUT_SEPARATOR!r} + input",
                                    "answer": "output + eos; prompt tokens masked with -100"}
        record = {"komt_edge_version": __version__, "base_model": base_model, "template": family,
                  "prompt_format": prompt_format_record,
                  "mode": precision.description, "arguments": arguments, "data": asdict(stats),
                  "results": {k: v for k, v in asdict(result).items()
                              if k not in ("out", "base_model", "template", "data", "log_history")},
                  "versions": dist_versions(*RECORDED_VERSIONS)}
        (tmp / RESULT_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
        tmp.rmdir()
    return result
