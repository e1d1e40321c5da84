"""The quantization plan: what one GGUF file is, decided in one place.

A :class:`QuantPlan` is a file's identity: its **name** (the label in ``<model>-<NAME>.gguf``, the card's row,
what ``chat``/``serve --quant`` chooses), the **type of every tensor** (llama.cpp's mix for a base type such as
q4_K_M, plus per-tensor overrides in llama-quantize's ``--tensor-type PATTERN=TYPE`` form), **whether and which
importance matrix** it is quantized with (None, ``"korean"`` or an imatrix file) and **how it was made**.

The planner (:func:`plan_for`, :func:`plans_for`) is the only place that turns what a user typed (``-q q4_K_M``)
into plans, by asking each kind of plan in :data:`KINDS` in turn. Everything else takes the plan:

- both quantization paths: komt-edge's own writer (``converters.hf_to_gguf.Converter``, its per-tensor types from
  ``converters.quantize.compute_types``) and llama.cpp's ``llama_model_quantize`` (``quantize.quantize_file``,
  used with an imatrix). Both hand the overrides to llama.cpp itself (``llama_model_quantize_params.tt_overrides``,
  what ``llama-quantize --tensor-type`` fills), so the type of each tensor is llama.cpp's choice on either path and
  ``llama-quantize`` with :meth:`QuantPlan.llama_quantize_args` writes the same file;
- the file name (``gguf.output_name``), ``gguf.convert``, the release (its files, manifest and imatrix note), the
  cards (a row per plan, how a plan that is not llama.cpp's own mix was made), verify's bounds (``bounds_for``: a
  plan is bounded as its base type) and runtime's file choice (:func:`file_label`, :func:`label_bits`).

A new kind of plan (issue 26: per-tensor types chosen by measurement) is one function added with
:func:`plan_kind`; see ``tests/test_plan.py``, which adds one that reads per-tensor types from a file.

This module imports nothing heavy (no numpy, gguf-py, torch or llama_cpp at import time): runtime and the CLI use it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from komt_edge.errors import KomtError

if TYPE_CHECKING:  # pragma: no cover
    from gguf import GGMLQuantizationType, LlamaFileType

# ---------------------------------------------------------------------------------------------------
# The names users type (-q q4_K_M) and the llama.cpp file type (general.file_type) each means.
# ---------------------------------------------------------------------------------------------------

# Float outputs are written the way convert_hf_to_gguf.py writes them (norms stay F32).
FLOAT_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}

# Quantized outputs follow llama-quantize's ftype mixes (names as llama-quantize prints them).
QUANT_TYPES = {
    "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q8_0": "MOSTLY_Q8_0",
    "q2_k": "MOSTLY_Q2_K", "q2_k_s": "MOSTLY_Q2_K_S",
    "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K",
    "iq2_xxs": "MOSTLY_IQ2_XXS", "iq2_xs": "MOSTLY_IQ2_XS", "iq2_s": "MOSTLY_IQ2_S", "iq2_m": "MOSTLY_IQ2_M",
    "iq3_xxs": "MOSTLY_IQ3_XXS", "iq3_xs": "MOSTLY_IQ3_XS", "iq3_s": "MOSTLY_IQ3_S", "iq3_m": "MOSTLY_IQ3_M",
    "iq1_s": "MOSTLY_IQ1_S", "iq1_m": "MOSTLY_IQ1_M",
    "iq4_nl": "MOSTLY_IQ4_NL", "iq4_xs": "MOSTLY_IQ4_XS",
    "tq1_0": "MOSTLY_TQ1_0", "tq2_0": "MOSTLY_TQ2_0",
}

KOREAN = "korean"  # the imatrix computed on the Korean calibration text (komt_edge.imatrix.KOREAN)


def normalize(qtype: str) -> str:
    """A llama.cpp type name as komt-edge keys it (lower case); ValueError for a name llama.cpp has no mix for."""
    key = qtype.strip().lower()
    if key not in FLOAT_TYPES and key not in QUANT_TYPES:
        known = ", ".join([*FLOAT_TYPES, *QUANT_TYPES])
        raise ValueError(f"unknown quantization type {qtype!r}; known: {known}")
    return key


def display_name(qtype: str) -> str:
    """The spelling used in GGUF file names: komt-mistral-7b-v1-Q4_K_M.gguf."""
    return normalize(qtype).upper()


def is_kquant_or_iq(qtype: str) -> bool:
    """The k-quant and IQ mixes: the types whose quality an importance matrix decides (q4_0, q8_0, ... are not)."""
    key = normalize(qtype)
    return key.startswith("iq") or "_k" in key


# ---------------------------------------------------------------------------------------------------
# A plan's name in a file name: what runtime chooses among (``--quant``), and the grammar every plan name obeys.
# ---------------------------------------------------------------------------------------------------

_LABEL = r"I?Q\d(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|F16|F32"
# A plan whose per-tensor types are measured per model (komt_edge.korean_mix): KO-<base mix>, and optionally its byte
# budget (KO-Q3_K_M-3.5BPW, KO-Q3_K_M-250MB). "KO" is matched in upper case only, so that a model whose own name ends
# in "-ko" (llama-3-ko-Q4_K_M.gguf) keeps its plain label.
_KO_LABEL = r"(?-i:KO)-I?Q\d(?:_[A-Z0-9]+)*(?:-\d+(?:\.\d+)?(?:BPW|[KMG]B))?"
_LABEL = rf"{_KO_LABEL}|{_LABEL}"
# <model>-<NAME>.gguf or <model>.<NAME>.gguf, optionally a gguf-split shard.
_FILE_LABEL = re.compile(rf"[-.](?P<quant>{_LABEL})(?:-(?P<part>\d{{5}})-of-\d{{5}})?\.gguf$", re.IGNORECASE)


def file_label(file_name: str) -> tuple[str, str | None] | None:
    """The plan name a GGUF file name carries (upper case) and its gguf-split shard number ("00001", or None for a
    whole file); None when the name carries none."""
    m = _FILE_LABEL.search(file_name)
    return None if m is None else (m.group("quant").upper(), m.group("part"))


def label_bits(label: str) -> int:
    """The bits per weight a plan name announces (Q4_K_M → 4, KO-Q3_K_M → 3, F16 → 16): what runtime's default
    choice ranks by."""
    digits = re.search(r"\d+", label)
    return int(digits.group()) if digits else 0


# ---------------------------------------------------------------------------------------------------
# Per-tensor types: llama-quantize's --tensor-type PATTERN=TYPE.
# ---------------------------------------------------------------------------------------------------

# llama.cpp compiles each pattern as a C++ std::regex (ECMAScript) and searches it in the tensor name; a pattern it
# cannot compile would end the process, so only what Python's re and ECMAScript read alike is accepted: no (?...)
# group but (?:...), (?=...), (?!...), and no escaped letter or digit but \d, \w, \s, \b.
def _reads_alike(pattern: str) -> bool:
    chars = iter(pattern)
    previous = ""
    for c in chars:
        if c == "\\":
            escaped = next(chars, "")
            if escaped.isalnum() and escaped not in "dwsb":
                return False
            previous = ""
            continue
        if previous == "(" and c == "?":
            if next(chars, "") not in (":", "=", "!"):
                return False
            previous = ""
            continue
        previous = c
    return True


def check_pattern(pattern: str) -> str:
    """A --tensor-type pattern as llama-quantize passes it to llama.cpp (lower case), checked to compile alike in
    Python and in llama.cpp's std::regex."""
    pattern = pattern.strip().lower()  # llama-quantize lower-cases the name part of --tensor-type
    if not pattern or any(c.isspace() for c in pattern):
        raise KomtError(f"per-tensor type pattern {pattern!r}: give a tensor name or a regular expression without "
                        "spaces (blk\\.0\\.attn_v\\.weight, ffn_down)")
    try:
        re.compile(pattern)
    except re.error as err:
        raise KomtError(f"per-tensor type pattern {pattern!r} is not a regular expression: {err}") from None
    if not _reads_alike(pattern):
        raise KomtError(f"per-tensor type pattern {pattern!r} uses a construct llama.cpp's regex does not read as "
                        "Python does: use names, '.', '\\.', '\\d', '|', '()', '(?:)', '[]', '*', '+', '?', '^', '$'")
    return pattern


