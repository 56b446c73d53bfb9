"""Single-edit check of the locate-then-edit context prefixes: one CounterFact fact (Danielle Darrieux's mother
tongue, French, edited to English) and ten paraphrases of its prompt, edited by MEMIT and AlphaEdit with and
without context prefixes on SmolLM2-135M (down_proj of layers 18-21, the committed benchmarks' setting).

Efficacy and generalization are teacher-forced target token accuracy (percent) on the prompt and the mean over
the paraphrases, with the mean target probability beside them; neighborhood is the share of five prompts about
other French people whose next-token prediction is unchanged. Writes JSON + markdown to ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/context_prefix_check.py --out benchmarks/results/context-prefixes
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import transformers
import yaml

import rledit
from rledit.editor import Editor
from rledit.eval.forced import predict_answers
from rledit.files import command_line, write_text_atomically
from rledit.models import load_model

FACT = {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English"}
PARAPHRASES = [
    "Danielle Darrieux's mother tongue is",
    "The native language of Danielle Darrieux is",
    "Danielle Darrieux grew up speaking",
    "The first language Danielle Darrieux learned was",
    "Danielle Darrieux's first language is",
    "From birth, Danielle Darrieux spoke",
    "In her childhood, Danielle Darrieux spoke",
    "The language Danielle Darrieux speaks natively is",
    "Danielle Darrieux is a native speaker of",
    "As a child, the actress Danielle Darrieux spoke",
]
NEIGHBOURS = [
    "The mother tongue of Jean Gabin is",
    "The mother tongue of Catherine Deneuve is",
    "Alain Delon's mother tongue is",
    "The native language of Gérard Depardieu is",
    "The mother tongue of Édith Piaf is",
]
SETTINGS = {  # label -> method, hparams overrides
    "MEMIT, bare prompt": ("memit", {"context_lengths": []}),
    "MEMIT, context prefixes": ("memit", {}),
    "AlphaEdit, bare prompt": ("alphaedit", {"context_lengths": []}),
    "AlphaEdit, context prefixes": ("alphaedit", {}),
}


def score(model, tokenizer, unedited_next: dict[str, int] | None = None) -> dict[str, float]:
    """Efficacy / generalization (token accuracy and mean target probability, percent) and neighborhood."""
    target = FACT["target_new"]
    predictions = predict_answers(model, tokenizer, [(p, target) for p in [FACT["prompt"], *PARAPHRASES]])
    efficacy = predictions[(FACT["prompt"], target)]
    rephrased = [predictions[(p, target)] for p in PARAPHRASES]
    row = {"efficacy": 100 * efficacy.accuracy, "efficacy_prob": 100 * math.exp(efficacy.mean_log_prob),
           "generalization": 100 * sum(p.accuracy for p in rephrased) / len(rephrased),
           "generalization_prob": 100 * sum(math.exp(p.mean_log_prob) for p in rephrased) / len(rephrased)}
    if unedited_next is not None:
        now = next_tokens(model, tokenizer)
        row["neighborhood"] = 100 * sum(now[p] == unedited_next[p] for p in NEIGHBOURS) / len(NEIGHBOURS)
    return row


def next_tokens(model, tokenizer) -> dict[str, int]:
    """The argmax first answer token after each neighbourhood prompt (scored against any one-token answer)."""
    predictions = predict_answers(model, tokenizer, [(p, "French") for p in NEIGHBOURS])
    return {p: predictions[(p, "French")].argmax_ids[0] for p in NEIGHBOURS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[18, 19, 20, 21])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="hparams overrides for every setting, e.g. v_lr=1.5 (YAML values)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    common = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    unedited_next = next_tokens(model, tokenizer)
    rows = [{"setting": "unedited", **score(model, tokenizer)}]
    for label, (method, overrides) in SETTINGS.items():
        editor = Editor.from_pretrained(model, method=method, tokenizer=tokenizer, hparams={**common, **overrides},
                                        layers=args.layers, modules=["down_proj"])
        start = time.perf_counter()
        editor.apply([FACT])
        seconds = time.perf_counter() - start
        row = {"setting": label, **score(model, tokenizer, unedited_next), "seconds": round(seconds, 1),
               "prefixes": editor.method.prefixes, "hparams": editor.method.hparams.__dict__,
               "setup": editor.method.setup_report()}
        editor.store.detach()
        rows.append({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
        print({k: v for k, v in rows[-1].items() if k not in ("prefixes", "hparams", "setup")}, flush=True)
    out = Path(args.out)
    summary = {"format": "rledit-context-prefix-check@1", "command": command_line(), "model": args.model,
               "overrides": common,
               "layers": args.layers, "modules": ["down_proj"], "fact": FACT, "paraphrases": PARAPHRASES,
               "neighbours": NEIGHBOURS, "torch": torch.__version__, "transformers": transformers.__version__,
               "version": rledit.__version__, "rows": rows}
    write_text_atomically(out / "check.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    columns = ["efficacy", "efficacy_prob", "generalization", "generalization_prob", "neighborhood"]
    title = (f"Single edit on {args.model} (down_proj, layers {args.layers}): {FACT['prompt']!r} -> "
             f"{FACT['target_new']!r}, ten paraphrases, five neighbours (`{command_line()}`)")
    lines = [title, "",
             "| setting | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + r["setting"] + " | " + " | ".join(f"{r[c]:.1f}" if c in r else "" for c in columns) + " |"
              for r in rows]
    prefixes = rows[2]["prefixes"][1:]
    lines += ["", "Context prefixes (sampled once from the model, seed 0): " + " / ".join(f"`{p.strip()}`"
                                                                                    for p in prefixes)]
    write_text_atomically(out / "check.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
