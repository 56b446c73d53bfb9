"""The six edit-record formats rledit reads, and how a record of each becomes an :class:`EditRequest`.

Formats (names used by :func:`detect_format`):

- ``rledit``: rledit's own, the fields of :class:`EditRequest` (``prompt, target_new``; optional ``subject,
  ground_truth, rephrase_prompts, locality [{prompt, answer, kind}], portability``, ``source``): what
  ``EditRequest.to_dict`` writes, and the easiest way to edit one's own facts.
- ``zsre-mend``: MEND/ROME zsRE (``subject, src, rephrase, alt, answers, loc, loc_ans``; optional ``portability``).
- ``zsre-knowedit``: KnowEdit zsRE (``subject, prompt, target_new, ground_truth, rephrase_prompt,
  locality{name: [{prompt, ground_truth}]}``; optional ``portability`` of the same shape).
- ``zsre-rledit``: RLEdit/MALMEN zsRE (``src, rephrase, ans, loc, loc_ans``; no subject).
- ``counterfact-easyedit``: EasyEdit CounterFact (``prompt, subject, target_new, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth``).
- ``counterfact-rome``: ROME/MEMIT CounterFact (``requested_rewrite{prompt with "{}", subject, target_new{str},
  target_true{str}}, paraphrase_prompts, neighborhood_prompts``; optional ``portability``).

Conventions shared by all formats:

- Every string is stripped of surrounding whitespace (some files carry targets such as ``" species"``; targets are
  scored as ``" " + target_new`` downstream, so a kept leading space would double it). A string that is empty
  after stripping is an error.
- A ``"{}"`` in the edit prompt is filled with the subject; without a subject that is an error.
- zsRE ``loc``/``loc_ans`` becomes ``PromptAnswer(loc, loc_ans, kind="nq")`` (the ``"nq question: "`` prefix is
  kept); CounterFact neighbourhood prompts become ``PromptAnswer(prompt, old answer, kind="neighborhood")``;
  KnowEdit locality/portability items take the group name (``"Relation_Specificity"``, ``"Reasoning"``, ...) as
  ``kind``; a one-hop ``portability`` object ``{"New Question", "New Answer"}`` becomes ``kind="One_Hop"``.
- Where a ground truth is a list of several answers (zsRE ``answers``, KnowEdit ``ground_truth``), the FIRST
  answer is used; a nested list (aliases of an answer) likewise yields its first item.
- ROME CounterFact ``attribute_prompts`` and ``generation_prompts`` are not carried: :class:`EditRequest` has no
  field for them. Keys a format does not use are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rledit.types import EditRequest, EditRequestError, PromptAnswer

MAX_LISTED_PROBLEMS = 20


class DataError(ValueError):
    """A data file or named dataset cannot be read, or holds records that are not valid edit requests."""


class _Fields:
    """Reads typed fields from one raw record, collecting every problem instead of stopping at the first."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = record
        self.problems: list[str] = []

    def value(self, path: str, required: bool = True) -> Any:
        """The value at a dotted ``path`` (``"requested_rewrite.target_new.str"``), or None if absent."""
        node: Any = self.record
        walked: list[str] = []
        for part in path.split("."):
            if not isinstance(node, Mapping):
                self.problems.append(f"'{'.'.join(walked)}' must be an object, got {type(node).__name__}")
                return None
            walked.append(part)
            if part not in node or (node[part] is None and not required):
                if required:
                    self.problems.append(f"missing key '{path}'")
                return None
            node = node[part]
        if node is None:
            self.problems.append(f"'{path}' is null")
        return node

    def as_text(self, value: Any, where: str) -> str | None:
        if not isinstance(value, str):
            self.problems.append(f"'{where}' must be a string, got {type(value).__name__}")
            return None
        if not value.strip():
            self.problems.append(f"'{where}' is empty")
            return None
        return value.strip()

    def as_answer(self, value: Any, where: str) -> str | None:
        """A string, or the first item of a (possibly nested) non-empty list of strings."""
        if isinstance(value, list):
            if not value:
                self.problems.append(f"'{where}' is an empty list")
                return None
            return self.as_answer(value[0], f"{where}[0]")
        return self.as_text(value, where)

    def text(self, path: str, required: bool = True) -> str | None:
        value = self.value(path, required)
        return None if value is None else self.as_text(value, path)

    def answer(self, path: str, required: bool = True) -> str | None:
        value = self.value(path, required)
        return None if value is None else self.as_answer(value, path)

    def texts(self, path: str, required: bool = True) -> tuple[str, ...]:
        """A string or a list of strings, as a tuple."""
        value = self.value(path, required)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.problems.append(f"'{path}' must be a string or a list of strings, got {type(value).__name__}")
            return ()
        texts = [self.as_text(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return tuple(t for t in texts if t is not None)

    def prompt(self, path: str, subject: str | None, placeholder_required: bool = False) -> str | None:
        """The edit prompt with any ``"{}"`` filled by the subject."""
        prompt = self.text(path)
        if prompt is None:
            return None
        if "{}" not in prompt:
            if placeholder_required:
                self.problems.append(f"'{path}' has no '{{}}' placeholder for the subject")
            return prompt
        if subject is None:
            self.problems.append(f"'{path}' has a '{{}}' placeholder but the record has no subject")
            return None
        return prompt.replace("{}", subject)

    def pair(self, prompt_path: str, answer_path: str, kind: str) -> tuple[PromptAnswer, ...]:
        prompt, answer = self.text(prompt_path), self.answer(answer_path)
        return () if prompt is None or answer is None else (PromptAnswer(prompt, answer, kind),)

    def named_groups(self, path: str, required: bool = True) -> tuple[PromptAnswer, ...]:
        """KnowEdit ``{name: [{prompt, ground_truth}, ...]}``; each item's kind is its group name."""
        groups = self.value(path, required)
        if groups is None:
            return ()
        if not isinstance(groups, Mapping):
            self.problems.append(f"'{path}' must be an object {{name: [{{prompt, ground_truth}}]}}, "
                                 f"got {type(groups).__name__}")
            return ()
        pairs: list[PromptAnswer] = []
        for name, items in groups.items():
            if not isinstance(items, list):
                self.problems.append(f"'{path}.{name}' must be a list, got {type(items).__name__}")
                continue
            for i, item in enumerate(items):
                where = f"{path}.{name}[{i}]"
                if not isinstance(item, Mapping):
                    self.problems.append(f"'{where}' must be an object, got {type(item).__name__}")
                    continue
                missing = [k for k in ("prompt", "ground_truth") if k not in item]
                if missing:
                    self.problems.append(f"'{where}' lacks {missing}")
                    continue
                prompt = self.as_text(item["prompt"], f"{where}.prompt")
                answer = self.as_answer(item["ground_truth"], f"{where}.ground_truth")
                if prompt is not None and answer is not None:
                    pairs.append(PromptAnswer(prompt, answer, str(name)))
        return tuple(pairs)

    def items(self, path: str) -> tuple[PromptAnswer, ...]:
        """An optional list of ``{prompt, answer, kind?}`` objects (rledit's own format)."""
        items = self.value(path, required=False)
        if items is None:
            return ()
        if not isinstance(items, list):
            self.problems.append(f"'{path}' must be a list of {{prompt, answer, kind}}, got {type(items).__name__}")
            return ()
        pairs = []
        for i, item in enumerate(items):
            where = f"{path}[{i}]"
            if not isinstance(item, Mapping) or "prompt" not in item or "answer" not in item:
                self.problems.append(f"'{where}' must be an object with prompt and answer")
                continue
            prompt, answer = self.as_text(item["prompt"], f"{where}.prompt"), self.as_text(item["answer"], f"{where}.answer")
            kind = item.get("kind", "")
            if not isinstance(kind, str):
                self.problems.append(f"'{where}.kind' must be a string")
            elif prompt is not None and answer is not None:
                pairs.append(PromptAnswer(prompt, answer, kind))
        return tuple(pairs)

    def one_hop(self, path: str) -> tuple[PromptAnswer, ...]:
        """An optional EasyEdit one-hop object ``{"New Question": ..., "New Answer": ...}``."""
        if self.value(path, required=False) is None:
            return ()
        return self.pair(f"{path}.New Question", f"{path}.New Answer", "One_Hop")


def _native(f: _Fields) -> dict[str, Any]:
    subject = f.text("subject", required=False)
    return {
        "prompt": f.prompt("prompt", subject),
        "target_new": f.text("target_new"),
        "subject": subject,
        "ground_truth": f.answer("ground_truth", required=False),
        "rephrase_prompts": f.texts("rephrase_prompts", required=False),
        "locality": f.items("locality"),
        "portability": f.items("portability"),
    }


def _is_native(record: Mapping[str, Any]) -> bool:
    """Native records hold only EditRequest fields: that tells them from KnowEdit/EasyEdit ones with the same
    ``prompt``/``target_new`` keys."""
    return set(record) <= NATIVE_KEYS and not isinstance(record.get("locality"), Mapping)


def _zsre_mend(f: _Fields) -> dict[str, Any]:
    subject = f.text("subject")
    return {
        "prompt": f.prompt("src", subject),
        "target_new": f.text("alt"),
        "subject": subject,
        "ground_truth": f.answer("answers", required=False),
        "rephrase_prompts": f.texts("rephrase"),
        "locality": f.pair("loc", "loc_ans", "nq"),
        "portability": f.one_hop("portability"),
    }


def _zsre_knowedit(f: _Fields) -> dict[str, Any]:
    subject = f.text("subject")
    return {
        "prompt": f.prompt("prompt", subject),
        "target_new": f.text("target_new"),
        "subject": subject,
        "ground_truth": f.answer("ground_truth", required=False),
        "rephrase_prompts": f.texts("rephrase_prompt"),
        "locality": f.named_groups("locality"),
        "portability": f.named_groups("portability", required=False),
    }


def _zsre_rledit(f: _Fields) -> dict[str, Any]:
    return {
        "prompt": f.prompt("src", None),
        "target_new": f.text("ans"),
        "rephrase_prompts": f.texts("rephrase"),
        "locality": f.pair("loc", "loc_ans", "nq"),
    }


def _counterfact_easyedit(f: _Fields) -> dict[str, Any]:
    subject = f.text("subject")
    return {
        "prompt": f.prompt("prompt", subject),
        "target_new": f.text("target_new"),
        "subject": subject,
        "ground_truth": f.answer("ground_truth"),
        "rephrase_prompts": f.texts("rephrase_prompt"),
        "locality": f.pair("locality_prompt", "locality_ground_truth", "neighborhood"),
    }


def _counterfact_rome(f: _Fields) -> dict[str, Any]:
    subject = f.text("requested_rewrite.subject")
    true_answer = f.text("requested_rewrite.target_true.str")
    neighbours = f.texts("neighborhood_prompts")
    return {
        "prompt": f.prompt("requested_rewrite.prompt", subject, placeholder_required=True),
        "target_new": f.text("requested_rewrite.target_new.str"),
        "subject": subject,
        "ground_truth": true_answer,
        "rephrase_prompts": f.texts("paraphrase_prompts"),
        "locality": tuple(PromptAnswer(p, true_answer, "neighborhood") for p in neighbours if true_answer),
        "portability": f.one_hop("portability"),
    }


@dataclass(frozen=True)
class RecordFormat:
    """One record format: the keys that identify it (and optionally a further test), the keys it needs, and
    its record parser."""

    name: str
    markers: tuple[str, ...]
    required: tuple[str, ...]
    parse: Callable[[_Fields], dict[str, Any]]
    accepts: Callable[[Mapping[str, Any]], bool] | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        return all(k in record for k in self.markers) and (self.accepts is None or self.accepts(record))


NATIVE_KEYS = frozenset({"prompt", "target_new", "subject", "ground_truth", "rephrase_prompts", "locality",
                         "portability", "source"})


# Detection tries these in order; the first whose marker keys are all present wins.
FORMATS: tuple[RecordFormat, ...] = (
    RecordFormat("rledit", ("prompt", "target_new"), ("prompt", "target_new"), _native, _is_native),
    RecordFormat("counterfact-rome", ("requested_rewrite",),
                 ("requested_rewrite{prompt, subject, target_new{str}, target_true{str}}", "paraphrase_prompts",
                  "neighborhood_prompts"), _counterfact_rome),
    RecordFormat("counterfact-easyedit", ("prompt", "locality_prompt"),
                 ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                  "locality_ground_truth"), _counterfact_easyedit),
    RecordFormat("zsre-knowedit", ("prompt", "target_new"),
                 ("subject", "prompt", "target_new", "rephrase_prompt", "locality"), _zsre_knowedit),
    RecordFormat("zsre-rledit", ("src", "ans"), ("src", "rephrase", "ans", "loc", "loc_ans"), _zsre_rledit),
    RecordFormat("zsre-mend", ("src", "alt"), ("subject", "src", "rephrase", "alt", "loc", "loc_ans"), _zsre_mend),
)
FORMAT_NAMES: tuple[str, ...] = tuple(fmt.name for fmt in FORMATS)


def known_formats_text() -> str:
    """One line per known format with the keys a record of it needs."""
    return "\n".join(f"  {fmt.name}: {', '.join(fmt.required)}" for fmt in FORMATS)


def _match(record: Mapping[str, Any]) -> RecordFormat | None:
    return next((fmt for fmt in FORMATS if fmt.matches(record)), None)


def detect_format(record: Mapping[str, Any]) -> str:
    """The name of the format a raw record is in (one of :data:`FORMAT_NAMES`), judged by its keys.

    Raises :class:`DataError` listing the known formats and the keys each needs if none fits.
    """
    fmt = _match(record) if isinstance(record, Mapping) else None
    if fmt is None:
        keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise DataError(f"record with keys {keys} is in no known format; known formats and the keys they need:\n"
                        f"{known_formats_text()}")
    return fmt.name


def parse_record(record: Mapping[str, Any], where: str) -> EditRequest:
    """One raw record in any known format as an edit request; :class:`EditRequestError` saying what is wrong,
    starting with ``where`` (e.g. "record")."""
    fmt = _match(record)
    if fmt is None:
        raise EditRequestError(f"{where} with keys {sorted(record)} is in no known format; known formats "
                               f"and the keys they need:\n{known_formats_text()}")
    out: list[EditRequest] = []
    problems = _record_problems(record, fmt, where, out)
    if problems:
        raise EditRequestError(f"{where} (format {fmt.name}): {'; '.join(problems)}")
    return out[0]


def parse_records(records: list[Any], name: str, skip: Iterable[int] = ()) -> list[EditRequest]:
    """Turn the raw records of one file into edit requests, or raise one :class:`DataError` listing every bad one.

    The file's format is that of its first record in a known format; every record is then read in that format.
    ``name`` is used in the requests' ``source`` ("name#index") and in error messages. ``skip`` lists indices of
    records known to be bad that are left out on purpose; each must really be bad, or that is an error too.
    """
    matches = (_match(r) for r in records if isinstance(r, Mapping))
    fmt = next((m for m in matches if m is not None), None)
    if fmt is None:
        first = records[0] if records else None
        keys = sorted(first) if isinstance(first, Mapping) else type(first).__name__
        raise DataError(f"{name}: no record is in a known format (first record: {keys}); known formats and the "
                        f"keys they need:\n{known_formats_text()}")
    skip = set(skip)
    requests: list[EditRequest] = []
    problems = [f"{name}#{i}: listed as a known bad record to skip, but the file has only {len(records)} records"
                for i in sorted(skip) if not 0 <= i < len(records)]
    for index, record in enumerate(records):
        where = f"{name}#{index}"
        reasons = _record_problems(record, fmt, where, requests)
        other = _match(record) if reasons and isinstance(record, Mapping) else None
        if other is not None and other is not fmt:
            reasons.insert(0, f"looks like format {other.name}, but the file is in format {fmt.name}")
        if index in skip:
            if not reasons:
                problems.append(f"{where}: listed as a known bad record to skip, but it is valid")
        elif reasons:
            problems.append(f"{where}: {'; '.join(reasons)}")
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        hidden = len(problems) - MAX_LISTED_PROBLEMS
        more = f"\n  ... and {hidden} more" if hidden > 0 else ""
        raise DataError(f"{name}: {len(problems)} bad record(s) in format {fmt.name} (keys needed: "
                        f"{', '.join(fmt.required)}):\n  {shown}{more}\nFix or remove these records; "
                        "nothing is dropped silently.")
    return requests


def _record_problems(record: Any, fmt: RecordFormat, where: str, out: list[EditRequest]) -> list[str]:
    """Parse one record, appending its request to ``out``; return its problems (empty if it is valid)."""
    if not isinstance(record, Mapping):
        return [f"record must be a JSON object, got {type(record).__name__}"]
    fields = _Fields(record)
    values = fmt.parse(fields)
    if fields.problems:
        return fields.problems
    try:
        request = EditRequest(**values, source=where)
    except EditRequestError as err:
        return [str(err)]
    out.append(request)
    return []
