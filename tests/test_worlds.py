"""Mechanics of ShiftWorld / MaskWorld on a tiny network: reset, which layers change, reward sign, bad input."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from rledit.worlds.config import ConfigError, load_run_settings
from rledit.worlds.env import MaskWorld, ShiftWorld, WorldConfig, WorldError, make_world

LAYERS = ["fc1", "fc3"]  # fc2 stays unedited


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(4, 5), act1=nn.Tanh(), fc2=nn.Linear(5, 3), act2=nn.Tanh(), fc3=nn.Linear(3, 2)))


INPUTS = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))


def output_sum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model(INPUTS).sum())


def make(kind: str, model: nn.Module, layers=LAYERS, utility=output_sum, task=lambda m: 0.0, **config):
    return make_world(kind, model, layers, utility, task, WorldConfig(**config))


def manual_copy(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the given layers' weights (nn.Linear orientation) written in."""
    copy = tiny_net()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, weight in weights.items():
            copy.get_submodule(name).weight.copy_(weight)
    return copy


@pytest.mark.parametrize("kind", ["shiftworld", "maskworld"])
def test_reset_restores_weights_and_outputs_exactly(kind):
    model = tiny_net()
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = model(INPUTS).detach().clone()
    world = make(kind, model)
    world.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        world.step(rng.uniform(-1, 1, world.action_space.shape).astype(np.float32))
    assert not torch.equal(model(INPUTS), out_before)
    world.reset()
    assert torch.equal(model(INPUTS), out_before)  # bit-exact, not approximately
    assert all(torch.equal(v, params_before[k]) for k, v in model.state_dict().items())
    assert len(world.store) == 0
    world.close()
    assert torch.equal(model(INPUTS), out_before)


def test_shiftworld_action_is_additive_low_rank_on_chosen_layers_only():
    model = tiny_net()
    world = make("shiftworld", model, rank=2, shift_scale=0.5)
    world.reset()
    action = np.random.default_rng(1).uniform(-1, 1, world.action_space.shape).astype(np.float32)
    assert world.action_space.shape == (2 * (4 + 5) + 2 * (3 + 2),)
    world.step(action)
    # expected weights by hand, in nn.Linear's (d_out, d_in) orientation: W + s * (U V^T)^T / r
    a, expected, offset = torch.from_numpy(action), {}, 0
    for name in LAYERS:
        weight = model.get_submodule(name).weight.detach()
        d_out, d_in = weight.shape
        u = a[offset:offset + 2 * d_in].reshape(d_in, 2)
        v = a[offset + 2 * d_in:offset + 2 * (d_in + d_out)].reshape(d_out, 2)
        offset += 2 * (d_in + d_out)
        scale = 0.5 * float(weight.pow(2).mean().sqrt()) / 2
        expected[name] = weight + scale * (u @ v.t()).t()
    reference = manual_copy(model, expected)
    torch.testing.assert_close(model(INPUTS), reference(INPUTS), rtol=1e-5, atol=1e-6)
    for name in LAYERS:
        torch.testing.assert_close(world.current_weight(name).t(), expected[name], rtol=1e-5, atol=1e-6)
    assert "fc2" not in world.store.targets
    assert torch.equal(model.fc2.weight, tiny_net().fc2.weight)


def test_maskworld_mask_is_bounded_and_multiplies_chosen_layers_only():
    model = tiny_net()
    world = make("maskworld", model, mask_strength=0.5, mask_gain=2.0)
    world.reset()
    action = np.ones(world.action_space.shape, dtype=np.float32)
    first_layer = 4 + 5
    action[first_layer - 5:first_layer] = -1.0  # V of fc1 = -1: every fc1 entry scaled by 1 - 0.5 tanh(2)
    world.step(action)
    low, high = 1 - 0.5 * np.tanh(2.0), 1 + 0.5 * np.tanh(2.0)
    expected = {"fc1": model.fc1.weight.detach() * low, "fc3": model.fc3.weight.detach() * high}
    reference = manual_copy(model, expected)
    torch.testing.assert_close(model(INPUTS), reference(INPUTS), rtol=1e-5, atol=1e-6)
    # any action keeps the mask inside [1 - strength, 1 + strength]
    u, v = torch.full((7, 1), 1.0), torch.full((3, 1), -1.0)
    mask = world.mask(u * 100, v)
    assert float(mask.min()) >= 0.5 - 1e-6 and float(mask.max()) <= 1.5 + 1e-6


