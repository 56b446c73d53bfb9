"""Text the model writes itself, standing for its pre-training distribution in the key statistics.

The published MEMIT/AlphaEdit statistics come from ~100k Wikipedia texts; offline there is no Wikipedia, but a
language model's own unconditional samples follow the text it was trained on. :func:`model_samples` draws
``count`` texts of up to ``length`` tokens, each started from the document boundary (the tokenizer's BOS token,
else its EOS token) and sampled with nucleus sampling (top-p 0.95, temperature 1) under a fixed seed, in batches
with the KV cache. They are cached as JSON in ``<cache>/samples/`` per model weights and setting, so the corpus
``model-samples`` (see :class:`rledit.methods.memit.config.LocateEditHparams`) is sampled once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rledit.files import atomic_file
from rledit.methods.memit.corpus import Corpus, CorpusError
from rledit.methods.memit.stats import model_fingerprint
from rledit.methods.runtime import frozen_model
from rledit.models import cache_root

SAMPLES_FORMAT = "rledit-model-samples-v1"
SAMPLES_BATCH = 32


def model_samples(model: nn.Module, tokenizer: Any, count: int, length: int, seed: int = 0) -> Corpus:
    """``count`` texts the model samples unconditionally (see the module docstring), read from the cache when
    drawn before for the same weights, count, length and seed."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CorpusError("model-samples needs a tokenizer with a BOS or EOS token to start the samples from")
    description = {"format": SAMPLES_FORMAT, "model_fingerprint": model_fingerprint(model), "count": count,
                   "length": length, "seed": seed, "start": int(start)}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / "samples" / f"model_samples_n{count}_L{length}_{key}.json"
    if path.is_file():
        return Corpus(json.loads(path.read_text(encoding="utf-8"))["texts"], f"model_samples-{key}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    texts: list[str] = []
    with frozen_model(model), torch.random.fork_rng(devices=[]), tqdm(total=count, desc="model samples",
                                                                       unit="text") as bar:
        for batch_index, begin in enumerate(range(0, count, SAMPLES_BATCH)):
            torch.manual_seed(seed * 100_003 + batch_index)
            rows = min(SAMPLES_BATCH, count - begin)
            ids = torch.full((rows, 1), int(start), dtype=torch.long, device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95,
                                 top_k=0, temperature=1.0, max_new_tokens=length, pad_token_id=pad)
            texts += [tokenizer.decode(row[1:], skip_special_tokens=True).strip() for row in out]
            bar.update(rows)
    texts = [text for text in texts if text]
    if not texts:
        raise CorpusError("the model's samples are all empty")
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(dict(description, texts=texts)), encoding="utf-8")
    return Corpus(texts, f"model_samples-{key}")
