"""A Hub-compatible HTTP server for offline tests, driven by the real huggingface_hub client.

It implements the routes huggingface_hub uses to publish a model with plain LFS (``HF_HUB_DISABLE_XET=1``):

- ``GET  /api/whoami-v2``                                    token → user, orgs and roles, token role
- ``POST /api/repos/create``                                 new repo with an initial ``.gitattributes`` commit
- ``POST /api/models/{repo}/branch/{branch}``                branch from main
- ``GET  /api/models/{repo}[/revision/{rev}]``               repo_info
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]``            list_repo_tree (recursive, LFS info)
- ``POST /api/models/{repo}/preupload/{rev}``                uploadMode lfs|regular, remote oid
- ``POST /{repo}.git/info/lfs/objects/batch``                basic or multipart transfer, no actions when present
- ``PUT  /_lfs/{repo}/{oid}[/{part}]``, ``POST …/complete``, ``POST …/verify``
- ``POST /api/models/{repo}/commit/{rev}``                   NDJSON header / file / lfsFile / deletedFile lines
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``                  downloads (hf_hub_download, snapshot_download):
                                                             X-Repo-Commit, ETag (git blob oid, or sha256 for
                                                             LFS with X-Linked-Etag/-Size), Content-Length
- gated repos (``add_repo(..., gated=True)``): 401 / 403 with ``X-Error-Code: GatedRepo``
- ``GET /api/datasets/{repo}[/revision/{rev}]``, ``…/tree/{rev}``, ``HEAD|GET /datasets/{repo}/resolve/{rev}/{path}``: datasets,
  read only, added with ``add_repo("datasets/ORG/NAME", files)``
- ``POST /api/validate-yaml``                                the Hub's model-card metadata rules for the fields
                                                             komt-edge writes (see ``validate_metadata``)

Repos live in memory; file contents are stored content-addressed under ``root/objects``. The server only listens
on 127.0.0.1, answers at most ``max_requests`` requests and shuts itself down after ``lifetime`` seconds (a fixture
that stops it at the end of its scope passes ``lifetime=None``: it lives exactly as long as that scope).

Fault injection (each knob is consumed as it fires):

- ``fail_next(n, status=503, route=None)``: the next n requests (of one route, or any) get a 5xx.
- ``drop_upload(times=1, after=…)``: an LFS PUT reads ``after`` bytes, then the connection is dropped.
- ``stall_upload(after)``: the first LFS PUT once ``after`` more objects have finished reads a little, signals
  ``stalled`` and waits for ``unstall()`` (bounded), then drops the connection: the test kills the client meanwhile.
- ``lose_commit_response(times=1)``: a commit is applied, then answered with a 500 as if the reply was lost.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.7z", "*.bin", "*.ckpt", "*.gguf", "*.h5", "*.model", "*.msgpack", "*.onnx", "*.pt",
                    "*.pth", "*.safetensors", "*.tar.*", "*.zip", "*tfevents*")
)

# --- the Hub's metadata rules, for the fields model cards use ----------------------------------------------
# https://huggingface.co/docs/hub/model-cards#model-card-metadata, /repositories-licenses, /models-tasks.
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
HUB_PIPELINE_TAGS = frozenset("""
text-generation text2text-generation text-classification token-classification question-answering
fill-mask summarization translation feature-extraction sentence-similarity zero-shot-classification
conversational image-text-to-text automatic-speech-recognition text-to-speech text-to-image
""".split())
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_LANG = re.compile(r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")
_LIBRARY = re.compile(r"^[\w.-]+$")


def parse_front_matter(content: str) -> tuple[dict | None, str | None]:
    """(metadata, error) of a README's YAML block; (None, None) when there is none."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", content, re.S)
    if not m:
        return None, None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as err:
        return None, f"Invalid YAML in README.md: {err}"
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return None, "YAML metadata must be a mapping"
    return data, None


