"""Where do an edit's keys stand apart from the keys it must leave alone? A diagnostic for choosing edited modules.

For every layer of the model, at the input of gate_proj/up_proj (the normalised residual stream) and of
down_proj (the MLP's hidden activation), keys are read at the answer positions of zsRE *training* records of the
"metric" half (never scored by the benchmark): each record's edit prompt with its new target (the edit), its
first rephrase with the same target (the paraphrase), its NQ locality question with "?" and answer, and its
same-relation neighbour (the edit's question template about another subject, rledit.eval.relations). C_0 is the
second moment over every token of the "zsre-train-questions" corpus (the other half), as the zsRE rule uses it.

For one edit key k, the ridge-with-C_0 solve writes along u = A⁻¹k / (kᵀA⁻¹k), A = C_0 + ρ·(tr C_0 / d)·I, so
that the edit moves its own output by exactly one unit. A key x then moves by uᵀx. Reported per module and ρ:

- transfer: mean uᵀk' over the paraphrase's key at the same answer token (1 = the edit carries over fully;
  records whose paraphrase has another number of answer tokens are left out);
- nq: root-mean-square uᵀx over the NQ answer keys (0 = unrelated questions untouched);
- relation: the same over the same-relation neighbours' answer keys.

With ``--invariance w``, A also holds w·(tr C_0 / tr C_inv)·C_inv, where C_inv is the second moment of how a
paraphrase moves the key (paraphrase minus prompt, at each answer position, over "zsre-train-rephrases" pairs of
the training split's other half): rledit's ``invariance_weight``, which steers the edit off the directions a
paraphrase moves.

Each is given over every answer position and over the first alone (the prompt's last token, whose key the
answer's later tokens do not help to tell apart). A module whose transfer is high while both spills are low gives an editor room to write edits that generalise
and stay local. The diagnostic sees neither the trained network nor the key memory nor the passes: it compares
where the untrained rule's keys sit, nothing more.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/key_separability.py --records 300 --out runs/key-separability
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from validation_sweep import validation_stream

import rledit
from rledit.eval.protocols import as_question
from rledit.eval.relations import same_relation_pair
from rledit.files import command_line, write_text_atomically
from rledit.methods.memit.corpus import load_corpus, paraphrase_pairs
from rledit.methods.memit.stats import compute_paraphrase_shifts
from rledit.models import load_model
from rledit.targets import resolve_targets
from rledit.tokens import encode, model_inputs

SITES = {"mlp_in": "gate_proj", "down_in": "down_proj"}  # site -> the module whose input is read


@torch.no_grad()
def read_keys(model, tokenizer, prompts: list[str], answers: list[str] | None, batch: int,
              desc: str = "", only: list[int] | None = None) -> dict[tuple[int, str], list[torch.Tensor]]:
    """(layer, site) -> per prompt, its keys (n_positions, d) fp32 at the answer positions; without ``answers``
    the second moment (d × d, fp64) over every real token instead. ``only``: these layers (default: all)."""
    layers = model.model.layers
    chosen = range(len(layers)) if only is None else only
    sites = [(i, s) for i in chosen for s in SITES]
    out: dict = {key: [] for key in sites} if answers is not None else {key: 0.0 for key in sites}
    count = 0
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def read(module, args):
            captured[key] = args[0].float()
        return read

    handles = [getattr(layers[i].mlp, SITES[site]).register_forward_pre_hook(hook((i, site))) for i, site in sites]
    try:
        for start in tqdm(range(0, len(prompts), batch), desc=desc, leave=False):
            tokens = encode(tokenizer, prompts[start:start + batch], answers[start:start + batch] if answers else None)
            mask = tokens.answer_mask if answers is not None else tokens.attention_mask.bool()
            count += int(mask.sum())
            model(**model_inputs(model, tokens), use_cache=False, logits_to_keep=1)
            for key, hidden in captured.items():
                if answers is None:
                    rows = hidden[mask]
                    out[key] = out[key] + (rows.T @ rows).double()  # fp32 products of one batch, summed in fp64
                else:
                    out[key] += [hidden[row][mask[row]] for row in range(hidden.shape[0])]
    finally:
        for handle in handles:
            handle.remove()
    return out if answers is not None else {key: gram / count for key, gram in out.items()}


def paraphrase_shift_moments(model, tokenizer, pairs, batch: int,
                             only: list[int] | None) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, site) -> C_inv = E[(k' - k)(k' - k)ᵀ] (fp64) over the answer positions of training prompts k and
    their paraphrases k' (rledit's ``invariance_weight``), computed as the editor computes it."""
    layers = range(len(model.model.layers)) if only is None else only
    targets = resolve_targets(model, list(layers), list(SITES.values()))
    moments, _ = compute_paraphrase_shifts(model, tokenizer, targets, pairs, batch)
    site_of = {module: site for site, module in SITES.items()}
    return {(t.layer, site_of[t.name.rsplit(".", 1)[-1]]): moments[t.name] for t in targets}


