"""The scoring protocols, named and versioned (``zsre-token-acc@1``, ``cf-prob@1``, ``gen-exact@1``).

The definitions are the contract written in EVALUATION.md; a change in what a protocol computes is a new
version, never an edit of an old one. Every score is a percentage per example; a metric an example has no
prompts for (e.g. no rephrases) is ``None`` for that example and left out of the mean.

Locality compares the edited model with the UNEDITED one, so protocols that need it first compute
:class:`References` (the unedited outputs on every locality prompt), once, before the first edit.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from rledit.eval.forced import Pair, predict_answers
from rledit.eval.generation import greedy_decode
from rledit.tokens import target_token_ids
from rledit.types import EditRequest

_log = logging.getLogger("rledit")

class ProtocolError(ValueError):
    """A protocol that does not exist, does not apply to the requests, or lacks its references."""


@dataclass(frozen=True)
class ExampleScore:
    """One example's scores under one protocol (metric → percent or None) and what the model produced."""

    scores: dict[str, float | None]
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class References:
    """The unedited model's outputs on locality prompts: protocol id → {(prompt, answer): output}."""

    by_protocol: dict[str, dict[Pair, Any]] = field(default_factory=dict)

    def for_protocol(self, protocol: Protocol, requests: Sequence[EditRequest]) -> dict[Pair, Any]:
        """The references ``protocol`` needs to score ``requests``; an error names the first one missing."""
        if not protocol.uses_references:
            return {}
        table = self.by_protocol.get(protocol.id)
        if table is None:
            raise ProtocolError(f"no unedited references for {protocol.id}; compute them with "
                                f"rledit.eval.compute_references(...) on the unedited model before the first edit")
        for request in requests:
            for pair in protocol.reference_pairs(request):
                if pair not in table:
                    raise ProtocolError(f"{protocol.id}: no unedited reference for locality prompt {pair[0]!r}; "
                                        f"compute the references on all requests you will evaluate, before editing")
        return table


class Protocol(ABC):
    """A way to score edits: a name, a version, the metrics it reports and how to compute them."""

    name: ClassVar[str]
    version: ClassVar[int]
    metric_names: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    uses_references: ClassVar[bool] = False

    @property
    def id(self) -> str:
        """``name@version``, the identifier every result carries."""
        return f"{self.name}@{self.version}"

    def unmet_requirement(self, requests: Sequence[EditRequest]) -> str | None:
        """Why this protocol cannot score ``requests``, or None when it can."""
        return None

    def applicable(self, requests: Sequence[EditRequest]) -> bool:
        """Whether this protocol can score ``requests``."""
        return self.unmet_requirement(requests) is None

    def reference_pairs(self, request: EditRequest) -> list[Pair]:
        """The (prompt, answer) pairs of ``request`` whose unedited outputs :meth:`references` computes."""
        return _locality_pairs(request)

    def references(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest],
                   batch_size: int = 32) -> dict[Pair, Any]:
        """The unedited ``model``'s outputs on the locality prompts of ``requests`` ({} if not needed)."""
        return {}

    @abstractmethod
    def score(self, model: nn.Module, tokenizer, requests: Sequence[EditRequest], references: Mapping[Pair, Any],
              batch_size: int = 32) -> list[ExampleScore]:
        """One :class:`ExampleScore` per request, in order (``references`` from :meth:`references`)."""

    def __repr__(self) -> str:
        return f"<protocol {self.id}>"


