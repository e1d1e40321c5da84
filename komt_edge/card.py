"""Model cards for the GGUF and GPTQ repos of a komt release.

A card is the repo's README.md: YAML metadata the Hub understands (``base_model`` + ``base_model_relation:
quantized`` put the repo in the base model's tree, ``language: ko``, licence, library, task, tags), then a
description, a table of the files with their measured quality and speed, the komt prompt template, usage
snippets (llama.cpp, llama-cpp-python, Ollama; transformers for GPTQ) and provenance: tool versions, source repo
revisions and the sha256 of every file.

``hub_metadata_errors`` checks metadata against the Hub's rules for the fields cards use (the Hub runs the same
checks in ``POST /api/validate-yaml`` and on every commit of a README.md); ``render_card`` refuses to produce a
card that fails them. ``release_cards`` turns what a release's stages recorded into the :class:`CardSpec` of each
repo.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KomtError
from .templates import PromptTemplate, template_for
from .util import fmt_size

if TYPE_CHECKING:
    from .zoo import ZooModel

KOMT_URL = "https://github.com/davidkim205/komt"
HUB_URL = "https://huggingface.co"

# The Hub's licence identifiers (huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl
gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr
mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split())
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_LANG = re.compile(r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")
_LICENSE_NAME = re.compile(r"^[a-z0-9.-]+$")

EXAMPLE_PROMPT = "한국의 수도는 어디인가요?"


@dataclass
class CardRow:
    """One quantization: a file, or the gguf-split shards of one."""

    quant: str  # Q4_0, Q4_K_M, GPTQ-4bit-g128 ...
    files: list[str]
    size: int
    bits_per_weight: float | None = None
    ppl: float | None = None  # Korean perplexity (benchmark stage; the GPTQ check for GPTQ)
    ppl_reference: float | None = None  # the original model's, on the same text (GPTQ check)
    kld_f16: float | None = None  # mean KL divergence vs the f16 file (benchmark stage)
    tokens_per_s: float | None = None  # generation speed on the benchmark machine
    kl_ref: float | None = None  # mean KL vs the HF original (verify stage)
    top1: float | None = None  # top-1 agreement with the HF original (verify stage)
    verified: bool | None = None
    plan: dict | None = None  # a GGUF file's QuantPlan (converters.plan) when it is not llama.cpp's own mix


@dataclass
class Source:
    role: str  # "base", "adapter", "model"
    repo: str  # Hub id, or a local folder name
    revision: str | None = None
    on_hub: bool = True


@dataclass
class CardSpec:
    kind: str  # "gguf" or "gptq"
    repo_id: str
    model_name: str
    family: str  # template family: "llama" or "mistral"
    rows: list[CardRow]
    files: dict[str, tuple[int, str]]  # every file of the repo except README.md → (size, sha256)
    base_model: str | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    sources: list[Source] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=dict)  # tool → version
    bench_machine: str | None = None
    verify_tokens: int | None = None
    gptq: dict | None = None  # bits, group_size, desc_act, ... from the GPTQ stage
    architecture: str | None = None
    size_label: str | None = None
    imatrix: dict | None = None  # file, dataset, chunks, chunk_size, types: the importance matrix used
    lora: dict | None = None  # the adapter as llama.cpp's LoRA GGUF: file, size, base, alpha, ranks

    @property
    def template(self) -> PromptTemplate:
        return template_for(self.family)


# --- metadata ----------------------------------------------------------------------------------------------

def card_metadata(spec: CardSpec) -> dict:
    """The YAML block: what the Hub indexes (model tree, filters, licence)."""
    if spec.kind == "gguf":
        tags = ["gguf", "llama-cpp", "llama.cpp"]
    else:
        tags = ["gptq"] + ([f"{(spec.gptq or {}).get('bits')}-bit"] if (spec.gptq or {}).get("bits") else [])
    tags += ["komt", "korean", "komt-edge", "quantized", spec.family, "text-generation-inference"]
    meta: dict = {}
    if spec.base_model:
        meta["base_model"] = spec.base_model
        meta["base_model_relation"] = "quantized"
    meta["language"] = ["ko"]
    license_id = spec.license or "unknown"
    meta["license"] = license_id
    if license_id == "other":
        meta["license_name"] = spec.license_name or "other"
        if spec.license_link:
            meta["license_link"] = spec.license_link
    meta["library_name"] = "gguf" if spec.kind == "gguf" else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(tags))
    meta["quantized_by"] = "komt-edge"
    return meta


def hub_metadata_errors(meta: dict) -> list[str]:
    """Violations of the Hub's metadata rules for the fields model cards use; empty when valid."""
    errors: list[str] = []

    def strings(key: str, pattern: re.Pattern) -> None:
        value = meta[key]
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            errors.append(f"{key} must be a string or a list of strings")
            return
        errors.extend(f"{key}: {v!r} is not valid" for v in values if not pattern.match(v))

    if "license" in meta:
        if meta["license"] not in HUB_LICENSES:
            errors.append(f"license {meta['license']!r} is not a Hub licence identifier")
        elif meta["license"] == "other" and not meta.get("license_name"):
            errors.append("license: other needs license_name (and license_link)")
    if "license_name" in meta and not (isinstance(meta["license_name"], str)
                                       and _LICENSE_NAME.match(meta["license_name"])):
        errors.append("license_name must use lowercase letters, digits, '.' and '-'")
    if "language" in meta:
        strings("language", _LANG)
    if "base_model" in meta:
        strings("base_model", _REPO_ID)
    if "base_model_relation" in meta:
        if meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
            errors.append(f"base_model_relation must be one of {', '.join(BASE_MODEL_RELATIONS)}")
        if "base_model" not in meta:
            errors.append("base_model_relation needs base_model")
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) and t for t in meta["tags"])):
        errors.append("tags must be a list of strings")
    if "pipeline_tag" in meta and meta["pipeline_tag"] != "text-generation":
        errors.append(f"pipeline_tag {meta['pipeline_tag']!r} is not the text-generation task")
    if "library_name" in meta and not re.match(r"^[\w.-]+$", str(meta["library_name"])):
        errors.append("library_name must be a library identifier")
    return errors


