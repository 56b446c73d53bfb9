"""Text corpora for key statistics: the bundled sentences, a text file, or a ``datasets`` dataset.

A corpus is read as a list of non-empty texts (its first ``limit`` ones, in order) plus an identifier that
changes whenever its content may change (it is part of the statistics' cache key).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rledit.data.files import data_dir

BUNDLED_CORPORA = {"sst2": "corpus/sst2_sentences.txt.gz"}  # name -> file under the data folder
QUESTION_CORPORA = ("zsre-train-questions", "zsre-train-facts", "counterfact-train-facts")  # built from the bundled training splits
SUBJECT_CORPORA = ("zsre-train-subjects", "counterfact-train-subjects")  # training prompts that know their subject
PARAPHRASE_SOURCES = ("zsre-train-rephrases", "counterfact-train-rephrases")  # training prompts with a paraphrase
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


class CorpusError(ValueError):
    """A corpus that cannot be found or read, or that holds no text."""


@dataclass(frozen=True)
class Corpus:
    """Texts of a corpus and an identifier of its content (for cache keys)."""

    texts: list[str]
    identifier: str  # e.g. "sst2_sentences-3c1f9a0e2b7d"
    answer_starts: list[int] | None = None  # question-answer corpora: where each text's " answer" begins
    subject_ends: list[int] | None = None  # subject corpora: where each text's subject ends (a character index)


def _pairs(pairs: list[tuple[str, str]], limit: int, identifier: str) -> Corpus:
    """A corpus of "prompt answer" texts that remembers where each answer begins (for answer-position
    statistics, ``positions="answers"`` in :func:`rledit.methods.memit.stats.load_or_compute_statistics`)."""
    pairs = pairs[:limit]
    return Corpus([f"{prompt} {answer}" for prompt, answer in pairs], identifier,
                  [len(prompt) for prompt, _ in pairs])


def load_corpus(source: str, limit: int, split: str = "train", column: str = "text") -> Corpus:
    """The first ``limit`` non-empty texts of ``source`` (see :class:`LocateEditHparams.corpus` for the forms).

    Raises :class:`CorpusError` naming what was looked for when the corpus is missing, unreadable or empty.
    """
    if limit < 1:
        raise CorpusError(f"the corpus sample size must be >= 1, got {limit}")
    if source == "zsre-train-questions":
        return _question_corpus(limit)
    if source == "zsre-train-facts":
        return _zsre_fact_corpus(limit)
    if source == "counterfact-train-facts":
        return _fact_corpus(limit)
    if source in SUBJECT_CORPORA:
        return _subject_corpus(source.split("-", 1)[0], limit)
    if source in BUNDLED_CORPORA:
        path = data_dir() / BUNDLED_CORPORA[source]
        if not path.is_file():
            raise CorpusError(f"the bundled corpus {source!r} is missing: looked for {path}")
        return _file_corpus(path, limit, column)
    path = Path(source).expanduser()
    if path.is_file():
        return _file_corpus(path, limit, column)
    if path.is_dir():
        return _saved_dataset_corpus(path, limit, split, column)
    return _hub_dataset_corpus(source, limit, split, column)


def _question_corpus(limit: int) -> Corpus:
    """"zsre-train-questions": the NQ locality questions of the zsRE training records in the "train" half of
    :mod:`rledit.eval.relations` (asked with "?", followed by their answer), in file order. They stand for the
    unrelated questions an edit must leave alone; the other half's records are never in it, so a validation
    stream drawn from that half scores locality on questions the statistics have not seen."""
    from rledit.data import dataset_file, load_requests
    from rledit.eval.protocols import as_question
    from rledit.eval.relations import in_half

    pairs = [(as_question(item.prompt), item.answer) for record in load_requests("zsre", split="train")
             if in_half(record, "train") for item in record.locality if item.kind == "nq"]
    if not pairs:
        raise CorpusError("the zsRE training split holds no NQ locality questions")
    digest = hashlib.sha256(dataset_file("zsre", "train").read_bytes()).hexdigest()[:12]
    return _pairs(pairs, limit, f"zsre_train_questions-{digest}")


def _zsre_fact_corpus(limit: int) -> Corpus:
    """"zsre-train-facts": the zsRE training records of the "train" half of :mod:`rledit.eval.relations`, each
    question followed by its true answer, in file order. They stand for the questions *about other subjects*,
    asked with an edit's own template, that the edit must leave alone (what ``relation_locality`` scores on
    the other half)."""
    from rledit.data import dataset_file, load_requests
    from rledit.eval.relations import in_half

    pairs = [(record.prompt.rstrip(), record.ground_truth.strip()) for record in load_requests("zsre", split="train")
             if in_half(record, "train") and record.ground_truth and record.ground_truth.strip()]
    if not pairs:
        raise CorpusError("the zsRE training split holds no true answers")
    digest = hashlib.sha256(dataset_file("zsre", "train").read_bytes()).hexdigest()[:12]
    return _pairs(pairs, limit, f"zsre_train_facts-{digest}")


def _fact_corpus(limit: int) -> Corpus:
    """"counterfact-train-facts": true facts of the CounterFact training records in the "train" half of
    :mod:`rledit.eval.relations`, each record's prompt with its true object, then its neighbourhood prompt with
    its true answer, in file order. They stand for the facts about *other* subjects, asked the same way, that a
    CounterFact edit must leave alone (its neighbourhood); the other half is left for a validation stream."""
    from rledit.data import dataset_file, load_requests
    from rledit.eval.relations import in_half

    records = load_requests("counterfact", split="train")
    # a neighbourhood prompt of one record is often another record's prompt: leave out every prompt of the
    # other half (its edits and neighbourhoods), so a validation stream drawn from it is never in the statistics
    held_out = _metric_half_prompts(records, rephrases=False)
    pairs = []
    for record in records:
        if not in_half(record, "train"):
            continue
        facts = [(record.prompt, record.ground_truth)] + [(item.prompt, item.answer) for item in record.locality]
        pairs += [(prompt.rstrip(), answer.strip()) for prompt, answer in facts
                  if answer and prompt.rstrip() not in held_out]
    if not pairs:
        raise CorpusError("the CounterFact training split holds no true facts")
    digest = hashlib.sha256(dataset_file("counterfact", "train").read_bytes()).hexdigest()[:12]
    return _pairs(pairs, limit, f"counterfact_train_facts2-{digest}")


def _subject_corpus(data: str, limit: int) -> Corpus:
    """"zsre-train-subjects" / "counterfact-train-subjects": the prompt and the paraphrases of every training
    record in the "train" half of :mod:`rledit.eval.relations`, in file order, each with where its subject ends
    (texts that do not name the subject are left out). Statistics over their subjects' last tokens
    (``positions="subjects"``) stand for the keys of *other* subjects, which an edit written at its subject's
    last token must leave alone; a prompt of the other half (its edits and CounterFact's neighbourhoods) is never
    in it, so a validation stream drawn from that half is not in the statistics."""
    from rledit.data import dataset_file, load_requests
    from rledit.eval.relations import in_half
    from rledit.tokens import subject_end

    records = load_requests(data, split="train")
    held_out = _metric_half_prompts(records, rephrases=True)
    texts, ends = [], []
    for record in records:
        if not in_half(record, "train") or not record.subject or not record.subject.strip():
            continue
        for prompt in (record.prompt, *record.rephrase_prompts):
            prompt = prompt.rstrip()
            end = subject_end(prompt, record.subject.strip())
            if end is not None and prompt not in held_out:
                texts.append(prompt)
                ends.append(end)
    if not texts:
        raise CorpusError(f"the {data} training split holds no prompts that name their subject")
    digest = hashlib.sha256(dataset_file(data, "train").read_bytes()).hexdigest()[:12]
    return Corpus(texts[:limit], f"{data}_train_subjects-{digest}", subject_ends=ends[:limit])


@dataclass(frozen=True)
class ParaphrasePairs:
    """Prompts, a paraphrase of each and the answer both are asked for, with an identifier of their content."""

    prompts: list[str]
    paraphrases: list[str]
    answers: list[str]
    subjects: list[str]  # each prompt's subject ("" when the record names none)
    identifier: str


def paraphrase_pairs(source: str, limit: int) -> ParaphrasePairs:
    """"zsre-train-rephrases" / "counterfact-train-rephrases": the first ``limit`` (prompt, paraphrase, new target,
    subject) rows of the training records in the "train" half of :mod:`rledit.eval.relations` (one per paraphrase of
    a record), in file order; a prompt of the other half is never in them, so a validation stream drawn from that
    half is not in statistics made from them."""
    if source not in PARAPHRASE_SOURCES:
        raise CorpusError(f"unknown paraphrase source {source!r}; known: {', '.join(PARAPHRASE_SOURCES)}")
    if limit < 1:
        raise CorpusError(f"the number of paraphrase pairs must be >= 1, got {limit}")
    from rledit.data import dataset_file, load_requests
    from rledit.eval.relations import in_half

    data = source.split("-", 1)[0]
    records = load_requests(data, split="train")
    held_out = _metric_half_prompts(records, rephrases=True)
    rows = [(record.prompt.rstrip(), rephrase.rstrip(), record.target_new.strip(), (record.subject or "").strip())
            for record in records if in_half(record, "train") and record.prompt.rstrip() not in held_out
            for rephrase in record.rephrase_prompts if rephrase.strip() and rephrase.rstrip() not in held_out]
    if not rows:
        raise CorpusError(f"the {data} training split holds no paraphrased prompts")
    digest = hashlib.sha256(dataset_file(data, "train").read_bytes()).hexdigest()[:12]
    prompts, paraphrases, answers, subjects = (list(column) for column in zip(*rows[:limit]))
    return ParaphrasePairs(prompts, paraphrases, answers, subjects, f"{data}_train_rephrases-{digest}")


def _metric_half_prompts(records: list, rephrases: bool) -> set[str]:
    """Every prompt of the records in the "metric" half of :mod:`rledit.eval.relations` (edit prompts, their
    paraphrases when ``rephrases``, and their locality prompts), stripped: what a training-half corpus leaves out
    so that a validation stream drawn from that half is never in the statistics."""
    from rledit.eval.relations import in_half

    return {p.rstrip() for r in records if in_half(r, "metric")
            for p in (r.prompt, *(r.rephrase_prompts if rephrases else ()), *(item.prompt for item in r.locality))}


def _file_corpus(path: Path, limit: int, column: str) -> Corpus:
    name = path.name
    if not name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise CorpusError(f"{path}: unknown corpus file type; use one of {TEXT_SUFFIXES + JSONL_SUFFIXES}")
    texts = []
    for number, line in enumerate(_lines(path), start=1):
        if name.endswith(JSONL_SUFFIXES):
            try:
                line = json.loads(line)[column] if line.strip() else ""
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorpusError(f"{path}, line {number}: not a JSON object with a {column!r} field ({exc})") from exc
        if isinstance(line, str) and line.strip():
            texts.append(line.strip())
            if len(texts) == limit:
                break
    if not texts:
        raise CorpusError(f"{path} holds no text")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    stem = name.split(".")[0]
    return Corpus(texts, f"{stem}-{digest.hexdigest()[:12]}")


def _lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            yield from f
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path} cannot be read as UTF-8 text: {exc}") from exc


def _saved_dataset_corpus(path: Path, limit: int, split: str, column: str) -> Corpus:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise CorpusError(f"{path} is a folder but not a dataset saved with save_to_disk: {exc}") from exc
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise CorpusError(f"{path} has no split {split!r}; its splits: {sorted(dataset)}")
        dataset = dataset[split]
    return _dataset_texts(dataset, f"{path.name}-{split}", limit, column)


def _hub_dataset_corpus(name: str, limit: int, split: str, column: str) -> Corpus:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many error types (offline, unknown name, bad split)
        raise CorpusError(
            f"corpus {name!r} is not a bundled corpus ({', '.join(BUNDLED_CORPORA)}), not an existing file or "
            f"folder, and datasets.load_dataset({name!r}, split={split!r}) failed: {exc}"
        ) from exc
    return _dataset_texts(dataset, f"{name.replace('/', '_')}-{split}", limit, column)


def _dataset_texts(dataset, label: str, limit: int, column: str) -> Corpus:
    if column not in dataset.column_names:
        raise CorpusError(f"dataset {label!r} has no column {column!r}; its columns: {dataset.column_names}")
    texts = []
    for row in dataset.select_columns([column]):
        value = row[column]
        if isinstance(value, str) and value.strip():
            texts.append(value.strip())
            if len(texts) == limit:
                break
    if not texts:
        raise CorpusError(f"dataset {label!r} has no text in column {column!r}")
    fingerprint = getattr(dataset, "_fingerprint", "") or hashlib.sha256("\n".join(texts).encode()).hexdigest()
    return Corpus(texts, f"{label}-{fingerprint[:12]}")
