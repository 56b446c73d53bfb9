"""Several processes: scoring shared out over 2 CPU processes (gloo, launched by torch.distributed.run as
accelerate launch would) gives the figures of one process."""

import json
import os
import socket
import subprocess
import sys

import pytest
from tiny import tiny_model, tiny_tokenizer

FACTS = [{"prompt": f"The capital city of {country} is", "target_new": city, "subject": country,
          "rephrase_prompts": [f"What is the capital of {country}? It is"],
          "locality": [{"prompt": f"The currency of {country} is", "answer": "the euro"}]}
         for country, city in [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Poland", "Warsaw"),
                               ("Norway", "Oslo"), ("Japan", "Tokyo"), ("Chile", "Santiago"), ("Peru", "Lima"),
                               ("Greece", "Athens"), ("Egypt", "Cairo"), ("Kenya", "Nairobi")]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_run(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return folder, data


def rledit(args: list[str], processes: int, env_cache) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if processes > 1 else [sys.executable]
    env = {**env_cache, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "rledit.cli", *args], capture_output=True, text=True, env=env,
                          check=False, timeout=300)


def test_two_processes_score_like_one(tiny_run, tmp_path):
    folder, data = tiny_run
    env = dict(os.environ)
    common = ["--model", str(folder), "--data", str(data), "--protocols", "zsre-token-acc@2", "zsre-token-acc@1",
              "--batch-size", "4"]
    one = rledit(["eval", *common, "--out", str(tmp_path / "one.json")], 1, env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = rledit(["eval", *common, "--out", str(tmp_path / "two.json")], 2, env)
    assert two.returncode == 0, two.stderr[-2000:]
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (first["processes"], second["processes"]) == (1, 2)
    assert first["metrics"] == second["metrics"] and first["counts"] == second["counts"]
    records = [[json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
               for n in ("one", "two")]
    assert len(records[0]) == len(records[1]) == 2 * len(FACTS)  # one record per fact and protocol
    for a, b in zip(*records):
        assert a["scores"] == b["scores"]
        assert a["outputs"] == b["outputs"]  # the argmax text of every prompt


def test_a_lifelong_run_scored_by_two_processes_matches_one(tiny_run, tmp_path):
    """Every process applies the same edits; the scoring of the run is shared out and gathered."""
    folder, data = tiny_run
    env = dict(os.environ)
    common = ["bench", "--model", str(folder), "--data", str(data), "--split", "eval", "--method", "ultraedit",
              "--steps", "3", "--batch", "3", "--timing", "curve", "--eval-every", "1", "--layers", "2", "3",
              "--protocols", "zsre-token-acc@2"]
    for processes, name in ((1, "one"), (2, "two")):
        done = rledit([*common, "--out", str(tmp_path / f"{name}.json")], processes, env)
        assert done.returncode == 0, done.stderr[-2000:]
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (first["processes"], second["processes"]) == (1, 2)
    assert first["metrics"] == second["metrics"] and first["unedited"] == second["unedited"]
    assert first["curve"] == second["curve"] and len(first["curve"]) == 3
