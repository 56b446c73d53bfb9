"""Trained editor checkpoints: a method's learned state plus what it was trained for.

A checkpoint is a folder with ``checkpoint.json`` (method, hyper-parameters, model, edited modules,
training facts) and ``checkpoint.safetensors`` (the method's ``state_dict``; no pickle). Editors shipped with
rledit live in ``rledit/editors/<name>/`` and load by name (``checkpoint="smollm2-135m-zsre"``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import rledit
from rledit.files import atomic_directory, file_sha256, read_json, read_safetensors
from rledit.methods.memory import split_memory_state
from rledit.targets import EditTarget

SHIPPED_DIR = Path(__file__).resolve().parent / "editors"
META_FILE = "checkpoint.json"
STATE_FILE = "checkpoint.safetensors"
FORMAT = "rledit-checkpoint"
VERSIONS = (1, 2)  # 2 adds state_sha256 (required from 2 on)


class CheckpointError(ValueError):
    """A checkpoint that does not exist, is damaged, or was trained for other modules."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: what to build (method, hparams, layers, modules) and the state to load into it."""

    path: Path
    method: str
    hparams: dict[str, Any]
    model: str
    layers: list[int]
    modules: list[str]
    targets: list[list[Any]]
    state: dict[str, torch.Tensor]
    extra: dict[str, Any]

    def check_targets(self, targets: Sequence[EditTarget]) -> None:
        """Raise unless ``targets`` are exactly the modules (names and shapes) this editor was trained for."""
        current = [[t.name, t.d_in, t.d_out] for t in targets]
        if current != self.targets:
            raise CheckpointError(
                f"checkpoint {self.path} was trained for modules {self.targets} of {self.model!r}; "
                f"this model's modules are {current}. Use a checkpoint trained for this model."
            )


def shipped_checkpoints() -> list[str]:
    """Names of the editors that ship with rledit."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / META_FILE).is_file())


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """The folder of a shipped checkpoint name or of a checkpoint path."""
    path = Path(name_or_path)
    if (path / META_FILE).is_file():
        return path
    shipped = SHIPPED_DIR / str(name_or_path)
    if (shipped / META_FILE).is_file():
        return shipped
    raise CheckpointError(
        f"no editor checkpoint {str(name_or_path)!r}: not a folder with {META_FILE} and not a shipped editor "
        f"(shipped: {shipped_checkpoints() or 'none'})"
    )


def read_checkpoint(name_or_path: str | Path) -> Checkpoint:
    """Read and check a checkpoint folder (or shipped name): format, version, the state file's sha256."""
    folder = resolve_checkpoint(name_or_path)
    try:
        meta = read_json(folder / META_FILE)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{META_FILE} is not an rledit checkpoint description")
        if meta.get("version") not in VERSIONS:
            raise ValueError(f"{META_FILE} has format version {meta.get('version')!r}; this rledit reads {VERSIONS}")
        digest = meta.get("state_sha256")
        if meta["version"] >= 2 and not isinstance(digest, str):
            raise ValueError(f"{META_FILE} has no state_sha256")
        state = read_safetensors(folder / STATE_FILE, digest)
        checkpoint = Checkpoint(
            path=folder, method=meta["method"], hparams=dict(meta["hparams"]), model=meta["model"],
            layers=list(meta["layers"]), modules=list(meta["modules"]),
            targets=[list(t) for t in meta["targets"]], state=state, extra=dict(meta.get("extra", {})),
        )
    except (ValueError, KeyError, TypeError) as exc:  # FileFormatError is a ValueError
        raise CheckpointError(f"{folder} is not a readable editor checkpoint: {exc}") from exc
    if not (isinstance(checkpoint.method, str) and isinstance(checkpoint.model, str)
            and all(isinstance(x, int) for x in checkpoint.layers)
            and all(isinstance(x, str) for x in checkpoint.modules)):
        raise CheckpointError(f"{folder / META_FILE} is malformed: method, model, layers or modules of the wrong type")
    return checkpoint


def write_checkpoint(path: str | Path, method: Any, targets: Sequence[EditTarget], model_name: str,
                     extra: Mapping[str, Any]) -> Path:
    """Write ``method``'s learned state (without the key memory of applied steps) and description as a
    checkpoint folder, atomically."""
    hparams = getattr(method, "hparams", None)
    meta = {
        "format": FORMAT,
        "version": 2,
        "rledit_version": rledit.__version__,
        "method": method.name,
        "hparams": asdict(hparams) if is_dataclass(hparams) else {},
        "model": model_name,
        "layers": sorted({t.layer for t in targets}),
        "modules": list(dict.fromkeys(t.name.rsplit(".", 1)[-1] for t in targets)),
        "targets": [[t.name, t.d_in, t.d_out] for t in targets],
        "extra": dict(extra),
    }
    trained, _ = split_memory_state(method.state_dict())  # what was learned, not the edits' key memory
    state = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
    with atomic_directory(Path(path), "checkpoint") as folder:
        save_file(state, str(folder / STATE_FILE))
        meta["state_sha256"] = file_sha256(folder / STATE_FILE)
        (folder / META_FILE).write_text(json.dumps(meta, indent=1))
    return Path(path)
