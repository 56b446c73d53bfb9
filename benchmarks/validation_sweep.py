"""Choose editor settings on data the benchmark never scores: a validation stream of zsRE *training* records.

The stream is ``--steps`` x ``--batch`` records of the "metric" half of the zsRE training split (see
rledit.eval.relations; the "zsre-train-questions" corpus and the trainer's same-relation locality use the other
half), in a seeded shuffle. Each setting is a trained editor plus top-level hparams overrides (JSON), applied to
the whole stream and scored at the end with zsre-token-acc@2. Writes sweep.json and sweep.md to --out.

A setting may also hold ``"scale": {"lr": x, "alpha": y, "beta": z, "ridge": w}``: multipliers applied to the
editor's learned per-module scalars after it is loaded (a trained editor's own lr, α, β, e^λ; hparams
overrides only reach scalars that the checkpoint does not hold), to map the efficacy/locality trade-off.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/validation_sweep.py --checkpoint benchmarks/results/editors-v1/smollm2-135m-zsre \\
        --setting '{}' --setting '{"memory_init": 1.0}' --out benchmarks/results/sweeps/memory
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import rledit
from rledit.bench import machine_description
from rledit.checkpoints import read_checkpoint
from rledit.data import load_requests
from rledit.editor import Editor, held_overrides
from rledit.eval.relations import in_half
from rledit.files import command_line, write_text_atomically
from rledit.methods.rledit.net import LEARNED_SCALARS
from rledit.models import load_model

PROTOCOLS = {"zsre": "zsre-token-acc@2", "counterfact": "cf-prob@1"}
METRICS = {"zsre": ("efficacy", "generalization", "locality", "relation_locality"),
           "counterfact": ("efficacy", "generalization", "neighborhood")}


def validation_stream(n: int, seed: int, data: str = "zsre") -> list:
    records = [r for r in load_requests(data, split="train") if in_half(r, "metric")]
    random.Random(seed).shuffle(records)
    return records[:n]


def scale_scalars(net: torch.nn.Module, scale: dict) -> None:
    """Multiply the network's learned per-module scalars (natural units) by ``scale``'s factors."""
    unknown = sorted(set(scale) - set(LEARNED_SCALARS))
    if unknown:
        raise SystemExit(f"unknown scalars {unknown} in a setting's scale; known: {sorted(LEARNED_SCALARS)}")
    with torch.no_grad():
        for key, factor in scale.items():
            if factor <= 0:
                raise SystemExit(f"scale {key} must be positive, got {factor}")
            getattr(net, LEARNED_SCALARS[key][0]).add_(float(torch.log(torch.tensor(float(factor)))))


def efficacy_by_age(records: list, batch: int, steps: int) -> dict[str, float]:
    """Efficacy at the end of the edits of the first quarter of the steps (the oldest) and of the last step
    (scored right after it was applied): how much of what was written is kept."""
    def mean(low: int, high: int) -> float:
        scores = [r.scores["efficacy"] for r in records if low <= r.index < high and r.scores.get("efficacy") is not None]
        return round(sum(scores) / max(1, len(scores)), 2)

    return {"efficacy_oldest": mean(0, batch * max(1, steps // 4)), "efficacy_last": mean(batch * (steps - 1), batch * steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="trained editor (default: the untrained --method editor)")
    parser.add_argument("--method", default="rledit", help="the method without --checkpoint (e.g. alphaedit)")
    parser.add_argument("--setting", action="append", required=True, help="JSON hparams overrides, repeatable")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, nargs="*", default=None,
                        help="edited layers (default: the checkpoint's, or 24-27 for an untrained editor)")
    parser.add_argument("--modules", nargs="*", default=None, help="edited MLP modules (default: the model's)")
    parser.add_argument("--data", choices=sorted(PROTOCOLS), default="zsre",
                        help="training split the stream comes from (its 'metric' half), scored by its protocol")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.checkpoint is not None:  # refuse, before any work, a setting whose scalars the checkpoint holds
        saved = read_checkpoint(args.checkpoint)
        for setting in args.setting:
            held = held_overrides(saved, json.loads(setting))
            if held:
                raise SystemExit(f"{args.checkpoint} holds its learned {held}, which the setting {setting} would not "
                                 "change; write a checkpoint with them set (benchmarks/retune_scalars.py) and sweep it")
    loaded = load_model("smollm2-135m")
    stream = validation_stream(args.steps * args.batch, args.seed, args.data)
    protocol, metric_names = PROTOCOLS[args.data], METRICS[args.data]
    layers = args.layers if args.layers is not None or args.checkpoint else [24, 25, 26, 27]
    references = None
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for setting in args.setting:
        overrides = json.loads(setting)
        scale = overrides.pop("scale", {})
        editor = Editor.from_pretrained(loaded.model, method=args.method, tokenizer=loaded.tokenizer,
                                        checkpoint=args.checkpoint, hparams=overrides or None, layers=layers,
                                        modules=args.modules)
        if scale:
            if getattr(editor.method, "hypernet", None) is None:
                raise SystemExit(f"a setting's scale multiplies an RLEdit-family editor's scalars; "
                                 f"{editor.method.name} has none")
            scale_scalars(editor.method.hypernet, scale)
            overrides["scale"] = scale
        if references is None:
            references = editor.references(stream, [protocol])
        start = time.perf_counter()
        for i in tqdm(range(0, len(stream), args.batch), desc="edit steps", unit="step"):
            editor.apply(stream[i:i + args.batch])
        result = editor.evaluate(stream, [protocol], references=references)
        metrics = result.metrics[protocol]
        editor.store.detach()
        rows.append({"setting": overrides, "seconds": round(time.perf_counter() - start, 1),
                     "setup": editor.method.setup_report(), **{m: round(metrics[m], 2) for m in metric_names},
                     **efficacy_by_age(result.records, args.batch, args.steps)})
        print(rows[-1], flush=True)
        summary = {"format": "rledit-validation-sweep@1", "command": command_line(), "protocol": protocol, "data_source": args.data,
                   "checkpoint": args.checkpoint, "method": editor.method.name, "layers": sorted({t.layer for t in editor.targets}), "modules": args.modules, "steps": args.steps, "batch": args.batch,
                   "seed": args.seed, "data": f"{args.data} train, 'metric' half, seeded shuffle", "torch": torch.__version__, "machine": machine_description(),
                   "version": rledit.__version__, "rows": rows}
        write_text_atomically(out / "sweep.json", json.dumps(summary, indent=1) + "\n")
        columns = [*metric_names, *(k for k in ("efficacy_oldest", "efficacy_last") if all(k in r for r in rows))]
        editor_name = args.checkpoint or ('untrained rledit' if args.method == 'rledit' else args.method)
        title = (f"Validation sweep: {editor_name}, {args.steps} x {args.batch} {args.data} "
                 f"training edits ('metric' half), {protocol} at the end")
        lines = [title, "",
                 "| setting | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines += [f"| `{json.dumps(r['setting'])}` | " + " | ".join(f"{r[m]:.1f}" for m in columns) + " |"
                  for r in rows]
        write_text_atomically(out / "sweep.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
