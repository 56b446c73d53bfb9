"""The training curve of an RLEdit-family editor, drawn from its JSONL training log."""

from __future__ import annotations

import json
from pathlib import Path

from rledit.files import save_figure


def plot_training_log(log_path: str | Path, png_path: str | Path) -> Path:
    """Plot loss terms and post-edit token accuracy per episode from ``train_log.jsonl`` into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    episodes = [r for r in records if r.get("kind") == "episode"]
    if not episodes:
        raise ValueError(f"{log_path} has no episode records to plot")
    x = [r["episode"] for r in episodes]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("gen", "CE_gen (backtracked)"), ("loc", "KL_loc (backtracked)"), ("loss", "total loss")):
        ax_loss.plot(x, [r[key] for r in episodes], label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("episode")
    ax_loss.set_title("training loss (mean over the episode's steps)")
    ax_loss.legend()
    ax_acc.plot(x, [100 * r["edit_acc"] for r in episodes], color="tab:green")
    ax_acc.set_xlabel("episode")
    ax_acc.set_ylabel("%")
    ax_acc.set_ylim(0, 100)
    ax_acc.set_title("post-edit token accuracy of the current step", fontsize=10)
    fig.tight_layout()
    png_path = save_figure(fig, png_path, dpi=110)
    plt.close(fig)
    return png_path
