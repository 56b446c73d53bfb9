"""Hyper-parameters of the locate-then-edit methods: MEMIT here, AlphaEdit (which adds its own) on top.

:class:`LocateEditHparams` holds what both share: the corpus whose key statistics stand for the knowledge to
preserve, and the optimisation of each edit's target value. :class:`MEMITHparams` adds MEMIT's weight of the
preserved-key covariance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rledit.methods.memit.contexts import check_context_lengths


@dataclass
class LocateEditHparams:
    """Settings shared by MEMIT and AlphaEdit.

    Attributes:
        corpus: text whose key statistics C = E[k kᵀ] are estimated at every edited module: ``"sst2"`` (the
            bundled English sentences, ``data/corpus/sst2_sentences.txt.gz``), a text file (one text per line,
            ``.txt`` or ``.txt.gz``; ``.jsonl``/``.jsonl.gz`` with a ``corpus_column`` field), a folder saved
            with ``datasets.Dataset.save_to_disk``, or a ``datasets`` dataset name. Never the edit benchmark.
            Also ``zsre-train-questions``, ``zsre-train-facts`` and ``counterfact-train-facts`` (built from the bundled training
            splits' "train" half), ``zsre-train-subjects`` and ``counterfact-train-subjects`` (the same half's
            prompts and paraphrases, each knowing where its subject ends), ``model-samples`` (text the model writes itself, standing for its
            pre-training text: :mod:`rledit.methods.memit.samples`), and mixes ``a+b+...`` of any of these,
            their texts taken in turn.
        corpus_split: the split read from a ``datasets`` corpus.
        corpus_column: the text column of a ``datasets`` or ``.jsonl`` corpus.
        stats_samples: how many texts (the first ones of the corpus) the statistics are estimated on. The
            default 2000 SST-2 sentences are about 31k tokens (20 per input dimension of SmolLM2's
            down_proj), computed in about 3 minutes on one CPU thread and then cached.
        stats_tokens: stop after this many tokens of the corpus (None: all ``stats_samples`` texts); results
            files record the count used (``method_setup.statistics.n_tokens``).
        stats_max_length: texts are cut to this many tokens.
        stats_batch_size: texts per forward pass while estimating the statistics.
        v_steps: Adam steps optimising each edit's residual shift δ at the last edited layer.
        v_lr: Adam learning rate of δ. With 25 steps on SmolLM2-135M, 0.5 leaves the target cross-entropy near
            1.2 and 1.5 brings it near 0.1. 1.5 lands more of each step (one step of 20 zsRE edits at layers
            24-27: efficacy 79% instead of under 50%) but drives a long sequence into collapse (after 1,000
            edits efficacy 1% and locality 4%; benchmarks/results/tuning), so the default is 0.5.
        v_weight_decay: weight of ||δ|| / ||h||² in δ's loss (h: the residual at the subject's last token; the
            published form, the norm over the squared norm).
        clamp_norm_factor: after every step ||δ|| is clamped to this times ||h||.
        kl_factor: weight of the KL term that keeps the prediction after ``kl_prompt`` (the subject's
            "essence") unchanged while δ is optimised.
        kl_prompt: the essence prompt, ``{}`` standing for the subject.
        early_stop_loss: an edit's δ stops once its loss (cross-entropy + KL + decay) is below this.
        context_lengths: the context prefixes (:mod:`rledit.methods.memit.contexts`): ``[tokens, count]``
            pairs, each asking for ``count`` texts of ``tokens`` tokens sampled from the model. Every edit's key
            is averaged over its bare prompt and the prompt after each prefix, and δ is optimised on all of
            them. The published MEMIT/AlphaEdit setting is ``[[10, 5]]`` (five 10-token prefixes); ``[]``
            uses the bare prompt only, as the committed rows under ``benchmarks/results/bare-prompts/`` do.
        context_seed: seed of the prefixes' sampling.
        context_top_k: the prefixes are sampled from the model's ``context_top_k`` most likely next tokens.
    """

    corpus: str = "sst2"
    corpus_split: str = "train"
    corpus_column: str = "text"
    stats_samples: int = 2000
    stats_tokens: int | None = None
    stats_max_length: int = 128
    stats_batch_size: int = 32
    v_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    early_stop_loss: float = 0.05
    context_lengths: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    context_seed: int = 0
    context_top_k: int = 5

    def __post_init__(self) -> None:
        if self.stats_tokens is not None and self.stats_tokens < 1:
            raise ValueError(f"stats_tokens must be >= 1 or null (every token), got {self.stats_tokens}")
        check_context_lengths(self.context_lengths)
        for name in ("stats_samples", "stats_max_length", "stats_batch_size", "v_steps", "context_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("v_lr", "clamp_norm_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "early_stop_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_prompt.count("{}") != 1:
            raise ValueError(f"kl_prompt must contain '{{}}' exactly once (the subject), got {self.kl_prompt!r}")
        if not self.corpus.strip():
            raise ValueError("corpus must name a corpus (e.g. 'sst2'), a text file, or a datasets dataset")


@dataclass
class MEMITHparams(LocateEditHparams):
    """MEMIT: ΔW = (λ·C + KᵀK)⁻¹ Kᵀ R per edited layer, R the layer's share of the residual targets.

    Attributes:
        name: the method name these hparams belong to.
        cov_weight: λ, how many "tokens' worth" the preserved-key covariance C weighs against the step's keys
            (MEMIT's mom2_update_weight). An edit key k reaches the fraction s/(1+s) of its residual, with
            s = kᵀC⁻¹k/λ ~ d_in/λ, so λ shrinks with the model width: the published 15000 suits d_in = 16384;
            on SmolLM2-135M (d_in 1536, layers 18-21, 2 steps of 5 zsRE edits) 15000 gives efficacy 16%,
            the default 1000 gives 64% with locality 90%, 200 gives 65% / 88%.
    """

    name: str = "memit"
    cov_weight: float = 1000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cov_weight <= 0:
            raise ValueError(f"cov_weight must be > 0, got {self.cov_weight}")