def ggml_type(name: str) -> "GGMLQuantizationType":
    """A ggml tensor type by name, case-insensitively, as llama-quantize's parse_ggml_type reads it."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType[name.strip().upper()]
    except KeyError:
        known = ", ".join(t.name.lower() for t in GGMLQuantizationType)
        raise KomtError(f"unknown tensor type {name!r}; ggml's types are {known}") from None


def parse_tensor_types(text: str, *, source: str = "the tensor types") -> tuple[tuple[str, str], ...]:
    """``PATTERN=TYPE`` items separated by white space (llama-quantize's ``--tensor-type-file`` format; ``#`` starts
    a comment here) → the plan's overrides, in order."""
    items = []
    for line in text.splitlines():
        for item in line.split("#", 1)[0].split():
            pattern, sep, type_name = item.partition("=")
            if not sep or not pattern or not type_name:
                raise KomtError(f"{source}: {item!r} is not PATTERN=TYPE (blk\\.0\\.attn_v\\.weight=q8_0)")
            items.append((check_pattern(pattern), ggml_type(type_name).name))
    return tuple(items)


# ---------------------------------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A model name as komt-edge's file names carry it: letters and digits of every script (Hangul included,
    NFC-normalized as macOS folder names are not); anything else between them becomes one hyphen, and no name
    starts with a dot."""
    return re.sub(r"[^\w.-]+", "-", unicodedata.normalize("NFC", name)).strip("-.") or "model"


@dataclass(frozen=True)
class QuantPlan:
    """One GGUF file's quantization: see the module docstring. Build plans with the planner (:func:`plan_for`,
    :func:`mix`), never by hand outside a plan kind."""

    name: str  # file label, card row, --quant: "Q4_K_M"; its grammar is _LABEL's (upper case)
    base: str  # llama.cpp's type mix it starts from, normalized: "q4_k_m", "f16"
    tensor_types: tuple[tuple[str, str], ...] = ()  # (pattern, ggml type name) overrides: first match wins
    imatrix: str | None = None  # None, "korean", or the path of an importance-matrix file
    made_by: str = ""  # how the plan was made, in words (the card says it for a plan that is not a plain mix)
    # The chooser (registered with plan_chooser) that picks this plan's per-tensor types for a model once its float
    # file and importance matrix exist (issue 26: measured Korean sensitivity); "" when the types are fixed here.
    chooser: str = ""

    def __post_init__(self) -> None:
        try:
            base = normalize(self.base)
        except ValueError as err:
            raise KomtError(f"quantization plan {self.name}: {err}") from None
        object.__setattr__(self, "base", base)
        if not re.fullmatch(_LABEL, self.name):
            raise KomtError(f"quantization plan name {self.name!r}: a plan's name must read like llama.cpp's type "
                            "names (Q4_K_M, Q4_K_M_KO, IQ3_XXS, F16) so that its files can be found by type")
        if self.name.lower() in FLOAT_TYPES.keys() | QUANT_TYPES.keys() and self.name.lower() != base:
            raise KomtError(f"quantization plan {self.name}: that name is llama.cpp's {self.name} mix; name the plan "
                            f"after what it is (for instance {display_name(base)}_X)")
        if self.tensor_types:
            if base in FLOAT_TYPES:
                raise KomtError(f"quantization plan {self.name}: per-tensor types need a quantized base type; "
                                f"{display_name(base)} is written as convert_hf_to_gguf.py writes it")
            if self.name == display_name(base):
                raise KomtError(f"quantization plan {self.name} changes the types of llama.cpp's {self.name} mix: "
                                f"give it its own name (for instance {self.name}_X)")
            items = tuple((check_pattern(p), ggml_type(t).name) for p, t in self.tensor_types)
            object.__setattr__(self, "tensor_types", items)
        if self.imatrix is not None and base in FLOAT_TYPES:
            raise KomtError(f"quantization plan {self.name}: a float file is not quantized with an importance matrix")
        if self.chooser and base in FLOAT_TYPES:
            raise KomtError(f"quantization plan {self.name}: per-tensor types need a quantized base type")

    # -- what the file is -------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """How the plan is asked for and recorded: llama.cpp's mix name (q4_k_m) for a plain mix, else its name."""
        return self.base if self.is_plain_mix else self.name

    @property
    def is_plain_mix(self) -> bool:
        """llama.cpp's own mix under its own name, no per-tensor type changed (what llama-quantize TYPE writes)."""
        return not self.tensor_types and not self.chooser and self.name == display_name(self.base)

    @property
    def pending(self) -> bool:
        """Whether this plan's per-tensor types are still to be chosen for a model (see :func:`choose`)."""
        return bool(self.chooser)

    @property
    def is_float(self) -> bool:
        return self.base in FLOAT_TYPES

    @property
    def file_type(self) -> str:
        """general.file_type, by name, as komt-edge's reader reports it (MOSTLY_Q4_K_M): the base type's."""
        return FLOAT_TYPES.get(self.base) or QUANT_TYPES[self.base]

    @property
    def ftype(self) -> "LlamaFileType":
        from gguf import LlamaFileType

        return LlamaFileType[self.file_type]

    def overrides(self) -> list[tuple[str, "GGMLQuantizationType"]]:
        """The per-tensor types as llama.cpp takes them (llama_model_tensor_override: pattern, ggml type)."""
        return [(p, ggml_type(t)) for p, t in self.tensor_types]

    def uses(self, imatrix: str | None) -> "QuantPlan":
        """This plan quantized with ``imatrix`` (None: without one)."""
        return replace(self, imatrix=imatrix)

    def llama_quantize_args(self, source: str = "SOURCE.gguf", target: str | None = None,
                            imatrix_file: str | None = None) -> list[str]:
        """The llama-quantize command that writes this plan's file from the float GGUF ``source``."""
        imatrix = imatrix_file or (self.imatrix if self.imatrix not in (None, KOREAN) else None)
        args = ["llama-quantize"]
        if imatrix:
            args += ["--imatrix", imatrix]
        for pattern, type_name in self.tensor_types:
            args += ["--tensor-type", f"{pattern}={type_name.lower()}"]
        return [*args, source, target or f"{self.name}.gguf", display_name(self.base)]

    def to_dict(self) -> dict:
        return {**asdict(self), "tensor_types": [list(item) for item in self.tensor_types]}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantPlan":
        """The plan ``to_dict`` recorded (a release manifest's, a card's)."""
        return cls(data["name"], data["base"], tuple(tuple(item) for item in data.get("tensor_types") or ()),
                   data.get("imatrix"), data.get("made_by", ""), data.get("chooser", ""))

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------------------------------------------
# The planner.
# ---------------------------------------------------------------------------------------------------

