"""`komt-edge gptq MODEL -o OUT/`: a 4-bit GPTQ checkpoint of a komt model, calibrated on Korean text.

The quantizer is GPTQModel (the maintained successor of the archived auto-gptq), which writes the classic GPTQ
"v1" checkpoint format that transformers (with optimum + gptqmodel), vLLM and text-generation-webui read:
``qweight`` (int32, ``[in/(32/bits), out]``), ``qzeros`` (int32, ``[groups, out/(32/bits)]``, storing zero - 1),
``scales`` (float16, ``[groups, out]``) and ``g_idx`` (int32, ``[in]``) per linear layer in safetensors, a
``quantization_config`` with ``checkpoint_format: gptq`` in config.json and a quantize_config.json.

What komt-edge adds around it:

- MODEL as everywhere: a zoo name (its LoRA adapter is merged into its base first, into a temporary folder
  beside the output, removed afterwards), a Hub id or a local folder.
- Korean calibration by default (:mod:`komt_edge.corpora`): ``--samples`` windows of ``--seq-len`` tokens from
  the built-in Korean calibration split; instruction data is rendered in the model's komt prompt template.
  ``--calibration FILE`` takes the user's text / JSON / JSONL. Only the calibration's name and size go into the
  checkpoint's metadata, never its text.
- The output folder ``<model>-GPTQ-4bit-g128`` holds the model's own tokenizer files (komt's quirks intact) and
  the komt chat template in tokenizer_config.json; it is written atomically (nothing partial on failure).
- Layer by layer: GPTQModel builds the model as an empty (meta) shell, reads one decoder layer at a time from the
  checkpoint, quantizes it on the device and offloads it to disk, so a 7B model needs a few GB of GPU memory
  (designed for a 24 GB GPU; the CUDA path has not been run yet) and little CPU memory. CPU quantization works
  the same way, for small models (the tests).
- A check after quantizing: the checkpoint is reloaded with transformers, answers a Korean prompt formatted
  by its stored chat template, and its Korean perplexity on the held-out split is reported next to the
  unquantized model's. :func:`acceptance_failure` is the rule a checkpoint must pass to be published: checked,
  its template right, its perplexity finite and at most ``GPTQ_MAX_PPL_RATIO`` times the original's.
  :func:`gptq` enforces it: a checkpoint that fails is not written (:class:`GptqRejected`, a one-line reason).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import __version__
from .atomic import atomic_dir, check_dir_target, check_output_dir, ensure_writable_dir
from .checkpoint import read_config
from .converters.architectures import GPTQ_NAMES
from .corpora import Example, korean_examples, load_examples
from .errors import KomtError
from .merge import TOKENIZER_FILES
from .output import configure_output
from .templates import PromptTemplate
from .zoo import ResolvedModel, model_template, resolve

if TYPE_CHECKING:
    import torch

# GPTQ v1 as transformers (gptqmodel/optimum kernels) and vLLM (gptq, gptq_marlin) load it. Not 3 bits: its
# values straddle int32 words, which :func:`unpack_rows` (the tests' reader of the format) does not read.
SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8)
SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, -1)  # -1: one group per input row (per channel)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = GPTQ_NAMES  # the families of converters/architectures.py it quantizes

# The built-in Korean calibration split holds ~32k tokens (Llama-2/Mistral tokenizer): 96 x 256 uses 3/4 of it.
DEFAULT_SAMPLES = 96
DEFAULT_SEQ_LEN = 256
MIN_SEQ_LEN = 16
EVAL_SEQ_LEN = 512  # perplexity windows on the held-out split
DEFAULT_EVAL_TOKENS = 8192  # the whole held-out split (~7.7k tokens)
CHECK_PROMPT = "한국의 수도는 어디인가요?"
# The bound on GPTQ / original Korean perplexity. Measured (README, benchmarks/gptq_bench.py): 4-bit g64 GPTQ of
# SmolLM2-135M, whose Korean is byte fallback (a hard case), costs ×1.119; the damaged checkpoints of
# tests/test_gptq.py are not finite (NaN scales) or ~1e108 times worse (output layer ×40). 1.5 passes the first with
# room and rejects the others; it has not been measured on a 7B model.
GPTQ_MAX_PPL_RATIO = 1.5
CALIBRATION_SEED = 0
REPORT_FILE = "komt_edge_gptq.json"


def output_name(name: str, bits: int = 4, group_size: int = 128, desc_act: bool = False) -> str:
    """``<model>-GPTQ-4bit-g128`` (``-gchannel`` for group size -1, ``-actorder`` with --desc-act)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    group = "gchannel" if group_size == -1 else f"g{group_size}"
    return f"{safe}-GPTQ-{bits}bit-{group}" + ("-actorder" if desc_act else "")


