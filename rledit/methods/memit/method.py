"""MEMIT (locate-then-edit) and the step machinery it shares with AlphaEdit.

One edit step, for edited MLP output projections at layers l_1 < … < l_L (ALGORITHM.md §7). Each request is
read as its bare prompt and as the prompt after each context prefix, short texts the model wrote
(:mod:`rledit.methods.memit.contexts`, ``context_lengths``):

1. target values: for each request, z = h + δ at the output of block l_L at the subject's last token (h from
   the bare prompt), with one δ, added at that token of every prefixed prompt, optimised so that the target is
   predicted after all of them (:func:`rledit.methods.memit.compute.optimise_target_values`);
2. for each edited layer l_i in ascending order, with the updates of the layers below it applied (pending):
   keys K (B × d_in, the module's inputs at the subject's last token, averaged over the prefixes), the current
   block-l_L outputs H (bare prompt), and the layer's share of what is missing, R = (Z - H) / (L - i + 1);
3. a solve per layer. MEMIT: ΔW = (λ·C + KᵀK)⁻¹ Kᵀ R with C = E[k kᵀ] on the corpus (see
   :mod:`rledit.methods.memit.stats`), returned as factors U = (λ·C + KᵀK)⁻¹ Kᵀ (d_in × B) and V = R.

The preserved-key statistics are computed (or read from the cache) once in :meth:`prepare`, whose duration is
``setup_seconds``; ``statistics`` tells where they came from and how long computing them took.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, ClassVar

import torch
from torch import nn

from rledit.methods.base import EditMethod, Factors, StepFeaturesLike, UpdateError, register_method
from rledit.methods.memit.compute import (
    edit_rows,
    essence_rows,
    first_row_of_each,
    keys_and_outputs,
    mean_per_edit,
    optimise_target_values,
)
from rledit.methods.memit.config import LocateEditHparams, MEMITHparams
from rledit.methods.memit.contexts import context_prefixes
from rledit.methods.memit.stats import KeyStatistics, load_or_compute_statistics
from rledit.methods.runtime import temporary_store
from rledit.targets import EditTarget, TargetError, architecture_of, find_blocks
from rledit.tokens import check_subjects, context_length
from rledit.types import EditRequest


def check_output_projections(model: nn.Module, targets: Sequence[EditTarget], method: str) -> None:
    """Raise :class:`TargetError` unless ``targets`` are MLP output projections, at most one per layer, and
    the model has a layer after the last edited one."""
    output_module = architecture_of(model).mlp_modules[-1]
    wrong = [t.name for t in targets if t.name.rsplit(".", 1)[-1] != output_module]
    if wrong:
        raise TargetError(
            f"{method} edits the MLP output projection of each edited layer ({output_module!r} for this "
            f"model), whose output is added to the residual stream; got {wrong}. Edit modules=['{output_module}'] "
            f"(in YAML: model.modules: [{output_module}])"
        )
    layers = [t.layer for t in targets]
    if min(layers) < 0 or len(set(layers)) != len(layers):
        raise TargetError(f"{method} needs one edited module per transformer layer, got layers {layers}")
    n_layers = max(find_blocks(model)) + 1
    if max(layers) == n_layers - 1:
        raise TargetError(
            f"{method} shifts the residual stream at the subject's last token after the last edited layer; with "
            f"the model's last layer ({n_layers - 1}) edited no later layer can carry the shift to the answer. "
            f"Edit earlier layers (e.g. layers={[n_layers - 3, n_layers - 2] if n_layers > 2 else [0]})"
        )


class LocateThenEditMethod(EditMethod):
    """The step shared by MEMIT and AlphaEdit; subclasses implement :meth:`solve` (and may keep state)."""

    uses_features = False
    requires_subject: ClassVar[bool] = True  # every request must name its subject (checked before any work)
    edits_output_projection: ClassVar[bool] = True  # edits the MLP output projections (down_proj on Llama)

    def __init__(self, hparams: LocateEditHparams):
        self.hparams = hparams
        self.statistics: KeyStatistics | None = None
        self.setup_seconds = 0.0  # duration of the last prepare(): statistics computed or read, plus set-up
        self.last_trace: dict[str, list[float]] = {}  # the target-value optimisation of the last step
        self.prefixes: list[str] = [""]  # context prefixes ("" = the bare prompt), made in prepare()

    def prepare(self, model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget]) -> None:
        """Check the edited modules, then compute or load the corpus key statistics (timed)."""
        start = time.perf_counter()
        check_output_projections(model, targets, self.name)
        hp = self.hparams
        self.statistics = load_or_compute_statistics(
            model, tokenizer, targets, hp.corpus, hp.stats_samples, hp.stats_max_length, hp.stats_batch_size,
            hp.corpus_split, hp.corpus_column, hp.stats_tokens)
        self.after_statistics(targets)
        self.prefixes = context_prefixes(model, tokenizer, hp.context_lengths, hp.context_seed, hp.context_top_k)
        self.setup_seconds = time.perf_counter() - start

    def setup_report(self) -> dict[str, Any]:
        """The corpus key statistics: cache file, whether this run read it from the cache, their size and the
        seconds computing them took (when they were computed, also for a cache hit)."""
        if self.statistics is None:
            return {}
        stats = self.statistics
        return {"statistics": {"file": str(stats.path), "cached": stats.cached, "n_texts": stats.n_texts,
                               "n_tokens": stats.n_tokens, "compute_seconds": round(stats.compute_seconds, 3)},
                "context_prefixes": list(self.prefixes)}

    def after_statistics(self, targets: Sequence[EditTarget]) -> None:
        """Set-up that needs the statistics (AlphaEdit's projections). Default: nothing."""

    @classmethod
    def check_requests(cls, requests: Sequence[EditRequest]) -> None:
        """Raise :class:`rledit.types.EditRequestError` unless every request names a subject found in its
        prompt. A class method, so that a run can check all its requests before any set-up:
        ``get_method("memit").check_requests(requests)``."""
        check_subjects(requests, cls.name)

    def compute_step(
        self,
        model: nn.Module,
        tokenizer: Any,
        targets: Sequence[EditTarget],
        requests: Sequence[EditRequest],
        features: StepFeaturesLike | None = None,
    ) -> dict[str, Factors]:
        """Factors (U, V) per edited module for one step (see the module docstring)."""
        self.check_requests(requests)
        if self.statistics is None:
            raise UpdateError(f"{self.name}: call prepare(model, tokenizer, targets) first")
        hp = self.hparams
        ordered = sorted(targets, key=lambda t: t.layer)
        below = [module for layer, (_, module) in find_blocks(model).items() if layer <= ordered[-1].layer]
        block = below[-1]
        edit_batch, edit_subject, owner = edit_rows(tokenizer, requests, self.prefixes, context_length(model))
        first_rows = first_row_of_each(owner)
        kl_batch, kl_subject = essence_rows(tokenizer, requests, hp.kl_prompt)
        values, self.last_trace = optimise_target_values(model, below, edit_batch, edit_subject, kl_batch,
                                                         kl_subject, hp, owner)
        updates: dict[str, Factors] = {}
        keys: dict[str, torch.Tensor] = {}
        with temporary_store(model, targets) as store:
            for i, target in enumerate(ordered):
                with store.pending(updates) if updates else nullcontext():
                    row_keys, row_outputs = keys_and_outputs(model, edit_batch, edit_subject, target.module, block)
                keys[target.name] = mean_per_edit(row_keys, owner)  # each edit's key: the mean over its prefixes
                residuals = (values - row_outputs[first_rows.to(row_outputs.device)]) / (len(ordered) - i)
                updates[target.name] = self.solve(target.name, keys[target.name], residuals)
        self.after_step(keys)
        return updates

    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> Factors:
        """Factors (U, V) of module ``name``'s update from keys (B, d_in) and residual targets (B, d_out)."""
        raise NotImplementedError

    def after_step(self, keys: dict[str, torch.Tensor]) -> None:
        """Bookkeeping once a step's updates are computed (AlphaEdit's cache of edited keys). Default: nothing."""


@register_method("memit")
class MEMITMethod(LocateThenEditMethod):
    """MEMIT: ΔW = (λ·C + KᵀK)⁻¹ Kᵀ R per edited layer, with R spread over the layers."""

    name = "memit"
    hparams_class = MEMITHparams

    def __init__(self, hparams: MEMITHparams | None = None):
        super().__init__(hparams if hparams is not None else MEMITHparams())

    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> Factors:
        """U = (λ·C + KᵀK)⁻¹ Kᵀ (fp64 solve, d_in × d_in), V = R."""
        covariance = self.statistics.second_moments[name]
        keys64 = keys.to(covariance.device, torch.float64)
        system = self.hparams.cov_weight * covariance + keys64.T @ keys64
        left = torch.linalg.solve(system, keys64.T)
        return left.to(torch.float32), residuals.to(left.device, torch.float32)
