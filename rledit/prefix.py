"""Run the decoder layers below the first edited one once per batch, not once per forward.

Edits only change the edited MLP modules, so the residual stream entering the first edited layer is the same
for a given batch however many deltas are applied. Training an editor runs the same batches through the model
many times (every step of the backtracking window); :class:`Prefix` computes that hidden state once
(:meth:`Prefix.attach`) and, inside :meth:`Prefix.skipped`, runs only the layers from the first edited one on,
starting from it. The logits are those of the full model (tested to 1e-5 on every supported architecture).

Only architectures whose forward uses ``inputs_embeds`` as the residual stream as is are supported (no
position embeddings or scaling added to it): Llama, Mistral, Qwen2, GPT-NeoX, GPT-J. Others get ``None`` from
:meth:`Prefix.for_targets` and run in full.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from rledit.targets import EditTarget
from rledit.tokens import TokenBatch, model_inputs

# model_type -> attribute path of the decoder layer list
LAYER_LISTS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "gptj": "transformer.h",
}


class _Reached(Exception):
    """Raised by the pre-hook to end a forward at the first edited layer."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


@dataclass(frozen=True)
class Prefix:
    """The unedited layers ``layers[:start]`` of a model's decoder stack (``owner.<attr>``), or of the upper part
    another prefix's :meth:`skipped` leaves (a prefix of a prefix: the passes that write only the upper edited
    layers, :meth:`rledit.methods.rledit.method.RLEditMethod.later_passes`)."""

    model: nn.Module
    owner: nn.Module
    attr: str
    start: int

    @classmethod
    def for_targets(cls, model: nn.Module, targets: Sequence[EditTarget]) -> Prefix | None:
        """The prefix below the lowest edited layer, or None when the architecture is not supported or no layer
        can be skipped."""
        path = LAYER_LISTS.get(getattr(getattr(model, "config", None), "model_type", None))
        layers_known = all(t.layer >= 0 for t in targets)
        if path is None or not targets or not layers_known:
            return None
        owner_path, attr = path.rsplit(".", 1)
        owner = model.get_submodule(owner_path)
        lowest = min(targets, key=lambda t: t.layer)
        # the index in the layer list as it is now: inside another prefix's skipped() it starts at that one's start
        start = next((i for i, layer in enumerate(getattr(owner, attr))
                      if any(m is lowest.module for m in layer.modules())), None)
        if start is None:
            raise RuntimeError(f"{lowest.name} is not in the layers {path} runs now; cannot skip the layers below it")
        return cls(model, owner, attr, start) if start > 0 else None

    @property
    def nested(self) -> bool:
        """Whether the layer list is another prefix's upper part now (made inside its :meth:`skipped`: ``start``
        counts from that prefix's start, and the batches carry that prefix's hidden state)."""
        return len(getattr(self.owner, self.attr)) < self.model.config.num_hidden_layers

    @torch.no_grad()
    def hidden(self, batch: TokenBatch) -> torch.Tensor:
        """The residual stream entering layer ``start`` for ``batch`` (B, L, d), from the full input ids, or,
        inside another prefix's :meth:`skipped` with ``batch`` carrying that prefix's hidden state, from it."""
        layer = getattr(self.owner, self.attr)[self.start]
        if self.nested and batch.inputs_embeds is None:
            raise RuntimeError("inside another prefix's skipped() the batch must carry that prefix's hidden state")

        def stop(module: nn.Module, args: tuple, kwargs: dict):
            raise _Reached(args[0] if args else kwargs["hidden_states"])

        handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(**model_inputs(self.model, batch if self.nested else replace(batch, inputs_embeds=None)),
                       use_cache=False)
        except _Reached as reached:
            return reached.hidden.detach()
        finally:
            handle.remove()
        raise RuntimeError(f"layer {self.start} did not run in the forward; cannot cache the layers below it")

    def attach(self, batch: TokenBatch) -> TokenBatch:
        """``batch`` carrying its prefix hidden state: use it only inside :meth:`skipped`."""
        return replace(batch, inputs_embeds=self.hidden(batch))

    @contextmanager
    def skipped(self) -> Iterator[None]:
        """Inside the block the model runs only layers ``start`` and up, taking ``inputs_embeds`` as their input."""
        full = getattr(self.owner, self.attr)
        setattr(self.owner, self.attr, nn.ModuleList(list(full)[self.start:]))
        try:
            yield
        finally:
            setattr(self.owner, self.attr, full)
