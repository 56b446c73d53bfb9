"""Batched greedy decoding with padding-aware positions, for the generation protocol.

Prompts are tokenised by :func:`rledit.tokens.encode` and re-padded on the left here (whatever the tokenizer's
padding side), so every row's last real token sits in the last column; position ids count only real tokens
and a key/value cache carries the prefix, so a row decodes exactly as it would alone. Each prompt has its own
token budget; a row stops at its budget or at the end-of-sequence token, which is not part of the output.
Under several processes (:mod:`rledit.distributed`) each decodes every N-th prompt and all of them receive
every continuation, as the teacher-forced scorer shares its pairs out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rledit.distributed import gather, world
from rledit.eval.forced import chunks, evaluation_mode
from rledit.tokens import context_length, encode


def greedy_decode(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: Sequence[int],
    batch_size: int = 32,
) -> list[list[int]]:
    """The greedy continuation (token ids) of each prompt, at most ``max_new_tokens[i]`` tokens for prompt i."""
    if len(max_new_tokens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    if any(n < 1 for n in max_new_tokens):
        raise ValueError("every token budget must be at least 1")
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # similar lengths share a batch
    rank, size = world()
    mine = order[rank::size]
    decoded_rows: dict[int, list[int]] = {}
    desc = f"decoding {len(order)} prompts" + (f" ({len(mine)} in this process)" if size > 1 else "")
    with evaluation_mode(model):
        for batch_rows in chunks(mine, batch_size, desc=desc if rank == 0 else None):
            decoded = _decode_batch(model, tokenizer, [prompts[i] for i in batch_rows],
                                    [max_new_tokens[i] for i in batch_rows])
            decoded_rows.update(zip(batch_rows, decoded))
    if size > 1:
        decoded_rows = {i: ids for part in gather(decoded_rows) for i, ids in part.items()}
    return [decoded_rows[i] for i in range(len(prompts))]


def _decode_batch(model: nn.Module, tokenizer, prompts: list[str], budgets: list[int]) -> list[list[int]]:
    device = next(model.parameters()).device
    encoded = encode(tokenizer, prompts)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(encoded.input_ids, encoded.attention_mask)]
    limit = context_length(model)
    for prompt, row, budget in zip(prompts, rows, budgets):
        if limit is not None and len(row) + budget > limit:
            raise ValueError(f"prompt {prompt[:60]!r} is {len(row)} tokens; with {budget} new tokens it exceeds "
                             f"the model's context of {limit}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)

    eos = tokenizer.eos_token_id
    outputs: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    for step in range(max(budgets)):
        next_ids = out.logits[:, -1, :].argmax(dim=-1)
        for row, token in enumerate(next_ids.tolist()):
            if finished[row]:
                continue
            if token == eos:
                finished[row] = True
                continue
            outputs[row].append(token)
            finished[row] = len(outputs[row]) >= budgets[row]
        if all(finished) or step + 1 == max(budgets):
            break
        attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=attention, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return outputs
