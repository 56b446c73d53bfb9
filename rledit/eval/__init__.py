"""Honest evaluation of edits: named, versioned protocols, explicit timings, and reproducible result files.

    >>> from rledit.eval import evaluate, run_lifelong, write_results
    >>> result = evaluate(model, tokenizer, requests)                   # the unedited model, every protocol
    >>> run = run_lifelong(model, tokenizer, steps, editor.apply, timing="end")
    >>> write_results("results/zsre_50x20.json", run, {"model": "smollm2-135m", "data": "zsre", "seed": 0})

The protocols (``zsre-token-acc@1``, ``cf-prob@1``, ``gen-exact@1``) and timings (``end``, ``immediate``,
``curve``) are defined in EVALUATION.md; see :mod:`rledit.eval.protocols` and :mod:`rledit.eval.runner`.
"""

from rledit.eval.protocols import (
    CounterFactProbability,
    ExampleScore,
    GenerationExactMatch,
    Protocol,
    ProtocolError,
    References,
    TokenAccuracy,
    get_protocol,
    list_protocols,
    register_protocol,
    resolve_protocols,
)
from rledit.eval.results import (
    CurvePoint,
    EvalResult,
    ExampleRecord,
    LifelongResult,
    summarize,
    summary_dict,
    write_results,
)
from rledit.eval.runner import TIMINGS, LifelongProgress, compute_references, evaluate, run_lifelong

__all__ = [
    "TIMINGS",
    "CounterFactProbability",
    "CurvePoint",
    "EvalResult",
    "ExampleRecord",
    "ExampleScore",
    "GenerationExactMatch",
    "LifelongProgress",
    "LifelongResult",
    "Protocol",
    "ProtocolError",
    "References",
    "TokenAccuracy",
    "compute_references",
    "evaluate",
    "get_protocol",
    "list_protocols",
    "register_protocol",
    "resolve_protocols",
    "run_lifelong",
    "summarize",
    "summary_dict",
    "write_results",
]
