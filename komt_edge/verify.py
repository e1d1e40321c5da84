"""`komt-edge verify FILE.gguf --hf MODEL`: prove a GGUF file behaves like the Hugging Face original, in Korean.

Three checks, each with a bound; the run fails (non-zero exit) when one is missed:

1. Tokenizer parity: llama.cpp's token ids equal the reference tokenizer's (SentencePiece for tokenizer.model,
   the `tokenizers` library for tokenizer.json) on a built-in Korean probe set. Every mismatch is listed.
2. Logit parity: on Korean prompts in the model's komt template, llama.cpp's logits against HF float32:
   max-abs difference, KL(HF ‖ GGUF) and top-1 agreement, bounded per file type.
3. The file loads in llama-cpp-python, its chat template renders the komt prompt (for a model that keeps its own
   template — Qwen2.5, a Llama 3 base with none — the file carries that template), and it generates greedily.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .atomic import JSON_REPORT, check_output_file, ensure_writable_dir, holds_json, write_json_report
from .converters.gguf_file import check_model_gguf, file_info
from .converters.lora_to_gguf import check_lora_fits
from .converters.plan import QuantPlan
from .errors import KomtError
from .llamacpp import open_llama
from .templates import TEMPLATES, gguf_template
from .zoo import chat_template_for, model_template, resolve

# Korean probes: prose, numbers and dates, mixed scripts, emoji, whitespace runs, the komt template markers.
KOREAN_PROBES: tuple[str, ...] = (
    "안녕하세요. 오늘 날씨가 정말 좋네요.",
    "대한민국의 수도는 서울이며, 가장 큰 항구 도시는 부산입니다.",
    "세종대왕은 1443년에 훈민정음을 창제하였고, 1446년에 이를 반포하였다.",
    "2023년 10월 3일 개천절의 최고 기온은 18.5도였습니다.",
    "가격은 1,234,567원이고 전화번호는 010-1234-5678입니다.",
    "LLM 모델을 GGUF 형식으로 변환하면 llama.cpp로 노트북 CPU에서 실행할 수 있습니다.",
    "Python 3.11과 PyTorch 2.13으로 QLoRA 학습을 진행했어요.",
    "좋아요 👍😊 최고예요! 🎉🇰🇷",
    "띄어쓰기  두 칸과   세 칸, 그리고    네 칸.",
    "  앞에 공백이 있는 문장",
    "줄바꿈\n\n두 번 하고\n한 번 더\n끝",
    "탭\t문자와\t함께",
    "### instruction: 한국의 전통 음식을 소개해 주세요.\n\n### Response: ",
    "[INST]김치는 어떻게 만드나요? [/INST]",
    "漢字와 한글을 섞어 쓴 文章, ㅋㅋㅋ ㅎㅎ ㅠㅠ",
    "뷁 똠얌꿍 햏 쀍",
    "「인용」과 『책 제목』, 그리고 ‘작은따옴표’와 “큰따옴표”.",
    "서울특별시 강남구 테헤란로 123, 4층 (우: 06234)",
)

# Prompts for logit parity and generation (formatted with the model's template).
KOREAN_PROMPTS: tuple[str, ...] = (
    "한국의 사계절에 대해 설명해 주세요.",
    "다음 문장을 영어로 번역하세요: 저는 매일 아침 커피를 마십니다.",
    "인공지능이 우리 생활에 미치는 영향은 무엇인가요?",
)


@dataclass(frozen=True)
class Bounds:
    max_abs: float | None  # max |logit difference|, None = not bounded
    mean_kl: float
    min_top1: float


# Bounds per GGUF file type. Float files must match HF nearly exactly; quantized files are bounded by KL.
BOUNDS = {
    "ALL_F32": Bounds(max_abs=0.05, mean_kl=1e-5, min_top1=0.99),
    "MOSTLY_F16": Bounds(max_abs=0.1, mean_kl=1e-4, min_top1=0.98),
    "MOSTLY_BF16": Bounds(max_abs=None, mean_kl=1e-3, min_top1=0.95),
    "MOSTLY_Q8_0": Bounds(max_abs=None, mean_kl=0.01, min_top1=0.90),
}
# 4-6 bit mixes. llama.cpp publishes mean KLD 0.01-0.07 for 7-8B models at 4 bits; small models lose more.
# A broken conversion (wrong permutation, tokenizer or type) shows KL of whole nats, far past these bounds.
DEFAULT_QUANT_BOUNDS = Bounds(max_abs=None, mean_kl=0.15, min_top1=0.75)
LOW_BIT_BOUNDS = Bounds(max_abs=None, mean_kl=0.5, min_top1=0.50)  # 1-3 bit mixes


# Logits within this of the reference's best count as a tie for the top-1 agreement.
TIE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class BoundOverrides:
    """Bounds a user sets instead of the file type's defaults (``--max-abs``, ``--max-kl``, ``--min-top1``).

    Checked when made, so that a bound that no check could meet fails before a model is loaded."""
    max_abs: float | None = None
    mean_kl: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        for option, value, high in (("--max-abs", self.max_abs, math.inf), ("--max-kl", self.mean_kl, math.inf),
                                    ("--min-top1", self.min_top1, 1.0)):
            if value is None:
                continue
            if not math.isfinite(value) or not 0 <= value <= high:
                allowed = "between 0 and 1 (a rate)" if high == 1.0 else "a finite number ≥ 0"
                raise KomtError(f"{option} {value:g}: the bound must be {allowed}")

    def apply(self, defaults: Bounds) -> Bounds:
        return Bounds(defaults.max_abs if self.max_abs is None else self.max_abs,
                      defaults.mean_kl if self.mean_kl is None else self.mean_kl,
                      defaults.min_top1 if self.min_top1 is None else self.min_top1)


def bounds_for(plan: QuantPlan | str) -> Bounds:
    """The default bounds of a plan's file (converters.plan: a plan is bounded as its base type, so a plan with
    per-tensor types is held to its mix's bounds), or of a file type read from a GGUF file (MOSTLY_Q4_K_M)."""
    file_type = plan if isinstance(plan, str) else plan.file_type
    if file_type in BOUNDS:
        return BOUNDS[file_type]
    if any(tag in file_type for tag in ("Q2", "Q3", "IQ1", "IQ2", "IQ3", "TQ")):
        return LOW_BIT_BOUNDS
    return DEFAULT_QUANT_BOUNDS


