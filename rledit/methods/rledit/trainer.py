"""RL training of the RLEdit hypernetwork over whole edit sequences (ALGORITHM.md §5).

An episode starts from the unedited model (the delta store is reset) and applies ``steps_per_episode`` edit
steps of ``batch`` requests from the training split. At step t:

1. features (K, G) of the step's edit prompts on the current model W(t-1)   (detached: the state)
2. the action: factors (Kᵀ, Y) from the hypernetwork and the ridge solve     (carries the graph)
3. the loss with memory backtracking, evaluated with the action pending on top of W(t-1) (so on W(t)):

       L_t = Σ_{j<min(t,H)} γ^j [ CE_gen(B_{t-j}; W(t)) + α KL_loc(B_{t-j}; W_ref, W(t)) ] + μ Σ_m ||ΔW_m||²_F

   CE_gen: target cross-entropy on the rephrase (and edit) prompts; KL_loc: KL(p_ref || p_W(t)) on the
   locality prompts' answer positions, W_ref = W(t-1) ("previous") or W(0) ("unedited").
4. backward into the network, λ and the step sizes; an optimiser step every ``update_every`` steps
5. the action is applied for good (detached): W(t) = W(t-1) + ΔW_t.

No weight is ever mutated (deltas are applied by the store's hooks), the μ term is differentiable, the
optimiser steps many times, and everything is seeded. MALMEN-style training is the same loop with
``steps_per_episode = 1`` and ``back_depth = 1``.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rledit.checkpoints import read_checkpoint
from rledit.files import atomic_file
from rledit.hooks import answer_token_loss, capture_features
from rledit.methods.rledit.method import RLEditMethod, factored_frobenius_sq
from rledit.prefix import Prefix
from rledit.tokens import TokenBatch, answer_logits, encode
from rledit.types import EditRequest

LOG_FILE = "train_log.jsonl"
STATE_FILE = "trainer_state.pt"


@dataclass
class WindowStep:
    """One past edit step kept for backtracking: its tokenised prompts and cached locality references."""

    edit: TokenBatch  # edit prompts → target_new (features are taken on these)
    gen: TokenBatch  # rephrase (+ edit) prompts → target_new
    loc: TokenBatch  # locality prompts → their answers
    loc_ref: torch.Tensor | None = None  # reference log-probs at loc answer positions ("unedited" mode)


def answer_log_probs(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Log-probabilities (n_answer_tokens, vocab), fp32, of ``model`` at the answer positions of ``batch``."""
    return F.log_softmax(answer_logits(model, batch).float(), dim=-1)


