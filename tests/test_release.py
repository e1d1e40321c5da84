"""`komt-edge release`: the tiny komt model (local base + LoRA adapter) released to a Hub on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from komt_edge import release as rel
from komt_edge.converters.gguf_file import split_gguf
from komt_edge.errors import KomtError
from komt_edge.pipeline import module_available
from komt_edge.release import MANIFEST_NAME, release

from .conftest import N_THREADS
from .hub_server import (ORG, TOKEN, assert_no_token, client_env, configure_client, hub,  # noqa: F401 (fixture)
                         new_server, parse_front_matter, validate_metadata)

NAME = "komt-tiny"
GGUF_REPO, GPTQ_REPO = f"{ORG}/{NAME}-GGUF", f"{ORG}/{NAME}-GPTQ"
ROOT = Path(__file__).resolve().parents[1]


def _kw(adapter: Path, out: Path, **kw) -> dict:
    opts = dict(quants=["q8_0"], adapter=str(adapter), name=NAME, base_model=f"{ORG}/komt-tiny-mistral",
                license="apache-2.0", gptq=False, bench=False, out=out, n_threads=N_THREADS, progress=False,
                backoff=0.01)
    opts.update(kw)
    return opts


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _published(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def tiny_adapter(tiny_mistral, tmp_path_factory) -> Path:
    from komt_edge.tiny import build_tiny_adapter

    return build_tiny_adapter(tiny_mistral, tmp_path_factory.mktemp("release-lora") / "lora", "mistral", steps=2)


@pytest.fixture(scope="module")
def released(tiny_mistral, tiny_adapter, tmp_path_factory):
    """One full release (gguf q8_0 → verify → bench → card → push) to a module-wide test Hub."""
    root = tmp_path_factory.mktemp("release")
    server = new_server(root / "hub-storage", lifetime=None)  # stopped below, when the module is done
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        configure_client(mp, server.url, TOKEN, root / "hf-home")
        result = release(str(tiny_mistral), ORG, log=logs.append, **_kw(tiny_adapter, root / "out", bench=True))
        yield SimpleNamespace(server=server, root=root, out=root / "out", result=result, logs=logs,
                              model=tiny_mistral, adapter=tiny_adapter)
    server.stop()


def test_full_release_lands_identical_files_and_a_valid_card(released):
    r, server, out = released.result, released.server, released.out
    bench_ran = module_available("komt_edge.bench")
    assert r.stages["gguf"].startswith("done") and r.stages["verify"].startswith("done")
    assert r.stages["card"].startswith("done") and r.stages["push"].startswith("done")
    assert r.stages["merge"].startswith("skipped") and r.stages["gptq"] == "skipped: disabled (--no-gptq)"
    assert r.stages["bench"].startswith("done" if bench_ran else "skipped")
    folder = out / f"{NAME}-GGUF"
    local = _published(folder)
    assert sorted(local) == ["README.md", f"{NAME}-LoRA-F16.gguf", f"{NAME}-Q8_0.gguf"]  # the adapter: lora stage
    remote = server.files(GGUF_REPO)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local  # byte-identical
    assert GPTQ_REPO not in server.repos

    card = remote["README.md"].decode()
    meta, error = parse_front_matter(card)
    assert error is None and validate_metadata(meta) == ([], [])
    assert meta["base_model"] == f"{ORG}/komt-tiny-mistral" and meta["base_model_relation"] == "quantized"
    assert meta["language"] == ["ko"] and meta["license"] == "apache-2.0" and "komt-edge" in meta["tags"]
    gguf_sha = _sha(folder / f"{NAME}-Q8_0.gguf")
    assert f"`{gguf_sha}`" in card and "[INST]{prompt} [/INST]" in card and 'PARAMETER stop "[INST]"' in card
    row = next(line for line in card.splitlines() if line.startswith(f"| [{NAME}-Q8_0.gguf]"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "Q8_0" and cells[3] == "8.50" and cells[7] == "100.0%"  # bits/weight, top-1 vs original
    assert (cells[4] != "–") == bench_ran and (cells[8] != "–") == bench_ran  # Korean PPL, tokens/s

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    gguf = manifest["stages"]["gguf"]
    assert gguf["outputs"][f"{NAME}-GGUF/{NAME}-Q8_0.gguf"]["sha256"] == gguf_sha
    assert gguf["inputs"]["quants"] == ["q8_0"] and "model.safetensors" in gguf["inputs"]["model"]["files"]
    assert gguf["tools"]["llama_cpp_python"] and gguf["tools"]["komt-edge"]
    assert manifest["stages"]["verify"]["data"]["files"][f"{NAME}-Q8_0.gguf"]["passed"] is True
    assert manifest["stages"]["card"]["outputs"][f"{NAME}-GGUF/README.md"]["sha256"] == _sha(folder / "README.md")
    assert manifest["stages"]["push"]["data"]["repos"][GGUF_REPO]["commit"] == server.head(GGUF_REPO).oid
    assert_no_token(texts=tuple(released.logs), folders=(out, released.root / "hf-home", server.root))


def test_rerun_skips_finished_stages_and_uploads_nothing(released, monkeypatch):
    """What makes a re-run cheap, checked as events rather than against the first run's wall time (which a loaded
    machine can make either way): no stage runs again, no output is rewritten, no file is read to hash it again
    (the manifest's sha256 cache by size and mtime answers), and nothing is uploaded."""
    import komt_edge.pipeline as pipeline

    server, out = released.server, released.out
    gguf = out / f"{NAME}-GGUF" / f"{NAME}-Q8_0.gguf"
    mtime = gguf.stat().st_mtime_ns
    before, logs = len(server.log), []
    hashed: list[Path] = []
    real_sha256_file = pipeline.sha256_file
    monkeypatch.setattr(pipeline, "sha256_file", lambda path, *a, **k: hashed.append(Path(path))
                        or real_sha256_file(path, *a, **k))
    result = release(str(released.model), ORG, log=logs.append,
                     **_kw(released.adapter, out, bench=True))
    for stage in ("gguf", "lora", "verify", "card"):
        assert result.stages[stage] == "up to date", stage
    assert result.stages["push"].startswith("done")
    assert gguf.stat().st_mtime_ns == mtime
    assert not [r for r in server.log[before:] if r[2] in ("lfs_put", "lfs_batch", "commit", "create_repo")]
    assert result.repos[GGUF_REPO]["uploaded"] == []
    assert hashed == [], f"re-read to hash again: {hashed}"


def test_the_adapter_is_published_as_a_lora_gguf_that_verifies_on_the_base(released, tmp_path):
    """The lora stage (on by default with an adapter) publishes <name>-LoRA-F16.gguf next to the merged files; the
    card shows llama-cli/llama-server --lora, llama-cpp-python's lora_path and an Ollama FROM + ADAPTER Modelfile
    with the komt template and stops; the stage verified llama.cpp applying the published file to an f16 GGUF of
    the base against the HF base + peft adapter, within the f16 bounds. --no-lora leaves it out."""
    lora = f"{NAME}-LoRA-F16.gguf"
    remote = released.server.files(GGUF_REPO)
    assert remote[lora] == (released.out / f"{NAME}-GGUF" / lora).read_bytes()
    card = remote["README.md"].decode()
    for needle in (f"llama-cli -m BASE-Q4_K_M.gguf --lora {lora}", f"llama-server -m BASE-Q4_K_M.gguf --lora {lora}",
                   f'Llama(model_path="BASE-Q4_K_M.gguf", lora_path="{lora}"', "FROM ./BASE-Q4_K_M.gguf",
                   f"ADAPTER ./{lora}", 'TEMPLATE """{{ if .System }}', "[INST]{{ .Prompt }} [/INST]",
                   "merged in already", "komt-edge verified it as published"):
        assert needle in card, needle
    data = json.loads((released.out / MANIFEST_NAME).read_text())["stages"]["lora"]["data"]
    assert data["verify"]["passed"] and data["verify"]["base_type"] == "MOSTLY_F16" and data["alpha"] == 32
    section = card.split("### The komt adapter on its own", 1)[1]
    assert 'PARAMETER stop "[INST]"' in section and 'PARAMETER stop "</s>"' in section
    assert f"`{_sha(released.out / f'{NAME}-GGUF' / lora)}`" in card  # in the card's file list

    dry = release(str(released.model), ORG, log=lambda s: None, dry_run=True,
                  **_kw(released.adapter, tmp_path / "dry", lora=False))
    assert dry.stages["lora"] == "would skip: disabled (--no-lora)"


def _copy_release(released, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(released.out, out)  # copy2 keeps mtimes: the manifest's hashes stay valid
    return out


def test_missing_optional_stages_are_skipped_cleanly(released, tmp_path, monkeypatch):
    out = _copy_release(released, tmp_path)
    monkeypatch.setitem(sys.modules, "komt_edge.gptq", None)  # as if these modules had not landed
    monkeypatch.setitem(sys.modules, "komt_edge.bench", None)
    result = release(str(released.model), ORG, log=lambda s: None,
                     **_kw(released.adapter, out, gptq=True, bench=True, push=False, keep_merged=True))
    assert result.stages["merge"].startswith("done") and (out / "merged" / "config.json").is_file()
    assert result.stages["gptq"] == "skipped: komt_edge.gptq not installed"
    assert result.stages["bench"] == "skipped: komt_edge.bench not installed"
    assert result.stages["gguf"] == "up to date" and result.stages["push"].startswith("skipped")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["stages"]["gptq"]["status"] == "skipped" and manifest["stages"]["bench"]["status"] == "skipped"
    card = (out / f"{NAME}-GGUF" / "README.md").read_text()
    assert "the benchmark stage did not run" in card


def _fake_gptq(ppl: float):
    """komt_edge.gptq.gptq's contract, without GPTQModel: a checkpoint folder and a checked result."""
    from komt_edge.gptq import CheckReport, GptqResult, output_name

    def gptq(model, out, *, name=None, adapter=None, check=True, allow_pickle=False, progress=True, **kw):
        folder = Path(out) / output_name(name, 4, 128)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"],
                                                        "quantization_config": {"bits": 4, "group_size": 128}}))
        (folder / "model.safetensors").write_bytes(os.urandom(2 * 1024 * 1024))
        shutil.copy(Path(model) / "tokenizer.model", folder / "tokenizer.model")
        prompt = "한국의 수도는 어디인가요?"
        check_report = CheckReport(prompt, f"[INST]{prompt} [/INST]", True, "서울", ppl, 9.5, 1024, 2,
                                   "korean held-out")
        calibration = {"source": "korean (test)", "samples": 8, "seq_len": 64, "tokens": 512, "examples": 8,
                       "instruction_examples": 4, "available_tokens": 4096}
        return GptqResult(folder, "cpu (test)", 4, 128, False, calibration, 0.1, 0.2, 0, None, check_report)

    return gptq


