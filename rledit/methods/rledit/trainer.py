"""RL training of the RLEdit hypernetwork over whole edit sequences (ALGORITHM.md §5).

An episode starts from the unedited model (the delta store is reset) and applies ``steps_per_episode`` edit
steps of ``batch`` requests from the training split. At step t:

1. features (K, G) of the step's edit prompts on the current model W(t-1)   (detached: the state)
2. the action: factors (Kᵀ, Y) from the hypernetwork and the ridge solve     (carries the graph), followed
   by the later passes of an edit when ``method.passes`` > 1 (their features detached, their solves not;
   with ``differentiable_passes`` their features too, by a second-order backward), so the editor is trained
   for the rule it edits with
3. the loss with memory backtracking, evaluated with the action pending on top of W(t-1) (so on W(t)):

       L_t = Σ_{j<min(t,H)} γ^j [ CE_gen(B_{t-j}; W(t)) + α KL_loc(B_{t-j}; W_ref, W(t)) ] + μ Σ_m ||ΔW_m||²_F

   CE_gen: target cross-entropy on the rephrase (and edit) prompts (or, with ``gen_objective: margin``, the
   hinge max(0, m - (log p(new) - log p(old))) per prompt, so that edits already won are not pushed);
   KL_loc: KL(p_ref || p_W(t)) on the locality prompts' answer positions, W_ref = W(t-1) ("previous") or W(0)
   ("unedited") (or, with ``loc_objective: margin``, the hinge that p_ref's argmax keep its lead there).
4. backward into the network, λ and the step sizes; an optimiser step every ``update_every`` steps
5. the action is applied for good (detached): W(t) = W(t-1) + ΔW_t, and the method is told (its key memory,
   when the solve uses one, takes the step's keys).

With ``backtracking: sampled`` the sum over the last H steps is replaced by the newest step plus the mean over
k steps sampled from all earlier steps of the episode (weight ``past_weight``), so long episodes keep their
oldest edits in the loss at a fixed cost per step. With ``loss_rows`` < 1 each step keeps a sample of its
rephrase and locality rows, drawn when it is tokenised and rescaled to an unbiased estimate of the whole (the
loss's forward and backward, and the rows' cached states, are most of a training step's cost). Guards: every
episode logs the update norms and learned scalars; a held-out validation stream is scored every
``validate_every`` episodes and the best editor kept as ``editor-best``; training stops when the episode loss
diverges (``diverge_factor``).

With ``episodes_per_step`` R > 1 a process runs R episodes side by side (lanes): step t of every lane is taken
in lockstep, each on its own model state, the normaliser folds in all their features at once and the optimiser
step takes the mean of their gradients, exactly as R data-parallel processes with one episode each would.

No weight is ever mutated (deltas are applied by the store's hooks), the μ term is differentiable, the
optimiser steps many times, and everything is seeded. MALMEN-style training is the same loop with
``steps_per_episode = 1`` and ``back_depth = 1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import rledit
from rledit import distributed
from rledit.checkpoints import read_checkpoint
from rledit.deltas import StoredSteps
from rledit.eval.protocols import as_question
from rledit.eval.relations import same_relation_pair
from rledit.files import atomic_file, command_line, write_text_atomically
from rledit.hooks import answer_token_loss, capture_features, per_row_target_nll
from rledit.methods.memory import KeyMemory, split_memory_state
from rledit.methods.rledit.method import RLEditMethod, detached
from rledit.methods.rledit.net import shared_statistics
from rledit.methods.rledit.solve import factored_frobenius_sq
from rledit.prefix import Prefix
from rledit.tokens import TokenBatch, answer_logits, encode, select_rows
from rledit.types import EditRequest

LOG_FILE = "train_log.jsonl"
STATE_FILE = "trainer_state.pt"
BEST_EDITOR = "editor-best"
VALIDATION_PROTOCOLS = {"zsre": "zsre-token-acc@2", "counterfact": "cf-prob@1"}


@dataclass
class WindowStep:
    """One past edit step kept for backtracking: its tokenised prompts and cached locality references."""

    edit: TokenBatch  # edit prompts → target_new (features are taken on these)
    gen: TokenBatch  # rephrase (+ edit) prompts → target_new
    loc: TokenBatch  # locality prompts → their answers
    loc_ref: torch.Tensor | None = None  # reference log-probs at loc answer positions ("unedited" mode)
    gen_old: TokenBatch | None = None  # the gen prompts → the old target (``gen_objective: margin``)
    passes: list[TokenBatch] = field(default_factory=list)  # the edit batch of each later pass (method.passes > 1)
    gen_scale: float = 1.0  # what the loss multiplies each term by when it reads a sample of the rows
    loc_scale: float = 1.0


@dataclass
class Lane:
    """One of the episodes a process runs side by side (``train.episodes_per_step``): its data order and
    generator, the prompts and past steps of its running episode, and its model state (the delta store's
    applied steps, its own key memory) while another lane runs."""

    rng: random.Random
    order: list[int] = field(default_factory=list)
    episode_prompts: set[str] = field(default_factory=set)
    history: list[WindowStep] = field(default_factory=list)
    steps: StoredSteps | None = None
    memory: KeyMemory | None = None


def answer_log_probs(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Log-probabilities (n_answer_tokens, vocab), fp32, of ``model`` at the answer positions of ``batch``."""
    return F.log_softmax(answer_logits(model, batch).float(), dim=-1)


