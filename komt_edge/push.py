"""`komt-edge push DIR --repo ORG/NAME`: publish a folder to the Hugging Face Hub, resumably, sending only changes.

How it copes with multi-GB files and flaky networks:

- **Nothing unchanged is sent.** Each local file's sha256 (LFS files) or git blob id (small files) is compared with
  the remote tree (``list_repo_tree``, which reports every LFS file's sha256); only files that differ are uploaded.
- **Large files stream from disk, one at a time**, through huggingface_hub's ``preupload_lfs_files`` over plain Git
  LFS (basic or multipart transfer); huggingface_hub retries each HTTP request with exponential backoff on 5xx,
  timeouts and dropped connections. komt-edge turns huggingface_hub's Xet path off for its own uploads (see
  :func:`lfs_uploads`): LFS is the path whose resume and store-once behaviour is tested, and the Hub accepts it for
  every repo, Xet-backed ones included.
- **Resumable.** An LFS object whose upload finished stays in the repo's storage even if the process dies before
  the commit; on a re-run the LFS batch call reports it present and it is not sent again.
- **One commit** for all changed files: the repo never shows half a release. The calls komt-edge makes itself
  (whoami, listing, repo creation, commit) are retried with backoff; before a commit is retried the remote tree is
  read again, so a commit whose reply was lost is not made twice.

The token comes only from huggingface_hub's own lookup (the ``HF_TOKEN`` environment variable, then the login
cache written by ``hf auth login``). It is never printed, logged, written to a file or put in an error message.

Before anything is sent, :func:`preflight` checks the token, that the Hub answers, write access to the repos'
namespaces and that the repos hold only komt-edge's files (unless ``force``): ``push`` and ``komt-edge release``
both start with it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from .errors import KomtError
from .hub import endpoint, is_transient, is_unreachable, probe, status_of, unreachable_cause, unreachable_message
from .util import fmt_size, sha256_file

# The Hub refuses files over 50 GB ("Per file: 50GB max, 20GB recommended": huggingface.co/docs/hub/storage-limits,
# the "Repository limitations" table). Decimal gigabytes, the stricter reading.
HUB_MAX_FILE_SIZE = 50 * 1000**3
# Files the Hub stores as plain git blobs are at most 10 MiB; above that the Hub always asks for LFS.
REGULAR_FILE_MAX = 10 * 1024 * 1024
DEFAULT_RETRIES = 6
DEFAULT_BACKOFF = 2.0  # seconds before the first retry; doubles each time
MAX_BACKOFF = 60.0
# A README whose metadata has this tag was written by komt-edge: the repo's files are then ours to update.
KOMT_TAG = "komt-edge"
NO_TOKEN = ("no Hugging Face token: set HF_TOKEN to a token with write access, or run `hf auth login` "
            "(komt-edge reads only these two)")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --- local files -------------------------------------------------------------------------------------------

@dataclass
class LocalFile:
    path: str  # path in the repo (posix)
    local: Path
    size: int
    sha256: str
    git_oid: str | None = None  # git blob id, for files small enough to be plain git blobs


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def scan_folder(folder: Path, *, sha256s: dict[str, str] | None = None,
                max_file_size: int = HUB_MAX_FILE_SIZE) -> list[LocalFile]:
    """The files of ``folder`` that a push publishes: every regular file, hidden paths (``.*``) excluded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KomtError(f"{folder} is not a folder: pass the folder to publish")
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or not path.is_file():
            continue
        size = path.stat().st_size
        if size > max_file_size:
            raise KomtError(f"{rel.as_posix()} is {fmt_size(size)}, over the Hub's per-file limit of "
                            f"{fmt_size(max_file_size)}: split it first (`komt-edge release` splits GGUF files "
                            "into gguf-split shards that llama.cpp loads)")
        known = (sha256s or {}).get(rel.as_posix())
        sha = known or sha256_file(path)
        oid = _git_blob_oid(path.read_bytes()) if size <= REGULAR_FILE_MAX else None
        files.append(LocalFile(rel.as_posix(), path, size, sha, oid))
    if not files:
        raise KomtError(f"{folder} has no files to publish")
    return files


