"""The records that flow through rledit: edit requests in, edit-step handles out.

An :class:`EditRequest` is one fact to insert, already resolved to plain strings (a ROME-style ``"{}"``
placeholder is filled with the subject by the loader). It validates itself on construction, so every
component downstream can rely on non-empty prompts and targets.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class EditRequestError(ValueError):
    """An edit request (or a record that should become one) is malformed."""


@dataclass(frozen=True)
class PromptAnswer:
    """A prompt with its expected answer, e.g. an NQ locality question or a CounterFact neighbour.

    ``kind`` names the family the prompt comes from ("nq", "neighborhood", "Relation_Specificity", ...).
    """

    prompt: str
    answer: str
    kind: str = ""

    def __post_init__(self) -> None:
        _require_text("prompt", self.prompt)
        _require_text("answer", self.answer)
        if not isinstance(self.kind, str):
            raise EditRequestError(f"kind must be a string, got {type(self.kind).__name__}")


@dataclass(frozen=True)
class EditRequest:
    """One fact to insert into the model.

    Attributes:
        prompt: the edit prompt, fully formed ("What is the native language of Christiane Cohendy?").
        target_new: the new answer ("German"); scored as the tokens of ``" " + target_new``.
        subject: the entity the fact is about (needed by locate-then-edit methods such as MEMIT).
        ground_truth: the old answer, if known (CounterFact's ``target_true``).
        rephrase_prompts: paraphrases of ``prompt`` that should also produce ``target_new``.
        locality: unrelated prompts with their answers whose behaviour must not change
            (zsRE: NQ questions; CounterFact: neighbourhood prompts answered by the old target).
        portability: prompts whose answers follow from the edit, where the source provides them.
        source: where the record came from ("file.json#17"), for error messages and result records.
    """

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[PromptAnswer, ...] = ()
    portability: tuple[PromptAnswer, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        _require_text("prompt", self.prompt)
        _require_text("target_new", self.target_new)
        if self.subject is not None:
            _require_text("subject", self.subject)
        if self.ground_truth is not None:
            _require_text("ground_truth", self.ground_truth)
        for name in ("rephrase_prompts", "locality", "portability"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
            else:
                raise EditRequestError(f"{name} must be a list or tuple, got {type(value).__name__}")
        for p in self.rephrase_prompts:
            _require_text("rephrase prompt", p)
        for name in ("locality", "portability"):
            for item in getattr(self, name):
                if not isinstance(item, PromptAnswer):
                    raise EditRequestError(f"{name} items must be PromptAnswer, got {type(item).__name__}")

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EditRequest:
        """Build a request from a plain dict with this class's field names.

        ``locality``/``portability`` items may be dicts ``{"prompt", "answer", "kind"?}``;
        ``rephrase_prompts`` may be a single string.
        """
        if isinstance(record, EditRequest):
            return record
        if not isinstance(record, Mapping):
            raise EditRequestError(f"an edit must be an EditRequest or a dict, got {type(record).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(record) - known)
        if unknown:
            raise EditRequestError(f"unknown edit field(s) {unknown}; known fields: {sorted(known)}")
        data = dict(record)
        if isinstance(data.get("rephrase_prompts"), str):
            data["rephrase_prompts"] = (data["rephrase_prompts"],)
        for name in ("locality", "portability"):
            items = data.get(name, ())
            if isinstance(items, (list, tuple)):
                data[name] = tuple(PromptAnswer(**i) if isinstance(i, Mapping) else i for i in items)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal request."""
        return {
            "prompt": self.prompt,
            "target_new": self.target_new,
            "subject": self.subject,
            "ground_truth": self.ground_truth,
            "rephrase_prompts": list(self.rephrase_prompts),
            "locality": [vars(p).copy() for p in self.locality],
            "portability": [vars(p).copy() for p in self.portability],
            "source": self.source,
        }


@dataclass(frozen=True)
class EditStep:
    """The handle :meth:`rledit.Editor.apply` returns for one applied batch of edits.

    ``ranks`` maps each edited module name to the rank of its update in this step. ``editor`` identifies the
    editor that applied it (a handle from one editor cannot revert another editor's step).
    """

    id: int
    n_edits: int
    ranks: Mapping[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    editor: str = field(default="", repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record of the step (what an editor save keeps)."""
        return {"id": self.id, "n_edits": self.n_edits, "ranks": dict(self.ranks), "seconds": self.seconds}


def is_visible(text: str) -> bool:
    """Whether ``text`` has a character one can see: not only spaces, zero-width or other format/control
    characters (U+200B, U+2060, U+FEFF, ...)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc", "Cn", "Zs") for ch in text)


def _require_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise EditRequestError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise EditRequestError(f"{name} is empty")
    if not is_visible(value):
        raise EditRequestError(f"{name} {value!r} holds only invisible characters (zero-width or format)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EditRequestError(f"{name} is not valid text: {exc.reason} at position {exc.start} "
                               f"({value[max(0, exc.start - 10):exc.start]!r}...); a lone surrogate from "
                               "badly decoded input?") from None