def _gptq_needs_only_its_module(monkeypatch) -> None:
    stages = tuple(dataclasses.replace(s, requires=("komt_edge.gptq",)) if s.name == "gptq" else s
                   for s in rel.STAGES)
    monkeypatch.setattr(rel, "STAGES", stages)


def test_gptq_stage_is_wired_in_and_its_repo_published(released, tmp_path, monkeypatch):
    import komt_edge.gptq

    _gptq_needs_only_its_module(monkeypatch)  # GPTQModel itself is not needed by the fake
    out = _copy_release(released, tmp_path)
    server = released.server
    monkeypatch.setattr(komt_edge.gptq, "gptq", _fake_gptq(ppl=9.9))
    result = release(str(released.model), ORG, log=lambda s: None, **_kw(released.adapter, out, gptq=True,
                                                                          bench=True))
    assert result.stages["gptq"].startswith("done") and result.stages["gguf"] == "up to date"
    gptq_dir = out / f"{NAME}-GPTQ"
    remote = server.files(GPTQ_REPO)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == _published(gptq_dir)
    meta = parse_front_matter(remote["README.md"].decode())[0]
    assert meta["library_name"] == "transformers" and "gptq" in meta["tags"] and validate_metadata(meta)[0] == []
    assert "9.900 (9.500)" in remote["README.md"].decode()
    assert result.repos[GGUF_REPO]["uploaded"] == []  # the GGUF repo was already complete


