"""Task 2, bias mitigation: reduce a toxicity classifier's identity-term bias while keeping its accuracy.

The classifier (hashed word uni/bigrams → mean embedding bag → ``head.fc1`` → ReLU → ``head.fc2``) is trained here
on the Davidson et al. tweets (toxic = hate speech or offensive) and cached; only the linear head is edited.
Bias is measured on the identity-template ("madlibs") sentences of Dixon et al. 2018, grouped by the identity
term they contain. The metric, ``identity_equality_gap`` (points, lower is better), is Dixon et al.'s false
positive / false negative equality difference averaged over identity terms:
mean over terms t of (|FPR_t − FPR| + |FNR_t − FNR|) / 2, at threshold 0.5. Sentences are split by frame
(the sentence with its identity term blanked): edits and their evaluators only see the "edit" half; the
reported ``bias_gap`` is on the other half. The reported ``accuracy`` is on a held-out tenth of the tweets.
See ``data/bias/SOURCES.md`` for the data files.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from rledit.data.files import data_dir
from rledit.deltas import DeltaStore
from rledit.worlds.baselines import optimise_layers
from rledit.worlds.cache import cached_model
from rledit.worlds.tasks import BaselineSettings, WorldTask

WORD = re.compile(r"[a-z0-9']+")
DAVIDSON_FILE, MADLIBS_FILE, TERMS_FILE = (
    "davidson_labeled_data.csv.gz", "bias_madlibs_77k.csv.gz", "identity_terms_adjectives_people.txt.gz")
SPLIT_SEED = 0  # the tweets' train/validation/test split is fixed, whatever the run's seed


@dataclass
class BiasSettings:
    """Settings of the bias task (classifier, edit data, surrogate weights, goal on validation)."""

    buckets: int = 1 << 17
    embed_dim: int = 128
    hidden: int = 128
    epochs: int = 3
    lr: float = 3e-3
    batch: int = 64
    edit_frames: int = 400
    frame_batch: int = 64
    utility_pool: int = 4000
    utility_batch: int = 512
    invariance_weight: float = 1.0
    template_weight: float = 1.0
    goal_gap_drop: float = 0.07
    max_accuracy_drop: float = 0.015


class HashedTextClassifier(nn.Module):
    """Mean of hashed n-gram embeddings (``embedding``) followed by a two-layer linear ``head``."""

    def __init__(self, buckets: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.buckets = buckets
        self.embedding = nn.EmbeddingBag(buckets, embed_dim, mode="mean", sparse=True)
        self.head = nn.Sequential(OrderedDict(fc1=nn.Linear(embed_dim, hidden), relu=nn.ReLU(), fc2=nn.Linear(hidden, 2)))

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, offsets) of lower-cased word unigrams and bigrams hashed into ``buckets`` (crc32)."""
        ids, offsets = [], []
        for text in texts:
            words = WORD.findall(text.lower())
            grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)] or [""]
            offsets.append(len(ids))
            ids += [zlib.crc32(g.encode()) % self.buckets for g in grams]
        return torch.tensor(ids), torch.tensor(offsets)

    def embed(self, texts: list[str], chunk: int = 4096) -> torch.Tensor:
        """The frozen pooled embeddings (N, embed_dim) that the editable head reads."""
        with torch.no_grad():
            return torch.cat([self.embedding(*self.encode(texts[i:i + chunk])) for i in range(0, len(texts), chunk)])

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Logits (N, 2) (index 1 = toxic) for a list of texts."""
        return self.head(self.embedding(*self.encode(texts)))


def read_data() -> tuple[list[str], torch.Tensor, list[dict], list[str]]:
    """(tweets, toxic labels, madlibs rows, identity terms) from the bundled ``data/bias`` files."""
    folder = data_dir() / "bias"
    for name in (DAVIDSON_FILE, MADLIBS_FILE, TERMS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; the bias data ships in the repository's data/bias")
    with gzip.open(folder / DAVIDSON_FILE, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    tweets, toxic = [r["tweet"] for r in rows], torch.tensor([r["class"] != "2" for r in rows])
    with gzip.open(folder / MADLIBS_FILE, "rt", encoding="utf-8") as f:
        madlibs = list(csv.DictReader(f))
    with gzip.open(folder / TERMS_FILE, "rt", encoding="utf-8") as f:
        terms = [line.strip() for line in f if line.strip()]
    return tweets, toxic, madlibs, terms


def identity_groups(madlibs: list[dict], terms: list[str]) -> tuple[list[int], list[str], list[str], list[int]]:
    """For madlibs rows naming an identity: (row indices, identity term, frame, is-edit-half flag)."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)) + r")\b")
    rows, idents, frames, halves = [], [], [], []
    for i, row in enumerate(madlibs):
        text = row["Text"].lower()
        match = pattern.search(text)
        if match:
            frame = pattern.sub("{}", text, count=1)
            rows.append(i), idents.append(match.group(1)), frames.append(frame)
            halves.append(zlib.crc32(frame.encode()) % 2 == 0)
    return rows, idents, frames, halves


