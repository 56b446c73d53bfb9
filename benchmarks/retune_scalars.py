"""Write a trained editor with its learned per-module scalars re-set: hparams overrides (e.g. the memory-aware
solve's ``memory_init`` / ``corpus_init`` for an editor trained without it; an ``*_init`` override sets that
scalar in every module, also where the checkpoint holds its own) and multipliers of its step size, β, α and e^λ,
as chosen by benchmarks/validation_sweep.py on training data. The network is not changed.
Without ``--checkpoint`` it writes the untrained (identity-initialised) ``--method`` editor of ``--layers`` /
``--modules`` with the overrides as its hparams: a rule chosen on validation data, saved to load by name.

    .venv/bin/python benchmarks/retune_scalars.py --checkpoint benchmarks/results/editors-v1/smollm2-135m-zsre \\
        --setting '{"memory_init": 1.0, "corpus_init": 1000.0, "corpus": "zsre-train-questions",
                    "stats_samples": 4000, "scale": {"lr": 3}}' \\
        --chosen-on benchmarks/results/sweeps/retune --out benchmarks/results/training/zsre-retuned
"""

from __future__ import annotations

import argparse
import json
import math
import warnings

import torch
from validation_sweep import scale_scalars

from rledit.checkpoints import read_checkpoint
from rledit.editor import HELD_SCALARS, Editor
from rledit.files import command_line


def set_scalars(net: torch.nn.Module, overrides: dict) -> None:
    """Set every module's learned scalar named by an ``*_init`` override to that value: a checkpoint that holds
    the scalar (a network trained with it, e.g. at α = 1 with the corpus term off) would otherwise keep its own,
    since hparams only initialise the scalars a checkpoint does not hold. ``lambda_init`` is a log already; a
    ``memory_init`` or ``corpus_init`` of 0 turns its term off and sets nothing."""
    with torch.no_grad():
        for key, tensor in HELD_SCALARS.items():
            value = float(overrides.get(key, 0.0))
            if key == "lambda_init" and key in overrides:
                getattr(net, tensor).fill_(value)
            elif key != "lambda_init" and value > 0:
                getattr(net, tensor).fill_(math.log(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None,
                        help="trained editor to start from (name or folder; default: the untrained --method editor)")
    parser.add_argument("--method", default="rledit", help="the method without --checkpoint")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="edited layers without --checkpoint")
    parser.add_argument("--modules", nargs="+", default=None, help="edited modules without --checkpoint")
    parser.add_argument("--setting", required=True, help="JSON hparams overrides, with an optional 'scale'")
    parser.add_argument("--chosen-on", required=True, help="the validation sweep the setting was chosen on")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    overrides = json.loads(args.setting)
    scale = overrides.pop("scale", {})
    if args.checkpoint is not None and (args.layers or args.modules):
        raise SystemExit("--layers/--modules pick an untrained editor's modules; a checkpoint fixes its own")
    if args.checkpoint is None:
        editor = Editor.from_pretrained(args.model, method=args.method, hparams=overrides or None,
                                        layers=args.layers, modules=args.modules)
    else:
        with warnings.catch_warnings():  # (the held scalars an override names are set just below)
            warnings.filterwarnings("ignore", message="checkpoint .* holds its learned")
            editor = Editor.from_pretrained(args.model, checkpoint=args.checkpoint, hparams=overrides or None)
    set_scalars(editor.method.hypernet, overrides)
    scale_scalars(editor.method.hypernet, scale)
    source = args.checkpoint or f"untrained {args.method}"
    trained = read_checkpoint(args.checkpoint).extra if args.checkpoint else {}
    editor.save_checkpoint(args.out, extra={"retuned_from": source, "trained": trained, "overrides": overrides,
                                            "scale": scale, "chosen_on": args.chosen_on,
                                            "command": command_line(),
                                            "scalars": editor.method.hypernet.scalars()})
    print(f"wrote {args.out}: scalars {editor.method.hypernet.scalars()}")


if __name__ == "__main__":
    main()
