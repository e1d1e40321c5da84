"""What komt-edge writes around the tensors: names, provenance, tokenizer ids, the komt chat template."""

from __future__ import annotations

import jinja2
import pytest

from komt_edge import __version__
from komt_edge.gguf import convert, output_name
from komt_edge.templates import LLAMA, MISTRAL

from .conftest import gguf_field


def test_file_names_follow_the_gguf_convention():
    assert output_name("komt-mistral-7b-v1", "q4_0") == "komt-mistral-7b-v1-Q4_0.gguf"
    assert output_name("komt-mistral-7b-v1", "q4_k_m") == "komt-mistral-7b-v1-Q4_K_M.gguf"
    assert output_name("org/odd name", "f16") == "org-odd-name-F16.gguf"


def test_llama_family_metadata_and_komt_tokenizer_quirks(tiny_llama, tmp_path):
    path = convert(str(tiny_llama), ["q8_0"], tmp_path, name="komt-tiny-llama", template="llama",
                   n_threads=2, progress=False)[0]
    assert path.name == "komt-tiny-llama-Q8_0.gguf"
    assert gguf_field(path, "general.name") == "komt-tiny-llama"
    assert gguf_field(path, "general.quantized_by") == f"komt-edge {__version__}"
    assert gguf_field(path, "general.file_type") == 7  # MOSTLY_Q8_0
    assert gguf_field(path, "general.size_label")
    # komt's special_tokens_map says bos = eos = unk = </s>; llama.cpp needs the SentencePiece ids.
    assert gguf_field(path, "tokenizer.ggml.bos_token_id") == 1
    assert gguf_field(path, "tokenizer.ggml.eos_token_id") == 2
    assert gguf_field(path, "tokenizer.ggml.unknown_token_id") == 0
    assert gguf_field(path, "tokenizer.ggml.padding_token_id") == 32000
    tokens = gguf_field(path, "tokenizer.ggml.tokens")
    assert len(tokens) == 32001 and tokens[32000] == "[PAD]"
    assert gguf_field(path, "tokenizer.chat_template") == LLAMA.chat_template


@pytest.mark.parametrize("tmpl", [LLAMA, MISTRAL])
def test_chat_template_renders_the_komt_prompt(tmpl):
    env = jinja2.Environment()
    render = env.from_string(tmpl.chat_template).render
    user = [{"role": "user", "content": "김치는 어떻게 만드나요?"}]
    assert render(messages=user, eos_token="</s>") == tmpl.format("김치는 어떻게 만드나요?")
    turns = [{"role": "system", "content": "친절하게 답하세요."}, *user,
             {"role": "assistant", "content": "배추를 절입니다."}, {"role": "user", "content": "그다음은요?"}]
    assert render(messages=turns, eos_token="</s>") == (
        "친절하게 답하세요.\n\n" + tmpl.format("김치는 어떻게 만드나요?") + "배추를 절입니다.</s>"
        + tmpl.format("그다음은요?"))


def test_llama_cpp_python_applies_the_embedded_template(tiny_mistral, tmp_path):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    path = convert(str(tiny_mistral), ["q8_0"], tmp_path, template="mistral", n_threads=2, progress=False)[0]
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="</s>",
                                        bos_token="<s>")
        rendered = formatter(messages=[{"role": "user", "content": "안녕하세요"}]).prompt
        assert rendered == "<s>[INST]안녕하세요 [/INST]"  # BOS: llama-cpp-python's formatter adds none itself
    finally:
        llm.close()
