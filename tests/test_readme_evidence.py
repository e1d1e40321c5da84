"""Every number the README states as a measured result comes from a recorded result (issue 27, item 2).

The README's results are held to the files under ``benchmarks/results/`` that recorded them (each JSON with the
command that produced it). ``CLAIMS`` names every result in the README — a table, by its header line, or a
stretch of prose, by its first and last words — with the files it comes from, and every number in it must be
found there:

- a number matches a recorded value when the value, in the same unit or scaled by a power of ten or of 1024
  (fraction → %, s → ms, bytes → MB/GiB, MiB → GiB), rounds to the printed digits; a number after ``≥`` must be a
  lower bound of a recorded value no further below it than the last printed digit, one after ``≤``, ``<``,
  ``within`` or ``under`` such an upper bound (so "cosine ≥ 0.99999999995" fails on a recorded 0.99999999994633);
- a number that is arithmetic on other numbers of the claim (a ratio, a reduction in %) is listed in the claim's
  ``derived`` with that arithmetic, which the test evaluates; the numbers in the arithmetic are checked as above;
- numbers that are the run's settings rather than its results (512-token chunks, 2 threads) are listed in the
  claim's ``settings``; integers below 10 are not checked (counts of things, not measurements).

What keeps it true: every table of the README is either a claim or in ``NOT_RESULT_TABLES`` (options, bounds,
targets: no measurement), so a new table of numbers fails until its source is named; and every number with a
unit of measure (s, ms, min, MiB, GiB, MB, GB, t/s, %, ×) outside the claims, tables and code blocks must be in
``NOT_RESULTS`` (settings, limits, sizes of other things), so a new measured number written in prose fails too.
Reads text files only: no model, no llama.cpp.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Claim:
    start: str  # a table's header line (its start), or the first words of a stretch of prose
    sources: tuple[str, ...]  # files under benchmarks/results/
    end: str | None = None  # the last words of the prose (inclusive); None for a table
    derived: dict[str, str] = field(default_factory=dict)  # printed number -> arithmetic on sourced numbers
    settings: tuple[str, ...] = ()  # numbers that are the run's settings, not its results
    loads: bool = False  # the claim quotes the machine's load average (else the files' load fields are left out)


CLAIMS = [
    # start-up
    Claim("| command | median | peak RSS |", ("cli-start.json",)),
    Claim("(`benchmarks/results/cli-start.{json,md}`; 2 CPUs, load average", ("cli-start.json",),
          end="before this change):", settings=("21",)),
    # imatrix: what Korean calibration buys, agreement with llama-imatrix, time and memory
    Claim("| type | Korean text: no imatrix | English imatrix |", ("imatrix_gain.json", "imatrix_gain.md")),
    Claim("- **Agreement with llama-imatrix** (same F16 file", ("imatrix_gain.json#agreement.weights,"
          "agreement.min_cosine,agreement.max_norm_deviation",), end="and equal counts.", settings=("512", "40")),
    Claim("- **Time and memory:** `komt-edge imatrix F16.gguf", ("imatrix_gain.json#speed",),
          end="runs the speed step alone).", settings=("37", "512", "1.2")),  # 1.2×: the bound
    Claim("- **Korean text:** the Korean imatrix beats", ("imatrix_gain.md",), end="dequantized.",
          derived={"6": "(1 - 0.941) * 100", "22": "(1 - 0.782) * 100", "11": "(1 - 0.890) * 100",
                   "40": "(1 - 0.116 / 0.193) * 100", "60": "(1 - 0.183 / 0.453) * 100"},
          settings=("4.5", "640")),
    # gguf-lora
    Claim("megabytes each (komt's r=8 recipe at 1B shape:", ("lora-1b.json",), end="MB in f16;"),
    Claim("| | size | conversion (process wall time) |", ("lora-mistral-7b.json",)),
    Claim("| q4_K_M, 2 threads | pp512 t/s | tg128 t/s |", ("lora-mistral-7b.json",), settings=("512", "128")),
    Claim("At the Mistral-7B shape (7.24 B parameters", ("lora-mistral-7b.json",), end="no other job running during"),
    Claim("With the adapter applied at run time, llama.cpp ran pp512", ("lora-mistral-7b.json", "lora-1b.json"),
          end="share of a small\nmodel's matrix work.",
          derived={"99": "15.81 / 15.94 * 100", "90": "5.59 / 6.24 * 100", "70": "26.60 / 38.17 * 100"}),
    Claim("On the tiny mistral adapter: max |Δlogit|", ("tiny-lora-runtime.json",), end="tiny-lora-runtime.json`)."),
    # verify's layer-streamed reference
    Claim("output matrix instead of the whole model: a 7B reference", ("verify-mistral-7b.json",),
          end="GiB,\nin the same time"),
    Claim("| shape | streamed: reference / wall |", ("verify-1b.json", "verify-mistral-7b.json",
                                                      "verify-llama-30b.json")),
    Claim("¹ komt-llama-30b's shape", ("verify-llama-30b.json", "verify-mistral-7b.json"), end="model within 2.5 GiB.",
          settings=("6656", "60", "52"), derived={"8": "8"}),
    # Qwen2.5 real weights
    Claim("all five types identical to llama.cpp, 291 tensors each", ("qwen2.5-coder-0.5b-parity.json",),
          end="the export took 245 s)", settings=("896",)),
    # Gemma 3 and agreement with llama.cpp's tools
    Claim("| file | PPL komt-edge | PPL llama-perplexity |", ("llama_cpp_agreement.json", "llama_cpp_agreement.md")),
    Claim("Wall time for the four files on 2 threads:", ("llama_cpp_agreement.json",), end="load average 0.79 → 3.76.", loads=True),
    Claim("Perplexity is the same to every printed digit.", ("llama_cpp_agreement.json", "llama_cpp_agreement.md"),
          end="komt-edge uses the exact reference.", settings=("16",), derived={"0.5%": "0.5"}),
    Claim("| CRLF text | PPL komt-edge | PPL llama-perplexity |", ("llama_cpp_agreement.json#quality_crlf",
                                                                 "llama_cpp_agreement.md")),
    Claim("llama-perplexity needs a 2.5 GiB base file", ("llama_cpp_agreement.json",), end="the 20 chunks below."),
    Claim("| type | test | komt-edge t/s | llama-bench (static) |", ("llama_cpp_agreement.json",
                                                                   "llama_cpp_agreement.md"), settings=("512", "128")),
    Claim("Against llama-bench running the same llama.cpp libraries, all 8", ("llama_cpp_agreement.json",
          "llama_cpp_agreement.md", "llama_cpp_agreement_15rounds_53d5ac8.md"),
          end="so only 1-thread agreement is reported;", settings=("15", "128", "512")),
    Claim("This machine is a 2-core VM shared with other jobs", ("llama_cpp_agreement.json",),
          end="load average ≈ 1.0):"),
    Claim("| file | type | size (MiB) | bpw | PPL |", ("gemma3-270m-korean-quality.json",
                                                    "gemma3-270m-korean-quality.md")),
    Claim("Q4_0 costs Gemma 3 270M dearly in Korean", ("gemma3-270m-korean-quality.json",
                                                         "gemma3-270m-korean-speed.json"),
          end="average 0.5–0.9 during the run", derived={"87": "241.4 / 278.0 * 100"}, loads=True),
    Claim("Measured memory read bandwidth: 1 thread:", ("gemma3-270m-korean-speed.json",
                                                        "gemma3-270m-korean-speed.md"), end="(75385 characters)."),
    Claim("| file | type | size (MiB) | bpw | threads |", ("gemma3-270m-korean-speed.json",
                                                         "gemma3-270m-korean-speed.md"), settings=("512", "128")),
    Claim("| engine | model | pp t/s | tg t/s |", ("gemma3-270m-korean-speed.json",)),
    # the stage outputs: train, GPTQ
    Claim("On CPU, the tests' tiny Mistral-shaped model (17.6 M parameters", ("tiny-train-cpu.json",),
          end="`benchmarks/results/tiny-train-cpu.json`.",
          settings=("17.6", "65536", "96", "0.25", "3e-3"), loads=True),  # the model's and LoRA's sizes, the run's options
    Claim("machine shared with other jobs (load average 5.3)", ("train-bench-tiny-cpu.json",),
          end="or komt-edge is not measured.", derived={"20": "(1 - 159.2 / 198.2) * 100"}, loads=True),
    Claim("| shape | bits | implementation | tokens/s |", ("train-bench-tiny-cpu.json",)),
    Claim("The default 1.5: the one real-weights measurement below", ("gptq-cpu.json",), end="inside the bound with room,",
          settings=("1.5", "135", "64"), derived={"1.119": "7.763699505300026 / 6.937167052789986"}),
    Claim("**Measured** (this repository's 2-core CPU machine, shared: load average", ("gptq-cpu.json",),
          end="excluded):", loads=True),
    Claim("| target | params | device | GPTQ time |", ("gptq-cpu.json",),
          derived={"11.9": "(7.763699505300026 / 6.937167052789986 - 1) * 100"}),
    # Korean mixes
    Claim("| type | file | bytes | mean KLD (held-out Korean) |", ("ko-mix-gemma3-270m.json", "ko-mix-gemma3-270m.md")),
    Claim("`ko-q3_K_M` has 79.3% lower mean KLD", ("ko-mix-gemma3-270m.json",), end="not measured yet.",
          settings=("640",)),
    # streaming and serve
    Claim("| model | unstreamed | komt-edge streamed |", ("stream.json", "stream.md")),
    Claim("(`benchmarks/results/stream.{md,json}`, load average", ("stream.json",), end="on 2 CPUs):", loads=True),
    Claim("The stream costs no more than the unstreamed call", ("stream.json", "stream.md"),
          end="evaluated again).", settings=("32000", "262144"),
          derived={"1.003": "25.984528687997226 * 38.608199 / 1000", "1.125": "28.346444900998904 * 39.672717 / 1000"}),
    Claim("| clients | reply | TTFT direct | TTFT serve |", ("serve-gemma3-270m.json", "serve-gemma3-270m.md")),
    Claim("recorded with no other job on the\nmachine (load average", ("serve-gemma3-270m.json",),
          end="on 2 CPUs):", loads=True),
    Claim("Every reply streamed by serve is the direct call's text.", ("serve-gemma3-270m.json",
          "serve-gemma3-270m.md"), end="sharing the two cores.", settings=("128",)),
    # conversion, merge, verify at 7B
    Claim("| shape | komt-edge → q4_0 + q8_0 |", ("convert-1b.json", "convert-mistral-7b.json")),
    Claim("It is 4× faster than", ("convert-mistral-7b.json",), end="intermediate.",
          derived={"4": "138.5 / 36.0"}),
    Claim("| shape | round | komt-edge + sync | dd |", ("convert-1b.json", "convert-mistral-7b.json")),
    Claim("Against the disk: komt-edge followed by", ("convert-mistral-7b.json",), end="minute to minute:"),
    Claim("Median 2.73× at 7B:", ("convert-mistral-7b.json", "merge-mistral-7b.json", "convert-1b.json"),
          end="are a large share.", settings=("1.5",)),
    Claim("| round | komt-edge merge + sync | cp + sync | merge / cp |", ("merge-mistral-7b.json",)),
    Claim("Median 1.38× (best against best", ("merge-mistral-7b.json",), end="merge arithmetic runs on all cores but\none.",
          settings=("88",)),  # the share of the 7B's bytes the adapter's modules hold: the shape, not a measurement
]

NOT_RESULT_TABLES = {
    "| target | what it does |": "make targets; the test suite's size and time are in NOT_RESULTS",
    "| file type | max \\|Δlogit\\| | mean KL | top-1 |": "verify's default bounds (settings)",
    "| architecture | tokenizer (GGUF `tokenizer.ggml.pre`) |": "the support matrix: names of tests",
    "| command | bad input | komt-edge says (one line) | exit |": "the refusals: exit codes, printed by a test",
    "| option | default | |": "options and their defaults",
    "| path | what |": "files and folders",
    "| stage | what | skipped when |": "release stages",
    "| `--source` | text | licence | held-out |": "the corpora's definitions",
}

# Numbers with a unit outside the claims that are not measurements: each is a phrase of the README.
NOT_RESULTS = [
    "a 1 MiB block of rows",  # settings
    "(float32, a 1 MiB block of rows",
    "cosine ≥ 0.999 and norms within 1%",  # bounds a test asserts
    "a 24 GB GPU\nis enough",
    "on a 24 GB GPU;",
    "96 × 256 Korean calibration tokens",
    "perplexity over ×1.5 the original's",
    "an output layer scaled ×40 a finite one, asserted over ×3 the",  # a test's damage and bounds
    "asserted within ×0.8–×1.25",
    "(50 GB: \"Per file: 50GB max, 20GB recommended\"",
    "~2 min on 2 busy cores",  # the time of a test module: the suite's size, not a result
    "(21 tests, ~2 min on 2 busy cores",
    "within 0.1%); files too large",
    "a 256 MiB buffer",
    "(all of them within ~7 min on",  # gpu-check's budget
    "~9 min) runs both sides",  # a build's time
    "~25 min; Q4_0 ran as",
    "sampled every 20 ms",
    "24 GiB build machine",
]

# --- reading the README ----------------------------------------------------------------------------------------

NUMBER = re.compile(r"(?<![\w.\-/^])([-+−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?:e([-+−]?\d+))?(?![\w])(?!\.\d)")
LOOSE = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
UNIT = re.compile(r"(?<![\w.\-/^])[-+−]?\d[\d,]*(?:\.\d+)?(?:e[-+−]?\d+)?(?:\s?(?:%|×|ms\b|s\b|min\b|GiB\b|MiB\b|"
                  r"GB\b|MB\b|t/s|tokens/s|steps/s))|×\s?\d[\d,]*(?:\.\d+)?")
SCALES = (1, 100, 1e3, 1e-3, 1e-6, 1e-9, 2**10, 2**-10, 2**-20, 2**-30)


def readme() -> str:
    return README.read_text(encoding="utf-8")


def blank_code(text: str) -> str:
    """The text with fenced code blocks, inline code, HTML comments and link targets blanked (same offsets)."""
    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    text = re.sub(r"```.*?```", blank, text, flags=re.S)
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", blank, text)
    return re.sub(r"\]\([^)\n]*\)", blank, text)


def tables(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of every Markdown table outside code blocks."""
    spans, pos, start = [], 0, None
    code = False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            code = not code
        is_row = not code and line.startswith("|")
        if is_row and start is None:
            start = pos
        if not is_row and start is not None:
            spans.append((start, pos))
            start = None
        pos += len(line)
    if start is not None:
        spans.append((start, pos))
    return spans