def test_masks_compose_multiplicatively_over_steps():
    model = tiny_net()
    world = make("maskworld", model, mask_strength=0.5, mask_gain=2.0)
    world.reset()
    action = np.ones(world.action_space.shape, dtype=np.float32)
    world.step(action)
    world.step(action)
    factor = (1 + 0.5 * np.tanh(2.0)) ** 2
    torch.testing.assert_close(world.current_weight("fc3").t(), model.fc3.weight.detach() * factor)


def test_reward_follows_utility_and_task_on_a_hand_made_case():
    model = tiny_net()
    # utility: mean of fc3's weights seen through the model (sum of outputs on the all-ones input, minus bias)
    ones = torch.ones(1, 3)

    def utility(m):
        with torch.no_grad():
            return float(m.fc3(ones).sum() - m.fc3.bias.sum())

    world = make_world("shiftworld", model, ["fc3"], utility, lambda m: -utility(m),
                       WorldConfig(utility_weight=1.0, task_weight=0.5))
    start = utility(model)
    world.reset()
    up = np.ones(world.action_space.shape, dtype=np.float32)  # U V^T = all ones: every weight grows
    _, reward, _, _, info = world.step(up)
    gain = info["utility"] - start
    assert gain > 0
    assert reward == pytest.approx(1.0 * gain + 0.5 * gain, rel=1e-5)  # potential = u - 0.5 * task = 1.5 u
    down = np.concatenate([np.ones(3), -np.ones(2)]).astype(np.float32)  # U V^T = all minus ones
    _, reward_down, _, _, info_down = world.step(down)
    assert info_down["utility"] < info["utility"] and reward_down < 0


def test_goal_terminates_with_bonus_and_budget_truncates():
    model = tiny_net()
    calls = iter([1.0, 1.0, 0.0])  # task at reset, after step 1, after step 2
    world = make_world("shiftworld", model, ["fc3"], lambda m: 1.0, lambda m: next(calls),
                       WorldConfig(task_goal=0.1, utility_floor=0.5, success_bonus=2.0, max_steps=5))
    world.reset()
    action = np.zeros(world.action_space.shape, dtype=np.float32)
    _, reward, terminated, truncated, _ = world.step(action)
    assert (reward, terminated, truncated) == (0.0, False, False)
    _, reward, terminated, truncated, info = world.step(action)
    assert terminated and not truncated and info["goal_met"]
    assert reward == pytest.approx(1.0 + 2.0)
    world.close()  # one store per model: the next world starts from the unedited model
    world = make_world("maskworld", model, ["fc3"], lambda m: 1.0, lambda m: 1.0, WorldConfig(max_steps=2))
    world.reset()
    assert world.step(action)[3] is False
    assert world.step(action)[3] is True


def test_observation_has_layer_stats_and_metrics():
    model = tiny_net()
    world = make("shiftworld", model, task=lambda m: 0.25)
    obs, _ = world.reset()
    assert obs.shape == world.observation_space.shape == (4 * 2 + 3,)
    weight = model.fc1.weight.detach()
    np.testing.assert_allclose(obs[:4], [weight.mean(), weight.std(), weight.abs().max(), 0.0], rtol=1e-5)
    assert obs[-3] == pytest.approx(output_sum(model)) and obs[-2] == 0.25 and obs[-1] == 0.0


def test_unknown_or_non_linear_layers_are_rejected_with_the_layer_list():
    model = tiny_net()
    with pytest.raises(WorldError, match=r"unknown layer 'fc9'.*\['fc1', 'fc2', 'fc3'\]"):
        make("shiftworld", model, layers=["fc9"])
    with pytest.raises(WorldError, match="no 2-D weight"):
        make("maskworld", model, layers=["act1"])
    with pytest.raises(WorldError, match="repeat"):
        make("maskworld", model, layers=["fc1", "fc1"])
    with pytest.raises(WorldError, match="non-empty list"):
        make("maskworld", model, layers="fc1")
    with pytest.raises(WorldError, match="unknown world"):
        make_world("driftworld", model, ["fc1"], output_sum, output_sum)


