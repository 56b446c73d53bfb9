"""Key statistics of the edited modules on a text corpus, computed once and cached on disk.

For every edited module the second moment C = E[k kᵀ] (d_in × d_in) of its inputs k over all (non-padding)
tokens of the corpus sample stands for the knowledge an edit must preserve (MEMIT, AlphaEdit). Computing it
takes forward passes over thousands of texts, so it is cached in
``<cache>/stats/<model>_L<layers>.<modules>_<corpus>_n<samples>_<key>.safetensors``, where ``<cache>`` is
rledit's cache folder (:func:`rledit.models.cache_root`) and ``key`` hashes everything the numbers depend on:
a fingerprint of the model's weights, the edited modules and their shapes, the corpus content identifier, the
sample size and the token limit. The file's metadata records how long the computation took, so a cache hit
can still report it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from rledit.files import atomic_file
from rledit.methods.memit.corpus import (
    QUESTION_CORPORA,
    SUBJECT_CORPORA,
    Corpus,
    ParaphrasePairs,
    load_corpus,
    paraphrase_pairs,
)
from rledit.methods.runtime import frozen_model
from rledit.models import cache_root
from rledit.targets import EditTarget, find_blocks
from rledit.tokens import encode, model_inputs, subject_end, subject_last_token, subject_positions, text_ids

STATS_FORMAT = "rledit-key-stats-v1"
POSITIONS = ("all", "answers", "subjects")  # which tokens of each corpus text the statistics count


@dataclass
class KeyStatistics:
    """Per edited module the second moment E[k kᵀ] of its inputs (fp64, on the model's device), and where
    it came from."""

    second_moments: dict[str, torch.Tensor]
    n_texts: int
    n_tokens: int
    compute_seconds: float  # how long computing them took, when they were computed (also for a cache hit)
    path: Path
    cached: bool  # True when read from the cache file


class _StopForward(Exception):
    """Raised after the last edited layer ran: nothing later is needed for the statistics."""


def model_fingerprint(model: nn.Module) -> str:
    """A sha256 over every parameter's name, dtype, shape and an evenly strided sample of its values (at most
    ~4k values per tensor): cheap, and different for different weights in practice."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def statistics_file(model: nn.Module, targets: Sequence[EditTarget], corpus_id: str, samples: int,
                    max_length: int, max_tokens: int | None = None,
                    positions: str = "all") -> tuple[Path, dict[str, Any]]:
    """The cache file for these statistics and the description hashed into its name."""
    description = {
        "format": STATS_FORMAT,
        "model": _model_name(model),
        "model_fingerprint": model_fingerprint(model),
        "targets": [[t.name, t.d_in, t.d_out] for t in targets],
        "corpus": corpus_id,
        "samples": samples,
        "max_length": max_length,
    }
    if max_tokens is not None:  # (absent from older cache keys, which stay valid)
        description["max_tokens"] = max_tokens
    if positions != "all":
        description["positions"] = positions
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    layers = sorted({t.layer for t in targets})
    modules = "+".join(dict.fromkeys(t.name.rsplit(".", 1)[-1] for t in targets))
    layer_text = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else \
        ".".join(map(str, layers))
    corpus_name = "+".join(part.rsplit("-", 1)[0] for part in corpus_id.split("+"))
    tokens = f"_t{max_tokens}" if max_tokens is not None else ""
    where = f"_{positions}" if positions != "all" else ""
    slug = _slug(f"{description['model']}_L{layer_text}.{modules}_{corpus_name}_n{samples}{tokens}{where}")
    return cache_root() / "stats" / f"{slug}_{key}.safetensors", description