@dataclass
class TokenizerParity:
    probes: int
    mismatches: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches


@dataclass
class LogitParity:
    tokens: int
    max_abs: float
    mean_kl: float
    max_kl: float
    top1: float
    bounds: Bounds

    @property
    def passed(self) -> bool:
        b = self.bounds
        return ((b.max_abs is None or self.max_abs <= b.max_abs) and self.mean_kl <= b.mean_kl
                and self.top1 >= b.min_top1)


@dataclass
class Generation:
    prompt: str
    text: str
    template_ok: bool
    rendered: str
    template_check: str = "renders the komt prompt"  # or "is the model's own", for models with their own

    @property
    def passed(self) -> bool:
        return self.template_ok


@dataclass
class VerifyReport:
    file: str
    file_type: str
    tokenizer: TokenizerParity
    logits: LogitParity
    generation: Generation
    lora: str | None = None  # the LoRA adapter GGUF llama.cpp applied to ``file`` at run time

    @property
    def passed(self) -> bool:
        return self.tokenizer.passed and self.logits.passed and self.generation.passed

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def summary(self) -> str:
        t, lg, g = self.tokenizer, self.logits, self.generation
        b = lg.bounds
        lines = [
            f"{Path(self.file).name}{f' + {Path(self.lora).name}' if self.lora else ''} ({self.file_type})",
            f"  tokenizer parity: {t.probes - len(t.mismatches)}/{t.probes} Korean probes identical"
            + ("" if t.passed else "  FAIL"),
        ]
        for m in t.mismatches:
            lines.append(f"    mismatch {m['text']!r}: llama.cpp {m['gguf'][:12]} vs reference {m['reference'][:12]}")
        max_abs = f"max|Δlogit| {lg.max_abs:.4g}" + (f" (≤ {b.max_abs})" if b.max_abs is not None else "")
        lines.append(f"  logit parity over {lg.tokens} tokens: {max_abs}, mean KL {lg.mean_kl:.3g} (≤ {b.mean_kl}), "
                     f"max KL {lg.max_kl:.3g}, top-1 {lg.top1:.1%} (≥ {b.min_top1:.0%})"
                     + ("" if lg.passed else "  FAIL"))
        lines.append(f"  chat template {g.template_check}: {'yes' if g.template_ok else 'NO  FAIL'}")
        lines.append(f"  greedy answer to {g.prompt!r}: {g.text!r}")
        lines.append("  PASS" if self.passed else "  FAIL")
        return "\n".join(lines)