def validate_metadata(data: dict) -> tuple[list[str], list[str]]:
    """(errors, warnings) as the Hub reports them for a model repo's README.md metadata."""
    errors, warnings = [], []

    def str_or_list(key: str, pattern: re.Pattern | None = None) -> list[str]:
        value = data.get(key)
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            errors.append(f'"{key}" must be a string or an array of strings')
            return []
        if pattern is not None:
            errors.extend(f'"{key}" contains an invalid value: {v!r}' for v in values if not pattern.match(v))
        return values

    if "license" in data:
        lic = data["license"]
        if not isinstance(lic, str) or lic not in HUB_LICENSES:
            errors.append(f'"license" must be one of the Hub\'s license identifiers, got {lic!r}')
        elif lic == "other" and not data.get("license_name"):
            warnings.append('"license_name" is recommended when "license" is "other"')
    if "license_name" in data and not (isinstance(data["license_name"], str)
                                       and re.match(r"^[a-z0-9.-]+$", data["license_name"])):
        errors.append('"license_name" must be lowercase letters, digits, "." and "-"')
    if "language" in data:
        str_or_list("language", _LANG)
    if "tags" in data:
        tags = data["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            errors.append('"tags" must be an array of strings')
    if "pipeline_tag" in data and data["pipeline_tag"] not in HUB_PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be a known task, got {data["pipeline_tag"]!r}')
    if "library_name" in data and not (isinstance(data["library_name"], str)
                                       and _LIBRARY.match(data["library_name"])):
        errors.append('"library_name" must be a library identifier')
    if "base_model" in data:
        str_or_list("base_model", _REPO_ID)
    if "base_model_relation" in data:
        if data["base_model_relation"] not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {", ".join(BASE_MODEL_RELATIONS)}')
        if "base_model" not in data:
            errors.append('"base_model_relation" requires "base_model"')
    if "datasets" in data:
        str_or_list("datasets", _REPO_ID)
    if not data:
        warnings.append("empty or missing yaml metadata in repo card")
    return errors, warnings


# --- state -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    user: str
    role: str = "write"  # token role: "write" or "read"
    orgs: dict[str, str] = field(default_factory=dict)  # org → roleInOrg (admin, write, contributor, read)


@dataclass(frozen=True)
class Entry:
    sha256: str
    size: int
    lfs: bool
    git_oid: str


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)
    gated: bool = False  # a licence-gated repo nobody here has accepted: 401 without a token, 403 with one


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class _Drop(Exception):
    """Close the connection without answering."""


