"""Where and how segue writes the files a user sees: one home for output checks and atomic writes.

Where: an output may not be (or hold) an input. ``Protected`` lists the files and folders a run reads (keyframes,
the checkpoint and everything inside its folder, LoRAs); every output path is refused when it resolves to
one of them (symlinks and hard links included). An output's folder must exist, or only its last level may be
missing: segue creates at most that one folder, never a chain of them.

How: a file is written under a temporary name beside its destination (``.NAME.XXXX.partSUFFIX``), flushed to
disk and renamed when whole; a folder (PNG frames) is written as a new sibling and swapped in whole, with a
marker file that lets a later run replace it. Any exception (disk full, Ctrl-C, SIGTERM raised as
``KeyboardInterrupt`` by the CLI) removes the temporary file or folder; an ``OSError`` while writing becomes
an ``OutputError`` that names the destination. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InputError, OutputError

# Written into every folder segue fills (PNG frames); a folder holding it may be replaced by a later run.
MARKER = ".segue-output"


def default_mode(base: int) -> int:
    """``base`` under the process umask: what open() or mkdir() would have given (mkstemp and mkdtemp
    make private 0600 / 0700 entries, which other users and web servers could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


# ---------------------------------------------------------------------------------------------
# Where: checks made before any work.


class Protected:
    """The files and folders a run reads; no output may replace, or be written inside, one of them."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, str]] = []  # (path as given, what it is)
        self.folders: list[tuple[Path, str]] = []

    def add(self, path: str | os.PathLike[str] | None, what: str) -> Protected:
        """Protect ``path``: a folder protects everything inside it; a missing path is ignored."""
        if path is None or not isinstance(path, (str, os.PathLike)) or not str(path):
            return self
        p = Path(path)
        if p.is_dir():
            self.folders.append((p, what))
        elif p.exists():
            self.files.append((p, what))
        return self

    def clash(self, path: Path) -> str | None:
        """Why writing ``path`` would destroy a protected file, or None."""
        target = path.resolve()
        for f, what in self.files:
            if target == f.resolve() or _same_file(path, f):
                return f"is the {what} ({f})"
        for d, what in self.folders:
            if target == d.resolve() or target.is_relative_to(d.resolve()):
                return f"is inside the {what} folder ({d})"
        return None

    def inside(self, folder: Path) -> str | None:
        """Why replacing ``folder`` whole would destroy a protected file, or None."""
        root = folder.resolve()
        for p, what in [*self.files, *self.folders]:
            r = p.resolve()
            if r == root or r.is_relative_to(root):
                return f"holds the {what} ({p})"
            if root.is_relative_to(r):
                return f"is inside the {what} folder ({p})"
        return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _probe(folder: Path, what: str, path: Path) -> None:
    """Create and remove a temporary file in ``folder``: the one sure test that it can be written (a
    read-only mount, a full quota, root's ``os.access`` saying yes to a read-only folder)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".segue-probe.", dir=folder)
    except OSError as e:
        raise InputError(f"{what} {path}: folder {folder} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def _check_parent(path: Path, what: str) -> None:
    """The folder of ``path`` exists and is writable, or only that last level is missing."""
    parent = path.parent
    if parent.exists():
        if not parent.is_dir():
            raise InputError(f"{what} {path}: {parent} is not a folder")
        _probe(parent, what, path)
        return
    grand = parent.parent
    if not grand.is_dir():
        raise InputError(
            f"{what} {path}: folder {grand} does not exist (segue creates only the last folder of an output path)"
        )
    _probe(grand, what, path)


def check_output_file(
    path: str | os.PathLike[str], what: str, protected: Protected | None = None, suffixes: Iterable[str] = ()
) -> Path:
    """Refuse an output file that is a folder or a special file, replaces a protected input, has a suffix
    not in ``suffixes`` (when given) or lies in a folder that cannot be written or created."""
    p = Path(path)
    if not str(path):
        raise InputError(f"{what}: empty path")
    suffixes = tuple(suffixes)
    if suffixes and p.suffix.lower() not in suffixes:
        raise InputError(f"{what} {p}: unknown extension {p.suffix or '(none)'!r}; use one of {', '.join(suffixes)}")
    if p.is_dir():
        raise InputError(f"{what} {p} is a folder; give a file name such as {p / ('out' + (suffixes or ('',))[0])}")
    if p.exists() and not p.is_file():
        raise InputError(f"{what} {p} exists and is not a regular file")
    why = protected.clash(p) if protected is not None else None
    if why:
        raise InputError(f"{what} {p} {why}: segue never overwrites an input; choose another name")
    _check_parent(p, what)
    return p


def check_output_folder(
    path: str | os.PathLike[str], what: str, protected: Protected | None = None, overwrite: bool = False
) -> Path:
    """Refuse a folder to be replaced whole unless it is missing, empty or written by segue (``overwrite``:
    any folder of plain files), or it holds or lies inside a protected input, or cannot be written."""
    p = Path(path)
    if not str(path):
        raise InputError(f"{what}: empty path")
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {p} exists and is not a folder")
    why = protected.inside(p) if protected is not None else None
    if why is None and protected is not None:
        why = protected.clash(p)
    if why:
        raise InputError(f"{what} {p} {why}: segue replaces this folder whole and never an input")
    if p.is_dir():
        _check_replaceable(p, what, overwrite)
    _check_parent(p.resolve(), what)
    return p


def _check_replaceable(folder: Path, what: str, overwrite: bool) -> None:
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise InputError(f"{what} {folder} cannot be read ({e.strerror})") from None
    _probe(folder, what, folder)  # a read-only folder stays as it is; its files are removed on the swap
    if not entries or (folder / MARKER).is_file():
        return
    if not overwrite:
        raise InputError(
            f"{what} {folder} is not empty and was not written by segue: give a new or empty folder, "
            "or --overwrite (overwrite=True) to replace it whole"
        )
    subfolders = [e.name for e in entries if e.is_dir() and not e.is_symlink()]
    if subfolders:
        raise InputError(f"{what} {folder} holds folders ({', '.join(sorted(subfolders)[:3])}): segue replaces "
                         "only a folder of files, even with --overwrite")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# How: atomic writes.


def _make_parent(path: Path) -> None:
    """Create the last folder of ``path``'s parent if it is missing (never more than that one level)."""
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir()
        except FileNotFoundError:
            raise OutputError(f"cannot write {path}: folder {parent.parent} does not exist") from None
        except OSError as e:
            raise OutputError(f"cannot write {path}: cannot create folder {parent} ({e.strerror})") from None


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(dest: Path, e: OSError) -> OutputError:
    reason = e.strerror or str(e) or type(e).__name__
    return OutputError(f"cannot write {dest}: {reason}; nothing was written")


@contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (same suffix); when the block ends without an exception the
    file is flushed to disk and renamed to ``dest``. On any exception the temporary file is removed."""
    dest = Path(dest)
    _make_parent(dest)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".part{dest.suffix}", dir=dest.parent)
    except OSError as e:
        raise _write_error(dest, e) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, default_mode(0o666))
        os.replace(tmp, dest)
        _fsync(dest.parent, directory=True)
    except OSError as e:
        if isinstance(e, OutputError):  # pragma: no cover - OutputError is not an OSError
            raise
        raise _write_error(dest, e) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(dest: str | os.PathLike[str], overwrite: bool = False, mark: bool = True) -> Iterator[Path]:
    """Yield a new empty sibling folder of ``dest``; when the block ends without an exception it gets
    segue's marker (``mark``), is flushed and replaces ``dest`` whole (``dest`` rechecked as in
    ``check_output_folder``: missing, empty, segue's own, or ``overwrite``). On any exception it is removed."""
    dest = Path(dest).resolve()
    _make_parent(dest)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    except OSError as e:
        raise _write_error(dest, e) from None
    old: Path | None = None
    try:
        yield staging
        if mark:
            (staging / MARKER).write_text(json.dumps({"written_by": "segue"}) + "\n")
        for f in staging.rglob("*"):
            _fsync(f, directory=f.is_dir())
        os.chmod(staging, default_mode(0o777))
        if dest.is_dir():
            _check_replaceable(dest, "folder", overwrite)
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old)  # onto an empty folder: allowed
            try:
                os.replace(staging, dest)
            except BaseException:
                os.replace(old, dest)  # put the previous folder back
                raise
        elif dest.exists():
            raise OutputError(f"cannot write {dest}: it exists and is not a folder")
        else:
            os.replace(staging, dest)
        _fsync(dest.parent, directory=True)
    except OSError as e:
        raise _write_error(dest, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
