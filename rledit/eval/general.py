"""General ability of a (possibly edited) model: small tasks that ship offline (``data/general/SOURCES.md``).

Editing papers (RLEdit, AlphaEdit) report how much general capability an edited model keeps. Two probes:

* **SST-2 zero-shot accuracy** on GLUE's 872 labelled dev sentences: the model reads
  ``Review: <sentence>\\nSentiment:`` and the label whose word (`` positive`` / `` negative``) it gives the higher
  log-probability is its answer (teacher-forced, all of the word's tokens).
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

import torch
from torch import nn
from tqdm.auto import tqdm

from rledit.chat import raw_prompts
from rledit.data.files import data_dir
from rledit.data.formats import DataError
from rledit.tokens import answer_logits, context_length, encode, target_token_ids

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


@torch.no_grad()
def continuation_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                          batch_size: int = 32, also: Sequence[int] = (),
                          desc: str | None = None) -> list[tuple[float, int, list[float]]]:
    """Per row: the summed log-probability of ``continuations[i]`` after ``prompts[i]`` (teacher-forced), its
    number of tokens, and the log-probabilities of the token ids ``also`` at its first position. ``desc``: show
    a progress bar with that title."""
    scores: list[tuple[float, int, list[float]]] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None, leave=False):
        batch = encode(tokenizer, list(prompts[start:start + batch_size]),
                       list(continuations[start:start + batch_size]), max_length=context_length(model),
                       padding_side="left")
        logprobs = answer_logits(model, batch).float().log_softmax(-1)
        labels = batch.labels[batch.answer_mask].to(logprobs.device)
        token_scores = logprobs.gather(1, labels[:, None])[:, 0].cpu()
        lengths = [len(ids) for ids in batch.target_ids]
        firsts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        alternatives = logprobs[firsts.to(logprobs.device)][:, list(also)].cpu().tolist()
        scores += [(float(chunk.sum()), len(chunk), alt)
                   for chunk, alt in zip(token_scores.split(lengths), alternatives)]
    return scores


def sst2_accuracy(model: nn.Module, tokenizer, limit: int | None = None, batch_size: int = 32,
                  progress: bool = False) -> float:
    """Zero-shot accuracy (percent) on the bundled SST-2 dev sentences (see the module docstring)."""
    rows = load_sst2("dev", limit)
    prompts = [SST2_TEMPLATE.format(sentence=r.text) for r in rows]
    label_ids = [target_token_ids(tokenizer, prompts[0], word)[1] for word in SST2_LABELS]
    if all(len(ids) == 1 for ids in label_ids):  # one forward scores both words (their only token)
        scored = continuation_logprobs(model, tokenizer, prompts, [SST2_LABELS[0]] * len(rows), batch_size,
                                       also=[ids[0] for ids in label_ids], desc="SST-2" if progress else None)
        by_label = [[row[2][k] for row in scored] for k in range(len(SST2_LABELS))]
    else:
        by_label = [[row[0] for row in continuation_logprobs(model, tokenizer, prompts, [word] * len(rows), batch_size,
                                                             desc=f"SST-2{word}" if progress else None)]
                    for word in SST2_LABELS]
    correct = sum(int(positive > negative) == r.label for r, negative, positive in zip(rows, *by_label))
    return 100.0 * correct / len(rows)


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
               progress: bool = False) -> float:
    """exp(mean token cross-entropy) of ``texts``, each on its own, over the tokens after its first word."""
    pairs = [text.split(" ", 1) for text in texts]
    pairs = [(first, " " + rest) for first, rest in (p for p in pairs if len(p) == 2 and p[1].strip())]
    if not pairs:
        raise ValueError("perplexity needs texts of at least two words")
    scored = continuation_logprobs(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], batch_size,
                                   desc="perplexity" if progress else None)
    return math.exp(-sum(row[0] for row in scored) / sum(row[1] for row in scored))


def general_probe(model: nn.Module, tokenizer, sst2_limit: int | None = None, text_limit: int | None = 500,
                  batch_size: int = 32, progress: bool = False) -> dict[str, float]:
    """``{"sst2_accuracy": %, "perplexity": ...}`` of ``model`` as it is now (edited or not); ``progress``:
    progress bars."""
    texts = [r.text for r in load_sst2("test", text_limit)]
    with raw_prompts(tokenizer):  # both tasks are defined on raw text, also for a model prompted in chat
        return {"sst2_accuracy": round(sst2_accuracy(model, tokenizer, sst2_limit, batch_size, progress), 2),
                "perplexity": round(perplexity(model, tokenizer, texts, batch_size, progress), 3)}