def _mean_percent(values: Sequence[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def _locality_pairs(request: EditRequest) -> list[Pair]:
    return [(item.prompt, item.answer) for item in request.locality]


class TokenAccuracy(Protocol):
    """zsRE token accuracy (MEND/ROME/RLEdit): teacher-forced argmax agreement per target token."""

    name = "zsre-token-acc"
    version = 1
    metric_names = ("efficacy", "generalization", "locality", "specificity", "portability")
    description = ("mean over target tokens of [argmax = target token] on the edit prompt (efficacy) and each "
                   "rephrase (generalization); specificity: the same on locality prompts against their gold "
                   "answer; locality: agreement with the unedited model's argmax on locality prompt+answer; "
                   "portability: token accuracy on portability prompts where the data has them")
    uses_references = True

    def unmet_requirement(self, requests: Sequence[EditRequest]) -> str | None:
        missing = [i for i, r in enumerate(requests) if not r.locality]
        if missing:
            return f"{len(missing)} request(s) have no locality prompt with an answer (first: request {missing[0]})"
        return None

    def references(self, model, tokenizer, requests, batch_size=32):
        pairs = [pair for r in requests for pair in self.reference_pairs(r)]
        return {pair: p.argmax_ids for pair, p in predict_answers(model, tokenizer, pairs, batch_size).items()}

    def locality_pairs(self, request: EditRequest) -> list[Pair]:
        """The locality (prompt, answer) pairs as this version scores them."""
        return _locality_pairs(request)

    def extra_scores(self, request: EditRequest, predictions, references) -> dict[str, float | None]:
        """Metrics a later version adds (none in version 1)."""
        return {}

    def score(self, model, tokenizer, requests, references, batch_size=32):
        pairs: list[Pair] = []
        for r in requests:
            pairs += [(p, r.target_new) for p in (r.prompt, *r.rephrase_prompts)]
            pairs += self.reference_pairs(r) + [(item.prompt, item.answer) for item in r.portability]
        predictions = predict_answers(model, tokenizer, pairs, batch_size)
        results = []
        for r in requests:
            edit = predictions[(r.prompt, r.target_new)]
            rephrases = [predictions[(p, r.target_new)] for p in r.rephrase_prompts]
            local = [(predictions[pair], references[pair]) for pair in self.locality_pairs(r)]
            portable = [predictions[(item.prompt, item.answer)] for item in r.portability]
            scores = {
                "efficacy": 100.0 * edit.accuracy,
                "generalization": _mean_percent([p.accuracy for p in rephrases]),
                "locality": _mean_percent([p.agreement(ref) for p, ref in local]),
                "specificity": _mean_percent([p.accuracy for p, _ in local]),
                "portability": _mean_percent([p.accuracy for p in portable]),
                **self.extra_scores(r, predictions, references),
            }
            outputs = {"predicted": tokenizer.decode(list(edit.argmax_ids)),
                       "rephrases_predicted": [tokenizer.decode(list(p.argmax_ids)) for p in rephrases]}
            results.append(ExampleScore(scores, outputs))
        return results


class TokenAccuracyV2(TokenAccuracy):
    """zsRE token accuracy, version 2: NQ locality questions end with "?" (as the published RLEdit code asks
    them), and a same-relation locality check.

    Version 1 asks the bundled NQ questions without their question mark, so the unedited model's argmax at the
    first answer position is mostly "?" and locality mostly checks that the model still wants to close the
    question. ``relation_locality`` asks the edit's own question template about another subject (a zsRE
    *training* record of the same template, see :mod:`rledit.eval.relations`) and measures the argmax agreement
    with the unedited model on that record's answer: the prompts most at risk from an edit.
    """

    version = 2
    metric_names = TokenAccuracy.metric_names + ("relation_locality",)
    description = ("as zsre-token-acc@1, with '?' appended to NQ locality questions that lack one; "
                   "relation_locality: argmax agreement with the unedited model on a zsRE training prompt of "
                   "the same question template about another subject, teacher-forced on its answer")

    def locality_pairs(self, request: EditRequest) -> list[Pair]:
        return [(as_question(item.prompt) if item.kind == "nq" else item.prompt, item.answer)
                for item in request.locality]

    def reference_pairs(self, request: EditRequest) -> list[Pair]:
        from rledit.eval.relations import same_relation_pair

        neighbour = same_relation_pair(request)
        return self.locality_pairs(request) + ([neighbour] if neighbour else [])

    def extra_scores(self, request, predictions, references):
        from rledit.eval.relations import same_relation_pair

        neighbour = same_relation_pair(request)
        if neighbour is None:
            return {"relation_locality": None}
        return {"relation_locality": 100.0 * predictions[neighbour].agreement(references[neighbour])}


def as_question(prompt: str) -> str:
    """``prompt`` ending with a question mark (the form the published RLEdit code asks NQ questions in)."""
    return prompt if prompt.rstrip().endswith("?") else prompt.rstrip() + "?"


class CounterFactProbability(Protocol):
    """CounterFact probability comparison (ROME/MEMIT): is the new target more likely than the true one?"""

    name = "cf-prob"
    version = 1
    metric_names = ("efficacy", "generalization", "neighborhood",
                    "efficacy_magnitude", "generalization_magnitude", "neighborhood_magnitude")
    description = ("[P(new) > P(true)] on the edit prompt (efficacy) and paraphrases (generalization), "
                   "[P(true) > P(new)] on neighbourhood prompts, comparing mean log-probs per target token; "
                   "*_magnitude: P(new) - P(true) in points, P being the per-token geometric mean probability")

    def unmet_requirement(self, requests: Sequence[EditRequest]) -> str | None:
        no_truth = [i for i, r in enumerate(requests) if r.ground_truth is None]
        if no_truth:
            return f"{len(no_truth)} request(s) have no ground_truth (the old target; first: request {no_truth[0]})"
        other = sorted({item.kind for r in requests for item in r.locality} - {"neighborhood"})
        if other:
            return f"locality prompts of kind(s) {other} are not CounterFact neighbourhood prompts"
        return None

    def score(self, model, tokenizer, requests, references, batch_size=32):
        pairs = [(p, answer) for r in requests for p in self._prompts(r) for answer in (r.target_new, r.ground_truth)]
        predictions = predict_answers(model, tokenizer, pairs, batch_size)
        results = []
        for r in requests:
            def new_vs_true(prompt: str, r: EditRequest = r) -> tuple[float, float]:
                return (predictions[(prompt, r.target_new)].mean_log_prob,
                        predictions[(prompt, r.ground_truth)].mean_log_prob)

            edit = new_vs_true(r.prompt)
            rephrases = [new_vs_true(p) for p in r.rephrase_prompts]
            neighbours = [new_vs_true(item.prompt) for item in r.locality]
            scores = {
                "efficacy": 100.0 * (edit[0] > edit[1]),
                "generalization": _mean_percent([new > true for new, true in rephrases]),
                "neighborhood": _mean_percent([true > new for new, true in neighbours]),
                "efficacy_magnitude": _magnitude([edit]),
                "generalization_magnitude": _magnitude(rephrases),
                "neighborhood_magnitude": _magnitude(neighbours),
            }
            outputs = {"log_prob_new": edit[0], "log_prob_true": edit[1]}
            results.append(ExampleScore(scores, outputs))
        return results

    @staticmethod
    def _prompts(request: EditRequest) -> list[str]:
        return [request.prompt, *request.rephrase_prompts, *(item.prompt for item in request.locality)]


def _magnitude(log_prob_pairs: Sequence[tuple[float, float]]) -> float | None:
    return _mean_percent([math.exp(new) - math.exp(true) for new, true in log_prob_pairs])


class GenerationExactMatch(Protocol):
    """Free generation: does the greedy continuation start with the target?"""

    name = "gen-exact"
    version = 1
    metric_names = ("efficacy", "generalization", "locality")
    description = ("greedy-decode len(target tokens)+2 tokens; 1 if the decoded text, stripped and casefolded, "
                   "starts with the target (efficacy: edit prompt, generalization: rephrases); locality: the "
                   "greedy tokens on a locality prompt equal the unedited model's")
    uses_references = True

    def references(self, model, tokenizer, requests, batch_size=32):
        return self._generate(model, tokenizer, [pair for r in requests for pair in _locality_pairs(r)], batch_size)

    def score(self, model, tokenizer, requests, references, batch_size=32):
        pairs: list[Pair] = []
        for r in requests:
            pairs += [(p, r.target_new) for p in (r.prompt, *r.rephrase_prompts)] + _locality_pairs(r)
        generated = self._generate(model, tokenizer, pairs, batch_size)
        results = []
        for r in requests:
            texts = [tokenizer.decode(list(generated[(p, r.target_new)]), skip_special_tokens=True)
                     for p in (r.prompt, *r.rephrase_prompts)]
            hits = [_normalise(text).startswith(_normalise(r.target_new)) for text in texts]
            same = [generated[pair] == tuple(references[pair]) for pair in _locality_pairs(r)]
            scores = {"efficacy": 100.0 * hits[0], "generalization": _mean_percent(hits[1:]),
                      "locality": _mean_percent(same)}
            results.append(ExampleScore(scores, {"generated": texts[0], "rephrases_generated": texts[1:]}))
        return results

    @staticmethod
    def _generate(model, tokenizer, pairs: Sequence[Pair], batch_size: int) -> dict[Pair, tuple[int, ...]]:
        unique = list(dict.fromkeys(pairs))
        budgets = [len(target_token_ids(tokenizer, prompt, answer)[1]) + 2 for prompt, answer in unique]
        decoded = greedy_decode(model, tokenizer, [p for p, _ in unique], budgets, batch_size)
        return {pair: tuple(ids) for pair, ids in zip(unique, decoded)}


def _normalise(text: str) -> str:
    return text.strip().casefold()


_REGISTRY: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> Protocol:
    """Make ``protocol`` available by its id (and by its name, which means its latest version)."""
    if protocol.id in _REGISTRY and type(_REGISTRY[protocol.id]) is not type(protocol):
        raise ProtocolError(f"protocol {protocol.id} is already registered; bump the version for a new definition")
    _REGISTRY[protocol.id] = protocol
    return protocol


def list_protocols() -> list[str]:
    """The ids of every registered protocol."""
    return sorted(_REGISTRY)


def get_protocol(name: str | Protocol) -> Protocol:
    """A protocol by id (``"cf-prob@1"``) or by name (``"cf-prob"``: its latest version)."""
    if isinstance(name, Protocol):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    versions = [p for p in _REGISTRY.values() if p.name == name]
    if not versions:
        raise ProtocolError(f"unknown protocol {name!r}; known: {', '.join(list_protocols())}")
    return max(versions, key=lambda p: p.version)


def resolve_protocols(protocols: Sequence[str | Protocol] | None, requests: Sequence[EditRequest]) -> list[Protocol]:
    """The protocols to run on ``requests``: those named (each must apply), or every applicable latest version."""
    if isinstance(protocols, (str, Protocol)):
        protocols = [protocols]
    if protocols is None:
        latest = {p.name: get_protocol(p.name) for p in _REGISTRY.values()}
        chosen = []
        for _, protocol in sorted(latest.items()):
            reason = protocol.unmet_requirement(requests)
            if reason is None:
                chosen.append(protocol)
            else:
                _log.info("evaluate: skipping %s: %s", protocol.id, reason)
        return chosen
    resolved = list({p.id: p for p in map(get_protocol, protocols)}.values())
    if not resolved:
        raise ProtocolError(f"no protocols given; choose from {', '.join(list_protocols())}")
    for protocol in resolved:
        reason = protocol.unmet_requirement(requests)
        if reason is not None:
            raise ProtocolError(f"{protocol.id} cannot score these requests: {reason}")
    return resolved


for _protocol in (TokenAccuracy(), TokenAccuracyV2(), CounterFactProbability(), GenerationExactMatch()):
    register_protocol(_protocol)
