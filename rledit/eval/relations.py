"""Same-relation locality prompts for zsRE (``zsre-token-acc@2``'s ``relation_locality``).

An edit's question template is its prompt with the subject taken out ("What is the native language of {}?").
Another subject asked the same question is the input an edit is most likely to spill onto; zsRE's own locality
prompts (unrelated NQ questions) never test that. For each request the neighbour is a record of the bundled
zsRE *training* split with the same template and another subject, chosen by a hash of the request's prompt (the
same neighbour on every run and machine), teacher-forced on that record's true answer. Requests without a
subject in their prompt, or whose template no training record shares, have none.

The training records are split in two halves by a hash of their prompt: the ``"metric"`` half supplies the
neighbours the protocol scores, the ``"train"`` half those an editor may be trained to leave alone (the RL
trainer's ``relation_locality`` option), so a trained editor is never scored on prompts it was trained on.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from rledit.types import EditRequest

Pair = tuple[str, str]


def question_template(request: EditRequest) -> str | None:
    """The prompt with its subject replaced by ``{}``, or None when the prompt does not contain the subject."""
    subject = (request.subject or "").strip()
    if not subject or subject not in request.prompt:
        return None
    return request.prompt.replace(subject, "{}", 1)


HALVES = ("metric", "train")


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def in_half(record: EditRequest, half: str) -> bool:
    """Whether a zsRE training record belongs to ``half`` ("metric" or "train") of the split."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    return HALVES[_digest(record.prompt) % 2] == half


@lru_cache(maxsize=2)
def _training_index(half: str) -> dict[str, list[tuple[str, str, str]]]:
    """Template → [(subject, prompt, true answer)] over one half of the zsRE training split, in file order."""
    from rledit.data import load_requests

    index: dict[str, list[tuple[str, str, str]]] = {}
    for record in load_requests("zsre", split="train"):
        template = question_template(record)
        if template is not None and record.ground_truth and in_half(record, half):
            index.setdefault(template, []).append((record.subject.strip(), record.prompt, record.ground_truth))
    return index


def same_relation_pair(request: EditRequest, half: str = "metric") -> Pair | None:
    """(prompt, answer) of the request's same-relation neighbour from ``half`` of the training records, or None
    when it has none."""
    template = question_template(request)
    if template is None:
        return None
    subject = request.subject.strip()
    candidates = [(prompt, answer) for other, prompt, answer in _training_index(half).get(template, ())
                  if other != subject and prompt != request.prompt]
    if not candidates:
        return None
    return candidates[_digest(request.prompt) % len(candidates)]
