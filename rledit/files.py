"""Atomic saves (a file or folder appears whole under its final name, or not at all) and file digests.

Everything rledit writes (results, tables, plots, delta stores, checkpoints, cached statistics) goes through
these helpers: the content is written under a temporary name in the destination folder, then moved into place
with one ``os.replace``. A crash or an exception half-way leaves the previous version (or nothing) and no
temporary file. Files and folders get the permissions an ordinary ``open``/``mkdir`` would give them under the
process umask (a bare ``mkstemp`` would make them private to the user).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the block ends without error it becomes ``path``.

    ``with atomic_file("stats.safetensors") as tmp: save_file(tensors, str(tmp))``
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


SAVE_MARKER = ".rledit-save.json"  # written into every folder rledit saves: what kind, which entries
MARKER_FORMAT = "rledit-save"
_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15)


class ForeignFolderError(FileExistsError):
    """A save was asked to replace a folder that is not provably an earlier rledit save of the same kind."""


@contextmanager
def atomic_directory(path: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one atomic swap.

    ``kind`` names what is saved ("editor", "delta-store", ...). The folder gets a marker file
    (:data:`SAVE_MARKER`) listing the kind and every entry written. An existing ``path`` is replaced only when it
    is empty or provably ours: its marker names the same kind and it holds no entry the marker does not list.
    Anything else raises :class:`ForeignFolderError` before any work, so a save never deletes foreign files.

    The replacement is one ``renameat2(RENAME_EXCHANGE)``: after a kill at any instant ``path`` holds the old
    save or the new one, never neither. What a killed save leaves next to ``path`` (hidden ``.NAME.*.tmp``
    folders) is removed by the next save to ``path``. Where the filesystem cannot exchange (not Linux, or
    no support), two renames are used; a kill between them leaves the old save in a hidden ``.NAME.*.old``
    folder, which the next save to ``path`` moves back first.
    """
    path = Path(path)
    check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_interrupted_saves(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_marker(folder, kind, entries=None)  # pending: no entry list yet
        yield folder
        _write_marker(folder, kind, entries=_entries(folder))
        _sync_tree(folder)
        folder.chmod(0o777 & ~_umask())
        if path.exists():
            check_replaceable(path, kind)  # again: it may have changed while the save was being written
            if not _exchange(folder, path):
                _replace_in_two_renames(folder, path)
        else:
            os.replace(folder, path)
    finally:
        _remove_save_folder(folder)  # the old save after an exchange, or the unfinished new one


def check_replaceable(path: Path, kind: str) -> None:
    """Raise :class:`ForeignFolderError` unless ``path`` is absent, an empty folder, or an rledit ``kind`` save
    holding only the entries its marker lists."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise ForeignFolderError(f"{path} exists and is not a folder; choose another path for the {kind} save")
    if not any(path.iterdir()):
        return
    marker = read_marker(path)
    advice = "rledit replaces only its own saves: choose another folder, or remove this one yourself"
    if marker is None:
        raise ForeignFolderError(f"{path} exists and is not an earlier rledit save (no valid {SAVE_MARKER}); "
                                 + advice)
    if marker.get("kind") != kind:
        raise ForeignFolderError(f"{path} holds an rledit {marker.get('kind')!r} save, not a {kind!r} save; "
                                 + advice)
    foreign = sorted(set(_entries(path)) - set(marker.get("entries") or []))
    if foreign:
        raise ForeignFolderError(f"{path} is an earlier {kind} save, but it also holds files rledit did not "
                                 f"write ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                                 + advice)


def read_marker(folder: Path) -> dict | None:
    """The save marker of ``folder`` as a dict, or None if it has none or it is not ours."""
    try:
        marker = json.loads((folder / SAVE_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("kind"), str):
        return None
    if marker.get("entries") is not None and not (isinstance(marker["entries"], list)
                                                  and all(isinstance(e, str) for e in marker["entries"])):
        return None
    return marker


def clean_interrupted_saves(path: Path) -> list[Path]:
    """Tidy what killed saves to ``path`` left beside it; returns the folders removed.

    A hidden ``.NAME.*.old`` folder holds the previous save when a two-rename replacement was cut: it is moved
    back to ``path`` if ``path`` is missing, else removed. A hidden ``.NAME.*.tmp`` folder is a save that did not
    finish (or the old copy after an exchange): removed when its marker is ours and the process that wrote it is
    gone. Anything else is left and reported with a warning.
    """
    removed = []
    for debris in sorted(path.parent.glob(f".{glob.escape(path.name)}.*")):
        if not debris.is_dir() or debris.is_symlink() or debris.suffix not in (".tmp", ".old"):
            continue
        previous = debris / "previous"
        if debris.suffix == ".old" and read_marker(previous) is not None:
            if not path.exists():
                os.replace(previous, path)
            shutil.rmtree(debris)
            removed.append(debris)
            continue
        marker = read_marker(debris)
        ours = marker is not None or {p.name for p in debris.iterdir()} <= {f"{SAVE_MARKER}.tmp"}
        running = marker is not None and marker.get("entries") is None and _alive(marker.get("pid"))
        if ours and not running:
            _remove_save_folder(debris)
            removed.append(debris)
        elif not ours:
            warnings.warn(f"{debris} looks like an interrupted save of {path} but is not marked as rledit's; "
                          "left as it is", stacklevel=3)
    return removed


def _remove_save_folder(folder: Path) -> None:
    """Delete a save folder of ours, its marker last: a removal cut short still carries the marker."""
    if not folder.exists():
        return
    for entry in folder.iterdir():
        if entry.name != SAVE_MARKER:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _write_marker(folder: Path, kind: str, entries: list[str] | None) -> None:
    marker = {"format": MARKER_FORMAT, "kind": kind, "pid": os.getpid(), "entries": entries}
    temporary = folder / f"{SAVE_MARKER}.tmp"
    temporary.write_text(json.dumps(marker, indent=1), encoding="utf-8")
    os.replace(temporary, folder / SAVE_MARKER)


def _entries(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (relative POSIX paths), the marker itself excluded."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            relative = (Path(root) / name).relative_to(folder).as_posix()
            if relative != SAVE_MARKER:
                found.append(relative)
    return sorted(found)


def _sync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as handle:
                os.fsync(handle.fileno())


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False when this system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(error, f"cannot swap {a} and {b}: {os.strerror(error)}")


def _replace_in_two_renames(folder: Path, path: Path) -> None:
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, old / "previous")
    os.replace(folder, path)
    _remove_save_folder(old / "previous")
    shutil.rmtree(old)


def save_figure(fig: object, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure to ``path`` (PNG) atomically and close nothing: the caller owns ``fig``."""
    path = Path(path)
    with atomic_file(path) as temporary:
        fig.savefig(temporary, dpi=dpi, format="png")  # the temporary name has no .png suffix to infer it from
    return path


def feed_file(digest, path: str | os.PathLike):
    """Update the hashlib ``digest`` with the bytes of the file at ``path`` (read in 1 MiB blocks); return it."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of the file at ``path``."""
    return feed_file(hashlib.sha256(), path).hexdigest()


class FileFormatError(ValueError):
    """A file rledit reads that is missing, unreadable, damaged or not in the expected format; names the file."""


def read_json(path: str | os.PathLike) -> Any:
    """The JSON content of ``path``; :class:`FileFormatError` (naming the file) if it cannot be read as JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FileFormatError(f"{path} is missing") from exc
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else exc
        raise FileFormatError(f"{path} cannot be read as JSON: {reason}") from exc


def read_safetensors(path: str | os.PathLike, sha256: str | None = None) -> dict:
    """The tensors of the safetensors file ``path`` (CPU), after checking its ``sha256`` when one is given.

    A missing, garbled or corrupted file raises :class:`FileFormatError` naming it; no pickle is involved.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} is missing")
    if sha256 is not None and file_sha256(path) != sha256:
        raise FileFormatError(f"{path} does not match its recorded sha256: the file is corrupted or was changed")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types (SafetensorError, ...) for garbled files
        raise FileFormatError(f"{path} is not a readable safetensors file: {exc}") from exc


def command_line() -> str:
    """The command this process was started with, as a shell line to record in what it writes (``rledit ...``
    for the console script, whatever folder it was installed in; ``python script.py ...`` for a script; the
    interpreter's argv otherwise)."""
    if Path(sys.argv[0]).name == "rledit":
        return shlex.join(["rledit", *sys.argv[1:]])
    if sys.argv[0].endswith(".py"):
        return shlex.join(["python", *sys.argv])
    return shlex.join(sys.argv)
