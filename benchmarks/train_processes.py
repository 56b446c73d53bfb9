"""RL training throughput with several processes: N processes x 1 thread (data-parallel, each its own episodes)
against 1 process x N threads, on SmolLM2-135M with the same seed and settings. Each configuration trains the same
total number of episodes; episodes per minute is that number over the wall time (model loading included once per
run, the same for both). Writes JSON + markdown to ``--out``.

    .venv/bin/python benchmarks/train_processes.py --processes 2 --out benchmarks/results/train-processes
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rledit
from rledit.files import command_line, write_text_atomically


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", default="hparams/experiments/train-rledit-smollm2-zsre.yaml")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=2, help="episodes per process")
    parser.add_argument("--steps", type=int, default=5, help="steps per episode")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    settings = [f"method.train.steps_per_episode={args.steps}", "method.train.validation_size=0",
                "method.train.checkpoint_every=1000"]
    runs = {  # label -> (processes, threads per process, episodes per process)
        f"{args.processes} processes x 1 thread": (args.processes, 1, args.episodes),
        f"1 process x {args.processes} threads": (1, args.processes, args.episodes * args.processes),
    }
    rows = []
    for label, (processes, threads, episodes) in runs.items():
        with tempfile.TemporaryDirectory(prefix="rledit-train-processes-") as work:
            command = [sys.executable, "-m", "rledit.cli", "train", "--hparams", args.hparams, "--out",
                       str(Path(work) / "run"), "--set", *settings, f"method.train.episodes={episodes}"]
            if processes > 1:
                command[1:3] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "rledit.cli"]
            start = time.perf_counter()
            done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=False,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
        total = processes * episodes
        rows.append({"run": label, "processes": processes, "threads_per_process": threads, "episodes": total,
                     "seconds": round(seconds, 1), "episodes_per_minute": round(60 * total / seconds, 3),
                     "command": shlex.join(command)})
        print(rows[-1], flush=True)
    summary = {"format": "rledit-train-processes@1", "command": command_line(), "hparams": args.hparams,
               "overrides": settings, "seed": 0, "torch": torch.__version__, "version": rledit.__version__,
               "cpu_count": os.cpu_count(), "rows": rows}
    out = Path(args.out)
    write_text_atomically(out / "train_processes.json", json.dumps(summary, indent=1) + "\n")
    lines = [f"RL training throughput, {args.hparams} with {' '.join(settings)} (`{summary['command']}`)", "",
             "| run | episodes | seconds | episodes / minute |", "|---|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['episodes']} | {r['seconds']} | {r['episodes_per_minute']} |" for r in rows]
    write_text_atomically(out / "train_processes.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
