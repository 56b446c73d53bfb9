"""Keys and target values of locate-then-edit methods (MEMIT, AlphaEdit), for a batch of edit requests.

* The subject's last token of each prompt is the position where keys are read and where the residual stream
  is shifted (:func:`rledit.tokens.subject_last_token`).
* :func:`optimise_target_values`: for each request, a residual shift δ added to the output of the last edited
  layer's block at that position is optimised (Adam, all requests at once, each with its own δ and loss) so
  that the model predicts the target: loss = target cross-entropy + kl_factor · KL(p₀ ‖ p) on the essence
  prompt ("{subject} is a") + v_weight_decay · ||δ|| / ||h||² (the published form), with ||δ|| clamped to
  clamp_norm_factor · ||h||; each request stops once its loss is below early_stop_loss, and the last of the
  v_steps iterations only reads the loss, as in the published per-request loop. The target value is
  z = h + δ (h: the block output there before the shift). The blocks up to the shifted one do not depend on δ:
  their outputs are recorded once and replayed at every optimisation step (:func:`recorded_blocks`,
  :func:`replayed_blocks`), so a step computes only the blocks above it.
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
from rledit.tokens import (
    TokenBatch,
    answer_logits,
    encode,
    encode_after_prefixes,
    select_rows,
    subject_last_token,
    subject_positions,
    subject_tokens,
    used_columns,
)
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
    blocks before it in ``blocks``: every block below it) for each edit, and the optimisation's trace (``nll``
    and ``loss``: the mean over edits of each edit's latest target cross-entropy and whole loss, before each
    step; ``steps``: the optimiser steps each edit's δ took). See the module docstring.

    ``owner[row]`` is the edit each row of ``edit_batch`` belongs to (its prompt after each context prefix,
    the bare prompt first: :func:`edit_rows`); an edit's δ is shared by its rows, its loss is their mean, and
    z = h + δ with h from its first row. None: one row per edit. ``kl_batch`` has one row per edit.

    Each edit stops on its own, as the published per-request loop does: once its loss is below
    ``early_stop_loss`` its δ is kept as it is and its rows leave the batch, so the steps after that cost only
    the edits still being fitted."""
    block = blocks[-1]
    device = next(model.parameters()).device
    owner = torch.arange(edit_batch.input_ids.shape[0]) if owner is None else owner.cpu()
    n_edits = int(owner.max()) + 1
    first_rows = first_row_of_each(owner)
    seen: dict[str, torch.Tensor] = {}
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
        latest = {"nll": torch.full((n_edits,), float("nan")), "loss": torch.full((n_edits,), float("nan"))}
        done = torch.zeros(n_edits, dtype=torch.bool)
        steps = torch.zeros(n_edits, dtype=torch.long)
        trace: dict[str, list[float]] = {"nll": [], "loss": []}
        with torch.enable_grad():
            active = None
            for iteration in range(hp.v_steps):
                if active is None or len(active) != int((~done).sum()):  # cut again only when edits stopped
                    active = (~done).nonzero()[:, 0]
                    on = active.to(device)
                    rows, subject, outputs, local = edit_part(edit_batch, edit_subject, edit_outputs, owner,
                                                              active)
                    kl_rows, kl_at, kl_outputs_part, _ = edit_part(kl_batch, kl_subject, kl_outputs,
                                                                   torch.arange(n_edits), active)
                with shifted_block(block, *subject, delta[on][local.to(device)], seen), \
                        replayed_blocks(blocks, outputs):
                    row_nll = per_row_target_nll(answer_logits(model, rows), rows)
                nll = mean_per_edit(row_nll, local)
                with shifted_block(block, *kl_at, delta[on], seen), replayed_blocks(blocks, kl_outputs_part):
                    log_probs = last_token_log_probs(model, kl_rows)
                reference = kl_reference[on]
                kl = (reference.exp() * (reference - log_probs)).sum(-1)
                decay = delta[on].norm(dim=1) / h_norm[on].squeeze(1) ** 2
                loss = nll + hp.kl_factor * kl + hp.v_weight_decay * decay
                for name, value in (("nll", nll), ("loss", loss)):
                    latest[name][active] = value.detach().cpu()
                    trace[name].append(float(latest[name].mean()))
                finished = latest["loss"][active] < hp.early_stop_loss
                done[active[finished]] = True
                if bool(done.all()) or iteration == hp.v_steps - 1:  # the last iteration only reads the loss
                    break
                kept = delta.detach().clone()
                optimizer.zero_grad(set_to_none=True)
                loss[~finished.to(loss.device)].sum().backward()
                optimizer.step()
                with torch.no_grad():
                    delta[done.to(device)] = kept[done.to(device)]  # Adam's momentum would move a finished δ
                    limit = hp.clamp_norm_factor * h_norm
                    delta.mul_((limit / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))
                steps[active[~finished]] += 1
    trace["steps"] = steps.tolist()
    return h + delta.detach(), trace