def test_a_failed_gptq_check_stops_the_release_before_any_push(released, tmp_path, monkeypatch):
    import komt_edge.gptq

    _gptq_needs_only_its_module(monkeypatch)
    out = _copy_release(released, tmp_path)
    server = released.server
    monkeypatch.setattr(komt_edge.gptq, "gptq", _fake_gptq(ppl=95.0))  # ×10 the original's perplexity
    before = len(server.log)
    with pytest.raises(KomtError, match="GPTQ check failed.*×10.*stopped before anything was pushed"):
        release(str(released.model), ORG, log=lambda s: None,
                **_kw(released.adapter, out, gptq=True, bench=True, gptq_repo=f"{ORG}/{NAME}-GPTQ-bad"))
    assert not [r for r in server.log[before:] if r[0] in ("POST", "PUT") and r[2] != "validate_yaml"]
    assert json.loads((out / MANIFEST_NAME).read_text())["stages"]["gptq"]["status"] == "failed"


@pytest.mark.release
def test_a_failed_verification_stops_the_release_before_anything_is_pushed(hub, tiny_mistral, tiny_adapter,
                                                                             tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KomtError, match="verification failed for komt-tiny-Q8_0.gguf.*stopped before anything"):
        release(str(tiny_mistral), ORG, log=lambda s: None, **_kw(tiny_adapter, out, max_kl=0.0))
    assert GGUF_REPO not in hub.repos
    assert not [r for r in hub.log if r[2] in ("create_repo", "preupload", "lfs_put", "commit")]
    stages = json.loads((out / MANIFEST_NAME).read_text())["stages"]
    assert stages["verify"]["status"] == "failed" and "card" not in stages and "push" not in stages
    assert not (out / f"{NAME}-GGUF" / "README.md").exists()


