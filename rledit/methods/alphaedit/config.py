"""Hyper-parameters of AlphaEdit: MEMIT's shared settings plus the null-space projection and its ridge."""

from __future__ import annotations

from dataclasses import dataclass

from rledit.methods.memit.config import LocateEditHparams


@dataclass
class AlphaEditHparams(LocateEditHparams):
    """AlphaEdit: ΔW = (P (KᵀK + K_pᵀK_p) + λ I)⁻¹ P Kᵀ R per edited layer (see :mod:`.method`).

    Attributes:
        name: the method name these hparams belong to.
        nullspace_threshold: eigen-directions of the corpus key second moment C = E[k kᵀ] whose eigenvalue is
            below this span the null space the update is projected onto (the preserved keys barely reach
            them). An absolute value, so it depends on the scale of the edited module's inputs, which grows
            with depth; ``prepare`` reports the null-space dimension of each module (``nullspace_dims``, also in
            results files) and refuses an empty one. On SmolLM2-135M (down_proj, d_in 1536, 2000 SST-2 texts)
            2e-2 leaves 913, 738, 474 and 362 dimensions at layers 18-21 but only 29 and 4 at layers 24 and 27,
            where the edits then barely land; raising the threshold to 0.1 there (772 and 513 dimensions) lets
            the edits land but takes in directions the preserved keys use, and 1,000 sequential edits collapse
            the model (benchmarks/results/tuning). Edit layers with a real null space instead.
        ridge: λ, the L2 weight on ΔW in the solve.
        cache_edited_keys: keep the keys of every earlier step (K_p) in the solve, so later steps preserve
            earlier edits (AlphaEdit's running cache); False solves each step on its own keys only.
    """

    name: str = "alphaedit"
    nullspace_threshold: float = 2e-2
    ridge: float = 10.0
    cache_edited_keys: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nullspace_threshold <= 0:
            raise ValueError(f"nullspace_threshold must be > 0, got {self.nullspace_threshold}")
        if self.ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")
