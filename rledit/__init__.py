"""rledit: lifelong editing of language models with RL-trained hypernetwork editors.

The heavy parts (torch, transformers) load on first use::

    from rledit import Editor, load_requests, load_model, load_hparams
"""

from importlib import import_module
from typing import Any

from rledit.types import EditRequest, EditRequestError, EditStep, PromptAnswer

__version__ = "0.1.0"

_LAZY = {
    "Editor": "rledit.editor",
    "load_requests": "rledit.data",
    "EditStream": "rledit.data",
    "load_model": "rledit.models",
    "load_hparams": "rledit.hparams",
    "evaluate": "rledit.eval",
    "run_lifelong": "rledit.eval",
    "available_methods": "rledit.methods",
    "register_architecture": "rledit.targets",
    "ArchitectureSpec": "rledit.targets",
}

__all__ = [  # noqa: PLE0604 (the lazy names are strings)
    "EditRequest", "EditRequestError", "EditStep", "PromptAnswer", "__version__", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rledit' has no attribute {name!r}")
