"""General ability of a (possibly edited) model: small tasks that ship offline (``data/general/SOURCES.md``).

Editing papers (RLEdit, AlphaEdit) report how much general capability an edited model keeps. Two probes:

* **SST-2 zero-shot accuracy** on GLUE's 872 labelled dev sentences: the model reads
  ``Review: <sentence>\\nSentiment:`` and the label whose word (`` positive`` / `` negative``) it gives the higher
  log-probability is its answer (teacher-forced, all of the word's tokens, scored like every protocol by
  :func:`rledit.eval.forced.predict_answers`).
* **Perplexity on held-out text**: exp of the mean token cross-entropy over the sentences of the SST-2 test split
  (none of which is in the C_0 statistics corpus), each sentence scored on its own; every token after the
  sentence's first word counts.

:func:`general_probe` runs both and returns plain numbers; it never changes the model.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from rledit.chat import raw_prompts
from rledit.data.files import data_dir
from rledit.data.formats import DataError
from rledit.eval.forced import predict_answers

SST2_TEMPLATE = "Review: {sentence}\nSentiment:"
SST2_LABELS = (" negative", " positive")  # label 0, label 1
FILES = {"sst2-dev": "general/sst2_dev.tsv.gz", "sst2-test": "general/sst2_test.tsv.gz"}


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: int


def load_sst2(split: str = "dev", limit: int | None = None) -> list[LabelledText]:
    """The bundled SST-2 ``split`` ("dev": 872 rows, "test": 1,821), in file order, the first ``limit`` rows."""
    key = f"sst2-{split}"
    if key not in FILES:
        raise DataError(f"SST-2 split {split!r} is not bundled; the splits are 'dev' and 'test'")
    path = data_dir() / FILES[key]
    if not path.is_file():
        raise DataError(f"the bundled SST-2 {split} file is missing: looked for {path}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the SST-2 file ({error})") from error
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        text, _, label = line.rpartition("\t")
        if not text.strip() or label not in ("0", "1"):
            raise DataError(f"{path}, line {number}: expected 'sentence<TAB>0|1', got {line[:80]!r}")
        rows.append(LabelledText(text.strip(), int(label)))
    return rows[:limit]


def continuation_scores(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]],
                        batch_size: int = 32) -> list[tuple[float, int]]:
    """Per (prompt, continuation) pair: the continuation's summed log-probability, teacher-forced, and its number
    of tokens (the protocols' scorer, :func:`rledit.eval.forced.predict_answers`)."""
    predicted = predict_answers(model, tokenizer, pairs, batch_size)
    return [(sum(predicted[pair].log_probs), len(predicted[pair].log_probs)) for pair in pairs]


def sst2_accuracy(model: nn.Module, tokenizer, limit: int | None = None, batch_size: int = 32) -> float:
    """Zero-shot accuracy (percent) on the bundled SST-2 dev sentences (see the module docstring)."""
    rows = load_sst2("dev", limit)
    prompts = [SST2_TEMPLATE.format(sentence=r.text) for r in rows]
    by_label = [[score for score, _ in continuation_scores(model, tokenizer, [(p, word) for p in prompts],
                                                           batch_size)] for word in SST2_LABELS]
    correct = sum(int(positive > negative) == r.label for r, negative, positive in zip(rows, *by_label))
    return 100.0 * correct / len(rows)


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32) -> float:
    """exp(mean token cross-entropy) of ``texts``, each on its own, over the tokens after its first word."""
    pairs = [text.split(" ", 1) for text in texts]
    pairs = [(first, " " + rest) for first, rest in (p for p in pairs if len(p) == 2 and p[1].strip())]
    if not pairs:
        raise ValueError("perplexity needs texts of at least two words")
    scored = continuation_scores(model, tokenizer, pairs, batch_size)
    return math.exp(-sum(score for score, _ in scored) / sum(count for _, count in scored))


TEXT_LIMIT = 500  # held-out sentences the perplexity is computed on
TASKS = (f"sst2_accuracy: zero-shot accuracy (%) on the 872 SST-2 dev sentences; perplexity: on the first "
         f"{TEXT_LIMIT} SST-2 test sentences (rledit.eval.general)")


def general_probe(model: nn.Module, tokenizer, sst2_limit: int | None = None, text_limit: int | None = TEXT_LIMIT,
                  batch_size: int = 32) -> dict[str, float]:
    """``{"sst2_accuracy": %, "perplexity": ...}`` of ``model`` as it is now (edited or not)."""
    texts = [r.text for r in load_sst2("test", text_limit)]
    with raw_prompts(tokenizer):  # both tasks are defined on raw text, also for a model prompted in chat
        return {"sst2_accuracy": round(sst2_accuracy(model, tokenizer, sst2_limit, batch_size), 2),
                "perplexity": round(perplexity(model, tokenizer, texts, batch_size), 3)}