def claim_span(text: str, claim: Claim) -> tuple[int, int]:
    i = text.find(claim.start)
    assert i >= 0, f"README no longer holds the claim starting {claim.start!r}: update CLAIMS"
    assert text.find(claim.start, i + 1) < 0, f"{claim.start!r} occurs twice in the README: make it unique"
    if claim.end is None:
        for a, b in tables(text):
            if a == i:
                return a, b
        raise AssertionError(f"{claim.start!r} is not a table's header line")
    j = text.find(claim.end, i)
    assert j >= 0, f"the claim starting {claim.start!r} no longer ends with {claim.end!r}"
    return i, j + len(claim.end)


def numbers(text: str) -> list[tuple[str, str]]:
    """(number as printed, relation to the recorded value: '=', '>=' or '<=')."""
    out = []
    for m in NUMBER.finditer(text):
        token = m.group(0).replace("−", "-").replace(",", "")
        before = text[max(0, m.start() - 8):m.start()].rstrip()
        relation = ">=" if before.endswith("≥") else "<=" if re.search(r"(≤|<|within|under)$", before) else "="
        out.append((token, relation))
    return out


# --- reading the results ---------------------------------------------------------------------------------------

def recorded(names: tuple[str, ...], loads: bool = False) -> list[float]:
    """Every number in the files (or the named parts of a JSON file). The load averages recorded beside each run
    are left out unless asked for: they are context, and so many small numbers would match anything."""
    values: list[float] = []

    def walk(o):
        if isinstance(o, bool) or o is None:
            return
        if isinstance(o, (int, float)):
            values.append(float(o))
        elif isinstance(o, str):
            values.extend(float(x) for x in LOOSE.findall(o.replace(",", "")))
        elif isinstance(o, dict):
            for k, v in o.items():
                if loads or not str(k).startswith("load"):
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for name in names:
        name, _, keys = name.partition("#")  # FILE.json#a.b,c: only those parts of the file
        path = RESULTS / name
        assert path.is_file(), f"{path} is named as a source but does not exist"
        if path.suffix != ".json":
            walk(path.read_text(encoding="utf-8"))
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in keys.split(",") if keys else [""]:
            part = data
            for k in filter(None, key.split(".")):
                assert isinstance(part, dict) and k in part, f"{name} has no {key!r}"
                part = part[k]
            walk(part)
    return values