def edit_part(batch: TokenBatch, subject: tuple[torch.Tensor, torch.Tensor], outputs: Sequence[Any],
              owner: torch.Tensor, edits: torch.Tensor) -> tuple[TokenBatch, tuple[torch.Tensor, torch.Tensor],
                                                                  list[Any], torch.Tensor]:
    """The rows of ``edits`` (ascending edit indices) alone: their batch (cut to the columns they use), their
    subject positions in it, the recorded block outputs of those rows and columns (for
    :func:`replayed_blocks`), and each row's index into ``edits``. ``subject`` must name one position per row,
    row by row, as :func:`rledit.tokens.subject_positions` does."""
    if not torch.equal(subject[0].cpu(), torch.arange(len(owner))):
        raise ValueError("edit_part needs one subject position per row, in row order")
    rows = torch.isin(owner, edits).nonzero()[:, 0]
    span = used_columns(batch, rows.tolist())
    cut = [_output_rows(output, rows, span) for output in outputs]
    positions = subject[1].cpu()[rows] - span.start
    return (select_rows(batch, rows.tolist()), (torch.arange(len(rows)), positions), cut,
            torch.searchsorted(edits, owner[rows]))


def _output_rows(output: Any, rows: torch.Tensor, span: slice) -> Any:
    """A block's recorded output (B, L, hidden) or tuple starting with it, cut to ``rows`` and ``span``."""
    if isinstance(output, tuple):
        return (_output_rows(output[0], rows, span), *output[1:])
    return output[rows.to(output.device)][:, span]


def edit_rows(tokenizer: Any, requests: Sequence[EditRequest], prefixes: Sequence[str],
              max_length: int | None) -> tuple[TokenBatch, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The batch of every edit's prompt after each of ``prefixes`` (``""`` first: the bare prompt), edit by
    edit, with the target appended (left padding); the subject's last-token positions in it; and each row's
    edit (``owner``)."""
    batch = encode_after_prefixes(tokenizer, requests, prefixes, max_length)
    tokens = subject_tokens(tokenizer, requests, prefixes)
    owner = torch.arange(len(requests)).repeat_interleave(len(prefixes))
    return batch, subject_positions(batch, tokens), owner


def essence_rows(tokenizer: Any, requests: Sequence[EditRequest],
                 prompt: str) -> tuple[TokenBatch, tuple[torch.Tensor, torch.Tensor]]:
    """Each request's essence prompt (``prompt`` with its subject, e.g. "{} is a"), whose next-token
    distribution the KL term keeps, left-padded, and the subject's last-token positions in it."""
    texts = [prompt.format(r.subject.strip()) for r in requests]
    batch = encode(tokenizer, texts, padding_side="left")
    ends = [subject_last_token(tokenizer, text, r.subject) for text, r in zip(texts, requests)]
    return batch, subject_positions(batch, ends)


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