def check_card(content: str) -> dict:
    """Parse a card's metadata with huggingface_hub and check it; returns the metadata, raises KomtError."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(content)
    except ValueError as err:
        raise KomtError(f"the model card's metadata does not parse: {err}") from None
    meta = card.data.to_dict()
    errors = hub_metadata_errors(meta)
    if errors:
        raise KomtError(f"the model card breaks the Hub's metadata rules: {'; '.join(errors)}")
    return meta


# --- body --------------------------------------------------------------------------------------------------

def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _hub_link(repo: str) -> str:
    return f"[{repo}]({HUB_URL}/{repo})"


def _file_link(spec: CardSpec, name: str) -> str:
    return f"[{name}]({HUB_URL}/{spec.repo_id}/blob/main/{name})"


def _ollama_template(t: PromptTemplate) -> str:
    return "{{ if .System }}{{ .System }}\n\n{{ end }}" + t.prefix + "{{ .Prompt }}" + t.suffix


def _files_table(spec: CardSpec) -> list[str]:
    if spec.kind == "gguf":
        lines = ["| File | Quant | Size | Bits/weight | Korean PPL | KLD vs f16 | KL vs original | Top-1 | tokens/s |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    else:
        lines = ["| Files | Quant | Size | Bits/weight | Korean PPL | KL vs original | Top-1 | tokens/s |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in spec.rows:
        if spec.kind == "gguf":
            first = _file_link(spec, row.files[0])
            name = first if len(row.files) == 1 else f"{first} + {len(row.files) - 1} more shard(s)"
        else:
            name = f"{len(row.files)} files"
        ppl = _num(row.ppl, ".3f") + (f" ({row.ppl_reference:.3f})" if row.ppl is not None and row.ppl_reference
                                        else "")
        cells = [name, row.quant, fmt_size(row.size), _num(row.bits_per_weight, ".2f"), ppl]
        if spec.kind == "gguf":
            cells.append(_num(row.kld_f16, ".4f"))
        cells += [_num(row.kl_ref, ".2e"), "–" if row.top1 is None else f"{row.top1:.1%}",
                  _num(row.tokens_per_s, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "- **KL vs original**, **Top-1**: `komt-edge verify`, llama.cpp's logits against the Hugging Face "
             "original in float32 on Korean prompts in the komt template"
             + (f" ({spec.verify_tokens} tokens per file)" if spec.verify_tokens else "")
             + ": mean KL(original ‖ file) and how often the file's top token is the original's."]
    if spec.kind == "gptq":
        notes = ["", "- **Korean PPL**: komt-edge's GPTQ check, the reloaded checkpoint on held-out Korean text "
                 "(the original model's in parentheses)" + (f", on {spec.bench_machine}" if spec.bench_machine
                                                            else "") + "."]
    elif spec.bench_machine:
        notes.append(f"- **Korean PPL**, **KLD vs f16**, **tokens/s**: the komt-edge benchmark stage on "
                     f"{spec.bench_machine}.")
    else:
        notes.append("- **Korean PPL**, **KLD vs f16**, **tokens/s**: – (the benchmark stage did not run for "
                     "this release).")
    return lines + notes


def _usage_gguf(spec: CardSpec) -> list[str]:
    t = spec.template
    row = next((r for r in spec.rows if r.quant.upper().startswith("Q4")), spec.rows[0])
    file = row.files[0]
    prompt = t.format(EXAMPLE_PROMPT)
    stops = "\n".join(f'PARAMETER stop "{s}"' for s in template_for(spec.family).stop)
    short = re.sub(r"[^a-z0-9-]+", "-", spec.model_name.lower()).strip("-") or "komt"
    return [
        "## Usage", "",
        "### llama.cpp", "",
        "```bash",
        f"llama-cli -hf {spec.repo_id}:{row.quant} -cnv        # conversation mode uses the template in the file",
        f"llama-cli -m {file} -no-cnv -n 256 -p {_shell_quote(prompt)}",
        "```", "",
        "### llama-cpp-python", "",
        "```python",
        "from llama_cpp import Llama",
        "",
        f'llm = Llama.from_pretrained(repo_id="{spec.repo_id}", filename="{file}", n_ctx=2048)',
        f'out = llm.create_chat_completion(messages=[{{"role": "user", "content": "{EXAMPLE_PROMPT}"}}])',
        'print(out["choices"][0]["message"]["content"])',
        "```", "",
        "### Ollama", "",
        f"`ollama run hf.co/{spec.repo_id}:{row.quant}`, or with a Modelfile next to the downloaded file:", "",
        "```",
        f"FROM ./{file}",
        f'TEMPLATE """{_ollama_template(t)}"""',
        stops,
        "```", "",
        "```bash",
        f"ollama create {short} -f Modelfile && ollama run {short}",
        "```",
    ] + (_usage_lora(spec, stops, short) if spec.lora else [])


def _lora_verified(lora: dict) -> str:
    v = lora.get("verify") or {}
    if not v.get("passed"):
        return ""
    return (f" komt-edge verified it as published: llama.cpp applying it to an F16 GGUF of the base against the "
            f"Hugging Face base + peft adapter on Korean prompts, mean KL {v['mean_kl']:.2e}, top-1 {v['top1']:.1%} "
            f"over {v['tokens']} tokens.")


def _usage_lora(spec: CardSpec, stops: str, short: str) -> list[str]:
    """The adapter alone, applied by llama.cpp at run time on a GGUF of the base (not on this repo's merged files,
    which hold it already)."""
    lora, t = spec.lora, spec.template
    file, base = lora["file"], lora.get("base") or "the base model"
    model = "BASE-Q4_K_M.gguf"
    return [
        "", "### The komt adapter on its own (run-time LoRA)", "",
        f"{_file_link(spec, file)} ({fmt_size(lora['size'])}) is the komt LoRA adapter as llama.cpp's adapter GGUF. "
        f"llama.cpp applies it at run time to any GGUF of **{base}** (below `{model}`, a file you convert or "
        "download), so one base file serves several adapters. Do not apply it to this repo's files: they have the "
        "adapter merged in already." + _lora_verified(lora) + " Check your own pair with `komt-edge verify BASE.gguf "
        f"--lora {file} --hf {base} --adapter ADAPTER`.", "",
        "```bash",
        f"llama-cli -m {model} --lora {file} -cnv",
        f"llama-server -m {model} --lora {file}        # adapters can be rescaled per request: /lora-adapters",
        "```", "",
        "```python",
        "from llama_cpp import Llama",
        "",
        f'llm = Llama(model_path="{model}", lora_path="{file}", n_ctx=2048)',
        "```", "",
        "Ollama Modelfile:", "",
        "```",
        f"FROM ./{model}",
        f"ADAPTER ./{file}",
        f'TEMPLATE """{_ollama_template(t)}"""',
        stops,
        "```", "",
        "```bash",
        f"ollama create {short}-lora -f Modelfile && ollama run {short}-lora",
        "```",
    ]


def _usage_gptq(spec: CardSpec) -> list[str]:
    prompt = spec.template.format(EXAMPLE_PROMPT)
    return [
        "## Usage", "",
        "### transformers", "",
        "Needs `optimum` and `gptqmodel` (GPU, or CPU with gptqmodel's CPU kernels).", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{spec.repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{spec.repo_id}", device_map="auto")',
        f"inputs = tokenizer({prompt!r}, return_tensors=\"pt\").to(model.device)",
        "output = model.generate(**inputs, max_new_tokens=256)",
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
    ]


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'" if "\n" not in text else "$'" + text.replace(
        "\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def render_card(spec: CardSpec) -> str:
    """README.md for the repo: metadata, description, files, template, usage, provenance."""
    if not spec.rows:
        raise KomtError(f"no files for the {spec.kind.upper()} card of {spec.repo_id}")
    from huggingface_hub import ModelCardData

    meta = card_metadata(spec)
    errors = hub_metadata_errors(meta)
    if errors:
        raise KomtError(f"the card for {spec.repo_id} would break the Hub's metadata rules: {'; '.join(errors)}")
    yaml_block = ModelCardData(**meta).to_yaml()
    t = spec.template
    kind = "GGUF" if spec.kind == "gguf" else "GPTQ"
    origin = _hub_link(spec.base_model) if spec.base_model else f"`{spec.model_name}`"
    what = (f"{kind} files of {origin}, a Korean instruction-tuned "
            f"{spec.architecture or 'Llama-family'} model of the [komt]({KOMT_URL}) project"
            + (f" ({spec.size_label} parameters)" if spec.size_label else "") + ".")
    if spec.kind == "gguf":
        what += (" For llama.cpp and what builds on it (llama-cpp-python, Ollama, LM Studio), on a laptop CPU. "
                 "Each file carries the komt prompt template (`tokenizer.chat_template`).")
    else:
        gptq = spec.gptq or {}
        detail = ", ".join(f"{k} {v}" for k, v in gptq.items() if k in ("bits", "group_size", "desc_act", "sym",
                                                                          "format"))
        what += f" For GPU inference with transformers{(' (' + detail + ')') if detail else ''}."
    tool = spec.tools.get("komt-edge")
    lines = [
        "---", yaml_block, "---", "",
        f"# {spec.model_name} {kind}", "",
        what, "",
        f"Made with komt-edge{(' ' + tool) if tool else ''}: converted, verified against the original model in "
        "Korean (tokenizer and logits), measured, and published in one `komt-edge release` run. Every file below "
        "passed verification; the release stops before publishing anything when one does not.", "",
        "## Files", "",
        *_files_table(spec), "",
        *_imatrix_note(spec),
        *_plan_notes(spec),
        "## Prompt template", "",
        f"komt's {t.name} format, the one the model was trained with:", "",
        "```text", t.format("{prompt}"), "```", "",
        f"Stop strings: {', '.join('`' + s + '`' for s in template_for(spec.family).stop)}.", "",
        *(_usage_gguf(spec) if spec.kind == "gguf" else _usage_gptq(spec)), "",
        "## Provenance", "",
        "| | |", "| --- | --- |",
    ]
    for s in spec.sources:
        where = _hub_link(s.repo) if s.on_hub else f"`{s.repo}` (local)"
        lines.append(f"| {s.role} | {where}" + (f" @ `{s.revision}`" if s.revision else "") + " |")
    for name, version in spec.tools.items():
        lines.append(f"| {name} | {version} |")
    lines += ["", "sha256 of every file:", "", "| File | Size | sha256 |", "| --- | ---: | --- |"]
    for name, (size, sha) in sorted(spec.files.items()):
        lines.append(f"| {name} | {fmt_size(size)} | `{sha}` |")
    lines += ["", f"Licence: {meta['license']}"
              + (f" ({meta.get('license_name')}{', ' + spec.license_link if spec.license_link else ''})"
                 if meta["license"] == "other" else "")
              + ", that of the original model; use follows its terms.", ""]
    content = "\n".join(lines)
    check_card(content)
    return content


def _imatrix_note(spec: CardSpec) -> list[str]:
    m = spec.imatrix
    if not m:
        return []
    return [f"{', '.join(m['types'])} were quantized with a Korean importance matrix, `{m['file']}` (in this repo, "
            f"llama.cpp's imatrix format; `llama-quantize --imatrix` reads it): {m['chunks']} chunks of "
            f"{m['chunk_size']} tokens of {m['dataset']}. The other files were quantized without one.", ""]


def _plan_notes(spec: CardSpec) -> list[str]:
    """How each file whose plan is not llama.cpp's own mix was made, and the llama-quantize command that makes it."""
    from .converters.plan import QuantPlan

    notes = []
    for row in spec.rows:
        if not row.plan:
            continue
        plan = QuantPlan.from_dict(row.plan)
        matrix = (spec.imatrix or {}).get("file") if plan.imatrix else None
        command = " ".join(plan.llama_quantize_args("MODEL-F16.gguf", row.files[0], matrix))
        notes += [f"{plan.name}: {plan.made_by or 'komt-edge plan'}; llama.cpp's {plan.base} mix with "
                  f"{len(plan.tensor_types)} per-tensor type(s) set. llama-quantize makes the same file from an "
                  f"f16 GGUF of the model: `{command}`.", ""]
    return notes


