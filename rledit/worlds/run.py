"""One world × task run: build the task, train and roll out the agent(s), run the baselines, report.

The result (see :func:`run_world`) is a JSON-ready dict: the main agent's row at the top level (``world``,
``task``, ``agent``, ``before``, ``after``, ``reward_curve``, ``env_steps``, ``seconds``, ...) and the rows of
the compared agents and the baselines, in the same shape, under ``compare_agents`` and ``baselines``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import rledit
from rledit.deltas import DeltaStore
from rledit.files import save_figure, write_text_atomically
from rledit.worlds.agents import make_agent
from rledit.worlds.config import AgentSettings, RunSettings
from rledit.worlds.env import make_world, resolve_layers
from rledit.worlds.tasks import BaselineSettings, WorldTask, build_task

CURVE_POINTS = 200  # the curves in the JSON are averaged over windows down to at most this many points


def run_world(settings: RunSettings, command: str = "", show_progress: bool = True) -> dict[str, Any]:
    """Run ``settings`` end to end and return the results dict (the model is left unedited)."""
    torch.manual_seed(settings.seed)
    task = build_task(settings.task, settings.task_settings, settings.seed)
    layers = list(settings.layers or task.layers)
    before = task.test_metrics(task.model)
    rows = [run_agent(settings, task, agent, layers, before, show_progress)
            for agent in [settings.agent, *settings.compare_agents]]
    baselines = [run_baseline(settings, task, b, layers, before) for b in settings.baselines]
    result = {**rows[0], "seed": settings.seed, "version": rledit.__version__, "command": command,
              "layers": layers, "target": task.target, "task_details": task.extra,
              "compare_agents": rows[1:], "baselines": baselines, "settings": dataclasses.asdict(settings)}
    if "bias_metric" in task.extra:
        result["bias_metric"] = task.extra["bias_metric"]
    return result


def run_agent(
    settings: RunSettings, task: WorldTask, agent_settings: AgentSettings, layers: list[str],
    before: dict[str, float], show_progress: bool = True,
) -> dict[str, Any]:
    """Train one agent in a fresh world, roll it out, measure the edited model, then revert the edit."""
    env = dataclasses.replace(
        settings.env,
        task_goal=task.task_goal if settings.env.task_goal is None else settings.env.task_goal,
        utility_floor=task.utility_floor if settings.env.utility_floor is None else settings.env.utility_floor,
    )
    layers = list(agent_settings.layers or layers)
    world = make_world(settings.world, task.model, layers, task.utility, task.task, env)
    agent = make_agent(agent_settings, settings.seed, task.surrogate)
    total = agent_settings.env_steps + (env.max_steps if agent_settings.kind == "ppo" else 0)
    bar = tqdm(total=total, desc=f"{settings.world}/{settings.task}/{agent_settings.kind}", unit="step",
               disable=not show_progress)
    start = time.perf_counter()
    try:
        agent.train(world, bar.update)
        rollout_steps = agent.rollout(world, bar.update)
        after = task.test_metrics(task.model)
        final = {"validation_" + task.utility_name: world.metrics[0], "validation_" + task.task_name: world.metrics[1],
                 "goal_met": world.goal_met(), "rollout_steps": rollout_steps}
    finally:
        bar.close()
        world.close()
    return {
        "world": settings.world, "task": settings.task, "agent": agent_settings.kind, "layers": layers,
        "before": before, "after": after, "met_target": task.met_target(before, after),
        "env_steps": world.total_steps, "seconds": round(time.perf_counter() - start, 2), "final": final,
        "reward_curve": curve(world.history, task.utility_name, task.task_name),
    }


def run_baseline(
    settings: RunSettings, task: WorldTask, baseline: BaselineSettings, layers: list[str], before: dict[str, float]
) -> dict[str, Any]:
    """One baseline on the same layers through a fresh delta store; the row has the agents' shape."""
    if baseline.name not in task.baselines:
        raise ValueError(f"task {task.name!r} has no baseline {baseline.name!r}; baselines: {sorted(task.baselines)}")
    store = DeltaStore(task.model, resolve_layers(task.model, layers))
    start = time.perf_counter()
    try:
        steps = task.baselines[baseline.name](store, baseline, torch.Generator().manual_seed(settings.seed))
        after = task.test_metrics(task.model)
    finally:
        store.detach()
    return {
        "world": settings.world, "task": settings.task, "agent": baseline.name, "before": before, "after": after,
        "met_target": task.met_target(before, after), "env_steps": 0, "optimiser_steps": steps,
        "seconds": round(time.perf_counter() - start, 2), "reward_curve": [],
    }


def curve(history: list[dict[str, Any]], utility_name: str, task_name: str) -> list[dict[str, float]]:
    """Per-step reward and validation metrics, averaged over equal windows down to ``CURVE_POINTS`` points."""
    if not history:
        return []
    window = max(1, int(np.ceil(len(history) / CURVE_POINTS)))
    points = []
    for start in range(0, len(history), window):
        chunk = history[start:start + window]
        points.append({
            "env_step": chunk[-1]["env_step"],
            "reward": float(np.mean([h["reward"] for h in chunk])),
            utility_name: float(np.mean([h["utility"] for h in chunk])),
            task_name: float(np.mean([h["task"] for h in chunk])),
        })
    return points


def save_results(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write the results JSON to ``out`` and the training plot next to it (same name, ``.png``)."""
    out = Path(out)
    write_text_atomically(out, json.dumps(result, indent=1) + "\n")
    png = out.with_suffix(".png")
    plot_curves(result, png)
    return out, png


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Reward and the two validation metrics over environment steps, one line per agent (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [result, *result.get("compare_agents", [])]
    keys = [k for k in (result["reward_curve"][0] if result["reward_curve"] else {}) if k != "env_step"]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.4))
    for axis, key in zip(np.atleast_1d(axes), keys):
        for row in rows:
            points = row["reward_curve"]
            if points:
                axis.plot([p["env_step"] for p in points], [p[key] for p in points], marker="." if len(points) < 30 else None,
                          label=row["agent"])
        axis.set_xlabel("environment step")
        axis.set_title(key if key == "reward" else f"{key} (validation)")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend()
    fig.suptitle(f"{result['world']} / {result['task']}")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def summary_table(result: dict[str, Any]) -> str:
    """A plain-text table: one line per agent and baseline with before → after metrics."""
    rows = [result, *result.get("compare_agents", []), *result.get("baselines", [])]
    lines = [f"{result['world']} / {result['task']}"]
    for row in rows:
        metrics = ", ".join(f"{k} {row['before'][k]:.2f} -> {row['after'][k]:.2f}" for k in row["after"])
        lines.append(f"  {row['agent']:<18} {metrics}  target met: {row['met_target']}  "
                     f"({row['env_steps']} env steps, {row['seconds']:.1f} s)")
    return "\n".join(lines)