class ReferenceTokenizer:
    """The original tokenizer: SentencePiece itself for tokenizer.model, `tokenizers` for tokenizer.json."""

    def __init__(self, folder: Path):
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        if (folder / "tokenizer.model").is_file():
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self._tk = None
            self.add_bos = cfg.get("add_bos_token", True) is not False
            self.bos_id = self._sp.bos_id()
        elif (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._sp = None
            self._tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.add_bos = bool(cfg.get("add_bos_token", False))
            bos = cfg.get("bos_token")
            bos = bos.get("content") if isinstance(bos, dict) else bos
            self.bos_id = self._tk.token_to_id(bos) if bos else None
        else:
            raise KomtError(f"no tokenizer in {folder}: expected tokenizer.model or tokenizer.json")

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text) if self._sp is not None else self._tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + list(ids)


def tokenizer_parity(llm, tokenizer: ReferenceTokenizer, probes: Sequence[str] = KOREAN_PROBES) -> TokenizerParity:
    """llama.cpp's token ids (``llm``: a llama_cpp.Llama, a vocab_only one will do) against the original
    tokenizer's, on each probe; every disagreement is listed."""
    parity = TokenizerParity(probes=len(probes))
    for text in probes:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=tokenizer.add_bos, special=False)
        theirs = tokenizer.encode(text)
        if list(ours) != theirs:
            parity.mismatches.append({"text": text, "gguf": list(ours), "reference": theirs})
    return parity


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, test: np.ndarray, bounds: Bounds) -> LogitParity:
    """Per-position KL(ref ‖ test), top-1 agreement and max-abs difference between two [tokens, vocab] arrays."""
    lp, lq = _log_softmax(ref), _log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    # Top-1 agreement: the token the file picks is the reference's top token (exact ties count as agreement).
    picked = test.argmax(-1)
    ref_best = ref.max(-1)
    top1 = float((ref[np.arange(len(picked)), picked] >= ref_best - TIE_TOLERANCE).mean())
    return LogitParity(tokens=int(ref.shape[0]), max_abs=float(np.abs(ref - test).max()),
                       mean_kl=float(kl.mean()), max_kl=float(kl.max()), top1=top1, bounds=bounds)


def greedy(llm, prompt: str, max_new_tokens: int, *, add_bos: bool = True, special: bool = False) -> str:
    """Greedy decoding with llama.cpp: argmax of the logits at each step, until eos or the token budget.
    ``special``: the prompt's control-token text (a chat template's ``<|im_start|>``) is read as those tokens."""
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=special)
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    eos = llm.token_eos()
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return llm.detokenize(out).decode("utf-8", errors="replace")


@dataclass
class Reference:
    """The original model's side of the comparison, computed once and reused for every file of a model."""
    hf: str
    resolved: object  # zoo.ResolvedModel
    tokenizer: ReferenceTokenizer
    template: object  # templates.PromptTemplate
    vocab_size: int | None
    prompt_ids: list[list[int]]
    logits: list[np.ndarray]  # one [tokens, vocab] float32 array per prompt
    own_template: str | None = None  # the chat template of a model that keeps its own (not komt's), rendered
    keeps_own_template: bool = False  # prompts in it (or bare, when it has none) and the file must carry it

    def format(self, prompt: str) -> str:
        """A Korean prompt as the model is prompted: komt's format, or the model's own chat template."""
        if not self.keeps_own_template:
            return self.template.format(prompt)
        return render_chat(self.own_template, prompt) if self.own_template else prompt