def locality_kl(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over answer positions of KL(p_ref || p)."""
    return (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).mean()


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
        need = self.hp.steps_per_episode * self.hp.batch
        usable = [r for r in requests if r.rephrase_prompts and r.locality]
        if len(usable) < need:
            raise ValueError(
                f"training needs {need} requests with rephrase and locality prompts per episode "
                f"({self.hp.steps_per_episode} steps × {self.hp.batch}); the training split has {len(usable)}"
            )
        self.requests = usable
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
        self.optimizer = torch.optim.Adam(self.method.hypernet.parameter_groups(self.hp.meta_lr,
                                                                                self.hp.scalar_meta_lr))
        self.rng = random.Random(self.hp.seed)
        self.order: list[int] = []
        self.episode = 0
        self.global_step = 0

    # ------------------------------------------------------------------------------------------- the loop
    def train(self, resume: bool = False) -> Path:
        """Run all episodes (continuing from the last checkpoint with ``resume``); returns the final checkpoint."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_state()
        torch.manual_seed(self.hp.seed + self.episode)
        bar = tqdm(total=self.hp.episodes, initial=self.episode, desc="episodes", disable=not self.progress)
        start = time.perf_counter()
        while self.episode < self.hp.episodes:
            metrics = self.run_episode(self._draw_episode())
            self.episode += 1
            metrics.update(episode=self.episode, seconds=round(time.perf_counter() - start, 2))
            self._log({"kind": "episode", **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['edit_acc']:.2f}")
            bar.update()
            if self.episode % self.hp.checkpoint_every == 0 or self.episode == self.hp.episodes:
                self._save_state()
        bar.close()
        self.editor.store.reset()
        final = self.out_dir / "editor"
        self.editor.save_checkpoint(final, extra=self._training_facts())
        return final

    def run_episode(self, requests: list[EditRequest]) -> dict[str, float]:
        """One episode on a reset model: T steps, each acting, learning and then keeping its edit."""
        store, hp = self.editor.store, self.hp
        store.reset()
        window: deque[WindowStep] = deque(maxlen=hp.back_depth)
        totals: dict[str, float] = {}
        for t in range(hp.steps_per_episode):
            step_requests = requests[t * hp.batch:(t + 1) * hp.batch]
            window.appendleft(self._tokenise(step_requests))
            metrics = self.learn_step(list(window))
            self.global_step += 1
            if self.global_step % hp.update_every == 0:
                self._optimiser_step()
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / hp.steps_per_episode
        return totals

    def learn_step(self, window: list[WindowStep]) -> dict[str, float]:
        """Act on ``window[0]`` (the newest step), backpropagate L_t, then apply the action for good."""
        hp, store, model = self.hp, self.editor.store, self.editor.model
        current = window[0]
        with self._upper_layers_only():
            features = capture_features(model, self.editor.targets, current.edit)
            references = self._references(window)
            updates = self.method.compute_updates(features, self.editor.targets, update_stats=True)
            with store.pending(updates):
                gen_loss, loc_loss, edit_acc = self._backtracking_losses(window, references)
            reg = sum(factored_frobenius_sq(u, v) for u, v in updates.values())
            loss = gen_loss + hp.loc_coef * loc_loss + hp.reg_coef * reg
            (loss / hp.update_every).backward()
        store.add({name: (u.detach(), v.detach()) for name, (u, v) in updates.items()})
        return {"loss": loss.item(), "gen": gen_loss.item(), "loc": loc_loss.item(), "reg": reg.item(),
                "edit_acc": edit_acc, "pre_edit_loss": features.loss}

    def _backtracking_losses(self, window: list[WindowStep], references: list[torch.Tensor]):
        """Σ_j γ^j CE_gen and Σ_j γ^j KL_loc over the window, on the model with the action pending."""
        model = self.editor.model
        gen_loss = loc_loss = torch.zeros(())
        edit_acc = 0.0
        for j, (past, ref) in enumerate(zip(window, references)):
            weight = self.hp.time_decay ** j
            logits = answer_logits(model, past.gen)
            gen_loss = gen_loss + weight * answer_token_loss(logits, past.gen)
            if j == 0:
                labels = past.gen.labels[past.gen.answer_mask]
                edit_acc = float((logits.argmax(-1) == labels).float().mean())
            log_probs = answer_log_probs(model, past.loc)
            loc_loss = loc_loss + weight * locality_kl(ref, log_probs)
        return gen_loss, loc_loss, edit_acc

    @torch.no_grad()
    def _references(self, window: list[WindowStep]) -> list[torch.Tensor]:
        """p_ref on each window step's locality prompts: W(t-1) now ("previous") or cached W(0) ("unedited")."""
        if self.hp.loc_reference == "unedited":
            return [step.loc_ref for step in window]
        model = self.editor.model
        return [answer_log_probs(model, step.loc) for step in window]

    def _upper_layers_only(self):
        """Run only the layers from the lowest edited one on, from the batches' cached hidden states."""
        return self.prefix.skipped() if self.prefix is not None else contextlib.nullcontext()

    def _optimiser_step(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.hp.grad_clip)
        if torch.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------- the data
    def _draw_episode(self) -> list[EditRequest]:
        """The next T×B requests of a seeded shuffle of the training split (reshuffled when used up)."""
        need = self.hp.steps_per_episode * self.hp.batch
        if len(self.order) < need:
            order = list(range(len(self.requests)))
            self.rng.shuffle(order)
            self.order = order
        chosen, self.order = self.order[:need], self.order[need:]
        return [self.requests[i] for i in chosen]

    def _tokenise(self, requests: list[EditRequest]) -> WindowStep:
        tok = self.editor.tokenizer
        gen_prompts = [p for r in requests for p in r.rephrase_prompts]
        gen_targets = [r.target_new for r in requests for _ in r.rephrase_prompts]
        if self.hp.use_edit_prompt_loss:
            gen_prompts += [r.prompt for r in requests]
            gen_targets += [r.target_new for r in requests]
        loc = [pa for r in requests for pa in r.locality[:1]]
        batches = [  # left padding: answers end every row, so answer_logits projects few positions
            encode(tok, [r.prompt for r in requests], [r.target_new for r in requests], padding_side="left"),
            encode(tok, gen_prompts, gen_targets, padding_side="left"),
            encode(tok, [pa.prompt for pa in loc], [pa.answer for pa in loc], padding_side="left"),
        ]
        if self.prefix is not None:
            batches = [self.prefix.attach(batch) for batch in batches]
        step = WindowStep(*batches)
        if self.hp.loc_reference == "unedited":
            with torch.no_grad(), self.editor.store.bypassed(), self._upper_layers_only():
                step.loc_ref = answer_log_probs(self.editor.model, step.loc)
        return step

    # ------------------------------------------------------------------------------------ logs and state
    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _training_facts(self) -> dict[str, Any]:
        return {"episodes": self.episode, "optimizer_steps": self.global_step // self.hp.update_every,
                "train": asdict(self.hp), "hparams_file": self.hparams_source, "n_train_requests": len(self.requests),
                "init_from": self.init_from}

    def _save_state(self) -> None:
        """Checkpoint network, optimiser, data order and RNG so that ``resume`` continues exactly (atomic)."""
        state = {"episode": self.episode, "global_step": self.global_step, "order": self.order,
                 "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(),
                 "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict()}
        with atomic_file(self.out_dir / STATE_FILE) as temporary:
            torch.save(state, temporary)
        self.editor.save_checkpoint(self.out_dir / f"editor-ep{self.episode:05d}", extra=self._training_facts())

    def _load_state(self) -> None:
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {self.out_dir}; nothing to resume from")
        state = torch.load(path, weights_only=True)
        self.episode, self.global_step, self.order = state["episode"], state["global_step"], state["order"]
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