# --- a release's cards -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelOrigin:
    """Where a released model comes from, as its cards credit it."""

    model: str  # MODEL as given: zoo name, Hub id or local folder
    path: Path  # its local folder: a Hub snapshot, or the folder itself
    source: str  # the Hub id or folder it resolved to
    revision: str | None = None  # the commit of the Hub snapshot; None for a local folder
    zoo: ZooModel | None = None
    adapter: str | None = None  # the LoRA adapter as given (a zoo model's own by default)
    adapter_path: Path | None = None
    adapter_revision: str | None = None
    base_model: str | None = None  # what the cards name as base_model (--base-model), else derived
    license: str | None = None  # the licence id (--license), else derived


@dataclass
class ReleaseData:
    """What a release's stages recorded, as its cards use it."""

    name: str
    family: str  # template family: "llama" or "mistral"
    gguf_repo: str
    gguf_models: list[dict]  # the gguf stage's models: quant, files, size, bits_per_weight, size_label
    gguf_files: dict[str, tuple[int, str]]  # GGUF file → (size, sha256)
    verify: dict[str, dict] = field(default_factory=dict)  # first file of a model → mean_kl, top1, passed, tokens
    bench: dict = field(default_factory=dict)  # machine, files → ppl, kld_f16, tokens_per_s
    tools: dict[str, str | None] = field(default_factory=dict)  # tool → version (None: not installed)
    gptq_repo: str | None = None
    gptq: dict | None = None  # the gptq stage's data, when it ran
    gptq_files: dict[str, tuple[int, str]] = field(default_factory=dict)  # path in the repo → (size, sha256)
    gptq_tools: dict[str, str] = field(default_factory=dict)  # versions the gptq stage recorded
    imatrix: dict | None = None  # the gguf stage's importance matrix: file, dataset, chunks, chunk_size, types
    lora: dict | None = None  # the lora stage's adapter GGUF: file, size, base, alpha, ranks


