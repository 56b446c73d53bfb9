"""Tasks for the editing worlds: a trained network, its evaluators, a differentiable surrogate and baselines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rledit.deltas import DeltaStore
from rledit.worlds.env import Evaluator

Surrogate = Callable[[nn.Module, torch.Generator], torch.Tensor]
Baseline = Callable[[DeltaStore, "BaselineSettings", torch.Generator], int]


@dataclass
class BaselineSettings:
    """One baseline row: which baseline, how many optimiser steps, learning rate."""

    name: str
    steps: int = 200
    lr: float = 1e-3


@dataclass
class WorldTask:
    """What a world run needs from a task.

    ``utility`` (higher is better) and ``task`` (lower is better) score the model on validation data as
    fractions; ``test_metrics`` reports the before/after numbers on held-out test data (percent / points);
    ``surrogate`` is a differentiable loss (lower is better) standing in for the reward; ``met_target`` says
    whether before/after test metrics reach the task's target; ``baselines`` edit the same layers through the
    delta store and return the number of optimiser steps they took.
    """

    name: str
    model: nn.Module
    layers: list[str]
    utility: Evaluator
    task: Evaluator
    utility_name: str
    task_name: str
    surrogate: Surrogate
    test_metrics: Callable[[nn.Module], dict[str, float]]
    met_target: Callable[[dict[str, float], dict[str, float]], bool]
    target: str
    task_goal: float
    utility_floor: float
    baselines: dict[str, Baseline] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def build_task(name: str, settings: dict[str, Any], seed: int, where: str = "task_settings") -> WorldTask:
    """Build the task called ``name`` (``"unlearning"`` or ``"bias"``) from its settings mapping."""
    if name == "unlearning":
        from rledit.worlds.tasks.unlearning import build_unlearning_task

        return build_unlearning_task(settings, seed, where)
    if name == "bias":
        from rledit.worlds.tasks.bias import build_bias_task

        return build_bias_task(settings, seed, where)
    raise ValueError(f"unknown task {name!r}; tasks: ['bias', 'unlearning']")
