"""What edit passes cost: seconds per applied step of a multi-pass RLEdit editor, with the later passes running
only the edited layers and up (the default: the layers below run once per step, ``rledit.prefix.Prefix``) and
with every pass running the whole model, against the benchmark's floor (one ordinary forward+backward of the
step, every weight getting gradients: ``rledit.bench.floor_seconds``, as in ``rledit bench``'s apply/floor).

The two ways are measured on the same steps (zsRE eval records, ``--steps`` × ``--batch``), alternating step by
step on two editors from the same checkpoint, so the machine's load falls on both alike; the updates agree to
floating-point tolerance (the largest relative difference of the accumulated deltas is reported). Writes JSON +
markdown to ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/passes_cost.py \\
        --checkpoint benchmarks/results/training/zsre-retuned-passes --out benchmarks/results/passes-cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import rledit
from rledit.bench import floor_seconds
from rledit.data import load_requests
from rledit.editor import Editor
from rledit.files import command_line, write_text_atomically
from rledit.models import load_model
from rledit.prefix import Prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--layers", type=int, nargs="*", default=None,
                        help="edited layers of an untrained editor (default: the checkpoint's)")
    parser.add_argument("--setting", default="{}",
                        help='JSON hparams overrides of the checkpoint\'s, e.g. \'{"refine_layers": [24, 25, 26, 27]}\'')
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    overrides = json.loads(args.setting)
    loaded = [load_model("smollm2-135m") for _ in range(2)]
    editors = {way: Editor.from_pretrained(m.model, tokenizer=m.tokenizer, method="rledit", checkpoint=args.checkpoint,
                                           layers=args.layers, hparams=overrides or None)
               for way, m in zip(("edited layers only", "whole model"), loaded)}
    requests = load_requests("zsre", split="eval")[:args.steps * args.batch]
    seconds = {way: [] for way in editors}
    floor = []
    original = Prefix.for_targets
    for i in range(args.steps):
        step = requests[i * args.batch:(i + 1) * args.batch]
        for way, editor in editors.items():
            if way == "whole model":
                Prefix.for_targets = classmethod(lambda cls, model, targets: None)
            try:
                start = time.perf_counter()
                editor.apply(step)
                seconds[way].append(time.perf_counter() - start)
            finally:
                Prefix.for_targets = original
        floor.append(floor_seconds(loaded[0].model, loaded[0].tokenizer, step))
    a, b = editors.values()
    worst = max(float((a.store.delta(t.name) - b.store.delta(t.name)).norm() / b.store.delta(t.name).norm())
                for t in a.targets)
    median_floor = statistics.median(floor)
    rows = [{"passes": way, "seconds_per_step": round(statistics.median(s), 3),
             "apply_over_floor": round(statistics.median(s) / median_floor, 2)} for way, s in seconds.items()]
    summary = {"format": "rledit-passes-cost@1", "command": command_line(), "checkpoint": args.checkpoint,
               "setting": overrides,
               "passes": a.method.hparams.passes, "steps": args.steps, "batch": args.batch,
               "floor_seconds_per_step": round(median_floor, 3), "max_relative_difference": float(f"{worst:.3g}"),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "version": rledit.__version__,
               "rows": rows}
    out = Path(args.out)
    write_text_atomically(out / "passes_cost.json", json.dumps(summary, indent=1) + "\n")
    lines = [(f"Edit passes ({summary['passes']} per step, {args.steps} steps × {args.batch} zsRE edits, median; "
             f"`{summary['command']}`)"), "", "| later passes run | s / step | apply / floor |", "|---|---:|---:|"]
    lines += [f"| {r['passes']} | {r['seconds_per_step']} | {r['apply_over_floor']} |" for r in rows]
    lines += ["", (f"Floor (one ordinary forward+backward of the step): {summary['floor_seconds_per_step']} s. Largest "
              f"relative difference of the accumulated deltas: {summary['max_relative_difference']}.")]
    write_text_atomically(out / "passes_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
