"""Scores by the age of an edit: which edits of a lifelong run hold, the oldest or the newest, and whether the
newest edits of a long run are as good as the newest of a short one.

Reads the per-request records (``*.jsonl``) that ``rledit bench`` writes beside each results file, groups the
edited requests by the step they were applied at (blocks of ``--block`` steps) at every evaluation point of the
run (``after_steps``; a ``--timing curve`` run has several; a ``--timing immediate`` run scores each step as it
is applied, shown as "its own" step), and writes the mean of each metric per block:
JSON + markdown, and a plot of generalization (or ``--metric``) against the step the edit was made at, one line
per run and evaluation point. Nothing is recomputed: the figures are the benchmark's own per-request scores.

    .venv/bin/python benchmarks/edit_age.py --block 5 --protocol zsre-token-acc@1 \\
        --runs benchmarks/results/zsre-10x20/rledit_smollm2-135m-zsre.jsonl \\
               benchmarks/results/zsre-50x20/rledit_smollm2-135m-zsre.jsonl --out benchmarks/results/edit-age
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from rledit.files import command_line, save_figure, write_text_atomically

METRICS = ("efficacy", "generalization", "locality", "relation_locality")
AS_APPLIED = 0  # the evaluation point of edits scored right after their own step (``--timing immediate``)


def block_means(path: Path, protocol: str, block: int) -> list[dict[str, Any]]:
    """One row per (evaluation point, block of steps): the mean of each metric over the edits of that block. A run
    that scored every step as it was applied (``--timing immediate``) has one evaluation point, ``AS_APPLIED``."""
    with path.open() as f:
        records = [json.loads(line) for line in f]
    edited = [r for r in records if r["protocol"] == protocol and r.get("after_steps")]  # 0: the unedited model
    if not edited:
        raise SystemExit(f"{path}: no edited records under protocol {protocol!r} "
                         f"(it has {sorted({r['protocol'] for r in records})})")
    immediate = len({r["after_steps"] for r in edited}) > 1 and all(r["after_steps"] == r["step"] for r in edited)
    groups: dict[tuple[int, int], list[dict[str, float]]] = defaultdict(list)
    for r in edited:
        groups[(AS_APPLIED if immediate else r["after_steps"], (r["step"] - 1) // block)].append(r["scores"])
    rows = []
    for (after, index), scores in sorted(groups.items()):
        means = {}
        for metric in METRICS:  # over the edits that have the metric (a record may lack a same-relation prompt)
            values = [s[metric] for s in scores if s.get(metric) is not None]
            if values:
                means[metric] = round(sum(values) / len(values), 2)
        rows.append({"after_steps": after, "steps": [index * block + 1, (index + 1) * block], "edits": len(scores),
                     **means})
    return rows


def markdown(runs: dict[str, list[dict[str, Any]]], protocol: str, command: str) -> str:
    lines = [f"Scores by the step an edit was made at (`{protocol}`, the benchmark's per-request scores)", "",
             f"Command: `{command}`", ""]
    for name, rows in runs.items():
        metrics = [m for m in METRICS if any(m in r for r in rows)]
        lines += [f"### {name}", "", "| scored after step | edits of steps | edits | " + " | ".join(metrics) + " |",
                  "|---:|---|---:|" + "---:|" * len(metrics)]
        lines += [f"| {r['after_steps'] or 'its own'} | {r['steps'][0]}-{r['steps'][1]} | {r['edits']} | "
                  + " | ".join(f"{r[m]:.1f}" if m in r else "" for m in metrics) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], metric: str, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in runs.items():
        for after in sorted({r["after_steps"] for r in rows}):
            points = [(sum(r["steps"]) / 2, r[metric]) for r in rows if r["after_steps"] == after and metric in r]
            if points:
                when = "as applied" if after == AS_APPLIED else f"after step {after}"
                ax.plot(*zip(*points), marker="o", label=f"{name}, {when}")
    ax.set_xlabel("step the edit was made at")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="per-request records (*.jsonl) of rledit bench runs")
    parser.add_argument("--names", nargs="*", help="a name per run (default: the file's folder and stem)")
    parser.add_argument("--protocol", default="zsre-token-acc@2")
    parser.add_argument("--block", type=int, default=10, help="steps per block")
    parser.add_argument("--metric", default="generalization", choices=METRICS, help="the plotted metric")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.block < 1:
        raise SystemExit(f"--block must be at least 1, got {args.block}")
    if args.names and len(args.names) != len(args.runs):
        raise SystemExit(f"--names gives {len(args.names)} names for {len(args.runs)} runs")
    paths = [Path(p) for p in args.runs]
    names = args.names or [f"{p.parent.name}/{p.stem}" for p in paths]
    runs = {name: block_means(path, args.protocol, args.block) for name, path in zip(names, paths)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = command_line()
    write_text_atomically(out / "edit_age.json", json.dumps(
        {"command": command, "protocol": args.protocol, "block": args.block,
         "runs": [{"name": n, "records": str(p), "rows": runs[n]} for n, p in zip(names, paths)]}, indent=1) + "\n")
    write_text_atomically(out / "edit_age.md", markdown(runs, args.protocol, command) + "\n")
    figure = plot(runs, args.metric, out / "edit_age.png")
    print(f"wrote {out / 'edit_age.md'}" + (f" and {figure}" if figure else ""))


if __name__ == "__main__":
    main()
