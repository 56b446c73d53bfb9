"""The RLEdit update of one edit step (ALGORITHM.md §3–§4), readable top to bottom:

1. per module, the hypernetwork edits the step's features: (k~_i, g~_i) = net(k_i, g_i);
2. value shifts: d_i = -lr[m] · <k_i, k~_i> · g~_i, stacked as D (N × d_out);
3. the ridge solve in factored form: ΔW = Kᵀ Y with Y = (K Kᵀ + e^λ I_N)⁻¹ D, an N×N system (never
   d_in×d_in), which equals the normal-equation solution (KᵀK + e^λ I)⁻¹ Kᵀ D by the push-through identity;
   with the memory-aware solve (§4b, ``memory_init`` / ``corpus_init`` > 0) the penalty β C_mem + α C_0 joins
   e^λ I: C_mem, the keys of the earlier applied steps (a :class:`rledit.methods.memory.KeyMemory`), keeps
   this step from overwriting what they wrote, and C_0, the corpus key statistics, protects unrelated inputs;
4. the factors U (d_in×N) and V (N×d_out) in fp32;
5. at edit time, optionally more passes (``passes`` > 1): the step's features are captured again with the update
   so far applied, and steps 1–4 add the update of what is still missing (ΔW = Σ_p U_p V_p). With the memory
   solve at β ≈ 1 this is recursive least squares that also converges within the step. ``refine_layers``
   keeps the later passes to the upper edited layers (cheaper: they then run only those layers and up), and
   ``rehearsal`` adds earlier steps' edits to the later passes' rows, so each step also repairs old edits.

Everything is differentiable: with gradients enabled, V carries the graph into D, λ and the network, which is
what the RL trainer backpropagates through. K is the step's (detached) keys. The Gram matrix and the solve
run in fp64 (an N×N system of a few hundred rows costs nothing), because K Kᵀ of hundreds of tokens with
a small e^λ is badly conditioned for fp32.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from rledit.hooks import capture_features, capture_keys
from rledit.methods.base import EditMethod, StepFeaturesLike, UpdateError, check_updates, register_method
from rledit.methods.memory import KeyMemory, split_memory_state
from rledit.methods.rledit.config import MALMENHparams, RLEditHparams
from rledit.methods.rledit.net import HyperNetwork
from rledit.methods.rledit.solve import (
    PenaltyInverses,
    inverse_with_keys,
    leading_part,
    ridge_factors,
    ridge_system,
    value_shifts,
)
from rledit.methods.runtime import temporary_store
from rledit.prefix import Prefix
from rledit.targets import EditTarget
from rledit.tokens import TokenBatch, check_subjects, context_length, encode_after_prefixes, with_subject_keys
from rledit.types import EditRequest

Factors = tuple[torch.Tensor, torch.Tensor]  # (U, V) of one module's update, ΔW = U V
REHEARSAL_KEY = "rehearsal/requests"  # the applied steps' requests in a saved state (``rehearsal`` > 0 only)


@register_method("rledit")
class RLEditMethod(EditMethod):
    """RLEdit: an RL-trained hypernetwork turns each step's features into a factored ridge update.

    Untrained (``hypernet`` fresh), it is the gradient-like editor d_i = -lr·||k_i||²·g_i. The normaliser
    mode (``hparams.normalizer``) decides whether edit steps update the feature statistics; the trainer
    folds them in itself (:meth:`fold_statistics`) and passes ``update_stats=False``.
    """

    name = "rledit"
    hparams_class = RLEditHparams

    def __init__(self, hparams: RLEditHparams | None = None):
        self.hparams = hparams if hparams is not None else self.hparams_class()
        self.hypernet: HyperNetwork | None = None
        self.memory: KeyMemory | None = None  # keys of the applied steps (memory-aware solve only)
        self.corpus_moments: dict[str, torch.Tensor] = {}  # C_0 per module (corpus_init > 0 only)
        self.paraphrase_moments: dict[str, torch.Tensor] = {}  # C_inv per module (memory_paraphrases > 0 only)
        self.statistics_report: dict[str, Any] = {}
        self.inverses = PenaltyInverses()  # A⁻¹ per module at edit time (rledit.methods.rledit.solve)
        self.prefixes: list[str] = [""]  # context prefixes of the edit rows ("" = the bare prompt), see prepare()
        self.lower_hidden: TokenBatch | None = None  # what capture() left for this step's later passes
        self.contrast_keys: dict[str, torch.Tensor] = {}  # this step's contrast rows' keys (contrast_subjects)
        self.contrast_inverses: dict[str, torch.Tensor] = {}  # (A + w K_cᵀK_c)⁻¹ of this step, per module
        self.applied_requests: dict[int, list[EditRequest]] = {}  # step id -> its requests (rehearsal only)
        self.staged_requests: list[EditRequest] | None = None

    def prepare(self, model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget]) -> None:
        """Build the hypernetwork for ``targets`` (or check that the loaded one fits them) on the model's
        device, an empty key memory when the solve uses one, and the corpus statistics C_0 when it uses them."""
        hp = self.hparams
        unedited = sorted(set(getattr(hp, "refine_layers", [])) - {t.layer for t in targets})
        if unedited:
            raise UpdateError(f"refine_layers {unedited} are not edited layers of this editor "
                              f"({sorted({t.layer for t in targets})}); the later passes can only write edited layers")
        net = self.build({t.name: t.shape for t in targets})
        device = torch.device(hp.device) if getattr(hp, "device", None) else next(model.parameters()).device
        net.to(device)
        if getattr(hp, "memory_init", 0) > 0:  # MEND (a subclass) has no solve and no such settings
            self.memory = KeyMemory(net.module_shapes, device)
        if getattr(hp, "context_lengths", []):  # MEND (a subclass) reads the bare prompts only
            from rledit.methods.memit.contexts import context_prefixes

            self.prefixes = context_prefixes(model, tokenizer, hp.context_lengths, hp.context_seed, hp.context_top_k)
            self.statistics_report["context_prefixes"] = list(self.prefixes)
        if getattr(hp, "corpus_init", 0) > 0:
            from rledit.methods.memit.stats import load_or_compute_statistics

            stats = load_or_compute_statistics(model, tokenizer, targets, hp.corpus, hp.stats_samples,
                                               hp.stats_max_length, hp.stats_batch_size, "train", "text",
                                               positions=hp.corpus_positions)
            self.corpus_moments = {name: leading_part(m.to(device, torch.float64), hp.corpus_rank)
                                   for name, m in stats.second_moments.items()}
            self.statistics_report["statistics"] = {
                "file": str(stats.path), "cached": stats.cached, "n_texts": stats.n_texts, "n_tokens": stats.n_tokens,
                "compute_seconds": round(stats.compute_seconds, 3), "positions": hp.corpus_positions,
                "rank": hp.corpus_rank}
        if getattr(hp, "invariance_weight", 0) > 0:  # C_0 ← C_0 + w·(tr C_0 / tr C_inv)·C_inv per module
            for name, c_inv in self._paraphrase_shifts(model, tokenizer, targets, device).items():
                c_0 = self.corpus_moments[name]
                self.corpus_moments[name] = c_0 + hp.invariance_weight * (c_0.trace() / c_inv.trace()) * c_inv
        if getattr(hp, "memory_paraphrases", 0) > 0 and self.memory is not None:
            self.paraphrase_moments = self._paraphrase_shifts(model, tokenizer, targets, device)

    def _paraphrase_shifts(self, model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget],
                           device: torch.device) -> dict[str, torch.Tensor]:
        """C_inv per module (fp64 on ``device``): how training paraphrases move the keys, at the positions the
        edits read (``invariance``, ``invariance_samples``), recorded in the set-up report."""
        from rledit.methods.memit.stats import load_or_compute_invariance

        hp = self.hparams
        positions = "subjects" if hp.key_positions == "subject" else "answers"
        shifts = load_or_compute_invariance(model, tokenizer, targets, hp.invariance, hp.invariance_samples,
                                            hp.stats_batch_size, positions)
        self.statistics_report["invariance"] = {
            "file": str(shifts.path), "cached": shifts.cached, "source": hp.invariance, "n_pairs": shifts.n_texts,
            "positions": positions, "n_positions": shifts.n_tokens, "compute_seconds": round(shifts.compute_seconds, 3),
            "weight": hp.invariance_weight, "memory_paraphrases": hp.memory_paraphrases}
        return {name: c_inv.to(device, torch.float64) for name, c_inv in shifts.second_moments.items()}

    def setup_report(self) -> dict[str, Any]:
        """Where the corpus statistics C_0 came from and the context prefixes (when the editor uses them)."""
        return dict(self.statistics_report)

    def build(self, module_shapes: dict[str, tuple[int, int]]) -> HyperNetwork:
        """Create the hypernetwork for ``module_shapes`` (name → (d_in, d_out)) if there is none; if there is
        one, require that it was built for exactly these modules."""
        shapes = {name: tuple(s) for name, s in module_shapes.items()}
        if self.hypernet is None:
            self.hypernet = self.new_network(shapes)
        elif self.hypernet.module_shapes != shapes:
            raise UpdateError(
                f"this editor was built for modules {self.hypernet.module_shapes}, not {shapes}; "
                "use an editor trained for the same model and edited modules"
            )
        return self.hypernet

    def new_network(self, module_shapes: dict[str, tuple[int, int]]) -> HyperNetwork:
        """A fresh, identity-initialised network for ``module_shapes``."""
        hp = self.hparams
        return HyperNetwork(module_shapes, hp.rank, hp.n_blocks, hp.lr_init, hp.lambda_init, hp.train.seed,
                            hp.memory_init, hp.corpus_init)

    def _uses_memory(self) -> bool:
        return self.memory is not None and len(self.memory) > 0

    def _penalised(self) -> bool:
        """Whether the solve has a β C_mem + α C_0 term now (the plain solve of §4 otherwise)."""
        return self._uses_memory() or bool(self.corpus_moments)

    def penalty(self, name: str) -> torch.Tensor | None:
        """β C_mem + α C_0 of module ``name`` (differentiable in β, α), or None for the plain solve."""
        net, terms = self.hypernet, []
        if self._uses_memory():
            remembered = self.memory.gram(name)
            if self.paraphrase_moments:  # each remembered key with its cloud of paraphrases
                remembered = remembered + (self.hparams.memory_paraphrases * self.memory.rows(name)
                                           * self.paraphrase_moments[name])
            terms.append(net.memory_weight(name).to(torch.float64) * remembered)
        if self.corpus_moments:
            terms.append(net.corpus_weight(name).to(torch.float64) * self.corpus_moments[name])
        return sum(terms) if terms else None

    def scalars(self, name: str) -> tuple[float, float, float]:
        """Module ``name``'s (λ, β, α) as numbers: what an edit-time inverse of A was built for."""
        net = self.hypernet
        return tuple(float(t.detach()) for t in (net.ridge(name), net.memory_weight(name), net.corpus_weight(name)))

    def system(self, name: str) -> torch.Tensor:
        """A = e^λ I + β C_mem + α C_0 of module ``name`` (fp64, d_in × d_in)."""
        d_in = self.hypernet.module_shapes[name][0]
        penalty = self.penalty(name)
        return ridge_system(None if penalty is None else penalty.detach(), self.hypernet.ridge(name).detach(), d_in,
                            self.hypernet.log_lr.device)

    def step_bytes(self, n_tokens: int, targets: Sequence[EditTarget]) -> int:
        """Per module, one after the other: the fp64 N×N system and its factorisation (and the d_in×d_in one
        of the memory-aware solve), the network's copies of the features; the factors of every module are kept."""
        n = n_tokens
        memory_solve = self.memory is not None or bool(self.corpus_moments)
        per_module = [24 * n * n + (24 * t.d_in * t.d_in + 8 * t.d_in * n if memory_solve else 0)
                      + 32 * n * (t.d_in + t.d_out) for t in targets]
        kept = sum(4 * n * (t.d_in + t.d_out) + (8 * t.d_in * t.d_in if memory_solve else 0) for t in targets)
        return int(max(per_module, default=0) + kept - self.inverses.nbytes())

    def module_update(self, name: str, keys: torch.Tensor, edited_keys: torch.Tensor,
                      edited_grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One module's factors from its keys and the network's outputs: value shifts, then the ridge solve (at
        edit time, without gradients, through the kept inverse of A when the solve has a penalty)."""
        net = self.hypernet
        shifts = value_shifts(keys, edited_keys, edited_grads, net.lr(name))
        if (self._penalised() or self.contrast_keys) and not torch.is_grad_enabled():
            inverse = self.inverses.get(name, self.scalars(name), lambda: self.system(name))
            if self.contrast_keys:
                if name not in self.contrast_inverses:
                    self.contrast_inverses[name] = inverse_with_keys(inverse, self.contrast_keys[name],
                                                                     self.hparams.contrast_weight)
                inverse = self.contrast_inverses[name]
            return ridge_factors(keys, shifts, net.ridge(name), inverse=inverse)
        return ridge_factors(keys, shifts, net.ridge(name), self.penalty(name))

    def edit_batch(self, tokenizer: Any, requests: Sequence[EditRequest], max_length: int | None = None) -> TokenBatch:
        """The rows a step's first pass reads: :meth:`plain_batch`, marked at ``key_positions``."""
        return self.marked(tokenizer, requests, self.plain_batch(tokenizer, requests, max_length))

    def plain_batch(self, tokenizer: Any, requests: Sequence[EditRequest], max_length: int | None = None) -> TokenBatch:
        """Each request's prompt + target, bare and after each context prefix (``context_lengths``), left-padded."""
        return encode_after_prefixes(tokenizer, requests, self.prefixes, max_length)

    def marked(self, tokenizer: Any, requests: Sequence[EditRequest], plain: TokenBatch,
               positions: str | None = None) -> TokenBatch:
        """``plain`` (from :meth:`plain_batch`) with its features read at ``positions`` (default
        ``key_positions``): the answer positions, or the subjects' last tokens too or only."""
        positions = positions or getattr(self.hparams, "key_positions", "answer")  # MEND has answer positions only
        if positions == "answer":
            return plain
        return with_subject_keys(tokenizer, plain, requests, self.name, answers=positions == "answer+subject",
                                 prefixes=self.prefixes)

    # the editor tells the method which computed steps were applied and reverted (key memory bookkeeping)
    def step_applied(self, step_id: int) -> None:
        """The last computed step was applied as ``step_id``: its keys join the memory (and the kept inverses),
        its requests the edits later steps rehearse."""
        if self.staged_requests is not None:
            self.applied_requests[step_id], self.staged_requests = self.staged_requests, None
        if self.memory is not None:
            self.memory.commit(step_id)
            if self.paraphrase_moments:  # A grew by more than β KᵀK: rebuilt when next needed
                self.inverses.clear()
                return
            for name, keys in self.memory.steps[step_id].items():
                if name in self.inverses.entries:  # (none while training: nothing to do in its inner loop)
                    self.inverses.add_keys(name, self.scalars(name), keys)

    def step_reverted(self, step_id: int) -> None:
        """Step ``step_id`` was reverted: its keys leave the memory, its requests the rehearsed ones."""
        self.applied_requests.pop(step_id, None)
        if self.memory is not None:
            self.memory.revert(step_id)
            self.inverses.clear()

    def steps_cleared(self) -> None:
        """Every step was removed (a new training episode): the memory is emptied."""
        self.applied_requests, self.staged_requests = {}, None
        if self.memory is not None:
            self.memory.reset()
            self.inverses.clear()

    def compute_updates(self, features: StepFeaturesLike, targets: Sequence[EditTarget] = (),
                        update_stats: bool | None = None,
                        network: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factors (U, V) per module for one step. ``update_stats=None`` follows the normaliser mode
        ("lifelong": update with this step's features, then normalise; "frozen": never update).
        ``network=False`` skips the hypernetwork (k~ = k, g~ = g: the plain gradient-like shifts).

        Raises :class:`UpdateError` on non-finite features or a non-finite update; the normaliser is then
        left exactly as it was before the call.
        """
        net = self.hypernet
        if net is None:
            raise UpdateError(f"{self.name}: call prepare(model, tokenizer, targets) or build(...) first")
        if update_stats is None:
            update_stats = self.hparams.normalizer == "lifelong"
        _check_features(features, net.module_shapes)
        saved = {k: v.clone() for k, v in net.normalizers.state_dict().items()}
        try:
            if update_stats and network:
                self._fold([features])
            updates = {}
            for name in features.keys:
                keys, grads = _on_device(features, name, net.log_lr.device)
                edited_keys, edited_grads = net(name, keys, grads) if network else (keys, grads)
                updates[name] = self.module_update(name, keys, edited_keys, edited_grads)
            check_updates(updates, net.module_shapes)
        except UpdateError:
            net.normalizers.load_state_dict(saved)
            raise
        if self.memory is not None:
            self.memory.stage(features.keys)
        return updates

    def fold_statistics(self, steps: Sequence[StepFeaturesLike]) -> None:
        """Fold the features of ``steps`` (one step, or steps taken side by side, in order) into the normaliser
        as one update per module (inside :func:`rledit.methods.rledit.net.shared_statistics`, every process's
        too): the "lifelong" normaliser's update before a step's features are normalised."""
        for features in steps:
            _check_features(features, self.hypernet.module_shapes)
        self._fold(steps)

    def _fold(self, steps: Sequence[StepFeaturesLike]) -> None:
        net = self.hypernet
        for name in steps[0].keys:
            net.normalizer(name).update(torch.cat([torch.cat(_on_device(f, name, net.log_lr.device), dim=-1)
                                                   for f in steps]))

    def compute_step(self, model: nn.Module, tokenizer: Any, targets: Sequence[EditTarget],
                     requests: Sequence[EditRequest], features: StepFeaturesLike | None) -> dict[str, Any]:
        """One edit step in ``hparams.passes`` passes (step 5 of the module docstring): the update from the step's
        features, then :meth:`later_passes`. The layers below the lowest edited one do not change between
        passes: they run once, and each later pass runs only the layers from the edited ones up
        (:class:`rledit.prefix.Prefix`, where the architecture allows)."""
        if getattr(self.hparams, "rehearsal", 0) > 0:  # MEND (a subclass) has no such setting
            self.staged_requests = list(requests)
        contrast = self.contrast_requests(requests) if not torch.is_grad_enabled() else []
        if contrast:
            batch = self.marked(tokenizer, contrast, self.plain_batch(tokenizer, contrast, context_length(model)))
            self.contrast_keys = capture_keys(model, targets, batch)
        try:
            updates = super().compute_step(model, tokenizer, targets, requests, features)
            if getattr(self.hparams, "passes", 1) == 1:  # MEND (a subclass) has one pass
                return updates
            rows = list(requests) + self.rehearsed()
            plain = self.plain_batch(tokenizer, rows, context_length(model))
            prefix = Prefix.for_targets(model, targets)  # the layers below the edited ones: once for all passes
            if prefix is not None:
                plain = self.captured_prefix(plain) or prefix.attach(plain)
            with prefix.skipped() if prefix is not None else nullcontext():
                return self.later_passes(model, targets, self.pass_batches(tokenizer, rows, plain), updates)
        finally:
            self.contrast_keys, self.contrast_inverses = {}, {}

    def rehearsed(self) -> list[EditRequest]:
        """``rehearsal`` earlier edits for this step's later passes (see :class:`RLEditHparams`): drawn without
        replacement from the applied steps' requests in step order, the same ones for the same applied steps."""
        count = getattr(self.hparams, "rehearsal", 0)
        if count <= 0 or torch.is_grad_enabled():
            return []
        earlier = [request for step_id in sorted(self.applied_requests) for request in self.applied_requests[step_id]]
        return random.Random(len(self.applied_requests)).sample(earlier, min(count, len(earlier)))

    def contrast_requests(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """Each edit's prompt with the subjects of the step's next ``contrast_subjects`` edits (in turn) in its
        subject's place, continued by its new target: prompts that look like the edit and must not take it
        (none unless ``contrast_subjects`` > 0; see :class:`RLEditHparams`)."""
        count = min(getattr(self.hparams, "contrast_subjects", 0), len(requests) - 1)
        if count <= 0:
            return []
        check_subjects(requests, f"{self.name} with contrast_subjects", "set contrast_subjects: 0 to edit without")
        contrast = []
        for i, request in enumerate(requests):
            subject = request.subject.strip()
            start = request.prompt.lower().find(subject.lower())
            for j in range(1, count + 1):
                other = requests[(i + j) % len(requests)].subject.strip()
                if other.lower() != subject.lower():
                    prompt = request.prompt[:start] + other + request.prompt[start + len(subject):]
                    contrast.append(EditRequest(prompt=prompt, target_new=request.target_new, subject=other))
        return contrast

    def capture(self, model: nn.Module, targets: Sequence[EditTarget], batch: TokenBatch) -> StepFeaturesLike:
        """The step's first features. With later passes to come, the layers below the edited ones run once for
        the whole step: the features are read with them skipped (:class:`rledit.prefix.Prefix`; the same
        numbers), and :meth:`compute_step` starts every later pass from the hidden state computed here."""
        self.lower_hidden = None
        prefix = Prefix.for_targets(model, targets) if getattr(self.hparams, "passes", 1) > 1 else None
        if prefix is None:
            return super().capture(model, targets, batch)
        batch = prefix.attach(batch)
        with prefix.skipped():
            features = capture_features(model, targets, batch)
        self.lower_hidden = batch
        return features

    def captured_prefix(self, plain: TokenBatch) -> TokenBatch | None:
        """``plain`` carrying the hidden state :meth:`capture` computed for the same rows, or None when it did
        not (the later passes then compute it); used once."""
        captured, self.lower_hidden = self.lower_hidden, None
        same = captured is not None and _same_rows(captured, plain)
        return replace(plain, inputs_embeds=captured.inputs_embeds) if same else None

    def pass_batches(self, tokenizer: Any, requests: Sequence[EditRequest], plain: TokenBatch) -> list[TokenBatch]:
        """The edit batch of each pass after the first (none with one pass): ``plain`` (the requests' prompts and
        targets) with its features read at ``key_positions``, or at the pass's entry of ``pass_positions``."""
        passes = getattr(self.hparams, "passes", 1)  # MEND (a subclass) has one pass
        if passes == 1:
            return []
        schedule = list(self.hparams.pass_positions) or [self.hparams.key_positions] * (passes - 1)
        marked = {where: self.marked(tokenizer, requests, plain, where) for where in set(schedule)}
        return [marked[where] for where in schedule]

    def later_passes(self, model: nn.Module, targets: Sequence[EditTarget], batches: Sequence[TokenBatch],
                     updates: dict[str, Factors], differentiable: bool = False) -> dict[str, Factors]:
        """``updates`` with one pass appended per batch of ``batches`` (ΔW = Σ_p U_p V_p): each pass's features
        are captured with the passes so far pending, detached (what a pass reads is the state, as a step's
        first features are), and its update comes from ``refine``. Differentiable where ``updates`` is, and in
        the scalars (and the network, with refine "network") through each later pass's solve: the RL trainer
        runs the same passes as an edit. With ``differentiable`` the earlier passes stay pending with their
        graph and each pass's features are captured differentiably (a second-order backward), so the result
        is differentiable through what every later pass reads too. Later passes leave the normaliser's
        statistics alone, and the key memory keeps the first pass's keys (one step, one entry).

        With ``refine_layers`` the later passes write only those layers' modules, and (not ``differentiable``)
        run only the layers from the lowest of them up, from the hidden state that enters it with the first
        pass pending (computed once: the layers below do not change after the first pass)."""
        if not batches:
            return updates
        refined = [t for t in targets if t.layer in self.hparams.refine_layers] or list(targets)
        staged = self.memory.staged if self.memory is not None else None
        with temporary_store(model, targets) as store:
            inner = None if differentiable or len(refined) == len(targets) else Prefix.for_targets(model, refined)
            if inner is not None:
                with store.pending(detached(updates)):
                    batches = _entering(inner, batches)
            with inner.skipped() if inner is not None else nullcontext():
                for batch in batches:
                    with store.pending(updates if differentiable else detached(updates)):
                        features = capture_features(model, refined, batch, differentiable=differentiable)
                    more = self.compute_updates(features, refined, update_stats=False,
                                                network=self.hparams.refine == "network")
                    updates = {name: (torch.cat([u, more[name][0]], 1), torch.cat([v, more[name][1]], 0))
                               if name in more else (u, v) for name, (u, v) in updates.items()}
        if self.memory is not None:
            self.memory.staged = staged
        return updates

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The hypernetwork's tensors (weights, per-module scalars, normaliser statistics), detached, and the
        key memory of the applied steps when the solve uses one."""
        if self.hypernet is None:
            return {}
        state = {k: v.detach() for k, v in self.hypernet.state_dict().items()}
        if self.applied_requests:
            state[REHEARSAL_KEY] = _encoded(self.applied_requests)
        return state | (self.memory.state_dict() if self.memory is not None else {})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state saved by :meth:`state_dict` (or a trained checkpoint) into the editor built by
        :meth:`prepare`. A checkpoint from before the memory-aware solve has no β/α log-weights: they keep
        their initial values from the hparams."""
        if self.hypernet is None:
            raise UpdateError(f"{self.name}: call prepare(model, tokenizer, targets) before loading a state")
        state, memory_state = split_memory_state(state)
        state = dict(state)
        rehearsal = state.pop(REHEARSAL_KEY, None)
        own = self.hypernet.state_dict()
        state = {k: own[k] for k in ("memory_log", "corpus_log") if k in own and k not in state} | state
        wrong = sorted(k for k in own.keys() | state.keys()
                       if k not in own or k not in state or own[k].shape != state[k].shape)
        if wrong:
            raise UpdateError(
                f"the saved editor state does not fit this editor's layout {self.hypernet.layout()}: "
                f"missing, extra or differently shaped tensors {wrong[:8]}; was it trained for another model, "
                "other edited modules, or another rank / n_blocks?"
            )
        if memory_state and self.memory is None:
            raise UpdateError(f"the saved state holds a key memory, but this {self.name} editor's solve uses "
                              "none (memory_init = 0)")
        if self.memory is not None:
            try:
                self.memory.load_state_dict(memory_state)
            except ValueError as error:
                raise UpdateError(str(error)) from error
        self.hypernet.load_state_dict(state)
        self.applied_requests = {} if rehearsal is None else _decoded(rehearsal)
        self.inverses.clear()


@register_method("malmen")
class MALMENMethod(RLEditMethod):
    """MALMEN: the same editor and update as RLEdit; only its training defaults differ (one-step episodes)."""

    name = "malmen"
    hparams_class = MALMENHparams


def detached(updates: dict[str, Factors]) -> dict[str, Factors]:
    """``updates`` with each factor detached from its graph."""
    return {name: (u.detach(), v.detach()) for name, (u, v) in updates.items()}


def _encoded(applied: dict[int, list[EditRequest]]) -> torch.Tensor:
    """The applied steps' requests (what rehearsal reads of them) as a uint8 tensor of UTF-8 JSON, so that a
    saved editor state, which holds tensors only, keeps them."""
    rows = [[step_id, [[r.prompt, r.target_new, r.subject] for r in requests]]
            for step_id, requests in sorted(applied.items())]
    return torch.frombuffer(bytearray(json.dumps(rows).encode("utf-8")), dtype=torch.uint8)


def _decoded(tensor: torch.Tensor) -> dict[int, list[EditRequest]]:
    """What :func:`_encoded` wrote."""
    rows = json.loads(tensor.cpu().numpy().tobytes().decode("utf-8"))
    return {int(step_id): [EditRequest(prompt=p, target_new=t, subject=s) for p, t, s in requests]
            for step_id, requests in rows}


def _same_rows(a: TokenBatch, b: TokenBatch) -> bool:
    """Whether two batches hold the same token rows (and so the same hidden states below the edited layers)."""
    return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)


def _entering(prefix: Prefix, batches: Sequence[TokenBatch]) -> list[TokenBatch]:
    """``batches`` carrying the hidden state entering ``prefix.start`` (computed once per distinct rows)."""
    attached: list[TokenBatch] = []
    for batch in batches:
        same = next((a for a in attached if _same_rows(a, batch)), None)
        attached.append(replace(batch, inputs_embeds=same.inputs_embeds) if same is not None else prefix.attach(batch))
    return attached


def _on_device(features: StepFeaturesLike, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Module ``name``'s keys and value-gradients of ``features``, fp32 on ``device``."""
    return (features.keys[name].to(device=device, dtype=torch.float32),
            features.grads[name].to(device=device, dtype=torch.float32))


def _check_features(features: StepFeaturesLike, module_shapes: dict[str, tuple[int, int]]) -> None:
    """Names, shapes, matching N and finiteness of one step's features, with errors that say what is wrong."""
    if set(features.keys) != set(features.grads):
        raise UpdateError(f"keys for {sorted(features.keys)} but value-gradients for {sorted(features.grads)}")
    if not features.keys:
        raise UpdateError("the step's features name no module")
    for name, keys in features.keys.items():
        if name not in module_shapes:
            raise UpdateError(f"features for {name!r}, which this editor does not edit: {list(module_shapes)}")
        grads, (d_in, d_out) = features.grads[name], module_shapes[name]
        if keys.dim() != 2 or grads.dim() != 2 or keys.shape[0] != grads.shape[0] or keys.shape[0] == 0:
            raise UpdateError(f"{name}: keys {tuple(keys.shape)} and grads {tuple(grads.shape)} must be (N, ·), N > 0")
        if keys.shape[1] != d_in or grads.shape[1] != d_out:
            raise UpdateError(f"{name}: features of widths ({keys.shape[1]}, {grads.shape[1]}), expected {(d_in, d_out)}")
        if not (torch.isfinite(keys).all() and torch.isfinite(grads).all()):
            raise UpdateError(
                f"{name}: the step's keys or value-gradients are not finite (inf/nan), so no update was computed "
                "and nothing changed; the model's activations overflow on this batch (try fp32 or a smaller batch)"
            )
