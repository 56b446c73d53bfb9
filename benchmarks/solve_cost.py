"""What the memory-aware ridge solve costs per edited module and edit step, by key width d_in.

For each d_in, a synthetic module (random keys and shifts, C_0 and C_mem random positive semi-definite) is edited
for ``--steps`` steps of ``--tokens`` answer tokens in ``--passes`` passes, with the two solves of
:mod:`rledit.methods.rledit.solve`:

* factorised: every pass builds A = e^λ I + β C_mem + α C_0 and factorises it (Cholesky, O(d_in³)), as the
  differentiable training solve does;
* kept inverse (edit time): A⁻¹ is built once (``build_seconds``), every pass is a product with it
  (O(d_in² N)), and every step's keys enter it by a Woodbury update of rank N.

Both give the same factors (the largest relative difference of U V is reported). Timings are wall seconds on
this machine with ``--threads`` threads: compare them as ratios within one run. Writes JSON + markdown to --out.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/solve_cost.py --dims 576 1536 4096 14336 \\
        --out benchmarks/results/solve-cost
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import rledit
from rledit.files import command_line, write_text_atomically
from rledit.methods.rledit.solve import PenaltyInverses, ridge_factors


def _psd(d: int, rows: int, generator: torch.Generator, device: str) -> torch.Tensor:
    sample = torch.randn(rows, d, generator=generator, dtype=torch.float64).to(device)
    return sample.T @ sample / rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(d_in: int, tokens: int, passes: int, steps: int, d_out: int, device: str) -> dict:
    g = torch.Generator().manual_seed(d_in)
    corpus = _psd(d_in, 2 * d_in, g, device)
    memory = _psd(d_in, tokens, g, device)
    ridge_log, beta, alpha = torch.tensor(-2.0, device=device), 1.0, 600.0
    scalars = (-2.0, beta, alpha)
    eye = torch.eye(d_in, dtype=torch.float64, device=device)
    work = [(torch.randn(tokens, d_in, generator=g).to(device), torch.randn(tokens, d_out, generator=g).to(device))
            for _ in range(steps)]

    def system() -> torch.Tensor:
        return ridge_log.double().exp() * eye + beta * memory + alpha * corpus

    inverses = PenaltyInverses()
    _sync(device)
    start = time.perf_counter()
    inverses.get("m", scalars, system)
    _sync(device)
    build = time.perf_counter() - start
    factorised, kept, worst = 0.0, 0.0, 0.0
    for keys, shifts in work:
        _sync(device)
        start = time.perf_counter()
        for _ in range(passes):
            exact = ridge_factors(keys, shifts, ridge_log, beta * memory + alpha * corpus)
        _sync(device)
        factorised += time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(passes):
            fast = ridge_factors(keys, shifts, ridge_log, inverse=inverses.get("m", scalars, system))
        inverses.add_keys("m", scalars, keys)
        _sync(device)
        kept += time.perf_counter() - start
        full, quick = exact[0] @ exact[1], fast[0] @ fast[1]
        worst = max(worst, float((full - quick).norm() / full.norm()))
        memory = memory + keys.double().T @ keys.double()
    matrix_gib = d_in * d_in * 8 / 2**30
    return {"d_in": d_in, "tokens": tokens, "passes": passes, "steps": steps,
            "factorised_seconds_per_step": round(factorised / steps, 4),
            "kept_inverse_seconds_per_step": round(kept / steps, 4),
            "kept_inverse_build_seconds": round(build, 4),
            "speedup": round(factorised / max(kept, 1e-12), 1),
            "fp64_matrix_gib": round(matrix_gib, 3),
            "max_relative_difference": float(f"{worst:.3g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 1536, 4096, 14336])
    parser.add_argument("--tokens", type=int, default=100, help="answer tokens per step (20 edits of ~5 tokens)")
    parser.add_argument("--passes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--d-out", type=int, default=1536)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for d_in in args.dims:
        rows.append(measure(d_in, args.tokens, args.passes, args.steps, args.d_out, args.device))
        print(rows[-1], flush=True)
    summary = {"format": "rledit-solve-cost@1", "command": command_line(), "device": args.device,
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "version": rledit.__version__, "seed": "d_in", "rows": rows}
    out = Path(args.out)
    write_text_atomically(out / "solve_cost.json", json.dumps(summary, indent=1) + "\n")
    lines = [(f"Memory-aware solve per module and edit step ({args.tokens} tokens, {args.passes} passes, "
             f"{args.device}, {summary['threads']} threads; `{summary['command']}`)"), "",
             ("| d_in | factorised s/step | kept inverse s/step | speed-up | inverse built once, s | "
             "one d_in² fp64 matrix, GiB | max rel. difference |"), "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['d_in']} | {r['factorised_seconds_per_step']} | {r['kept_inverse_seconds_per_step']} | "
              f"{r['speedup']}× | {r['kept_inverse_build_seconds']} | {r['fp64_matrix_gib']} | "
              f"{r['max_relative_difference']} |" for r in rows]
    write_text_atomically(out / "solve_cost.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
