"""Gradient baselines that edit the same layers as the worlds, through the same delta store.

:func:`optimise_layers` trains one dense (d_in, d_out) delta per layer with Adam on a loss (the deltas ride on
the store's ``pending`` hooks, so no weight is written), then records the result as ONE store step that can be
reverted like any other edit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rledit.deltas import DeltaStore


def optimise_layers(
    store: DeltaStore,
    layer_names: Sequence[str],
    loss_fn: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    stop: Callable[[], bool] | None = None,
    check_every: int = 5,
) -> tuple[int, int]:
    """Minimise ``loss_fn()`` over dense deltas of ``layer_names`` for up to ``steps`` Adam steps.

    ``stop`` (called under ``torch.no_grad`` with the current deltas applied, every ``check_every`` steps) ends
    the optimisation early when it returns True. Returns (store step id, optimiser steps taken).
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"a baseline needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    deltas = {
        name: torch.zeros(store.targets[name].shape, dtype=torch.float32, requires_grad=True)
        for name in layer_names
    }
    optimiser = torch.optim.Adam(list(deltas.values()), lr=lr)
    taken = 0
    for taken in range(1, steps + 1):
        with store.pending(deltas):
            loss = loss_fn()
            optimiser.zero_grad()
            loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"baseline loss became {loss.item()} after {taken} steps; lower its lr")
        optimiser.step()
        if stop is not None and taken % check_every == 0:
            with torch.no_grad(), store.pending(deltas):
                if stop():
                    break
    step_id = store.add({name: delta.detach() for name, delta in deltas.items()})
    return step_id, taken