def mix(qtype: str) -> QuantPlan:
    """llama.cpp's own mix for a type name (what ``llama-quantize TYPE`` or ``convert_hf_to_gguf.py --outtype``
    writes)."""
    try:
        base = normalize(qtype)
    except ValueError as err:
        raise KomtError(str(err)) from None
    how = (f"convert_hf_to_gguf.py --outtype {base}" if base in FLOAT_TYPES
           else f"llama-quantize's {display_name(base)} mix")
    return QuantPlan(display_name(base), base, made_by=how)


def _llama_cpp_mix(spec: str) -> QuantPlan | None:
    key = spec.lower()
    return mix(key) if key in FLOAT_TYPES or key in QUANT_TYPES else None


PlanKind = Callable[[str], "QuantPlan | None"]

# The kinds of plan, asked in turn for each -q value: the first that returns a plan makes it. llama.cpp's own mixes
# are the last kind asked.
KINDS: list[PlanKind] = [_llama_cpp_mix]


def plan_kind(kind: PlanKind) -> PlanKind:
    """Add a kind of plan (a function from a -q value to a QuantPlan, or None when the value is not its kind), asked
    before the kinds already known. Usable as a decorator."""
    KINDS.insert(0, kind)
    return kind


# Choosers: a plan kind whose per-tensor types depend on the model (measured on it) returns a plan with ``chooser``
# set; ``gguf.convert`` calls the chooser once the model's float GGUF and importance matrix exist, and quantizes the
# plan it returns (the same name, its per-tensor types filled in, ``chooser`` empty).
Chooser = Callable[..., "Chosen"]
CHOOSERS: dict[str, Chooser] = {}


