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
from rledit.methods.memit.corpus import Corpus, load_corpus
from rledit.methods.runtime import frozen_model
from rledit.models import cache_root
from rledit.targets import EditTarget, find_blocks
from rledit.tokens import text_ids

STATS_FORMAT = "rledit-key-stats-v1"


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
                    max_length: int, max_tokens: int | None = None) -> tuple[Path, dict[str, Any]]:
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
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    layers = sorted({t.layer for t in targets})
    modules = "+".join(dict.fromkeys(t.name.rsplit(".", 1)[-1] for t in targets))
    layer_text = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else \
        ".".join(map(str, layers))
    corpus_name = "+".join(part.rsplit("-", 1)[0] for part in corpus_id.split("+"))
    tokens = f"_t{max_tokens}" if max_tokens is not None else ""
    slug = _slug(f"{description['model']}_L{layer_text}.{modules}_{corpus_name}_n{samples}{tokens}")
    return cache_root() / "stats" / f"{slug}_{key}.safetensors", description


def load_or_compute_statistics(model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget], corpus: str,
                               samples: int, max_length: int, batch_size: int, split: str = "train",
                               column: str = "text", max_tokens: int | None = None) -> KeyStatistics:
    """The key statistics of ``targets`` on the first ``samples`` texts of ``corpus`` (and at most
    ``max_tokens`` tokens of them): read from the cache when they were computed before for the same model,
    modules, corpus and sizes; otherwise computed (with a progress bar) and written to the cache atomically."""
    text_corpus = corpus_texts(model, tokenizer, corpus, samples, max_length, split, column)
    path, description = statistics_file(model, targets, text_corpus.identifier, samples, max_length, max_tokens)
    device = next(model.parameters()).device
    if path.is_file():
        return _read(path, targets, device)
    start = time.perf_counter()
    moments, n_tokens = compute_second_moments(model, tokenizer, targets, text_corpus, max_length, batch_size,
                                               max_tokens)
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
    mixed = [text for group in itertools.zip_longest(*(c.texts for c in loaded)) for text in group if text]
    return Corpus(mixed[:samples], "+".join(c.identifier for c in loaded))


@torch.no_grad()
def compute_second_moments(model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget], corpus: Corpus,
                           max_length: int, batch_size: int,
                           max_tokens: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """E[k kᵀ] (fp64) of every target's inputs over the tokens of ``corpus`` (texts cut to ``max_length``
    tokens; at most ``max_tokens`` tokens in all, the last text cut), and the number of tokens. The forward stops
    after the last edited layer."""
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
                if max_tokens is not None:  # the tokens past the budget (row-major) are not counted
                    attention = attention * (attention.flatten().cumsum(0) <= max_tokens - n_tokens).reshape(
                        attention.shape).long()
                    kept = attention.any(1)
                    input_ids, attention = input_ids[kept], attention[kept]
                mask_holder["mask"] = attention.bool().to(device)
                positions = (attention.cumsum(1) - 1).clamp(min=0)
                try:
                    model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                          position_ids=positions.to(device), use_cache=False)
                except _StopForward:
                    pass
                n_tokens += int(attention.sum())
                bar.update(len(texts))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(n_tokens, 1) for name, total in sums.items()}, n_tokens


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
