"""The delta store: every applied edit step as fp32 updates, applied to the model without touching weights.

Each step records, per edited module, either factors (U: d_in×r, V: r×d_out, ΔW = U @ V) or a dense ΔW, all in
fp32 and in the uniform (d_in, d_out) view of :mod:`rledit.targets`. Per module the store also keeps ONE
accumulated fp32 delta (the sum of its steps, in step order). A forward hook on each edited module adds
``input @ delta`` to the module's output (in fp32, cast back to the output dtype), so:

* base weights (fp32 or bf16) are never mutated, and small deltas are never rounded through bf16;
* a forward costs the same after 1 or 1,000 steps (one (d_in, d_out) matmul per module);
* ``revert(step)`` is exact: the accumulated delta is recomputed from the remaining steps in the same order,
  and a module with no step left gets no addition at all, so reverting everything restores the original
  outputs.

Storage format (``save``/``load``): ``deltas.safetensors`` (tensors ``"{step}/{module}/U|V|dense"``) and
``deltas.json`` (format version, model fingerprint, steps, and the sha256 of the tensor file). No pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import save_file
from torch import nn

from rledit.files import FileFormatError, atomic_directory, file_sha256, read_json, read_safetensors
from rledit.targets import EditTarget

FORMAT = "rledit-delta-store"
FORMAT_VERSION = 1
META_FILE = "deltas.json"
TENSOR_FILE = "deltas.safetensors"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its attached stores

Update = Union[torch.Tensor, "tuple[torch.Tensor, torch.Tensor]"]


class DeltaError(ValueError):
    """An update, step id or saved folder the delta store cannot use; store and model are left unchanged."""


@dataclass(frozen=True, eq=False)
class ModuleUpdate:
    """One step's fp32 update of one module, (d_in, d_out) view: factors ``u @ v`` or a ``dense`` delta."""

    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    rank: int | None = None  # known rank (bound) of a dense delta kept from factors: min(r, d_in, d_out)

    @property
    def kind(self) -> str:
        """``"factors"`` or ``"dense"``."""
        return "dense" if self.dense is not None else "factors"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by label (``U``/``V`` or ``dense``)."""
        return {"dense": self.dense} if self.dense is not None else {"U": self.u, "V": self.v}

    def product(self) -> torch.Tensor:
        """ΔW of this update, (d_in, d_out)."""
        return self.dense if self.dense is not None else self.u @ self.v

    def apply_to(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ ΔW`` without forming ΔW for factors."""
        return inputs @ self.dense if self.dense is not None else (inputs @ self.u) @ self.v


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, bf16 included), for hashing."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def model_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``model`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def weight_digests(targets: Mapping[str, EditTarget]) -> dict[str, str]:
    """sha256 per edited module of its base weight (dtype, shape and bytes): what a save's edits were made on."""
    digests = {}
    for name, target in targets.items():
        weight = target.weight
        digest = hashlib.sha256(f"{weight.dtype}|{tuple(weight.shape)}".encode())
        digest.update(tensor_bytes(weight))
        digests[name] = digest.hexdigest()
    return digests


@dataclass
class StoredSteps:
    """The applied steps of a :class:`DeltaStore` taken out of it by :meth:`DeltaStore.exchange_steps`."""

    steps: dict[int, dict[str, ModuleUpdate]]
    accumulated: dict[str, torch.Tensor]