def locality_kl(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over answer positions of KL(p_ref || p)."""
    return (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).mean()


def locality_margin(ref_log_probs: torch.Tensor, log_probs: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over answer positions of max(0, min(margin, r) - d): d is the lead in log-probability of p_ref's
    argmax token over the best other token under p, r the same lead under p_ref."""
    top = ref_log_probs.argmax(-1, keepdim=True)

    def lead(lp: torch.Tensor) -> torch.Tensor:
        return lp.gather(-1, top).squeeze(-1) - lp.scatter(-1, top, float("-inf")).max(-1).values

    return F.relu(lead(ref_log_probs).clamp(max=margin) - lead(log_probs)).mean()


def sampled_rows(step: WindowStep, fraction: float, rng: random.Random, gen_per_row: bool) -> WindowStep:
    """``step`` with the part of its generalization and locality rows its losses read (``train.loss_rows``), each
    drawn uniformly without replacement, and the scales that make each sampled term an unbiased estimate of the
    whole step's. A term that averages over answer tokens, Σ_rows s_r / T, is estimated by (N/n) Σ_drawn s_r / T:
    the drawn rows' own token mean times (T_drawn / T)(N / n). One that averages over rows (the generalization
    margin, ``gen_per_row``) is estimated by the drawn rows' mean. Drawn before the rows' cached states and
    references are computed, so that those cost the fraction too."""
    if step.loc_ref is not None or step.gen.inputs_embeds is not None:
        raise ValueError("sample a step's rows before its prefix states and locality references are computed")

    def draw(batch: TokenBatch) -> list[int]:
        n_rows = batch.input_ids.shape[0]
        return sorted(rng.sample(range(n_rows), max(1, round(fraction * n_rows))))

    def token_scale(whole: TokenBatch, part: TokenBatch) -> float:
        rows = whole.input_ids.shape[0] / part.input_ids.shape[0]
        return part.n_answer_tokens / whole.n_answer_tokens * rows

    gen_rows, loc_rows = draw(step.gen), draw(step.loc)
    gen, loc = select_rows(step.gen, gen_rows), select_rows(step.loc, loc_rows)
    gen_old = select_rows(step.gen_old, gen_rows) if step.gen_old is not None else None
    return replace(step, gen=gen, loc=loc, gen_old=gen_old,
                   gen_scale=1.0 if gen_per_row else token_scale(step.gen, gen), loc_scale=token_scale(step.loc, loc))


class RLEditTrainer:
    """Trains ``method.hypernet`` on edit sequences drawn from ``requests`` (see the module docstring).

    ``editor`` is an :class:`rledit.Editor` whose method is an :class:`RLEditMethod`; the trainer uses its
    model, tokenizer, targets and delta store, and resets the store at the start of every episode.
    """

    def __init__(self, editor, requests: Sequence[EditRequest], out_dir: str | Path, progress: bool = True,
                 hparams_source: str | None = None, init_from: str | Path | None = None):
        if not isinstance(editor.method, RLEditMethod):
            raise TypeError(f"the RL trainer trains RLEdit-family editors, not {editor.method.name!r}")
        self.editor = editor
        self.method: RLEditMethod = editor.method
        self.hp = self.method.hparams.train
        need = (self.hp.steps_per_episode + self.hp.warm_start_max) * self.hp.batch
        usable = [r for r in requests if r.rephrase_prompts and r.locality]
        if self.hp.gen_objective == "margin" and any(r.ground_truth is None for r in usable):
            raise ValueError("train.gen_objective 'margin' compares the new target with the old one, and some "
                             "training requests have no ground_truth (the old target); use 'ce' for this data")
        held_out = self.hp.validation_size
        if len(usable) < need + held_out:
            raise ValueError(
                f"training needs {need} requests with rephrase and locality prompts per episode "
                f"({self.hp.steps_per_episode} steps + up to {self.hp.warm_start_max} warm-start steps, × "
                f"{self.hp.batch}) and {held_out} held out for validation; the training split has {len(usable)}"
            )
        if held_out:  # a seeded draw, fixed by the seed alone: the same records whatever the run
            order = list(range(len(usable)))
            random.Random(f"validation-{self.hp.seed}").shuffle(order)
            self.validation = [usable[i] for i in sorted(order[:held_out])]
            usable = [usable[i] for i in sorted(order[held_out:])]
        else:
            self.validation = []
        self.requests = usable
        self.validation_references = None
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.hparams_source = hparams_source
        self.max_length = None
        # the layers below the lowest edited one never change: their output is computed once per batch
        self.prefix = Prefix.for_targets(editor.model, editor.targets)
        self.init_from = str(init_from) if init_from is not None else None
        if init_from is not None:  # fine-tune a trained editor (same modules and network shape) with these settings
            saved = read_checkpoint(init_from)
            saved.check_targets(editor.targets)
            self.method.load_state_dict(saved.state)
        self.editor.model.eval()
        for p in self.editor.model.parameters():
            p.requires_grad_(False)
        groups = self.method.hypernet.parameter_groups(self.hp.meta_lr, self.hp.scalar_meta_lr)
        for group in groups:  # a group at learning rate 0 is held: no gradient is computed for it
            for p in group["params"]:
                p.requires_grad_(group["lr"] > 0)
        self.optimizer = torch.optim.Adam([group for group in groups if group["lr"] > 0])
        # under several processes (data-parallel training) each draws its own episodes: rank 0 the
        # single-process ones, rank r > 0 from the seed "<seed>-rank<r>" (train.distinct_episodes: False gives every
        # process rank 0's); gradients and normaliser statistics are shared, so all keep the same editor
        self.rank, self.processes = distributed.world()
        self.main = self.rank == 0
        self.lanes = [self._new_lane(self.rank * self.hp.episodes_per_step + r) for r in range(self.hp.episodes_per_step)]
        self.episode = 0
        self.global_step = 0
        self.first_loss: float | None = None
        self.best_score: float | None = None

    # ------------------------------------------------------------------------------------------- the loop
    def train(self, resume: bool = False) -> Path:
        """Run all episodes (continuing from the last checkpoint with ``resume``); returns the final checkpoint."""
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        if resume:
            self._load_state()
        self._log({"kind": "run", "command": command_line(), "resume": resume, "from_episode": self.episode,
                   "rledit": rledit.__version__, "torch": torch.__version__, "processes": self.processes,
                   "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        torch.manual_seed(self.hp.seed + self.episode)
        bar = tqdm(total=self.hp.episodes, initial=self.episode, desc="episodes",
                   disable=not (self.progress and self.main))
        start = time.perf_counter()
        if self.validation and self.episode == 0:  # the starting editor is a candidate too: training keeps the best
            self._validate()
        while self.episode < self.hp.episodes:
            metrics = self._mean_over_processes(self.run_episode([self._draw_episode(lane) for lane in self.lanes]))
            self.episode += 1
            metrics.update(episode=self.episode, seconds=round(time.perf_counter() - start, 2),
                           scalars=self._mean_scalars())
            self._log({"kind": "episode", **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['edit_acc']:.2f}")
            bar.update()
            diverged = self._diverged(metrics["loss"])
            last = self.episode == self.hp.episodes or diverged
            if self.validation and (self.episode % self.hp.validate_every == 0 or last):
                self._validate()
            if self.episode % self.hp.checkpoint_every == 0 or last:
                self._save_state()
            if diverged:
                self._log({"kind": "stopped", "episode": self.episode, "reason":
                           f"episode loss {metrics['loss']:.4g} is not finite or above {self.hp.diverge_factor} x "
                           f"the first episode's {self.first_loss:.4g}"})
                break
        bar.close()
        self._clear_steps()
        self._check_processes_agree()
        final = self.out_dir / "editor"
        if self.main:
            self.editor.save_checkpoint(final, extra=self._training_facts())
        distributed.barrier()
        return final

    def run_episode(self, episodes: list[list[EditRequest]]) -> dict[str, float]:
        """One episode per lane, side by side: reset each lane's model, optionally apply m warm-start steps
        without gradients, then T steps, each acting, learning and then keeping its edit. Returns the metrics
        averaged over the steps and lanes."""
        hp, lanes = self.hp, self.lanes
        draws = [lane.rng.randint(0, hp.warm_start_max) if hp.warm_start_max else 0 for lane in lanes]
        warm = distributed.gather(draws[0])[0]  # every lane of every process applies as many steps (the first's draw)
        plans = []
        for lane, requests in zip(lanes, episodes):
            with self._running(lane):
                self._clear_steps()
            lane.episode_prompts, lane.history = {r.prompt for r in requests}, []
            plans.append([requests[i:i + hp.batch] for i in range(0, len(requests), hp.batch)])
        for w in range(hp.steps_per_episode, hp.steps_per_episode + warm):
            for lane, steps in zip(lanes, plans):
                lane.history.append(self._tokenise(steps[w], lane, sampled=True))
            self._lockstep([(lane, lane.history[-1], (), ()) for lane in lanes], learn=False)
        totals: dict[str, float] = {}
        steps_bar = tqdm(total=hp.steps_per_episode, desc=f"episode {self.episode + 1}", unit="step", leave=False,
                         disable=not (self.progress and self.main))
        for t in range(hp.steps_per_episode):
            work = []
            for lane, steps in zip(lanes, plans):
                lane.history.append(self._tokenise(steps[t], lane, sampled=True))
                work.append((lane, lane.history[-1], *self._past(lane.history[:-1], lane)))
            for metrics in self._lockstep(work, learn=True):
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value / (hp.steps_per_episode * len(lanes))
            for lane in lanes:
                if hp.backtracking == "window":  # older steps are never looked at again: free their cached tensors
                    lane.history = lane.history[-(hp.back_depth - 1):] if hp.back_depth > 1 else []
            self.global_step += 1
            if self.global_step % hp.update_every == 0:
                self._optimiser_step()
            steps_bar.update()
        steps_bar.close()
        for lane in lanes:
            lane.history = []
            if len(lanes) > 1:  # the lanes' edits are done with: free them before validation
                with self._running(lane):
                    self._clear_steps()
        totals["warm_start_steps"] = warm
        return totals

    def _past(self, earlier: list[WindowStep], lane: Lane | None = None) -> tuple[list[WindowStep], list[float]]:
        """The earlier steps the newest step's loss looks back on, and their weights (sampled with the lane's
        generator; default the first lane's)."""
        hp = self.hp
        if hp.backtracking == "window":
            chosen = earlier[::-1][:hp.back_depth - 1]
            return chosen, [hp.time_decay ** (j + 1) for j in range(len(chosen))]
        k = min(hp.back_samples, len(earlier))
        if k == 0:
            return [], []
        return (lane or self.lanes[0]).rng.sample(earlier, k), [hp.past_weight / k] * k

    def learn_step(self, current: WindowStep, past: Sequence[WindowStep] = (),
                   past_weights: Sequence[float] = ()) -> dict[str, float]:
        """Act on ``current``, backpropagate L_t over it and ``past`` (weighted), then apply the action for good
        (one lane)."""
        return self._lockstep([(self.lanes[0], current, past, past_weights)], learn=True)[0]

    def apply_step(self, step: WindowStep) -> None:
        """Apply the current editor's update of ``step`` without learning from it (a warm-start step; one lane)."""
        self._lockstep([(self.lanes[0], step, (), ())], learn=False)

    def _lockstep(self, work: Sequence[tuple[Lane, WindowStep, Sequence[WindowStep], Sequence[float]]],
                  learn: bool) -> list[dict[str, float]]:
        """One step of each lane of ``work`` ((lane, current, past, past weights)): every lane's features are
        captured on its own model state, the normaliser folds them all in (and every process's), then each lane
        acts on its features, learns (``learn``: backpropagates its L_t, scaled so that the optimiser step
        takes the mean over lanes and steps) and keeps its edit. Returns each lane's metrics (learning only)."""
        model, targets = self.editor.model, self.editor.targets
        with self._upper_layers_only():
            features = []
            for lane, current, _, _ in work:
                with self._running(lane):
                    features.append(capture_features(model, targets, current.edit))
            with self._shared_statistics():
                self.method.fold_statistics(features)
            results = []
            for (lane, current, past, weights), step_features in zip(work, features):
                with self._running(lane), torch.set_grad_enabled(learn):
                    results.append(self._act(current, past, weights, step_features, learn, len(work)))
        return results

    def _act(self, current: WindowStep, past: Sequence[WindowStep], past_weights: Sequence[float], features,
             learn: bool, lanes: int) -> dict[str, float]:
        """The running lane's action on ``current`` (the normaliser already holds its features), its loss
        backpropagated when ``learn``, and the action kept."""
        updates = self.action(current, features, differentiable=learn and self.hp.differentiable_passes)
        if not learn:
            self._keep(updates)
            return {}
        loss, metrics = self.step_loss(updates, [current, *past], [1.0, *past_weights])
        (loss / (self.hp.update_every * lanes)).backward()
        self._keep(detached(updates))
        return metrics | {"pre_edit_loss": features.loss}

    def action(self, current: WindowStep, features, differentiable: bool = False) -> dict[str, tuple]:
        """The editor's update of ``current`` from its first features (step 2 of the module docstring): the
        network and the solve, then the later passes of an edit (their features ``differentiable`` or not)."""
        model, targets = self.editor.model, self.editor.targets
        updates = self.method.compute_updates(features, targets, update_stats=False)
        return self.method.later_passes(model, targets, current.passes, updates, differentiable=differentiable)

    def step_loss(self, updates: dict[str, tuple], steps: list[WindowStep],
                  weights: list[float]) -> tuple[torch.Tensor, dict[str, float]]:
        """L_t with ``updates`` pending over ``steps`` (the newest first, weighted; step 3 of the module
        docstring), and its parts as numbers."""
        hp = self.hp
        references = self._references(steps)
        with self.editor.store.pending(updates):
            gen_loss, loc_loss, edit_acc = self._backtracking_losses(steps, weights, references)
        reg = sum(factored_frobenius_sq(u, v) for u, v in updates.values())
        loss = gen_loss + hp.loc_coef * loc_loss + hp.reg_coef * reg
        return loss, {"loss": loss.item(), "gen": gen_loss.item(), "loc": loc_loss.item(), "reg": reg.item(),
                      "update_norm": math.sqrt(max(reg.item(), 0.0) / len(updates)), "edit_acc": edit_acc}

    @contextlib.contextmanager
    def _running(self, lane: Lane):
        """Inside the block the model and the method carry ``lane``'s state (its applied steps and key memory);
        with one lane that is the editor's own state and nothing moves."""
        if len(self.lanes) == 1:
            yield
            return
        store, method = self.editor.store, self.method
        outer, lane.steps = store.exchange_steps(lane.steps), None
        outer_memory, method.memory = method.memory, lane.memory
        method.inverses.clear()  # (kept inverses belong to one memory)
        try:
            yield
        finally:
            lane.steps = store.exchange_steps(outer)
            lane.memory, method.memory = method.memory, outer_memory
            method.inverses.clear()

    def _keep(self, updates) -> None:
        self.method.step_applied(self.editor.store.add(updates))

    def _clear_steps(self) -> None:
        self.editor.store.reset()
        self.method.steps_cleared()

    def _backtracking_losses(self, steps: list[WindowStep], weights: list[float], references: list[torch.Tensor]):
        """Σ_j w_j CE_gen and Σ_j w_j KL_loc over ``steps`` (the newest first), with the action pending."""
        model = self.editor.model
        gen_loss = loc_loss = torch.zeros(())
        edit_acc = 0.0
        for j, (past, weight, ref) in enumerate(zip(steps, weights, references)):
            logits = answer_logits(model, past.gen)
            gen_loss = gen_loss + weight * past.gen_scale * self._gen_term(logits, past)
            if j == 0:
                labels = past.gen.labels[past.gen.answer_mask]
                edit_acc = float((logits.argmax(-1) == labels).float().mean())
            loc_loss = loc_loss + weight * past.loc_scale * self._loc_term(ref, answer_log_probs(model, past.loc))
        return gen_loss, loc_loss, edit_acc

    def _loc_term(self, ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
        """The locality term of one step, given the reference's and the model's log-probabilities at its
        locality prompts' answer positions."""
        if self.hp.loc_objective == "margin":
            return locality_margin(ref_log_probs, log_probs, self.hp.loc_margin)
        return locality_kl(ref_log_probs, log_probs)

    def _gen_term(self, logits: torch.Tensor, step: WindowStep) -> torch.Tensor:
        """The generalization term of one step, given the model's logits at ``step.gen``'s answer positions."""
        if step.gen_old is None:
            return answer_token_loss(logits, step.gen)
        old_nll = per_row_target_nll(answer_logits(self.editor.model, step.gen_old), step.gen_old)
        win = old_nll - per_row_target_nll(logits, step.gen)  # mean log p(new) - mean log p(old), per prompt
        return F.relu(self.hp.gen_margin - win).mean()

    @torch.no_grad()
    def _references(self, window: Sequence[WindowStep]) -> list[torch.Tensor]:
        """p_ref on each window step's locality prompts: W(t-1) now ("previous") or cached W(0) ("unedited")."""
        if self.hp.loc_reference == "unedited":
            return [step.loc_ref for step in window]
        model = self.editor.model
        return [answer_log_probs(model, step.loc) for step in window]

    def _upper_layers_only(self):
        """Run only the layers from the lowest edited one on, from the batches' cached hidden states."""
        return self.prefix.skipped() if self.prefix is not None else contextlib.nullcontext()

    def _shared_statistics(self):
        """Every process's features enter the normaliser (several processes only)."""
        return shared_statistics() if self.processes > 1 else contextlib.nullcontext()

    def _check_processes_agree(self) -> None:
        """Raise unless every process holds bit-for-bit the same editor (data-parallel training)."""
        if self.processes == 1:
            return
        digest = hashlib.sha256()
        for name, tensor in sorted(self.method.hypernet.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        digests = distributed.gather(digest.hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"the {self.processes} training processes hold different editors after episode "
                               f"{self.episode} (sha256 {digests}); their gradients or statistics were not shared")

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """The episode's metrics averaged over the processes (the same on every one; so are the stops)."""
        if self.processes == 1:
            return metrics
        parts = distributed.gather(metrics)
        return {key: sum(part[key] for part in parts) / len(parts) for key in metrics}

    def _optimiser_step(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        distributed.average_gradients(params)  # data-parallel: the mean gradient of every process's episode
        norm = torch.nn.utils.clip_grad_norm_(params, self.hp.grad_clip)
        if torch.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------- the data
    def _new_lane(self, index: int) -> Lane:
        """Lane ``index`` over all processes (process p's lane r is p·R + r): lane 0 draws the episodes of a
        single run, lane i > 0 those of the seed "<seed>-rank<i>" (``distinct_episodes: False``: lane 0's)."""
        own = index > 0 and self.hp.distinct_episodes
        lane = Lane(random.Random(f"{self.hp.seed}-rank{index}" if own else self.hp.seed))
        if self.hp.episodes_per_step > 1 and self.method.memory is not None:
            lane.memory = KeyMemory(self.method.hypernet.module_shapes, self.method.memory.device)
        return lane

    def _draw_episode(self, lane: Lane) -> list[EditRequest]:
        """The lane's next T×B requests of a seeded shuffle of the training split (reshuffled when used up)."""
        need = (self.hp.steps_per_episode + self.hp.warm_start_max) * self.hp.batch
        if len(lane.order) < need:
            order = list(range(len(self.requests)))
            lane.rng.shuffle(order)
            lane.order = order
        chosen, lane.order = lane.order[:need], lane.order[need:]
        return [self.requests[i] for i in chosen]

    def _tokenise(self, requests: list[EditRequest], lane: Lane | None = None, sampled: bool = False) -> WindowStep:
        """A step's batches (edit, rephrase and edit prompts, locality prompts, the later passes' edit batches),
        with their cached prefix states and the locality references; ``sampled``: with ``train.loss_rows`` < 1,
        only the rows its losses will read (drawn with the lane's generator; default the first lane's)."""
        tok = self.editor.tokenizer
        gen = [(p, r) for r in requests for p in r.rephrase_prompts]  # (prompt, its request)
        if self.hp.use_edit_prompt_loss:
            gen += [(r.prompt, r) for r in requests]
        gen_prompts = [p for p, _ in gen]
        loc = [(as_question(pa.prompt) if pa.kind == "nq" else pa.prompt, pa.answer)
               for r in requests for pa in r.locality[:1]]  # NQ questions as zsre-token-acc@2 asks them
        if self.hp.relation_locality:  # not a record this episode edits: its answer is meant to change
            pairs = (same_relation_pair(r, half="train") for r in requests)
            episode_prompts = (lane or self.lanes[0]).episode_prompts
            loc += [pair for pair in pairs if pair is not None and pair[0] not in episode_prompts]
        # left padding: answers end every row, so answer_logits projects few positions
        plain = self.method.plain_batch(tok, requests)
        margin = self.hp.gen_objective == "margin"
        gen_old = encode(tok, gen_prompts, [r.ground_truth for _, r in gen], padding_side="left") if margin else None
        step = WindowStep(self.method.marked(tok, requests, plain),
                          encode(tok, gen_prompts, [r.target_new for _, r in gen], padding_side="left"),
                          encode(tok, [prompt for prompt, _ in loc], [answer for _, answer in loc], padding_side="left"),
                          gen_old=gen_old,
                          passes=list(self.method.pass_batches(tok, requests, plain)))  # later passes, as at edit time
        if sampled and self.hp.loss_rows < 1:
            step = sampled_rows(step, self.hp.loss_rows, (lane or self.lanes[0]).rng, margin)
        if self.prefix is not None:
            attach = self.prefix.attach
            step = replace(step, edit=attach(step.edit), gen=attach(step.gen), loc=attach(step.loc),
                           gen_old=attach(step.gen_old) if step.gen_old is not None else None,
                           passes=[attach(batch) for batch in step.passes])
        if self.hp.loc_reference == "unedited":
            with torch.no_grad(), self.editor.store.bypassed(), self._upper_layers_only():
                step.loc_ref = answer_log_probs(self.editor.model, step.loc)
        return step

    # ----------------------------------------------------------------------------------------- guards
    def _diverged(self, loss: float) -> bool:
        factor = self.hp.diverge_factor
        if self.first_loss is None:  # the first episode sets the scale
            self.first_loss = loss
            return factor > 0 and not math.isfinite(loss)
        return factor > 0 and (not math.isfinite(loss) or loss > factor * self.first_loss)

    def _mean_scalars(self) -> dict[str, float]:
        return {name: sum(values) / len(values) for name, values in self.method.hypernet.scalars().items()}

    def _validate(self) -> None:
        """Apply the validation stream with the current editor, score it, restore the editor, keep the best."""
        from rledit.bench import dataset_kind
        from rledit.eval import compute_references, evaluate

        if not self.main:  # rank 0 validates alone; the others wait for it at the next shared step
            return
        with distributed.alone():
            self._validate_here(dataset_kind, compute_references, evaluate)

    def _validate_here(self, dataset_kind, compute_references, evaluate) -> None:
        editor, hp = self.editor, self.hp
        protocol = VALIDATION_PROTOCOLS.get(dataset_kind(self.validation), "zsre-token-acc@2")
        if self.validation_references is None:
            with editor.store.bypassed():
                self.validation_references = compute_references(editor.model, editor.tokenizer, self.validation,
                                                                [protocol])
        self._clear_steps()  # the episode's edits are done with; the normaliser's statistics are restored below
        saved = {k: v.clone() for k, v in self.method.state_dict().items()}
        start = time.perf_counter()
        terms = []
        with torch.no_grad():
            for i in range(0, len(self.validation), hp.validation_batch):
                requests = self.validation[i:i + hp.validation_batch]
                step = self._tokenise(requests)
                reference = self._references([step])[0]  # the model before this step, for "previous"
                editor.apply(requests)
                terms.append(self._held_out_terms(step, reference))
        objective = {key: round(sum(t[key] for t in terms) / len(terms), 4) for key in terms[0]}
        result = evaluate(editor.model, editor.tokenizer, self.validation, [protocol], self.validation_references)
        self._clear_steps()
        editor.history.clear()
        self.method.load_state_dict(saved)
        metrics = result.metrics[protocol]
        headline = [metrics[m] for m in ("efficacy", "generalization", "locality", "relation_locality",
                                         "neighborhood") if metrics.get(m) is not None]
        score = sum(headline) / len(headline)
        best = self.best_score is None or score > self.best_score
        self._log({"kind": "validation", "episode": self.episode, "protocol": protocol, "score": round(score, 3),
                   "best": best, "seconds": round(time.perf_counter() - start, 2), "objective": objective,
                   **{m: round(v, 3) for m, v in metrics.items()}})
        if best:
            self.best_score = score
            editor.save_checkpoint(self.out_dir / BEST_EDITOR, extra={**self._training_facts(),
                                                                      "validation": {"protocol": protocol,
                                                                                     "score": score, **metrics}})

    def _held_out_terms(self, step: WindowStep, reference: torch.Tensor) -> dict[str, float]:
        """The training loss's terms (without the ΔW penalty) on a validation step just applied: its rephrases
        and edit prompts, its locality prompts against ``reference``. Logged beside the validation metrics, they
        tell an objective that does not carry to new edits from one that carries and disagrees with the metrics."""
        with self._upper_layers_only():
            gen, loc, _ = self._backtracking_losses([step], [1.0], [reference])
        return {"loss": float(gen + self.hp.loc_coef * loc), "gen": float(gen), "loc": float(loc)}

    # ------------------------------------------------------------------------------------ logs and state
    def _log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.out_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _training_facts(self) -> dict[str, Any]:
        return {"episodes": self.episode, "processes": self.processes,  # episodes per process
                "optimizer_steps": self.global_step // self.hp.update_every,
                "train": asdict(self.hp), "hparams_file": self.hparams_source, "n_train_requests": len(self.requests),
                "n_validation_requests": len(self.validation), "init_from": self.init_from,
                "command": command_line()}

    def _save_state(self) -> None:
        """Checkpoint network, optimiser, data order and RNG so that ``resume`` continues exactly (atomic)."""
        data = self._data_state()
        state = {"episode": self.episode, "global_step": self.global_step, "n_requests": len(self.requests),
                 **data, "torch_rng": torch.get_rng_state(),
                 "first_loss": self.first_loss, "best_score": self.best_score,
                 "method": split_memory_state(self.method.state_dict())[0],  # the next episode starts empty
                 "optimizer": self.optimizer.state_dict()}
        self._check_processes_agree()
        ranks = distributed.gather({**data, "torch_rng": torch.get_rng_state()})
        if self.processes > 1:
            state["ranks"] = ranks  # each process's own data order and generators
        if not self.main:
            return
        with atomic_file(self.out_dir / STATE_FILE) as temporary:
            torch.save(state, temporary)
        self.editor.save_checkpoint(self.out_dir / f"editor-ep{self.episode:05d}", extra=self._training_facts())

    def _data_state(self) -> dict[str, Any]:
        """The first lane's data order and generator (and every lane's, with several)."""
        lanes = [{"order": lane.order, "rng": lane.rng.getstate()} for lane in self.lanes]
        return {**lanes[0], **({"lanes": lanes} if len(lanes) > 1 else {})}

    def _load_state(self) -> None:
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {self.out_dir}; nothing to resume from")
        try:
            state = torch.load(path, weights_only=True)
        except Exception as exc:  # a truncated or damaged file: EOFError, RuntimeError, UnpicklingError, ...
            raise RuntimeError(f"--resume: {path} cannot be read ({type(exc).__name__}: {exc}); it is truncated or "
                               f"damaged. The editor-ep* checkpoints in {self.out_dir} still hold the trained "
                               "editors: restart from the newest with --init") from exc
        n_requests = state.get("n_requests")
        if n_requests is not None and n_requests != len(self.requests):
            raise ValueError(f"--resume: the run in {self.out_dir} trained on {n_requests} records, this one was given "
                             f"{len(self.requests)}; resume with the same data and --limit")
        if any(i >= len(self.requests) for saved in state.get("lanes", [state]) for i in saved["order"]):
            raise ValueError(f"--resume: the run in {self.out_dir} used more training records than the "
                             f"{len(self.requests)} given; resume with the same data and --limit")
        saved_processes = len(state["ranks"]) if "ranks" in state else 1
        if saved_processes != self.processes:
            raise ValueError(f"--resume: the run in {self.out_dir} was trained by {saved_processes} process(es); "
                             f"resume it with as many (this is {self.processes}), or start a new run with --init")
        own = state["ranks"][self.rank] if "ranks" in state else state
        lanes = own.get("lanes", [{"order": own["order"], "rng": own["rng"]}])
        if len(lanes) != len(self.lanes):
            raise ValueError(f"--resume: the run in {self.out_dir} ran {len(lanes)} episode(s) per step in each "
                             f"process; resume it with as many (train.episodes_per_step is {len(self.lanes)})")
        for lane, saved in zip(self.lanes, lanes):
            lane.order = list(saved["order"])
            lane.rng.setstate(saved["rng"])
        self.episode, self.global_step = state["episode"], state["global_step"]
        self.first_loss, self.best_score = state.get("first_loss"), state.get("best_score")
        torch.set_rng_state(own["torch_rng"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop the log records of episodes after the checkpoint being resumed (they are run again)."""
        path = self.out_dir / LOG_FILE
        if not self.main or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("episode", 0) <= self.episode]
        if len(kept) != len(lines):
            write_text_atomically(path, "".join(line + "\n" for line in kept))
