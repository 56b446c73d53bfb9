"""The contract every editing method follows, and the registry that finds a method by name.

A method computes the weight updates of ONE edit step and returns them; it never mutates the model (the delta
store applies what it returns). Updates are given per edited module in the uniform (d_in, d_out) view of
:mod:`rledit.targets`, either as fp32 factors ``(U, V)`` with ``ΔW = U @ V`` (U: d_in×r, V: r×d_out) or as a
dense fp32 ``ΔW`` (d_in×d_out).

A method implements exactly one of two entry points:

* :meth:`EditMethod.compute_updates` ``(features, targets)`` for methods that only need the step's keys and
  value-gradients (RLEdit, MALMEN, MEND, UltraEdit-style closed forms). The editor captures the features.
* :meth:`EditMethod.compute_step` ``(model, tokenizer, targets, requests, features)`` for methods that work
  from the model and the requests themselves (FT, MEMIT, AlphaEdit). Such a method sets
  ``uses_features = False`` and the editor passes ``features=None`` (and skips the capture).

The editor always calls :meth:`compute_step`; its default forwards to :meth:`compute_updates`. Optional
hooks: :meth:`prepare` (once, before the first step: build networks, estimate statistics),
:meth:`edit_batch` (what the step's features are read from), :meth:`capture` (how they are read), :meth:`step_applied` / :meth:`step_reverted` / :meth:`steps_cleared` (what happened to the computed steps, for
methods that remember earlier ones) and
:meth:`state_dict` / :meth:`load_state_dict` for methods whose state must be saved with the editor (plain
tensors, safetensors-compatible). Training a learned editor is not part of this contract: it lives in the
method's own trainer module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from rledit.hooks import capture_features
from rledit.targets import EditTarget
from rledit.tokens import TokenBatch, encode_after_prefixes
from rledit.types import EditRequest

Factors = tuple[torch.Tensor, torch.Tensor]
Update = Factors | torch.Tensor  # (U, V) factors or a dense (d_in, d_out) delta


class StepFeaturesLike(Protocol):
    """What a feature-based method reads from one edit step: per module name, keys (N, d_in) and
    value-gradients (N, d_out), rows aligned across modules (see ``rledit.hooks.StepFeatures``)."""

    keys: Mapping[str, torch.Tensor]
    grads: Mapping[str, torch.Tensor]


class UpdateError(ValueError):
    """A method could not produce a usable update (non-finite features or result, wrong shapes)."""


class UnknownMethodError(ValueError):
    """No method is registered under the requested name."""


class EditMethod:
    """Base class of editing methods. Subclasses set ``name``, ``hparams_class`` and override
    :meth:`compute_updates` or :meth:`compute_step` (see the module docstring)."""

    name: ClassVar[str] = ""
    hparams_class: ClassVar[type | None] = None  # the dataclass of this method's hyper-parameters
    uses_features: ClassVar[bool] = True  # False: the editor passes features=None to compute_step

    def prepare(self, model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget]) -> None:
        """Called once before the first edit step with the model and its edited modules. Default: nothing."""

    def compute_updates(
        self, features: StepFeaturesLike, targets: Sequence[EditTarget]
    ) -> dict[str, Update]:
        """The updates of one step from its features alone: module name → ``(U, V)`` or dense ``ΔW``."""
        raise NotImplementedError(
            f"method {self.name or type(self).__name__!r} must implement compute_updates or compute_step"
        )

    def compute_step(
        self,
        model: nn.Module,
        tokenizer: Any,
        targets: Sequence[EditTarget],
        requests: Sequence[EditRequest],
        features: StepFeaturesLike | None,
    ) -> dict[str, Update]:
        """The updates of one step; the default delegates to :meth:`compute_updates` with ``features``."""
        if features is None:
            raise UpdateError(f"method {self.name!r} needs the step's features; the editor passed none")
        return self.compute_updates(features, targets)

    def edit_batch(self, tokenizer: Any, requests: Sequence[EditRequest], max_length: int | None = None) -> TokenBatch:
        """The batch the step's features are captured from (and whose size the editor's memory check counts).
        Default: the requests' prompts + targets, left-padded, features at the answer positions; RLEdit may add
        context-prefixed rows and mark the subjects."""
        return encode_after_prefixes(tokenizer, requests, ("",), max_length)

    def capture(self, model: nn.Module, targets: Sequence[EditTarget], batch: TokenBatch) -> StepFeaturesLike:
        """The step's features from ``batch`` (:meth:`edit_batch`) on the current model: one forward+backward
        (:func:`rledit.hooks.capture_features`). A method that runs the model again within the step may override
        it to share work with :meth:`compute_step`, which the editor calls right after it."""
        return capture_features(model, targets, batch)

    def step_bytes(self, n_tokens: int, targets: Sequence[EditTarget]) -> int:
        """A rough upper estimate of the memory (bytes) :meth:`compute_step` needs beyond the feature capture
        for a step of ``n_tokens`` answer tokens; the editor refuses a step whose total does not fit.
        Default: 0 (unknown: only the capture is counted)."""
        return 0

    def step_applied(self, step_id: int) -> None:
        """Called by the editor right after the step computed last was applied as ``step_id``. Methods that
        remember earlier steps (a key memory) record it here. Default: nothing."""

    def step_reverted(self, step_id: int) -> None:
        """Called by the editor after step ``step_id`` was reverted. Default: nothing."""

    def steps_cleared(self) -> None:
        """Called when every step was removed at once (a reset store, a new training episode). Default: nothing."""

    def setup_report(self) -> dict[str, Any]:
        """JSON-ready facts about what :meth:`prepare` built (e.g. corpus statistics, where they came from and
        how long computing them took), recorded in results files. Default: nothing."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's saved state as plain tensors (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned. The default accepts only an empty state."""
        if state:
            raise UpdateError(f"method {self.name!r} has no state, but a state with {sorted(state)[:5]} was given")