def load_or_compute_statistics(model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget], corpus: str,
                               samples: int, max_length: int, batch_size: int, split: str = "train",
                               column: str = "text", max_tokens: int | None = None,
                               positions: str = "all") -> KeyStatistics:
    """The key statistics of ``targets`` on the first ``samples`` texts of ``corpus`` (and at most
    ``max_tokens`` tokens of them): read from the cache when they were computed before for the same model,
    modules, corpus and sizes; otherwise computed (with a progress bar) and written to the cache atomically.

    ``positions="answers"`` counts only the tokens an edit's features are read at, had the text been an edit
    (the prompt's last token and the answer's tokens but the last), for question-answer corpora
    (``zsre-train-questions``, ``zsre-train-facts``, ``counterfact-train-facts`` and mixes of them);
    ``positions="subjects"`` counts only each text's subject's last token, where a subject-keyed edit writes, for
    the subject corpora (``zsre-train-subjects``, ``counterfact-train-subjects``); "all" (default) counts every
    token."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    text_corpus = corpus_texts(model, tokenizer, corpus, samples, max_length, split, column)
    if positions == "answers" and text_corpus.answer_starts is None:
        raise ValueError(f"answer-position statistics need a question-answer corpus ({', '.join(QUESTION_CORPORA)}"
                         f" or a mix of them); {corpus!r} is plain text")
    if positions == "subjects" and text_corpus.subject_ends is None:
        raise ValueError(f"subject-position statistics need a corpus that knows its subjects "
                         f"({', '.join(SUBJECT_CORPORA)} or a mix of them); {corpus!r} does not")
    path, description = statistics_file(model, targets, text_corpus.identifier, samples, max_length, max_tokens,
                                        positions)
    device = next(model.parameters()).device
    if path.is_file():
        return _read(path, targets, device)
    start = time.perf_counter()
    moments, n_tokens = compute_second_moments(model, tokenizer, targets, text_corpus, max_length, batch_size,
                                               max_tokens, positions)
    seconds = time.perf_counter() - start
    meta = dict(description, n_texts=len(text_corpus.texts), n_tokens=n_tokens, compute_seconds=seconds)
    _write(path, {name: m.to(torch.float32) for name, m in moments.items()}, meta)
    return KeyStatistics(moments, len(text_corpus.texts), n_tokens, seconds, path, cached=False)


def corpus_texts(model: nn.Module, tokenizer: Any, corpus: str, samples: int, max_length: int, split: str = "train",
                 column: str = "text") -> Corpus:
    """The texts of ``corpus`` (:func:`rledit.methods.memit.corpus.load_corpus`), where ``model-samples`` is
    ``samples`` texts of ``max_length`` tokens the model writes (:mod:`rledit.methods.memit.samples`) and
    ``a+b+...`` takes the first ``samples`` texts of its parts in turn (one of each, round-robin)."""
    parts = [corpus] if Path(corpus).expanduser().exists() else corpus.split("+")
    loaded = []
    for part in parts:
        if part == "model-samples":
            from rledit.methods.memit.samples import model_samples

            loaded.append(model_samples(model, tokenizer, samples, max_length))
        else:
            loaded.append(load_corpus(part, samples, split, column))
    if len(loaded) == 1:
        return loaded[0]
    def marks(c: Corpus, field: str) -> list[int | None]:
        return getattr(c, field) if getattr(c, field) is not None else [None] * len(c.texts)

    rows = [zip(c.texts, marks(c, "answer_starts"), marks(c, "subject_ends")) for c in loaded]
    mixed = [item for group in itertools.zip_longest(*rows) for item in group
             if item is not None and item[0]][:samples]
    starts_known = all(c.answer_starts is not None for c in loaded)
    ends_known = all(c.subject_ends is not None for c in loaded)
    return Corpus([text for text, _, _ in mixed], "+".join(c.identifier for c in loaded),
                  [start for _, start, _ in mixed] if starts_known else None,
                  [end for _, _, end in mixed] if ends_known else None)


@torch.no_grad()
def compute_second_moments(model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget], corpus: Corpus,
                           max_length: int, batch_size: int,
                           max_tokens: int | None = None,
                           positions: str = "all") -> tuple[dict[str, torch.Tensor], int]:
    """E[k kᵀ] (fp64) of every target's inputs over the tokens of ``corpus`` (texts cut to ``max_length``
    tokens; at most ``max_tokens`` tokens in all, the last text cut), and the number of tokens. The forward stops
    after the last edited layer. ``positions="answers"`` keeps, of each text, only its answer positions (the
    prompt's last token up to the answer's last but one; ``corpus.answer_starts`` says where the answers begin),
    ``"subjects"`` only its subject's last token (``corpus.subject_ends``)."""
    device = next(model.parameters()).device
    sums = {t.name: torch.zeros(t.d_in, t.d_in, dtype=torch.float64, device=device) for t in targets}
    mask_holder: dict[str, torch.Tensor] = {}

    def accumulate(target: EditTarget):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            keys = args[0][mask_holder["mask"]].to(torch.float32)
            sums[target.name] += (keys.T @ keys).to(torch.float64)
        return hook

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _StopForward

    last_block = find_blocks(model)[max(t.layer for t in targets)][1] if all(t.layer >= 0 for t in targets) \
        else None
    handles = [t.module.register_forward_hook(accumulate(t)) for t in targets]
    if last_block is not None:
        handles.append(last_block.register_forward_hook(stop))
    n_tokens = 0
    try:
        with frozen_model(model), tqdm(total=len(corpus.texts), desc="key statistics", unit="text") as bar:
            for begin in range(0, len(corpus.texts), batch_size):
                if max_tokens is not None and n_tokens >= max_tokens:
                    break
                texts = corpus.texts[begin:begin + batch_size]
                input_ids, attention = _right_padded(tokenizer, texts, max_length)
                counted = attention
                if positions == "answers":
                    counted = attention * _answer_positions(tokenizer, texts,
                                                            corpus.answer_starts[begin:begin + batch_size], attention)
                elif positions == "subjects":
                    counted = attention * _subject_positions(tokenizer, texts,
                                                             corpus.subject_ends[begin:begin + batch_size], attention)
                if max_tokens is not None:  # the tokens past the budget (row-major) are not counted
                    counted = counted * (counted.flatten().cumsum(0) <= max_tokens - n_tokens).reshape(
                        counted.shape).long()
                    if positions == "all":  # nor run: the model sees each text up to its last counted token
                        attention = counted
                    kept = counted.any(1)
                    input_ids, attention, counted = input_ids[kept], attention[kept], counted[kept]
                mask_holder["mask"] = counted.bool().to(device)
                position_ids = (attention.cumsum(1) - 1).clamp(min=0)
                try:
                    model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                          position_ids=position_ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                n_tokens += int(counted.sum())
                bar.update(len(texts))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(n_tokens, 1) for name, total in sums.items()}, n_tokens


