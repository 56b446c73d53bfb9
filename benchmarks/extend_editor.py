"""Write a trained editor extended to more edited layers: the trained modules keep their network embeddings,
normalisers and scalars; each new module starts at the identity (its rows of every block's per-module scale are
0, so the blocks pass its features through: the untrained gradient-like editor) with the trained modules'
geometric-mean scalars and a fresh normaliser. Optionally every module's step size is multiplied by ``scale`` (``{"lr": 0.5}``: the step split between
the two layer groups), as chosen by benchmarks/validation_sweep.py on training data.

    .venv/bin/python benchmarks/extend_editor.py --checkpoint benchmarks/results/training/zsre-retuned-passes \\
        --layers 16 17 18 19 24 25 26 27 --scale '{"lr": 0.5}' --out runs/zsre-retuned-passes-16-19
"""

from __future__ import annotations

import argparse
import json

import torch
from validation_sweep import scale_scalars

from rledit.checkpoints import read_checkpoint
from rledit.editor import Editor
from rledit.files import command_line
from rledit.methods.memory import split_memory_state
from rledit.methods.rledit.net import LEARNED_SCALARS, HyperNetwork
from rledit.models import load_model


def trained_network(saved) -> HyperNetwork:
    """The hypernetwork of checkpoint ``saved``, on its own (no model attached)."""
    hp = saved.hparams
    net = HyperNetwork({name: (d_in, d_out) for name, d_in, d_out in saved.targets}, hp["rank"], hp["n_blocks"],
                       hp["lr_init"])
    state, _ = split_memory_state(saved.state)
    net.load_state_dict(state)
    return net


def extend(trained: HyperNetwork, wider: HyperNetwork) -> list[str]:
    """Copy ``trained`` into ``wider`` (built for the same modules and more) and return the new modules: they
    start at the identity with the trained modules' geometric-mean scalars."""
    new_modules = []
    with torch.no_grad():
        for key, net in trained.nets.items():
            for block, wide_block in zip(net.blocks, wider.nets[key].blocks, strict=True):
                for name in ("A", "B", "bias"):
                    getattr(wide_block, name).copy_(getattr(block, name))
                wide_block.scale.zero_()  # a zero row: the block passes that module's features through
                wide_block.shift.zero_()
        for name in wider.module_shapes:
            _, wide_index, wide_slot = wider.slots[name]
            if name not in trained.module_shapes:
                new_modules.append(name)
                for attr, _ in LEARNED_SCALARS.values():
                    getattr(wider, attr)[wide_slot] = getattr(trained, attr).mean()
                continue
            key, index, slot = trained.slots[name]
            for block, wide_block in zip(trained.nets[key].blocks, wider.nets[key].blocks):
                wide_block.scale[wide_index].copy_(block.scale[index])
                wide_block.shift[wide_index].copy_(block.shift[index])
            wider.normalizers[wide_slot].load_state_dict(trained.normalizers[slot].state_dict())
            for attr, _ in LEARNED_SCALARS.values():
                getattr(wider, attr)[wide_slot] = getattr(trained, attr)[slot]
    return new_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="trained editor to start from (name or folder)")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="all edited layers, old and new")
    parser.add_argument("--scale", default="{}", help="JSON multipliers of every module's scalars, e.g. "
                        "'{\"lr\": 0.5}'")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    saved = read_checkpoint(args.checkpoint)
    missing = sorted(set(saved.layers) - set(args.layers))
    if missing:
        raise SystemExit(f"--layers must include the trained editor's layers {saved.layers}; missing {missing}")
    loaded = load_model(args.model)
    wider = Editor.from_pretrained(loaded.model, tokenizer=loaded.tokenizer, method=saved.method,
                                   hparams=saved.hparams, layers=args.layers, modules=saved.modules)
    new_modules = extend(trained_network(saved), wider.method.hypernet)
    scale = json.loads(args.scale)
    scale_scalars(wider.method.hypernet, scale)
    wider.save_checkpoint(args.out, extra={"extended_from": args.checkpoint, "new_modules": new_modules,
                                           "scale": scale, "command": command_line(),
                                           "scalars": wider.method.hypernet.scalars()})
    print(f"wrote {args.out}: new modules {new_modules}; scalars {wider.method.hypernet.scalars()}")


if __name__ == "__main__":
    main()