# --- calibration -------------------------------------------------------------------------------------

@dataclass
class TokenWindows:
    """Fixed-length token windows cut from a packed token stream (each example's tokens, then EOS)."""

    source: str  # what the text is: "korean (...)" or a file path; never the text itself
    windows: list[list[int]]
    seq_len: int
    examples: int  # records rendered into the stream
    instruction_examples: int  # of which instruction data, in the komt template
    stream_tokens: int  # tokens available

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def as_gptqmodel(self) -> list[dict[str, list[int]]]:
        return [{"input_ids": list(w), "attention_mask": [1] * len(w)} for w in self.windows]

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.windows), "seq_len": self.seq_len,
                "tokens": self.tokens, "examples": self.examples,
                "instruction_examples": self.instruction_examples, "available_tokens": self.stream_tokens}


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of every text (BOS for Llama/Mistral SentencePiece), maybe none."""
    probe = "가나다"
    with_special = list(tokenizer(probe).input_ids)
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    cut = len(with_special) - len(plain)
    return with_special[:cut] if cut > 0 and with_special[cut:] == plain else []


def token_windows(tokenizer, examples: Sequence[Example], *, seq_len: int, samples: int | None = None,
                  template: PromptTemplate | None = None, source: str = "", seed: int = CALIBRATION_SEED,
                  max_tokens: int | None = None) -> TokenWindows:
    """Pack ``examples`` (rendered with ``template``) into one token stream and cut ``seq_len`` windows from it.

    Every window starts with the tokenizer's own prefix (BOS) and the windows never overlap. With ``samples``,
    that many windows are drawn at random (seeded, so runs are reproducible) and too short a stream is an error;
    without it, consecutive windows from the start, up to ``max_tokens`` tokens.
    """
    prefix = special_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise KomtError(f"--seq-len {seq_len} is too short")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ex in examples:
        stream += list(tokenizer(ex.render(template), add_special_tokens=False, verbose=False).input_ids)
        if eos is not None:
            stream.append(eos)
    available = len(stream) // body
    if samples is not None:
        if available < samples:
            raise KomtError(
                f"the calibration text ({source}) holds {len(stream)} tokens: too short for --samples {samples} "
                f"× --seq-len {seq_len} ({samples * body} tokens); lower --samples or --seq-len, or pass a "
                "longer --calibration FILE")
        picked = sorted(random.Random(seed).sample(range(available), samples))
    else:
        count = available if max_tokens is None else min(available, max(1, max_tokens // seq_len))
        picked = list(range(count))
    windows = [prefix + stream[i * body:(i + 1) * body] for i in picked]
    return TokenWindows(source=source, windows=windows, seq_len=seq_len, examples=len(examples),
                        instruction_examples=sum(ex.prompt is not None for ex in examples),
                        stream_tokens=len(stream))


def calibration_examples(calibration: str) -> tuple[list[Example], str]:
    """``"korean"`` → the built-in Korean calibration split; otherwise a user file (text, JSON or JSONL)."""
    if calibration.strip().lower() == "korean":
        examples = korean_examples("calibration")
        instructions = sum(ex.prompt is not None for ex in examples)
        return examples, f"korean (konlpy kolaw + kobill calibration split + {instructions} komt-edge instructions)"
    path = Path(calibration).expanduser()
    if not path.exists():
        raise KomtError(f"--calibration {calibration!r} is neither 'korean' nor an existing file")
    return load_examples(path), path.name


# --- devices -----------------------------------------------------------------------------------------

def select_device(device: str = "auto") -> "torch.device":
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    spec = (device or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not m:
        raise KomtError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise KomtError(f"--device {device} was asked for, but no CUDA GPU is available "
                        f"(torch {torch.__version__}): use --device cpu for small models, or a machine with a GPU")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise KomtError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(f"cuda:{index}")


def describe_device(device: "torch.device") -> str:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


def compute_dtype(device: "torch.device") -> "torch.dtype":
    """float16 on CUDA (the dtype GPTQ kernels and vLLM's gptq serve); bfloat16 on CPU (GPTQModel's CPU choice)."""
    import torch

    return torch.float16 if device.type == "cuda" else torch.bfloat16


# --- loading ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _gptqmodel_logs_in(folder: Path):
    """GPTQModel 7.6 writes per-layer logs to ./logs of whatever folder the user runs in; keep them in our work
    folder instead (removed with it). Its log location is a module constant with no option to set it."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # pragma: no cover - layout of another GPTQModel release
        yield
        return
    original = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = original