def load_or_compute_invariance(model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget], source: str,
                               samples: int, batch_size: int, positions: str = "answers") -> KeyStatistics:
    """Per edited module the second moment E[(k' - k)(k' - k)ᵀ] of how a paraphrase moves the module's input:
    k at an answer position of a training prompt asked for its new target, k' at the same answer position of a
    paraphrase of it (``source``, :func:`rledit.methods.memit.corpus.paraphrase_pairs`; its first ``samples``
    pairs). A solve that penalises these directions writes edits that read the same through a paraphrase
    (rledit's ``invariance_weight``). ``positions="subjects"`` compares the subject's last token instead, where
    a subject-keyed edit writes (pairs whose prompt or paraphrase does not name the subject are left out). Cached
    like the corpus statistics; ``n_texts`` counts pairs, ``n_tokens`` the positions compared."""
    if positions not in ("answers", "subjects"):
        raise ValueError(f"paraphrase shifts are read at 'answers' or 'subjects', got {positions!r}")
    pairs = paraphrase_pairs(source, samples)
    where = "paraphrase-shifts" if positions == "answers" else "paraphrase-shifts-subjects"  # (part of the cache key)
    path, description = statistics_file(model, targets, pairs.identifier, samples, 0, positions=where)
    device = next(model.parameters()).device
    if path.is_file():
        return _read(path, targets, device)
    start = time.perf_counter()
    moments, n_rows = compute_paraphrase_shifts(model, tokenizer, targets, pairs, batch_size, positions)
    seconds = time.perf_counter() - start
    _write(path, {name: m.to(torch.float32) for name, m in moments.items()},
           dict(description, n_texts=len(pairs.prompts), n_tokens=n_rows, compute_seconds=seconds))
    return KeyStatistics(moments, len(pairs.prompts), n_rows, seconds, path, cached=False)


