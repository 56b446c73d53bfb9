"""Atomic saves (a file or folder appears whole under its final name, or not at all) and file digests.

Everything rledit writes (results, tables, plots, delta stores, checkpoints, cached statistics) goes through
these helpers: the content is written under a temporary name in the destination folder, then moved into place
with one ``os.replace``. A crash or an exception half-way leaves the previous version (or nothing) and no
temporary file. Files and folders get the permissions an ordinary ``open``/``mkdir`` would give them under the
process umask (a bare ``mkstemp`` would make them private to the user).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def atomic_directory(path: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` in one rename.

    An existing ``path`` is replaced only if it is empty or holds ``marker`` (an earlier save of that kind);
    anything else raises :class:`FileExistsError` before any work, so a save never overwrites foreign files.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).exists())):
        raise FileExistsError(f"{path} exists and is not an earlier save of this kind; choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield folder
        folder.chmod(0o777 & ~_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(folder, path)
            shutil.rmtree(old)
        else:
            os.replace(folder, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
