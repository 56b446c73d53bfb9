"""Write a trained editor with its learned per-module scalars re-set: hparams overrides (e.g. the memory-aware
solve's ``memory_init`` / ``corpus_init`` for an editor trained without it) and multipliers of its step size,
β, α and e^λ, as chosen by benchmarks/validation_sweep.py on training data. The network is not changed.

    .venv/bin/python benchmarks/retune_scalars.py --checkpoint smollm2-135m-zsre \\
        --setting '{"memory_init": 1.0, "corpus_init": 1000.0, "corpus": "zsre-train-questions",
                    "stats_samples": 4000, "scale": {"lr": 3}}' \\
        --chosen-on benchmarks/results/sweeps/retune --out benchmarks/results/training/zsre-retuned
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from validation_sweep import scale_scalars

from rledit.editor import Editor
from rledit.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="trained editor to start from (name or folder)")
    parser.add_argument("--setting", required=True, help="JSON hparams overrides, with an optional 'scale'")
    parser.add_argument("--chosen-on", required=True, help="the validation sweep the setting was chosen on")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    overrides = json.loads(args.setting)
    scale = overrides.pop("scale", {})
    loaded = load_model(args.model)
    editor = Editor.from_pretrained(loaded.model, tokenizer=loaded.tokenizer, checkpoint=args.checkpoint,
                                    hparams=overrides or None)
    scale_scalars(editor.method.hypernet, scale)
    editor.save_checkpoint(args.out, extra={"retuned_from": args.checkpoint, "overrides": overrides,
                                            "scale": scale, "chosen_on": args.chosen_on,
                                            "command": shlex.join(sys.argv),
                                            "scalars": editor.method.hypernet.scalars()})
    print(f"wrote {args.out}: scalars {editor.method.hypernet.scalars()}")


if __name__ == "__main__":
    main()
