"""ShiftWorld and MaskWorld: editing a trained network's linear layers as a gymnasium environment.

An episode starts from the model's current (pre-episode) weights. Each step the agent proposes a flat action
in [-1, 1]^n that parameterises, for every editable layer, rank-r factors U (d_in×r) and V (d_out×r):

* :class:`ShiftWorld` adds a low-rank shift:  W ← W + s · U Vᵀ / r, with s = ``shift_scale`` · rms(W₀);
* :class:`MaskWorld` multiplies by a bounded mask: W ← W ⊙ M, M = 1 + ``mask_strength`` · tanh(``mask_gain`` · U Vᵀ / r),
  so every entry of M lies in [1 - mask_strength, 1 + mask_strength].

Every change goes through the library's :class:`~rledit.deltas.DeltaStore` (forward hooks; base weights are never
written), so :meth:`EditWorld.reset` reverts exactly the steps of the episode. After each step a *utility*
evaluator (higher is better) and a *task* evaluator (lower is better) score the model; the potential
Φ = utility_weight · utility − task_weight · task gives the reward: its per-step improvement (``reward="delta"``)
or its value (``reward="level"``), plus ``success_bonus`` on the step that meets the goal. An episode
terminates when the goal is met (task ≤ ``task_goal`` and utility ≥ ``utility_floor``) and is truncated after
``max_steps`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rledit.deltas import DeltaStore, Update
from rledit.targets import EditTarget, TargetError, make_target

Evaluator = Callable[[nn.Module], float]

STATS_PER_LAYER = 4  # mean, std, max |w| of the current weight; relative size of this episode's change
GLOBAL_STATS = 3  # utility, task, fraction of the step budget used


class WorldError(ValueError):
    """A layer name, action, evaluator result or setting that an editing world cannot use."""


@dataclass
class WorldConfig:
    """Settings shared by ShiftWorld and MaskWorld (each reads its own step parameters)."""

    rank: int = 1
    max_steps: int = 10
    utility_weight: float = 1.0
    task_weight: float = 1.0
    reward: str = "delta"  # "delta": improvement of the potential; "level": the potential itself
    success_bonus: float = 0.0
    task_goal: float | None = None  # goal met when task <= task_goal (and utility >= utility_floor)
    utility_floor: float | None = None
    shift_scale: float = 1.0  # ShiftWorld: largest change of one entry per step, in units of rms(W)
    mask_strength: float = 1.0  # MaskWorld: M in [1 - strength, 1 + strength]
    mask_gain: float = 3.0  # MaskWorld: slope of the tanh

    def check(self) -> None:
        """Raise :class:`WorldError` for settings outside their valid ranges."""
        if self.rank < 1 or self.max_steps < 1:
            raise WorldError(f"rank ({self.rank}) and max_steps ({self.max_steps}) must be >= 1")
        if self.reward not in ("delta", "level"):
            raise WorldError(f"reward must be 'delta' or 'level', got {self.reward!r}")
        if not 0 < self.mask_strength <= 1:
            raise WorldError(f"mask_strength must be in (0, 1] so that the mask stays >= 0, got {self.mask_strength}")
        if self.shift_scale <= 0 or self.mask_gain <= 0:
            raise WorldError("shift_scale and mask_gain must be > 0")


class EditWorld(gym.Env):
    """Common base of the editing worlds: targets, delta store, action layout, observation, reward, history.

    ``utility`` and ``task`` are called with the model (under ``torch.no_grad``) and must return finite
    floats; ``store`` may be an existing store on ``model`` covering ``layer_names`` (else one is created
    and removed again by :meth:`close`).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    world_name = "editworld"

    def __init__(
        self,
        model: nn.Module,
        layer_names: Sequence[str],
        utility: Evaluator,
        task: Evaluator,
        config: WorldConfig | None = None,
        store: DeltaStore | None = None,
    ) -> None:
        super().__init__()
        self.config = config or WorldConfig()
        self.config.check()
        self.model = model
        self.utility_fn, self.task_fn = utility, task
        self.targets = resolve_layers(model, layer_names)
        self.owns_store = store is None
        self.store = store if store is not None else DeltaStore(model, self.targets)
        missing = [t.name for t in self.targets if t.name not in self.store.targets]
        if missing:
            raise WorldError(f"the given delta store does not edit layers {missing}")
        self.layer_slices = self._layout()
        size = self.layer_slices[-1][-1].stop
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(size,), dtype=np.float32)
        n_obs = STATS_PER_LAYER * len(self.targets) + GLOBAL_STATS
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(n_obs,), dtype=np.float32)
        with torch.no_grad():
            self.base_rms = {t.name: float(t.weight_in_out().float().pow(2).mean().sqrt()) for t in self.targets}
        self.episode_steps: list[int] = []
        self.history: list[dict[str, Any]] = []
        self.total_steps = 0
        self.episodes = 0
        self.metrics = (math.nan, math.nan)
        self._start_weights: dict[str, torch.Tensor] = {}
        self._potential = math.nan

    # ------------------------------------------------------------------------------------------ layout
    def _layout(self) -> list[tuple[str, slice, slice]]:
        """(layer name, slice of U, slice of V) in the flat action, layer after layer."""
        rank, offset, layout = self.config.rank, 0, []
        for target in self.targets:
            u = slice(offset, offset + target.d_in * rank)
            v = slice(u.stop, u.stop + target.d_out * rank)
            layout.append((target.name, u, v))
            offset = v.stop
        return layout

    def factors(self, action: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Split a flat action tensor into per-layer (U: d_in×r, V: d_out×r) views (differentiable)."""
        rank = self.config.rank
        result = {}
        for target, (name, u, v) in zip(self.targets, self.layer_slices):
            result[name] = (action[u].reshape(target.d_in, rank), action[v].reshape(target.d_out, rank))
        return result

    def current_weight(self, name: str) -> torch.Tensor:
        """The layer's effective (d_in, d_out) weight now: base weight plus every stored delta (fp32 copy)."""
        target = self.store.targets[name]
        return target.weight_in_out().detach().float() + self.store.delta(name)

    def updates_for(self, action: torch.Tensor) -> dict[str, Update]:
        """The delta-store updates one action makes from the current weights (differentiable in ``action``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- gym interface
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Revert this episode's edits (exactly), score the model and return the first observation."""
        super().reset(seed=seed)
        self.revert_episode()
        self._start_weights = {t.name: self.current_weight(t.name) for t in self.targets}
        self.metrics = self._evaluate()
        self._potential = self._potential_of(*self.metrics)
        self.episodes += 1
        return self._observation(0), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Apply one edit; returns (observation, reward, terminated, truncated, info)."""
        if not self._start_weights:
            raise WorldError("call reset() before step()")
        tensor = self.check_action(action)
        with torch.no_grad():
            updates = self.updates_for(tensor)
        self.episode_steps.append(self.store.add(updates))
        self.metrics = self._evaluate()
        potential = self._potential_of(*self.metrics)
        reward = potential - self._potential if self.config.reward == "delta" else potential
        self._potential = potential
        terminated = self.goal_met()
        reward += self.config.success_bonus if terminated else 0.0
        truncated = not terminated and len(self.episode_steps) >= self.config.max_steps
        self.total_steps += 1
        utility, task = self.metrics
        self.history.append({"env_step": self.total_steps, "episode": self.episodes, "reward": reward,
                             "utility": utility, "task": task})
        return self._observation(len(self.episode_steps)), float(reward), terminated, truncated, self._info()

    def close(self) -> None:
        """Remove the store's hooks if this world created the store (the model is then unedited)."""
        if self.owns_store and self.store is not None:
            self.store.detach()

    # ---------------------------------------------------------------------------------------- helpers
    def revert_episode(self) -> None:
        """Remove every step this episode added, newest first (exact: the store recomputes its sums)."""
        while self.episode_steps:
            self.store.revert(self.episode_steps.pop())

    def goal_met(self) -> bool:
        """Whether the current metrics meet the configured goal (never, when no ``task_goal`` is set)."""
        utility, task = self.metrics
        if self.config.task_goal is None or task > self.config.task_goal:
            return False
        return self.config.utility_floor is None or utility >= self.config.utility_floor

    def check_action(self, action: Any) -> torch.Tensor:
        """The action as a float32 tensor, or a :class:`WorldError` saying what is wrong with it."""
        try:
            array = np.asarray(action.detach().cpu() if isinstance(action, torch.Tensor) else action, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise WorldError(f"action must be a numeric array of shape {self.action_space.shape}: {exc}") from exc
        if array.shape != self.action_space.shape:
            raise WorldError(
                f"action has shape {array.shape}, expected {self.action_space.shape} "
                f"(rank {self.config.rank} factors for layers {[t.name for t in self.targets]})"
            )
        if not np.isfinite(array).all():
            raise WorldError("action has NaN or infinite values")
        if np.abs(array).max(initial=0.0) > 1.0 + 1e-6:
            raise WorldError(f"action values must lie in [-1, 1]; got max |a| = {np.abs(array).max():.4g}")
        return torch.from_numpy(array.copy())

    def _potential_of(self, utility: float, task: float) -> float:
        return self.config.utility_weight * utility - self.config.task_weight * task

    def _evaluate(self) -> tuple[float, float]:
        values = []
        for label, evaluator in (("utility", self.utility_fn), ("task", self.task_fn)):
            try:
                with torch.no_grad():
                    value = evaluator(self.model)
            except Exception as exc:
                raise WorldError(f"the {label} evaluator failed: {type(exc).__name__}: {exc}") from exc
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise WorldError(f"the {label} evaluator must return a finite number, got {value!r}")
            values.append(float(value))
        return values[0], values[1]

    def _observation(self, steps_done: int) -> np.ndarray:
        stats = []
        for target in self.targets:
            weight = self.current_weight(target.name)
            start = self._start_weights[target.name]
            change = float((weight - start).norm() / start.norm().clamp_min(1e-12))
            stats += [float(weight.mean()), float(weight.std()), float(weight.abs().max()), change]
        stats += [*self.metrics, steps_done / self.config.max_steps]
        return np.asarray(stats, dtype=np.float32)

    def _info(self) -> dict[str, Any]:
        utility, task = self.metrics
        return {"utility": utility, "task": task, "goal_met": self.goal_met(), "steps": len(self.episode_steps)}


class ShiftWorld(EditWorld):
    """Additive low-rank edits: W ← W + s · U Vᵀ / r per editable layer (s = shift_scale · rms of the base W)."""

    world_name = "shiftworld"

    def updates_for(self, action: torch.Tensor) -> dict[str, Update]:
        """Factors (s·U/r, Vᵀ) per layer for the delta store."""
        rank = self.config.rank
        updates: dict[str, Update] = {}
        for name, (u, v) in self.factors(action).items():
            scale = self.config.shift_scale * self.base_rms[name] / rank
            updates[name] = (u * scale, v.t())
        return updates


class MaskWorld(EditWorld):
    """Multiplicative bounded edits: W ← W ⊙ M, M = 1 + strength · tanh(gain · U Vᵀ / r)."""

    world_name = "maskworld"

    def mask(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The (d_in, d_out) mask for factors U (d_in×r) and V (d_out×r); entries in [1 - strength, 1 + strength]."""
        logits = self.config.mask_gain * (u @ v.t()) / self.config.rank
        return 1.0 + self.config.mask_strength * torch.tanh(logits)

    def updates_for(self, action: torch.Tensor) -> dict[str, Update]:
        """Dense deltas W_current ⊙ (M − 1) per layer, so that the effective weight becomes W_current ⊙ M."""
        return {
            name: self.current_weight(name) * (self.mask(u, v) - 1.0)
            for name, (u, v) in self.factors(action).items()
        }


WORLDS: dict[str, type[EditWorld]] = {"shiftworld": ShiftWorld, "maskworld": MaskWorld}


def make_world(name: str, *args: Any, **kwargs: Any) -> EditWorld:
    """Build a world by name (``"shiftworld"`` or ``"maskworld"``); other arguments go to its constructor."""
    if name not in WORLDS:
        raise WorldError(f"unknown world {name!r}; worlds: {sorted(WORLDS)}")
    return WORLDS[name](*args, **kwargs)


def resolve_layers(model: nn.Module, layer_names: Sequence[str]) -> list[EditTarget]:
    """Edit targets for the named linear layers of ``model``; unknown names list the linear layers that exist."""
    if isinstance(layer_names, str) or not layer_names:
        raise WorldError("layer_names must be a non-empty list of module names")
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    targets = []
    for name in layer_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise WorldError(f"unknown layer {name!r}; linear layers of this model: {linear}") from None
        try:
            targets.append(make_target(name, module))
        except TargetError as exc:
            raise WorldError(f"{exc}; linear layers of this model: {linear}") from None
    if len({t.name for t in targets}) != len(targets):
        raise WorldError(f"layer names repeat: {list(layer_names)}")
    return targets
