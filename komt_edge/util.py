"""Small facts every stage needs, written once: file hashes, installed versions, human sizes, a user's text files.

Depends only on ``errors``; every other module may import it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib.util import find_spec
from pathlib import Path

from .errors import KomtError

HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | Path, chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file, read in chunks (a 7 GB GGUF never sits in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """Hex sha256 of a JSON-able object, independent of key order (for recorded inputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dist_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (``komt-edge`` included), or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    if dist == "komt-edge":
        from . import __version__

        return __version__
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def dist_versions(*dists: str) -> dict[str, str]:
    """Python's version and those of ``dists`` that are installed: what a result file records."""
    found = {"python": sys.version.split()[0]}
    for dist in dists:
        if (v := dist_version(dist)) is not None:
            found[dist] = v
    return found


def fmt_size(n: float) -> str:
    """Decimal units, as the Hub shows file sizes: 19.4 MB."""
    return _fmt(n, 1000, ("B", "kB", "MB", "GB", "TB"))


def fmt_bytes(n: float) -> str:
    """Binary units, as df -h and free: 3.2 GiB."""
    return _fmt(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))


def _fmt(n: float, base: int, units: tuple[str, ...]) -> str:
    for unit in units:
        if abs(n) < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == units[0] else f"{n:.1f} {unit}"
        n /= base
    raise AssertionError("unreachable")


def read_user_text(path: Path, *, missing: str, encoding: str = "utf-8", folder: str | None = None,
                   newline: str | None = None) -> str:
    """A user's text file, or a KomtError: ``folder`` (or a default) when it is a folder, ``missing`` when it is
    not a file, the byte offset when it is not UTF-8, the OS's reason when it cannot be read. ``newline`` is
    open()'s: None turns \\r\\n and \\r into \\n; "" keeps the characters as the file has them (as llama.cpp's
    ``-f`` reads a file)."""
    if path.is_dir():
        raise KomtError(folder or f"{path} is a folder, where a UTF-8 text file is expected: pass the file itself")
    if not path.is_file():
        raise KomtError(missing)
    try:
        with path.open(encoding=encoding, newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise KomtError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except OSError as err:
        raise KomtError(f"cannot read {path}: {err.strerror or err}") from None


def read_llama_cpp_text(path: Path, *, missing: str, folder: str | None = None) -> str:
    """A user's text file as llama.cpp's ``-f`` reads it (llama-perplexity, llama-imatrix), so that komt-edge and
    those tools see the same tokens: its characters as they are (Windows line ends stay ``\\r\\n``), less one
    final ``\\n``. Errors as :func:`read_user_text`'s."""
    return read_user_text(path, missing=missing, folder=folder, newline="").removesuffix("\n")


def read_json_object(path: Path, *, fix: str = "fix or re-download it") -> dict:
    """A JSON object komt-edge reads (a config.json, an adapter_config.json), or a one-line KomtError naming the
    file and what is wrong with it (not UTF-8, not JSON, not an object, unreadable) and ``fix``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise KomtError(f"{path} is not UTF-8 text (byte {err.start}): {fix}") from None
    except json.JSONDecodeError as err:
        raise KomtError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}): {fix}") from None
    except OSError as err:
        raise KomtError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise KomtError(f"{path} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


def package_dir(module: str, *, missing: str) -> Path:
    """The folder of an installed package whose data files komt-edge reads, or KomtError(``missing``)."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise KomtError(missing)
    return Path(list(spec.submodule_search_locations)[0])
