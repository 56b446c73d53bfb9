"""One-GPU benchmark: a 20 x 20 lifelong zsRE run and a short RL training run on the largest model that fits.

Picks, among the model presets with an architecture (``hparams/models``), the largest whose weights, one edit
step, the delta store after the run and the editor's training state fit in 90 % of the GPU's free memory
(:func:`rledit.plan.plan_memory`), and that loads (a model missing from the local Hugging Face cache is skipped,
with the reason recorded); ``--model`` names the model instead (a preset, or a folder with ``--layers``). Then
``rledit bench`` runs the untrained RLEdit editor on ``--steps`` x ``--batch`` zsRE eval edits and ``rledit train``
one short episode run, both through the command line as a user would. Writes ``gpu.json`` and ``gpu.md`` to
``--out`` (command, versions, device, peak memory, the bench figures and the training time) beside the runs' own
files. On a machine without a GPU it runs on the CPU, which is how the test suite checks it on a tiny model:

    .venv/bin/python benchmarks/gpu/gpu_benchmark.py --out benchmarks/results/gpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml

import rledit
from rledit.cli import main as rledit_main
from rledit.files import write_text_atomically
from rledit.plan import load_preset, plan_memory, plan_presets


def free_memory(device: str) -> int | None:
    """Free bytes on ``device`` (None on the CPU)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return None


def candidates(steps: int, batch: int, budget: int | None) -> list[tuple[str, dict]]:
    """Presets with an architecture whose planned memory fits ``budget`` (all when None), largest first."""
    rows = []
    for preset in plan_presets():
        model_hparams = load_preset(preset)
        if not model_hparams.architecture:
            continue
        plan = plan_memory(model_hparams, steps=steps, batch=batch, name=preset)
        need = plan.model + plan.one_step + plan.delta_store + plan.training
        if budget is None or need <= budget:
            rows.append((preset, {"planned_bytes": need, "model_bytes": plan.model}))
    return sorted(rows, key=lambda row: -row[1]["model_bytes"])


def experiment(model: dict, steps: int, batch: int, train_steps: int) -> dict:
    """The experiment YAML both runs use: the model, the default RLEdit editor, a zsRE stream, a short training."""
    return {"defaults": {"method": "methods/rledit.yaml"}, "model": model,
            "method": {"train": {"episodes": 1, "steps_per_episode": train_steps, "batch": batch, "back_depth": 2,
                                 "validation_size": 0, "checkpoint_every": 1, "train_data": "zsre"}},
            "data": {"dataset": "zsre", "split": "eval"},
            "experiment": {"steps": steps, "batch": batch, "seed": 0, "timing": "end",
                           "protocols": ["zsre-token-acc@2"]}}


def run(model: dict, args: argparse.Namespace, out: Path) -> dict:
    """Bench and train ``model`` (a ``model`` YAML section); the figures and seconds of both."""
    hparams_file = out / "experiment.yaml"
    hparams_file.parent.mkdir(parents=True, exist_ok=True)
    hparams_file.write_text(yaml.safe_dump(experiment(model, args.steps, args.batch, args.train_steps)))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = rledit_main(["bench", "--hparams", str(hparams_file), "--device-map", args.device,
                        "--out", str(out / "bench.json")])
    bench_seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"rledit bench failed (exit {code}); see its message above")
    start = time.perf_counter()
    code = rledit_main(["train", "--hparams", str(hparams_file), "--set", f"model.device={args.device}",
                        "--out", str(out / "train")])
    train_seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"rledit train failed (exit {code}); see its message above")
    bench = json.loads((out / "bench.json").read_text())
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    return {"bench": {"metrics": bench["metrics"], "seconds": bench["seconds"], "apply_over_floor":
                      bench.get("apply_over_floor"), "wall_seconds": round(bench_seconds, 1)},
            "train": {"episodes": 1, "steps": args.train_steps, "batch": args.batch,
                      "wall_seconds": round(train_seconds, 1)},
            "peak_memory_bytes": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="auto", help="a preset, a model folder, or auto (the largest that fits)")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="edited layers of a model folder")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=5, help="steps of the one training episode")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    budget = free_memory(args.device)
    tried: list[dict] = []
    if args.model == "auto":
        models = [({**vars(load_preset(p)), "dtype": args.dtype}, {"preset": p, **facts})
                  for p, facts in candidates(args.steps, args.batch, None if budget is None else int(0.9 * budget))]
    elif Path(args.model).is_dir():
        models = [({"name": args.model, "dtype": args.dtype, "layers": args.layers}, {"folder": args.model})]
    else:
        models = [({**vars(load_preset(args.model)), "dtype": args.dtype}, {"preset": args.model})]
    result = None
    for model, facts in models:
        model = {k: v for k, v in model.items() if v is not None and k != "device"}
        try:
            result = run(model, args, out / (facts.get("preset") or "model"))
        except (OSError, RuntimeError, ValueError) as error:  # not in the local cache, out of memory, ...
            tried.append({**facts, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
            continue
        result = {**facts, "model": model["name"], **result}
        break
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    summary = {"format": "rledit-gpu-benchmark@1", "command": shlex.join(sys.argv if argv is None else
                                                                          ["gpu_benchmark.py", *argv]),
               "device": args.device, "device_name": device_name, "free_memory_bytes": budget,
               "torch": torch.__version__, "transformers": transformers.__version__, "version": rledit.__version__,
               "steps": args.steps, "batch": args.batch, "seed": 0, "result": result, "skipped": tried}
    write_text_atomically(out / "gpu.json", json.dumps(summary, indent=1) + "\n")
    lines = [f"GPU benchmark on {device_name} (`{summary['command']}`)", ""]
    if result is None:
        lines.append("No model could be run: " + "; ".join(f"{t.get('preset') or t.get('folder')}: {t['error']}"
                                                           for t in tried))
    else:
        metrics = result["bench"]["metrics"]
        lines += [f"Model {result['model']} ({args.dtype}); {args.steps} x {args.batch} zsRE edits, untrained RLEdit, "
                  f"zsre-token-acc@2: efficacy {metrics['efficacy']:.1f}, generalization "
                  f"{metrics['generalization']:.1f}, locality {metrics['locality']:.1f}; bench "
                  f"{result['bench']['wall_seconds']} s, apply/floor {result['bench']['apply_over_floor']}; "
                  f"one training episode of {args.train_steps} steps: {result['train']['wall_seconds']} s; peak "
                  f"memory {result['peak_memory_bytes'] / 2**30:.2f} GiB" if result["peak_memory_bytes"] else
                  f"Model {result['model']}: bench {result['bench']['wall_seconds']} s, training "
                  f"{result['train']['wall_seconds']} s (CPU)"]
        if tried:
            lines += ["", "Skipped: " + "; ".join(f"{t.get('preset')}: {t['error']}" for t in tried)]
    write_text_atomically(out / "gpu.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result is not None else 1


if __name__ == "__main__":
    sys.exit(main())
