"""MEND (ALGORITHM.md §7): per-token rank-1 updates from an identity-initialised low-rank network, no solve.

For an edited module m and the step's features (keys k_i, value-gradients g_i over its N answer tokens):

    (k~_i, g~_i) = net_m(k_i, g_i)                 # RLEdit's residual low-rank blocks, identity at init
    ΔW_m = -η[m] Σ_i k~_i g~_iᵀ                    # factors U = [k~_1 … k~_N] (d_in×N), V = -η[m]·G~ (N×d_out)

Untrained, k~ = k and g~ = g, and Σ_i k_i g_iᵀ is the gradient of the step's mean answer-token loss with
respect to a change of the (d_in, d_out) weight that acts at the answer positions (the features are read
there only): MEND is then one gradient-descent step of size η[m] on that change. For the last layer it is the
whole weight gradient; for lower layers the prompt positions' share (through attention) is left out.

The network, the normaliser and the per-module log step sizes are those of RLEdit
(:class:`rledit.methods.rledit.HyperNetwork`) minus the ridge strengths (there is no solve), so ``hypernet``
has the same interface and the RLEdit trainer trains it on single independent steps
(``train.steps_per_episode = 1``, ``train.back_depth = 1``, the defaults of :class:`MENDHparams`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from rledit.methods.base import UpdateError, register_method
from rledit.methods.mend.config import MENDHparams
from rledit.methods.rledit.method import RLEditMethod
from rledit.methods.rledit.net import HyperNetwork


class MENDNetwork(HyperNetwork):
    """RLEdit's hypernetwork without the per-module ridge strengths and solve weights: MEND's updates need no
    solve."""

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], rank: int, n_blocks: int, lr_init: float,
                 seed: int = 0):
        super().__init__(module_shapes, rank, n_blocks, lr_init, lambda_init=0.0, seed=seed)
        del self.ridge_log, self.memory_log, self.corpus_log

    def ridge(self, name: str) -> torch.Tensor:
        """MEND has no ridge solve; asking for its strength is a programming error."""
        raise UpdateError("MEND's editor network has no ridge strength (its updates need no solve)")

    def parameter_groups(self, meta_lr: float, scalar_meta_lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups: network weights at ``meta_lr``, per-module log step sizes at
        ``scalar_meta_lr``."""
        return [
            {"params": list(self.nets.parameters()), "lr": meta_lr},
            {"params": [self.log_lr], "lr": scalar_meta_lr},
        ]


@register_method("mend")
class MENDMethod(RLEditMethod):
    """MEND: ΔW = -η Σ_i k~_i g~_iᵀ from an identity-initialised network; rank ≤ N factors, no solve.

    ``hypernet``, ``state_dict``/``load_state_dict`` and ``compute_updates(..., update_stats=...)`` behave as
    RLEdit's, so the RLEdit trainer trains it too.
    """

    name = "mend"
    hparams_class = MENDHparams

    def __init__(self, hparams: MENDHparams | None = None):
        super().__init__(hparams if hparams is not None else MENDHparams())

    def new_network(self, module_shapes: dict[str, tuple[int, int]]) -> MENDNetwork:
        """A fresh, identity-initialised MEND network (no ridge strengths) for ``module_shapes``."""
        hp = self.hparams
        return MENDNetwork(module_shapes, hp.rank, hp.n_blocks, hp.lr_init, hp.train.seed)

    def module_update(self, name: str, keys: torch.Tensor, edited_keys: torch.Tensor,
                      edited_grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (K~ᵀ, -η G~): the sum of the per-token rank-1 updates, no solve."""
        return edited_keys.T, -self.hypernet.lr(name) * edited_grads
