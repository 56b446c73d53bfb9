"""Atomic saves: whole or nothing, no temporary left behind, ordinary permissions; file digests."""

import hashlib
import itertools
import json
import multiprocessing
import os
import random
import signal
import stat
import time
from pathlib import Path

import matplotlib
import pytest
import torch

from rledit.files import (
    SAVE_MARKER,
    FileFormatError,
    ForeignFolderError,
    atomic_directory,
    atomic_file,
    command_line,
    file_sha256,
    read_json,
    read_safetensors,
    save_figure,
    write_text_atomically,
)

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
        with atomic_directory(target, "test") as folder:
            (folder / "meta.json").write_text(content)
    assert (target / "meta.json").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]

    with pytest.raises(ValueError, match="half"), atomic_directory(target, "test") as folder:
        (folder / "meta.json").write_text("three")
        raise ValueError("half")
    assert (target / "meta.json").read_text() == "two"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier rledit save"), atomic_directory(foreign, "test"):
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


@pytest.mark.parametrize("argv, recorded", [
    (["/opt/venv/bin/rledit", "bench", "--label", "a b"], "rledit bench --label 'a b'"),
    (["benchmarks/passes_cost.py", "--steps", "5"], "python benchmarks/passes_cost.py --steps 5"),
    (["-c"], "-c"),
])
def test_command_line_records_a_line_that_runs_again(monkeypatch, argv, recorded):
    monkeypatch.setattr("sys.argv", argv)
    assert command_line() == recorded


def _save(path, version, kind="test"):
    """A two-file save whose files must agree: a reader can tell a whole save from a torn one."""
    with atomic_directory(path, kind) as folder:
        (folder / "a.txt").write_text(version)
        (folder / "sub").mkdir()
        (folder / "sub" / "b.txt").write_text(version)


def _whole_save(path):
    a, b = (path / "a.txt").read_text(), (path / "sub" / "b.txt").read_text()
    assert a == b, "torn save"
    return a


def test_a_save_of_ours_with_a_foreign_file_or_of_another_kind_is_never_replaced(tmp_path):
    target = tmp_path / "save"
    _save(target, "one")
    marker = json.loads((target / SAVE_MARKER).read_text())
    assert marker["kind"] == "test" and marker["entries"] == ["a.txt", "sub", "sub/b.txt"]
    (target / "sub" / "notes.md").write_text("mine")
    with pytest.raises(ForeignFolderError, match="sub/notes.md"):
        _save(target, "two")
    assert _whole_save(target) == "one" and (target / "sub" / "notes.md").read_text() == "mine"
    (target / "sub" / "notes.md").unlink()
    with pytest.raises(ForeignFolderError, match="holds an rledit 'test' save, not a 'editor' save"):
        _save(target, "two", kind="editor")
    (target / SAVE_MARKER).write_text('{"format": "something else"}')
    with pytest.raises(ForeignFolderError, match="no valid"):
        _save(target, "two")
    assert _whole_save(target) == "one"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ForeignFolderError, match="not a folder"):
        _save(tmp_path / "file", "two")


def _killed_save(path, version, where):
    """In a forked child: save ``version`` to ``path`` and die with os._exit (no cleanup, like kill -9) at the
    point ``where``."""
    from rledit import files

    def die(*_args, **_kwargs):
        os._exit(9)

    points = {"after mkdtemp": (files, "_write_marker"), "before the swap": (files, "_exchange")}
    if where == "writing":
        with atomic_directory(path, "test") as folder:
            (folder / "a.txt").write_text(version)
            os._exit(9)
    elif where == "after the swap":
        real = files._exchange

        def swap_then_die(a, b):
            real(a, b)
            os._exit(9)

        files._exchange = swap_then_die
    elif where == "between two renames":
        files._exchange = lambda a, b: False
        real_replace = os.replace

        def replace_then_die(a, b):
            real_replace(a, b)
            if Path(a) == path:  # the old save has just moved aside; the new one is not in place yet
                os._exit(9)

        files.os.replace = replace_then_die
    else:
        module, name = points[where]
        setattr(module, name, die)
    _save(path, version)
    os._exit(0)


@pytest.mark.parametrize("where", ["after mkdtemp", "writing", "before the swap", "after the swap",
                                   "between two renames"])
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_save_and_the_next_save_tidies_up(tmp_path, where):
    target = tmp_path / "save"
    _save(target, "old")
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_killed_save, args=(target, "new", where))
    child.start()
    child.join()
    assert child.exitcode == 9
    if where == "between two renames":  # the one window without an atomic exchange: recovered by the next save
        assert not target.exists()
    else:
        assert _whole_save(target) == ("new" if where == "after the swap" else "old")
    assert len(list(tmp_path.iterdir())) == 2  # the save (or its hidden old copy) and the killed save's debris
    _save(target, "next")
    assert _whole_save(target) == "next"
    assert [p.name for p in tmp_path.iterdir()] == ["save"]


def _save_forever(path):
    for i in itertools.count():
        _save(path, f"v{i}")


def test_random_kills_during_repeated_saves_never_leave_a_torn_or_missing_save(tmp_path):
    target = tmp_path / "save"
    _save(target, "first")
    context = multiprocessing.get_context("fork")
    generator = random.Random(0)
    for _ in range(20):
        child = context.Process(target=_save_forever, args=(target,))
        child.start()
        time.sleep(generator.uniform(0.005, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        _whole_save(target)  # present and whole after every kill
    _save(target, "last")
    assert _whole_save(target) == "last"
    assert [p.name for p in tmp_path.iterdir()] == ["save"]


def test_read_json_and_read_safetensors_name_the_file_on_every_kind_of_damage(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(FileFormatError, match="deep.json .*nested too deeply"):
        read_json(tmp_path / "deep.json")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(FileFormatError, match="bad.json cannot be read"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(FileFormatError, match="missing"):
        read_json(tmp_path / "absent.json")
    save_file({"x": torch.ones(3)}, str(tmp_path / "t.safetensors"))
    digest = file_sha256(tmp_path / "t.safetensors")
    assert read_safetensors(tmp_path / "t.safetensors", digest)["x"].sum() == 3
    data = bytearray((tmp_path / "t.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "t.safetensors").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="does not match its recorded sha256"):
        read_safetensors(tmp_path / "t.safetensors", digest)
    (tmp_path / "t.safetensors").write_bytes(b"garbage")
    with pytest.raises(FileFormatError, match="not a readable safetensors"):
        read_safetensors(tmp_path / "t.safetensors")
