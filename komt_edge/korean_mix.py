"""Korean mixes (issue 26): ``-q ko-TYPE``, llama.cpp's TYPE mix with per-tensor types chosen by measured Korean
sensitivity, in a file no larger than llama.cpp's TYPE file for the same model and importance matrix.

How a plan is chosen (:func:`choose_korean_mix`, called by ``gguf.convert`` once the model's float GGUF and the
importance matrix exist):

1. **Measure.** llama.cpp's TYPE file is quantized with the imatrix (``llama_model_quantize``, as llama-quantize
   does); it is the budget and the base. Then, for each *kind* of tensor (attn_q, attn_k, attn_v, attn_output,
   ffn_gate, ffn_up, ffn_down, token_embd, output: every ``blk.N.KIND.weight`` together, all layers), a few files
   that give that kind one other type (one step down, one and two steps up the type ladder from the type the mix
   gives most of its bytes), everything else as the mix. Each file's end-to-end mean KL divergence against the float
   model is what ``bench quality`` measures (``komt_edge.bench.quality.quality``: llama.cpp evaluates both files),
   on the first ``n_chunks`` chunks of the **calibration** split of the Korean corpus (never the held-out split the
   benchmarks score), and its size is the file's. Per layer groups are not measured (their count would multiply the
   cost by the number of layers).
2. **Allocate.** Each kind takes one of its measured types (or the mix's); KLD changes are taken as additive and the
   best combination within the byte budget is found exactly (a multiple-choice knapsack over the Pareto frontier of
   bytes against predicted KLD).
3. **Check.** The best few combinations within the budget are quantized and measured as they are (the additive
   prediction is a prediction); the best measured one is the plan, or the plain mix's types when none beats it.

The measurements are kept in OUT beside the files (``<model>-KO-<TYPE>.sensitivity.json``, written atomically once
complete) with the fingerprints of the float file, the imatrix and the text they were made with; a file whose
fingerprints differ is never used (it is measured again and replaced), so a second budget for the same model costs
only the allocation and the check.

The recipe: beside each KO file, ``<model>-KO-<TYPE>.tensor-types.txt`` in llama-quantize's ``--tensor-type-file``
format, and the same items in the file's metadata (``komt_edge.plan.*``):
``llama-quantize --imatrix IMATRIX --tensor-type-file THAT.txt FLOAT.gguf OUT.gguf TYPE`` writes the same tensors.

Budgets: ``ko-TYPE`` is bounded by llama.cpp's TYPE file; ``ko-TYPE@3.5bpw`` and ``ko-TYPE@250MB`` (kB, MB, GB:
powers of 1000) by that size, named ``KO-TYPE-3.5BPW`` / ``KO-TYPE-250MB``.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .converters.plan import (QUANT_TYPES, Chosen, QuantPlan, display_name, is_kquant_or_iq, plan_chooser,
                              plan_kind, safe_name)
from .errors import KomtError
from .util import sha256_file

PREFIX = "ko-"
CHOOSER = "korean-sensitivity"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Settings:
    """How much Korean calibration text each sensitivity measurement evaluates (llama-perplexity's chunks)."""
    n_ctx: int = 512
    n_chunks: int = 4
    checks: int = 3  # combinations quantized and measured as they are, after the additive prediction


SETTINGS = Settings()

# The types a tensor kind may take, by bits per weight. k-quant bases move on the k-quant ladder, IQ bases on one
# with the IQ types; token_embd and output never take a type that llama.cpp quantizes only with an imatrix entry
# (the imatrix has none for token_embd).
K_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
IQ_LADDER = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "Q5_K", "Q6_K", "Q8_0")
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"}
STEPS = (-1, 1, 2)  # the options measured per kind, in ladder steps from the type the mix gives it most bytes of
BPW = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "IQ2_XXS": 2.0625,
       "IQ2_XS": 2.3125, "IQ2_S": 2.5, "IQ3_XXS": 3.0625, "IQ3_S": 3.4375, "IQ4_XS": 4.25, "IQ4_NL": 4.5,
       "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "IQ1_S": 1.5625, "IQ1_M": 1.75, "F16": 16.0,
       "BF16": 16.0, "F32": 32.0, "TQ1_0": 1.6875, "TQ2_0": 2.0625}