def compute_paraphrase_shifts(model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget], pairs: ParaphrasePairs,
                              batch_size: int, positions: str = "answers") -> tuple[dict[str, torch.Tensor], int]:
    """E[(k' - k)(k' - k)ᵀ] (fp64) of every target's inputs over the answer positions of ``pairs`` (see
    :func:`load_or_compute_invariance`; or at the subject's last token), and the number of positions compared. A
    pair whose two rows tokenise the answer into different numbers of tokens is left out."""
    device = next(model.parameters()).device
    sums = {t.name: torch.zeros(t.d_in, t.d_in, dtype=torch.float64, device=device) for t in targets}
    captured: dict[str, torch.Tensor] = {}

    def capture(target: EditTarget):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured[target.name] = args[0].to(torch.float32)
        return hook

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _StopForward

    def read_keys(texts: list[str], answers: list[str], subjects: list[str]) -> dict[str, list[torch.Tensor]]:
        """Per target, per text, its inputs at the answer positions (n_answer_tokens, d_in), or at the subject's
        last token (1, d_in)."""
        batch = encode(tokenizer, texts, answers)
        mask = batch.answer_mask
        if positions == "subjects":
            mask = torch.zeros_like(mask)
            mask[subject_positions(batch, [subject_last_token(tokenizer, t, s) for t, s in zip(texts, subjects)])] = True
        with contextlib.suppress(_StopForward):
            model(**model_inputs(model, batch), use_cache=False)
        mask = mask.to(device)
        return {name: [keys[row][mask[row]] for row in range(len(texts))] for name, keys in captured.items()}

    handles = [t.module.register_forward_hook(capture(t)) for t in targets]
    handles.append(find_blocks(model)[max(t.layer for t in targets)][1].register_forward_hook(stop))
    n_rows = 0
    try:
        with frozen_model(model), tqdm(total=len(pairs.prompts), desc="paraphrase shifts", unit="pair") as bar:
            for begin in range(0, len(pairs.prompts), batch_size):
                chunk = [row for row in range(begin, min(begin + batch_size, len(pairs.prompts)))
                         if positions == "answers" or all(pairs.subjects[row] and subject_end(text, pairs.subjects[row])
                                                          for text in (pairs.prompts[row], pairs.paraphrases[row]))]
                bar.update(min(batch_size, len(pairs.prompts) - begin))
                if not chunk:
                    continue
                answers, subjects = [pairs.answers[r] for r in chunk], [pairs.subjects[r] for r in chunk]
                prompt_keys = read_keys([pairs.prompts[r] for r in chunk], answers, subjects)
                paraphrase_keys = read_keys([pairs.paraphrases[r] for r in chunk], answers, subjects)
                for name, total in sums.items():
                    shifts = [after - before for before, after in zip(prompt_keys[name], paraphrase_keys[name])
                              if before.shape == after.shape]
                    if shifts:
                        rows = torch.cat(shifts)
                        total += (rows.T @ rows).to(torch.float64)
                        if name == targets[0].name:  # every target compares the same positions
                            n_rows += len(rows)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(n_rows, 1) for name, total in sums.items()}, n_rows


def _answer_positions(tokenizer: Any, texts: list[str], starts: list[int], attention: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1: per right-padded row, the positions from the prompt's last token to the last token but one."""
    mask = torch.zeros_like(attention)
    for row, (text, start) in enumerate(zip(texts, starts)):
        first = len(text_ids(tokenizer, text[:start].rstrip())) - 1
        last = int(attention[row].sum()) - 1
        mask[row, max(first, 0):last] = 1
    return mask


def _subject_positions(tokenizer: Any, texts: list[str], ends: list[int], attention: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1: per right-padded row, its subject's last token (none when a text was cut before it)."""
    mask = torch.zeros_like(attention)
    for row, (text, end) in enumerate(zip(texts, ends)):
        last = len(text_ids(tokenizer, text[:end])) - 1
        if 0 <= last < int(attention[row].sum()):
            mask[row, last] = 1
    return mask


def _right_padded(tokenizer: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [text_ids(tokenizer, text)[:max_length] for text in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    return ids, mask


def _read(path: Path, targets: Sequence[EditTarget], device: torch.device) -> KeyStatistics:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rledit"])
        missing = [t.name for t in targets if t.name not in f.keys()]  # noqa: SIM118 (safe_open has no __contains__)
        if missing:
            raise ValueError(f"{path} lacks statistics for {missing}; delete the file to recompute it")
        moments = {t.name: f.get_tensor(t.name).to(device=device, dtype=torch.float64) for t in targets}
    return KeyStatistics(moments, meta["n_texts"], meta["n_tokens"], meta["compute_seconds"], path, cached=True)


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    with atomic_file(path) as temporary:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temporary),
                  metadata={"rledit": json.dumps(meta)})


def _model_name(model: nn.Module) -> str:
    name = str(getattr(model, "name_or_path", "") or "").rstrip("/")
    if name:
        return Path(name).name
    return getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text)
