"""The memory of earlier edit steps' keys, for solves that keep what earlier steps wrote (ALGORITHM.md §4b).

Per edited module, :class:`KeyMemory` holds the keys of every applied step and their running second moment
C_mem = Σ_s K_sᵀK_s (d_in × d_in, fp64). A method *stages* a step's keys while it computes that step's
update; the editor (or trainer) then tells the method whether the step was applied (:meth:`commit`, with the
store's step id) and later whether it was reverted (:meth:`revert`), so the memory always holds exactly the
keys of the steps that are applied. Reverting recomputes C_mem from the remaining steps in their order, so the
result is bit-for-bit what it would have been had the reverted step never been applied.

The keys are kept per step (fp32, N × d_in: about the size of the step's factors in the delta store), so a
saved editor can still revert a step after it is loaded. AlphaEdit's cache of edited keys and the
memory-aware ridge solve of the hypernetwork family both keep their memory here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

PREFIX = "key_memory/"


class KeyMemory:
    """Keys of the applied steps and their running second moment, per module (see the module docstring)."""

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], device: torch.device | str = "cpu"):
        self.d_in = {name: int(shape[0]) for name, shape in module_shapes.items()}
        self.device = torch.device(device)
        self.steps: dict[int, dict[str, torch.Tensor]] = {}  # step id -> module -> keys (N, d_in) fp32
        self.staged: dict[str, torch.Tensor] | None = None
        self.grams = self._zeros()

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {name: torch.zeros(d, d, dtype=torch.float64, device=self.device) for name, d in self.d_in.items()}

    def gram(self, name: str) -> torch.Tensor:
        """C_mem of module ``name`` (fp64, d_in × d_in): the summed Gram matrices of the applied steps' keys."""
        return self.grams[name]

    def rows(self, name: str) -> int:
        """The number of keys of module ``name`` the memory holds (over every applied step)."""
        return sum(len(keys[name]) for keys in self.steps.values())

    def __len__(self) -> int:
        """The number of applied steps remembered."""
        return len(self.steps)

    def stage(self, keys: Mapping[str, torch.Tensor]) -> None:
        """Hold this step's keys (module → (N, d_in)) until the step is committed; replaces an earlier stage."""
        self.staged = {name: k.detach().to(self.device, torch.float32).clone() for name, k in keys.items()}

    def commit(self, step_id: int) -> None:
        """The staged step was applied as ``step_id``: add its keys to the memory."""
        if self.staged is None:
            raise RuntimeError("no staged keys to commit: compute the step's update before committing it")
        if step_id in self.steps:
            raise ValueError(f"step {step_id} is already in the key memory")
        keys, self.staged = self.staged, None
        self.steps[step_id] = keys
        for name, k in keys.items():
            self.grams[name] = self.grams[name] + _gram(k)

    def discard(self) -> None:
        """Drop the staged keys (the step was not applied)."""
        self.staged = None

    def revert(self, step_id: int) -> None:
        """Forget step ``step_id`` (a no-op for a step the memory never saw) and rebuild C_mem from the rest."""
        if self.steps.pop(step_id, None) is None:
            return
        self.grams = self._zeros()
        for keys in self.steps.values():
            for name, k in keys.items():
                self.grams[name] = self.grams[name] + _gram(k)

    def reset(self) -> None:
        """Forget every step (a new training episode, or a store that was reset)."""
        self.steps, self.staged, self.grams = {}, None, self._zeros()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors: ``key_memory/<step id>/<module>`` → keys, in step order (safetensors-ready)."""
        return {f"{PREFIX}{step_id}/{name}": k for step_id, keys in self.steps.items() for name, k in keys.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the steps saved by :meth:`state_dict` (entries without the prefix are ignored)."""
        steps: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if not key.startswith(PREFIX):
                continue
            step, _, name = key[len(PREFIX):].partition("/")
            if name not in self.d_in or not step.isdigit() or value.dim() != 2 or value.shape[1] != self.d_in[name]:
                raise ValueError(f"key memory entry {key!r} of shape {tuple(value.shape)} does not fit the "
                                 f"edited modules {self.d_in}")
            steps.setdefault(int(step), {})[name] = value.to(self.device, torch.float32).clone()
        self.reset()
        for step_id in sorted(steps):
            self.staged = steps[step_id]
            self.commit(step_id)


def split_memory_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the entries of a method state that are not key memory, the key memory's entries)."""
    rest = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    return rest, {k: v for k, v in state.items() if k.startswith(PREFIX)}


def _gram(keys: torch.Tensor) -> torch.Tensor:
    keys64 = keys.to(torch.float64)
    return keys64.T @ keys64