def measures(c0: torch.Tensor, edits: list[torch.Tensor], paraphrases: list[torch.Tensor | None],
             nq: list[torch.Tensor], relation: list[torch.Tensor], rho: float, first: bool) -> dict[str, float]:
    """transfer, nq and relation (module docstring) of the edit keys under A = C_0 + ρ·(tr C_0 / d)·I, over
    every answer position, or with ``first`` over the first (the prompt's last token) alone."""
    def rows(keys: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([k[:1] if first else k for k in keys]).double()

    d = c0.shape[0]
    a = c0 + rho * (c0.trace() / d) * torch.eye(d, dtype=c0.dtype)
    pairs = [(e, p) for e, p in zip(edits, paraphrases) if p is not None]
    k = rows([e for e, _ in pairs])
    u = torch.linalg.solve(a, k.T).T  # (n, d): A⁻¹k per key (A is symmetric)
    u = u / (u * k).sum(-1, keepdim=True)
    return {"transfer": float((u * rows([p for _, p in pairs])).sum(-1).mean()),
            "nq": float(((u @ rows(nq).T) ** 2).mean().sqrt()),
            "relation": float(((u @ rows(relation).T) ** 2).mean().sqrt())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--records", type=int, default=300, help="validation records (edit, paraphrase, NQ, neighbour)")
    parser.add_argument("--corpus-samples", type=int, default=2000, help="zsre-train-questions texts for C_0")
    parser.add_argument("--rho", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--invariance", type=float, nargs="+", default=[0.0],
                        help="weights w of the paraphrase shifts: A = C_0 + w·(tr C_0 / tr C_inv)·C_inv + ρ·(tr C_0 / d)·I")
    parser.add_argument("--invariance-pairs", type=int, default=2000, help="zsre-train-rephrases pairs for C_inv")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="read these layers only (default: all)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    records = validation_stream(args.records, 0)
    corpus = load_corpus("zsre-train-questions", args.corpus_samples)
    nq = [(as_question(item.prompt), item.answer) for r in records for item in r.locality if item.kind == "nq"][:args.records]
    neighbours = [pair for pair in (same_relation_pair(r) for r in records) if pair is not None]
    only = args.layers
    edit_keys = read_keys(model, tokenizer, [r.prompt for r in records], [r.target_new for r in records], args.batch,
                          desc="edits", only=only)
    para_keys = read_keys(model, tokenizer, [r.rephrase_prompts[0] for r in records],
                          [r.target_new for r in records], args.batch, desc="paraphrases", only=only)
    nq_keys = read_keys(model, tokenizer, [p for p, _ in nq], [a for _, a in nq], args.batch, desc="nq", only=only)
    rel_keys = read_keys(model, tokenizer, [p for p, _ in neighbours], [a for _, a in neighbours], args.batch,
                         desc="neighbours", only=only)
    second_moments = read_keys(model, tokenizer, corpus.texts, None, args.batch, desc="C_0", only=only)
    shifts = (paraphrase_shift_moments(model, tokenizer, paraphrase_pairs("zsre-train-rephrases", args.invariance_pairs),
                                       args.batch, only) if any(w > 0 for w in args.invariance) else {})
    rows = []
    for (layer, site) in tqdm(sorted(edit_keys), desc="modules"):
        c0 = second_moments[(layer, site)]
        edits = edit_keys[(layer, site)]
        paraphrases = [p if p.shape == k.shape else None for k, p in zip(edits, para_keys[(layer, site)])]
        for weight, rho in itertools.product(args.invariance, args.rho):
            penalty = c0
            if weight > 0:
                c_inv = shifts[(layer, site)]
                penalty = c0 + weight * (c0.trace() / c_inv.trace()) * c_inv
            for first in (False, True):
                rows.append({"layer": layer, "site": site, "invariance": weight, "rho": rho,
                             "positions": "first" if first else "all",
                             **measures(penalty, edits, paraphrases, nq_keys[(layer, site)], rel_keys[(layer, site)],
                                        rho, first)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts = {"command": command_line(), "model": args.model, "records": len(records), "nq": len(nq),
             "neighbours": len(neighbours), "corpus_texts": len(corpus.texts), "corpus": corpus.identifier,
             "paired_paraphrases": sum(p.shape == k.shape for k, p in zip(*(keys[min(edit_keys)]
                                                                            for keys in (edit_keys, para_keys)))),
             "invariance_pairs": args.invariance_pairs if shifts else 0,
             "rledit": rledit.__version__, "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1)}
    write_text_atomically(out / "key_separability.json", json.dumps({**facts, "rows": rows}, indent=1) + "\n")
    lines = [(f"Key separability ({args.model}; {len(records)} zsRE validation records, {len(nq)} NQ questions, "
              f"{len(neighbours)} same-relation neighbours, C_0 over {len(corpus.texts)} zsre-train-questions texts)"),
             "", "| layer | site | w | ρ | answer positions | transfer | nq spill | relation spill | transfer / relation |",
             "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['site']} | {r['invariance']:g} | {r['rho']:g} | {r['positions']} | {r['transfer']:.3f} | {r['nq']:.3f} | "
              f"{r['relation']:.3f} | "
              f"{r['transfer'] / max(r['relation'], 1e-9):.2f} |" for r in rows]
    write_text_atomically(out / "key_separability.md", "\n".join(lines) + "\n\nCommand: `" + facts["command"] + "`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
