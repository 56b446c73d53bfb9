"""Evaluation results: per-example records, summaries, and the JSON + JSONL files they are written to.

``write_results("out/run.json", result, meta)`` writes two files, each atomically (temporary file, then
``os.replace``):

* ``out/run.jsonl``: one line per example per protocol per evaluation (``after_steps`` says how many edit steps
  had been applied; 0 is the unedited model), with the scores, the texts and what the model produced;
* ``out/run.json``: the summary: protocol ids, timing, model, data, seed, package version, command line,
  timestamps, ``metrics`` (protocol id → metric → percent), ``unedited`` (the same before any edit), the
  number of examples behind each metric, and for lifelong runs the seconds per step and the retention curve.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import rledit
from rledit.files import command_line, write_text_atomically

Metrics = dict[str, dict[str, float]]  # protocol id -> metric -> percent
Counts = dict[str, dict[str, int]]  # protocol id -> metric -> number of examples behind it


def utc_now() -> str:
    """The current time as an ISO 8601 UTC timestamp."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ExampleRecord:
    """One example's scores under one protocol at one evaluation."""

    protocol: str  # protocol id, e.g. "zsre-token-acc@1"
    index: int  # the example's position among the evaluated requests (for lifelong runs: among all edits)
    scores: dict[str, float | None]  # metric -> percent; None where the example has no prompts for it
    texts: dict[str, Any]  # the request (prompt, target_new, rephrases, locality, ...)
    outputs: dict[str, Any] = field(default_factory=dict)  # what the model produced
    step: int | None = None  # the 1-based edit step that applied this example's edit, if any
    after_steps: int = 0  # how many edit steps had been applied when it was scored (0: unedited)


def summarize(records: Iterable[ExampleRecord], protocols: Sequence[str]) -> tuple[Metrics, Counts]:
    """Per protocol and metric, the mean of the per-example scores (percent) and how many examples had one."""
    totals: dict[str, dict[str, list[float]]] = {p: {} for p in protocols}
    for record in records:
        for metric, value in record.scores.items():
            if value is not None:
                totals.setdefault(record.protocol, {}).setdefault(metric, []).append(value)
    metrics = {p: {m: sum(v) / len(v) for m, v in by_metric.items()} for p, by_metric in totals.items()}
    counts = {p: {m: len(v) for m, v in by_metric.items()} for p, by_metric in totals.items()}
    return metrics, counts


@dataclass
class EvalResult:
    """The scores of one model on a set of requests under some protocols."""

    protocols: list[str]
    metrics: Metrics
    counts: Counts
    records: list[ExampleRecord]
    n_examples: int
    started_at: str
    finished_at: str


@dataclass
class CurvePoint:
    """The scores of all edits applied so far, after ``step`` steps (a point of the retention curve)."""

    step: int
    n_edits: int
    metrics: Metrics
    counts: Counts


@dataclass
class LifelongResult:
    """A lifelong editing run: the unedited floor, the edited scores per timing, and the time per step.

    ``metrics`` are the headline scores: for ``end`` every edit scored after the last step; for ``immediate``
    each edit scored right after its own step; for ``curve`` the last checkpoint (all edits, after the last step).
    """

    timing: str
    protocols: list[str]
    metrics: Metrics
    counts: Counts
    unedited: EvalResult
    records: list[ExampleRecord]
    step_seconds: list[float]
    edits_per_step: list[int]
    curve: list[CurvePoint]
    eval_every: int | None
    started_at: str
    finished_at: str
    references: Any = None  # the unedited model's locality references (rledit.eval.References)
    general: list[dict[str, Any]] = field(default_factory=list)  # probe scores: {"step", "n_edits", ...}

    @property
    def n_examples(self) -> int:
        """The number of edits in the run."""
        return sum(self.edits_per_step)

    @property
    def baseline(self) -> tuple[Any, EvalResult]:
        """(references, unedited scores): pass as ``run_lifelong(..., baseline=...)`` to reuse them."""
        return self.references, self.unedited


_COMPUTED_KEYS = ("format", "protocols", "timing", "rledit_version", "command", "started_at", "finished_at",
                  "n_examples", "metrics", "counts", "unedited", "unedited_counts", "records_file")


def summary_dict(result: EvalResult | LifelongResult, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary of ``result`` as a JSON-ready dict (``meta``: model, model_revision, data, seed, and extras)."""
    meta = dict(meta or {})
    clashes = sorted(set(meta) & set(_COMPUTED_KEYS))
    if clashes:
        raise ValueError(f"meta keys {clashes} are filled in from the result; leave them out of meta")
    lifelong = isinstance(result, LifelongResult)
    edited = not lifelong and bool(meta.get("editor"))  # a saved edited model scored as it is (rledit eval --editor)
    unedited = result.unedited if lifelong else result
    summary: dict[str, Any] = {
        "format": "rledit-eval@1",
        "protocols": list(result.protocols),
        "timing": result.timing if lifelong else ("edited" if edited else "unedited"),
        "model": meta.pop("model", None),
        "model_revision": meta.pop("model_revision", None),
        "data": meta.pop("data", None),
        "seed": meta.pop("seed", None),
        "rledit_version": rledit.__version__,
        "command": command_line(),
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "n_examples": result.n_examples,
        "metrics": result.metrics,
        "counts": result.counts,
        "unedited": None if edited else unedited.metrics,
        "unedited_counts": None if edited else unedited.counts,
    }
    if lifelong:
        summary.update({
            "n_steps": len(result.edits_per_step),
            "edits_per_step": result.edits_per_step,
            "step_seconds": result.step_seconds,
            "eval_every": result.eval_every,
            "curve": [asdict(point) for point in result.curve],
        })
    summary.update(meta)
    return summary


def write_results(path_json: str | Path, result: EvalResult | LifelongResult,
                  meta: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write the summary to ``path_json`` and the per-example records next to it (``.jsonl``); return both paths."""
    path_json = Path(path_json)
    if path_json.suffix != ".json":
        raise ValueError(f"the results path must end in .json, got {str(path_json)!r}")
    path_records = path_json.with_suffix(".jsonl")
    summary = summary_dict(result, meta)
    summary["records_file"] = path_records.name
    records = (result.unedited.records + result.records) if isinstance(result, LifelongResult) else result.records
    lines = "".join(json.dumps(asdict(record), ensure_ascii=False) + "\n" for record in records)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path_records, lines)
    write_text_atomically(path_json, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return path_json, path_records