class HubServer:
    def __init__(self, root: Path | None = None, *, tokens: dict[str, Token] | None = None,
                 lifetime: float | None = 600.0, max_requests: int = 5000, lfs_threshold: int = 10 * 1024 * 1024,
                 multipart_threshold: int = 8 * 1024 * 1024, chunk_size: int = 4 * 1024 * 1024):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="hub-server-"))
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "incoming").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {})
        self.lifetime, self.max_requests = lifetime, max_requests
        self.lfs_threshold, self.multipart_threshold, self.chunk_size = lfs_threshold, multipart_threshold, chunk_size
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        # What happened: (method, path, route, status); completed LFS uploads per oid; bytes received per oid.
        self.log: list[tuple[str, str, str, int]] = []
        self.uploads: dict[str, int] = {}
        self.signatures: set[str] = set()
        self.received: dict[str, int] = {}
        # Fault injection.
        self._fail: list[list] = []  # [remaining, status, route or None]
        self._drop: list[list] = []  # [remaining, after_bytes]
        self._stall_after: int | None = None
        self._lfs_puts = 0
        self._lose_commit = 0
        self.stalled = threading.Event()
        self._unstall = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        serve = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        serve.start()
        self._threads = [serve]
        self._deadline = None
        if self.lifetime is not None:  # None: the owner stops it (a fixture, at the end of its scope)
            self._deadline = threading.Timer(self.lifetime, self.stop)
            self._deadline.daemon = True
            self._deadline.start()
        return self

    def stop(self) -> None:
        self._unstall.set()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- fault injection ------------------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 503, route: str | None = None) -> None:
        with self.lock:
            self._fail.append([n, status, route])

    def drop_upload(self, times: int = 1, after: int = 1024 * 1024) -> None:
        with self.lock:
            self._drop.append([times, after])

    def stall_upload(self, after: int = 0) -> None:
        """The first LFS PUT made once ``after`` more objects have finished uploading stalls until ``unstall()``."""
        with self.lock:
            self._stall_after = sum(self.uploads.values()) + after
            self.stalled.clear()
            self._unstall.clear()

    def unstall(self) -> None:
        self._unstall.set()

    def lose_commit_response(self, times: int = 1) -> None:
        with self.lock:
            self._lose_commit += times

    # -- introspection --------------------------------------------------------------------------------------
    def head(self, repo_id: str, rev: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[rev]]

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        return {p: self.object(e.sha256) for p, e in self.head(repo_id, rev).files.items()}

    def object(self, sha256: str) -> bytes:
        return (self.root / "objects" / sha256).read_bytes()

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)

    def requests(self, route: str | None = None, method: str | None = None) -> list[tuple[str, str, str, int]]:
        with self.lock:
            return [r for r in self.log if (route is None or r[2] == route) and (method is None or r[0] == method)]

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False) -> None:
        """Create a repo with some files directly, as someone else might have."""
        with self.lock:
            self._create(repo_id, private)
            self.repos[repo_id].gated = gated
            entries = dict(self.head(repo_id).files)
            for path, data in files.items():
                entries[path] = self._store(data, lfs=self._is_lfs(repo_id, "main", path, len(data)))
                if entries[path].lfs:
                    self.repos[repo_id].lfs_objects.add(entries[path].sha256)
            self._new_commit(self.repos[repo_id], "main", "add files", entries)

    # -- helpers --------------------------------------------------------------------------------------------
    def _store(self, data: bytes, *, lfs: bool) -> Entry:
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / "objects" / sha
        if not path.exists():
            path.write_bytes(data)
        oid = git_blob_oid(lfs_pointer(sha, len(data))) if lfs else git_blob_oid(data)
        return Entry(sha, len(data), lfs, oid)

    def _create(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        self.repos[repo_id] = repo
        self._new_commit(repo, "main", "initial commit",
                         {".gitattributes": self._store(DEFAULT_GITATTRIBUTES.encode(), lfs=False)})
        return repo

    def _new_commit(self, repo: Repo, branch: str, title: str, files: dict[str, Entry]) -> Commit:
        parent = repo.branches.get(branch)
        seed = json.dumps([parent, title, len(repo.commits), sorted((p, e.sha256) for p, e in files.items())])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, dict(files))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _is_lfs(self, repo_id: str, rev: str, path: str, size: int) -> bool:
        if size >= self.lfs_threshold:
            return True
        attributes = DEFAULT_GITATTRIBUTES
        repo = self.repos.get(repo_id)
        if repo is not None and rev in repo.branches:
            entry = repo.commits[repo.branches[rev]].files.get(".gitattributes")
            if entry is not None:
                attributes = self.object(entry.sha256).decode()
        for line in attributes.splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                if _glob_match(parts[0], path.rsplit("/", 1)[-1]):
                    return True
        return False


def _glob_match(pattern: str, name: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern)


# --- HTTP --------------------------------------------------------------------------------------------------

_ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)", "create_branch"),
    ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/_lfs/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})(?:/(?P<part>\d+))?", "lfs_put"),
    ("POST", r"/_lfs/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})/complete", "lfs_complete"),
    ("POST", r"/_lfs/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify"),
    ("GET", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "dataset_tree"),
    ("GET", r"/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "dataset_info"),
    ("HEAD", r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "dataset_resolve"),
    ("GET", r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "dataset_resolve"),
    ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing -------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        route, params = "unknown", {}
        for m, pattern, name in _ROUTES:
            match = re.fullmatch(pattern, split.path)
            if m == method and match:
                route, params = name, {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                break
        status = 500
        self._consumed = False
        try:
            with hub.lock:
                if len(hub.log) >= hub.max_requests:
                    raise HTTPError(503, "request budget of the test server exhausted")
                for fault in hub._fail:
                    if fault[0] > 0 and (fault[2] is None or fault[2] == route):
                        fault[0] -= 1
                        raise HTTPError(fault[1], "injected failure")
            if route == "unknown":
                raise HTTPError(404, f"no route for {method} {split.path}")
            status = getattr(self, f"_{route}")(**params) or 200
        except HTTPError as err:
            status = err.status
            self._error(err)
        except _Drop:
            status = 0
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            with hub.lock:
                hub.log.append((method, split.path, route, status))

    def _read_body(self, limit: int | None = None) -> bytes:
        self._consumed = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(length, limit))

    def _json_body(self) -> dict:
        try:
            return json.loads(self._read_body() or b"{}")
        except json.JSONDecodeError:
            raise HTTPError(400, "invalid JSON body") from None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _json(self, data, status: int = 200, headers: dict | None = None) -> int:
        return self._send(status, json.dumps(data).encode(), headers)

    def _error(self, err: HTTPError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        # Drain what the client sent, so that keep-alive connections stay in sync.
        if self.command in ("POST", "PUT") and not self._consumed:
            try:
                self._read_body()
            except (OSError, ValueError):
                self.close_connection = True
        self._send(err.status, json.dumps({"error": err.message}).encode(), headers)

    # -- auth -----------------------------------------------------------------------------------------------
    def _token(self) -> Token | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        token = self.hub.tokens.get(auth[len("Bearer "):])
        if token is None:
            raise HTTPError(401, "Invalid credentials in Authorization header")
        return token

    def _can_write(self, namespace: str) -> bool:
        token = self._token()
        if token is None or token.role != "write":
            return False
        return namespace == token.user or token.orgs.get(namespace) in ("admin", "write", "contributor")

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        repo = self.hub.repos.get(repo_id)
        token = self._token()
        visible = repo is not None and (not repo.private or (token is not None and (
            repo_id.split("/")[0] == token.user or repo_id.split("/")[0] in token.orgs)))
        if not visible:
            raise HTTPError(404 if token else 401, "Repository not found", "RepoNotFound")
        if repo.gated and not write:
            raise HTTPError(403 if token else 401, f"Access to model {repo_id} is restricted. You must have access "
                            "to it and be authenticated to access it. Please log in.", "GatedRepo")
        if write and not self._can_write(repo_id.split("/")[0]):
            raise HTTPError(403, f"You don't have write access to {repo_id}")
        return repo

    def _rev(self, repo: Repo, rev: str) -> str:
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        raise HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # -- routes ---------------------------------------------------------------------------------------------
    def _whoami(self) -> int:
        token = self._token()
        if token is None:
            raise HTTPError(401, "Invalid credentials in Authorization header")
        return self._json({
            "type": "user", "id": hashlib.sha1(token.user.encode()).hexdigest()[:24], "name": token.user,
            "fullname": token.user,
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": role}
                     for org, role in token.orgs.items()],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": token.role}},
        })

    def _create_repo(self) -> int:
        body = self._json_body()
        name, org = body.get("name"), body.get("organization")
        token = self._token()
        if token is None:
            raise HTTPError(401, "Invalid credentials in Authorization header")
        namespace = org or token.user
        repo_id = f"{namespace}/{name}"
        if not self._can_write(namespace):
            raise HTTPError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._json({"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"},
                                  409)
            self.hub._create(repo_id, body.get("visibility") == "private" or bool(body.get("private")))
        return self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _create_branch(self, repo: str, rev: str) -> int:
        r = self._repo(repo, write=True)
        self._json_body()
        with self.hub.lock:
            if rev in r.branches:
                raise HTTPError(409, f"Reference already exists: {rev}")
            r.branches[rev] = r.branches["main"]
        return self._json({})

    def _repo_info(self, repo: str, rev: str = "main") -> int:
        r = self._repo(repo)
        commit = r.commits[self._rev(r, rev)]
        return self._json({"id": repo, "modelId": repo, "sha": commit.oid, "private": r.private,
                           "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _tree(self, repo: str, rev: str, path: str = "") -> int:
        r = self._repo(repo)
        commit = r.commits[self._rev(r, rev)]
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for p, e in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    folders.add(prefix + "/".join(parts[:i]))
            if not recursive and len(parts) > 1:
                continue
            item = {"type": "file", "oid": e.git_oid, "size": e.size, "path": p}
            if e.lfs:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
            entries.append(item)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        if prefix and not entries:
            raise HTTPError(404, f"Path {path} not found", "EntryNotFound")
        return self._json(entries)

    def _preupload(self, repo: str, rev: str) -> int:
        r = self._repo(repo, write=True)
        body = self._json_body()
        commit = r.commits[self._rev(r, rev)]
        files = []
        for f in body.get("files", []):
            lfs = f["size"] > 0 and self.hub._is_lfs(repo, unquote(rev), f["path"], int(f["size"]))
            existing = commit.files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.git_oid
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return self._json({"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, repo: str) -> int:
        r = self._repo(repo, write=True)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HTTPError(400, "only uploads are supported")
        multipart_ok = "multipart" in body.get("transfers", [])
        objects, transfer = [], "basic"
        base = f"{self.hub.url}/_lfs/{repo}"
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if oid in r.lfs_objects:
                objects.append({"oid": oid, "size": size})
                continue
            # Upload URLs are pre-signed (as S3's are): no Authorization header is sent with them.
            sig = hashlib.sha256(f"{oid}{time.time()}{id(self)}".encode()).hexdigest()[:32]
            with self.hub.lock:
                self.hub.signatures.add(sig)
            verify = {"href": f"{base}/{oid}/verify", "header": {}}
            if multipart_ok and size > self.hub.multipart_threshold:
                transfer = "multipart"
                n = -(-size // self.hub.chunk_size)
                header = {"chunk_size": str(self.hub.chunk_size)}
                header.update({f"{i:05d}": f"{base}/{oid}/{i}?sig={sig}" for i in range(1, n + 1)})
                upload = {"href": f"{base}/{oid}/complete?sig={sig}", "header": header}
            else:
                upload = {"href": f"{base}/{oid}?sig={sig}", "header": {}}
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": upload, "verify": verify}})
        return self._json({"transfer": transfer, "objects": objects, "hash_algo": "sha256"})

    def _signed(self) -> None:
        if self.query.get("sig", [""])[0] not in self.hub.signatures:
            raise HTTPError(403, "SignatureDoesNotMatch")

    def _lfs_put(self, repo: str, oid: str, part: str | None = None) -> int:
        self._signed()
        hub = self.hub
        self._consumed = True  # the body is read (or the connection dropped) below
        length = int(self.headers.get("Content-Length") or -1)
        with hub.lock:
            hub._lfs_puts += 1
            stall = hub._stall_after is not None and sum(hub.uploads.values()) >= hub._stall_after
            if stall:
                hub._stall_after = None
            drop = next((d for d in hub._drop if d[0] > 0), None)
            if drop is not None and not stall:
                drop[0] -= 1
        incoming = hub.root / "incoming" / f"{oid}.{part or 'all'}.{threading.get_ident()}"
        received = 0
        with open(incoming, "wb") as out:
            if stall:
                data = self.rfile.read(min(64 * 1024, max(length, 0)))
                received += len(data)
                with hub.lock:
                    hub.received[oid] = hub.received.get(oid, 0) + len(data)
                hub.stalled.set()
                hub._unstall.wait(timeout=120)
                raise _Drop()
            if length < 0:  # chunked transfer encoding
                data = self._read_body()
                out.write(data)
                received = len(data)
            remaining = length
            while remaining > 0:
                if drop is not None and received >= drop[1]:
                    raise _Drop()
                chunk = self.rfile.read(min(256 * 1024, remaining))
                if not chunk:
                    raise _Drop()
                out.write(chunk)
                received += len(chunk)
                remaining -= len(chunk)
                with hub.lock:
                    hub.received[oid] = hub.received.get(oid, 0) + len(chunk)
        if part is None:
            self._finish_object(repo, oid, [incoming])
            return self._send(200, b"")
        final = hub.root / "incoming" / f"{oid}.part{int(part):05d}"
        incoming.replace(final)
        etag = hashlib.md5(final.read_bytes()).hexdigest()
        return self._send(200, b"", {"ETag": f'"{etag}"'})

    def _finish_object(self, repo: str, oid: str, pieces: list[Path]) -> None:
        h, size = hashlib.sha256(), 0
        target = self.hub.root / "incoming" / f"{oid}.assembled.{threading.get_ident()}"
        with open(target, "wb") as out:
            for piece in pieces:
                data = piece.read_bytes()
                h.update(data)
                size += len(data)
                out.write(data)
        for piece in pieces:
            piece.unlink(missing_ok=True)
        if h.hexdigest() != oid:
            target.unlink()
            raise HTTPError(400, f"sha256 mismatch for {oid}")
        with self.hub.lock:
            target.replace(self.hub.root / "objects" / oid)
            self.hub.repos[repo].lfs_objects.add(oid)
            self.hub.uploads[oid] = self.hub.uploads.get(oid, 0) + 1

    def _lfs_complete(self, repo: str, oid: str) -> int:
        self._signed()
        body = self._json_body()
        parts = sorted(body.get("parts", []), key=lambda p: p["partNumber"])
        pieces = [self.hub.root / "incoming" / f"{oid}.part{p['partNumber']:05d}" for p in parts]
        missing = [p.name for p in pieces if not p.exists()]
        if missing or body.get("oid") != oid:
            raise HTTPError(400, f"multipart completion for {oid}: missing parts {missing}")
        self._finish_object(repo, oid, pieces)
        return self._json({})

    def _lfs_verify(self, repo: str, oid: str) -> int:
        r = self._repo(repo, write=True)
        body = self._json_body()
        path = self.hub.root / "objects" / oid
        if oid not in r.lfs_objects or not path.exists() or path.stat().st_size != int(body.get("size", -1)):
            raise HTTPError(404, f"object {oid} not found")
        return self._json({})

    def _validate_yaml(self) -> int:
        body = self._json_body()
        data, error = parse_front_matter(body.get("content", ""))
        if error:
            return self._json({"errors": [{"message": error}], "warnings": []}, 400)
        errors, warnings = validate_metadata(data or {})
        return self._json({"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]},
                          400 if errors else 200)

    def _commit(self, repo: str, rev: str) -> int:
        r = self._repo(repo, write=True)
        hub = self.hub
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HTTPError(400, "the first line must be the commit header")
        header = lines[0]["value"]
        with hub.lock:
            branch = unquote(rev)
            if branch not in r.branches:
                raise HTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = r.branches[branch]
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise HTTPError(412, "parent commit is not the head of the branch")
            files = dict(r.commits[parent].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    if value["path"] == "README.md":
                        meta, error = parse_front_matter(data.decode("utf-8"))
                        errors = [error] if error else validate_metadata(meta or {})[0]
                        if errors:
                            raise HTTPError(400, "Invalid metadata in README.md: " + "; ".join(errors))
                    files[value["path"]] = hub._store(data, lfs=False)
                elif key == "lfsFile":
                    oid = value["oid"]
                    path = hub.root / "objects" / oid
                    if oid not in r.lfs_objects or not path.exists():
                        raise HTTPError(422, f"LFS object {oid} of {value['path']} was never uploaded")
                    size = path.stat().st_size
                    files[value["path"]] = Entry(oid, size, True, git_blob_oid(lfs_pointer(oid, size)))
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    raise HTTPError(400, f"unknown commit operation {key}")
            commit = hub._new_commit(r, branch, header.get("summary", ""), files)
            lose = hub._lose_commit > 0
            if lose:
                hub._lose_commit -= 1
        if lose:
            raise HTTPError(500, "Internal Error (the commit was applied; injected lost response)")
        return self._json({"success": True, "commitOid": commit.oid,
                           "commitUrl": f"{hub.url}/{repo}/commit/{commit.oid}", "pullRequestUrl": None})

    # Datasets (read only): stored as "datasets/ORG/NAME" (``add_repo("datasets/ORG/NAME", ...)``).
    def _dataset_info(self, repo: str, rev: str = "main") -> int:
        return self._repo_info("datasets/" + repo, rev)

    def _dataset_tree(self, repo: str, rev: str, path: str = "") -> int:
        return self._tree("datasets/" + repo, rev, path)

    def _dataset_resolve(self, repo: str, rev: str, path: str) -> int:
        return self._resolve("datasets/" + repo, rev, path)

    def _resolve(self, repo: str, rev: str, path: str) -> int:
        r = self._repo(repo)
        oid = self._rev(r, rev)
        entry = r.commits[oid].files.get(path)
        if entry is None:
            raise HTTPError(404, "Entry not found", "EntryNotFound")
        data = self.hub.object(entry.sha256) if self.command == "GET" else b""
        headers = {"X-Repo-Commit": oid, "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"',
                   "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        if self.command == "HEAD":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(entry.size))
            self.end_headers()
            return 200
        return self._send(200, data, headers, content_type="application/octet-stream")


# --- pytest wiring -----------------------------------------------------------------------------------------

TOKEN = "hf_komtEdgeTestSecretTokenDoNotLeak0123"  # write: alice, member (write) of komt-test, reader of readers
READ_TOKEN = "hf_komtEdgeReadOnlyTokenDoNotLeak4567"  # read-only token of bob
ORG = "komt-test"


def configure_client(monkeypatch, url: str, token: str | None, home: Path) -> None:
    """Point the real huggingface_hub client at the test server (also the settings it read at import time)."""
    from huggingface_hub import constants

    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))


def client_env(url: str, token: str | None, home: Path) -> dict[str, str]:
    """Environment for a komt-edge subprocess talking to the test server."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")}
    env.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), PYTHONUNBUFFERED="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def new_server(root: Path, **kwargs) -> HubServer:
    tokens = {TOKEN: Token("alice", orgs={ORG: "write", "readers": "read"}),
              READ_TOKEN: Token("bob", role="read", orgs={ORG: "write"})}
    return HubServer(root, tokens=tokens, **kwargs).start()


def assert_no_token(*, texts: tuple[str, ...] = (), folders: tuple[Path, ...] = ()) -> None:
    """Neither token appears in any text nor in any file under the folders."""
    for secret in (TOKEN, READ_TOKEN):
        for text in texts:
            assert secret not in text, "a Hub token appeared in the output"
        for folder in folders:
            for path in Path(folder).rglob("*"):
                if path.is_file() and not path.is_symlink():
                    assert secret.encode() not in path.read_bytes(), f"a Hub token was written to {path}"


try:
    import pytest

    @pytest.fixture
    def hub(tmp_path, monkeypatch):
        """A fresh Hub on 127.0.0.1 and the real huggingface_hub client pointed at it (HF_TOKEN = TOKEN)."""
        server = new_server(tmp_path / "hub-storage", multipart_threshold=4 * 1024 * 1024, chunk_size=2 * 1024 * 1024,
                            lifetime=None)
        configure_client(monkeypatch, server.url, TOKEN, tmp_path / "hf-home")
        try:
            yield server
        finally:
            server.stop()
except ImportError:  # used outside pytest
    pass
