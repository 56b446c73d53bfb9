"""Keys and target values of locate-then-edit methods (MEMIT, AlphaEdit), for a batch of edit requests.

* The subject's last token of each prompt is the position where keys are read and where the residual stream
  is shifted (:func:`rledit.tokens.subject_last_token`).
* :func:`optimise_target_values`: for each request, a residual shift δ added to the output of the last edited
  layer's block at that position is optimised (Adam, all requests at once, each with its own δ and loss) so
  that the model predicts the target: loss = target cross-entropy + kl_factor · KL(p₀ ‖ p) on the essence
  prompt ("{subject} is a") + v_weight_decay · ||δ||²/||h||², with ||δ|| clamped to clamp_norm_factor · ||h||.
  The target value is z = h + δ (h: the block output there before the shift). The blocks up to the shifted
  one do not depend on δ: their outputs are recorded once and replayed at every optimisation step
  (:func:`recorded_blocks`, :func:`replayed_blocks`), so a step computes only the blocks above it.
* :func:`keys_and_outputs` reads, in one forward pass, an edited module's inputs and that block's outputs at the
  subject positions (the caller adds earlier layers' pending updates).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rledit.hooks import per_row_target_nll
from rledit.methods.memit.config import LocateEditHparams
from rledit.methods.runtime import frozen_model
from rledit.tokens import TokenBatch, answer_logits, encode_after_prefixes, subject_positions, subject_tokens
from rledit.types import EditRequest


@contextmanager
def shifted_block(block: nn.Module, rows: torch.Tensor, positions: torch.Tensor,
                  delta: torch.Tensor | None, seen: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, ``block``'s output gets ``delta[j]`` added at (rows[j], positions[j]) (no shift when
    ``delta`` is None); ``seen["before"]`` receives the output rows there before the shift (detached, fp32)."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        index = (rows.to(hidden.device), positions.to(hidden.device))
        seen["before"] = hidden[index].detach().to(torch.float32)
        if delta is None:
            return None
        shifted = hidden + torch.zeros_like(hidden).index_put(index, delta.to(hidden.dtype))
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def last_token_log_probs(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Log-probabilities (B, V), fp32, of the next token after each row of a LEFT-padded prompt-only batch."""
    device = next(model.parameters()).device
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device), use_cache=False, logits_to_keep=1)
    return F.log_softmax(out.logits[:, -1].float(), dim=-1)