def load_tokenizer(folder: Path):
    """The model's tokenizer through transformers' AutoTokenizer (what users of the checkpoint get)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, ImportError) as err:
        raise KomtError(f"cannot load the tokenizer of {folder}: {err}") from None


def _import_gptqmodel(verbose: bool):
    """Import GPTQModel quietly (unless ``verbose``): its banner, INFO logs and live progress bars off."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(12, ((os.cpu_count() or 1) + 1) // 2))))
    if not verbose:
        configure_output(verbose=False)  # what the CLI does before any command; here for library callers too
    try:
        with contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext():
            from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as err:
        raise KomtError(f"GPTQ export needs GPTQModel ({err}): pip install 'komt-edge[gptq]' "
                        "(gptqmodel==7.6.0 optimum==2.3.0; make install does this)") from None
    if not verbose:
        try:
            import gptqmodel.utils.logger as glog

            glog._suppress_live_renderables = lambda: True  # komt-edge draws its own per-layer bar
        except (ImportError, AttributeError):  # pragma: no cover
            pass
    return GPTQModel, QuantizeConfig


class _LayerProgress:
    """GPTQModel's layer-complete callback driving a tqdm bar: one tick per quantized decoder layer."""

    def __init__(self, bar):
        self.bar = bar
        self.seen: set[int] = set()

    def layer_complete(self, layer_idx: int, submodule_finalized: bool):
        if layer_idx not in self.seen:
            self.seen.add(layer_idx)
            self.bar.update(1)
        return None


# --- the format ----------------------------------------------------------------------------------------

def unpack_rows(packed: "torch.Tensor", bits: int) -> "torch.Tensor":
    """GPTQ v1 packing along dim 0: int32 row r holds rows r*k … r*k+k-1 (k = 32/bits), lowest bits first."""
    import torch

    if 32 % bits:
        raise NotImplementedError(f"unpacking {bits}-bit GPTQ weights (packed across int32 words)")
    k = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, k, 1)
    values = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0] * k, *packed.shape[1:])


def dequantize(qweight: "torch.Tensor", qzeros: "torch.Tensor", scales: "torch.Tensor", g_idx: "torch.Tensor",
               bits: int) -> "torch.Tensor":
    """A GPTQ v1 linear layer back to a float32 ``[out, in]`` weight: ``scale · (q − (zero + 1))`` per group."""
    q = unpack_rows(qweight, bits).float()  # [in, out]
    zeros = unpack_rows(qzeros.T.contiguous(), bits).T.float() + 1  # [groups, out]; v1 stores zero - 1
    g = g_idx.long()
    return (scales.float()[g] * (q - zeros[g])).T.contiguous()