def render_chat(chat_template: str, prompt: str) -> str:
    """One user turn in ``chat_template``, ready for the answer (BOS left to the tokenizer)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(chat_template).render(messages=[{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, bos_token="", eos_token="</s>")


def load_reference(hf: str, *, adapter: str | None = None, allow_pickle: bool = False, template: str | None = None,
                   hf_dtype: str = "float32", n_ctx: int = 512, merge_adapter: bool = True,
                   progress: bool = True) -> Reference:
    """Tokenize the Korean prompts and run the HF model on them (base + adapter merged in its own dtype, or with
    ``merge_adapter=False`` the base and peft's unmerged adapter, as llama.cpp applies a LoRA file).

    The model runs one decoder layer at a time from the memory-mapped checkpoint (:func:`streamed_logits`), so
    the reference of a 7B model costs about one layer's memory instead of the whole float32 model."""
    from .layer_reference import streamed_logits  # torch: imported when a reference is computed

    resolved = resolve(hf, adapter=adapter, allow_pickle=allow_pickle)
    if not merge_adapter and resolved.adapter is None:
        raise KomtError(f"--lora needs the peft adapter it was converted from as the reference: pass --adapter "
                        f"ADAPTER (or a zoo name as --hf); {hf} alone is the base without it")
    tokenizer = ReferenceTokenizer(resolved.path)
    cfg = json.loads((resolved.path / "config.json").read_text(encoding="utf-8"))
    tmpl = model_template(resolved, template)
    # komt's template is written for komt's models; any other keeps its own (as `komt-edge gguf` writes it)
    own = chat_template_for(resolved, template)
    keeps_own = own not in {t.chat_template for t in TEMPLATES.values()}
    ref = Reference(hf, resolved, tokenizer, tmpl, cfg.get("vocab_size"), [], [], own, keeps_own)
    ref.prompt_ids = [tokenizer.encode(ref.format(prompt))[:n_ctx] for prompt in KOREAN_PROMPTS]
    ref.logits = streamed_logits(resolved.path, ref.prompt_ids, dtype=hf_dtype, adapter=resolved.adapter,
                                 merge_in_base_dtype=merge_adapter, allow_pickle=allow_pickle, progress=progress)
    return ref


def verify(gguf_file: str | Path, hf: str, *, adapter: str | None = None, allow_pickle: bool = False,
           template: str | None = None, n_threads: int | None = None, n_ctx: int = 512,
           hf_dtype: str = "float32", max_new_tokens: int = 40, bounds: Bounds | None = None,
           overrides: BoundOverrides | None = None, reference: Reference | None = None,
           lora: str | Path | None = None, plan: QuantPlan | None = None) -> VerifyReport:
    """Check FILE against the HF model ``hf`` (zoo name, Hub id or folder); see the module docstring.

    With ``lora`` (a LoRA adapter GGUF, `komt-edge gguf-lora`), FILE is the base, llama.cpp applies the adapter at
    run time, and the reference is the HF base with the peft ``adapter`` unmerged; the bounds are FILE's type's.

    The bounds are ``bounds``, else the defaults of FILE's ``plan`` (the one it was made with, when the caller
    knows it) or of its file type, with ``overrides`` applied. Pass ``reference`` (from ``load_reference``) to check
    several files against one HF forward pass.
    """

    path = Path(gguf_file)
    if not path.is_file():
        raise KomtError(f"{path} does not exist: run `komt-edge gguf` first")
    file_type = file_info(path).file_type
    chat_template, _ = gguf_template(path)  # what the file stores, as llama.cpp applies it
    bounds = bounds or (overrides or BoundOverrides()).apply(bounds_for(plan or file_type))
    if lora is not None:
        if not Path(lora).is_file():
            raise KomtError(f"--lora {lora} does not exist: run `komt-edge gguf-lora` first")
        check_lora_fits(Path(lora), path)
    what = f"{path} with the LoRA adapter {lora}" if lora is not None else str(path)
    fix = "`komt-edge gguf-lora` for this base" if lora is not None else "`komt-edge gguf`"
    llm = open_llama(path, what=what, fix=f"convert it again with {fix}", n_ctx=n_ctx, n_threads=n_threads,
                     n_threads_batch=n_threads, logits_all=True, seed=0, lora_path=None if lora is None else str(lora))
    try:
        ref = reference or load_reference(hf, adapter=adapter, allow_pickle=allow_pickle, template=template,
                                          hf_dtype=hf_dtype, n_ctx=n_ctx, merge_adapter=lora is None)
        if ref.vocab_size != llm.n_vocab():
            raise KomtError(f"{path.name} has {llm.n_vocab()} tokens but {ref.hf} has {ref.vocab_size}: the file "
                            "was not made from this model; pass the model it was converted from")

        # 1. tokenizer parity
        parity = tokenizer_parity(llm, ref.tokenizer)

        # 2. logit parity, on the reference tokenization so that tokenizer and weights are judged separately
        tests = []
        for ids in ref.prompt_ids:
            llm.reset()
            llm.eval(ids)
            tests.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        logits = compare_logits(np.concatenate(ref.logits), np.concatenate(tests), bounds)

        # 3. chat template + greedy generation
        prompt = KOREAN_PROMPTS[0]
        rendered = render_chat(chat_template, prompt) if chat_template else ""
        if ref.keeps_own_template:
            template_ok, check = chat_template == ref.own_template, "is the model's own"
        else:
            template_ok, check = rendered == ref.template.format(prompt), "renders the komt prompt"
        text = greedy(llm, ref.format(prompt), max_new_tokens, add_bos=ref.tokenizer.add_bos,
                      special=ref.keeps_own_template)
        generation = Generation(prompt, text, template_ok, rendered, check)
    finally:
        llm.close()
    return VerifyReport(str(path), file_type, parity, logits, generation, None if lora is None else str(lora))


@dataclass
class VerifyRun:
    """The reports of several files checked against one reference forward pass."""
    hf: str
    reports: list[VerifyReport]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports)

    @property
    def failed(self) -> list[str]:
        return [Path(r.file).name for r in self.reports if not r.passed]

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.reports)

    def to_dict(self) -> dict:
        return {"hf": self.hf, "passed": self.passed, "reports": [r.to_dict() for r in self.reports]}

    def check(self) -> None:
        """Raise the one-line error that names every file that missed a bound."""
        if not self.passed:
            raise KomtError(f"verification failed for {', '.join(self.failed)}: see the report above")


