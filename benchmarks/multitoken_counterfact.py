"""Write the CounterFact edit records whose new target is two or more SmolLM2 tokens (an ablation data file).

On the full CounterFact edit split 88% of targets are one token; this subset asks the locate-then-edit methods for
multi-token answers, as zsRE does, on otherwise the same kind of records. Deterministic: same input, same output.

    .venv/bin/python benchmarks/multitoken_counterfact.py benchmarks/results/ablation-cf-multitoken/counterfact_edit_multitoken.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json

from rledit.data import dataset_file, read_records
from rledit.files import atomic_file
from rledit.models import load_model
from rledit.tokens import target_token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output .json.gz (same record format as the bundled CounterFact edit split)")
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts the target tokens")
    parser.add_argument("--min-tokens", type=int, default=2)
    args = parser.parse_args()
    tokenizer = load_model(args.model).tokenizer
    source = dataset_file("counterfact", "eval")
    records = read_records(source)
    kept = [r for r in records
            if len(target_token_ids(tokenizer, r["prompt"], r["target_new"])[1]) >= args.min_tokens]
    with atomic_file(args.out) as tmp:  # mtime=0: the same records give the same bytes
        tmp.write_bytes(gzip.compress(json.dumps(kept, ensure_ascii=False).encode("utf-8"), mtime=0))
    print(f"kept {len(kept)} of {len(records)} records of {source.name} with >= {args.min_tokens} target tokens")


if __name__ == "__main__":
    main()
