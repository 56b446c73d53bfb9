"""Running the model inside a method without changing it: frozen weights and temporary extra deltas.

Methods that optimise something through the model (FT's weight deltas, MEMIT's residual shift) need gradients
with respect to their own tensors only. :func:`frozen_model` turns every weight's ``requires_grad`` off (so no
``.grad`` buffer is ever created on the LM) and puts the model in eval mode, restoring both afterwards.
:func:`temporary_store` gives a private :class:`rledit.deltas.DeltaStore` on the edited modules whose
``pending`` block adds graph-carrying deltas on top of whatever the editor has applied; it is detached on exit,
so nothing of it outlives the method call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from rledit.deltas import DeltaStore
from rledit.targets import EditTarget


@contextmanager
def frozen_model(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every parameter of ``model`` has ``requires_grad=False`` and every submodule is in eval
    mode; the flags and modes are restored on exit (also on errors)."""
    param_flags = [(p, p.requires_grad) for p in model.parameters()]
    module_modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in param_flags:
            p.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for m, training in module_modes:
            m.training = training
        for p, flag in param_flags:
            p.requires_grad_(flag)


@contextmanager
def temporary_store(model: nn.Module, targets: Sequence[EditTarget]) -> Iterator[DeltaStore]:
    """A private delta store on ``targets`` for the duration of the block (use its ``pending``); its hooks are
    removed on exit. It never holds a step, so outside ``pending`` it adds nothing."""
    store = DeltaStore(model, targets, stack=True)  # on top of the editor's own store, if any
    try:
        yield store
    finally:
        store.detach()
