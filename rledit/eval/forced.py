"""Teacher-forced predictions on prompt + answer pairs, batched, for the scoring protocols.

Every (prompt, answer) pair is tokenised by :func:`rledit.tokens.encode` (the one place that knows about the
leading space, BOS and padding side). For each pair this returns, at the positions that predict the answer's
tokens, the model's argmax token and the log-probability of the answer token. Identical pairs are computed
once. Batches are left-padded, so every row's answer ends the row, and only the answer positions go through
the output layer (:func:`rledit.tokens.answer_logits`): the vocabulary projection at every prompt position,
most of a small model's scoring time, is never computed. Under several processes the pairs
are shared out and the predictions gathered (:mod:`rledit.distributed`). Nothing here changes the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from rledit.distributed import gather, world
from rledit.tokens import answer_logits, context_length, encode

PROGRESS_MIN_BATCHES = 20  # shorter loops run without a progress bar

Pair = tuple[str, str]
_shared: dict[tuple[int, Pair], AnswerPrediction] | None = None  # see shared_predictions()


@dataclass(frozen=True)
class AnswerPrediction:
    """What the model predicts, teacher-forced, at each token of one answer."""

    target_ids: tuple[int, ...]  # the answer's token ids (of " " + answer)
    argmax_ids: tuple[int, ...]  # the model's most likely token at each answer position
    log_probs: tuple[float, ...]  # log P(answer token) at each answer position

    @property
    def accuracy(self) -> float:
        """The fraction of answer tokens the argmax gets right."""
        return sum(a == t for a, t in zip(self.argmax_ids, self.target_ids)) / len(self.target_ids)

    def agreement(self, reference_ids: Sequence[int]) -> float:
        """The fraction of answer positions where the argmax equals ``reference_ids`` (another model's)."""
        if len(reference_ids) != len(self.argmax_ids):
            raise ValueError(f"reference has {len(reference_ids)} tokens, the answer {len(self.argmax_ids)}")
        return sum(a == r for a, r in zip(self.argmax_ids, reference_ids)) / len(self.argmax_ids)

    @property
    def mean_log_prob(self) -> float:
        """The mean log-probability per answer token (the log of the per-token geometric mean probability)."""
        return sum(self.log_probs) / len(self.log_probs)


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode without gradients, restoring its train/eval flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def chunks(items: Sequence, size: int, desc: str | None = None) -> Iterable[Sequence]:
    """Consecutive slices of ``items`` of at most ``size`` elements; a progress bar named ``desc`` on long runs."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    starts = range(0, len(items), size)
    if desc is not None and len(starts) >= PROGRESS_MIN_BATCHES:
        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        yield items[start : start + size]


@contextmanager
def shared_predictions() -> Iterator[None]:
    """Inside the ``with`` block, :func:`predict_answers` computes each (model, prompt, answer) once, however
    many protocols ask for it; the model must not change inside the block (one scoring of one model state)."""
    global _shared
    outer, _shared = _shared, ({} if _shared is None else _shared)
    try:
        yield
    finally:
        _shared = outer


def predict_answers(model: nn.Module, tokenizer, pairs: Iterable[Pair], batch_size: int = 32) -> dict[Pair, AnswerPrediction]:
    """Teacher-forced predictions for every distinct (prompt, answer) pair, keyed by the pair."""
    wanted = set(pairs)
    if _shared is None:
        return _predict(model, tokenizer, wanted, batch_size)
    missing = {pair for pair in wanted if (id(model), pair) not in _shared}
    _shared.update({(id(model), pair): p for pair, p in _predict(model, tokenizer, missing, batch_size).items()})
    return {pair: _shared[(id(model), pair)] for pair in wanted}


def _predict(model: nn.Module, tokenizer, pairs: set[Pair], batch_size: int) -> dict[Pair, AnswerPrediction]:
    """Predictions for ``pairs``; under several processes (:mod:`rledit.distributed`) each scores every
    N-th pair and all of them receive all the predictions."""
    unique = sorted(pairs, key=lambda pair: (len(pair[0]) + len(pair[1]), pair))  # less padding per batch
    rank, size = world()
    mine = unique[rank::size]
    limit = context_length(model)
    predictions: dict[Pair, AnswerPrediction] = {}
    with evaluation_mode(model):
        desc = f"scoring {len(unique)} prompts" + (f" ({len(mine)} in this process)" if size > 1 else "")
        for batch_pairs in chunks(mine, batch_size, desc=desc if rank == 0 else None):
            batch = encode(tokenizer, [p for p, _ in batch_pairs], [a for _, a in batch_pairs], max_length=limit,
                           padding_side="left")
            logits = answer_logits(model, batch).float()  # (answer tokens of all rows, V), row-major
            labels = batch.labels[batch.answer_mask].to(logits.device)
            log_probs = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0].tolist()
            argmax = logits.argmax(dim=-1).tolist()
            start = 0
            for row, (pair, count) in enumerate(zip(batch_pairs, batch.answer_mask.sum(1).tolist())):
                end = start + count
                predictions[pair] = AnswerPrediction(target_ids=tuple(batch.target_ids[row]),
                                                     argmax_ids=tuple(argmax[start:end]),
                                                     log_probs=tuple(log_probs[start:end]))
                start = end
    if size > 1:
        return {pair: prediction for part in gather(predictions) for pair, prediction in part.items()}
    return predictions