def equality_gap(toxic_prob: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """Per-term FPR/FNR equality differences (points) and the overall FPR/FNR, at threshold 0.5."""
    pred = toxic_prob > 0.5
    fpr, fnr = pred[~labels].float().mean(), (~pred[labels]).float().mean()
    fpr_dev, fnr_dev = [], []
    for g in groups.unique():
        member = groups == g
        neg, pos = member & ~labels, member & labels
        if neg.any() and pos.any():
            fpr_dev.append((pred[neg].float().mean() - fpr).abs())
            fnr_dev.append(((~pred[pos]).float().mean() - fnr).abs())
    fpr_gap, fnr_gap = 100 * float(torch.stack(fpr_dev).mean()), 100 * float(torch.stack(fnr_dev).mean())
    return {"bias_gap": (fpr_gap + fnr_gap) / 2, "fpr_gap": fpr_gap, "fnr_gap": fnr_gap,
            "madlibs_fpr": 100 * float(fpr), "madlibs_fnr": 100 * float(fnr)}


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC (percent) by the rank-sum formula."""
    ranks = torch.empty(len(scores))
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=torch.float32)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return 100 * float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train_classifier(model: HashedTextClassifier, texts: list[str], labels: torch.Tensor, s: BiasSettings, seed: int) -> None:
    """Adam on the head, SparseAdam on the embedding table, cross-entropy, ``s.epochs`` epochs."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.optim.Adam(model.head.parameters(), lr=s.lr)
    sparse = torch.optim.SparseAdam(list(model.embedding.parameters()), lr=s.lr)
    for _ in range(s.epochs):
        order = torch.randperm(len(texts), generator=generator).tolist()
        for start in range(0, len(order), s.batch):
            batch = order[start:start + s.batch]
            loss = F.cross_entropy(model([texts[i] for i in batch]), labels[batch].long())
            dense.zero_grad(), sparse.zero_grad()
            loss.backward()
            dense.step(), sparse.step()


def build_bias_task(raw: dict, seed: int, where: str) -> WorldTask:
    """Train (or load) the classifier and wire the bias evaluators, surrogate and baselines."""
    from rledit.worlds.config import from_dict

    s: BiasSettings = from_dict(BiasSettings, raw, where)
    tweets, toxic, madlibs, terms = read_data()
    order = torch.randperm(len(tweets), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train, n_val = int(0.8 * len(order)), int(0.1 * len(order))
    train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    torch.manual_seed(seed)
    model = HashedTextClassifier(s.buckets, s.embed_dim, s.hidden)
    key = {"seed": seed, "buckets": s.buckets, "dim": s.embed_dim, "hidden": s.hidden, "epochs": s.epochs,
           "lr": s.lr, "batch": s.batch, "data": "davidson-80-10-10-split0"}
    cached_model("toxicity_classifier", key, model,
                 lambda m: train_classifier(m, [tweets[i] for i in train], toxic[train], s, seed))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    rows, idents, frames, halves = identity_groups(madlibs, terms)
    term_id = {t: i for i, t in enumerate(sorted(set(idents)))}
    edit_frames = sorted({f for f, h in zip(frames, halves) if h})
    chosen = set(torch.randperm(len(edit_frames), generator=torch.Generator().manual_seed(seed))[:s.edit_frames].tolist())
    chosen_frames = {edit_frames[i] for i in chosen}
    edit = [k for k, f in enumerate(frames) if f in chosen_frames]
    held = [k for k, h in enumerate(halves) if not h]

    def template_set(picks: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        texts = [madlibs[rows[k]]["Text"] for k in picks]
        labels = torch.tensor([madlibs[rows[k]]["Label"] == "BAD" for k in picks])
        return model.embed(texts), labels, torch.tensor([term_id[idents[k]] for k in picks])

    edit_x, edit_y, edit_g = template_set(edit)
    held_x, held_y, held_g = template_set(held)
    frame_index = {f: i for i, f in enumerate(sorted(chosen_frames))}
    edit_frame = torch.tensor([frame_index[frames[k]] for k in edit])
    pool = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:s.utility_pool]]
    pool_x, pool_y = model.embed([tweets[i] for i in pool]), toxic[pool].long()
    val_x, val_y = model.embed([tweets[i] for i in val]), toxic[val]
    test_x, test_y = model.embed([tweets[i] for i in test]), toxic[test]

    def toxic_prob(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(m.head(x), dim=1)[:, 1]

    def accuracy(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((toxic_prob(m, x) > 0.5) == y).float().mean())

    def utility_loss(m: nn.Module, gen: torch.Generator) -> torch.Tensor:
        rows_ = torch.randint(len(pool_y), (s.utility_batch,), generator=gen)
        return F.cross_entropy(m.head(pool_x[rows_]), pool_y[rows_])

    def template_losses(m: nn.Module, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """On ``frame_batch`` random edit frames: (cross-entropy on the template labels, the variance of the
        toxic-vs-not logit margin across identity terms within each frame)."""
        frames_ = torch.randperm(len(frame_index), generator=gen)[:s.frame_batch]
        picked = torch.isin(edit_frame, frames_).nonzero().squeeze(1)
        logits, frame = m.head(edit_x[picked]), edit_frame[picked]
        margin = logits[:, 1] - logits[:, 0]
        count = torch.zeros(len(frame_index)).index_add_(0, frame, torch.ones_like(margin)).clamp_min(1)
        mean = torch.zeros(len(frame_index)).index_add_(0, frame, margin) / count
        return F.cross_entropy(logits, edit_y[picked].long()), (margin - mean[frame]).pow(2).mean()

    def augmentation_loss(m: nn.Module, gen: torch.Generator) -> torch.Tensor:
        return utility_loss(m, gen) + template_losses(m, gen)[0]

    def surrogate(m: nn.Module, gen: torch.Generator) -> torch.Tensor:
        template, invariance = template_losses(m, gen)
        return utility_loss(m, gen) + s.template_weight * template + s.invariance_weight * invariance

    def test_metrics(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            prob = toxic_prob(m, held_x)
            return {"accuracy": 100 * accuracy(m, test_x, test_y), **equality_gap(prob, held_y, held_g),
                    "madlibs_accuracy": 100 * float(((prob > 0.5) == held_y).float().mean()),
                    "madlibs_auc": auc(prob, held_y)}

    def augment_finetune(store: DeltaStore, b: BaselineSettings, gen: torch.Generator) -> int:
        return optimise_layers(store, layers, lambda: augmentation_loss(model, gen), b.steps, b.lr)[1]

    def surrogate_finetune(store: DeltaStore, b: BaselineSettings, gen: torch.Generator) -> int:
        return optimise_layers(store, layers, lambda: surrogate(model, gen), b.steps, b.lr)[1]

    def edit_gap(m: nn.Module) -> float:
        return equality_gap(toxic_prob(m, edit_x), edit_y, edit_g)["bias_gap"] / 100

    layers = ["head.fc1", "head.fc2"]
    with torch.no_grad():
        start_gap, start_acc = edit_gap(model), accuracy(model, val_x, val_y)
    return WorldTask(
        name="bias",
        model=model,
        layers=layers,
        utility=lambda m: accuracy(m, val_x, val_y),
        task=edit_gap,
        utility_name="accuracy",
        task_name="bias_gap",
        surrogate=surrogate,
        test_metrics=test_metrics,
        met_target=lambda before, after: (before["bias_gap"] - after["bias_gap"] > 5.0
                                          and before["accuracy"] - after["accuracy"] <= 2.0
                                          and after["madlibs_auc"] >= before["madlibs_auc"]),
        target=("bias_gap improves by > 5 points and accuracy drops by <= 2 points (held-out data), and the "
                "madlibs AUC does not drop (a classifier that calls every template sentence the same has no gap)"),
        task_goal=start_gap - s.goal_gap_drop,
        utility_floor=start_acc - s.max_accuracy_drop,
        baselines={"augment_finetune": augment_finetune, "surrogate_finetune": surrogate_finetune},
        extra={"bias_metric": "identity_equality_gap", "identity_terms": len(term_id),
               "edit_sentences": len(edit), "held_out_sentences": len(held), "tweets": len(tweets)},
    )
