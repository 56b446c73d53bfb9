"""The ``rledit`` command line: ``eval`` writes an honest summary, ``demo`` edits the real model."""

import hashlib
import json
from pathlib import Path

import pytest

from rledit.cli import main

DATA = Path(__file__).parent / "data"


def test_eval_writes_summary_with_every_metric(tiny_folder, tmp_path, capsys):
    out = tmp_path / "res" / "unedited.json"
    code = main(["eval", "--model", str(tiny_folder), "--data", str(DATA / "zsre_rledit.jsonl"),
                 "--limit", "3", "--out", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["timing"] == "unedited" and summary["n_examples"] == 3
    assert summary["model"] == str(tiny_folder) and summary["data"]["file"].endswith("zsre_rledit.jsonl")
    assert summary["data"]["sha256"] == hashlib.sha256((DATA / "zsre_rledit.jsonl").read_bytes()).hexdigest()
    token = summary["metrics"]["zsre-token-acc@2"]
    assert set(token) >= {"efficacy", "generalization", "locality", "specificity"}
    assert token["locality"] == 100.0  # the unedited model agrees with itself
    assert all(0.0 <= v <= 100.0 for v in token.values())
    records = out.with_suffix(".jsonl").read_text().splitlines()
    assert len(records) == 3 * len(summary["protocols"])
    assert "zsre-token-acc@2" in capsys.readouterr().out


def test_eval_on_counterfact_reports_neighborhood(tiny_folder, tmp_path):
    out = tmp_path / "cf.json"
    assert main(["eval", "--model", str(tiny_folder), "--data", str(DATA / "counterfact_rome.json"),
                 "--limit", "2", "--protocols", "cf-prob@1", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert list(metrics) == ["cf-prob@1"]
    assert {"efficacy", "generalization", "neighborhood"} <= set(metrics["cf-prob@1"])


def test_bad_data_path_is_a_clear_error_and_writes_nothing(tiny_folder, tmp_path, capsys):
    out = tmp_path / "never.json"
    code = main(["eval", "--model", str(tiny_folder), "--data", str(tmp_path / "missing.json"), "--out", str(out)])
    assert code == 1 and not out.exists()
    assert "missing.json" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_scores_20_zsre_records_on_smollm2(tmp_path):
    out = tmp_path / "smol.json"
    assert main(["eval", "--model", "smollm2-135m", "--data", "zsre", "--limit", "20",
                 "--protocols", "zsre-token-acc@1", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    token = summary["metrics"]["zsre-token-acc@1"]
    assert summary["model_revision"] == "sha256:b179c9523d0e"
    assert token["locality"] == 100.0
    assert token["efficacy"] < 40.0  # the new targets are mostly unknown to the unedited model
    assert summary["counts"]["zsre-token-acc@1"]["efficacy"] == 20


@pytest.mark.slow
def test_demo_edits_smollm2_and_prints_before_after(capsys):
    assert main(["demo", "--edits", "4"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in ("efficacy", "generalization", "locality")}
    before, after = float(rows["efficacy"][0]), float(rows["efficacy"][1])
    assert after > before + 20.0


def test_cli_dtype_choices_are_the_loader_dtypes():
    """The CLI lists the dtype names without importing torch; they must be exactly the loader's."""
    from rledit.cli import DTYPE_NAMES
    from rledit.models import DTYPES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)
