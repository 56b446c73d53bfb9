"""Agents that edit in the worlds: PPO (stable-baselines3) and a path-wise gradient agent.

Both end with :meth:`rollout`: one episode from the pre-episode weights whose edits are left applied, so the
caller can measure the edited model and then revert it with ``world.reset()`` or ``world.close()``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rledit.worlds.config import AgentSettings
from rledit.worlds.env import EditWorld, WorldError
from rledit.worlds.tasks import Surrogate

Progress = Callable[[int], None]  # called with the number of environment steps just taken


class PPOAgent:
    """A Gaussian MLP policy trained with PPO for ``settings.env_steps`` steps; acts deterministically after."""

    def __init__(self, settings: AgentSettings, seed: int) -> None:
        self.settings, self.seed = settings, seed
        self.policy = None

    def train(self, world: EditWorld, progress: Progress | None = None) -> None:
        """Learn a policy on ``world`` (stable-baselines3 PPO on CPU)."""
        from stable_baselines3 import PPO
        from stable_baselines3.common.callbacks import BaseCallback

        class ReportSteps(BaseCallback):
            def _on_step(self) -> bool:
                if progress is not None:
                    progress(self.training_env.num_envs)
                return True

        s = self.settings
        self.policy = PPO(
            "MlpPolicy", world, learning_rate=s.learning_rate, n_steps=s.n_steps, batch_size=s.batch_size,
            n_epochs=s.n_epochs, gamma=s.gamma, gae_lambda=s.gae_lambda, ent_coef=s.ent_coef,
            clip_range=s.clip_range, seed=self.seed, device="cpu", verbose=0,
            policy_kwargs={"log_std_init": s.log_std_init, "net_arch": list(s.net_arch)},
        )
        self.policy.learn(total_timesteps=s.env_steps, callback=ReportSteps())

    def rollout(self, world: EditWorld, progress: Progress | None = None) -> int:
        """Run one deterministic episode and leave its edits applied; returns its number of steps."""
        if self.policy is None:
            raise WorldError("train() the PPO agent before rollout()")
        observation, _ = world.reset()
        steps, done = 0, False
        while not done:
            action, _ = self.policy.predict(observation, deterministic=True)
            observation, _, terminated, truncated, _ = world.step(action)
            steps, done = steps + 1, terminated or truncated
            if progress is not None:
                progress(1)
        return steps


class PathwiseAgent:
    """Finds each action by gradient descent on a differentiable surrogate of the reward.

    The action is tanh(z) (so it stays inside the action box); z starts at ``init_scale`` · N(0, 1) and takes
    ``inner_steps`` Adam steps on ``surrogate`` evaluated with the candidate edit riding on the delta store's
    ``pending`` hooks. The agent has no parameters carried across steps, so ``train`` does nothing.
    """

    def __init__(self, settings: AgentSettings, seed: int, surrogate: Surrogate) -> None:
        self.settings, self.surrogate = settings, surrogate
        self.generator = torch.Generator().manual_seed(seed)

    def train(self, world: EditWorld, progress: Progress | None = None) -> None:
        """Nothing to learn ahead of time: actions are optimised when taken."""

    def act(self, world: EditWorld) -> np.ndarray:
        """The action that (locally) minimises the surrogate after this step's edit."""
        size = world.action_space.shape[0]
        z = (torch.randn(size, generator=self.generator) * self.settings.init_scale).requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=self.settings.lr)
        for _ in range(self.settings.inner_steps):
            with world.store.pending(world.updates_for(torch.tanh(z))):
                loss = self.surrogate(world.model, self.generator)
                optimiser.zero_grad()
                loss.backward()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the surrogate loss became {loss.item()}; lower the agent's lr")
            optimiser.step()
        return torch.tanh(z).detach().numpy()

    def rollout(self, world: EditWorld, progress: Progress | None = None) -> int:
        """One episode of optimised actions, until the goal, the step budget or ``env_steps``; edits stay applied."""
        world.reset()
        steps, done = 0, False
        while not done and steps < self.settings.env_steps:
            _, _, terminated, truncated, _ = world.step(self.act(world))
            steps, done = steps + 1, terminated or truncated
            if progress is not None:
                progress(1)
        return steps


def make_agent(settings: AgentSettings, seed: int, surrogate: Surrogate) -> PPOAgent | PathwiseAgent:
    """The agent for ``settings.kind`` (``"ppo"`` or ``"pathwise"``)."""
    if settings.kind == "ppo":
        return PPOAgent(settings, seed)
    if settings.kind == "pathwise":
        return PathwiseAgent(settings, seed, surrogate)
    raise WorldError(f"unknown agent kind {settings.kind!r}; kinds: ['pathwise', 'ppo']")
