"""`komt-edge push`: against a Hub-compatible server on 127.0.0.1, driven by the real huggingface_hub client."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from komt_edge.errors import KomtError
from komt_edge.push import push

from .hub_server import ORG, READ_TOKEN, TOKEN, assert_no_token, configure_client, hub  # noqa: F401 (fixture)

CARD = "---\nlicense: apache-2.0\nlanguage:\n- ko\ntags:\n- komt-edge\n- gguf\n---\n# test\n"
FAST = dict(backoff=0.01)  # komt-edge's own retries; huggingface_hub's per-request backoff starts at 1 s


def _folder(root: Path, big: int = 9 * 1024 * 1024 + 123) -> Path:
    """A release-like folder: a big file (multipart LFS with the test server), a card, a small file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model-Q4_0.gguf").write_bytes(os.urandom(big))
    (root / "README.md").write_text(CARD, encoding="utf-8")
    (root / "notes.txt").write_text("작은 파일\n", encoding="utf-8")
    (root / ".partial-junk").write_bytes(b"hidden files are not published")
    return root


def _local(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_push_creates_the_repo_uploads_identical_files_and_nothing_twice(hub, tmp_path):
    folder = _folder(tmp_path / "release")
    repo = f"{ORG}/tiny-GGUF"
    result = push(folder, repo, **FAST)
    assert result.plan.create_repo and sorted(result.uploaded) == ["README.md", "model-Q4_0.gguf", "notes.txt"]
    remote = hub.files(repo)
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == _local(folder)
    assert hub.commit_count(repo) == 2  # the repo's initial commit + one for the whole release
    # The real client downloads the same bytes.
    from huggingface_hub import HfApi

    got = HfApi(endpoint=hub.url).hf_hub_download(repo, "model-Q4_0.gguf", cache_dir=tmp_path / "dl")
    assert Path(got).read_bytes() == (folder / "model-Q4_0.gguf").read_bytes()

    # Re-running uploads nothing: no LFS transfer, no commit.
    before = len(hub.log)
    again = push(folder, repo, **FAST)
    assert again.uploaded == [] and "up to date" in again.summary()
    new = hub.log[before:]
    assert not [r for r in new if r[2] in ("lfs_put", "lfs_batch", "commit", "create_repo")]
    assert hub.commit_count(repo) == 2

    # One small file changed: only it is sent (inline, no LFS transfer), in one new commit.
    (folder / "notes.txt").write_text("바뀐 내용\n", encoding="utf-8")
    before = len(hub.log)
    third = push(folder, repo, **FAST)
    assert third.uploaded == ["notes.txt"] and len(third.plan.unchanged) == 2
    assert not [r for r in hub.log[before:] if r[2] == "lfs_put"]
    assert hub.files(repo)["notes.txt"] == "바뀐 내용\n".encode()
    assert hub.commit_count(repo) == 3


def test_push_survives_5xx_dropped_connections_and_a_lost_commit_reply(hub, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    folder = _folder(tmp_path / "release")
    repo = f"{ORG}/flaky-GGUF"
    size = (folder / "model-Q4_0.gguf").stat().st_size
    hub.fail_next(3)  # whatever comes first: whoami, repo_info, ...
    hub.fail_next(1, 502, route="lfs_batch")
    hub.drop_upload(times=1, after=512 * 1024)  # a part upload loses its connection halfway
    hub.lose_commit_response(1)  # the commit lands, its reply does not
    result = push(folder, repo, **FAST)
    assert {k: v for k, v in hub.files(repo).items() if k != ".gitattributes"} == _local(folder)
    assert hub.commit_count(repo) == 2, "the lost reply must not lead to a second commit"
    oid = result.plan.upload[[f.path for f in result.plan.upload].index("model-Q4_0.gguf")].sha256
    assert hub.uploads == {oid: 1}, "the LFS object is stored exactly once"
    assert size <= hub.received[oid] < size + 3 * 1024 * 1024  # only the dropped part was sent again
    statuses = [r[3] for r in hub.log]
    assert statuses.count(503) == 3 and 502 in statuses and 0 in statuses and 500 in statuses
    out = capsys.readouterr()
    assert "retry" in out.out
    # A re-run finds everything in place.
    before = len(hub.log)
    assert push(folder, repo, **FAST).uploaded == []
    assert not [r for r in hub.log[before:] if r[2] in ("lfs_put", "commit")]
    out2 = capsys.readouterr()
    assert_no_token(texts=(out.out, out.err, out2.out, out2.err, caplog.text),
                    folders=(folder, tmp_path / "hf-home", hub.root))


def test_push_gives_up_with_a_resume_hint_when_the_hub_keeps_failing(hub, tmp_path):
    folder = _folder(tmp_path / "release", big=1000)
    hub.fail_next(100, 503, route="whoami")
    with pytest.raises(KomtError, match="kept failing.*re-run the same command to resume"):
        push(folder, f"{ORG}/down-GGUF", retries=2, backoff=0.01)


def test_dry_run_lists_what_would_happen_and_sends_nothing(hub, tmp_path):
    folder = _folder(tmp_path / "release", big=1000)
    result = push(folder, f"{ORG}/dry-GGUF", dry_run=True, private=True)
    text = result.summary()
    assert "would create the private repo" in text and "upload    model-Q4_0.gguf" in text
    assert ".partial-junk" not in text
    assert f"{ORG}/dry-GGUF" not in hub.repos
    assert not [r for r in hub.log if r[0] in ("POST", "PUT")]
    # Through the CLI.
    from komt_edge.cli import cli

    res = CliRunner().invoke(cli, ["push", str(folder), "--repo", f"{ORG}/dry-GGUF", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "dry run, nothing sent" in res.output and "notes.txt" in res.output
    assert f"{ORG}/dry-GGUF" not in hub.repos
    res = CliRunner().invoke(cli, ["push", str(folder), "--repo", f"{ORG}/dry-GGUF", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # --json alone: standard output is the JSON, the plan went to standard error
    assert data["repo"] == f"{ORG}/dry-GGUF" and data["dry_run"] is True and data["uploaded"] == []


def test_private_repo_on_a_branch(hub, tmp_path):
    folder = _folder(tmp_path / "release", big=1000)
    repo = f"{ORG}/branch-GGUF"
    push(folder, repo, revision="v1", private=True, **FAST)
    assert hub.repos[repo].private
    assert set(hub.files(repo, "v1")) == {".gitattributes", "README.md", "model-Q4_0.gguf", "notes.txt"}
    assert set(hub.files(repo, "main")) == {".gitattributes"}


def test_no_token_fails_before_any_request(hub, tmp_path, monkeypatch):
    configure_client(monkeypatch, hub.url, None, tmp_path / "empty-home")
    folder = _folder(tmp_path / "release", big=1000)
    with pytest.raises(KomtError, match="no Hugging Face token: set HF_TOKEN"):
        push(folder, f"{ORG}/x-GGUF")
    assert hub.log == []
    # A dry run still works, without comparing with the Hub.
    assert push(folder, f"{ORG}/x-GGUF", dry_run=True).dry_run


@pytest.mark.parametrize("token, repo, message", [
    (READ_TOKEN, f"{ORG}/x-GGUF", "read-only"),
    (TOKEN, "readers/x-GGUF", "'read' role in readers"),
    (TOKEN, "someone-else/x-GGUF", "not a member of someone-else"),
    ("hf_unknownTokenDoNotLeak", f"{ORG}/x-GGUF", "rejected the token"),
])
def test_no_write_access_is_explained(hub, tmp_path, monkeypatch, token, repo, message):
    monkeypatch.setenv("HF_TOKEN", token)
    folder = _folder(tmp_path / "release", big=1000)
    with pytest.raises(KomtError, match=message) as err:
        push(folder, repo, **FAST)
    assert token not in str(err.value)
    assert not [r for r in hub.log if r[2] in ("create_repo", "commit", "lfs_put")]


def test_foreign_files_are_refused_unless_forced(hub, tmp_path):
    repo = f"{ORG}/theirs-GGUF"
    hub.add_repo(repo, {"README.md": b"---\nlicense: mit\n---\nsomeone else's model\n", "weights.bin": b"\0" * 100})
    folder = _folder(tmp_path / "release", big=1000)
    with pytest.raises(KomtError, match=r"files komt-edge did not make \(README.md, weights.bin\).*--force"):
        push(folder, repo, **FAST)
    assert hub.commit_count(repo) == 2
    forced = push(folder, repo, force=True, **FAST)
    assert "README.md" in forced.uploaded
    assert "weights.bin" in hub.files(repo)  # kept
    # Now the repo carries a komt-edge card: a later push is no longer refused.
    (folder / "notes.txt").write_text("again\n", encoding="utf-8")
    assert push(folder, repo, **FAST).uploaded == ["notes.txt"]


def test_a_file_over_the_hub_limit_is_refused_with_the_reason(hub, tmp_path):
    folder = _folder(tmp_path / "release", big=5000)
    with pytest.raises(KomtError, match="over the Hub's per-file limit of 4.0 kB: split it first"):
        push(folder, f"{ORG}/big-GGUF", max_file_size=4000, **FAST)
    assert hub.log == []


def test_invalid_card_metadata_is_rejected_by_the_hub(hub, tmp_path):
    folder = _folder(tmp_path / "release", big=1000)
    (folder / "README.md").write_text("---\nlicense: not-a-licence\nbase_model_relation: quantized\n---\n# x\n")
    with pytest.raises(KomtError, match="rejected README.md's metadata.*license"):
        push(folder, f"{ORG}/badcard-GGUF", **FAST)
    assert f"{ORG}/badcard-GGUF" not in hub.repos  # checked before anything was created or uploaded
    assert not [r for r in hub.log if r[2] in ("create_repo", "lfs_put", "commit")]


def test_push_takes_the_lfs_path_where_huggingface_hub_would_take_xet(hub, tmp_path, monkeypatch):
    """huggingface_hub 2.4 uploads through Xet whenever hf_xet is importable (it is: a dependency of
    huggingface_hub); komt-edge chooses plain LFS for its own uploads (README: "Which upload path a push takes").
    Here the fixture's HF_HUB_DISABLE_XET is undone, so the client is configured as a user's is."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils._runtime import is_xet_available

    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    assert is_xet_available()  # left to itself, huggingface_hub would take the Xet path
    folder = _folder(tmp_path / "release")
    repo = f"{ORG}/lfs-GGUF"

    # The control: huggingface_hub's own upload asks this server for a Xet write token, which it cannot give.
    control_repo = f"{ORG}/control-GGUF"
    HfApi(endpoint=hub.url).create_repo(control_repo)
    with pytest.raises(Exception) as control:
        HfApi(endpoint=hub.url).upload_file(path_or_fileobj=str(folder / "model-Q4_0.gguf"),
                                            path_in_repo="model-Q4_0.gguf", repo_id=control_repo)
    assert "xet-write-token" in str(control.value), f"huggingface_hub did not try Xet: {control.value!r}"
    assert not hub.requests("lfs_put")

    before = len(hub.log)
    result = push(folder, repo, **FAST)
    assert sorted(result.uploaded) == ["README.md", "model-Q4_0.gguf", "notes.txt"]
    new = [r for r in hub.log[before:] if repo in r[1]]  # the control's late log lines name its own repo
    assert not [r for r in new if "xet" in r[1]]
    assert [r for r in new if r[2] == "lfs_batch"] and [r for r in new if r[2] == "lfs_put" and r[3] == 200]
    assert {k: v for k, v in hub.files(repo).items() if k != ".gitattributes"} == _local(folder)
    assert constants.HF_HUB_DISABLE_XET is False and is_xet_available()  # the process's own setting is back
