"""Scoring a model once (:func:`evaluate`) and scoring a lifelong editing run (:func:`run_lifelong`).

Timings (EVALUATION.md):

* ``end``: apply all steps, then score every edit once (the headline number);
* ``immediate``: score each step's edits right after that step;
* ``curve``: every ``eval_every`` steps (and after the last) score all edits applied so far.

In every timing the unedited model's locality references, and its scores on all the edits, are computed once
before the first edit; locality never compares against an already-edited model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rledit.eval.forced import shared_predictions
from rledit.eval.protocols import Protocol, References, resolve_protocols
from rledit.eval.results import CurvePoint, EvalResult, ExampleRecord, LifelongResult, summarize, utc_now
from rledit.types import EditRequest

TIMINGS = ("end", "immediate", "curve")


@dataclass
class LifelongProgress:
    """What a lifelong run has done after ``steps_done`` steps: everything :func:`run_lifelong` needs, with the
    edited model itself, to go on from there exactly as if it had never stopped (``rledit bench --resume``)."""

    steps_done: int
    references: References
    unedited: EvalResult
    started_at: str
    records: list[ExampleRecord] = field(default_factory=list)
    curve: list[CurvePoint] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    general: list[dict[str, Any]] = field(default_factory=list)


def compute_references(model: nn.Module, tokenizer, requests: Sequence[EditRequest],
                       protocols: Sequence[str | Protocol] | None = None, batch_size: int = 32) -> References:
    """The UNEDITED ``model``'s outputs on the locality prompts of ``requests``, for every protocol that needs them.

    Call this before the first edit, on every request you will evaluate later.
    """
    requests = _check_requests(requests)
    references = References()
    with shared_predictions():
        for protocol in resolve_protocols(protocols, requests):
            if protocol.uses_references:
                references.by_protocol[protocol.id] = protocol.references(model, tokenizer, requests, batch_size)
    return references


def evaluate(model: nn.Module, tokenizer, requests: Sequence[EditRequest],
             protocols: Sequence[str | Protocol] | None = None, references: References | None = None,
             batch_size: int = 32) -> EvalResult:
    """Score ``model`` on ``requests`` under ``protocols`` (None: every applicable one); never changes the model.

    ``references`` are the unedited model's locality outputs from :func:`compute_references`; when None the
    model itself is taken to be the unedited one and they are computed here.
    """
    requests = _check_requests(requests)
    resolved = resolve_protocols(protocols, requests)
    started = utc_now()
    if references is None:
        references = compute_references(model, tokenizer, requests, resolved, batch_size)
    records = _score(model, tokenizer, requests, resolved, references, batch_size, range(len(requests)))
    ids = [p.id for p in resolved]
    metrics, counts = summarize(records, ids)
    return EvalResult(ids, metrics, counts, records, len(requests), started, utc_now())


def run_lifelong(
    model: nn.Module,
    tokenizer,
    steps: Sequence[Sequence[EditRequest]],
    apply_step: Callable[[list[EditRequest]], object],
    protocols: Sequence[str | Protocol] | None = None,
    timing: str = "end",
    eval_every: int = 10,
    batch_size: int = 32,
    progress: bool = True,
    baseline: tuple[References, EvalResult] | None = None,
    probe: Callable[[], dict] | None = None,
    progress_from: LifelongProgress | None = None,
    on_step: Callable[[LifelongProgress], object] | None = None,
) -> LifelongResult:
    """Apply ``steps`` of edits one after another with ``apply_step`` and score them under ``timing``.

    ``apply_step(requests)`` must apply one step's edits to ``model`` in place (e.g. ``editor.apply``); its
    wall time is recorded per step. Before the first step the unedited model's references and its scores on
    every edit (the floor) are computed, unless ``baseline`` gives both from an earlier run on the same
    steps and protocols (:attr:`LifelongResult.baseline`), which is how several methods share them.

    ``probe()`` (e.g. :func:`rledit.eval.general.general_probe` bound to the model) scores the model's general
    ability after the last step and, with timing ``curve``, at every curve point (``LifelongResult.general``).

    ``on_step(progress)`` is called after every step but the last (and its scoring) with a
    :class:`LifelongProgress`; given back as ``progress_from``, with ``model`` carrying the first
    ``progress.steps_done`` steps, the run goes on from the next step.
    """
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
    steps = [_check_requests(step, f"step {t}") for t, step in enumerate(steps, start=1)]
    if not steps:
        raise ValueError("no edit steps given")
    requests = [r for step in steps for r in step]
    step_of = [t for t, step in enumerate(steps, start=1) for _ in step]
    resolved = resolve_protocols(protocols, requests)
    ids = [p.id for p in resolved]

    def score(indices: range, after_steps: int) -> list[ExampleRecord]:
        return _score(model, tokenizer, [requests[i] for i in indices], resolved, references, batch_size,
                      indices, step_of, after_steps)

    if progress_from is not None:
        if progress_from.unedited.protocols != ids or progress_from.unedited.n_examples != len(requests):
            raise ValueError(f"the progress to go on from scores {progress_from.unedited.n_examples} edits under "
                             f"{progress_from.unedited.protocols}, this run {len(requests)} under {ids}")
        done = progress_from
    else:
        started = utc_now()
        if baseline is not None:
            references, unedited = baseline
            if unedited.protocols != ids or unedited.n_examples != len(requests):
                raise ValueError(f"the given baseline scores {unedited.n_examples} edits under "
                                 f"{unedited.protocols}, this run {len(requests)} under {ids}")
        else:
            references = compute_references(model, tokenizer, requests, resolved, batch_size)
            unedited_records = score(range(len(requests)), 0)
            unedited = EvalResult(ids, *summarize(unedited_records, ids), unedited_records, len(requests),
                                  started, utc_now())
        done = LifelongProgress(0, references, unedited, started)
    references, unedited = done.references, done.unedited
    records, curve, seconds, general = list(done.records), list(done.curve), list(done.seconds), list(done.general)
    applied = sum(len(step) for step in steps[:done.steps_done])
    bar = tqdm(total=len(steps), initial=done.steps_done, desc=f"editing ({timing})", unit="step",
               disable=not progress)
    for t, step in enumerate(steps[done.steps_done:], start=done.steps_done + 1):
        seconds.append(_timed(model, apply_step, list(step)))
        applied += len(step)
        if timing == "immediate":
            records += score(range(applied - len(step), applied), t)
        elif timing == "curve" and (t % eval_every == 0 or t == len(steps)):
            point = score(range(applied), t)
            records += point
            curve.append(CurvePoint(t, applied, *summarize(point, ids)))
        if probe is not None and (t == len(steps) or (timing == "curve" and t % eval_every == 0)):
            general.append({"step": t, "n_edits": applied, **probe()})
        bar.update()
        if on_step is not None and t < len(steps):
            on_step(LifelongProgress(t, references, unedited, done.started_at, list(records), list(curve),
                                     list(seconds), list(general)))
    bar.close()
    if timing == "end":
        records = score(range(len(requests)), len(steps))
    metrics, counts = (curve[-1].metrics, curve[-1].counts) if curve else summarize(records, ids)
    return LifelongResult(
        timing=timing, protocols=ids, metrics=metrics, counts=counts, unedited=unedited, records=records,
        step_seconds=seconds, edits_per_step=[len(s) for s in steps], curve=curve,
        eval_every=eval_every if timing == "curve" else None, started_at=done.started_at, finished_at=utc_now(),
        references=references, general=general,
    )


def _score(model, tokenizer, requests: list[EditRequest], protocols: list[Protocol], references: References,
           batch_size: int, indices: Sequence[int], step_of: Sequence[int] | None = None,
           after_steps: int = 0) -> list[ExampleRecord]:
    records = []
    with shared_predictions():  # pairs several protocols score (the edit prompts, ...) are computed once
        for protocol in protocols:
            scored = protocol.score(model, tokenizer, requests, references.for_protocol(protocol, requests),
                                    batch_size)
            for request, index, example in zip(requests, indices, scored):
                records.append(ExampleRecord(
                    protocol=protocol.id, index=index, scores=example.scores, texts=request.to_dict(),
                    outputs=example.outputs, step=step_of[index] if step_of else None, after_steps=after_steps,
                ))
    return records


def _timed(model: nn.Module, apply_step: Callable[[list[EditRequest]], object], step: list[EditRequest]) -> float:
    device = next(model.parameters()).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    apply_step(step)
    synchronize()
    return time.perf_counter() - start


def _check_requests(requests: Sequence[EditRequest], what: str = "requests") -> list[EditRequest]:
    if isinstance(requests, (str, EditRequest)) or not isinstance(requests, Sequence):
        raise TypeError(f"{what} must be a list of EditRequest, got {type(requests).__name__}")
    bad = [i for i, r in enumerate(requests) if not isinstance(r, EditRequest)]
    if bad:
        raise TypeError(f"{what}: item {bad[0]} is a {type(requests[bad[0]]).__name__}, not an EditRequest "
                        f"(build them with rledit.data.load_requests or EditRequest.from_dict)")
    if not requests:
        raise ValueError(f"{what}: no edit requests given")
    return list(requests)
