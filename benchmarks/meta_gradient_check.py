"""Is the RL trainer's meta-gradient the gradient of its loss? A finite-difference check of one training step.

The trainer makes an edit's later passes with their features detached (step 2 of
:mod:`rledit.methods.rledit.trainer`): its gradient treats each later pass's keys and gradients as constants,
although they are read on a model that the earlier passes of the same step have changed. For one training step of
an experiment (after ``--warm`` steps applied by the editor itself, no learning), this compares, for each
parameter family (the network's weights; the per-module log step sizes, ridge strengths λ, log β, log α), the
directional derivative the trainer's gradient g predicts along its own unit direction d = g / ‖g‖ (that is, ‖g‖)
with a central finite difference of the same loss, every pass recomputed: (L(θ + εd) − L(θ − εd)) / 2ε. With one
pass (``--set method.passes=1``) the two must agree up to ε; where they disagree with passes, the trainer's step
does not descend its own loss. The loss is the step's own L_t (no backtracking), as the trainer computes it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/meta_gradient_check.py \\
        --hparams hparams/experiments/train-rledit-smollm2-counterfact-split.yaml --out runs/meta-gradient
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import rledit
from rledit.data import load_requests
from rledit.editor import Editor
from rledit.files import command_line, write_text_atomically
from rledit.hooks import capture_features
from rledit.hparams import load_hparams
from rledit.methods.rledit.net import LEARNED_SCALARS
from rledit.methods.rledit.trainer import RLEditTrainer

LABELS = {"lr": "log step size", "ridge": "ridge λ", "beta": "log β", "alpha": "log α"}
SCALARS = {LABELS[name]: attr for name, (attr, _) in LEARNED_SCALARS.items()}


def step_loss(trainer: RLEditTrainer, step, features) -> torch.Tensor:
    """L_t of ``step`` (no backtracking) from its first ``features`` (read once on the current model: they do not
    depend on the editor's parameters), as the trainer's step computes it; the normaliser is left as it is."""
    with trainer._upper_layers_only():
        differentiable = torch.is_grad_enabled() and trainer.hp.differentiable_passes
        updates = trainer.action(step, features, differentiable=differentiable)
        return trainer.step_loss(updates, [step], [1.0])[0]


def central_difference(trainer: RLEditTrainer, step, features, move, eps: float) -> float:
    """(L(θ + ε·d) − L(θ − ε·d)) / 2ε, where ``move(t)`` adds t·d to the parameters in place."""
    moved = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            move(sign * eps)
            moved.append(step_loss(trainer, step, features).item())
            move(-sign * eps)
    return (moved[0] - moved[1]) / (2 * eps)


def families(trainer: RLEditTrainer) -> dict[str, list[torch.nn.Parameter]]:
    """The parameter families the check follows: the network's weights and each per-module scalar that is used."""
    net, hp = trainer.method.hypernet, trainer.method.hparams
    chosen = {"network": list(net.nets.parameters())}
    used = {"log_lr": True, "ridge_log": True, "memory_log": hp.memory_init > 0, "corpus_log": hp.corpus_init > 0}
    chosen.update({label: [getattr(net, attr)] for label, attr in SCALARS.items() if used[attr]})
    return chosen


def check(trainer: RLEditTrainer, step, features, epsilons: list[float], per_component: float = 0.0) -> list[dict]:
    """One row per parameter family: ‖g‖ against the finite differences along d = g / ‖g‖ (and with
    ``per_component`` > 0, each scalar family's whole gradient by differences of that size)."""
    chosen = families(trainer)
    for params in chosen.values():
        for p in params:
            p.requires_grad_(True)
            p.grad = None
    with torch.enable_grad():
        loss = step_loss(trainer, step, features)
        loss.backward()
    base = loss.item()
    rows = []
    for label, params in chosen.items():
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        row = {"family": label, "loss": base, "gradient_norm": norm, "finite_differences": {}}

        def along_gradient(t: float, params=params, grads=grads, norm=norm) -> None:
            for p, g in zip(params, grads):
                p.add_(g, alpha=t / norm)

        if norm > 0:
            for eps in epsilons:
                row["finite_differences"][str(eps)] = central_difference(trainer, step, features, along_gradient, eps)
        if per_component and label != "network":  # the whole gradient of a scalar family, one module at a time
            row.update(component_check(trainer, step, features, params[0], grads[0], per_component))
        rows.append(row)
    return rows


def component_check(trainer: RLEditTrainer, step, features, param: torch.nn.Parameter, grad: torch.Tensor,
                    eps: float) -> dict:
    """The finite-difference gradient of a per-module scalar vector, one entry at a time, against the trainer's:
    their cosine and norm ratio."""
    measured = torch.zeros_like(grad)
    for i in range(param.numel()):
        def along_entry(t: float, i=i) -> None:
            param.view(-1)[i] += t

        measured.view(-1)[i] = central_difference(trainer, step, features, along_entry, eps)
    cosine = float(torch.nn.functional.cosine_similarity(grad.view(1, -1), measured.view(1, -1)))
    return {"gradient": grad.view(-1).tolist(), "finite_difference_gradient": measured.view(-1).tolist(),
            "cosine": cosine, "norm_ratio": float(grad.norm() / measured.norm().clamp_min(1e-30))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", required=True, help="an RL training experiment file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--init", default=None, help="start from this editor checkpoint (a trained network: at the "
                        "identity initialisation every block's relu sits on its kink, where a central difference "
                        "halves the network's one-sided derivative)")
    parser.add_argument("--warm", type=int, default=10, help="edit steps the editor applies before the checked one")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1e-2, 1e-3])
    parser.add_argument("--per-component", type=float, default=0.0, metavar="EPS",
                        help="also difference each per-module scalar on its own (two losses per module and family)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    hparams = load_hparams(args.hparams, args.set)
    method = hparams.method
    editor = Editor.from_model_hparams(hparams.model, method)
    requests = load_requests(method.train.train_data, "train")
    out = Path(args.out)
    trainer = RLEditTrainer(editor, requests, out / "unused", progress=False, init_from=args.init)
    episode = trainer._draw_episode(trainer.lanes[0])
    batch = method.train.batch
    for w in range(args.warm):
        trainer.apply_step(trainer._tokenise(episode[w * batch:(w + 1) * batch]))
    step = trainer._tokenise(episode[args.warm * batch:(args.warm + 1) * batch])
    with trainer._upper_layers_only():
        features = capture_features(editor.model, editor.targets, step.edit)
    trainer.method.fold_statistics([features])  # the normaliser takes the step's features first, as in training
    rows = check(trainer, step, features, args.epsilons, args.per_component)
    summary = {"format": "rledit-meta-gradient-check@1", "command": command_line(), "hparams": args.hparams,
               "overrides": args.set, "init": args.init, "passes": method.passes, "refine": method.refine, "warm_steps": args.warm,
               "rledit": rledit.__version__, "torch": torch.__version__, "rows": rows}
    write_text_atomically(out / "check.json", json.dumps(summary, indent=1) + "\n")
    eps = [str(e) for e in args.epsilons]
    title = (f"Meta-gradient check: `{summary['command']}` ({method.passes} passes, refine {method.refine}, "
             f"after {args.warm} steps; loss {rows[0]['loss']:.4f})")
    lines = [title, "",
             "| family | predicted ‖g‖ | " + " | ".join(f"finite difference ε={e}" for e in eps)
             + " | cosine with the finite-difference gradient | ‖g‖ / its norm |",
             "|---|---:|" + "---:|" * len(eps) + "---:|---:|"]
    lines += [f"| {r['family']} | {r['gradient_norm']:.4g} | "
              + " | ".join(f"{r['finite_differences'].get(e, float('nan')):.4g}" for e in eps)
              + (f" | {r['cosine']:.3f} | {r['norm_ratio']:.2f} |" if "cosine" in r else " | | |") for r in rows]
    write_text_atomically(out / "check.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
