"""Atomic saves: whole or nothing, no temporary left behind, ordinary permissions; file digests."""

import hashlib
import os
import stat

import matplotlib
import pytest

from rledit.files import atomic_directory, atomic_file, file_sha256, save_figure, write_text_atomically

matplotlib.use("Agg")


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_write_text_replaces_whole_file_with_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_text_atomically(path, "first\n")
    write_text_atomically(path, "second\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert _mode(path) == 0o666 & ~mask  # not the 0600 of a bare mkstemp


def test_failure_half_way_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "stats.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(path) as temporary:
        temporary.write_bytes(b"half of the n")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.bin"]


def test_atomic_directory_replaces_an_earlier_save_but_never_a_foreign_folder(tmp_path):
    target = tmp_path / "save"
    for content in ("one", "two"):
        with atomic_directory(target, "meta.json") as folder:
            (folder / "meta.json").write_text(content)
    assert (target / "meta.json").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]

    with pytest.raises(ValueError, match="half"), atomic_directory(target, "meta.json") as folder:
        (folder / "meta.json").write_text("three")
        raise ValueError("half")
    assert (target / "meta.json").read_text() == "two"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier save"), atomic_directory(foreign, "meta.json"):
        pass
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_save_figure_writes_a_png_under_a_temporary_name_first(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "curves.png", dpi=50)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_file_sha256_reads_past_one_block(tmp_path):
    data = os.urandom((1 << 20) + 123)  # one full 1 MiB block and a short one
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
