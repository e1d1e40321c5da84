from __future__ import annotations

import json

import pytest

from komt_edge.cli import main
from komt_edge.templates import LLAMA, MISTRAL
from komt_edge.zoo import ZOO, lookup


def test_zoo_lists_the_published_komt_models():
    names = {m.name for m in ZOO}
    assert names == {"komt-llama2-7b-v1", "komt-llama2-13b-v1", "komt-llama-30b-v1", "komt-mistral-7b-v1",
                     "komt-Llama-2-7b-chat-hf", "komt-Llama-2-13b-hf"}
    for m in ZOO:
        assert m.merged.startswith("davidkim205/") and m.adapter == m.merged + "-lora"
        assert m.base and m.license and m.architecture.endswith("ForCausalLM")


@pytest.mark.parametrize("name,expected", [("komt-mistral-7b", "komt-mistral-7b-v1"),
                                           ("KOMT-MISTRAL-7B-V1", "komt-mistral-7b-v1"),
                                           ("davidkim205/komt-llama2-13b-v1", "komt-llama2-13b-v1"),
                                           ("komt-llama2-7b", "komt-llama2-7b-v1")])
def test_aliases_and_hub_ids_resolve(name, expected):
    assert lookup(name).name == expected


def test_templates_are_komts():
    assert LLAMA.format("안녕?") == "### instruction: 안녕?\n\n### Response: "
    assert MISTRAL.format("안녕?") == "[INST]안녕? [/INST]"
    assert lookup("komt-mistral-7b").template is MISTRAL
    assert lookup("komt-llama-30b").template is LLAMA


def test_models_command_prints_json(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["komt-edge", "models", "--json"])
    main()
    data = json.loads(capsys.readouterr().out)
    mistral = next(d for d in data if d["name"] == "komt-mistral-7b-v1")
    assert mistral["template"] == "[INST]{prompt} [/INST]"
    assert mistral["adapter"] == "davidkim205/komt-mistral-7b-v1-lora"
