"""Which modules of a model get edited, seen through one uniform (d_in, d_out) view.

Every method in rledit thinks of an edited module as a matrix W of shape (d_in, d_out) with
``output = input @ W`` (+ bias). ``nn.Linear`` stores the transpose (d_out, d_in); GPT-2's ``Conv1D``
stores (d_in, d_out) directly. This file is the ONLY place that knows the difference: callers use
:meth:`EditTarget.weight_in_out` and :meth:`EditTarget.to_native` and never look at ``module.weight``'s
orientation themselves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

_log = logging.getLogger("rledit")


class TargetError(ValueError):
    """A model type, layer or module name that rledit cannot resolve."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where a model family keeps its MLP linear layers, and what rledit edits by default."""

    layer_pattern: str  # regex with one group for the layer index; matched against module-name prefixes
    mlp_modules: tuple[str, ...]  # names of the linear layers inside one block's MLP
    mlp_path: str  # attribute path from a block to its MLP ("mlp")
    default_modules: tuple[str, ...]
    transposed: bool = False  # True when weights are stored (d_in, d_out) (GPT-2 Conv1D)


_LLAMA_LIKE = ArchitectureSpec(
    layer_pattern=r"(?:^|\.)layers\.(\d+)$",
    mlp_modules=("gate_proj", "up_proj", "down_proj"),
    mlp_path="mlp",
    default_modules=("gate_proj", "up_proj"),
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": ArchitectureSpec(
        layer_pattern=r"(?:^|\.)h\.(\d+)$",
        mlp_modules=("c_fc", "c_proj"),
        mlp_path="mlp",
        default_modules=("c_fc",),
        transposed=True,
    ),
    "gpt_neox": ArchitectureSpec(
        layer_pattern=r"(?:^|\.)layers\.(\d+)$",
        mlp_modules=("dense_h_to_4h", "dense_4h_to_h"),
        mlp_path="mlp",
        default_modules=("dense_h_to_4h",),
    ),
    "gptj": ArchitectureSpec(
        layer_pattern=r"(?:^|\.)h\.(\d+)$",
        mlp_modules=("fc_in", "fc_out"),
        mlp_path="mlp",
        default_modules=("fc_in",),
    ),
}


