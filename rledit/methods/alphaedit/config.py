"""Hyper-parameters of AlphaEdit: MEMIT's shared settings plus the null-space projection and its ridge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rledit.methods.memit.config import LocateEditHparams


@dataclass
class AlphaEditHparams(LocateEditHparams):
    """AlphaEdit: ΔW = (P (KᵀK + K_pᵀK_p) + λ I)⁻¹ P Kᵀ R per edited layer (see :mod:`.method`).

    Attributes:
        name: the method name these hparams belong to.
        nullspace_rule: which eigen-directions of the corpus key second moment C = E[k kᵀ] span the null space
            the update is projected onto (directions the preserved keys barely reach). ``"energy"``: the ones
            with the smallest eigenvalues that together hold at most ``nullspace_threshold`` of C's trace, the
            preserved keys' energy; one value suits every layer, whatever the scale of its inputs and however
            large its few outlier eigenvalues. ``"largest"``: eigenvalues below ``nullspace_threshold`` times
            the largest one (fragile where one direction carries huge activations: at SmolLM2-135M's layer 27,
            1e-3 keeps 1,359 of 1,536 dimensions, at layer 26 only 328). ``"absolute"``: eigenvalues below
            ``nullspace_threshold`` itself, the published form, whose good value changes with depth: on
            SmolLM2-135M's down_proj (2000 SST-2 texts) the published 2e-2 leaves 913, 738, 474 and 362
            dimensions at layers 18-21 (8.4, 6.6, 2.7 and 2.7 % of the energy) but 29, 4, 1 and 4 at layers
            24-27 (benchmarks/results/tuning). ``prepare`` reports the null-space dimension of each module
            (``nullspace_dims``, also in results files) and refuses an empty one.
        nullspace_threshold: the rule's threshold. The default energy share 0.05 is the mean share of the
            published absolute threshold's null spaces at layers 18-21, where that threshold works (energy
            0.05 keeps 466-831 of the 1,536 dimensions at every one of layers 18-27).
        ridge: λ, the L2 weight on ΔW in the solve.
        cache_edited_keys: keep the keys of every earlier step (K_p) in the solve, so later steps preserve
            earlier edits (AlphaEdit's running cache); False solves each step on its own keys only.
    """

    name: str = "alphaedit"
    nullspace_rule: Literal["energy", "largest", "absolute"] = "energy"
    nullspace_threshold: float = 0.05
    ridge: float = 10.0
    cache_edited_keys: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nullspace_threshold <= 0:
            raise ValueError(f"nullspace_threshold must be > 0, got {self.nullspace_threshold}")
        if self.nullspace_rule != "absolute" and self.nullspace_threshold >= 1:
            raise ValueError(f"nullspace_threshold must be < 1 with nullspace_rule {self.nullspace_rule!r} (a share "
                             f"of the {'trace' if self.nullspace_rule == 'energy' else 'largest eigenvalue'}), "
                             f"got {self.nullspace_threshold}")
        if self.ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")
