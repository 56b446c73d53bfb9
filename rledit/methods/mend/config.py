"""Hyper-parameters of MEND (per-token rank-1 updates from an identity-initialised low-rank network)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from rledit.methods.rledit.config import NORMALIZER_MODES, TrainHparams


@dataclass
class MENDHparams:
    """MEND's editor network and step size; ``train`` configures the RL trainer it shares with RLEdit.

    Attributes:
        name: the method name these hparams belong to.
        rank: r, inner width of each network block (as RLEdit's).
        n_blocks: number of residual blocks (0 = no network: ΔW is a plain gradient step of size lr).
        lr_init: initial per-module step size η[m] of ΔW = -η Σ_i k~_i g~_iᵀ. With the untrained (identity)
            network this is one gradient-descent step of size η (on the weight change seen at the answer
            positions) for the step's SUMMED answer-token loss (per-token gradients, see rledit.hooks), so η
            does not depend on how many edits share a step. Tune per model: the default 0.03 is the value
            that matches a step of 0.5 on the mean loss at N≈15 answer tokens, measured untrained on
            SmolLM2-135M (layers 18-21 gate/up, 2 steps of 5 zsRE edits): efficacy 35%, locality 86%.
        normalizer: "frozen" (feature statistics from training only; an untrained editor then normalises
            nothing) or "lifelong" (also updated with every edit step's features). Outputs are
            de-normalised, so the untrained editor is the same either way.
        train: trainer settings; MEND is trained on single independent steps (one-step episodes).
    """

    name: str = "mend"
    rank: int = 256
    n_blocks: int = 2
    lr_init: float = 0.03
    normalizer: Literal["frozen", "lifelong"] = "frozen"
    train: TrainHparams = field(
        default_factory=lambda: TrainHparams(episodes=2000, steps_per_episode=1, back_depth=1, checkpoint_every=100)
    )

    def __post_init__(self) -> None:
        if isinstance(self.train, Mapping):
            self.train = TrainHparams(**self.train)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {self.n_blocks}")
        if self.lr_init <= 0:
            raise ValueError(f"lr_init must be > 0 (it is learned on a log scale), got {self.lr_init}")
        if self.normalizer not in NORMALIZER_MODES:
            raise ValueError(f"normalizer must be one of {NORMALIZER_MODES}, got {self.normalizer!r}")