def _sources(origin: ModelOrigin) -> list[Source]:
    """The provenance rows: the model (the base, when an adapter is merged into it) and the adapter."""
    model_on_hub = origin.revision is not None
    sources = [Source("base" if origin.adapter_path is not None else "model",
                      origin.source if model_on_hub else Path(origin.path).name, origin.revision, model_on_hub)]
    if origin.adapter_path is not None:
        on_hub = origin.adapter_revision is not None
        sources.append(Source("adapter", origin.adapter if on_hub else Path(origin.adapter_path).name,
                              origin.adapter_revision, on_hub))
    return sources


def _license(origin: ModelOrigin) -> tuple[str, str | None, str | None]:
    """(licence id, license_name, license_link): the one given, the zoo's, the model's own card's, or unknown."""
    if origin.license:
        return origin.license, None, None
    zoo = origin.zoo
    if zoo is not None:
        if zoo.license == "other":
            slug = re.sub(r"[^a-z0-9.-]+", "-", zoo.base.split("/")[-1].lower()) + "-license"
            return "other", slug, f"{HUB_URL}/{zoo.base}"
        return zoo.license, None, None
    readme = Path(origin.path) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            lic = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data.license
        except Exception:
            lic = None
        if isinstance(lic, str):
            return lic, None, None
    return "unknown", None, None