# --- remote state ------------------------------------------------------------------------------------------

@dataclass
class RemoteFile:
    path: str
    size: int
    blob_id: str
    sha256: str | None  # LFS files only


@dataclass
class RemoteState:
    exists: bool
    private: bool | None = None
    branch_exists: bool = True
    files: dict[str, RemoteFile] = field(default_factory=dict)
    made_by_komt: bool = False  # README.md metadata carries the komt-edge tag

    def same(self, f: LocalFile) -> bool:
        r = self.files.get(f.path)
        if r is None or r.size != f.size:
            return False
        if r.sha256 is not None:
            return r.sha256 == f.sha256
        return f.git_oid is not None and r.blob_id == f.git_oid


# --- plan and result ---------------------------------------------------------------------------------------

@dataclass
class PushPlan:
    repo_id: str
    revision: str
    private: bool
    remote: RemoteState
    upload: list[LocalFile]
    unchanged: list[LocalFile]
    foreign: list[str]  # remote files komt-edge did not make (the repo's README is not a komt-edge card)
    stale: list[str]  # files of an earlier komt-edge release that this folder no longer has (kept)

    @property
    def create_repo(self) -> bool:
        return not self.remote.exists

    @property
    def create_branch(self) -> bool:
        return self.remote.exists and not self.remote.branch_exists

    def describe(self) -> str:
        where = f"{self.repo_id}" + (f" @ {self.revision}" if self.revision != "main" else "")
        if self.create_repo:
            head = f"{where}: would create the {'private' if self.private else 'public'} repo"
        elif self.create_branch:
            head = f"{where}: would create branch {self.revision} from main"
        else:
            head = f"{where}: exists" + (" (private)" if self.remote.private else "")
        lines = [head]
        lines += [f"  upload    {f.path}  ({fmt_size(f.size)})" for f in self.upload]
        lines += [f"  unchanged {f.path}" for f in self.unchanged]
        lines += [f"  foreign   {p}  (not made by komt-edge)" for p in self.foreign]
        lines += [f"  kept      {p}  (earlier release; not in this folder)" for p in self.stale]
        total = sum(f.size for f in self.upload)
        lines.append(f"  {len(self.upload)} file(s) to upload ({fmt_size(total)}), {len(self.unchanged)} unchanged")
        return "\n".join(lines)


@dataclass
class PushResult:
    plan: PushPlan
    dry_run: bool
    uploaded: list[str] = field(default_factory=list)
    commit: str | None = None
    url: str | None = None

    @property
    def repo_id(self) -> str:
        return self.plan.repo_id

    def summary(self) -> str:
        if self.dry_run:
            return "dry run, nothing sent:\n" + self.plan.describe()
        size = sum(f.size for f in self.plan.upload if f.path in self.uploaded)
        if not self.uploaded:
            return f"{self.repo_id}: up to date ({len(self.plan.unchanged)} files unchanged), nothing uploaded"
        return (f"{self.repo_id}: uploaded {len(self.uploaded)} file(s) ({fmt_size(size)}), "
                f"{len(self.plan.unchanged)} unchanged; commit {self.commit[:10] if self.commit else '?'}"
                + (f" → {self.url}" if self.url else ""))

    def to_dict(self) -> dict:
        return {"repo": self.repo_id, "revision": self.plan.revision, "dry_run": self.dry_run,
                "created": self.plan.create_repo, "uploaded": self.uploaded,
                "unchanged": [f.path for f in self.plan.unchanged], "commit": self.commit, "url": self.url}


# --- the Hub, with retries and one-line errors -------------------------------------------------------------

def hub_token(required: bool = True) -> str | None:
    """The token huggingface_hub would use (HF_TOKEN, then the login cache); never printed."""
    from huggingface_hub import get_token

    token = get_token()
    if token is None and required:
        raise KomtError(NO_TOKEN)
    return token


