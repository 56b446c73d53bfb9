"""Hyper-parameters of the UltraEdit-style closed form (ALGORITHM.md §7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ULTRAEDIT_NORMALIZERS = ("lifelong", "none")


@dataclass
class UltraEditHparams:
    """The training-free closed form: lifelong-normalised features, value shifts, one ridge solve per module.

    Attributes:
        name: the method name these hparams belong to.
        lr: η, the step size of the value shifts d_i = -η · ||k̂_i||² · ĝ_i (k̂, ĝ: the normalised key and
            value-gradient). The normalised features are order one per coordinate, so ||k̂_i||² is about d_in
            and the useful η is small; tune it per model. The default 1e-4 was measured on SmolLM2-135M (layers
            18-21 gate/up, 2 steps of 5 zsRE edits): efficacy 53%, locality 98%; 2e-4 gives 60% / 83%.
        ridge: λ > 0 of the solve ΔW = argmin ||K ΔW - D||² + λ ||ΔW||² (K: the raw keys).
        normalizer: "lifelong" (every step's features update the running mean/std before they are normalised,
            the method's defining ingredient) or "none" (ablation: k̂ = k, ĝ = g).
    """

    name: str = "ultraedit"
    lr: float = 1e-4
    ridge: float = 1.0
    normalizer: Literal["lifelong", "none"] = "lifelong"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")
        if self.normalizer not in ULTRAEDIT_NORMALIZERS:
            raise ValueError(f"normalizer must be one of {ULTRAEDIT_NORMALIZERS}, got {self.normalizer!r}")
