"""Benchmark results files: the run's JSON (+ per-example JSONL), markdown tables and retention-curve plots."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rledit.eval import LifelongResult
from rledit.files import save_figure, write_text_atomically

METRIC_ORDER = ("efficacy", "generalization", "locality", "relation_locality", "specificity", "neighborhood")


def write_run(path: str | Path, summary: dict[str, Any], result: LifelongResult) -> tuple[Path, Path]:
    """Write ``summary`` to ``path`` (.json) and every per-example record beside it (.jsonl), atomically."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"the results path must end in .json, got {str(path)!r}")
    records = path.with_suffix(".jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(asdict(r), ensure_ascii=False) for r in result.unedited.records + result.records]
    write_text_atomically(records, "\n".join(lines) + "\n")
    write_text_atomically(path, json.dumps({**summary, "records_file": records.name}, indent=1) + "\n")
    return path, records


def headline_metrics(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """The headline metric names present in any of ``summaries``, in the usual order."""
    return _ordered_metrics(s["metrics"] for s in summaries)


def _ordered_metrics(score_dicts) -> list[str]:
    present = {m for scores in score_dicts for m in scores}
    return [m for m in METRIC_ORDER if m in present]


def _metric_cells(scores: dict[str, float], metrics: Sequence[str]) -> str:
    return " | ".join(f"{scores.get(m, float('nan')):.1f}" for m in metrics)


def edited_summary(summary: dict[str, Any]) -> str:
    """The edited modules of a run, short: ``L24-27 gate_proj, up_proj`` (layers as a range when contiguous)."""
    layers, kinds = set(), []
    for name in summary.get("edited_modules", []):
        numbers = [part for part in name.split(".") if part.isdigit()]
        if numbers:
            layers.add(int(numbers[-1]))
        kind = name.rsplit(".", 1)[-1]
        if kind not in kinds:
            kinds.append(kind)
    if not layers:
        return ", ".join(kinds)
    ordered = sorted(layers)
    contiguous = ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 1
    span = f"L{ordered[0]}-{ordered[-1]}" if contiguous else "L" + ",".join(map(str, ordered))
    return f"{span} {', '.join(kinds)}"


def statistics_cell(summary: dict[str, Any]) -> str:
    """Seconds computing the run's corpus statistics took (computed once, then cached); empty without any."""
    statistics = summary.get("method_setup", {}).get("statistics")
    return f"{statistics['compute_seconds']:.0f}" if statistics else ""


def seconds_per_edit(summary: dict[str, Any]) -> float:
    return summary["seconds"]["apply_total"] / summary["n_edits"]


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    """One row for the unedited model and one per run: headline metrics, seconds per edit, ratio to the floor,
    set-up seconds, statistics seconds (:func:`statistics_cell`) and the edited modules (:func:`edited_summary`)."""
    if not summaries:
        raise ValueError("no benchmark results to tabulate")
    first = summaries[0]
    metrics = headline_metrics(summaries)
    head = (f"{first['model']}, {first['dataset']} ({first['split']}), {first['steps']} steps x {first['batch']} "
            f"edits = {first['n_edits']}, timing `{first['timing']}`, `{first['protocol']}`, seed {first['seed']}")
    lines = [head, "", "| method | " + " | ".join(metrics) + " | apply s/edit | apply/floor | setup s | statistics s | edits |",
             "|---|" + "---:|" * (len(metrics) + 4) + "---|"]
    lines.append(f"| unedited | {_metric_cells(first['unedited'], metrics)} | | | | | |")
    for s in summaries:
        lines.append(f"| {s['name']} | {_metric_cells(s['metrics'], metrics)} | {seconds_per_edit(s):.4f} | "
                     f"{s['apply_over_floor']:.2f} | "
                     f"{s['seconds']['setup']:.1f} | {statistics_cell(s)} | {edited_summary(s)} |")
    return "\n".join(lines) + "\n"


def other_protocol_tables(summaries: Sequence[dict[str, Any]]) -> str:
    """The same runs scored by each protocol other than the headline one (``metrics_by_protocol``), one small
    table per protocol with the unedited row; empty when the runs were scored by the headline protocol alone."""
    headline = summaries[0]["protocol"]
    protocols = sorted({p for s in summaries for p in s.get("metrics_by_protocol", {})} - {headline})
    blocks = []
    for protocol in protocols:
        scored = [s for s in summaries if protocol in s["metrics_by_protocol"]]
        metrics = _ordered_metrics(s["metrics_by_protocol"][protocol] for s in scored)
        unedited = scored[0].get("unedited_by_protocol", {}).get(protocol, {})
        lines = [f"`{protocol}`, the same edits:", "", "| method | " + " | ".join(metrics) + " |",
                 "|---|" + "---:|" * len(metrics), f"| unedited | {_metric_cells(unedited, metrics)} |"]
        lines += [f"| {s['name']} | {_metric_cells(s['metrics_by_protocol'][protocol], metrics)} |" for s in scored]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def general_table(summaries: Sequence[dict[str, Any]]) -> str:
    """General ability (``rledit bench --general``) of the unedited model and of each run after its last step;
    empty when no run was probed."""
    probed = [s for s in summaries if s.get("general")]
    if not probed:
        return ""
    lines = [f"General ability ({probed[0]['general']['tasks']}):", "",
             "| method | SST-2 accuracy | perplexity |", "|---|---:|---:|"]
    unedited = probed[0]["general"]["unedited"]
    lines.append(f"| unedited | {unedited['sst2_accuracy']:.1f} | {unedited['perplexity']:.1f} |")
    lines += [f"| {s['name']} | {s['general']['edited']['sst2_accuracy']:.1f} | "
              f"{s['general']['edited']['perplexity']:.1f} |" for s in probed]
    return "\n".join(lines) + "\n"


def speed_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Per run: median apply and floor seconds per step and their ratio, the median of the first and last five
    steps (drift of the apply cost along the sequence), seconds per edit, set-up, statistics and peak RSS."""
    header = ("| method | apply s/step | floor s/step | apply/floor | first 5 → last 5 steps (s) | apply s/edit | "
              "setup s | statistics s | peak RSS MB |")
    lines = [header, "|---|" + "---:|" * 8]
    for s in summaries:
        sec = s["seconds"]
        lines.append(f"| {s['name']} | {sec['apply_step_median']:.2f} | {sec['floor_step_median']:.2f} | "
                     f"{s['apply_over_floor']:.2f} | {sec['apply_first5_median']:.2f} → "
                     f"{sec['apply_last5_median']:.2f} | {seconds_per_edit(s):.4f} | "
                     f"{sec['setup']:.1f} | {statistics_cell(s)} | {s['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_curves(summaries: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Retention curves (headline metrics vs number of edits) of the runs that have one; None if none has."""
    runs = [s for s in summaries if s.get("curve")]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = headline_metrics(runs)[:3]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for s in runs:
            points = [(p["n_edits"], p[metric]) for p in s["curve"] if metric in p]
            ax.plot(*zip(*points), marker="o", markersize=3, label=s["name"])
        if metric in runs[0].get("unedited", {}):  # every run of a folder edits the same stream
            ax.axhline(runs[0]["unedited"][metric], color="0.4", linestyle="--", linewidth=1,
                       label="unedited (all edits of the stream)")
        ax.set_title(metric)
        ax.set_xlabel("edits applied")
        ax.set_ylim(0, 103)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{runs[0]['protocol']} (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(labels), 5)
    fig.suptitle(f"{runs[0]['model']} on {runs[0]['dataset']}: retention of all edits so far", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * -(-len(labels) // columns), 1, 1))  # room below for the legend
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=7, frameon=False)
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_end_metrics(summaries: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Grouped bars of the headline metrics at the end of each run (the unedited model first); None if no run."""
    if not summaries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = headline_metrics(summaries)[:4]
    rows = [("unedited", summaries[0].get("unedited", {}))] + [(s["name"], s["metrics"]) for s in summaries]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(metrics)), 3.6))
    for i, (name, values) in enumerate(rows):
        xs = [m + (i - (len(rows) - 1) / 2) * width for m in range(len(metrics))]
        ax.bar(xs, [values.get(metric, 0.0) for metric in metrics], width, label=name,
               color="0.75" if i == 0 else None)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 103)
    ax.set_ylabel(f"{summaries[0]['protocol']} (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{summaries[0]['model']} on {summaries[0]['dataset']}: after {summaries[0]['n_edits']} edits",
                 fontsize=9)
    ax.legend(fontsize=6, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_tradeoff(summaries: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Where each run sits between writing its edits and leaving the rest alone, at the end of the stream:
    efficacy and generalization (the first two headline metrics) against locality (the third), one point per
    run and the unedited model; None when the protocol has fewer than three headline metrics."""
    metrics = headline_metrics(summaries)[:3] if summaries else []
    if len(metrics) < 3:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = metrics[2]
    fig, axes = plt.subplots(1, 2, figsize=(12.0, 4.2), squeeze=False)
    unedited = summaries[0].get("unedited", {})
    for ax, metric in zip(axes[0], metrics[:2]):
        if metric in unedited and kept in unedited:
            ax.scatter([unedited[kept]], [unedited[metric]], marker="*", s=90, color="0.5", label="unedited")
        for i, s in enumerate(summaries, start=1):
            if metric in s["metrics"] and kept in s["metrics"]:
                ax.scatter([s["metrics"][kept]], [s["metrics"][metric]], s=30, label=f"{i}. {_short(s['name'])}",
                           marker="os^Dv"[(i - 1) // 10 % 5])  # the colours repeat after ten runs
                ax.annotate(str(i), (s["metrics"][kept], s["metrics"][metric]), xytext=(3, 3),
                            textcoords="offset points", fontsize=7)
        ax.set_xlabel(f"{kept} (%)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_xlim(0, 103)
        ax.set_ylim(0, 103)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summaries[0]['model']} on {summaries[0]['dataset']}, {summaries[0]['protocol']}, after "
                 f"{summaries[0]['n_edits']} edits: up and to the right is better", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.6, 0.95))
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.6, 0.5), fontsize=6, frameon=False)
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _short(name: str, limit: int = 80) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


STREAM_KEYS = ("model", "dataset", "split", "steps", "batch", "seed", "timing", "protocol")
ROW_ORDER = ("rledit", "malmen", "mend", "ultraedit", "memit", "alphaedit", "ft")


def with_preferred_headline(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with the dataset's preferred headline protocol among those it was scored with
    (:data:`rledit.bench.HEADLINE`), so that runs made before a newer protocol version became the headline
    tabulate beside newer ones; its curve (kept for the old headline only) is then left out."""
    from rledit.bench import HEADLINE

    scored = summary.get("metrics_by_protocol", {})
    preferred = next((p for p in HEADLINE.get(summary.get("dataset"), ()) if p in scored), summary["protocol"])
    if preferred == summary["protocol"]:
        return summary
    changed = {**summary, "protocol": preferred, "metrics": scored[preferred],
               "unedited": summary["unedited_by_protocol"][preferred]}
    changed.pop("curve", None)
    return changed


def load_runs(directory: str | Path) -> list[dict[str, Any]]:
    """Every run's summary in ``directory``, checked to share one stream, trained editors before their method.

    A run is a ``*.json`` written by :func:`write_run` (it names its ``records_file``); runs of another stream
    (model, data, schedule, seed, timing or protocol) in the same folder are an error naming both files.
    """
    directory = Path(directory)
    runs = []
    for path in sorted(directory.glob("*.json")):
        summary = json.loads(path.read_text())
        if "records_file" not in summary or "metrics" not in summary:
            continue
        runs.append((path, with_preferred_headline(summary)))
    if not runs:
        raise ValueError(f"no benchmark results (*.json from `rledit bench`) in {directory}")
    first_path, first = runs[0]
    for path, summary in runs[1:]:
        different = [k for k in STREAM_KEYS if summary.get(k) != first.get(k)]
        if different:
            raise ValueError(f"{path.name} and {first_path.name} ran different streams ({', '.join(different)} "
                             "differ): keep one stream per results folder")

    def rank(summary: dict[str, Any]) -> tuple[int, int, list[tuple[int, str]]]:
        method = summary["method"]
        order = ROW_ORDER.index(method) if method in ROW_ORDER else len(ROW_ORDER)
        return order, 0 if summary.get("checkpoint") else 1, natural_key(summary["name"])

    return sorted((s for _, s in runs), key=rank)


def natural_key(label: str) -> list[tuple[int, str]]:
    """A sort key that orders the numbers inside labels by value ("30000 tokens" before "300000 tokens")."""
    return [(int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", label) if part]


def write_report(directory: str | Path) -> tuple[Path, Path | None]:
    """``table.md`` (quality by the headline protocol, then by any other, then speed) and ``curves.png`` of every
    run in ``directory`` (see :func:`load_runs`), or ``metrics.png`` (bars at the end) when no run has a curve;
    beside them ``tradeoff.png`` (:func:`plot_tradeoff`), each run's edits against its locality at the end.

    Several ``rledit bench --methods`` processes may fill one folder (e.g. one per core); each rewrites these
    two files over everything the folder holds so far, and ``rledit bench-report FOLDER`` does the same alone.
    """
    directory = Path(directory)
    summaries = load_runs(directory)
    table = directory / "table.md"
    others, general = other_protocol_tables(summaries), general_table(summaries)
    text = (markdown_table(summaries) + (f"\n{others}" if others else "") + (f"\n{general}" if general else "")
            + "\nSpeed:\n\n" + speed_table(summaries))
    write_text_atomically(table, text)
    plot_tradeoff(summaries, directory / "tradeoff.png")
    return table, plot_curves(summaries, directory / "curves.png") or plot_end_metrics(summaries,
                                                                                   directory / "metrics.png")