def _root_http_error(err: BaseException) -> BaseException:
    """The HTTP error inside huggingface_hub's wrappers (RuntimeError around an upload), else ``err``."""
    e, seen = err, 0
    while e is not None and seen < 5:
        if status_of(e) is not None:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return err


def _short(err: BaseException) -> str:
    status = status_of(err)
    if status is not None:
        message = getattr(err, "server_message", None) or ""
        return f"HTTP {status}" + (f" ({message.strip().splitlines()[0][:120]})" if message.strip() else "")
    inner = err.__cause__ or err.__context__
    if isinstance(err, RuntimeError) and inner is not None:
        return _short(inner)
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"{type(err).__name__}" + (f": {text}" if text else "")


class _CardRejected(Exception):
    """The Hub's metadata validation refused README.md."""


class Hub:
    """huggingface_hub's HfApi plus retries with backoff, and errors turned into one-line KomtErrors."""

    def __init__(self, token: str | None, *, retries: int, backoff: float, log: Callable[[str], None]):
        from huggingface_hub import HfApi

        self.endpoint = endpoint()
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.token = token
        self.retries, self.backoff, self.log = retries, backoff, log

    def call(self, what: str, fn: Callable, *args, **kwargs):
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except KomtError:
                raise
            except Exception as err:  # huggingface_hub raises HfHubHTTPError, httpx errors, RuntimeError(wrapped)
                if not is_transient(err) or attempt == self.retries:
                    raise
                self.log(f"  {what}: {_short(err)}; retry {attempt + 1}/{self.retries} in {delay:g} s")
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
        raise AssertionError("unreachable")

    def explain(self, err: BaseException, repo_id: str) -> KomtError:
        """A one-line error naming the cause and the fix; never includes the token."""
        from huggingface_hub.errors import RepositoryNotFoundError

        namespace = repo_id.split("/")[0]
        if isinstance(err, _CardRejected):
            return KomtError(f"the Hub rejected README.md's metadata ({err}): fix the card and push again")
        if is_unreachable(err):
            return KomtError(unreachable_message(self.endpoint, _short(unreachable_cause(err))))
        err = _root_http_error(err)
        status = status_of(err)
        if status == 401 and not isinstance(err, RepositoryNotFoundError):
            return KomtError("the Hub rejected the token (from HF_TOKEN or the huggingface_hub login cache): it is "
                             "invalid or expired; create a token with write access and set HF_TOKEN")
        if status == 403 or isinstance(err, RepositoryNotFoundError):
            return KomtError(f"no write access to {repo_id} on the Hub: ask an admin of {namespace} for the write "
                             f"role, use a token with write scope for {namespace}, or choose another repo")
        if is_transient(err):
            return KomtError(f"the Hub at {self.endpoint} kept failing ({_short(err)}) after {self.retries} retries: "
                             "re-run the same command to resume; files already uploaded are not sent again")
        return KomtError(f"pushing to {repo_id} failed: {_short(err)}")

    def validate_card(self, content: str) -> None:
        """The Hub's own metadata check (POST /api/validate-yaml, as ModelCard.validate), before any upload."""
        from huggingface_hub import ModelCard
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        try:
            ModelCard(content)
        except ValueError as err:
            raise _CardRejected(" ".join(str(err).split())) from None

        def post() -> None:
            r = get_session().post(f"{self.endpoint}/api/validate-yaml", json={"content": content, "repoType": "model"},
                                   headers=build_hf_headers(token=self.token))
            if r.status_code == 400:
                try:
                    errors = [e.get("message", "") for e in r.json().get("errors", [])]
                except ValueError:
                    errors = [r.text]
                raise _CardRejected("; ".join(errors) or "invalid metadata")
            hf_raise_for_status(r)

        self.call("validate README.md", post)

    # -- queries --------------------------------------------------------------------------------------------
    def check_write_access(self, namespace: str) -> str:
        """Who the token belongs to; raises unless it can write to ``namespace``."""
        info = self.call("whoami", self.api.whoami)
        user = info.get("name", "?")
        token_info = (info.get("auth") or {}).get("accessToken") or {}
        role = token_info.get("role")
        if role == "read":
            raise KomtError(f"the Hub token of {user} is read-only: create a token with write access "
                            "(huggingface.co/settings/tokens) and set HF_TOKEN")
        if role == "fineGrained":
            scoped = (token_info.get("fineGrained") or {}).get("scoped") or []
            if not any((s.get("entity") or {}).get("name") == namespace and "repo.write" in (s.get("permissions") or [])
                       for s in scoped):
                raise KomtError(f"the fine-grained Hub token of {user} has no repo.write permission for "
                                f"{namespace}: add it in huggingface.co/settings/tokens")
            return user
        if namespace == user:
            return user
        orgs = {o.get("name"): o.get("roleInOrg") for o in info.get("orgs") or []}
        if namespace not in orgs:
            raise KomtError(f"{user} is not a member of {namespace} on the Hub, so cannot write there: join the org, "
                            f"or pass another --org/--repo")
        if orgs[namespace] is not None and orgs[namespace] not in ("admin", "write", "contributor"):
            raise KomtError(f"{user} has the {orgs[namespace]!r} role in {namespace}, which cannot create or write "
                            f"repos: ask an admin of {namespace} for the write role")
        return user

    def remote_state(self, repo_id: str, revision: str) -> RemoteState:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        try:
            info = self.call("repo_info", self.api.repo_info, repo_id)
        except RepositoryNotFoundError:
            return RemoteState(exists=False, branch_exists=False)
        state = RemoteState(exists=True, private=getattr(info, "private", None))
        try:
            tree = self.call("list files", lambda: list(self.api.list_repo_tree(repo_id, revision=revision,
                                                                                 recursive=True)))
        except RevisionNotFoundError:
            state.branch_exists = False
            return state
        for entry in tree:
            if hasattr(entry, "blob_id"):
                lfs = getattr(entry, "lfs", None)
                state.files[entry.path] = RemoteFile(entry.path, entry.size, entry.blob_id,
                                                     lfs.sha256 if lfs is not None else None)
        if "README.md" in state.files:
            state.made_by_komt = self._readme_is_ours(repo_id, revision)
        return state

    def _readme_is_ours(self, repo_id: str, revision: str) -> bool:
        from urllib.parse import quote

        from huggingface_hub import ModelCard
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = f"{self.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/README.md"

        def fetch() -> str:
            r = get_session().get(url, headers=build_hf_headers(token=self.token))
            hf_raise_for_status(r)
            return r.text

        try:
            tags = ModelCard(self.call("read README.md", fetch), ignore_metadata_errors=True).data.tags or []
        except Exception:  # unreadable card: not ours
            return False
        return KOMT_TAG in tags


