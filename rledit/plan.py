"""Memory on paper: what editing a model with rledit needs, worked out from its architecture alone.

:func:`plan_memory` builds the model of a preset (``hparams/models/*.yaml``) on the meta device (no weights are
read or allocated) and counts, in bytes:

* ``model``: the weights in the preset's dtype;
* ``hypernetwork``: the RLEdit editor's fp32 parameters, and ``training``: those plus their gradients and Adam's
  two moments (what the trainer keeps besides the model);
* ``one step``: the estimate :meth:`rledit.editor.Editor.step_bytes` refuses steps by, feature capture plus the
  method's solve, for ``batch`` edits of ``prompt_tokens`` + ``answer_tokens`` tokens;
* ``delta store after T steps``: per edited module one accumulated fp32 ΔW plus each step's factors (rank: the
  step's answer tokens times the edit passes; a step whose factors would be larger is kept dense, as
  :class:`rledit.deltas.DeltaStore` does);
* ``key memory after T steps``: the memory-aware solve's fp64 Gram matrix per module plus each step's fp32 keys
  (:class:`rledit.methods.memory.KeyMemory`; zero without the solve).

``rledit plan --model PRESET`` prints the table. The figures are checked against a tiny model's real
allocations in the test suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rledit.hooks import capture_bytes_for
from rledit.hparams import HPARAMS_DIR, ModelHparams, load_section
from rledit.methods.memory import KeyMemory
from rledit.models import find_alias, resolve_dtype
from rledit.targets import EditTarget, resolve_targets


@dataclass(frozen=True)
class MemoryPlan:
    """The memory figures of one preset and edit schedule (bytes; see the module docstring)."""

    preset: str
    dtype: str
    targets: list[tuple[str, int, int]]  # (module, d_in, d_out)
    steps: int
    batch: int
    prompt_tokens: int
    answer_tokens: int
    passes: int
    model: int
    hypernetwork: int
    training: int
    one_step: int
    delta_store: int
    key_memory: int

    def rows(self) -> list[tuple[str, int]]:
        """(what, bytes) in table order."""
        return [("model weights", self.model), ("hypernetwork (fp32)", self.hypernetwork),
                ("hypernetwork training state (weights, gradients, Adam)", self.training),
                (f"one step of {self.batch} edits (features and solve)", self.one_step),
                (f"delta store after {self.steps} steps", self.delta_store),
                (f"key memory after {self.steps} steps", self.key_memory)]

    def table(self) -> str:
        """A markdown table of :meth:`rows` in GiB."""
        title = (f"{self.preset} ({self.dtype}, {len(self.targets)} edited modules), steps of {self.batch} edits "
                 f"({self.prompt_tokens} prompt + {self.answer_tokens} answer tokens each), {self.passes} pass(es)")
        lines = [title, "", "| what | GiB |", "|---|---:|"]
        lines += [f"| {what} | {value / 2**30:.2f} |" for what, value in self.rows()]
        return "\n".join(lines)


def load_preset(preset: str) -> ModelHparams:
    """The ``model`` section of ``hparams/models/<preset>.yaml`` (or of a YAML file given by path)."""
    path = HPARAMS_DIR / "models" / f"{preset}.yaml"
    return load_section(path if path.is_file() else preset, "model")


def meta_model(model_hparams: ModelHparams) -> nn.Module:
    """The preset's model on the meta device, from its ``architecture`` (offline) or, without one, from the
    config of its alias, folder or hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_hparams.architecture:
        fields = dict(model_hparams.architecture)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        alias = find_alias(model_hparams.name)
        if alias is not None:
            from rledit.models import _cached_alias

            config = AutoConfig.from_pretrained(_cached_alias(alias))
        else:
            config = AutoConfig.from_pretrained(model_hparams.name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(model_hparams.dtype))


def plan_memory(model_hparams: ModelHparams, method_hparams: Any = None, steps: int = 50, batch: int = 20,
                prompt_tokens: int = 16, answer_tokens: int = 4, name: str | None = None) -> MemoryPlan:
    """The memory figures for editing ``model_hparams``'s model with RLEdit (``method_hparams``: an RLEdit
    hparams dataclass or dict; None: ``hparams/methods/rledit.yaml``) in ``steps`` steps of ``batch`` edits."""
    from rledit.editor import build_method

    if method_hparams is None:
        method_hparams = load_section(HPARAMS_DIR / "methods" / "rledit.yaml", "method")
    model = meta_model(model_hparams)
    targets = resolve_targets(model, model_hparams.layers, model_hparams.modules)
    method = build_method("rledit", method_hparams)
    hp = method.hparams
    with torch.device("meta"):
        net = method.build({t.name: t.shape for t in targets})
        if getattr(hp, "memory_init", 0) > 0:
            method.memory = KeyMemory(net.module_shapes, "meta")
    if getattr(hp, "corpus_init", 0) > 0:
        method.corpus_moments = {t.name: torch.empty(t.d_in, t.d_in, dtype=torch.float64, device="meta")
                                 for t in targets}
    n = batch * answer_tokens
    passes = getattr(hp, "passes", 1)
    hypernet = sum(p.numel() * p.element_size() for p in net.parameters())
    capture = capture_bytes_for(model, targets, batch * (prompt_tokens + answer_tokens), n)
    return MemoryPlan(
        preset=name or model_hparams.name, dtype=model_hparams.dtype,
        targets=[(t.name, t.d_in, t.d_out) for t in targets], steps=steps, batch=batch, prompt_tokens=prompt_tokens,
        answer_tokens=answer_tokens, passes=passes,
        model=sum(p.numel() * p.element_size() for p in model.parameters()),
        hypernetwork=hypernet, training=4 * hypernet,
        one_step=capture + method.step_bytes(n, targets),
        delta_store=store_bytes(targets, steps, n * passes),
        key_memory=key_memory_bytes(targets, steps, n) if method.memory is not None else 0)


def store_bytes(targets: list[EditTarget], steps: int, rank: int) -> int:
    """A delta store holding ``steps`` steps of rank-``rank`` factors for every module: per module the
    accumulated fp32 ΔW and each step's fp32 factors, or its dense product where that is smaller."""
    total = 0
    for t in targets:
        per_step = min(rank * (t.d_in + t.d_out), t.d_in * t.d_out)
        total += 4 * (t.d_in * t.d_out + steps * per_step) if steps else 0
    return total


def key_memory_bytes(targets: list[EditTarget], steps: int, n_keys: int) -> int:
    """A key memory holding ``steps`` steps of ``n_keys`` keys: per module an fp64 d_in × d_in Gram matrix and
    each step's fp32 keys."""
    return sum(8 * t.d_in * t.d_in + 4 * steps * n_keys * t.d_in for t in targets)


def plan_presets() -> list[str]:
    """The model presets under ``hparams/models`` (file stems)."""
    return sorted(p.stem for p in (HPARAMS_DIR / "models").glob("*.yaml"))