def verify_files(files: Sequence[str | Path], hf: str, *, adapter: str | None = None, allow_pickle: bool = False,
                 template: str | None = None, hf_dtype: str = "float32", n_threads: int | None = None,
                 overrides: BoundOverrides | None = None, json_out: str | Path | None = None,
                 log: Callable[[str], None] | None = None, lora: str | Path | None = None,
                 progress: bool = True, plans: Sequence[QuantPlan | None] | None = None) -> VerifyRun:
    """Verify each GGUF file of a model against one HF forward pass (see :func:`verify`).

    Inputs and the ``json_out`` path are checked before the reference is loaded; each report goes to ``log`` as it
    is done; ``json_out`` gets the list of reports (written atomically). Bound failures are in the result:
    :meth:`VerifyRun.check` turns them into an error. ``progress``: a bar over the reference's layers. ``plans``:
    the plan each file was made with, where the caller knows it (the bounds are the plan's)."""
    paths = [Path(f) for f in files]
    if not paths:
        raise KomtError("no GGUF file to verify: pass the files `komt-edge gguf` wrote")
    plans = list(plans) if plans is not None else [None] * len(paths)
    if len(plans) != len(paths):
        raise ValueError(f"{len(plans)} plans for {len(paths)} files")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise KomtError(f"{missing[0]} does not exist: run `komt-edge gguf` first")
    for path in paths:  # an importance matrix or a LoRA GGUF among FILES: say so before the reference is loaded
        check_model_gguf(path, "FILE")
    if json_out is not None:  # never an input (the GGUF files, a local --hf, --adapter or --lora), nor a foreign file
        json_out = check_output_file(Path(json_out), option="--json", inputs=[*paths, hf, adapter, lora],
                                     ours=holds_json, ours_kind=JSON_REPORT, can_force=False)
    if lora is not None:
        if not Path(lora).is_file():
            raise KomtError(f"--lora {lora} does not exist: run `komt-edge gguf-lora` first")
        for path in paths:  # before the reference is loaded
            check_lora_fits(Path(lora), path)
    reference = load_reference(hf, adapter=adapter, allow_pickle=allow_pickle, template=template, hf_dtype=hf_dtype,
                               merge_adapter=lora is None, progress=progress)
    run = VerifyRun(hf, [])
    for path, plan in zip(paths, plans):
        report = verify(path, hf, n_threads=n_threads, overrides=overrides, reference=reference, lora=lora,
                        plan=plan)
        if log is not None:
            log(report.summary())
        run.reports.append(report)
    if json_out is not None:
        ensure_writable_dir(json_out.parent, option="--json")
        write_json_report(json_out, "[" + ",\n".join(r.to_json() for r in run.reports) + "]\n")
    return run