# --- push --------------------------------------------------------------------------------------------------

def foreign_files(remote: RemoteState, local: Iterable[LocalFile] = ()) -> list[str]:
    """The repo's files komt-edge did not make: none when its README is a komt-edge card, else every file but
    .gitattributes and those identical to one of ``local``."""
    if remote.made_by_komt:
        return []
    identical = {f.path for f in local if remote.same(f)}
    return [p for p in sorted(remote.files) if p != ".gitattributes" and p not in identical]


def make_plan(repo_id: str, revision: str, private: bool, local: list[LocalFile], remote: RemoteState) -> PushPlan:
    upload = [f for f in local if not remote.same(f)]
    unchanged = [f for f in local if remote.same(f)]
    ours = {f.path for f in local}
    stale = ([p for p in sorted(remote.files) if p != ".gitattributes" and p not in ours]
             if remote.made_by_komt else [])
    return PushPlan(repo_id, revision, private, remote, upload, unchanged, foreign_files(remote, local), stale)


def preflight(repo_ids: Sequence[str], *, revision: str = "main", force: bool = False,
              local: Mapping[str, Sequence[LocalFile]] | None = None, action: str = "publish",
              retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF, log: Callable[[str], None] = print,
              announce: bool = False) -> tuple[Hub, dict[str, RemoteState]]:
    """Before anything is sent: a Hub token (HF_TOKEN or the login cache), a Hub that answers, write access to
    each repo's namespace and, unless ``force``, repos that hold only komt-edge's files (files identical to the
    repo's ``local`` files count as komt-edge's). Returns the Hub client and each repo's state at ``revision``;
    raises a one-line KomtError. ``action`` names what ``--force`` would let happen; ``announce`` logs whose token
    writes where."""
    hub = Hub(hub_token(required=True), retries=retries, backoff=backoff, log=log)
    unreachable = probe(hub.endpoint)
    if unreachable:
        raise KomtError(unreachable_message(hub.endpoint, unreachable))
    users: dict[str, str] = {}  # namespace → the token's user, checked once per namespace
    remotes: dict[str, RemoteState] = {}
    for repo_id in repo_ids:
        namespace = repo_id.split("/")[0]
        try:
            if namespace not in users:
                users[namespace] = hub.check_write_access(namespace)
                if announce:
                    log(f"Hub: {hub.endpoint}, token of {users[namespace]}, write access to {namespace}")
            remote = hub.remote_state(repo_id, revision)
        except KomtError:
            raise
        except Exception as err:
            raise hub.explain(err, repo_id) from None
        foreign = foreign_files(remote, (local or {}).get(repo_id, ()))
        if foreign and not force:
            more = len(foreign) - 5
            shown = ", ".join(foreign[:5]) + (f" and {more} more" if more > 0 else "")
            raise KomtError(f"{repo_id} already exists with files komt-edge did not make ({shown}): pass --force to "
                            f"{action} into it anyway (they are kept), or choose another repo")
        remotes[repo_id] = remote
    return hub, remotes


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id or ""):
        raise KomtError(f"--repo {repo_id!r} is not a Hub repo id: use ORG/NAME")
    return repo_id


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         dry_run: bool = False, force: bool = False, commit_message: str | None = None,
         max_file_size: int = HUB_MAX_FILE_SIZE, sha256s: dict[str, str] | None = None,
         retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
         log: Callable[[str], None] = print) -> PushResult:
    """Publish ``folder`` to the model repo ``repo_id``; see the module docstring.

    ``sha256s`` (repo path → sha256) spares re-hashing files whose digests are already known (the release
    manifest). ``force`` publishes into a repo holding files komt-edge did not make (they are left in place).
    ``dry_run`` sends nothing: it reports what would be created and uploaded (comparing with the Hub when a token is
    available).
    """
    check_repo_id(repo_id)
    revision = revision or "main"
    token = hub_token(required=not dry_run)
    local = scan_folder(Path(folder), sha256s=sha256s, max_file_size=max_file_size)
    if dry_run:
        unreachable = probe(endpoint()) if token is not None else None
        if token is None or unreachable:  # nothing to compare with
            plan = make_plan(repo_id, revision, private, local, RemoteState(exists=False, branch_exists=False))
            log(unreachable_message(endpoint(), unreachable) + "; not compared with the Hub: every file is listed"
                if unreachable else "no Hub token (HF_TOKEN or `hf auth login`): not compared with the Hub; every "
                "file is listed")
            return PushResult(plan, dry_run=True)

    # A dry run asks the Hub once per question, never waits to retry and refuses nothing.
    hub, remotes = preflight([repo_id], revision=revision, force=force or dry_run, local={repo_id: local},
                             retries=0 if dry_run else retries, backoff=backoff, log=log)
    remote = remotes[repo_id]
    plan = make_plan(repo_id, revision, private, local, remote)
    if dry_run:
        return PushResult(plan, dry_run=True)
    try:
        readme = next((f for f in plan.upload if f.path == "README.md"), None)
        if readme is not None:
            hub.validate_card(readme.local.read_text(encoding="utf-8"))
        if private and remote.exists and remote.private is False:
            log(f"note: {repo_id} exists and is public; --private does not change an existing repo")
        return _upload(hub, plan, commit_message or f"komt-edge: publish {len(plan.upload)} file(s)", log)
    except KomtError:
        raise
    except Exception as err:
        raise hub.explain(err, repo_id) from None


