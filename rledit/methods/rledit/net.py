"""The RLEdit/MALMEN hypernetwork (ALGORITHM.md §3): feature normaliser, residual low-rank blocks, and the
container that holds one network per (d_in, d_out) shape plus per-module step sizes and ridge strengths.

For a module m and its step features (keys k_i ∈ R^{d_in}, value-gradients g_i ∈ R^{d_out}):

    h0 = ([k_i ; g_i] - mean_m) / std_m                       # the module's running normaliser
    h_l = scale_l[m] * relu(h_{l-1} A_l B_l + b_l) + shift_l[m] + h_{l-1}
    [k~_i ; g~_i] = h_L * std_m + mean_m                       # back to the features' own scale

The output is de-normalised so that an untrained network (B = 0: every block is the identity) returns the
features themselves, whatever the normaliser has seen: the untrained editor is then exactly the gradient-like
editor d_i = -lr·||k_i||²·g_i. Without de-normalisation, <k_i, k~_i> would be <k_i, (k_i - mean)/std>, which
can be negative for keys dominated by their mean (it would push the output *up* the gradient), and g~ would
be a mean-shifted, per-coordinate rescaled gradient. The blocks still work on normalised (order-one) features.

All state is plain tensors (``state_dict`` saves as safetensors); the normaliser statistics are buffers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rledit.distributed import gather

# The learned per-module scalars, by their name in natural units: (the tensor of their logs, the hparam that sets
# their initial value). Training logs, retune_scalars.py, the validation sweeps and Editor.from_pretrained read them.
LEARNED_SCALARS = {"lr": ("log_lr", "lr_init"), "ridge": ("ridge_log", "lambda_init"),
                   "beta": ("memory_log", "memory_init"), "alpha": ("corpus_log", "corpus_init")}

_shared_statistics = False  # see shared_statistics()


@contextmanager
def shared_statistics() -> Iterator[None]:
    """Inside the block, every normaliser update folds in the rows of every process (data-parallel training:
    each process runs its own episodes, and all keep the same statistics)."""
    global _shared_statistics
    outer, _shared_statistics = _shared_statistics, True
    try:
        yield
    finally:
        _shared_statistics = outer


class RunningNormalizer(nn.Module):
    """Exact running mean and variance of feature vectors (Chan et al.'s parallel update), in fp64.

    State: ``count`` (number of rows seen), ``mean`` and ``m2`` (sum of squared deviations from the mean).
    With no rows seen it is the identity (mean 0, std 1). Standard deviations are floored at ``eps``.
    """

    def __init__(self, size: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` (N, size) into the statistics, exactly as if all rows were seen at once.
        Inside :func:`shared_statistics` every process folds in the rows of all of them (in rank order)."""
        x = x.detach().to(torch.float64)
        if _shared_statistics:
            x = torch.cat([rows.to(x.device) for rows in gather(x.cpu())])
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.m2 += batch_m2 + delta**2 * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count.fill_(total)

    def std(self) -> torch.Tensor:
        """Population standard deviation of the rows seen (ones when none), floored at ``eps``, fp64."""
        if self.count == 0:
            return torch.ones_like(self.mean)
        return (self.m2 / self.count).sqrt().clamp_min(self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std with the current statistics (constants for autograd), in ``x``'s dtype."""
        return (x - self.mean.to(x.dtype)) / self.std().to(x.dtype)

    def denormalize(self, h: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: h * std + mean."""
        return h * self.std().to(h.dtype) + self.mean.to(h.dtype)


class HyperBlock(nn.Module):
    """One residual block h ↦ scale[m]·relu(h A B + b) + shift[m] + h, the identity at initialisation.

    A (s×r) is random normal, B (r×s) is zero, so the block starts as the identity. The relu is
    ``clamp_min(0)``, whose derivative at exactly 0 is 1 (``torch.relu``'s is 0): at initialisation every
    pre-activation is 0, and with a zero derivative B and b would never receive a gradient.
    """

    def __init__(self, size: int, rank: int, n_modules: int, generator: torch.Generator | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank, generator=generator))
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modules, size))  # per-module embeddings, row m for module m
        self.shift = nn.Parameter(torch.zeros(n_modules, size))

    def forward(self, h: torch.Tensor, module_index: int) -> torch.Tensor:
        """Apply the block to rows ``h`` (N, s) with module ``module_index``'s scale and shift."""
        z = (h @ self.A @ self.B + self.bias).clamp_min(0)
        return self.scale[module_index] * z + self.shift[module_index] + h


class EditorNet(nn.Module):
    """The network shared by all edited modules of one (d_in, d_out) shape; a module index picks the
    per-module embeddings. Maps normalised features (N, d_in + d_out) to edited features of the same size."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modules: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.d_in, self.d_out, self.n_modules = d_in, d_out, n_modules
        self.blocks = nn.ModuleList(
            HyperBlock(d_in + d_out, rank, n_modules, generator) for _ in range(n_blocks)
        )

    def forward(self, h: torch.Tensor, module_index: int) -> torch.Tensor:
        """Run ``h`` (N, d_in + d_out) through the blocks for module ``module_index``."""
        if not 0 <= module_index < self.n_modules:
            raise IndexError(f"module index {module_index} out of range for {self.n_modules} modules")
        for block in self.blocks:
            h = block(h, module_index)
        return h


class HyperNetwork(nn.Module):
    """All of an editor's learned state: one :class:`EditorNet` per shape, and per edited module a normaliser,
    a learned log step size ``log_lr`` (init log lr_init), a ridge log-strength ``ridge_log`` (λ, init
    lambda_init) and the log-weights of the memory-aware solve (ALGORITHM.md §4b): ``memory_log`` (log β, the
    weight of earlier steps' keys, init log memory_init) and ``corpus_log`` (log α, the weight of the corpus
    key second moment, init log corpus_init); an init of 0 turns that term off, and its log-weight is then
    stored as 0 and never used. ``module_shapes`` (name → (d_in, d_out)) fixes the layout; :meth:`layout` is its
    JSON form.
    """

    def __init__(self, module_shapes: Mapping[str, tuple[int, int]], rank: int, n_blocks: int,
                 lr_init: float, lambda_init: float = 0.0, seed: int = 0, memory_init: float = 0.0,
                 corpus_init: float = 0.0):
        super().__init__()
        if not module_shapes:
            raise ValueError("a hypernetwork needs at least one edited module")
        self.module_shapes = {name: (int(s[0]), int(s[1])) for name, s in module_shapes.items()}
        self.rank, self.n_blocks = rank, n_blocks
        generator = torch.Generator().manual_seed(seed)
        self.slots: dict[str, tuple[str, int, int]] = {}  # name -> (shape key, index in shape net, global index)
        per_shape: dict[str, int] = {}
        for index, (name, (d_in, d_out)) in enumerate(self.module_shapes.items()):
            key = f"{d_in}x{d_out}"
            self.slots[name] = (key, per_shape.get(key, 0), index)
            per_shape[key] = per_shape.get(key, 0) + 1
        self.nets = nn.ModuleDict({
            key: EditorNet(*map(int, key.split("x")), rank, n_blocks, count, generator)
            for key, count in per_shape.items()
        })
        self.normalizers = nn.ModuleList(RunningNormalizer(sum(s)) for s in self.module_shapes.values())
        n = len(self.module_shapes)
        self.log_lr = nn.Parameter(torch.full((n,), math.log(lr_init)))
        self.ridge_log = nn.Parameter(torch.full((n,), float(lambda_init)))
        self.memory_log = nn.Parameter(torch.full((n,), math.log(memory_init) if memory_init > 0 else 0.0))
        self.corpus_log = nn.Parameter(torch.full((n,), math.log(corpus_init) if corpus_init > 0 else 0.0))

    def layout(self) -> dict[str, Any]:
        """JSON-ready description of the layout: what a checkpoint must match to be loaded."""
        return {"modules": {n: list(s) for n, s in self.module_shapes.items()},
                "rank": self.rank, "n_blocks": self.n_blocks}

    def _slot(self, name: str) -> tuple[str, int, int]:
        if name not in self.slots:
            raise KeyError(f"{name!r} is not a module of this hypernetwork; its modules: {list(self.slots)}")
        return self.slots[name]

    def lr(self, name: str) -> torch.Tensor:
        """Module ``name``'s step size lr[m] (a differentiable scalar)."""
        return self.log_lr[self._slot(name)[2]].exp()

    def ridge(self, name: str) -> torch.Tensor:
        """Module ``name``'s ridge log-strength λ[m]; the solve adds e^λ·I (a differentiable scalar)."""
        return self.ridge_log[self._slot(name)[2]]

    def memory_weight(self, name: str) -> torch.Tensor:
        """Module ``name``'s β, the weight of earlier steps' key second moment in the solve (differentiable)."""
        return self.memory_log[self._slot(name)[2]].exp()

    def corpus_weight(self, name: str) -> torch.Tensor:
        """Module ``name``'s α, the weight of the corpus key second moment in the solve (differentiable)."""
        return self.corpus_log[self._slot(name)[2]].exp()

    def normalizer(self, name: str) -> RunningNormalizer:
        """Module ``name``'s feature normaliser."""
        return self.normalizers[self._slot(name)[2]]

    def forward(self, name: str, keys: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Edited features (k~, g~), shapes (N, d_in) and (N, d_out), for module ``name``.

        The features are normalised with the normaliser's current statistics; the editor folds a step's own
        rows in first (``RLEditMethod.fold_statistics``: update-then-normalise, so the first step ever is
        normalised by its own statistics).
        """
        key, index, _ = self._slot(name)
        features = torch.cat([keys, grads], dim=-1)
        normalizer = self.normalizer(name)
        edited = normalizer.denormalize(self.nets[key](normalizer.normalize(features), index))
        return edited.split([keys.shape[-1], grads.shape[-1]], dim=-1)

    def parameter_groups(self, meta_lr: float, scalar_meta_lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups: the network weights at ``meta_lr``, the per-module log-scale scalars
        (step sizes, ridge strengths, memory and corpus weights) at ``scalar_meta_lr``."""
        return [
            {"params": list(self.nets.parameters()), "lr": meta_lr},
            {"params": [self.log_lr, self.ridge_log, self.memory_log, self.corpus_log], "lr": scalar_meta_lr},
        ]

    def scalars(self) -> dict[str, list[float]]:
        """The learned per-module scalars in natural units (lr, e^λ, β, α), for training logs."""
        with torch.no_grad():
            return {key: getattr(self, attr).exp().tolist() for key, (attr, _) in LEARNED_SCALARS.items()
                    if hasattr(self, attr)}
