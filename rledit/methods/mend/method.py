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

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rledit.methods.base import StepFeaturesLike, UpdateError, check_updates, register_method
from rledit.methods.mend.config import MENDHparams
from rledit.methods.rledit.method import RLEditMethod, _check_features
from rledit.methods.rledit.net import HyperNetwork
from rledit.targets import EditTarget


class MENDNetwork(HyperNetwork):
    """RLEdit's hypernetwork without the per-module ridge strengths: MEND's updates need no solve."""

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], rank: int, n_blocks: int, lr_init: float,
                 seed: int = 0):
        super().__init__(module_shapes, rank, n_blocks, lr_init, lambda_init=0.0, seed=seed)
        del self.ridge_log

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

    def build(self, module_shapes: dict[str, tuple[int, int]]) -> MENDNetwork:
        """Create the network for ``module_shapes`` (name → (d_in, d_out)) if there is none; if there is one,
        require that it was built for exactly these modules."""
        shapes = {name: (int(s[0]), int(s[1])) for name, s in module_shapes.items()}
        if self.hypernet is None:
            hp = self.hparams
            self.hypernet = MENDNetwork(shapes, hp.rank, hp.n_blocks, hp.lr_init, hp.train.seed)
        elif self.hypernet.module_shapes != shapes:
            raise UpdateError(
                f"this editor was built for modules {self.hypernet.module_shapes}, not {shapes}; "
                "use an editor trained for the same model and edited modules"
            )
        return self.hypernet

    def compute_updates(self, features: StepFeaturesLike, targets: Sequence[EditTarget] = (),
                        update_stats: bool | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factors (U, V) = (K~ᵀ, -η G~) per module. ``update_stats=None`` follows the normaliser mode. On an
        error the normaliser is left exactly as it was."""
        net = self.hypernet
        if net is None:
            raise UpdateError(f"{self.name}: call prepare(model, tokenizer, targets) or build(...) first")
        if update_stats is None:
            update_stats = self.hparams.normalizer == "lifelong"
        _check_features(features, net.module_shapes)
        saved = {k: v.clone() for k, v in net.normalizers.state_dict().items()}
        try:
            device = net.log_lr.device
            updates = {}
            for name, raw_keys in features.keys.items():
                keys = raw_keys.to(device=device, dtype=torch.float32)
                grads = features.grads[name].to(device=device, dtype=torch.float32)
                edited_keys, edited_grads = net(name, keys, grads, update_stats=update_stats)
                updates[name] = (edited_keys.T, -net.lr(name) * edited_grads)
            check_updates(updates, net.module_shapes)
        except UpdateError:
            net.normalizers.load_state_dict(saved)
            raise
        return updates