@contextmanager
def lfs_uploads() -> Iterator[None]:
    """huggingface_hub's uploads take plain Git LFS inside this block, whether or not hf_xet is installed.

    huggingface_hub 2.4 uploads through Xet whenever the hf_xet package is importable (it is a dependency of
    huggingface_hub) unless ``HF_HUB_DISABLE_XET`` is set; it has no per-call switch, but its ``is_xet_available``
    reads ``constants.HF_HUB_DISABLE_XET`` at each upload, so komt-edge sets that for the duration of its own upload
    calls and restores it afterwards. Why LFS: komt-edge's resume (an LFS object that finished uploading is reported
    present by the LFS batch call and not sent again) and store-once behaviour are tested end to end against a local
    Hub, and no local server speaks Xet; the Hub takes LFS uploads into Xet-backed repos too and migrates them in
    the background (https://huggingface.co/docs/hub/xet/legacy-git-lfs)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = saved


def _upload(hub: Hub, plan: PushPlan, message: str, log: Callable[[str], None]) -> PushResult:
    with lfs_uploads():
        return _upload_lfs(hub, plan, message, log)


def _upload_lfs(hub: Hub, plan: PushPlan, message: str, log: Callable[[str], None]) -> PushResult:
    from huggingface_hub import CommitOperationAdd

    api, repo_id, revision = hub.api, plan.repo_id, plan.revision
    result = PushResult(plan, dry_run=False)
    if not plan.upload:
        log(f"{repo_id}: nothing to upload, {len(plan.unchanged)} file(s) unchanged")
        return result
    if plan.create_repo:
        log(f"{repo_id}: creating the {'private' if plan.private else 'public'} repo")
        hub.call("create repo", api.create_repo, repo_id, private=plan.private, exist_ok=True)
    if plan.create_branch or (plan.create_repo and revision != "main"):
        log(f"{repo_id}: creating branch {revision}")
        hub.call("create branch", api.create_branch, repo_id, branch=revision, exist_ok=True)

    if plan.stale:
        log(f"note: {repo_id} keeps {len(plan.stale)} file(s) of an earlier release that this folder no longer has "
            f"({', '.join(plan.stale[:5])}); delete them on the Hub if they should go")
    pending = list(plan.upload)
    delay = hub.backoff
    for attempt in range(hub.retries + 1):
        ops = []
        for f in pending:
            op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.local))
            op.upload_info.sha256 = bytes.fromhex(f.sha256)  # known: don't read the file again
            ops.append(op)
        # Large files one at a time: each finished object stays on the Hub even if the commit never happens.
        for f, op in zip(pending, ops):
            if f.size > REGULAR_FILE_MAX or f.path.endswith((".gguf", ".safetensors", ".bin")):
                log(f"  uploading {f.path} ({fmt_size(f.size)})")
            hub.call(f"upload {f.path}", api.preupload_lfs_files, repo_id, additions=[op], revision=revision,
                     free_memory=False)
        try:
            info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=revision)
        except Exception as err:
            if not is_transient(err) or attempt == hub.retries:
                raise
            log(f"  commit: {_short(err)}; checking what reached the Hub, retry {attempt + 1}/{hub.retries} "
                f"in {delay:g} s")
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
            remote = hub.remote_state(repo_id, revision)
            pending = [f for f in pending if not remote.same(f)]
            if not pending:  # the commit went through; only its reply was lost
                result.uploaded = [f.path for f in plan.upload]
                result.commit = hub.call("repo_info", api.repo_info, repo_id, revision=revision).sha
                log(f"{repo_id}: the commit had landed: {result.commit[:10]}")
                return result
            continue
        result.uploaded = [f.path for f in plan.upload]
        result.commit, result.url = info.oid, getattr(info, "commit_url", None)
        log(f"{repo_id}: committed {len(pending)} file(s): {result.commit[:10]}")
        return result
    raise AssertionError("unreachable")


def published_files(folder: Path) -> Iterable[Path]:
    """The files ``push`` would publish from ``folder`` (hidden paths excluded)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            yield path