@dataclass(frozen=True, eq=False)
class EditTarget:
    """One edited module: its full name, the module, and its (d_in, d_out) shape.

    ``transposed`` is True when the module stores its weight as (d_in, d_out) (GPT-2 Conv1D).
    """

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    transposed: bool
    layer: int = -1

    @property
    def shape(self) -> tuple[int, int]:
        """(d_in, d_out): the key for sharing one hypernetwork across modules of the same shape."""
        return (self.d_in, self.d_out)

    @property
    def weight(self) -> torch.Tensor:
        """The module's weight parameter, in its native storage orientation."""
        return self.module.weight

    def weight_in_out(self) -> torch.Tensor:
        """The weight as a (d_in, d_out) view (no copy), so that ``output = input @ W``."""
        w = self.module.weight
        return w if self.transposed else w.t()

    def to_native(self, delta_in_out: torch.Tensor) -> torch.Tensor:
        """Turn a (d_in, d_out) delta into the module's native weight orientation (a view)."""
        if tuple(delta_in_out.shape) != self.shape:
            raise TargetError(
                f"{self.name}: delta has shape {tuple(delta_in_out.shape)}, expected (d_in, d_out) = {self.shape}"
            )
        return delta_in_out if self.transposed else delta_in_out.t()

    def from_native(self, native: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_native`: a native-orientation tensor as a (d_in, d_out) view."""
        return native if self.transposed else native.t()


def model_type_of(model: nn.Module) -> str:
    """The ``config.model_type`` of a Hugging Face model (text config for multimodal wrappers)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TargetError(f"{type(model).__name__} has no .config; rledit edits Hugging Face causal LMs")
    return getattr(config, "model_type", "")


def register_architecture(model_type: str, spec: ArchitectureSpec) -> None:
    """Teach rledit where a model family keeps its MLP linear layers, e.g. for a custom model::

        register_architecture("mymodel", ArchitectureSpec(layer_pattern=r"(?:^|\\.)blocks\\.(\\d+)$",
                                                          mlp_modules=("w_in", "w_out"), mlp_path="ffn",
                                                          default_modules=("w_in",)))

    Registering a model type again replaces its spec."""
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"spec must be an ArchitectureSpec, got {type(spec).__name__}")
    ARCHITECTURES[model_type] = spec


def architecture_of(model: nn.Module) -> ArchitectureSpec:
    """The :class:`ArchitectureSpec` for ``model``: a registered model type, or a Llama-shaped MLP found in the
    model (``layers.N.mlp.{gate,up,down}_proj``, as Qwen3 or OLMo-2 have); otherwise an error that says why."""
    model_type = model_type_of(model)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    names = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()
             if re.search(r"(?:^|\.)layers\.\d+\.mlp\.\w+$", name)}
    if "gate_up_proj" in names:
        raise TargetError(
            f"model_type {model_type!r} fuses its MLP's gate and up projections into one gate_up_proj (Phi-3 "
            "style), which rledit cannot edit as two modules; register_architecture with the modules it has "
            "(e.g. down_proj) to edit those"
        )
    if all(isinstance(names.get(m), nn.Linear) for m in _LLAMA_LIKE.mlp_modules):
        _log.info("model_type %r is not registered; its MLP is Llama-shaped (gate_proj/up_proj/down_proj): "
                  "edited as a Llama", model_type)
        return _LLAMA_LIKE
    raise TargetError(
        f"model_type {model_type!r} is not supported and has no Llama-shaped MLP; supported model types: "
        f"{sorted(ARCHITECTURES)} (or register_architecture)"
    )


def find_blocks(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """Map layer index → (name, block module) for the transformer blocks of ``model``."""
    spec = architecture_of(model)
    pattern = re.compile(spec.layer_pattern)
    blocks: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        match = pattern.search(name)
        if match and hasattr(module, spec.mlp_path):
            index = int(match.group(1))
            if index in blocks:  # e.g. a vision tower with its own layers: keep the language blocks
                raise TargetError(f"two blocks claim layer {index}: {blocks[index][0]!r} and {name!r}")
            blocks[index] = (name, module)
    if not blocks:
        raise TargetError(f"no transformer blocks matching {spec.layer_pattern!r} found in {type(model).__name__}")
    return dict(sorted(blocks.items()))


def default_layers(num_layers: int) -> list[int]:
    """The default edit layers: four consecutive upper-middle blocks (as in MALMEN/RLEdit setups)."""
    start = max(0, min(num_layers - 4, round(num_layers * 0.6)))
    return list(range(start, min(num_layers, start + 4)))


def parse_layers(layers: Iterable[int | str] | str | int, num_layers: int) -> list[int]:
    """Resolve a layer spec: ints (negative counts from the end) and inclusive ranges ``"20-28"``."""
    if isinstance(layers, (int, str)):
        layers = [layers]
    resolved: list[int] = []
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TargetError(f"layer {item!r} must be an int or a range string like '20-28'")
        if isinstance(item, str):
            match = re.fullmatch(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*", item) or re.fullmatch(r"\s*(-?\d+)\s*", item)
            if not match:
                raise TargetError(f"layer {item!r} is neither an int nor a range like '20-28'")
            bounds = [int(g) for g in match.groups()]
            lo, hi = bounds[0], bounds[-1]
            lo, hi = (lo % num_layers if -num_layers <= lo < 0 else lo), (hi % num_layers if -num_layers <= hi < 0 else hi)
            items = list(range(lo, hi + 1))
        else:
            items = [item + num_layers if item < 0 else item]
        for index in items:
            if not 0 <= index < num_layers:
                raise TargetError(f"layer {index} is out of range: the model has layers 0..{num_layers - 1}")
            if index not in resolved:
                resolved.append(index)
    if not resolved:
        raise TargetError("the layer spec selects no layers")
    return resolved


def resolve_targets(
    model: nn.Module,
    layers: Sequence[int | str] | str | int | None = None,
    modules: Sequence[str] | None = None,
) -> list[EditTarget]:
    """Resolve a spec such as ``layers=[20, 28], modules=["gate_proj", "up_proj"]`` to edit targets.

    ``None`` picks the architecture's defaults. The result is ordered by layer, then by module name order.
    """
    spec = architecture_of(model)
    blocks = find_blocks(model)
    num_layers = max(blocks) + 1
    layer_ids = default_layers(num_layers) if layers is None else parse_layers(layers, num_layers)
    module_names = list(spec.default_modules if modules is None else modules)
    if isinstance(modules, str):
        module_names = [modules]
    unknown = [m for m in module_names if m not in spec.mlp_modules]
    if unknown or not module_names:
        raise TargetError(
            f"unknown MLP module name(s) {unknown} for model_type {model_type_of(model)!r}; "
            f"modules that exist: {list(spec.mlp_modules)}"
        )
    targets = []
    for index in layer_ids:
        if index not in blocks:
            raise TargetError(f"layer {index} not found; layers found: {sorted(blocks)}")
        block_name, block = blocks[index]
        mlp = block.get_submodule(spec.mlp_path)
        for module_name in module_names:
            module = getattr(mlp, module_name)
            targets.append(make_target(f"{block_name}.{spec.mlp_path}.{module_name}", module, spec.transposed, index))
    return targets


def make_target(name: str, module: nn.Module, transposed: bool | None = None, layer: int = -1) -> EditTarget:
    """Wrap one linear-like module (``nn.Linear`` or GPT-2 ``Conv1D``) as an :class:`EditTarget`.

    ``transposed=None`` infers it: ``nn.Linear`` is (d_out, d_in); a module with ``nf`` (Conv1D) is
    (d_in, d_out). Also used by MaskWorld/ShiftWorld for arbitrary networks' linear layers.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TargetError(f"{name} ({type(module).__name__}) has no 2-D weight; only linear layers can be edited")
    if transposed is None:
        if isinstance(module, nn.Linear):
            transposed = False
        elif hasattr(module, "nf"):
            transposed = True
        else:
            raise TargetError(f"{name}: cannot tell the weight orientation of {type(module).__name__}")
    d_in, d_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    return EditTarget(name=name, module=module, d_in=int(d_in), d_out=int(d_out), transposed=transposed, layer=layer)
