"""Context prefixes of the locate-then-edit methods: short texts the model itself writes, put before each edit
prompt so that an edit's key and target value do not hang on the exact wording that precedes the subject.

As published for ROME, MEMIT and AlphaEdit: each edit's key is the mean of the subject's last-token key over
the bare prompt and the prompt after every prefix, and its residual shift is optimised so that the target
follows each of them (:mod:`rledit.methods.memit.method`). The prefixes are sampled from the model (top-k,
from the starts "The", "Therefore", "Because", "I", "You" in turn, a fixed seed) once per model and setting,
and cached as JSON in ``<cache>/contexts/`` (:func:`rledit.models.cache_root`).

Sampling starts where a document starts: after the BOS token a tokenizer puts before every text, or, for a
tokenizer that frames text with nothing (GPT-2's, SmolLM2's), after the end-of-text token that separates its
pre-training documents. Without it SmolLM2-135M continues a lone "The" with "-" and writes no sentence
("The-1998-200."); after "<|endoftext|>" it writes "The key is to create a narrative that not only".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rledit.files import atomic_file
from rledit.methods.memit.stats import model_fingerprint
from rledit.methods.runtime import frozen_model
from rledit.models import cache_root
from rledit.tokens import text_ids

CONTEXTS_FORMAT = "rledit-context-prefixes-v2"  # v2: sampled after the document start
CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")


def check_context_lengths(lengths: list[list[int]]) -> None:
    """Raise ValueError unless ``lengths`` holds ``[tokens, count]`` pairs of positive integers (the context
    prefixes' setting of MEMIT, AlphaEdit and RLEdit; ``[]``: the bare prompt only)."""
    for pair in lengths:
        if len(pair) != 2 or min(pair) < 1:
            raise ValueError(f"context_lengths must hold [tokens, count] pairs of positive integers (e.g. "
                             f"[[10, 5]]; [] for the bare prompt only), got {lengths}")


def context_prefixes(model: nn.Module, tokenizer: Any, lengths: Sequence[Sequence[int]], seed: int,
                     top_k: int) -> list[str]:
    """``[""]`` (the bare prompt) followed, for each ``[tokens, count]`` of ``lengths``, by ``count`` texts of
    at most ``tokens`` tokens (their start word included) sampled from ``model``, each ending in ". ". Read
    from the cache when made before for the same model weights and settings; otherwise sampled and cached."""
    if not lengths:
        return [""]
    description = {"format": CONTEXTS_FORMAT, "model_fingerprint": model_fingerprint(model),
                   "tokenizer": type(tokenizer).__name__, "vocab": len(tokenizer),
                   "lengths": [list(map(int, pair)) for pair in lengths], "seed": seed, "top_k": top_k}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_root() / "contexts" / f"prefixes_{key}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["prefixes"]
    generator = torch.Generator().manual_seed(seed)
    texts = [sample_text(model, tokenizer, CONTEXT_STARTS[i % len(CONTEXT_STARTS)], tokens, top_k, generator)
             for tokens, count in lengths for i in range(count)]
    prefixes = [""] + [text.replace("{", " ").replace("}", " ").strip() + ". " for text in texts]
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(dict(description, prefixes=prefixes), indent=1), encoding="utf-8")
    return prefixes


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer: Any, start: str, tokens: int, top_k: int,
                generator: torch.Generator) -> str:
    """``start`` continued by top-k sampling (``generator`` on the CPU) up to ``tokens`` tokens in all (the
    start's included) or the end-of-sequence token, decoded without special tokens."""
    device = next(model.parameters()).device
    ids = text_ids(tokenizer, start)
    first = len(ids) - len(text_ids(tokenizer, start, add_special_tokens=False))  # BOS etc. are not counted
    separator = document_separator(tokenizer)
    if first == 0 and separator is not None:  # no framing: start the text as a new document
        ids, first = [separator, *ids], 1
    stops = {tokenizer.eos_token_id, separator} - {None}
    with frozen_model(model):
        while len(ids) - first < tokens:
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
            top = torch.topk(logits.float().cpu(), min(top_k, logits.shape[-1]))
            choice = int(top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=generator)])
            if choice in stops:
                break
            ids.append(choice)
    return tokenizer.decode(ids[first:], skip_special_tokens=True)


def document_separator(tokenizer: Any) -> int | None:
    """The token between pre-training documents: "<|endoftext|>" where the vocabulary has it (GPT-2, SmolLM2,
    Qwen), otherwise the end-of-sequence token (None when there is neither)."""
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(separator, int) and separator != tokenizer.unk_token_id:
        return separator
    return tokenizer.eos_token_id