_SPEC = re.compile(r"ko-(?P<base>[a-z0-9_]+?)(?:@(?P<amount>\d+(?:\.\d+)?)(?P<unit>bpw|kb|mb|gb))?", re.IGNORECASE)
_UNITS = {"kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9}


def known_bases() -> list[str]:
    return [k for k in QUANT_TYPES if is_kquant_or_iq(k) and not k.startswith("tq")]


# ---------------------------------------------------------------------------------------------------
# The plan kind: -q ko-TYPE[@BUDGET].
# ---------------------------------------------------------------------------------------------------

@plan_kind
def korean_mix(spec: str) -> QuantPlan | None:
    """``ko-TYPE`` → the pending plan KO-TYPE (its per-tensor types chosen per model by :func:`choose_korean_mix`)."""
    if not spec.lower().startswith(PREFIX):
        return None
    m = _SPEC.fullmatch(spec.strip())
    if m is None:
        raise KomtError(f"{spec!r}: write a Korean mix as ko-TYPE, ko-TYPE@BPWbpw or ko-TYPE@SIZE "
                        "(ko-q3_K_M, ko-q3_K_M@3.5bpw, ko-q3_K_M@250MB)")
    base = m.group("base").lower()
    if base not in known_bases():
        raise KomtError(f"ko-{m.group('base')}: a Korean mix starts from a k-quant or IQ mix of llama-quantize; known: "
                        + ", ".join(f"ko-{k}" for k in known_bases()))
    name = f"KO-{display_name(base)}"
    budget = f"llama.cpp's {display_name(base)} file"
    if m.group("amount"):
        amount, unit = m.group("amount"), m.group("unit").lower()
        if unit == "bpw" and not 1.5 <= float(amount) <= 16:
            raise KomtError(f"{spec}: a budget of {amount} bits per weight is out of range: give 1.5 to 16 bpw")
        if unit != "bpw" and float(amount) <= 0:
            raise KomtError(f"{spec}: a budget of {amount}{unit.upper()} is out of range: give a positive size")
        name += f"-{amount}{unit.upper()}"
        budget = f"{amount} bits per weight" if unit == "bpw" else f"{amount} {unit.upper()}"
    return QuantPlan(name, base, made_by=f"llama-quantize's {display_name(base)} mix with per-tensor types chosen by "
                     f"measured Korean sensitivity (mean KLD against the float model on Korean calibration text), "
                     f"no larger than {budget}", chooser=CHOOSER)


def budget_of(plan: QuantPlan, base_bytes: int, n_params: int) -> int:
    """The largest file ``plan`` may be: llama.cpp's base file, or the budget its name carries."""
    m = re.search(r"-(\d+(?:\.\d+)?)(BPW|KB|MB|GB)$", plan.name)
    if m is None:
        return base_bytes
    amount, unit = float(m.group(1)), m.group(2).lower()
    return int(amount * n_params / 8) if unit == "bpw" else int(amount * _UNITS[unit])


# ---------------------------------------------------------------------------------------------------
# Tensor kinds, their types and their options.
# ---------------------------------------------------------------------------------------------------

def kind_of(name: str) -> str | None:
    """The group a weight is measured in: its kind (blk.N.KIND.weight → KIND), token_embd, output."""
    if name in ("token_embd.weight", "output.weight"):
        return name.split(".")[0]
    m = re.fullmatch(r"blk\.\d+\.(\w+)\.weight", name)
    return m.group(1) if m else None


def pattern_of(kind: str) -> str:
    """The --tensor-type pattern of every tensor of a kind (anchored: ``output`` must not match attn_output)."""
    return rf"^{kind}\.weight$" if kind in ("token_embd", "output") else rf"^blk\.\d+\.{kind}\.weight$"


def _tensors(path: Path) -> dict[str, tuple[str, int, int]]:
    """name → (ggml type name, bytes, elements) of a GGUF file."""
    from gguf import GGMLQuantizationType

    from .converters.gguf_file import GgufHeader

    with GgufHeader(path) as header:
        return {name: (GGMLQuantizationType(t).name, n_bytes, n) for name, t, n_bytes, n in header.tensors()}


def _ladder(base: str, kind: str) -> tuple[str, ...]:
    ladder = IQ_LADDER if base.startswith("iq") else K_LADDER
    return tuple(t for t in ladder if not (kind in ("token_embd", "output") and t in NEEDS_IMATRIX))


def options_for(base: str, kinds: dict[str, dict[str, int]]) -> list[tuple[str, str]]:
    """The (kind, type) files to measure: for each kind, the ladder types ``STEPS`` away from the type the mix gives
    most of its bytes (the nearest rungs below or above when the ladder ends)."""
    out = []
    for kind, types in kinds.items():
        main = max(types, key=types.get)
        ladder = _ladder(base, kind)
        here = min(range(len(ladder)), key=lambda i: (abs(BPW[ladder[i]] - BPW.get(main, 8.5)), i))
        steps = [s for s in STEPS if 0 <= here + s < len(ladder)]
        extra = [s for s in (-2, -3, 3) if 0 <= here + s < len(ladder) and s not in steps]
        for s in (steps + extra)[:len(STEPS)]:
            if set(types) != {ladder[here + s]}:
                out.append((kind, ladder[here + s]))
    return out


# ---------------------------------------------------------------------------------------------------
# Fingerprints and the cache.
# ---------------------------------------------------------------------------------------------------

def imatrix_fingerprint(weights: dict) -> str:
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def cache_path(out: Path, display: str, base: str) -> Path:
    """Beside the KO file (``<model>-KO-<TYPE>.gguf``), its measurements."""
    return Path(out) / f"{safe_name(display)}-KO-{display_name(base)}.sensitivity.json"


def _read_cache(path: Path, fingerprints: dict) -> dict | None:
    """The measurements at ``path`` when they were made with exactly ``fingerprints``; None otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprints") != fingerprints:
        return None
    return data


def _write_cache(path: Path, data: dict) -> None:
    from .atomic import atomic_file

    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------------

def _klds(files: list[Path], source: Path, text_file: Path, settings: Settings, n_threads: int | None,
          batch_bytes: int = 2 << 30) -> list[float]:
    """Mean KLD of each file against the float ``source`` on the text, as `bench quality` measures it."""
    from .bench.quality import quality

    out: list[float] = []
    i = 0
    while i < len(files):
        batch = [files[i]]
        size = files[i].stat().st_size
        while i + len(batch) < len(files) and size + files[i + len(batch)].stat().st_size <= batch_bytes:
            size += files[i + len(batch)].stat().st_size
            batch.append(files[i + len(batch)])
        report = quality(batch, reference=source, text=text_file, n_ctx=settings.n_ctx, n_chunks=settings.n_chunks,
                         n_threads=n_threads, progress=False, memory_budget=None)
        out += [r.kl.mean_kld for r in report.results]
        i += len(batch)
    return out


def measure(source: Path, base: str, weights: dict, provenance: dict, text_file: Path, work: Path, *,
            settings: Settings, n_threads: int | None, progress: bool) -> dict:
    """The base file's bytes and KLD, and each (kind, type) option's change in bytes and KLD (see the module
    docstring)."""
    from tqdm.auto import tqdm

    from .converters import quantize as q
    from .converters.plan import mix

    base_file = work / "base.gguf"
    q.quantize_file(source, base_file, mix(base), imatrix=weights, metadata=provenance, n_threads=n_threads)
    tensors = _tensors(base_file)
    kinds: dict[str, dict[str, int]] = {}
    for name, (type_name, n_bytes, _) in tensors.items():
        kind = kind_of(name)
        if kind is not None and type_name not in ("F32", "F16", "BF16"):
            kinds.setdefault(kind, {}).setdefault(type_name, 0)
            kinds[kind][type_name] += n_bytes
    if not kinds:
        raise KomtError(f"{display_name(base)} quantizes no weight of this model: there is nothing to allocate")
    options = options_for(base, kinds)
    files = []
    for i, (kind, type_name) in enumerate(tqdm(options, desc=f"KO-{display_name(base)}: quantizing options",
                                               unit="file", disable=not progress)):
        plan = QuantPlan(f"{display_name(base)}_M{i}", base, ((pattern_of(kind), type_name),))
        path = work / f"option-{i}.gguf"
        q.quantize_file(source, path, plan, imatrix=weights, metadata=provenance, n_threads=n_threads)
        files.append(path)
    klds = _klds([base_file, *files], source, text_file, settings, n_threads)
    base_bytes = base_file.stat().st_size
    measured = []
    for (kind, type_name), path, kld in zip(options, files, klds[1:]):
        got = {t for n, (t, _, _) in _tensors(path).items() if kind_of(n) == kind}
        measured.append({"kind": kind, "pattern": pattern_of(kind), "type": type_name, "types": sorted(got),
                         "bytes": path.stat().st_size - base_bytes, "kld": kld - klds[0]})
        path.unlink()
    return {"base": {"bytes": base_bytes, "kld": klds[0],
                     "types": {k: max(t, key=t.get) for k, t in kinds.items()},
                     "params": sum(e for _, _, e in tensors.values())},
            "options": measured}


# ---------------------------------------------------------------------------------------------------
# Allocating.
# ---------------------------------------------------------------------------------------------------

def frontier(options: list[dict]) -> list[tuple[int, float, tuple[dict, ...]]]:
    """Every combination of at most one option per kind that no other beats in both bytes and predicted KLD
    (changes taken as additive), by bytes."""
    by_kind: dict[str, list[dict]] = {}
    for o in options:
        by_kind.setdefault(o["kind"], []).append(o)
    points: list[tuple[int, float, tuple[dict, ...]]] = [(0, 0.0, ())]
    for kind in sorted(by_kind):
        grown = [(b + o["bytes"], k + o["kld"], (*c, o)) for b, k, c in points for o in by_kind[kind]]
        merged = sorted(points + grown, key=lambda p: (p[0], p[1]))
        points, best = [], float("inf")
        for p in merged:
            if p[1] < best - 1e-15:
                points.append(p)
                best = p[1]
    return points


def recipe_items(choice: tuple[dict, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((o["pattern"], o["type"]) for o in sorted(choice, key=lambda o: o["kind"]))


def recipe_text(items: tuple[tuple[str, str], ...]) -> str:
    """llama-quantize --tensor-type-file's format: PATTERN=TYPE, white-space separated (no comments: it reads every
    word as an item)."""
    return "".join(f"{p}={t.lower()}\n" for p, t in items)


def metadata_for(plan: QuantPlan, items: tuple[tuple[str, str], ...], how: str) -> dict:
    """komt_edge.plan.* keys: each value < 128 bytes (llama_model_kv_override's string)."""
    meta: dict = {"komt_edge.plan.name": plan.name, "komt_edge.plan.base": display_name(plan.base),
                  "komt_edge.plan.how": how[:127], "komt_edge.plan.tensor_type_count": len(items)}
    for i, (p, t) in enumerate(items):
        meta[f"komt_edge.plan.tensor_type.{i}"] = f"{p}={t.lower()}"
    return meta


def metadata_bytes(meta: dict) -> int:
    """What ``meta`` adds to a GGUF header (key, type and value of each pair) plus the padding it may shift."""
    return sum(8 + len(k.encode()) + 4 + (8 + len(str(v).encode()) if isinstance(v, str) else 8)
               for k, v in meta.items()) + 32


@plan_chooser(CHOOSER)
def choose_korean_mix(plan: QuantPlan, *, source: Path, imatrix: dict, provenance: dict, text: str, out: Path,
                      display: str, n_threads: int | None = None, progress: bool = True,
                      settings: Settings | None = None, log=None) -> Chosen:
    """The per-tensor types of ``plan`` (KO-TYPE) for the model whose float GGUF is ``source``: see the module
    docstring. ``text``: the Korean calibration text; ``out``: where the measurements are kept."""
    from .converters import quantize as q

    settings = settings or SETTINGS
    log = log or (lambda message: None)
    fingerprints = {"version": CACHE_VERSION, "base": plan.base, "model": sha256_file(source),
                    "imatrix": imatrix_fingerprint(imatrix),
                    "text": hashlib.sha256(text.encode()).hexdigest(), "n_ctx": settings.n_ctx,
                    "n_chunks": settings.n_chunks, "steps": list(STEPS)}
    cache = cache_path(out, display, plan.base)
    with tempfile.TemporaryDirectory(dir=out, prefix=".ko-measure-") as tmp:
        work = Path(tmp)
        text_file = work / "calibration.txt"
        text_file.write_text(text, encoding="utf-8", newline="")
        data = _read_cache(cache, fingerprints)
        if data is None:
            log(f"{plan.name}: measuring Korean sensitivity ({cache.name} missing or made for another model, "
                "imatrix or text)")
            data = {"fingerprints": fingerprints, **measure(Path(source), plan.base, imatrix, provenance, text_file,
                                                            work, settings=settings, n_threads=n_threads,
                                                            progress=progress), "checked": {}}
            _write_cache(cache, data)
        base = data["base"]
        budget = budget_of(plan, base["bytes"], base["params"])
        how = (f"ko-sensitivity: mean KLD vs float on {settings.n_chunks}x{settings.n_ctx} Korean calibration "
               f"tokens; budget {budget} bytes")
        reserve = metadata_bytes(metadata_for(plan, recipe_items(tuple(data["options"])), how))
        points = frontier(data["options"])
        smallest, largest = base["bytes"] + points[0][0] + reserve, base["params"] * 2
        if not smallest <= budget <= largest:
            raise KomtError(f"{plan.name}: a budget of {budget:,} bytes is out of range for this model: the reachable "
                            f"range is {smallest:,} to {largest:,} bytes (F16)")
        fits = [p for p in points if base["bytes"] + p[0] + reserve <= budget]
        candidates = sorted(fits, key=lambda p: p[1])[:settings.checks]
        checked = data.setdefault("checked", {})
        todo = [c for c in candidates if c[2] and recipe_text(recipe_items(c[2])) not in checked]
        files = []
        for i, (_, _, choice) in enumerate(todo):
            path = work / f"check-{i}.gguf"
            q.quantize_file(Path(source), path, QuantPlan(f"{display_name(plan.base)}_C{i}", plan.base,
                                                          recipe_items(choice)),
                            imatrix=imatrix, metadata=provenance, n_threads=n_threads)
            files.append(path)
        if files:
            for (_, _, choice), path, kld in zip(todo, files, _klds(files, Path(source), text_file, settings,
                                                                    n_threads)):
                checked[recipe_text(recipe_items(choice))] = {"kld": kld, "bytes": path.stat().st_size}
            _write_cache(cache, data)
    # the best measured combination within the budget; the mix's own types when none measured better
    best_items, best_kld = (), base["kld"]
    for _, _, choice in candidates:
        if not choice:
            continue
        result = checked[recipe_text(recipe_items(choice))]
        if result["kld"] < best_kld and result["bytes"] + reserve <= budget:
            best_items, best_kld = recipe_items(choice), result["kld"]
    if not best_items and budget < base["bytes"]:
        raise KomtError(f"{plan.name}: no measured combination fits {budget:,} bytes: give a larger budget")
    log(f"{plan.name}: mean KLD on calibration text {base['kld']:.4f} ({display_name(plan.base)}) → {best_kld:.4f}")
    if not best_items:  # llama.cpp's own file, without a key that would make it larger than itself
        return Chosen(QuantPlan(plan.name, plan.base, (), plan.imatrix, plan.made_by + ": no measured change "
                                f"beat {display_name(plan.base)}'s own types, which it keeps"), budget, {}, "")
    chosen = QuantPlan(plan.name, plan.base, best_items, plan.imatrix,
                       plan.made_by + f" (calibration mean KLD {best_kld:.4f}, {display_name(plan.base)}'s "
                       f"{base['kld']:.4f})")
    return Chosen(chosen, budget, metadata_for(chosen, best_items, how), recipe_text(best_items))
