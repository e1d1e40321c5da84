"""Model cards: Hub-valid metadata, the file table, the template, usage snippets, provenance."""

from __future__ import annotations

import pytest

from komt_edge.card import CardRow, CardSpec, Source, card_metadata, hub_metadata_errors, render_card
from komt_edge.errors import KomtError

from .hub_server import hub, parse_front_matter, validate_metadata  # noqa: F401 (fixture)

SHA_A, SHA_B = "a" * 64, "b" * 64


def _gguf_spec(**kw) -> CardSpec:
    rows = [CardRow("Q4_K_M", ["komt-mistral-7b-v1-Q4_K_M.gguf"], 4_368_439_008, 4.89, ppl=9.812, kld_f16=0.0123,
                    tokens_per_s=11.4, kl_ref=0.0131, top1=0.947, verified=True),
            CardRow("Q8_0", [f"komt-mistral-7b-v1-Q8_0-0000{i}-of-00002.gguf" for i in (1, 2)], 7_695_857_952, 8.5,
                    kl_ref=0.0004, top1=0.99, verified=True)]
    files = {"komt-mistral-7b-v1-Q4_K_M.gguf": (4_368_439_008, SHA_A),
             "komt-mistral-7b-v1-Q8_0-00001-of-00002.gguf": (4_000_000_000, SHA_B),
             "komt-mistral-7b-v1-Q8_0-00002-of-00002.gguf": (3_695_857_952, "c" * 64)}
    spec = dict(kind="gguf", repo_id="my-org/komt-mistral-7b-v1-GGUF", model_name="komt-mistral-7b-v1",
                family="mistral", rows=rows, files=files, base_model="davidkim205/komt-mistral-7b-v1",
                license="apache-2.0", architecture="Mistral", size_label="7.2B",
                sources=[Source("base", "mistralai/Mistral-7B-Instruct-v0.1", "9ab9e76e" * 5),
                         Source("adapter", "davidkim205/komt-mistral-7b-v1-lora", "1234abcd" * 5)],
                tools={"komt-edge": "0.1.0", "llama-cpp-python": "0.3.36"}, bench_machine="AMD EPYC, 2 threads",
                verify_tokens=113)
    spec.update(kw)
    return CardSpec(**spec)


def test_gguf_card_metadata_is_what_the_hub_indexes():
    content = render_card(_gguf_spec())
    from huggingface_hub import ModelCard

    card = ModelCard(content)
    meta = card.data.to_dict()
    assert meta["base_model"] == "davidkim205/komt-mistral-7b-v1" and meta["base_model_relation"] == "quantized"
    assert meta["language"] == ["ko"] and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "gguf" and meta["pipeline_tag"] == "text-generation"
    assert {"gguf", "komt", "korean", "llama-cpp", "komt-edge"} <= set(meta["tags"])
    # Valid by the Hub's rules: komt-edge's own check and the test Hub's independent one.
    assert hub_metadata_errors(meta) == []
    parsed, error = parse_front_matter(content)
    assert error is None and validate_metadata(parsed) == ([], [])


def test_card_is_valid_through_the_hub_validation_route(hub):
    from huggingface_hub import ModelCard

    ModelCard(render_card(_gguf_spec())).validate()  # POST /api/validate-yaml on the test Hub
    bad = ModelCard("---\nlicense: apache-2.0\nbase_model_relation: quantized\nlanguage: korean!\n---\n# x\n")
    with pytest.raises(ValueError, match="base_model_relation"):
        bad.validate()


