"""Trained task networks cached on disk, keyed by everything that determines their weights."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from rledit.files import atomic_file

CACHE_ENV = "RLEDIT_CACHE"


def cache_dir() -> Path:
    """The rledit cache folder: ``$RLEDIT_CACHE`` if set, else ``~/.cache/rledit``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rledit"


def cached_model(kind: str, settings: dict[str, Any], model: nn.Module, train: Callable[[nn.Module], None]) -> Path:
    """Load ``model``'s weights from the cache, or ``train`` it and store them; returns the weights file.

    The file name holds a hash of ``kind`` and ``settings`` (which must include the seed and every training
    setting), so a change to any of them trains a new network. Files are written atomically.
    """
    key = hashlib.sha256(json.dumps({"kind": kind, **settings}, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "worlds"
    path = folder / f"{kind}-{key}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return path
    train(model)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata={"settings": json.dumps({"kind": kind, **settings}, sort_keys=True)})
    return path