# --- the check ---------------------------------------------------------------------------------------

@dataclass
class CheckReport:
    prompt: str
    rendered: str  # the prompt as the stored chat template renders it
    template_ok: bool  # the stored template renders the komt prompt
    answer: str  # greedy answer of the GPTQ model
    ppl_gptq: float
    ppl_reference: float
    eval_tokens: int
    eval_windows: int
    eval_source: str

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_gptq / self.ppl_reference if self.ppl_reference else math.inf

    @property
    def problems(self) -> list[str]:
        """What is wrong with the checkpoint whatever the bound: its stored chat template does not render the komt
        prompt, or its perplexity is not finite."""
        problems = []
        if not self.template_ok:
            problems.append("the stored chat template does not render the komt prompt")
        if not math.isfinite(self.ppl_gptq):
            problems.append("the GPTQ model's perplexity is not finite")
        return problems


class GptqRejected(KomtError):
    """The quantized checkpoint failed :func:`acceptance_failure`; nothing was written at the final path."""


def acceptance_failure(check: CheckReport | None, max_ppl_ratio: float = GPTQ_MAX_PPL_RATIO) -> str | None:
    """Why a GPTQ checkpoint is not fit to publish, or None: it was not reloaded and checked, its chat template is
    wrong, its perplexity is not finite, or over ``max_ppl_ratio`` times the original model's."""
    if check is None:
        return "the GPTQ checkpoint was not checked"
    problems = check.problems
    if check.ppl_ratio > max_ppl_ratio:
        problems.append(f"Korean perplexity {check.ppl_gptq:.3f} is ×{check.ppl_ratio:.2f} the original's "
                        f"{check.ppl_reference:.3f} (bound ×{max_ppl_ratio})")
    return "; ".join(problems) or None


def perplexity(model, windows: Sequence[Sequence[int]], device: "torch.device | str") -> float:
    """exp(mean next-token NLL) over ``windows`` (each scored on its own, first token as context only)."""
    import torch

    with torch.inference_mode():
        return _perplexity_of(windows, lambda ids: model(input_ids=torch.tensor([ids], device=device)).logits[0])


def _perplexity_of(windows: Sequence[Sequence[int]], logits_of: Callable) -> float:
    """exp(mean next-token NLL), ``logits_of(window)`` giving each window's ``[tokens, vocab]`` logits."""
    import torch

    total, count = 0.0, 0
    for window in windows:
        ids = list(window)
        logits = torch.as_tensor(logits_of(ids))[:-1].float()
        targets = torch.tensor(ids[1:], device=logits.device)
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += len(ids) - 1
    if count == 0:
        raise KomtError("no held-out tokens to score")
    return math.exp(total / count)


def reference_perplexity(folder: Path, windows: Sequence[Sequence[int]], device: "torch.device",
                         dtype: "torch.dtype") -> float:
    """The unquantized model's perplexity on ``windows``, in ``dtype``: on CUDA the whole model on the GPU
    (spilling to CPU memory what does not fit); elsewhere one decoder layer at a time from the memory-mapped
    checkpoint (:mod:`komt_edge.layer_reference`), so a 7B reference on a CPU holds about one layer, not the model."""
    if device.type == "cuda":
        ref = _load_causal_lm(folder, device, dtype)
        try:
            return perplexity(ref, windows, next(ref.parameters()).device)
        finally:
            del ref
            _free(device)
    from .layer_reference import DTYPES, streamed_logits

    name = next(k for k, v in DTYPES.items() if v == dtype)
    logits = iter(streamed_logits(folder, [list(w) for w in windows], dtype=name, loaded_in_dtype=True,
                                  progress=False))
    return _perplexity_of(windows, lambda _ids: next(logits))


