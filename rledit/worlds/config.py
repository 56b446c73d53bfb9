"""Run settings for the editing worlds, read from YAML (``hparams/worlds/*.yaml``) with clear errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rledit.worlds.env import WorldConfig
from rledit.worlds.tasks import BaselineSettings


class ConfigError(ValueError):
    """A settings file or value that cannot be used; the message names the file and the key."""


@dataclass
class AgentSettings:
    """Which agent edits, for how many environment steps, and its hyper-parameters.

    ``ppo``: stable-baselines3 PPO trained for ``env_steps`` steps, then one deterministic episode.
    ``pathwise``: no learned policy; each action is found by ``inner_steps`` Adam steps (``lr``) on the task's
    differentiable surrogate, from a random start of size ``init_scale``; runs until the goal or ``env_steps``.
    """

    kind: str = "ppo"
    env_steps: int = 2048
    layers: list[str] | None = None  # layers this agent edits; default: the run's layers
    learning_rate: float = 3e-4
    n_steps: int = 256
    batch_size: int = 64
    n_epochs: int = 10
    gamma: float = 0.99
    gae_lambda: float = 0.95
    ent_coef: float = 0.0
    clip_range: float = 0.2
    log_std_init: float = -1.0
    net_arch: list[int] = field(default_factory=lambda: [64, 64])
    inner_steps: int = 50
    lr: float = 0.05
    init_scale: float = 0.1


@dataclass
class RunSettings:
    """One ``rledit worlds run``: world × task, layers, environment, agent(s) and baselines."""

    world: str
    task: str
    seed: int = 0
    layers: list[str] | None = None
    env: WorldConfig = field(default_factory=WorldConfig)
    agent: AgentSettings = field(default_factory=AgentSettings)
    compare_agents: list[AgentSettings] = field(default_factory=list)
    baselines: list[BaselineSettings] = field(default_factory=list)
    task_settings: dict[str, Any] = field(default_factory=dict)


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and values of the wrong type.

    ``where`` names the source (file and key path) in error messages, e.g. ``"run.yaml: agent"``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in data and _required(f)]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    values = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"agent.env_steps=512"`` → (["agent", "env_steps"], 512); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. agent.env_steps=512")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_run_settings(path: str | Path, overrides: list[str] | None = None) -> RunSettings:
    """Read a worlds YAML file, apply ``key.path=value`` overrides, and validate it into :class:`RunSettings`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read settings: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides or []:
        keys, value = parse_override(override)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override!r}: {key} is not a mapping")
        node[keys[-1]] = value
    settings = from_dict(RunSettings, data, str(path))
    for agent in [settings.agent, *settings.compare_agents]:
        if agent.kind not in ("ppo", "pathwise"):
            raise ConfigError(f"{path}: agent kind must be 'ppo' or 'pathwise', got {agent.kind!r}")
    return settings