class DeltaStore:
    """Per-step fp32 updates of a model's edited modules, applied through forward hooks.

    Works with any ``nn.Module`` whose targets come from :func:`rledit.targets.resolve_targets` or
    :func:`rledit.targets.make_target`; Hugging Face models additionally get a config-based fingerprint.
    Call :meth:`detach` to remove the hooks (the model then behaves as if no step had been applied).
    A model carries one attached store at a time unless ``stack=True`` (a private store on top of another,
    as the methods that train through the model use).
    """

    def __init__(self, model: nn.Module, targets: Sequence[EditTarget], stack: bool = False) -> None:
        targets = list(targets)
        if not targets:
            raise DeltaError("a delta store needs at least one edit target")
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise DeltaError(f"duplicate target names: {names}")
        if len({id(t.module) for t in targets}) != len(targets):
            raise DeltaError("two targets wrap the same module; each module can be edited only once")
        in_model = {id(m) for m in model.modules()}
        outside = [t.name for t in targets if id(t.module) not in in_model]
        if outside:
            raise DeltaError(f"targets {outside} are not modules of the given model")
        carried = [s for s in _ATTACHED.get(model, []) if s._handles]
        if carried and not stack:
            raise DeltaError(
                f"this model already carries an rledit delta store ({len(carried[0])} step(s), modules "
                f"{list(carried[0].targets)}): a second one would stack its edits on top and its unedited view "
                "would still hold the first one's. Detach the first (editor.store.detach()), or pass stack=True"
            )
        self.model = model
        self.targets: dict[str, EditTarget] = {t.name: t for t in targets}
        self._steps: dict[int, dict[str, ModuleUpdate]] = {}
        self._accumulated: dict[str, torch.Tensor] = {}
        self._pending: list[dict[str, ModuleUpdate]] = []
        self._bypass = False
        self._merged: set[int] = set()  # ids of steps folded into the base weights by merge()
        self._next_id = 0
        self._handles = [t.module.register_forward_hook(self._make_hook(t.name)) for t in targets]
        _ATTACHED.setdefault(model, []).append(self)

    # ----------------------------------------------------------------------------------------- applying
    def _make_hook(self, name: str):
        def add_delta(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._bypass:
                return None
            delta = self._accumulated.get(name)
            extras = [p[name] for p in self._pending if name in p]
            if delta is None and not extras:
                return None
            inputs = args[0].to(torch.float32)
            shift = inputs @ delta if delta is not None else None
            for extra in extras:
                term = extra.apply_to(inputs)
                shift = term if shift is None else shift + term
            return (output.to(torch.float32) + shift).to(output.dtype)

        return add_delta

    def _prepare(self, updates: Mapping[str, Update], detach: bool) -> dict[str, ModuleUpdate]:
        """Check names and shapes; fp32 copies on each module's device (detached copies when ``detach``)."""
        if not isinstance(updates, Mapping) or not updates:
            raise DeltaError("updates must be a non-empty mapping {module name: (U, V) or dense ΔW}")
        unknown = [name for name in updates if name not in self.targets]
        if unknown:
            raise DeltaError(f"unknown module(s) {unknown}; this store edits {list(self.targets)}")
        prepared = {}
        for name, value in updates.items():
            target = self.targets[name]
            device = target.weight.device

            if isinstance(value, torch.Tensor):
                dense = _as_fp32(name, "dense delta", value, target.shape, device, detach)
                prepared[name] = ModuleUpdate(dense=dense)
            elif isinstance(value, (tuple, list)) and len(value) == 2:
                u, v = value
                rank = u.shape[1] if isinstance(u, torch.Tensor) and u.dim() == 2 else -1
                if rank < 1:
                    raise DeltaError(f"{name}: U must be a (d_in, r) tensor with r >= 1")
                update = ModuleUpdate(
                    u=_as_fp32(name, "U", u, (target.d_in, rank), device, detach),
                    v=_as_fp32(name, "V", v, (rank, target.d_out), device, detach),
                )
                if detach and rank * (target.d_in + target.d_out) > target.d_in * target.d_out:
                    update = ModuleUpdate(dense=update.product(),  # the product is smaller than its factors
                                          rank=min(rank, target.d_in, target.d_out))
                prepared[name] = update
            else:
                raise DeltaError(
                    f"{name}: expected factors (U, V) or a dense (d_in, d_out) tensor, "
                    f"got {type(value).__name__}"
                )
        return prepared

    def add(self, updates: Mapping[str, Update]) -> int:
        """Record one step of updates and apply it; returns the step id (a monotonic int).

        ``updates`` maps module names to factors ``(U, V)`` (ΔW = U @ V, U: d_in×r, V: r×d_out) or a dense
        (d_in, d_out) tensor. Factors larger than their product (r·(d_in + d_out) > d_in·d_out) are kept as the
        dense product, so no step holds more than one d_in×d_out matrix per module. Everything is validated first (names, shapes, finite values, finite sums); on
        any problem a :class:`DeltaError` is raised and nothing changes.
        """
        self._check_attached()
        prepared = self._prepare(updates, detach=True)
        new_totals = {}
        for name, update in prepared.items():
            for label, tensor in update.tensors().items():
                if not torch.isfinite(tensor).all():
                    raise DeltaError(f"{name}: {label} has NaN or inf values; nothing was applied")
            total = _accumulate(self._accumulated.get(name), update.product())
            if not torch.isfinite(total).all():
                raise DeltaError(f"{name}: the accumulated delta would overflow fp32; nothing was applied")
            new_totals[name] = total
        step_id = self._next_id
        self._next_id += 1
        self._steps[step_id] = prepared
        self._accumulated.update(new_totals)
        return step_id

    def revert(self, step_id: int) -> None:
        """Remove one step exactly: affected modules' deltas are recomputed from the remaining steps."""
        self._check_attached()
        if step_id in self._merged:
            raise DeltaError(f"step {step_id} was merged into the base weights (merge()); it can no longer be "
                             "reverted on its own")
        if step_id not in self._steps:
            raise DeltaError(f"no step {step_id!r} in the store; steps: {self.steps}")
        remaining = {sid: updates for sid, updates in self._steps.items() if sid != step_id}
        totals = {name: _sum_steps(remaining, name) for name in self._steps[step_id]}
        self._steps = remaining
        for name, total in totals.items():
            if total is None:
                self._accumulated.pop(name, None)
            else:
                self._accumulated[name] = total

    @contextlib.contextmanager
    def pending(self, updates: Mapping[str, Update]) -> Iterator[None]:
        """Add graph-carrying updates on top of the stored ones for the duration of the ``with`` block.

        Gradients flow from the model's outputs to the given tensors (for training); nothing is recorded and
        no weight is mutated. Names and shapes are validated; values are not checked for finiteness.
        """
        self._check_attached()
        prepared = self._prepare(updates, detach=False)
        self._pending.append(prepared)
        try:
            yield
        finally:
            self._pending = [p for p in self._pending if p is not prepared]

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Inside the ``with`` block the model computes as unedited (no stored or pending delta is added)."""
        self._check_attached()
        previous, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = previous

    @property
    def is_bypassed(self) -> bool:
        """Whether the model is inside :meth:`bypassed` (computing as unedited)."""
        return self._bypass

    @property
    def merged_steps(self) -> list[int]:
        """Ids of the steps that :meth:`merge` folded into the base weights (they cannot be reverted)."""
        return sorted(self._merged)

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """Per edited module with a delta, its weight with the accumulated delta folded in (native orientation
        and dtype, rounded once), as new tensors: the model is not changed."""
        with torch.no_grad():
            return {name: (self.targets[name].weight.to(torch.float32) + self.targets[name].to_native(delta))
                    .to(self.targets[name].weight.dtype) for name, delta in self._accumulated.items()}

    def merge(self) -> None:
        """Fold the accumulated deltas into the base weights (rounded once to their dtype), then reset."""
        self._check_attached()
        merged = self.merged_weights()
        self._merged.update(self._steps)
        with torch.no_grad():
            for name, weight in merged.items():
                self.targets[name].weight.copy_(weight)
        self.reset()

    def reset(self) -> None:
        """Forget every step (the model is back to its base weights); step ids keep counting up."""
        self._steps = {}
        self._accumulated = {}

    def exchange_steps(self, steps: StoredSteps | None = None) -> StoredSteps:
        """Take the applied steps out of the store and put ``steps`` (an earlier return value; None: none) in their
        place: one store serves several model states in turn (the RL trainer's side-by-side episodes). The
        tensors move, nothing is copied; step ids keep counting up across all of them."""
        self._check_attached()
        taken = StoredSteps(self._steps, self._accumulated)
        self._steps, self._accumulated = (steps.steps, steps.accumulated) if steps is not None else ({}, {})
        return taken

    def detach(self) -> None:
        """Remove the forward hooks; the store can no longer change the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        attached = _ATTACHED.get(self.model, [])
        if self in attached:
            attached.remove(self)

    def _check_attached(self) -> None:
        if not self._handles:
            raise DeltaError("this delta store was detached from its model; create a new DeltaStore")

    # ------------------------------------------------------------------------------------------ reading
    @property
    def steps(self) -> list[int]:
        """Ids of the applied steps, in application order."""
        return list(self._steps)

    def __len__(self) -> int:
        """The number of applied steps."""
        return len(self._steps)

    def _step(self, step_id: int) -> dict[str, ModuleUpdate]:
        if step_id not in self._steps:
            raise DeltaError(f"no step {step_id!r} in the store; steps: {self.steps}")
        return self._steps[step_id]

    def factors(self, step_id: int) -> dict[str, Update]:
        """Copies of one step's updates: ``(U, V)`` or a dense tensor per module (fp32, (d_in, d_out))."""
        return {
            name: u.dense.clone() if u.kind == "dense" else (u.u.clone(), u.v.clone())
            for name, u in self._step(step_id).items()
        }

    def rank(self, step_id: int) -> dict[str, int]:
        """Rank of one step's update per module: r of the factors (for factors kept as their dense product,
        min(r, d_in, d_out), which is the rank of generic factors); the numerical rank of a delta given dense."""
        return {
            name: u.rank if u.rank is not None else
            int(torch.linalg.matrix_rank(u.dense)) if u.kind == "dense" else u.u.shape[1]
            for name, u in self._step(step_id).items()
        }

    def delta(self, name: str) -> torch.Tensor:
        """A copy of the accumulated fp32 (d_in, d_out) delta of one module (zeros when it has none)."""
        if name not in self.targets:
            raise DeltaError(f"unknown module {name!r}; this store edits {list(self.targets)}")
        total = self._accumulated.get(name)
        if total is None:
            target = self.targets[name]
            return torch.zeros(target.shape, dtype=torch.float32, device=target.weight.device)
        return total.clone()

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model of this store: class, config sizes (if any), target names and shapes."""
        config = getattr(self.model, "config", None)
        sizes = {}
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, int):
                sizes[key] = value
        return {
            "model_class": type(self.model).__name__,
            "model_type": getattr(config, "model_type", None),
            "sizes": sizes,
            "targets": [[t.name, t.d_in, t.d_out] for t in self.targets.values()],
        }

    def state_hash(self, include_model: bool = True) -> str:
        """sha256 of the store's steps, accumulated deltas and next id (and of the model's weights)."""
        digest = hashlib.sha256(model_hash(self.model).encode() if include_model else b"")
        digest.update(f"next={self._next_id};hooks={len(self._handles)}".encode())
        for step_id, updates in self._steps.items():
            for name, update in updates.items():
                for label, tensor in update.tensors().items():
                    digest.update(f"{step_id}/{name}/{label}".encode())
                    digest.update(tensor_bytes(tensor))
        for name in sorted(self._accumulated):
            digest.update(f"acc/{name}".encode())
            digest.update(tensor_bytes(self._accumulated[name]))
        return digest.hexdigest()

    # ------------------------------------------------------------------------------------ save and load
    def save(self, path: str | os.PathLike) -> None:
        """Write every step's factors (safetensors) and a JSON description to folder ``path``, atomically."""
        tensors, steps = {}, []
        for step_id, updates in self._steps.items():
            entry = {}
            for name, update in updates.items():
                entry[name] = {"kind": update.kind}
                if update.u is not None:
                    entry[name]["rank"] = update.u.shape[1]
                for label, tensor in update.tensors().items():
                    tensors[f"{step_id}/{name}/{label}"] = tensor.detach().cpu().contiguous()
            steps.append({"id": step_id, "updates": entry})
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": self.fingerprint(),
                "base_weights_sha256": weight_digests(self.targets), "next_step_id": self._next_id, "steps": steps}
        with atomic_directory(Path(path), "delta-store") as folder:
            save_file(tensors, str(folder / TENSOR_FILE), metadata={"format": "pt"})
            meta["tensors_sha256"] = file_sha256(folder / TENSOR_FILE)
            (folder / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, targets: Sequence[EditTarget],
             check_weights: bool = True) -> DeltaStore:
        """A new store on ``model`` holding the steps saved in ``path`` (see :meth:`load_into`); on failure the
        model is left without it."""
        store = cls(model, targets)
        try:
            store.load_into(path, check_weights=check_weights)
        except BaseException:
            store.detach()
            raise
        return store

    def load_into(self, path: str | os.PathLike, check_weights: bool = True) -> None:
        """Replace this store's steps by those saved in ``path``.

        The folder is fully checked first (files present and intact, same model fingerprint, with
        ``check_weights`` the same base weights of the edited modules as when it was saved, every tensor with
        the right name, dtype, shape and finite values); any problem raises :class:`DeltaError` naming it, and
        the store is left unchanged.
        """
        self._check_attached()
        folder = Path(path)
        meta = _read_meta(folder)
        saved, current = meta["fingerprint"], self.fingerprint()
        if saved != current:
            diffs = [f"{k}: saved {saved.get(k)!r}, this model {current.get(k)!r}"
                     for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
            raise DeltaError(f"{folder} was saved from another model or target set: " + "; ".join(diffs))
        saved_weights = meta.get("base_weights_sha256")
        if check_weights and saved_weights is not None:
            changed = sorted(n for n, d in weight_digests(self.targets).items() if saved_weights.get(n) != d)
            if changed:
                raise DeltaError(
                    f"{folder} was saved on other base weights of {changed[:4]} (another fine-tune or checkpoint "
                    "of this architecture, another dtype, or weights merged since): its edits were made for "
                    "those weights. Load it into the model it was made on, or pass check_weights=False"
                )
        try:
            tensors = read_safetensors(folder / TENSOR_FILE, meta.get("tensors_sha256"))
        except FileFormatError as exc:
            raise DeltaError(str(exc)) from exc
        steps = self._parse_steps(meta, tensors, folder)
        totals = {name: _sum_steps(steps, name) for name in self.targets}
        self._steps = steps
        self._accumulated = {name: total for name, total in totals.items() if total is not None}
        self._next_id = max([meta["next_step_id"], *[sid + 1 for sid in steps]])

    def _parse_steps(self, meta: dict, tensors: dict[str, torch.Tensor], folder: Path) -> dict[int, dict]:
        steps: dict[int, dict[str, ModuleUpdate]] = {}
        used = set()
        try:
            if not isinstance(meta["next_step_id"], int):
                raise TypeError("next_step_id is not an int")
            for entry in meta["steps"]:
                step_id = entry["id"]
                if not isinstance(step_id, int) or step_id in steps:
                    raise ValueError(f"step id {step_id!r} is not a unique int")
                raw = {}
                for name, info in entry["updates"].items():
                    labels = ("dense",) if info["kind"] == "dense" else ("U", "V")
                    keys = [f"{step_id}/{name}/{label}" for label in labels]
                    missing = [k for k in keys if k not in tensors]
                    if info["kind"] not in ("dense", "factors") or missing:
                        raise ValueError(f"step {step_id}, {name}: kind {info['kind']!r}, missing {missing}")
                    for key in keys:
                        if tensors[key].dtype != torch.float32 or not torch.isfinite(tensors[key]).all():
                            raise ValueError(f"tensor {key} is not finite fp32")
                    used.update(keys)
                    raw[name] = tensors[keys[0]] if len(keys) == 1 else (tensors[keys[0]], tensors[keys[1]])
                steps[step_id] = self._prepare(raw, detach=True)
        except DeltaError as exc:
            raise DeltaError(f"{folder} does not fit this model: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DeltaError(f"{folder / META_FILE} is malformed: {exc}") from exc
        extra = sorted(set(tensors) - used)
        if extra:
            raise DeltaError(f"{folder / TENSOR_FILE} holds tensors {extra[:5]} not listed in {META_FILE}")
        return steps

    # ------------------------------------------------------------------------------------- peft export
    def export_peft(self, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
        """Write the accumulated deltas as a peft LoRA adapter that ``PeftModel.from_pretrained`` loads.

        Per module the LoRA factors are the concatenated step factors when their total rank fits in
        min(d_in, d_out); otherwise (or with dense steps) the SVD of the accumulated delta, keeping the
        singular values above fp32 round-off. Ranks may differ per module (``rank_pattern`` and
        ``alpha_pattern``, with alpha = r so the LoRA scaling is 1).
        """
        import peft

        if not self._accumulated:
            raise DeltaError("nothing to export: the store holds no step")
        module_paths = {id(m): n for n, m in self.model.named_modules()}
        edited = [self.targets[name] for name in self._accumulated]
        orientations = {t.transposed for t in edited}
        if len(orientations) > 1:
            raise DeltaError("peft cannot export a mix of Conv1D and nn.Linear modules in one adapter")
        tensors, ranks = {}, {}
        for target in edited:
            module_path = module_paths[id(target.module)]
            u, v = self._lora_factors(target)
            tensors[f"base_model.model.{module_path}.lora_A.weight"] = u.t().contiguous().cpu()
            tensors[f"base_model.model.{module_path}.lora_B.weight"] = v.t().contiguous().cpu()
            ranks[module_path] = u.shape[1]
        patterns = {re.escape(module_path): rank for module_path, rank in ranks.items()}
        is_causal_lm = hasattr(self.model, "config") and hasattr(self.model, "generate")
        config = peft.LoraConfig(
            r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=sorted(ranks),
            rank_pattern=patterns, alpha_pattern=dict(patterns), lora_dropout=0.0, bias="none",
            fan_in_fan_out=orientations.pop(), task_type="CAUSAL_LM" if is_causal_lm else None,
            base_model_name_or_path=base_model_name_or_path or getattr(self.model, "name_or_path", None),
        )
        with atomic_directory(Path(path), "peft-adapter") as folder:
            config.save_pretrained(str(folder))
            save_file(tensors, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})

    def _lora_factors(self, target: EditTarget) -> tuple[torch.Tensor, torch.Tensor]:
        updates = [u[target.name] for u in self._steps.values() if target.name in u]
        total_rank = sum(u.u.shape[1] for u in updates if u.kind == "factors")
        if all(u.kind == "factors" for u in updates) and total_rank <= min(target.shape):
            return torch.cat([u.u for u in updates], dim=1), torch.cat([u.v for u in updates], dim=0)
        left, singular, right = torch.linalg.svd(self._accumulated[target.name], full_matrices=False)
        tolerance = singular[0] * max(target.shape) * torch.finfo(torch.float32).eps
        keep = max(1, int((singular > tolerance).sum()))
        return left[:, :keep] * singular[:keep], right[:keep]


def _as_fp32(
    name: str, label: str, tensor: Any, shape: tuple[int, int], device: torch.device, detach: bool
) -> torch.Tensor:
    """``tensor`` checked for dtype and shape, as fp32 on ``device`` (a detached copy when ``detach``)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise DeltaError(f"{name}: {label} must be a floating-point tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise DeltaError(f"{name}: {label} has shape {tuple(tensor.shape)}, expected {shape}")
    if detach:
        return tensor.detach().to(device=device, dtype=torch.float32, copy=True)
    return tensor.to(device=device, dtype=torch.float32)


def _accumulate(total: torch.Tensor | None, product: torch.Tensor) -> torch.Tensor:
    """The one summation rule (used by add, revert and load alike, so results are bit-identical)."""
    return product.clone() if total is None else total + product


def _sum_steps(steps: Mapping[int, Mapping[str, ModuleUpdate]], name: str) -> torch.Tensor | None:
    total = None
    for updates in steps.values():
        if name in updates:
            total = _accumulate(total, updates[name].product())
    return total


def _read_meta(folder: Path) -> dict:
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise DeltaError(f"{meta_file} is missing; {folder} is not a saved delta store")
    try:
        meta = read_json(meta_file)
    except FileFormatError as exc:
        raise DeltaError(str(exc)) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DeltaError(f"{meta_file} is not an rledit delta store description")
    if meta.get("version") != FORMAT_VERSION:
        raise DeltaError(
            f"{meta_file} has format version {meta.get('version')!r}; this rledit reads {FORMAT_VERSION}"
        )
    if not isinstance(meta.get("fingerprint"), dict):
        raise DeltaError(f"{meta_file} has no model fingerprint")
    if not isinstance(meta.get("tensors_sha256"), str):
        raise DeltaError(f"{meta_file} has no tensors_sha256")
    weights = meta.get("base_weights_sha256")
    if weights is not None and not (isinstance(weights, dict) and all(isinstance(v, str) for v in weights.values())):
        raise DeltaError(f"{meta_file} has a malformed base_weights_sha256")
    return meta
