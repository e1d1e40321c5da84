"""Write files and folders so that nothing partial is ever left at the final path."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import KomtError


def _explain_oserror(err: OSError, path: Path) -> KomtError:
    if err.errno == errno.ENOSPC:
        return KomtError(f"no space left on the device while writing {path}: free some space or choose another -o folder")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return KomtError(f"cannot write to {path.parent}: permission denied; choose a writable -o folder")
    return KomtError(f"cannot write {path}: {err.strerror or err}; choose a writable -o folder")


def ensure_writable_dir(folder: Path) -> Path:
    """Create ``folder`` if needed and check that files can be created in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KomtError(f"cannot create the output folder {folder}: {err.strerror or err}; "
                        "choose a writable -o folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KomtError(f"cannot write to {folder}: permission denied; choose a writable -o folder")
    return folder


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _explain_oserror(err, final) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; it replaces ``final`` only if the block succeeds."""
    final = Path(final)
    ensure_writable_dir(final.parent if str(final.parent) else Path("."))
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain_oserror(err, final) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
