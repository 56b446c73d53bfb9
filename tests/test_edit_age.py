"""benchmarks/edit_age.py: scores grouped by the step an edit was made at, from a bench run's per-request file."""

import json
from pathlib import Path

import pytest


@pytest.fixture
def edit_age(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import edit_age

    return edit_age


def _records(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(step, after, efficacy, generalization, relation=None, protocol="zsre-token-acc@2"):
    scores = {"efficacy": efficacy, "generalization": generalization, "locality": 100.0,
              "relation_locality": relation}
    return {"protocol": protocol, "index": step, "step": step, "after_steps": after, "scores": scores}


def test_blocks_of_an_end_run_and_of_an_immediate_run(edit_age, tmp_path):
    end = _records(tmp_path / "end.jsonl", [
        _row(1, 0, 0.0, 0.0),  # the unedited model's scores: left out
        _row(1, 4, 100.0, 0.0, 50.0), _row(2, 4, 0.0, 100.0), _row(3, 4, 100.0, 100.0), _row(4, 4, 100.0, 50.0),
        _row(4, 4, 0.0, 0.0, protocol="zsre-token-acc@1"),  # another protocol: left out
    ])
    rows = edit_age.block_means(end, "zsre-token-acc@2", block=2)
    assert [(r["after_steps"], r["steps"], r["edits"]) for r in rows] == [(4, [1, 2], 2), (4, [3, 4], 2)]
    assert (rows[0]["efficacy"], rows[0]["generalization"], rows[1]["generalization"]) == (50.0, 50.0, 75.0)
    assert rows[0]["relation_locality"] == 50.0 and "relation_locality" not in rows[1]  # only where present
    immediate = _records(tmp_path / "immediate.jsonl", [_row(s, s, 100.0, 10.0 * s) for s in (1, 2, 3, 4)])
    rows = edit_age.block_means(immediate, "zsre-token-acc@2", block=2)
    assert [(r["after_steps"], r["generalization"]) for r in rows] == [(edit_age.AS_APPLIED, 15.0),
                                                                       (edit_age.AS_APPLIED, 35.0)]
    table = edit_age.markdown({"end": edit_age.block_means(end, "zsre-token-acc@2", 2), "immediate": rows},
                              "zsre-token-acc@2", "cmd")
    assert "| its own | 1-2 | 2 |" in table and "| 4 | 3-4 | 2 | 100.0 | 75.0 | 100.0 |  |" in table
    figure = edit_age.plot({"immediate": rows}, "generalization", tmp_path / "age.png")
    assert figure is None or figure.stat().st_size > 0  # None: no matplotlib
    with pytest.raises(SystemExit, match="no edited records"):
        edit_age.block_means(end, "cf-prob@1", block=2)
