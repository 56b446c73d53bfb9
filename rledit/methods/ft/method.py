"""FT: constrained fine-tuning of the edited modules on the step's targets (ALGORITHM.md §7).

For one edit step, every edited module m gets a dense fp32 delta Δ_m (d_in × d_out, zero at the start). A few
optimiser steps minimise the mean cross-entropy of the step's answer tokens (prompt tokens masked, as FT-M),
with the model computing ``output + input @ Δ_m`` through a private delta store (the weights are never
touched). After every optimiser step each Δ_m is projected back into its norm ball (FT-L's L∞ box by default,
or a Frobenius ball). The final deltas are returned; the editor's store applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rledit.hooks import answer_token_loss
from rledit.methods.base import EditMethod, StepFeaturesLike, register_method
from rledit.methods.ft.config import FTHparams
from rledit.methods.runtime import frozen_model, temporary_store
from rledit.targets import EditTarget
from rledit.tokens import answer_logits, context_length, encode
from rledit.types import EditRequest


def project_to_norm_ball(delta: torch.Tensor, norm: str, max_norm: float) -> None:
    """Project ``delta`` in place onto {||Δ||∞ <= max_norm} ("linf"), {||Δ||_F <= max_norm} ("fro"), or leave
    it ("none")."""
    with torch.no_grad():
        if norm == "linf":
            delta.clamp_(-max_norm, max_norm)
        elif norm == "fro":
            size = torch.linalg.vector_norm(delta)
            if size > max_norm:
                delta.mul_(max_norm / size)


@register_method("ft")
class FTMethod(EditMethod):
    """Constrained fine-tuning: a few optimiser steps on a norm-bounded dense delta per edited module."""

    name = "ft"
    hparams_class = FTHparams
    uses_features = False

    def __init__(self, hparams: FTHparams | None = None):
        self.hparams = hparams if hparams is not None else FTHparams()
        self.last_losses: list[float] = []  # the answer-token loss before each optimiser step of the last call

    def compute_step(
        self,
        model: nn.Module,
        tokenizer: Any,
        targets: Sequence[EditTarget],
        requests: Sequence[EditRequest],
        features: StepFeaturesLike | None = None,
    ) -> dict[str, torch.Tensor]:
        """Dense deltas (d_in, d_out) per edited module after ``hparams.steps`` constrained optimiser steps."""
        hp = self.hparams
        batch = encode(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                       max_length=context_length(model), padding_side="left")
        deltas = {t.name: torch.zeros(t.shape, dtype=torch.float32, device=t.weight.device, requires_grad=True)
                  for t in targets}
        params = list(deltas.values())
        optimizer = torch.optim.Adam(params, lr=hp.lr) if hp.optimizer == "adam" else torch.optim.SGD(params, lr=hp.lr)
        self.last_losses = []
        with frozen_model(model), temporary_store(model, targets) as store, torch.enable_grad():
            for _ in range(hp.steps):
                with store.pending(deltas):
                    loss = answer_token_loss(answer_logits(model, batch), batch)
                self.last_losses.append(float(loss.detach()))
                if float(loss.detach()) < hp.early_stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for delta in params:
                    project_to_norm_ball(delta, hp.norm, hp.max_norm)
        return {name: delta.detach().clone() for name, delta in deltas.items()}