@dataclass(frozen=True)
class Chosen:
    """What a chooser returns: the plan with its per-tensor types, the largest file it may be (bytes; None: no
    bound), the GGUF metadata that records how it was chosen (komt_edge.* keys, strings of < 128 bytes or ints, as
    llama-quantize's --override-kv takes them) and the llama-quantize recipe to write beside the file
    (``--tensor-type-file`` contents)."""

    plan: QuantPlan
    max_bytes: int | None = None
    metadata: dict = None  # type: ignore[assignment]
    recipe: str = ""


def plan_chooser(name: str) -> Callable[[Chooser], Chooser]:
    """Register a chooser under ``name`` (a plan's ``chooser``). Usable as a decorator."""
    def register(fn: Chooser) -> Chooser:
        CHOOSERS[name] = fn
        return fn
    return register


def choose(plan: QuantPlan, **context) -> Chosen:
    """The plan ``plan``'s chooser makes for the model in ``context`` (source: its float GGUF; imatrix: weight name →
    importance; and what else the chooser documents)."""
    if not plan.chooser:
        return Chosen(plan, None, {}, "")
    try:
        chooser = CHOOSERS[plan.chooser]
    except KeyError:
        raise KomtError(f"quantization plan {plan.name}: no chooser {plan.chooser!r} is known") from None
    return chooser(plan, **context)


