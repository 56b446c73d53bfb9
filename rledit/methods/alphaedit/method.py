"""AlphaEdit (ALGORITHM.md §7): MEMIT's step (target values, keys, residuals spread over the edited layers;
:class:`rledit.methods.memit.LocateThenEditMethod`) with a different solve per edited module:

    ΔW = (P (KᵀK + K_pᵀK_p) + λ I)⁻¹ P Kᵀ R          returned as factors U = (…)⁻¹ P Kᵀ (d_in × B), V = R

* P = Û Ûᵀ projects onto the null space of the preserved keys: Û are the eigenvectors of the corpus key second
  moment C = E[k kᵀ] with the smallest eigenvalues: by default those that together hold at most
  ``nullspace_threshold`` of C's trace (``nullspace_rule``). Since U = P(…) lies in the range of P, k ΔW ≈ 0 for the keys the corpus stands for: the update leaves preserved knowledge (nearly) untouched,
  which is why AlphaEdit needs no covariance weight.
* K_pᵀK_p is the running cache of the keys edited by earlier steps (summed Gram matrices, a
  :class:`rledit.methods.memory.KeyMemory`), so a new step also keeps the outputs of earlier edited keys; it
  is the method's state (saved with the editor), and a reverted step's keys leave it.
* K (B × d_in): this step's keys at the subjects' last tokens; R (B × d_out): the layer's share of the
  residual to the target values; λ: ``ridge``.

The projections are built once in ``prepare`` from the cached statistics (an eigendecomposition per module)
and count towards ``setup_seconds``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rledit.methods.alphaedit.config import AlphaEditHparams
from rledit.methods.base import Factors, UpdateError, register_method
from rledit.methods.memit.method import LocateThenEditMethod
from rledit.methods.memory import KeyMemory
from rledit.targets import EditTarget


def nullspace_projection(second_moment: torch.Tensor, threshold: float,
                         rule: str = "absolute") -> tuple[torch.Tensor, int]:
    """P = Û Ûᵀ (same dtype and device as ``second_moment``) for the eigenvectors Û of the symmetric
    ``second_moment`` with the smallest eigenvalues, and the null-space dimension (columns of Û). Which
    directions count (``rule``, see :class:`AlphaEditHparams`): ``"energy"``: the smallest ones whose
    eigenvalues sum to at most ``threshold`` of the trace; ``"largest"``: eigenvalues below ``threshold`` times
    the largest one; ``"absolute"``: eigenvalues below ``threshold``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)  # ascending
    if rule == "energy":
        share = torch.cumsum(eigenvalues.clamp(min=0), 0) / eigenvalues.clamp(min=0).sum().clamp_min(1e-300)
        basis = eigenvectors[:, share <= threshold]
    elif rule in ("largest", "absolute"):
        cut = threshold * float(eigenvalues[-1]) if rule == "largest" else threshold
        basis = eigenvectors[:, eigenvalues < cut]
    else:
        raise ValueError(f"unknown null-space rule {rule!r}; use 'energy', 'largest' or 'absolute'")
    return basis @ basis.T, basis.shape[1]


@register_method("alphaedit")
class AlphaEditMethod(LocateThenEditMethod):
    """AlphaEdit: MEMIT's keys and residuals, a null-space projected solve and a cache of edited keys."""

    name = "alphaedit"
    hparams_class = AlphaEditHparams

    def __init__(self, hparams: AlphaEditHparams | None = None):
        super().__init__(hparams if hparams is not None else AlphaEditHparams())
        self.projections: dict[str, torch.Tensor] = {}  # module name -> P (d_in × d_in, fp64)
        self.nullspace_dims: dict[str, int] = {}
        self.edited_keys = KeyMemory({})  # K_pᵀK_p per module, built in after_statistics

    def after_statistics(self, targets: Sequence[EditTarget]) -> None:
        """Build each module's null-space projection and an empty cache of edited keys."""
        threshold, rule = self.hparams.nullspace_threshold, self.hparams.nullspace_rule
        for target in targets:
            second_moment = self.statistics.second_moments[target.name]
            projection, dim = nullspace_projection(second_moment, threshold, rule)
            if dim == 0:
                eigenvalues = torch.linalg.eigvalsh(second_moment).clamp(min=0)
                smallest = {"energy": eigenvalues[0] / eigenvalues.sum(), "largest": eigenvalues[0] / eigenvalues[-1],
                            "absolute": eigenvalues[0]}[rule]
                raise UpdateError(
                    f"{self.name}: no eigen-direction of the key second moment of {target.name} is within "
                    f"nullspace_threshold={threshold:g} (rule {rule!r}: the smallest eigenvalue gives "
                    f"{float(smallest):.3g}), so there is no null space to project the update onto; raise "
                    "method.nullspace_threshold"
                )
            self.projections[target.name] = projection
            self.nullspace_dims[target.name] = dim
        moments = self.statistics.second_moments
        self.edited_keys = KeyMemory({t.name: tuple(moments[t.name].shape) for t in targets},
                                     moments[targets[0].name].device)

    def setup_report(self) -> dict[str, Any]:
        """The statistics (see MEMIT) and the null-space dimension of each edited module."""
        return {**super().setup_report(), "nullspace_dims": dict(self.nullspace_dims)}

    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> Factors:
        """U = (P (KᵀK + K_pᵀK_p) + λ I)⁻¹ P Kᵀ (fp64, d_in × d_in system), V = R."""
        projection = self.projections[name]
        keys64 = keys.to(projection.device, torch.float64)
        gram = keys64.T @ keys64
        if self.hparams.cache_edited_keys:
            gram = gram + self.edited_keys.gram(name)
        identity = torch.eye(projection.shape[0], dtype=torch.float64, device=projection.device)
        left = torch.linalg.solve(projection @ gram + self.hparams.ridge * identity, projection @ keys64.T)
        return left.to(torch.float32), residuals.to(left.device, torch.float32)

    def after_step(self, keys: dict[str, torch.Tensor]) -> None:
        """Stage this step's keys; they join the cache of edited keys once the editor applied the step."""
        self.edited_keys.stage(keys)

    def step_applied(self, step_id: int) -> None:
        """The step computed last was applied: its keys join the cache."""
        self.edited_keys.commit(step_id)

    def step_reverted(self, step_id: int) -> None:
        """A reverted step's keys leave the cache."""
        self.edited_keys.revert(step_id)

    def steps_cleared(self) -> None:
        """Every step was removed: the cache is emptied."""
        self.edited_keys.reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The cache of edited keys (the keys of every applied step, per edited module)."""
        return self.edited_keys.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the cache saved by :meth:`state_dict` (after ``prepare``, for the same modules)."""
        try:
            unknown = [k for k in state if not k.startswith("key_memory/")]
            if unknown:
                raise ValueError(f"entries {sorted(unknown)[:8]} are not a cache of edited keys (a save from an "
                                 "older rledit holds only summed Gram matrices, which cannot be reverted: re-run)")
            self.edited_keys.load_state_dict(state)
        except ValueError as error:
            raise UpdateError(f"the saved {self.name} state does not fit the edited modules "
                              f"{list(self.edited_keys.d_in)}: {error}") from error