@pytest.mark.parametrize("kind", ["shiftworld", "maskworld"])
def test_bad_actions_are_rejected_and_change_nothing(kind):
    model = tiny_net()
    out_before = model(INPUTS).detach().clone()
    world = make(kind, model)
    with pytest.raises(WorldError, match="reset"):
        world.step(np.zeros(world.action_space.shape, dtype=np.float32))
    world.reset()
    size = world.action_space.shape[0]
    bad = np.zeros(size, dtype=np.float32)
    bad[3] = np.nan
    for action, message in [(np.zeros(size - 1), rf"shape \({size - 1},\), expected \({size},\)"),
                            (np.zeros((1, size)), "shape"), (bad, "NaN or infinite"),
                            (np.full(size, np.inf), "NaN or infinite"), (np.full(size, 1.5), r"\[-1, 1\]"),
                            ("left", "numeric")]:
        with pytest.raises(WorldError, match=message):
            world.step(action)
    assert len(world.store) == 0 and torch.equal(model(INPUTS), out_before)


def test_failing_or_non_finite_evaluators_give_clear_errors():
    model = tiny_net()

    def broken(m):
        raise RuntimeError("scoring data missing")

    with pytest.raises(WorldError, match="task evaluator failed: RuntimeError: scoring data missing"), \
            make("shiftworld", model, task=broken) as world:
        world.reset()
    with pytest.raises(WorldError, match="utility evaluator must return a finite number, got nan"), \
            make("maskworld", model, utility=lambda m: float("nan")) as world:
        world.reset()
    with pytest.raises(WorldError, match="finite number, got 'high'"), \
            make("maskworld", model, task=lambda m: "high") as world:
        world.reset()


def test_invalid_world_settings():
    model = tiny_net()
    for config, message in [({"rank": 0}, "rank"), ({"reward": "sparse"}, "reward"),
                            ({"mask_strength": 1.5}, "mask_strength"), ({"shift_scale": 0.0}, "shift_scale")]:
        with pytest.raises(WorldError, match=message):
            make("shiftworld", model, **config)


def test_yaml_settings_errors_name_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("world: maskworld\ntask: unlearning\nagent: {kind: ppo, env_stepz: 10}\n")
    with pytest.raises(ConfigError, match=r"run.yaml.agent: unknown key\(s\) \['env_stepz'\]"):
        load_run_settings(path)
    path.write_text("world: maskworld\ntask: unlearning\nenv: {rank: two}\n")
    with pytest.raises(ConfigError, match=r"env.rank: expected int, got 'two'"):
        load_run_settings(path)
    path.write_text("world: maskworld\ntask: unlearning\nagent: {kind: dqn}\n")
    with pytest.raises(ConfigError, match="'ppo' or 'pathwise'"):
        load_run_settings(path)
    path.write_text("world: maskworld\ntask: unlearning\n")
    settings = load_run_settings(path, ["agent.env_steps=64", "env.rank=3"])
    assert settings.agent.env_steps == 64 and settings.env.rank == 3


def test_shipped_settings_files_load():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "hparams" / "worlds").glob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        settings = load_run_settings(path)
        assert settings.world in ("shiftworld", "maskworld") and settings.task in ("unlearning", "bias")


def test_world_classes_are_registered():
    assert make_world("shiftworld", tiny_net(), ["fc1"], output_sum, output_sum).__class__ is ShiftWorld
    assert make_world("maskworld", tiny_net(), ["fc1"], output_sum, output_sum).__class__ is MaskWorld


def test_bias_metrics_on_a_hand_made_case():
    from rledit.worlds.tasks.bias import auc, equality_gap

    prob = torch.tensor([0.9, 0.1, 0.9, 0.1, 0.1, 0.1])
    labels = torch.tensor([False, False, True, False, False, True])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # overall FPR 1/4, FNR 1/2; group 0: FPR 1/2, FNR 0; group 1: FPR 0, FNR 1
    gap = equality_gap(prob, labels, groups)
    assert gap["fpr_gap"] == pytest.approx(25.0) and gap["fnr_gap"] == pytest.approx(50.0)
    assert gap["bias_gap"] == pytest.approx(37.5)
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])) == pytest.approx(75.0)