def _load_causal_lm(folder: Path, device: "torch.device", dtype: "torch.dtype"):
    """On CPU: all on CPU. On CUDA: on the chosen GPU, spilling to CPU memory (accelerate) what does not fit
    there, as an fp16 13B reference does on a 24 GB GPU."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": {"": str(device)}}
    if device.type == "cuda":
        import psutil
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        kwargs = {"device_map": "auto",
                  "max_memory": {device.index or 0: int(free * 0.9), "cpu": int(psutil.virtual_memory().available * 0.9)}}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kwargs)
    return model.eval()


def _free(device: "torch.device") -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_checkpoint(quantized: Path, reference: Path, template: PromptTemplate, device: "torch.device", *,
                     eval_tokens: int = DEFAULT_EVAL_TOKENS, prompt: str = CHECK_PROMPT,
                     max_new_tokens: int = 32) -> CheckReport:
    """Reload ``quantized`` with transformers, answer a Korean prompt through its stored chat template, and score
    Korean perplexity on the held-out split for it and for the unquantized ``reference``, in the same dtype.

    A checkpoint that does not reload (or does not run) is a :class:`GptqRejected` naming the error."""
    import torch

    dtype = compute_dtype(device)
    tokenizer = load_tokenizer(quantized)
    try:
        model = _load_causal_lm(quantized, device, dtype)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # whatever transformers or the GPTQ kernels raise on a broken checkpoint
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise GptqRejected(f"the GPTQ checkpoint does not reload in transformers ({type(err).__name__}: {first})"
                           ) from None
    heldout = token_windows(tokenizer, korean_examples("heldout"), seq_len=EVAL_SEQ_LEN, max_tokens=eval_tokens,
                            source="korean (konlpy kobill held-out split)")
    if not heldout.windows:  # a tiny eval budget: one shorter window
        heldout = token_windows(tokenizer, korean_examples("heldout"), seq_len=max(MIN_SEQ_LEN, eval_tokens),
                                max_tokens=eval_tokens, source=heldout.source)

    first = next(model.parameters()).device
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
    template_ok = rendered == (tokenizer.bos_token or "") + template.format(prompt)
    # the template renders BOS: tokenized as apply_chat_template(tokenize=True) does, without a second one
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt").input_ids.to(first)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    ppl_q = perplexity(model, heldout.windows, first)
    del model
    _free(device)

    ppl_ref = reference_perplexity(reference, heldout.windows, device, dtype)
    return CheckReport(prompt=prompt, rendered=rendered, template_ok=template_ok, answer=answer,
                       ppl_gptq=ppl_q, ppl_reference=ppl_ref, eval_tokens=heldout.tokens,
                       eval_windows=len(heldout.windows), eval_source=heldout.source)


# --- result ------------------------------------------------------------------------------------------

@dataclass
class GptqResult:
    path: Path
    device: str
    bits: int
    group_size: int
    desc_act: bool
    calibration: dict[str, Any]
    quantize_seconds: float
    total_seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    check: CheckReport | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        if self.check is not None:
            data["check"]["ppl_ratio"] = self.check.ppl_ratio
        return data

    @property
    def label(self) -> str:
        """The checkpoint's quantization as the card's file table names it: ``GPTQ-4bit-g128``."""
        return f"GPTQ-{self.bits}bit-" + ("gchannel" if self.group_size == -1 else f"g{self.group_size}")

    def record(self) -> dict[str, Any]:
        """What a release records of the checkpoint: its settings and, when checked, the check's numbers (None
        for a perplexity that is not finite)."""
        data = {"quant": self.label, "bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
                "format": "gptq v1", "device": self.device, "calibration": self.calibration}
        k = self.check
        if k is not None:
            data.update(ppl=k.ppl_gptq if math.isfinite(k.ppl_gptq) else None, ppl_reference=k.ppl_reference,
                        ppl_ratio=k.ppl_ratio if math.isfinite(k.ppl_ratio) else None, template_ok=k.template_ok,
                        eval_tokens=k.eval_tokens, answer=k.answer)
        return data

    def summary(self) -> str:
        c = self.calibration
        lines = [
            f"{self.path}",
            f"  GPTQ {self.bits}-bit, group size {self.group_size}, desc_act {self.desc_act}, on {self.device}",
            f"  calibration: {c['samples']} × {c['seq_len']} tokens from {c['source']}; "
            f"{c['instruction_examples']} of {c['examples']} records are instructions, in the komt template",
            f"  quantization {self.quantize_seconds:.1f} s (total {self.total_seconds:.1f} s), peak RSS "
            f"{self.peak_rss_bytes / 2**30:.2f} GiB"
            + (f", peak GPU {self.peak_gpu_bytes / 2**30:.2f} GiB" if self.peak_gpu_bytes is not None else ""),
        ]
        k = self.check
        if k is not None:
            lines += [
                f"  reload (transformers) + chat template renders the komt prompt: {'yes' if k.template_ok else 'NO'}",
                f"  greedy answer to {k.prompt!r}: {k.answer!r}",
                f"  Korean perplexity, held-out ({k.eval_tokens} tokens): GPTQ {k.ppl_gptq:.3f} vs unquantized "
                f"{k.ppl_reference:.3f} (×{k.ppl_ratio:.3f})",
            ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --- the stage ---------------------------------------------------------------------------------------

def _validate(bits: int, group_size: int, samples: int, seq_len: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise KomtError(f"--bits {bits} is not supported: GPTQ checkpoints for transformers and vLLM use "
                        f"{', '.join(map(str, SUPPORTED_BITS))} bits")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise KomtError(f"--group-size {group_size} is not supported: choose "
                        f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))} (-1: per channel)")
    if samples < 1:
        raise KomtError(f"--samples {samples}: need at least 1 calibration sample")
    if seq_len < MIN_SEQ_LEN:
        raise KomtError(f"--seq-len {seq_len}: calibration windows need at least {MIN_SEQ_LEN} tokens")


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))


def _check_model(resolved: ResolvedModel, config: dict, group_size: int, seq_len: int) -> str:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise KomtError(f"{resolved.source} is a {arch}: komt-edge gptq supports "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    qcfg = config.get("quantization_config") or {}
    if qcfg:
        raise KomtError(f"{resolved.source} is already quantized ({qcfg.get('quant_method', 'unknown')}): "
                        "quantize the full-precision model")
    if not (_has_tokenizer(resolved.path) or _has_tokenizer(resolved.adapter)):
        raise KomtError(f"no tokenizer in {resolved.path}: expected tokenizer.model or tokenizer.json "
                        "(calibration and the GPTQ checkpoint need the model's tokenizer)")
    if group_size > 0:
        for key in ("hidden_size", "intermediate_size"):
            size = config.get(key)
            if isinstance(size, int) and size % group_size:
                raise KomtError(f"--group-size {group_size} does not divide the model's {key} ({size}): "
                                "choose a group size that does, or -1")
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise KomtError(f"--seq-len {seq_len} exceeds the model's context ({limit} tokens)")
    return arch


def _tokenizer_source(resolved: ResolvedModel) -> Path:
    return resolved.path if _has_tokenizer(resolved.path) else resolved.adapter  # type: ignore[return-value]


def _finish_checkpoint(folder: Path, source: Path, tokenizer_dir: Path, template: PromptTemplate,
                       meta: dict[str, Any]) -> None:
    """Replace what GPTQModel wrote around the weights with the model's own files, plus the komt template."""
    for name in TOKENIZER_FILES + ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        if name in ("chat_template.jinja", "generation_config.json"):
            continue
        src = tokenizer_dir / name if (tokenizer_dir / name).is_file() else source / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
    if (source / "generation_config.json").is_file():  # GPTQModel turns on do_sample; keep the model's own
        shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8")) if tok_cfg_path.is_file() else {}
    tok_cfg["chat_template"] = template.chat_template
    tok_cfg_path.write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=2), encoding="utf-8")

    original = read_config(source)
    config = read_config(folder)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # GPTQModel's tokenizer fix-ups, undone
        if key in original:
            config[key] = original[key]
        else:
            config.pop(key, None)
    config.pop("_name_or_path", None)

    def scrub(qcfg: dict) -> dict:
        qmeta = dict(qcfg.get("meta") or {})
        qmeta.pop("offload_to_disk_path", None)  # a local temp path
        qmeta["komt_edge"] = meta
        return {**qcfg, "meta": qmeta}

    config["quantization_config"] = scrub(config.get("quantization_config") or {})
    (folder / "config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    qc_path = folder / "quantize_config.json"
    if qc_path.is_file():
        qc = scrub(json.loads(qc_path.read_text(encoding="utf-8")))
        qc_path.write_text(json.dumps(qc, ensure_ascii=False, indent=2), encoding="utf-8")


def _public_name(source: str) -> str:
    """A Hub id as is; a local folder by its name only (no local paths in published metadata)."""
    return Path(source).name if Path(source).expanduser().exists() else source


def _peak_rss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 128  # komt's GPTQ files: 4-bit, groups of 128


def gptq(model: str, out: str | Path = "dist", *, bits: int = DEFAULT_BITS, group_size: int = DEFAULT_GROUP_SIZE,
         desc_act: bool = False,
         calibration: str = "korean", samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
         device: str = "auto", adapter: str | None = None, name: str | None = None, check: bool = True,
         eval_tokens: int = DEFAULT_EVAL_TOKENS, max_ppl_ratio: float | None = GPTQ_MAX_PPL_RATIO,
         allow_pickle: bool = False, verbose: bool = False, force: bool = False,
         progress: bool = True) -> GptqResult:
    """Quantize MODEL to a GPTQ checkpoint in ``out/<model>-GPTQ-<bits>bit-g<group_size>``; returns the result.

    Every input is checked before the model is loaded; the output folder appears only when everything,
    the check included, succeeded. An earlier GPTQ checkpoint of komt-edge's at that path is replaced; a folder
    holding anything else is refused unless ``force`` (then only the checkpoint's own files are replaced).

    With ``check``, the checkpoint must pass :func:`acceptance_failure` with ``max_ppl_ratio``, or it is not
    written and :class:`GptqRejected` says why; ``max_ppl_ratio=None`` only reports (the caller applies the rule).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    _validate(bits, group_size, samples, seq_len)
    if max_ppl_ratio is not None and not (math.isfinite(max_ppl_ratio) and max_ppl_ratio >= 1.0):
        raise KomtError(f"--max-ppl-ratio {max_ppl_ratio}: the bound is a ratio to the original's perplexity, "
                        "a finite number of at least 1")
    dev = select_device(device)
    out = check_output_dir(Path(out))
    resolved = resolve(model, adapter=adapter, allow_pickle=allow_pickle)
    config = read_config(resolved.path)
    _check_model(resolved, config, group_size, seq_len)
    template = model_template(resolved)
    tokenizer_dir = _tokenizer_source(resolved)
    tokenizer = load_tokenizer(tokenizer_dir)
    examples, source = calibration_examples(calibration)
    calib = token_windows(tokenizer, examples, seq_len=seq_len, samples=samples, template=template, source=source)
    display = name or resolved.name
    final = out / output_name(display, bits, group_size, desc_act)
    if final.resolve() in {resolved.path.resolve(), *([resolved.adapter.resolve()] if resolved.adapter else [])}:
        raise KomtError(f"-o {out} would overwrite the input model: choose another output folder")
    check_dir_target(final, force=force, owned_if=(REPORT_FILE,))

    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    GPTQModel, QuantizeConfig = _import_gptqmodel(verbose)
    import torch

    say(f"GPTQ {bits}-bit g{group_size} of {display} on {describe_device(dev)}, calibrated on "
        f"{len(calib.windows)} × {seq_len} tokens ({source})")
    ensure_writable_dir(out)
    # Merged copy, offload and logs: a hidden partial, so a run killed with SIGKILL leaves nothing the next run keeps.
    work = out / f".{final.name}.work.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    warnings: list[str] = []
    try:
        source_dir = resolved.path
        if resolved.adapter is not None:
            from .merge import merge

            say(f"merging the LoRA adapter {resolved.adapter} into {resolved.path}")
            source_dir = merge(resolved.path, resolved.adapter, work / "merged", allow_pickle=allow_pickle,
                               progress=progress)
        dtype = compute_dtype(dev)
        qcfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=True,
                              act_group_aware=not desc_act, device=str(dev),
                              pack_impl="gpu" if dev.type == "cuda" else "original",
                              offload_to_disk=True, offload_to_disk_path=str(work / "offload"))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        quiet = contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext()
        with atomic_dir(final, force=force, owned_if=(REPORT_FILE,), log=say) as tmp:
            with quiet:
                qmodel = GPTQModel.load(str(source_dir), qcfg, dtype=dtype)
            layers = int(config.get("num_hidden_layers") or 0) or None
            t0 = time.perf_counter()
            with tqdm(total=layers, unit="layer", desc=f"GPTQ {dev.type}", disable=not progress) as bar, \
                    _gptqmodel_logs_in(work / "logs"):
                qmodel.layer_callback = _LayerProgress(bar)
                with quiet:
                    qmodel.quantize(calib.as_gptqmodel(), batch_size=1)
            quantize_seconds = time.perf_counter() - t0
            with quiet:
                qmodel.save(str(tmp))
            del qmodel
            _free(dev)
            peak_gpu = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
            peak_rss = _peak_rss_bytes()  # of the quantization (the check loads models again)
            meta = {"tool": f"komt-edge {__version__}", "source": _public_name(resolved.source),
                    "adapter": (resolved.zoo.adapter if resolved.zoo is not None and resolved.adapter else
                                _public_name(str(resolved.adapter)) if resolved.adapter else None),
                    "chat_template": template.name, "calibration": calib.summary(),
                    "device": str(dev), "dtype": str(dtype).replace("torch.", "")}
            _finish_checkpoint(tmp, source_dir, tokenizer_dir, template, meta)
            report = None
            if check:
                say("checking: reload with transformers, Korean generation, held-out Korean perplexity")
                try:
                    report = check_checkpoint(tmp, source_dir, template, dev, eval_tokens=eval_tokens)
                    failure = acceptance_failure(report, max_ppl_ratio) if max_ppl_ratio is not None else None
                except GptqRejected as err:  # it does not reload
                    failure = str(err)
                if failure:  # raised inside atomic_dir: the checkpoint is not kept
                    raise GptqRejected(f"GPTQ checkpoint rejected, nothing written to {final}: {failure}")
                warnings += report.problems
            else:
                warnings.append("not checked (--no-check): reload and Korean perplexity were not verified")
            result = GptqResult(path=final, device=describe_device(dev), bits=bits, group_size=group_size,
                                desc_act=desc_act, calibration=calib.summary(), quantize_seconds=quantize_seconds,
                                total_seconds=0.0, peak_rss_bytes=peak_rss, peak_gpu_bytes=peak_gpu,
                                check=report, warnings=warnings)
            result.total_seconds = time.perf_counter() - started
            (tmp / REPORT_FILE).write_text(json.dumps({**result.to_dict(), "path": final.name}, ensure_ascii=False,
                                                      indent=2), encoding="utf-8")
    except torch.cuda.OutOfMemoryError:
        raise KomtError(f"out of GPU memory on {dev} (layer by layer, the calibration activations dominate): "
                        "lower --samples or --seq-len, or free the GPU") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
