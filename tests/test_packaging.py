"""An installed wheel works on its own: it carries the data, hparams and editors it needs, and runs from any
directory (outside the source checkout, with nothing but the wheel's files)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without dependencies: they are this venv's) in a folder."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(work / "dist")], check=True, cwd=work)
    wheel = next((work / "dist").glob("rledit-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(work / "site"),
                    str(wheel)], check=True)
    return wheel, work / "site"


def _run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RLEDIT_DATA"} | {"PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_wheel_carries_the_bundled_data_hparams_and_editors(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("rledit/_shipped/data/zsre_eval.json.gz", "rledit/_shipped/data/corpus/sst2_sentences.txt.gz",
                   "rledit/_shipped/hparams/models/smollm2-135m.yaml",
                   "rledit/_shipped/hparams/experiments/train-rledit-smollm2-zsre.yaml",
                   "rledit/editors/smollm2-135m-zsre/checkpoint.safetensors"):
        assert needed in names, needed


def test_the_installed_wheel_evaluates_and_benches_outside_the_checkout(installed, tmp_path, tiny_folder):
    _, site = installed
    folder = tiny_folder
    where = _run(site, tmp_path, "-c", "import rledit, rledit.data as d, rledit.hparams as h; "
                                       "print(rledit.__file__, d.data_dir(), h.HPARAMS_DIR)")
    assert where.returncode == 0, where.stderr
    assert all(str(site) in part for part in where.stdout.split()), where.stdout
    cli = ("-c", "import sys; from rledit.cli import main; sys.exit(main(sys.argv[1:]))")
    evaluated = _run(site, tmp_path, *cli, "eval", "--model", str(folder), "--data", "zsre", "--limit", "4",
                     "--out", "unedited.json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "unedited.json").read_text())["n_examples"] == 4
    benched = _run(site, tmp_path, *cli, "bench", "--method", "rledit", "--model", str(folder), "--data", "zsre",
                   "--steps", "1", "--batch", "2", "--layers", "2", "3", "--out", "bench.json")
    assert benched.returncode == 0, benched.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["steps"] == 1
    hparams = _run(site, tmp_path, "-c", "from rledit.hparams import load_hparams; "
                   "print(load_hparams('hparams/experiments/train-rledit-smollm2-zsre.yaml').model.layers)")
    assert hparams.stdout.strip() == "[24, 25, 26, 27]", hparams.stderr
