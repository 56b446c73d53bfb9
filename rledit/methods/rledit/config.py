"""Hyper-parameters of the RLEdit editor (the network and the update) and of its RL trainer.

The symbols are those of ALGORITHM.md §3–§5. MALMEN is the same editor trained on single independent steps
from the unedited model (T_train = 1, H = 1): :class:`MALMENHparams` only changes those defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from rledit.methods.memit.contexts import check_context_lengths
from rledit.methods.memit.corpus import PARAPHRASE_SOURCES

NORMALIZER_MODES = ("frozen", "lifelong")
LOC_REFERENCES = ("previous", "unedited")
BACKTRACKING = ("window", "sampled")
GEN_OBJECTIVES = ("ce", "margin")
LOC_OBJECTIVES = ("kl", "margin")
KEY_POSITIONS = ("answer", "answer+subject", "subject")
CORPUS_POSITIONS = ("all", "answers", "subjects")
REFINE = ("network", "gradient")


@dataclass
class TrainHparams:
    """How the hypernetwork is trained over edit sequences (ALGORITHM.md §5).

    Attributes:
        episodes: number of episodes; each starts from the unedited model (deltas reset).
        steps_per_episode: T_train, edit steps per episode.
        batch: B, edit requests per step.
        back_depth: H, how many past steps (the current one included) the loss at step t looks back on.
        time_decay: γ, weight γ^j of the step j steps in the past.
        loc_coef: α, weight of the locality KL.
        reg_coef: μ, weight of Σ_m ||ΔW_m||²_F (differentiable).
        loc_reference: the locality KL's reference model: the weights before this step ("previous", as
            published) or the unedited model ("unedited").
        update_every: take an optimiser step every this many edit steps (1 = every step).
        meta_lr: Adam learning rate of the network weights (A, B, biases, scale/shift embeddings); 0 holds the
            network where it starts (e.g. the identity of an untrained editor), so that only the scalars learn.
        scalar_meta_lr: Adam learning rate of the per-module log step sizes, ridge λ and the solve's β, α, which
            live on a log scale and need larger steps than the network weights; 0 holds them where they start
            (e.g. scalars chosen on a validation stream, with only the network trained).
        grad_clip: max global gradient norm before each optimiser step.
        checkpoint_every: save a checkpoint every this many episodes.
        seed: seeds the data order and the network's initialisation.
        train_data: a dataset name known to ``rledit.data`` or a path to a record file of the training split.
        use_edit_prompt_loss: also put the edit prompts' target cross-entropy into CE_gen (not only the
            rephrase prompts).
        backtracking: which earlier steps the loss at step t covers besides the newest: "window" (the last
            ``back_depth`` - 1 steps, weighted γ^j, as published) or "sampled" (``back_samples`` steps drawn
            uniformly without replacement from ALL earlier steps of the episode; their mean loss, an unbiased
            estimate of the mean over every earlier step, enters with weight ``past_weight``: an edit made 40
            steps ago stays in the loss at a fixed cost per step).
        back_samples: k, the number of earlier steps sampled per step ("sampled" backtracking).
        past_weight: the weight of the sampled earlier steps' mean loss ("sampled" backtracking).
        warm_start_max: start each episode from a model already carrying m steps applied by the current editor
            without gradients, m drawn uniformly from 0..warm_start_max (0: always from the unedited model), so
            that the editor trains on the states it meets late in a lifelong run.
        validation_size: hold out this many requests of the training split (the last ones of a seeded shuffle;
            never trained on) as a validation stream; 0: no validation.
        validate_every: score the validation stream before the first episode (the starting editor), every
            this many episodes and after the last; the best scoring editor is saved as ``editor-best``.
        validation_batch: edits per step of the validation stream (its length is validation_size / this).
        relation_locality: add to each step's locality prompts, per zsRE request, a training record of the same
            question template about another subject (from the "train" half of :mod:`rledit.eval.relations`; the
            protocol scores the other half), so the editor learns not to spill onto same-relation prompts.
        gen_objective: what the generalization term asks of each rephrase (and edit) prompt: "ce", the new
            target's cross-entropy (as published), or "margin", the hinge max(0, m - (log p(new) - log p(old)))
            on the mean per-token log-probabilities of the new and the old target (CounterFact's requests carry
            the old one as ``ground_truth``): an edit that already wins by ``gen_margin`` is not pushed further.
        gen_margin: m, the margin (nats per token) of the "margin" objective.
        loc_objective: what the locality term asks at each locality answer position: "kl", KL(p_unedited || p)
            over the whole next-token distribution, or "margin", that the unedited model's argmax token keep its
            lead over every other token: max(0, min(loc_margin, r) - d), d its lead in log-probability under the
            edited model, r under the unedited one (zero while the argmax keeps its lead; what argmax-agreement
            locality reads, and nothing of the rest of the distribution).
        loc_margin: the lead (nats) the "margin" locality objective protects at most.
        differentiable_passes: with ``method.passes`` > 1, keep each later pass's features (keys, and the
            gradients by a second-order backward) differentiable in the earlier passes' updates, so the
            meta-gradient sees how the later passes react to the first; False: they are read detached (cheaper,
            but the gradient then credits the first pass with changes the later passes undo).
        loss_rows: the fraction of each step's generalization rows, and of its locality rows, that its losses read
            (drawn uniformly without replacement once per step, when it is tokenised, at least one row of each,
            and rescaled so that each loss is an unbiased estimate of the one over every row): the rows' cached
            states and the loss's forward and backward, most of a training step, cost about that fraction (1:
            every row, as published).
        diverge_factor: stop training when an episode's mean loss is non-finite or above this multiple of the
            first episode's (0: never stop).
        distinct_episodes: under several processes (data-parallel training, ``accelerate launch``), each process
            draws its own episodes (rank 0 those of a single process); False: every process draws rank 0's,
            which must reproduce a single process (a check of the averaging).
        episodes_per_step: R, episodes one process runs side by side: their steps are taken in lockstep, each
            on its own model state (delta store and key memory), the normaliser folds in all of their features
            and every optimiser step takes the mean of their gradients, exactly as R processes with one episode
            each would (1: one episode at a time). Lane r of process p draws the episodes that process
            p·R + r of a data-parallel run would.
    """

    episodes: int = 100
    steps_per_episode: int = 20
    batch: int = 20
    back_depth: int = 10
    time_decay: float = 0.95
    loc_coef: float = 0.6
    reg_coef: float = 1e-4
    loc_reference: Literal["previous", "unedited"] = "previous"
    update_every: int = 1
    meta_lr: float = 1e-5
    scalar_meta_lr: float = 1e-3
    grad_clip: float = 1.0
    checkpoint_every: int = 10
    seed: int = 0
    train_data: str = "zsre"
    use_edit_prompt_loss: bool = True
    backtracking: Literal["window", "sampled"] = "window"
    back_samples: int = 3
    past_weight: float = 1.0
    warm_start_max: int = 0
    validation_size: int = 0
    validate_every: int = 1
    validation_batch: int = 20
    relation_locality: bool = False
    gen_objective: Literal["ce", "margin"] = "ce"
    gen_margin: float = 1.0
    loc_objective: Literal["kl", "margin"] = "kl"
    loc_margin: float = 1.0
    differentiable_passes: bool = False
    loss_rows: float = 1.0
    diverge_factor: float = 0.0
    distinct_episodes: bool = True
    episodes_per_step: int = 1

    def __post_init__(self) -> None:
        for name in ("episodes", "steps_per_episode", "batch", "back_depth", "update_every", "checkpoint_every",
                     "episodes_per_step"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _require(0.0 < self.time_decay <= 1.0, f"train.time_decay must be in (0, 1], got {self.time_decay}")
        for name in ("back_samples", "validate_every", "validation_batch"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warm_start_max", "validation_size"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.validation_size % self.validation_batch == 0,
                 f"train.validation_size ({self.validation_size}) must be a multiple of train.validation_batch "
                 f"({self.validation_batch})")
        _require(self.backtracking in BACKTRACKING,
                 f"train.backtracking must be one of {BACKTRACKING}, got {self.backtracking!r}")
        _require(self.gen_objective in GEN_OBJECTIVES,
                 f"train.gen_objective must be one of {GEN_OBJECTIVES}, got {self.gen_objective!r}")
        _require(self.loc_objective in LOC_OBJECTIVES,
                 f"train.loc_objective must be one of {LOC_OBJECTIVES}, got {self.loc_objective!r}")
        for name in ("loc_coef", "reg_coef", "past_weight", "diverge_factor", "gen_margin", "loc_margin"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _require(0 < self.loss_rows <= 1, f"train.loss_rows must be in (0, 1], got {self.loss_rows}")
        _require(self.grad_clip > 0, f"train.grad_clip must be > 0, got {self.grad_clip}")
        for name, held in (("meta_lr", "the network"), ("scalar_meta_lr", "the scalars")):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0 (0: {held} held), got {getattr(self, name)}")
        _require(self.meta_lr > 0 or self.scalar_meta_lr > 0,
                 "train.meta_lr and train.scalar_meta_lr are both 0: nothing would be trained")
        _require(
            self.loc_reference in LOC_REFERENCES,
            f"train.loc_reference must be one of {LOC_REFERENCES}, got {self.loc_reference!r}",
        )


@dataclass
class RLEditHparams:
    """The RLEdit editor: hypernetwork shape, initial step size and ridge strength, normaliser mode.

    Attributes:
        name: the method name these hparams belong to.
        rank: r, inner width of each hypernetwork block (parameters per block and shape: 2·r·(d_in + d_out)).
        n_blocks: number of residual blocks (0 = no network: the plain gradient-like editor).
        lr_init: initial per-module step size lr[m] of the value shifts d_i = -lr·<k_i, k~_i>·g~_i. With the
            identity network d_i = -lr·||k_i||²·g_i, the output shift of one gradient step of size lr on W.
            g_i is the gradient of the token's own cross-entropy (the step's summed answer-token loss, see
            rledit.hooks), so lr does not depend on the batch size; tune it per model. The default 0.05 was
            measured on SmolLM2-135M (layers 24-27 gate/up, one step of 20 zsRE edits, untrained): efficacy
            52.5 / generalization 51.5 / locality 96.7 (zsre-token-acc@1); 0.1 gives 59.5 / 59.3 / 90.6 and
            0.2 gives 71.0 / 64.1 / 80.0.
        lambda_init: initial per-module ridge log-strength λ[m] (the solve adds e^λ·I).
        normalizer: "frozen" (feature statistics from training only) or "lifelong" (also updated with every
            edit step's features before they are normalised).
        memory_init: initial β[m] of the memory-aware solve (ALGORITHM.md §4b): the weight of the keys of all
            earlier applied steps, ΔW_t = (K_tᵀK_t + e^λ I + β C_mem + α C_0)⁻¹ K_tᵀ D_t. Learned on a log scale;
            0 (the default) turns the memory off and gives the plain solve of §4 exactly.
        corpus_init: initial α[m], the weight of C_0 = E[k kᵀ], the key second moment over ``corpus`` (the
            statistics MEMIT/AlphaEdit use, computed once and cached); 0 (default) leaves C_0 out.
        corpus: the text C_0 is estimated on (see MEMIT's ``corpus``); used only when corpus_init > 0.
        stats_samples: how many corpus texts C_0 is estimated on.
        stats_max_length: corpus texts are cut to this many tokens; stats_batch_size: texts per forward pass
            while C_0 is estimated (the cache file depends on the first, not on the second).
        corpus_positions: which tokens of each corpus text C_0 counts: "all" (default); "answers", only the
            positions an edit's features would be read at had the text been an edit (its question's last token
            and its answer's tokens), for the question-answer corpora (zsre-train-questions, zsre-train-facts,
            counterfact-train-facts): the keys where other facts are read out, which an edit must leave alone;
            "subjects", only each text's subject's last token, for the subject corpora (zsre-train-subjects,
            counterfact-train-subjects): the keys of other subjects, where a subject-keyed edit writes.
        corpus_rank: keep only C_0's leading ``corpus_rank`` eigen-directions (None, the default: all of it), so
            that α weighs what the corpus keys share (e.g. what every subject's key has in common) and leaves
            the directions particular to one key free.
        invariance_weight: w > 0 adds to C_0 the second moment C_inv of how a paraphrase moves the edited
            modules' inputs at the answer positions, or at the subject's last token when ``key_positions`` is
            "subject" (``invariance``, pairs of training prompts and their paraphrases;
            :func:`rledit.methods.memit.stats.load_or_compute_invariance`), scaled to w times C_0's trace: the
            corpus penalty becomes α(C_0 + w·(tr C_0 / tr C_inv)·C_inv), so each edit is written along directions
            a paraphrase does not move and carries over to it. Needs corpus_init > 0. 0 (default): off.
        memory_paraphrases: γ ≥ 0: the key memory also holds, around each remembered key, the paraphrase shifts
            C_inv (``invariance``) of training pairs, as if every old edit had been asked in a cloud of
            paraphrases: C_mem + γ·n·C_inv, n the keys remembered (C_inv is a mean per key), so a later edit keeps
            the outputs at the old edits' paraphrases too, not only at their own prompts. Needs memory_init > 0.
            0 (default): off.
        invariance: the pairs C_inv is estimated on ("zsre-train-rephrases" or "counterfact-train-rephrases",
            the "train" half of the training split); invariance_samples: how many pairs.
        passes: edit passes per step at edit time (rledit.methods.rledit.method, step 5). Pass 1 is the update above; each further
            pass captures the step's features again on the model with the passes so far applied and adds the
            update of what is still missing, through the same solve (rank ≤ passes·N). 1 (default) is the
            published single-pass editor; training always uses one pass.
        refine: what computes the value shifts of the passes after the first: "network" (the hypernetwork, as
            in pass 1) or "gradient" (the plain gradient-like shifts d_i = -lr·||k_i||²·g_i with the module's
            learned step size: the network was trained on first-pass features, and on the small residual
            gradients of later passes its output keeps a bias that adds up over passes).
        refine_layers: the layers the passes after the first write, a subset of the edited ones (empty, the
            default: all of them). E.g. ``[24, 25, 26, 27]`` for an editor of layers 20-27: pass 1 writes all
            eight, and each later pass runs only layers 24 and up (what enters layer 24, pass 1's update of 20-23
            included, is computed once per step) and fits what is left there: the cost of the later passes of a
            four-layer editor with the first pass of an eight-layer one.
        key_positions: where a step's features (keys and value-gradients) are read: "answer" (default, the
            published editor: the positions that predict the answer tokens, so the last prompt token carries
            most of an edit) or "answer+subject" (also each edit's subject's last token, the position
            locate-then-edit methods write at, which the edit's paraphrases share and unrelated prompts lack;
            every edit then needs a subject that occurs in its prompt), or "subject" (there only, as
            locate-then-edit methods do).
        pass_positions: the key positions of each pass after the first (one entry per further pass, so
            ``passes - 1`` of them), e.g. ``[subject, subject, answer]``: write where paraphrases share the
            keys first, then fit what is left at the answer positions. Empty (default): ``key_positions``.
        context_lengths: context prefixes as MEMIT/AlphaEdit use them (:mod:`rledit.methods.memit.contexts`,
            ``[tokens, count]`` pairs of texts sampled from the model once and cached): each edit's features are
            read from its bare prompt and from the prompt after every prefix, one row each, so every pass fits
            the edit in all those contexts (rows = edits × (1 + prefixes)). ``[]`` (default): the bare prompt.
        context_seed, context_top_k: the prefixes' sampling seed and top-k (as MEMIT's).
        contrast_subjects: at edit time, each edit's prompt is also read with ``contrast_subjects`` other subjects
            in its subject's place (those of the step's next edits, in turn), continued by the edit's new target:
            prompts that look like the edit but must not take it (CounterFact's neighbourhood, zsRE's
            same-relation questions). Their keys, at the edit's key positions, join the step's solve as rows
            whose outputs must not move, weighted by ``contrast_weight``: A grows by w·K_cᵀK_c for the step's
            passes. 0 (default): none. Every edit's subject must occur in its prompt.
        contrast_weight: w, the weight of a contrast row against an edit row (1: as much as keeping it).
        rehearsal: at edit time, the passes after the first also read this many earlier edits (drawn without
            replacement from every applied step's requests, once per step, by a generator seeded with the number
            of steps applied) as extra rows: each pulls its edit back toward its own target by as much as it has
            lost since it was written (an edit that still holds has a near-zero gradient and moves nothing), so
            every step also repairs what the steps since an old edit took from it. Their keys do not join the key
            memory. Needs passes > 1. 0 (default): off.
        device: where the hypernetwork, its key memory and C_0 live and the solve runs, e.g. ``cuda:0``
            (None: the device of the model's first parameter). Features come to it from each edited module's
            device and the factors go back to that module's device, so a model placed across devices with a
            device map can keep the editor on one of them.
    """

    name: str = "rledit"
    rank: int = 256
    n_blocks: int = 2
    lr_init: float = 0.05
    lambda_init: float = 0.0
    normalizer: Literal["frozen", "lifelong"] = "lifelong"
    memory_init: float = 0.0
    corpus_init: float = 0.0
    corpus: str = "sst2"
    stats_samples: int = 2000
    stats_max_length: int = 128
    stats_batch_size: int = 32
    corpus_positions: Literal["all", "answers", "subjects"] = "all"
    corpus_rank: int | None = None
    invariance_weight: float = 0.0
    memory_paraphrases: float = 0.0
    invariance: str = "zsre-train-rephrases"
    invariance_samples: int = 2000
    passes: int = 1
    refine: Literal["network", "gradient"] = "network"
    refine_layers: list[int] = field(default_factory=list)
    key_positions: Literal["answer", "answer+subject", "subject"] = "answer"
    pass_positions: list[str] = field(default_factory=list)
    context_lengths: list[list[int]] = field(default_factory=list)
    context_seed: int = 0
    context_top_k: int = 5
    contrast_subjects: int = 0
    contrast_weight: float = 1.0
    rehearsal: int = 0
    device: str | None = None
    train: TrainHparams = field(default_factory=TrainHparams)

    def __post_init__(self) -> None:
        if isinstance(self.train, Mapping):
            self.train = TrainHparams(**self.train)
        _require(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        _require(self.n_blocks >= 0, f"n_blocks must be >= 0, got {self.n_blocks}")
        _require(self.lr_init > 0, f"lr_init must be > 0 (it is learned on a log scale), got {self.lr_init}")
        for name in ("memory_init", "corpus_init"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0 (0 turns the term off), got {getattr(self, name)}")
        _require(self.passes >= 1, f"passes must be >= 1, got {self.passes}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got "
                                 f"{self.device!r} ({exc})") from None
        _require(self.refine in REFINE, f"refine must be one of {REFINE}, got {self.refine!r}")
        _require(self.key_positions in KEY_POSITIONS,
                 f"key_positions must be one of {KEY_POSITIONS}, got {self.key_positions!r}")
        self.pass_positions = list(self.pass_positions)
        _require(all(p in KEY_POSITIONS for p in self.pass_positions),
                 f"pass_positions must hold entries of {KEY_POSITIONS}, got {list(self.pass_positions)}")
        _require(not self.pass_positions or len(self.pass_positions) == self.passes - 1,
                 f"pass_positions names the passes after the first: {self.passes - 1} entries for passes = "
                 f"{self.passes}, got {len(self.pass_positions)}")
        self.refine_layers = [int(layer) for layer in self.refine_layers]
        self.context_lengths = [list(pair) for pair in self.context_lengths]
        check_context_lengths(self.context_lengths)
        _require(self.context_top_k >= 1, f"context_top_k must be >= 1, got {self.context_top_k}")
        _require(self.contrast_subjects >= 0, f"contrast_subjects must be >= 0, got {self.contrast_subjects}")
        _require(self.rehearsal >= 0, f"rehearsal must be >= 0 (0 turns it off), got {self.rehearsal}")
        _require(self.rehearsal == 0 or self.passes > 1,
                 "rehearsal adds earlier edits to the passes after the first: it needs passes > 1")
        _require(self.contrast_weight > 0, f"contrast_weight must be > 0, got {self.contrast_weight}")
        _require(self.corpus_positions in CORPUS_POSITIONS,
                 f"corpus_positions must be one of {CORPUS_POSITIONS}, got {self.corpus_positions!r}")
        _require(self.corpus_rank is None or self.corpus_rank >= 1,
                 f"corpus_rank must be >= 1 or None (all of C_0), got {self.corpus_rank}")
        _require(self.invariance_weight >= 0, f"invariance_weight must be >= 0 (0 turns it off), got "
                                              f"{self.invariance_weight}")
        _require(self.invariance_weight == 0 or self.corpus_init > 0,
                 "invariance_weight joins the corpus penalty α(C_0 + w·C_inv): it needs corpus_init > 0")
        _require(self.memory_paraphrases >= 0, f"memory_paraphrases must be >= 0 (0 turns it off), got "
                                               f"{self.memory_paraphrases}")
        _require(self.memory_paraphrases == 0 or self.memory_init > 0,
                 "memory_paraphrases widens the key memory β C_mem: it needs memory_init > 0")
        _require(self.invariance in PARAPHRASE_SOURCES,
                 f"invariance must be one of {PARAPHRASE_SOURCES}, got {self.invariance!r}")
        for name in ("stats_samples", "stats_max_length", "stats_batch_size", "invariance_samples"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.normalizer in NORMALIZER_MODES,
            f"normalizer must be one of {NORMALIZER_MODES}, got {self.normalizer!r}",
        )


@dataclass
class MALMENHparams(RLEditHparams):
    """MALMEN: the RLEdit editor trained on single independent steps from the unedited model.

    2000 one-step episodes take as many optimiser steps as RLEdit's default 100 episodes × 20 steps."""

    name: str = "malmen"
    train: TrainHparams = field(
        default_factory=lambda: TrainHparams(episodes=2000, steps_per_episode=1, back_depth=1)
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
