"""Short real runs of both worlds on the MNIST unlearning task (the CNN is trained once, then read from the cache).

PPO needs thousands of environment steps to escape the zero edit (see benchmarks/results/worlds), so here it runs
a few hundred steps for the mechanics (training, rollout, curves, JSON), and the path-wise agent, which follows
the gradient of the same objective, must actually make the network forget the class in a few steps.
"""

import json
from pathlib import Path

import pytest
import torch

from rledit.worlds.config import load_run_settings
from rledit.worlds.run import run_world, save_results

HPARAMS = Path(__file__).resolve().parents[1] / "hparams" / "worlds"
PPO_STEPS = 320


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("world", ["shiftworld", "maskworld"])
def test_short_run_lowers_forget_accuracy(world, tmp_path):
    overrides = [f"agent={{kind: ppo, layers: [head.fc2], env_steps: {PPO_STEPS}, n_steps: 64, batch_size: 64}}",
                 "compare_agents=[{kind: pathwise, env_steps: 3, inner_steps: 30, lr: 0.1}]",
                 "baselines=[{name: gradient_ascent, steps: 50, lr: 0.001}]"]
    settings = load_run_settings(HPARAMS / f"{world}-unlearning.yaml", overrides)
    assert settings.agent.kind == "ppo"
    result = run_world(settings, command="test", show_progress=False)
    ppo, pathwise = result, result["compare_agents"][0]
    before = result["before"]
    assert before["forget_acc"] > 95 and before["retain_acc"] > 95  # the cached CNN is a good classifier
    assert ppo["env_steps"] >= PPO_STEPS and len(ppo["reward_curve"]) > 10
    assert ppo["final"]["rollout_steps"] >= 1
    assert pathwise["after"]["forget_acc"] <= 5 and pathwise["after"]["retain_acc"] >= 90
    assert pathwise["met_target"] and pathwise["final"]["goal_met"]
    assert result["baselines"][0]["after"]["forget_acc"] < before["forget_acc"]
    json_path, png_path = save_results(result, tmp_path / "run.json")
    saved = json.loads(json_path.read_text())
    assert png_path.stat().st_size > 0
    for key in ("world", "task", "agent", "before", "after", "reward_curve", "env_steps", "seconds", "seed",
                "version", "command", "baselines"):
        assert key in saved
    assert saved["world"] == world and saved["task"] == "unlearning" and saved["agent"] == "ppo"
    assert saved["reward_curve"] and {"reward", "env_step"} <= set(saved["reward_curve"][0])