def _base_model(origin: ModelOrigin) -> str | None:
    """The Hub repo the cards name as base_model: the one given, the zoo's merged model, or MODEL when it is a Hub
    id; None for a local folder."""
    if origin.base_model:
        return origin.base_model
    if origin.zoo is not None:
        return origin.zoo.merged
    if not Path(origin.model).expanduser().exists():
        return origin.model  # a Hub id
    return None


def _architecture(folder: Path) -> str:
    cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return (cfg.get("architectures") or ["LlamaForCausalLM"])[0].replace("ForCausalLM", "")


def release_cards(origin: ModelOrigin, data: ReleaseData) -> list[CardSpec]:
    """The cards of a release: the GGUF repo's, then the GPTQ repo's when the gptq stage ran."""
    lic, lic_name, lic_link = _license(origin)
    bench_files = data.bench.get("files", {}) if isinstance(data.bench.get("files"), dict) else {}
    rows = []
    for m in data.gguf_models:
        first = m["files"][0]
        v, b = data.verify.get(first, {}), bench_files.get(first, {})
        rows.append(CardRow(m["quant"], m["files"], m["size"], m.get("bits_per_weight"), ppl=b.get("ppl"),
                            kld_f16=b.get("kld_f16"), tokens_per_s=b.get("tokens_per_s"), kl_ref=v.get("mean_kl"),
                            top1=v.get("top1"), verified=v.get("passed"), plan=m.get("plan")))
    common = dict(model_name=data.name, family=data.family, base_model=_base_model(origin), license=lic,
                  license_name=lic_name, license_link=lic_link, sources=_sources(origin),
                  architecture=_architecture(origin.path),
                  size_label=(data.gguf_models or [{}])[0].get("size_label"))
    cards = [CardSpec(kind="gguf", repo_id=data.gguf_repo, rows=rows, files=dict(data.gguf_files),
                      tools={k: v for k, v in data.tools.items() if v}, bench_machine=data.bench.get("machine"),
                      verify_tokens=next((v.get("tokens") for v in data.verify.values()), None),
                      imatrix=data.imatrix, lora=data.lora, **common)]
    if data.gptq is not None:
        g, files = data.gptq, data.gptq_files
        row = CardRow(g.get("quant") or f"GPTQ-{g.get('bits', 4)}bit", sorted(files),
                      sum(size for size, _ in files.values()), g.get("bits_per_weight"), ppl=g.get("ppl"),
                      ppl_reference=g.get("ppl_reference"), tokens_per_s=g.get("tokens_per_s"),
                      kl_ref=g.get("kl_ref"), top1=g.get("top1"), verified=True)
        tools = {"komt-edge": data.tools.get("komt-edge"), **data.gptq_tools}
        cards.append(CardSpec(kind="gptq", repo_id=data.gptq_repo, rows=[row], files=dict(files),
                              tools={k: v for k, v in tools.items() if v}, gptq=g, bench_machine=g.get("machine"),
                              **common))
    return cards