def test_a_file_over_the_per_file_limit_is_split_and_loads_in_llama_cpp(hub, released, tiny_mistral, tiny_adapter,
                                                                        tmp_path):
    out = tmp_path / "out"
    limit = 10_000_000
    result = release(str(tiny_mistral), ORG, log=lambda s: None,
                     **_kw(tiny_adapter, out, max_file_size=limit, lora=False))  # the full files' split only
    assert result.stages["verify"].startswith("done")  # llama.cpp verified the split model
    folder = out / f"{NAME}-GGUF"
    shards = sorted(p.name for p in folder.glob("*.gguf"))
    assert shards == [f"{NAME}-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all((folder / s).stat().st_size <= limit for s in shards)
    remote = hub.files(GGUF_REPO)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == _published(folder)
    assert "+ 2 more shard(s) | Q8_0" in remote["README.md"].decode()

    # gguf-split's metadata, and the same logits as the unsplit file.
    from gguf import GGUFReader
    from llama_cpp import Llama

    first = GGUFReader(folder / shards[0])
    assert first.fields["split.count"].contents() == 3 and first.fields["split.no"].contents() == 0
    assert "tokenizer.ggml.tokens" in first.fields and "tokenizer.ggml.tokens" not in GGUFReader(
        folder / shards[1]).fields
    whole = released.out / f"{NAME}-GGUF" / f"{NAME}-Q8_0.gguf"
    ids = [1, 28705, 29473, 29511, 28723]
    logits = []
    for path in (whole, folder / shards[0]):
        llm = Llama(model_path=str(path), n_ctx=64, n_threads=N_THREADS, logits_all=True, verbose=False)
        llm.eval(ids)
        logits.append([list(row) for row in llm.scores[:len(ids)]])
        llm.close()
    assert logits[0] == logits[1]


def test_split_refuses_a_tensor_larger_than_the_limit(released, tmp_path):
    src = released.out / f"{NAME}-GGUF" / f"{NAME}-Q8_0.gguf"
    copy = tmp_path / src.name
    shutil.copy(src, copy)
    with pytest.raises(KomtError, match="a tensor cannot span files"):
        split_gguf(copy, 2_000_000)  # token_embd alone is 8.7 MB
    assert copy.exists() and not list(tmp_path.glob("*-of-*"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "komt_edge.cli", "release", *args]


@pytest.mark.release
@pytest.mark.subprocess
def test_killed_mid_release_resumes_without_redoing_work(hub, tiny_mistral, tiny_adapter, tmp_path):
    out = tmp_path / "out"
    args = _cli(str(tiny_mistral), "--org", ORG, "--adapter", str(tiny_adapter), "--quants", "q4_0 q8_0",
                "--no-gptq", "--no-bench", "--no-lora", "-o", str(out), "--threads", str(N_THREADS), "--name", NAME,
                "--base-model", f"{ORG}/komt-tiny-mistral", "--license", "apache-2.0")
    env = client_env(hub.url, TOKEN, tmp_path / "hf-home")
    hub.stall_upload(after=1)  # the second GGUF's upload hangs, after the first one finished
    log_path = tmp_path / "first-run.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 300
            while not hub.stalled.wait(1):
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "the release never reached its second upload"
            proc.kill()  # SIGKILL mid-upload: no cleanup runs
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
            hub.unstall()
    first_output = log_path.read_text(errors="replace")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["stages"]["push"]["status"] == "running"  # it died there
    assert GGUF_REPO in hub.repos and set(hub.files(GGUF_REPO)) == {".gitattributes"}  # nothing half-committed
    folder = out / f"{NAME}-GGUF"
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    done_oids = set(hub.uploads)
    assert len(done_oids) == 1

    before = len(hub.log)
    second = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in ("gguf", "verify", "card"):
        assert f"{stage}] up to date" in second.stdout, stage
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes  # nothing rebuilt
    remote = hub.files(GGUF_REPO)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == _published(folder)
    assert sorted(remote) == [".gitattributes", "README.md", f"{NAME}-Q4_0.gguf", f"{NAME}-Q8_0.gguf"]
    assert all(n == 1 for n in hub.uploads.values()) and len(hub.uploads) == 2  # each object stored once
    resent = [r for r in hub.log[before:] if r[2] == "lfs_put" and any(oid in r[1] for oid in done_oids)]
    assert resent == [], "the GGUF finished before the kill was uploaded again"
    assert hub.commit_count(GGUF_REPO) == 2
    assert json.loads((out / MANIFEST_NAME).read_text())["stages"]["push"]["status"] == "done"
    assert not (out / ".release.lock").exists()
    assert_no_token(texts=(first_output, second.stdout, second.stderr),
                    folders=(out, tmp_path / "hf-home", hub.root))


def test_no_token_stops_before_any_work(hub, tiny_mistral, tmp_path, monkeypatch):
    configure_client(monkeypatch, hub.url, None, tmp_path / "empty-home")
    with pytest.raises(KomtError, match="no Hugging Face token: set HF_TOKEN"):
        release(str(tiny_mistral), ORG, log=lambda s: None, **_kw(tmp_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists() and hub.log == []


def test_repo_problems_stop_before_any_work(hub, tiny_mistral, tmp_path):
    hub.add_repo(GGUF_REPO, {"model.gguf": b"GGUF someone else's"})
    with pytest.raises(KomtError, match="already exists with files komt-edge did not make.*--force"):
        release(str(tiny_mistral), ORG, log=lambda s: None, **_kw(tmp_path, tmp_path / "out"))
    with pytest.raises(KomtError, match="'read' role in readers"):
        release(str(tiny_mistral), "readers", log=lambda s: None, **_kw(tmp_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not [r for r in hub.log if r[0] in ("POST", "PUT")]


def test_cli_dry_run_and_make_target(hub, tiny_mistral, tmp_path):
    from komt_edge.cli import cli

    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["release", str(tiny_mistral), "--org", ORG, "--quants", "q4_0,q8_0", "--name",
                                   NAME, "--no-gptq", "--dry-run", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "dry run" in res.output and "gguf    would run" in res.output
    assert f"{GGUF_REPO}: would publish {NAME}-Q4_0.gguf, {NAME}-Q8_0.gguf and README.md" in res.output
    assert not out.exists() and not [r for r in hub.log if r[0] in ("POST", "PUT")]
    res = CliRunner().invoke(cli, ["release", str(tiny_mistral), "--org", ORG, "--quants", "q4_0,q8_0", "--name",
                                   NAME, "--no-gptq", "--dry-run", "-o", str(out), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert data["dry_run"] is True and data["gguf_repo"] == GGUF_REPO and data["gptq_repo"] is None
    assert data["quants"] == ["q4_0", "q8_0"] and data["stages"]["gguf"] == "would run" and not out.exists()

    make = subprocess.run(["make", "-n", "release", "MODEL=komt-mistral-7b", "ORG=my-org", "QUANTS=q4_0 q8_0"],
                          cwd=ROOT, capture_output=True, text=True)
    command = " ".join(make.stdout.replace("\\\n", " ").split())
    assert 'komt-edge release komt-mistral-7b --org my-org --quants "q4_0 q8_0"' in command, make.stderr
    missing = subprocess.run(["make", "-n", "release", "MODEL=komt-mistral-7b"], cwd=ROOT, capture_output=True,
                             text=True)
    assert missing.returncode != 0 and "ORG is required" in missing.stderr


@pytest.mark.release
def test_k_quants_use_the_korean_imatrix_which_is_published_and_named_on_the_card(hub, tiny_mistral, tiny_adapter,
                                                                                  tmp_path):
    """By default the k-quant and IQ files are quantized with the Korean importance matrix; q8_0 is not. The
    matrix is a file of the GGUF repo and the card says what it was computed on; --imatrix none opts out. (No lora
    stage here: the adapter's own GGUF does not depend on the quant types; the released fixture publishes it.)"""
    from .conftest import gguf_field

    out = tmp_path / "out"
    release(str(tiny_mistral), ORG, log=lambda s: None,
            **_kw(tiny_adapter, out, quants=["q8_0", "q4_K_M"], lora=False))
    repo = out / f"{NAME}-GGUF"
    matrix = repo / f"{NAME}-korean.imatrix.gguf"
    assert gguf_field(matrix, "general.type") == "imatrix"
    assert gguf_field(repo / f"{NAME}-Q4_K_M.gguf", "quantize.imatrix.file") == matrix.name
    assert gguf_field(repo / f"{NAME}-Q8_0.gguf", "quantize.imatrix.file") is None
    assert hub.files(GGUF_REPO)[matrix.name] == matrix.read_bytes()
    card = (repo / "README.md").read_text(encoding="utf-8")
    assert f"Q4_K_M were quantized with a Korean importance matrix, `{matrix.name}`" in card
    assert "konlpy" in card

    release(str(tiny_mistral), ORG, log=lambda s: None, imatrix="none",
            **_kw(tiny_adapter, tmp_path / "plain", quants=["q4_K_M"], push=False, lora=False))
    plain = tmp_path / "plain" / f"{NAME}-GGUF"
    assert not list(plain.glob("*.imatrix.gguf"))
    assert gguf_field(plain / f"{NAME}-Q4_K_M.gguf", "quantize.imatrix.file") is None


@pytest.mark.gptq
@pytest.mark.skipif(not module_available("gptqmodel"), reason="GPTQModel is not installed (make install adds it)")
def test_release_with_the_real_gptq_stage(released, tmp_path):
    """No fake: GPTQModel quantizes the tiny model (adapter merged) on CPU, the check runs, the repo is published."""
    out = _copy_release(released, tmp_path)
    server = released.server
    repo = f"{ORG}/{NAME}-GPTQ-real"
    result = release(str(released.model), ORG, log=lambda s: None,
                     **_kw(released.adapter, out, gptq=True, bench=True, gptq_repo=repo))
    assert result.stages["gptq"].startswith("done") and result.stages["gguf"] == "up to date"
    folder = out / f"{NAME}-GPTQ-real"
    assert {k: v for k, v in server.files(repo).items() if k != ".gitattributes"} == _published(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["checkpoint_format"] == "gptq"
    data = json.loads((out / MANIFEST_NAME).read_text())["stages"]["gptq"]["data"]
    from komt_edge.gptq import GPTQ_MAX_PPL_RATIO

    assert data["template_ok"] is True and data["ppl_ratio"] is not None and data["ppl_ratio"] <= GPTQ_MAX_PPL_RATIO
    assert f"{data['ppl']:.3f}" in server.files(repo)["README.md"].decode()


@pytest.mark.gptq
@pytest.mark.skipif(not module_available("gptqmodel"), reason="GPTQModel is not installed (make install adds it)")
def test_release_stops_on_a_damaged_real_gptq_checkpoint(released, tmp_path, monkeypatch):
    """The real GPTQ stage with its scales turned to NaN after quantizing: the release applies
    komt_edge.gptq.acceptance_failure and stops before any push. GPTQModel quantizes for real, on a smaller Korean
    calibration and held-out set than the default (the NaN perplexity does not depend on their size; the default
    sizes run in test_release_with_the_real_gptq_stage)."""
    import functools

    import komt_edge.gptq as g
    import torch
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(g, "gptq", functools.partial(g.gptq, samples=16, seq_len=128, eval_tokens=1024))
    finish = g._finish_checkpoint

    def finish_then_damage(folder, *args, **kwargs):
        finish(folder, *args, **kwargs)
        t = load_file(str(folder / "model.safetensors"))
        t = {k: torch.full_like(v, float("nan")) if k.endswith(".scales") else v for k, v in t.items()}
        save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})

    monkeypatch.setattr(g, "_finish_checkpoint", finish_then_damage)
    out = _copy_release(released, tmp_path)
    server = released.server
    before = len(server.log)
    with pytest.raises(KomtError, match="GPTQ check failed: the GPTQ model's perplexity is not finite.*stopped"):
        release(str(released.model), ORG, log=lambda s: None,
                **_kw(released.adapter, out, gptq=True, bench=True, gptq_repo=f"{ORG}/{NAME}-GPTQ-nan"))
    assert not [r for r in server.log[before:] if r[0] in ("POST", "PUT") and r[2] != "validate_yaml"]
    assert json.loads((out / MANIFEST_NAME).read_text())["stages"]["gptq"]["status"] == "failed"
