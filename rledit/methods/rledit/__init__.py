"""RLEdit (and MALMEN, the same editor trained on single steps): hypernetwork + factored ridge update.

Importing this package registers the methods "rledit" and "malmen" (see :mod:`rledit.methods.base`).
"""

from rledit.methods.rledit.config import MALMENHparams, RLEditHparams, TrainHparams
from rledit.methods.rledit.method import MALMENMethod, RLEditMethod
from rledit.methods.rledit.net import EditorNet, HyperBlock, HyperNetwork, RunningNormalizer
from rledit.methods.rledit.solve import PenaltyInverses, factored_frobenius_sq, ridge_factors, value_shifts

__all__ = [
    "EditorNet",
    "HyperBlock",
    "HyperNetwork",
    "MALMENHparams",
    "MALMENMethod",
    "PenaltyInverses",
    "RLEditHparams",
    "RLEditMethod",
    "RunningNormalizer",
    "TrainHparams",
    "factored_frobenius_sq",
    "ridge_factors",
    "value_shifts",
]
