"""Write files and folders so that nothing partial is ever left at the final path, and nothing that komt-edge did
not write is ever replaced.

- Output paths are checked before any work (``check_output_dir``, ``check_output_file``, ``check_free_space``):
  a folder that is a file, an unwritable or read-only location, the kernel's /proc or /sys, or a disk without room
  for the estimated output is a one-line error before a model is read.
- An output file (``check_output_file``) is never one of the command's inputs, never anything but a regular file
  (a device such as /dev/null, a named pipe, a symbolic link: the rename would put a file in its place), and
  replaces an existing file only when komt-edge wrote it (the caller says how to tell), or with ``force``.
- Every output is first written to a hidden ``.NAME.partial-PID`` beside (or inside) its final path and renamed
  into place when complete. Interrupted by an exception, Ctrl-C, SIGTERM or SIGHUP (``komt_edge.cli`` turns those
  into ``KeyboardInterrupt``), the partial is removed. Killed with SIGKILL, it stays, and the next write into the
  same folder removes it (``remove_stale_partials``: its process is gone).
- ``atomic_dir`` records the names it wrote in a hidden ``.komt-edge-files.json``; a later run replaces those and
  only those. A folder holding anything else is refused unless ``force``, and even then only the files of the
  new output are replaced, each named in the log; nothing else in the folder is touched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import KomtError
from .util import fmt_bytes

OWNED_RECORD = ".komt-edge-files.json"
_PARTIAL = re.compile(r"^\..+\.partial-(\d+)$")


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds (or will hold) ``path``."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(_existing_ancestor(path)).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def explain_oserror(err: OSError, path: Path, *, option: str = "-o") -> KomtError:
    """The real cause of a failed write, with the fix: disk full (and how much is free), read-only, permission;
    ``option`` is the command-line option that chose the path."""
    path = Path(path)
    # numpy's tofile reports a short write on a full disk as "N requested and M written", without an errno.
    short_write = err.errno is None and "requested and" in str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or short_write:
        return KomtError(f"the disk is full while writing {path} ({fmt_bytes(free_bytes(path))} free): free some "
                         f"space or choose another {option} folder")
    if err.errno == errno.EROFS or _read_only(path):
        return KomtError(f"{_existing_ancestor(path.parent)} is on a read-only filesystem: choose a writable "
                         f"{option} folder")
    if err.errno in (errno.EACCES, errno.EPERM):
        return KomtError(f"cannot write to {path.parent}: permission denied; choose a writable {option} folder")
    return KomtError(f"cannot write {path}: {err.strerror or err}; choose a writable {option} folder")


# The kernel's pseudo filesystems: their folders look writable to root, but hold no files anyone can create.
_KERNEL_FILESYSTEMS = {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs", "pstore",
                       "bpf", "efivarfs", "fusectl", "binfmt_misc", "devpts", "mqueue"}


def _kernel_filesystem(path: Path) -> str | None:
    """The type of the kernel pseudo filesystem (proc, sysfs, ...) that holds ``path``, if it is on one (Linux)."""
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind in _KERNEL_FILESYSTEMS else None


def check_output_dir(folder: Path, *, option: str = "-o") -> Path:
    """Before any work: ``folder`` is (or can become) a writable folder. Creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KomtError(f"cannot create the output folder {folder}: it is a file; choose another {option} folder")
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise KomtError(f"cannot create the output folder {folder}: {base} is a file; choose another {option} folder")
    if _read_only(base):
        raise KomtError(f"{base} is on a read-only filesystem: choose a writable {option} folder")
    kernel = _kernel_filesystem(base)
    if kernel is not None:
        raise KomtError(f"{base} is on the kernel's {kernel} filesystem, which holds no files: choose a folder on a "
                        f"disk for {option}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise KomtError(f"cannot write to {base}: permission denied; choose a writable {option} folder")
    return folder


def _not_regular(path: Path) -> str | None:
    """What ``path`` is when it exists but is not a regular file or a folder (a symbolic link counts, whatever it
    points to: the rename that finishes a write replaces the link itself)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def _is_input(path: Path, source: Path) -> bool:
    """Whether writing ``path`` would replace ``source`` (a file) or a file inside ``source`` (a folder)."""
    source = Path(source).expanduser()
    if not source.exists():
        return False
    if source.is_dir():
        here, there = os.path.realpath(path), os.path.realpath(source)
        return path.exists() and here.startswith(there.rstrip(os.sep) + os.sep)
    try:
        return path.exists() and os.path.samefile(path, source)
    except OSError:
        return os.path.realpath(path) == os.path.realpath(source)


def check_not_an_input(path: Path, inputs: Iterable[str | Path | None], *, option: str) -> None:
    """One-line error when writing ``path`` would replace one of ``inputs`` (a file, or a file inside an input
    folder); inputs that are not local paths (Hub ids, zoo names) are skipped."""
    clash = next((Path(s) for s in inputs if s is not None and _is_input(Path(path), Path(s))), None)
    if clash is not None:
        what = "is" if not clash.is_dir() else "is a file of"
        raise KomtError(f"{option} {path} {what} an input ({clash}): komt-edge never overwrites its inputs; choose "
                        f"another {option} file")


def check_output_file(path: Path, *, option: str, inputs: Iterable[str | Path] = (), force: bool = False,
                      ours: Callable[[Path], bool] | None = None, ours_kind: str = "a file komt-edge wrote",
                      can_force: bool = True) -> Path:
    """Before any work: ``path`` can be written as a file, and komt-edge may replace what is there.

    Never a folder; its folder exists or can be created, on a disk (see ``check_output_dir``). Never one of
    ``inputs`` (a file, or a file inside an input folder), even with ``force``. Never anything but a regular file:
    /dev/null, a named pipe or a symbolic link would be replaced by a file. An existing file only when it is
    empty (``--json "$(mktemp)"``: nothing to lose), when ``ours(path)`` says it is ``ours_kind``, what komt-edge
    wrote there before (a re-run replaces it), or with ``force`` (``can_force``: whether the command has --force,
    for the message)."""
    path = Path(path)
    kind = _not_regular(path)
    if kind is not None:
        raise KomtError(f"{option} {path} is {kind}, not a regular file: komt-edge writes a new file and renames it "
                        "into place, which would replace it; give the path of a regular file")
    if path.is_dir():
        raise KomtError(f"{option} {path} is a folder: give a file name, e.g. {path / 'report.json'}")
    check_not_an_input(path, inputs, option=option)
    check_output_dir(path.parent, option=option)
    if path.exists() and path.stat().st_size > 0 and ours is not None and not force and not ours(path):
        fix = "choose another file, or pass --force to replace it" if can_force else "choose another file"
        raise KomtError(f"{option} {path} exists and is not {ours_kind}: {fix}")
    return path


JSON_REPORT = "a JSON report (the only file --json replaces)"


def file_state(path: Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime in ns) of ``path``, or None when there is nothing: what tells, at the end of a
    run, whether something wrote the path since it was checked (the run's own outputs)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


# On every JSON report komt-edge writes: the sha256 of its bytes, in an extended attribute of the file itself (it
# goes with the file through the atomic rename, and an edit in place no longer matches it).
REPORT_MARK = "user.komt-edge.report"


def write_json_report(path: Path, text: str, *, option: str = "--json") -> None:
    """Write a JSON report atomically, marked as komt-edge's (:func:`holds_json`)."""
    import hashlib

    with atomic_file(path, option=option) as tmp:
        tmp.write_text(text, encoding="utf-8")
        with contextlib.suppress(OSError):  # a file system without user extended attributes: see holds_json
            os.setxattr(tmp, REPORT_MARK, hashlib.sha256(tmp.read_bytes()).hexdigest().encode())


def holds_json(path: Path, *, limit: int = 256 * 1024 * 1024) -> bool:
    """Whether ``path`` is a JSON report komt-edge wrote (a re-run replaces it): its mark matches its bytes. A user's
    own JSON file (a package.json, a config) has no mark and is not replaced without --force. On a file system
    without user extended attributes, where no mark can be written, any one JSON document counts."""
    import hashlib

    try:
        if Path(path).stat().st_size > limit:
            return False
        data = Path(path).read_bytes()
        try:
            return os.getxattr(path, REPORT_MARK) == hashlib.sha256(data).hexdigest().encode()
        except OSError as err:
            if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return False  # no mark (ENODATA): not ours
        json.loads(data.decode("utf-8"))
    except (OSError, ValueError):
        return False
    return True


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before any work when the disk holding ``folder`` has less room than the estimated ``needed`` bytes."""
    free = free_bytes(folder)
    if needed > free:
        raise KomtError(f"{what} needs about {fmt_bytes(needed)} but the disk holding {folder} has "
                        f"{fmt_bytes(free)} free: free some space or choose another -o folder")


def ensure_writable_dir(folder: Path, *, option: str = "-o") -> Path:
    """Create ``folder`` if needed and check that files can be created in it."""
    folder = check_output_dir(folder, option=option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno == errno.EROFS:
            raise explain_oserror(err, folder / "x") from None
        raise KomtError(f"cannot create the output folder {folder}: {err.strerror or err}; "
                        f"choose a writable {option} folder") from None
    remove_stale_partials(folder)
    return folder


@contextlib.contextmanager
def output_dir(folder: Path, *, option: str = "-o") -> Iterator[Path]:
    """``ensure_writable_dir`` for the duration of a block; a folder it created is removed again when the block
    fails (an exception, Ctrl-C, SIGTERM) and left nothing in it."""
    folder = Path(folder)
    created = not folder.exists()
    ensure_writable_dir(folder, option=option)
    try:
        yield folder
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(folder: Path, name: str | None = None) -> list[Path]:
    """Remove ``.NAME.partial-PID`` leftovers of processes that no longer run (a SIGKILL, a power cut).

    Only hidden partials whose process is gone are touched; ``name`` limits it to one output's partials."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _PARTIAL.match(p.name)
        if not m or (name is not None and not p.name.startswith(f".{name}.partial-")):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _absolute(path: Path) -> Path:
    """An absolute path with a real last component (``.`` and ``..`` resolved), so that it has a name."""
    return Path(os.path.abspath(path))


@contextlib.contextmanager
def atomic_file(final: Path, *, option: str = "-o") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds. ``option`` is the
    command-line option that chose ``final``, for the message of a failed write."""
    final = _absolute(final)
    remove_stale_partials(final.parent, final.name)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise explain_oserror(err, final, option=option) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def owned_files(folder: Path) -> set[str] | None:
    """The names komt-edge wrote into ``folder`` (its hidden record), or None when it holds no such record."""
    record = Path(folder) / OWNED_RECORD
    try:
        return set(json.loads(record.read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_dir_target(final: Path, *, force: bool = False, owned_if: Iterable[str] = (),
                     option: str = "-o") -> list[str]:
    """Before any work: may an output folder be written at ``final``? Returns the foreign names ``force`` lets
    the output replace. A non-empty folder is accepted when komt-edge wrote it (its hidden record, or one of
    ``owned_if``, the stage's own provenance file), or with ``force``."""
    final = Path(final)
    check_output_dir(final, option=option)
    if not final.is_dir():
        return []
    entries = sorted(p.name for p in final.iterdir() if not _PARTIAL.match(p.name) and p.name != OWNED_RECORD)
    ours = owned_files(final)
    if not entries or ours is not None or any((final / n).is_file() for n in owned_if):
        return []
    if not force:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise KomtError(f"{option} {final} already exists and holds files komt-edge did not write ({shown}): choose "
                        "a new folder, or pass --force to write into it (only the output's own files are replaced)")
    return entries


@contextlib.contextmanager
def atomic_dir(final: Path, *, force: bool = False, owned_if: Iterable[str] = (),
               log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder; when the block succeeds its files become ``final``'s.

    A new ``final`` appears whole, by one rename. An existing one (see ``check_dir_target``) gets the new files
    each by a rename; files of komt-edge's previous output that the new one lacks are removed; anything else
    stays untouched."""
    final = _absolute(final)
    owned_if = tuple(owned_if)
    foreign = set(check_dir_target(final, force=force, owned_if=owned_if))
    existed = final.is_dir()
    ensure_writable_dir(final if existed else final.parent)
    home = final if existed else final.parent
    remove_stale_partials(home, final.name)
    tmp = home / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir())
        (tmp / OWNED_RECORD).write_text(json.dumps({"files": names}, indent=1) + "\n", encoding="utf-8")
        if not existed:
            os.replace(tmp, final)
            return
        previous = owned_files(final) or set()
        replaced = sorted(foreign & set(names))
        if replaced and log:
            log(f"--force: replacing {', '.join(replaced)} in {final}")
        for name in [*names, OWNED_RECORD]:
            target = final / name
            if (target.is_dir() and not target.is_symlink()) and (name in previous or name in foreign):
                shutil.rmtree(target)
            os.replace(tmp / name, target)
        for stale in sorted(previous - set(names)):
            p = final / stale
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        tmp.rmdir()
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise explain_oserror(err, final / "x") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
