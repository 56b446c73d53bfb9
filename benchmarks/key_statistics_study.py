"""How AlphaEdit's null space moves with the amount of text behind the key statistics.

For each token budget (``--tokens``), the key second moment C = E[k kᵀ] of each edited module is estimated on
that many tokens of ``--corpus`` (:func:`rledit.methods.memit.load_or_compute_statistics`, cached), and for each
module this reports the null-space dimension under the default rule (5 % of the energy) and under the published
absolute threshold 2e-2, the relative change of C from the previous budget (‖C_b − C_a‖_F / ‖C_b‖_F), and how
much of the previous budget's null space the new one keeps (‖P_a P_b‖_F² / dim P_a, 1 = the same subspace).
Writes JSON + markdown to ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/key_statistics_study.py --tokens 30000 300000 1000000 \\
        --out benchmarks/results/key-statistics
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import rledit
from rledit.files import write_text_atomically
from rledit.methods.alphaedit import nullspace_projection
from rledit.methods.memit import load_or_compute_statistics
from rledit.models import load_model
from rledit.targets import resolve_targets

CORPUS = "sst2+zsre-train-questions+counterfact-train-facts"


def study(model, tokenizer, layers: list[int], corpus: str, budgets: list[int], samples: int) -> list[dict]:
    """One row per (budget, module); see the module docstring."""
    targets = resolve_targets(model, layers, ["down_proj"] if hasattr(model.config, "intermediate_size") else None)
    rows, previous = [], {}
    for budget in budgets:
        stats = load_or_compute_statistics(model, tokenizer, targets, corpus, samples, 128, 32,
                                           max_tokens=budget)
        for target in targets:
            moment = stats.second_moments[target.name]
            projection, dim = nullspace_projection(moment, 0.05, "energy")
            row = {"tokens_asked": budget, "tokens": stats.n_tokens, "texts": stats.n_texts, "module": target.name,
                   "nullspace_energy_0.05": dim, "nullspace_absolute_2e-2": nullspace_projection(moment, 2e-2)[1]}
            if target.name in previous:
                old_moment, old_projection, old_dim = previous[target.name]
                row["change_from_previous"] = float((moment - old_moment).norm() / moment.norm())
                row["nullspace_kept"] = float((old_projection @ projection).norm() ** 2 / max(old_dim, 1))
            previous[target.name] = (moment, projection, dim)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[18, 19, 20, 21])
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--tokens", type=int, nargs="+", default=[30_000, 300_000, 1_000_000])
    parser.add_argument("--samples", type=int, default=200_000, help="texts read from the corpus at most")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    rows = study(loaded.model, loaded.tokenizer, args.layers, args.corpus, sorted(args.tokens), args.samples)
    command = shlex.join(sys.argv if argv is None else ["key_statistics_study.py", *argv])
    summary = {"format": "rledit-key-statistics-study@1", "command": command, "model": args.model,
               "layers": args.layers, "corpus": args.corpus, "torch": torch.__version__,
               "version": rledit.__version__, "rows": rows}
    out = Path(args.out)
    write_text_atomically(out / "study.json", json.dumps(summary, indent=1) + "\n")
    lines = [f"Key statistics of {args.model} (down_proj, layers {args.layers}) on `{args.corpus}` (`{command}`)", "",
             "| tokens | module | null space (5 % energy) | null space (absolute 2e-2) | change of C | null space kept |",
             "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['tokens']} | {r['module']} | {r['nullspace_energy_0.05']} | {r['nullspace_absolute_2e-2']} | "
              + (f"{r['change_from_previous']:.3f} | {r['nullspace_kept']:.3f} |" if "nullspace_kept" in r else " | |")
              for r in rows]
    short = sorted({(r["tokens_asked"], r["tokens"], r["texts"]) for r in rows if r["tokens"] < r["tokens_asked"]})
    lines += ["", *(f"{asked} tokens asked: the corpus holds {got} ({texts} texts), every one of them read."
                    for asked, got, texts in short)] if short else []
    write_text_atomically(out / "study.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