# Which plans an importance matrix given for a whole run applies to.
def every_quantized(plan: QuantPlan) -> bool:
    """gguf --imatrix: every quantized file (llama-quantize --imatrix applied to each)."""
    return not plan.is_float


def kquant_or_iq(plan: QuantPlan) -> bool:
    """release --imatrix: the k-quant and IQ mixes, whose quality an importance matrix decides."""
    return not plan.is_float and is_kquant_or_iq(plan.base)


def plan_for(spec: str | QuantPlan, *, imatrix: str | None = None,
             imatrix_for: Callable[[QuantPlan], bool] = every_quantized) -> QuantPlan:
    """The plan a -q value names (or ``spec`` itself, a QuantPlan), quantized with ``imatrix`` when ``imatrix_for``
    says so; a plan that already has an importance matrix keeps it."""
    if isinstance(spec, QuantPlan):
        plan = spec
    else:
        for kind in KINDS:
            plan = kind(spec.strip())
            if plan is not None:
                break
        else:
            known = ", ".join([*FLOAT_TYPES, *QUANT_TYPES])
            raise KomtError(f"unknown quantization type {spec!r}; known: {known}")
    if imatrix is not None and plan.imatrix is None and imatrix_for(plan):
        plan = plan.uses(str(imatrix))
    if plan.chooser and plan.imatrix is None:  # measured on Korean text: the Korean imatrix unless the run gives one
        plan = plan.uses(KOREAN)
    return plan


def plans_for(specs: str | QuantPlan | Iterable[str | QuantPlan], *, imatrix: str | None = None,
              imatrix_for: Callable[[QuantPlan], bool] = every_quantized) -> list[QuantPlan]:
    """The plans of a run: each -q value (one type, or a space/comma-separated list; or a QuantPlan), in order,
    without repeats; a one-line error names an unknown type and lists the known ones, or two plans of one name."""
    specs = [specs] if isinstance(specs, (str, QuantPlan)) else list(specs)
    plans: dict[str, QuantPlan] = {}
    for spec in specs:
        items = [spec] if isinstance(spec, QuantPlan) else str(spec).replace(",", " ").split()
        for item in items:
            plan = plan_for(item, imatrix=imatrix, imatrix_for=imatrix_for)
            if plans.setdefault(plan.name, plan) != plan:
                raise KomtError(f"two different quantization plans are named {plan.name}: give each its own name")
    if not plans:
        raise KomtError('no output type given: pass -q q4_0 -q q8_0 (or --quants "q4_0 q8_0"; f16, q4_K_M, ...)')
    return list(plans.values())


def parse_types(specs: str | Sequence[str]) -> list[str]:
    """The keys of the plans a run's -q values name (see :func:`plans_for`): q4_k_m for llama.cpp's mixes."""
    return [plan.key for plan in plans_for(specs)]


# The kinds of plan komt-edge ships besides llama.cpp's mixes (imported last: they use the names above).
from komt_edge import korean_mix as _korean_mix  # noqa: E402,F401 - registers ko-TYPE
