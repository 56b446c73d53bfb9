"""What one RL training step costs, against the features floor of the same step (the issue's training-cost
target is one training step ≤ 3× the floor).

For each backtracking setting it times ``--repeats`` training steps (act, backtracking loss, backward, optimiser
step; and apart, the step's preparation: its batches, their cached lower-layer states and locality references)
on SmolLM2-135M with the experiment's edited modules, after ``--history`` steps already applied (each setting
also with the loss reading a sample of each step's rows, ``train.loss_rows``: ``--loss-rows``), and the floor:
one forward+backward of the same step's edit prompts through the layers that training runs (the layers below
the lowest edited one are cached, as in training), and the whole-model floor: the same from the tokens, through
every layer, the floor of a whole step with its preparation. Writes JSON + markdown beside each other.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step_cost.py --out benchmarks/results/train-cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

import rledit
from rledit.data import load_requests
from rledit.editor import Editor
from rledit.files import command_line, write_text_atomically
from rledit.hooks import capture_features
from rledit.hparams import load_hparams
from rledit.methods.rledit.trainer import RLEditTrainer

SETTINGS = {  # label -> train overrides
    "window H=4 (shipped editors)": {"backtracking": "window", "back_depth": 4},
    "sampled k=1": {"backtracking": "sampled", "back_samples": 1},
    "sampled k=3": {"backtracking": "sampled", "back_samples": 3},
    "newest step only": {"backtracking": "window", "back_depth": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", default="hparams/experiments/train-rledit-smollm2-zsre-memory.yaml")
    parser.add_argument("--history", type=int, default=4, help="steps applied before the timed ones")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loss-rows", type=float, nargs="*", default=[0.25, 0.1],
                        help="also time every setting with the loss reading this fraction of each step's rows")
    parser.add_argument("--only", nargs="*", help="time only the settings of these labels")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    settings = SETTINGS | {f"{label}, loss rows {f:g}": {**train, "loss_rows": f}
                           for label, train in SETTINGS.items() for f in args.loss_rows}
    if args.only:
        unknown = sorted(set(args.only) - set(settings))
        if unknown:
            parser.error(f"--only: no setting {unknown}; the settings are {sorted(settings)}")
        settings = {label: settings[label] for label in args.only}
    hp = load_hparams(args.hparams)
    requests = load_requests(hp.method.train.train_data, "train", limit=2000)
    rows, base = [], hp.method.train
    for label, overrides in settings.items():
        method = hp.method
        method.train = replace(base, **overrides, validation_size=0)  # each setting from the experiment's own
        editor = Editor.from_pretrained(hp.model.name, method=method.name, hparams=method, layers=hp.model.layers,
                                        modules=hp.model.modules)
        trainer = RLEditTrainer(editor, requests, "/tmp/rledit-train-cost", progress=False)
        batch = trainer.hp.batch
        history = [trainer._tokenise(requests[i * batch:(i + 1) * batch], sampled=True) for i in range(args.history)]
        for step in history:
            trainer.apply_step(step)
        steps, floors, whole_floors, preparations = [], [], [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            current = trainer._tokenise(requests[(args.history + r) * batch:(args.history + r + 1) * batch],
                                        sampled=True)
            preparations.append(time.perf_counter() - start)
            start = time.perf_counter()
            with trainer._upper_layers_only():
                capture_features(editor.model, editor.targets, current.edit)
            floors.append(time.perf_counter() - start)
            start = time.perf_counter()
            capture_features(editor.model, editor.targets, replace(current.edit, inputs_embeds=None))
            whole_floors.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.learn_step(current, *trainer._past(history))
            trainer._optimiser_step()
            steps.append(time.perf_counter() - start)
            history.append(current)
        step, floor, prepare = statistics.median(steps), statistics.median(floors), statistics.median(preparations)
        whole = statistics.median(whole_floors)
        rows.append({"setting": label, "train": overrides, "step_seconds": round(step, 3),
                     "prepare_seconds": round(prepare, 3), "floor_seconds": round(floor, 3),
                     "whole_model_floor_seconds": round(whole, 3), "step_over_floor": round(step / floor, 2),
                     "with_preparation_over_whole_model_floor": round((step + prepare) / whole, 2)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"format": "rledit-train-cost@1", "command": command_line(), "hparams": args.hparams,
               "model": hp.model.name, "layers": hp.model.layers, "batch": hp.method.train.batch,
               "history": args.history, "repeats": args.repeats, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "version": rledit.__version__, "rows": rows}
    write_text_atomically(out / "train_cost.json", json.dumps(summary, indent=1) + "\n")
    title = (f"One RL training step vs the features floor ({hp.model.name}, layers {hp.model.layers}, "
             f"{hp.method.train.batch} edits per step, {args.history} steps applied before, median of "
             f"{args.repeats}, {torch.get_num_threads()} thread(s))")
    lines = [title, "",
             ("| backtracking | step s | preparation s | floor s | whole-model floor s | step / floor | "
              "step and preparation / whole-model floor |"), "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['step_seconds']:.2f} | {r['prepare_seconds']:.2f} | {r['floor_seconds']:.2f} | "
              f"{r['whole_model_floor_seconds']:.2f} | {r['step_over_floor']:.1f} | "
              f"{r['with_preparation_over_whole_model_floor']:.1f} |" for r in rows]
    lines += ["", ("step: act, loss, backward and optimiser step, from the cached states; floor: one forward+backward of "
                   "the step's edit prompts from the same cached states. Preparation: the step's batches tokenised, "
                   "the states below the edited layers cached for its rows (its edit prompts, and the rephrase and "
                   "locality rows its losses read: every one, or a sample with loss rows < 1) and the locality "
                   "references computed, once per step. Whole-model floor: "
                   "the same forward+backward of the edit prompts from their tokens, through every layer, which is "
                   "what capturing a new step's features costs; it is the floor of a whole training step, "
                   "preparation included.")]
    write_text_atomically(out / "train_cost.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