def check_updates(updates: Mapping[str, Update], shapes: Mapping[str, tuple[int, int]]) -> None:
    """Raise :class:`UpdateError` unless every update names a module of ``shapes`` (name → (d_in, d_out),
    e.g. ``{t.name: t.shape for t in targets}``), has that shape, and is finite. Call it before applying
    anything, so that a bad step leaves the model untouched."""
    for name, update in updates.items():
        if name not in shapes:
            raise UpdateError(f"update for {name!r}, which is not an edited module; edited: {sorted(shapes)}")
        d_in, d_out = shapes[name]
        if isinstance(update, torch.Tensor):
            parts, ok = (update,), tuple(update.shape) == (d_in, d_out)
        else:
            u, v = update
            parts = (u, v)
            ok = u.dim() == 2 and v.dim() == 2 and u.shape[0] == d_in and v.shape[1] == d_out
            ok = ok and u.shape[1] == v.shape[0]
        if not ok:
            got = [tuple(p.shape) for p in parts]
            raise UpdateError(f"{name}: update of shape(s) {got} does not fit (d_in, d_out) = {(d_in, d_out)}")
        if not all(bool(torch.isfinite(p).all()) for p in parts):
            raise UpdateError(
                f"{name}: the update is not finite (inf/nan); the step was not applied. Check the edit "
                "batch and the method's step size / regularisation"
            )


_REGISTRY: dict[str, type[EditMethod]] = {}
M = TypeVar("M", bound=type[EditMethod])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make an :class:`EditMethod` subclass available as ``get_method(name)``."""

    def register(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, EditMethod)):
            raise TypeError(f"register_method({name!r}) expects an EditMethod subclass, got {cls!r}")
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"method name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return register


def get_method(name: str) -> type[EditMethod]:
    """The method class registered under ``name``, or an error listing the registered names."""
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown editing method {name!r}; registered methods: {available_methods()}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)
