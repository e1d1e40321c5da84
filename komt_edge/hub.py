"""The Hugging Face Hub as every stage meets it: what a Hub id is, whether the Hub can be reached, what a failed
call means, and downloads with their errors as one-line messages. Uploads (:mod:`komt_edge.push`) build on it.

Everything goes through huggingface_hub (its cache, ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, progress
bars); nothing here prints or stores a token."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Iterator

from .errors import KomtError

PROBE_TIMEOUT = 5.0  # seconds for the one connection attempt that tells a reachable Hub from an unreachable one
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(text: str) -> bool:
    """``ORG/NAME`` as the Hub spells repo ids, and not a path on this machine: the one rule for "is MODEL (or an
    adapter, or a base) on the Hub?"."""
    return (_HUB_ID.fullmatch(text) is not None and not text.startswith((".", "/", "~"))
            and not Path(text).expanduser().exists())


def endpoint() -> str:
    """The Hub's base URL, as huggingface_hub resolves it (``HF_ENDPOINT`` first)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


# --- is it reachable, and what did a failed call mean --------------------------------------------------------

def probe(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """One short TCP connection to the Hub's host: None when it answers, else why not (refused, unknown host,
    timed out). Seconds at most, where a refused or unresolvable Hub would otherwise cost retries."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"the host {parts.hostname!r} cannot be resolved"
    except ConnectionRefusedError:
        return "connection refused"
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return err.strerror or str(err)


def unreachable_message(url: str, reason: str) -> str:
    where = " (HF_ENDPOINT)" if os.environ.get("HF_ENDPOINT") else ""
    return f"cannot reach the Hub at {url}{where}: {reason}; check the network" + (" or HF_ENDPOINT" if where else "")


def status_of(err: BaseException) -> int | None:
    """The HTTP status of an error that carries a response, else None."""
    return getattr(getattr(err, "response", None), "status_code", None)


def _http_types(*names: str) -> list[type[BaseException]]:
    """Exception classes of the HTTP clients huggingface_hub may use, by name (whichever are installed)."""
    types = []
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        types += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return types


def _unreachable_types() -> tuple[type[BaseException], ...]:
    # No connection at all (refused, unresolvable host, no route): retrying will not help, so fail at once.
    return tuple([ConnectionRefusedError, socket.gaierror, *_http_types("ConnectError")])


def _transient_types() -> tuple[type[BaseException], ...]:
    # Timeouts and connections dropped mid-request: worth retrying with backoff.
    return tuple([ConnectionError, TimeoutError,
                  *_http_types("TimeoutException", "NetworkError", "RemoteProtocolError", "Timeout",
                               "ConnectionError")])


def causes(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the errors it was raised from (huggingface_hub wraps its HTTP client's)."""
    seen = 0
    while err is not None and seen < 6:
        yield err
        err, seen = err.__cause__ or err.__context__, seen + 1


def unreachable_cause(err: BaseException) -> BaseException | None:
    """The error in ``err``'s chain that says the Hub could not be connected to at all, else None."""
    return next((e for e in causes(err) if isinstance(e, _unreachable_types())), None)


def is_unreachable(err: BaseException) -> bool:
    """The Hub could not be connected to at all (refused, unresolvable, unroutable)."""
    return unreachable_cause(err) is not None


def is_transient(err: BaseException) -> bool:
    """5xx/408/429 answers, timeouts and dropped connections, also when huggingface_hub wrapped them; never a
    connection that could not be made (see :func:`is_unreachable`)."""
    if is_unreachable(err):
        return False
    for e in causes(err):
        status = status_of(e)
        if status is not None:
            return status in TRANSIENT_STATUS
        if isinstance(e, _transient_types()):
            return True
    return False


# --- downloads ------------------------------------------------------------------------------------------------

def snapshot(repo_id: str, patterns: list[str], *, revision: str | None = None) -> Path:
    """The files of a Hub repo matching ``patterns``, downloaded into huggingface_hub's cache (or found there)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise KomtError(f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise KomtError(f"Hub repo {repo_id} was not found (or is private): check the name, or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise KomtError(f"revision {revision!r} of {repo_id} does not exist") from None
    except LocalEntryNotFoundError:
        raise KomtError(f"could not reach the Hub for {repo_id} and it is not in the local cache: "
                        "check the network or HF_ENDPOINT, or pass a local folder") from None
    except OSError as err:  # connection errors surface as OSError subclasses
        raise KomtError(f"could not download {repo_id}: {err}") from None


def gguf_files(repo_id: str, revision: str | None) -> tuple[dict[str, int], Path | None]:
    """(file → size) of the GGUF files of a Hub repo, and None; or, when the Hub cannot be reached, those of its
    cached snapshot, and that folder."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    # One short connection first: an unreachable Hub goes to the cache in seconds, not after minutes of retries.
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else probe(constants.ENDPOINT)
    try:
        if why is None:
            tree = HfApi().list_repo_tree(repo_id, revision=revision, recursive=True)
            return {f.path: int(getattr(f, "size", 0) or 0) for f in tree if f.path.endswith(".gguf")}, None
    except GatedRepoError:
        raise KomtError(f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise KomtError(f"Hub repo {repo_id} was not found (or is private): check the name or --org, set HF_TOKEN, "
                        f"or publish it with `komt-edge release`") from None
    except RevisionNotFoundError:
        raise KomtError(f"revision {revision!r} of {repo_id} does not exist") from None
    except Exception as err:  # noqa: BLE001 — offline or unreachable: fall back to the cache below
        if not (isinstance(err, OfflineModeIsEnabled) or is_unreachable(err)):
            raise KomtError(f"could not list the files of {repo_id}: {err}") from None
        why = str(err)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.gguf"], local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        raise KomtError(f"{unreachable_message(constants.ENDPOINT, why)}, and {repo_id} is not in the local cache "
                        "(or give a GGUF file)") from None
    return {p.name: p.stat().st_size for p in folder.glob("*.gguf")}, folder


def download_files(repo_id: str, files: list[str], revision: str | None) -> Path:
    """Download ``files`` of a Hub repo (the shards of one model); the path of the first."""
    from huggingface_hub import hf_hub_download

    paths = []
    for name in files:
        try:
            paths.append(Path(hf_hub_download(repo_id, name, revision=revision)))
        except Exception as err:  # noqa: BLE001
            raise KomtError(f"could not download {name} from {repo_id}: {err}") from None
    return paths[0]