@contextmanager
def recorded_blocks(blocks: Sequence[nn.Module], outputs: list[Any]) -> Iterator[None]:
    """While active, a forward pass stores what each of ``blocks`` returns in ``outputs`` (in block order)."""
    outputs.clear()
    handles = [block.register_forward_hook(lambda module, args, output: outputs.append(output))
               for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replayed_blocks(blocks: Sequence[nn.Module], outputs: Sequence[Any]) -> Iterator[None]:
    """While active, each of ``blocks`` skips its computation and returns its recorded output (its hooks still
    run). Exact for a forward on the same batch as the recording, as long as nothing below changes."""
    if len(outputs) != len(blocks):
        raise RuntimeError(f"recorded {len(outputs)} block outputs for {len(blocks)} blocks")
    saved = [block.__dict__.get("forward") for block in blocks]  # e.g. an accelerate wrapper
    for block, output in zip(blocks, outputs):
        block.forward = lambda *args, _output=output, **kwargs: _output
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def optimise_target_values(model: nn.Module, blocks: Sequence[nn.Module], edit_batch: TokenBatch,
                           edit_subject: tuple[torch.Tensor, torch.Tensor], kl_batch: TokenBatch,
                           kl_subject: tuple[torch.Tensor, torch.Tensor], hp: LocateEditHparams,
                           owner: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Target values z (B, hidden), fp32, at the output of ``blocks[-1]`` (the last edited layer's block; the
    blocks before it in ``blocks``: every block below it) for each edit, and the optimisation's trace (``nll``:
    mean target cross-entropy before each step). See the module docstring.

    ``owner[row]`` is the edit each row of ``edit_batch`` belongs to (its prompt after each context prefix,
    the bare prompt first: :func:`edit_rows`); an edit's δ is shared by its rows, its loss is their mean, and
    z = h + δ with h from its first row. None: one row per edit. ``kl_batch`` has one row per edit."""
    block = blocks[-1]
    device = next(model.parameters()).device
    owner = torch.arange(edit_batch.input_ids.shape[0]) if owner is None else owner
    first_rows = first_row_of_each(owner)
    seen: dict[str, torch.Tensor] = {}
    trace: dict[str, list[float]] = {"nll": []}
    kl_outputs: list[Any] = []
    edit_outputs: list[Any] = []
    with frozen_model(model):
        with torch.no_grad(), shifted_block(block, *kl_subject, None, seen), recorded_blocks(blocks, kl_outputs):
            kl_reference = last_token_log_probs(model, kl_batch)
        with torch.no_grad(), shifted_block(block, *edit_subject, None, seen), recorded_blocks(blocks, edit_outputs):
            answer_logits(model, edit_batch)
        h = seen["before"][first_rows].to(device)
        h_norm = h.norm(dim=1, keepdim=True).clamp_min(1e-8)
        delta = torch.zeros_like(h, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
        with torch.enable_grad():
            for _ in range(hp.v_steps):
                with shifted_block(block, *edit_subject, delta[owner.to(device)], seen), \
                        replayed_blocks(blocks, edit_outputs):
                    row_nll = per_row_target_nll(answer_logits(model, edit_batch), edit_batch)
                nll = mean_per_edit(row_nll, owner)
                trace["nll"].append(float(nll.detach().mean()))
                if bool((nll.detach() < hp.early_stop_loss).all()):
                    break
                with shifted_block(block, *kl_subject, delta, seen), replayed_blocks(blocks, kl_outputs):
                    log_probs = last_token_log_probs(model, kl_batch)
                kl = (kl_reference.exp() * (kl_reference - log_probs)).sum(-1)
                decay = (delta.norm(dim=1, keepdim=True) / h_norm).squeeze(1) ** 2
                loss = (nll + hp.kl_factor * kl + hp.v_weight_decay * decay).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    limit = hp.clamp_norm_factor * h_norm
                    delta.mul_((limit / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))
    return h + delta.detach(), trace


def edit_rows(tokenizer: Any, requests: Sequence[EditRequest], prefixes: Sequence[str],
              max_length: int | None) -> tuple[TokenBatch, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The batch of every edit's prompt after each of ``prefixes`` (``""`` first: the bare prompt), edit by
    edit, with the target appended (left padding); the subject's last-token positions in it; and each row's
    edit (``owner``)."""
    batch = encode_after_prefixes(tokenizer, requests, prefixes, max_length)
    tokens = subject_tokens(tokenizer, requests, prefixes)
    owner = torch.arange(len(requests)).repeat_interleave(len(prefixes))
    return batch, subject_positions(batch, tokens), owner


def first_row_of_each(owner: torch.Tensor) -> torch.Tensor:
    """For each edit 0..E-1, the index of its first row in ``owner`` (rows grouped by edit, in order)."""
    counts = torch.bincount(owner)
    return torch.cumsum(counts, 0) - counts


def mean_per_edit(rows: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """The mean of ``rows`` (R, ...) over the rows of each edit (E, ...)."""
    owner = owner.to(rows.device)
    counts = torch.bincount(owner).to(rows.dtype).reshape(-1, *([1] * (rows.dim() - 1)))
    totals = torch.zeros((len(counts), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    return totals.index_add(0, owner, rows) / counts


@torch.no_grad()
def keys_and_outputs(model: nn.Module, batch: TokenBatch, subject: tuple[torch.Tensor, torch.Tensor],
                     module: nn.Module, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s inputs (B, d_in) and ``block``'s outputs (B, hidden) at the subject positions, fp32, from
    one forward pass of ``batch`` on the model as it currently computes."""
    rows, positions = subject
    seen: dict[str, torch.Tensor] = {}

    def read_keys(mod: nn.Module, args: tuple, output: Any) -> None:
        inputs = args[0]
        seen["keys"] = inputs[rows.to(inputs.device), positions.to(inputs.device)].to(torch.float32)

    handle = module.register_forward_hook(read_keys)
    try:
        with frozen_model(model), shifted_block(block, rows, positions, None, seen):
            answer_logits(model, batch)
    finally:
        handle.remove()
    return seen["keys"], seen["before"]
