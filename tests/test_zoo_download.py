"""The zoo path end to end through the real huggingface_hub client: `komt-edge gguf <zoo name>` and
`make gguf MODEL=<zoo name>` against the local Hub server (tests/hub_server.py) with tiny models published under
the zoo's real repo names; the adapter → base rule; gated and missing repos."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from komt_edge.templates import MISTRAL
from komt_edge.zoo import adapter_base, lookup

from .conftest import assert_one_line_error, gguf_field, gguf_tensors, run_cli
from .hub_server import ORG, TOKEN, client_env, hub  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
ZOO = lookup("komt-mistral-7b")
BASE, ADAPTER = ZOO.base, ZOO.adapter  # mistralai/Mistral-7B-Instruct-v0.1, davidkim205/komt-mistral-7b-v1-lora


def folder_files(folder: Path, **overrides: bytes) -> dict[str, bytes]:
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return {**files, **overrides}


def adapter_files(adapter: Path, declared: str) -> dict[str, bytes]:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = declared
    return folder_files(adapter, **{"adapter_config.json": json.dumps(config, indent=2).encode()})


@pytest.fixture(scope="module")
def local_reference(tiny_mistral, mistral_adapter, tmp_path_factory) -> Path:
    """The same conversion from local folders: what the zoo path must reproduce."""
    from komt_edge.gguf import convert

    out = tmp_path_factory.mktemp("zoo-local")
    return convert(str(tiny_mistral), ["q8_0"], out, adapter=str(mistral_adapter), name="komt-mistral-7b-v1",
                   progress=False)[0]


def test_gguf_of_a_zoo_name_downloads_base_and_adapter(hub, tiny_mistral, mistral_adapter, local_reference,
                                                       tmp_path, monkeypatch, capsys):
    # komt's adapters name the local folder they were trained from: not a Hub id, so the zoo table decides
    hub.add_repo(ADAPTER, adapter_files(mistral_adapter, "/data/models/Mistral-7B-Instruct-v0.1"))
    hub.add_repo(BASE, folder_files(tiny_mistral, **{"pytorch_model.bin": b"pickle, not to be fetched"}))
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "gguf", "komt-mistral-7b", "-q", "q8_0", "-o", str(out),
                                "--threads", "1")
    assert code == 0, err
    assert f"not a Hub id: using {BASE} from komt-edge's zoo table" in err
    path = Path(stdout.strip().splitlines()[-1])
    assert path.name == "komt-mistral-7b-v1-Q8_0.gguf"

    # what was fetched: base and adapter through resolve, the pickle left out (no --allow-pickle)
    fetched = {(p.split("/resolve/")[0].strip("/"), p.split("/", 5)[-1]) for _, p, route, status in
               hub.requests("resolve", "GET") if status == 200}
    assert (BASE, "model.safetensors") in fetched and (BASE, "tokenizer.model") in fetched
    assert (ADAPTER, "adapter_model.safetensors") in fetched and (ADAPTER, "adapter_config.json") in fetched
    assert not any(name.endswith(".bin") for _, name in fetched)

    # the GGUF: the adapter merged (tensors as the local conversion), zoo provenance, licence, komt template
    assert gguf_tensors(path) == gguf_tensors(local_reference)
    assert gguf_field(path, "general.base_model.count") == 1
    assert gguf_field(path, "general.base_model.0.organization") == "mistralai"
    assert gguf_field(path, "general.base_model.0.name") == "Mistral-7B-Instruct-v0.1"
    assert gguf_field(path, "general.base_model.0.repo_url") == f"https://huggingface.co/{BASE}"
    assert gguf_field(path, "general.source.repo_url") == f"https://huggingface.co/{ADAPTER}"
    assert gguf_field(path, "komt_edge.source.repo") == ADAPTER
    assert gguf_field(path, "komt_edge.source.revision") == hub.head(ADAPTER).oid
    assert gguf_field(path, "general.license") == "apache-2.0"
    assert gguf_field(path, "tokenizer.chat_template") == MISTRAL.chat_template


def test_the_adapters_own_hub_base_wins_and_the_command_says_so(hub, tiny_mistral, mistral_adapter, tmp_path,
                                                                monkeypatch, capsys):
    other = f"{ORG}/Mistral-7B-komt-base"
    hub.add_repo(ADAPTER, adapter_files(mistral_adapter, other))
    hub.add_repo(other, folder_files(tiny_mistral))  # nothing under the table's base: using it would fail
    code, stdout, err = run_cli(monkeypatch, capsys, "gguf", "komt-mistral-7b", "-q", "q8_0", "-o",
                                str(tmp_path / "out"), "--threads", "1")
    assert code == 0, err
    assert (f"names {other} as its base, komt-edge's zoo table says {BASE}: using {other}, the model the adapter "
            "was trained on") in err
    path = Path(stdout.strip().splitlines()[-1])
    assert gguf_field(path, "general.base_model.0.repo_url") == f"https://huggingface.co/{other}"
    assert not [r for r in hub.requests("repo_info") if BASE in r[1]]

    # `komt-edge models` shows both: the table's base and what the (now cached) adapter_config.json names
    code, stdout, _ = run_cli(monkeypatch, capsys, "models", "--json")
    entry = next(d for d in json.loads(stdout) if d["name"] == ZOO.name)
    assert (entry["base"], entry["adapter_config_base"]) == (BASE, other)
    code, stdout, _ = run_cli(monkeypatch, capsys, "models")
    assert f"base:     {BASE} (komt-edge's table); adapter_config.json: {other}" in stdout


def test_adapter_base_rule(tmp_path):
    def adapter(declared: str | None) -> Path:
        folder = tmp_path / f"adapter-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({} if declared is None else
                                                               {"base_model_name_or_path": declared}))
        return folder

    same = adapter_base(adapter(BASE), ZOO)
    assert (same.base, same.note) == (BASE, None)
    hub_id = adapter_base(adapter("org/other"), ZOO)
    assert hub_id.base == "org/other" and "using org/other" in hub_id.note
    local = adapter_base(adapter(str(tmp_path)), ZOO)
    assert local.base == BASE and "not a Hub id" in local.note
    missing = adapter_base(adapter(None), ZOO)
    assert (missing.base, missing.note) == (BASE, None)
    assert adapter_base(adapter("org/only"), None).base == "org/only"
    assert adapter_base(adapter(None), None).base is None


def test_a_gated_base_is_a_one_line_error(hub, tiny_mistral, mistral_adapter, tmp_path, monkeypatch, capsys):
    hub.add_repo(ADAPTER, adapter_files(mistral_adapter, BASE))
    hub.add_repo(BASE, folder_files(tiny_mistral), gated=True)
    code, _, err = run_cli(monkeypatch, capsys, "gguf", "komt-mistral-7b", "-q", "q8_0", "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, f"{BASE} is gated", "accept its licence", "HF_TOKEN")
    assert [r[3] for r in hub.requests("repo_info") if BASE in r[1]] == [403]  # with a token: 403
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli(monkeypatch, capsys, "gguf", "komt-mistral-7b", "-q", "q8_0", "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, f"{BASE} is gated")
    assert [r[3] for r in hub.requests("repo_info") if BASE in r[1]][-1] == 401  # without one: 401
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_missing_repo_is_a_one_line_error(hub, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "gguf", "komt-mistral-7b", "-q", "q8_0", "-o", str(tmp_path / "o"))
    assert_one_line_error(code, err, f"Hub repo {ADAPTER} was not found")


@pytest.mark.subprocess
def test_make_gguf_with_a_zoo_name(hub, tiny_mistral, mistral_adapter, local_reference, tmp_path):
    """The advertised command, as a user runs it (install taken as done: -o install)."""
    hub.add_repo(ADAPTER, adapter_files(mistral_adapter, BASE))
    hub.add_repo(BASE, folder_files(tiny_mistral))
    out = tmp_path / "dist"
    env = client_env(hub.url, TOKEN, tmp_path / "hf-home-make")
    proc = subprocess.run(["make", "-o", "install", "gguf", "MODEL=komt-mistral-7b", "QUANTS=q8_0", f"OUT={out}",
                           "THREADS=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = out / "komt-mistral-7b-v1-Q8_0.gguf"
    assert (out / "gguf-files.txt").read_text().split() == [str(path)]
    assert gguf_tensors(path) == gguf_tensors(local_reference)
    assert gguf_field(path, "komt_edge.source.revision") == hub.head(ADAPTER).oid
    assert gguf_field(path, "general.base_model.0.repo_url") == f"https://huggingface.co/{BASE}"
    reports = json.loads((out / "verify.json").read_text())  # the verify step, against the downloaded model
    reports = reports if isinstance(reports, list) else reports.get("reports", [reports])
    assert len(reports) == 1 and reports[0]["passed"] is True