def step(token: str) -> float:
    """The value of the last printed digit."""
    mantissa, _, exponent = token.lower().lstrip("+-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def sourced(token: str, relation: str, values: list[float]) -> bool:
    x, unit = abs(float(token)), step(token)
    for v in values:
        for s in SCALES:
            y = abs(v) * s
            if relation == "=" and abs(y - x) <= unit / 2 * (1 + 1e-9) + 1e-15:
                return True
            if relation == ">=" and x <= y < x + unit:
                return True
            if relation == "<=" and x - unit < y <= x:
                return True
    return False


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str) -> float:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("min", "max"):
            return {"min": min, "max": max}[node.func.id](ev(a) for a in node.args)
        raise ValueError(f"not plain arithmetic: {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def unsourced(text: str, claim: Claim) -> list[str]:
    a, b = claim_span(text, claim)
    body = blank_code(text)[a:b]
    if claim.end is None:  # a table: its header names things, its rows hold the numbers
        body = body.split("\n", 2)[2] if body.count("\n") >= 2 else ""
    values = recorded(claim.sources, claim.loads)
    bad = []
    for token, relation in numbers(body):
        bare = token.lstrip("+-")
        if bare in claim.settings or ("." not in bare and "e" not in bare.lower() and float(bare) < 10):
            continue
        if bare in claim.derived or token in claim.derived:
            expr = claim.derived.get(bare, claim.derived.get(token))
            got = abs(evaluate(expr))
            if abs(got - abs(float(token))) > step(token) / 2 * (1 + 1e-9):
                bad.append(f"{token} (derived as {expr} = {got:.6g})")
            for lit, _ in numbers(expr):  # its measured operands; integers are counts and constants (1, 100)
                if "." in lit and not sourced(lit, "=", values):
                    bad.append(f"{lit} (in the arithmetic of {token})")
            continue
        if not sourced(token, relation, values):
            bad.append(token if relation == "=" else f"{relation} {token}")
    return bad


# --- the tests -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.start[:60])
def test_every_number_of_a_claim_is_in_its_recorded_result(claim):
    bad = unsourced(readme(), claim)
    assert not bad, (f"README numbers with no recorded source in {', '.join(claim.sources)} "
                     f"(claim starting {claim.start!r}): {bad}")


def test_every_table_is_a_sourced_claim_or_holds_no_result():
    text = readme()
    claimed = {claim_span(text, c)[0] for c in CLAIMS if c.end is None}
    loose = []
    for a, _ in tables(text):
        header = text[a:text.index("\n", a)]
        if a not in claimed and not any(header.startswith(h) for h in NOT_RESULT_TABLES):
            loose.append(header)
    assert not loose, f"tables with no recorded source: name it in CLAIMS (or, if no result, NOT_RESULT_TABLES): {loose}"


def test_every_measured_number_in_prose_is_inside_a_sourced_claim():
    text = readme()
    blanked = blank_code(text)
    covered = [claim_span(text, c) for c in CLAIMS] + tables(text)
    allowed = []
    for phrase in NOT_RESULTS:
        i = text.find(phrase)
        assert i >= 0, f"NOT_RESULTS phrase no longer in the README: {phrase!r}"
        allowed.append((i, i + len(phrase)))
    loose = []
    for m in UNIT.finditer(blanked):
        if not any(a <= m.start() and m.end() <= b for a, b in covered + allowed):
            line_start = text.rfind("\n", 0, m.start()) + 1
            line_no = text.count("\n", 0, m.start()) + 1
            loose.append(f"line {line_no}: {m.group(0)!r} in {text[line_start:line_start + 80]!r}")
    assert not loose, ("measured numbers outside every sourced claim (name their result file in CLAIMS, or, if they "
                       "are not results, add the phrase to NOT_RESULTS):\n" + "\n".join(loose))


def test_the_checker_rejects_what_it_must():
    """The matching rules themselves: rounding to the printed digits, bounds, and a number that is not there."""
    values = [0.9999999999463292, 1.1408683009195286e-05, 1956704256.0, 7.764, 0.5]
    assert sourced("0.9999999999463", "=", values)
    assert not sourced("0.99999999995", ">=", values)  # rounds to it, but is no lower bound of it
    assert sourced("0.99999999994", ">=", values)
    assert not sourced("0.0011", "<=", values)  # "within 0.0011%" of 0.00114%
    assert sourced("0.00114", "=", values)
    assert sourced("1.82", "=", values) and not sourced("1.9", "=", values)  # GiB of 1956704256 bytes
    assert sourced("7.764", "=", values) and not sourced("7.765", "=", values)
    assert sourced("50", "=", values)  # 0.5 as a percentage
    assert [t for t, _ in numbers("7B q4_0 pp512 0.3.36 llama-30b 11.31 → 8.39, −5% 1,800-token 6.5e-7")] == \
        ["11.31", "8.39", "-5", "1800", "6.5e-7"]