def test_gguf_card_body():
    content = render_card(_gguf_spec())
    assert "# komt-mistral-7b-v1 GGUF" in content
    # File table: quant, size, bits/weight, PPL, KLD vs f16, KL vs original, top-1, tokens/s.
    assert ("| Q4_K_M | 4.4 GB | 4.89 | 9.812 | 0.0123 | 1.31e-02 | 94.7% | 11.4 |") in content
    assert "+ 1 more shard(s) | Q8_0 | 7.7 GB | 8.50 | – | – | 4.00e-04 | 99.0% | – |" in content
    assert "AMD EPYC, 2 threads" in content
    # Template, usage, Ollama Modelfile with the komt template and stop strings.
    assert "```text\n[INST]{prompt} [/INST]\n```" in content
    assert "llama-cli -hf my-org/komt-mistral-7b-v1-GGUF:Q4_K_M" in content
    assert 'Llama.from_pretrained(repo_id="my-org/komt-mistral-7b-v1-GGUF", filename="komt-mistral-7b-v1-Q4_K_M.gguf"' \
        in content
    assert 'TEMPLATE """{{ if .System }}{{ .System }}\n\n{{ end }}[INST]{{ .Prompt }} [/INST]"""' in content
    assert 'PARAMETER stop "</s>"\nPARAMETER stop "[INST]"' in content
    # Provenance: versions, source revisions, sha256 of every file.
    assert "| komt-edge | 0.1.0 |" in content and "@ `" + "9ab9e76e" * 5 + "`" in content
    for name, (size, sha) in _gguf_spec().files.items():
        assert f"| {name} |" in content and f"`{sha}`" in content


def test_llama_family_template_and_stops():
    content = render_card(_gguf_spec(family="llama", base_model="davidkim205/komt-llama2-7b-v1", license="llama2"))
    assert "### instruction: {prompt}\n\n### Response: " in content
    assert 'PARAMETER stop "### instruction:"' in content
    assert "-p $'### instruction: 한국의 수도는 어디인가요?\\n\\n### Response: '" in content


def test_gptq_card():
    spec = _gguf_spec(kind="gptq", repo_id="my-org/komt-mistral-7b-v1-GPTQ",
                      rows=[CardRow("GPTQ-4bit-g128", ["config.json", "model.safetensors"], 4_100_000_000, None,
                                    ppl=9.9, ppl_reference=9.5)],
                      files={"config.json": (900, SHA_A), "model.safetensors": (4_099_999_100, SHA_B)},
                      gptq={"bits": 4, "group_size": 128, "desc_act": False}, bench_machine=None)
    content = render_card(spec)
    meta = parse_front_matter(content)[0]
    assert meta["library_name"] == "transformers" and {"gptq", "4-bit"} <= set(meta["tags"])
    assert validate_metadata(meta) == ([], [])
    assert 'AutoModelForCausalLM.from_pretrained("my-org/komt-mistral-7b-v1-GPTQ"' in content
    assert "| GPTQ-4bit-g128 | 4.1 GB | – | 9.900 (9.500) |" in content


def test_local_model_without_a_hub_base_has_no_relation_and_other_licence_is_named():
    meta = card_metadata(_gguf_spec(base_model=None, license="other", license_name="llama-30b-license",
                                    license_link="https://huggingface.co/huggyllama/llama-30b"))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["license_name"] == "llama-30b-license" and hub_metadata_errors(meta) == []


@pytest.mark.parametrize("meta, needle", [
    ({"license": "apache 2"}, "licence"),
    ({"base_model_relation": "quantized"}, "needs base_model"),
    ({"base_model": "a/b", "base_model_relation": "distilled"}, "base_model_relation must be"),
    ({"language": ["korean"]}, "language"),
    ({"license": "other"}, "license_name"),
    ({"base_model": "not a repo id"}, "base_model"),
])
def test_metadata_rules_catch_what_the_hub_rejects(meta, needle):
    errors = hub_metadata_errors(meta)
    assert errors and needle in " ".join(errors)
    server_errors, server_warnings = validate_metadata(meta)
    assert server_errors or server_warnings  # the test Hub agrees


def test_render_refuses_an_invalid_card():
    with pytest.raises(KomtError, match="metadata rules"):
        render_card(_gguf_spec(license="not-a-licence"))
