"""Several processes: scoring (teacher-forced and free generation) shared out over 2 CPU processes (gloo, launched by torch.distributed.run as
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
              "gen-exact@1", "--batch-size", "4"]
    one = rledit(["eval", *common, "--out", str(tmp_path / "one.json")], 1, env)
    assert one.returncode == 0, one.stderr[-4000:]
    two = rledit(["eval", *common, "--out", str(tmp_path / "two.json")], 2, env)
    assert two.returncode == 0, two.stderr[-4000:]
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (first["processes"], second["processes"]) == (1, 2)
    assert first["metrics"] == second["metrics"] and first["counts"] == second["counts"]
    records = [[json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
               for n in ("one", "two")]
    assert len(records[0]) == len(records[1]) == 3 * len(FACTS)  # one record per fact and protocol
    for a, b in zip(*records):
        assert a["scores"] == b["scores"]
        assert a["outputs"] == b["outputs"]  # the argmax (or greedily decoded) text of every prompt


def test_a_lifelong_run_scored_by_two_processes_matches_one(tiny_run, tmp_path):
    """Every process applies the same edits; the scoring of the run is shared out and gathered."""
    folder, data = tiny_run
    env = dict(os.environ)
    common = ["bench", "--model", str(folder), "--data", str(data), "--split", "eval", "--method", "ultraedit",
              "--steps", "3", "--batch", "3", "--timing", "curve", "--eval-every", "1", "--layers", "2", "3",
              "--protocols", "zsre-token-acc@2"]
    for processes, name in ((1, "one"), (2, "two")):
        done = rledit([*common, "--out", str(tmp_path / f"{name}.json")], processes, env)
        assert done.returncode == 0, done.stderr[-4000:]
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (first["processes"], second["processes"]) == (1, 2)
    assert first["metrics"] == second["metrics"] and first["unedited"] == second["unedited"]
    assert first["curve"] == second["curve"] and len(first["curve"]) == 3


# ------------------------------------------------------------------------------------ data-parallel training
def train_yaml(folder, tmp_path, **train) -> str:
    settings = {"episodes": 2, "steps_per_episode": 2, "batch": 2, "back_depth": 2, "meta_lr": 1e-3,
                "scalar_meta_lr": 0.3, "checkpoint_every": 1, "loc_reference": "unedited", "validation_size": 0,
                "train_data": "zsre"} | train
    path = tmp_path / f"train-{len(list(tmp_path.glob('train-*.yaml')))}.yaml"
    path.write_text(json.dumps({"defaults": {"method": "methods/rledit.yaml"},
                                "model": {"name": str(folder), "layers": [2, 3]},
                                "method": {"rank": 16, "lr_init": 30.0, "train": settings}}))
    return str(path)


def trained(out) -> dict:
    from rledit.checkpoints import read_checkpoint

    return read_checkpoint(out / "editor").state


def test_two_training_processes_on_the_same_episodes_equal_one(tiny_run, tmp_path):
    """Same episodes on both ranks: the averaged gradient is each rank's, so the run must equal one process."""
    import torch

    folder, _ = tiny_run
    env = dict(os.environ)
    hparams = train_yaml(folder, tmp_path, distinct_episodes=False)
    for processes, name in ((1, "one"), (2, "two")):
        done = rledit(["train", "--hparams", hparams, "--limit", "8", "--out", str(tmp_path / name)], processes, env)
        assert done.returncode == 0, done.stderr[-4000:]
    one, two = trained(tmp_path / "one"), trained(tmp_path / "two")
    assert one.keys() == two.keys()
    counted = {k for k in one if k.endswith((".count", ".m2"))}  # the normalisers saw every row twice
    assert counted and all(torch.allclose(one[k].double(), two[k].double(), atol=1e-6) for k in one.keys() - counted)
    for key in (k for k in counted if k.endswith(".count")):
        m2 = key[: -len("count")] + "m2"
        assert torch.equal(two[key], 2 * one[key])  # ... so their variance m2 / count is the same
        assert torch.allclose(two[m2] / two[key], one[m2] / one[key], atol=1e-9)


def test_data_parallel_training_shares_one_editor_and_resumes_exactly(tiny_run, tmp_path):
    """Own episodes per rank: every rank ends with the same editor (checked by the trainer at every checkpoint),
    it differs from one process's, and a 2-process run resumes exactly; resuming it with 1 process is refused."""
    import torch

    folder, _ = tiny_run
    env = dict(os.environ)
    straight = rledit(["train", "--hparams", train_yaml(folder, tmp_path), "--limit", "8",
                       "--out", str(tmp_path / "straight")], 2, env)
    assert straight.returncode == 0, straight.stderr[-4000:]
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in log if r["kind"] == "episode"] == [1, 2]  # one log, written by rank 0
    single = rledit(["train", "--hparams", train_yaml(folder, tmp_path), "--limit", "8",
                     "--out", str(tmp_path / "single")], 1, env)
    assert single.returncode == 0, single.stderr[-4000:]
    a, b = trained(tmp_path / "straight"), trained(tmp_path / "single")
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # rank 1's episodes changed the editor
    split = rledit(["train", "--hparams", train_yaml(folder, tmp_path, episodes=1), "--limit", "8",
                    "--out", str(tmp_path / "split")], 2, env)
    assert split.returncode == 0, split.stderr[-4000:]
    refused = rledit(["train", "--hparams", train_yaml(folder, tmp_path), "--limit", "8", "--resume",
                      "--out", str(tmp_path / "split")], 1, env)
    assert refused.returncode != 0 and "was trained by 2 process(es)" in refused.stderr
    resumed = rledit(["train", "--hparams", train_yaml(folder, tmp_path), "--limit", "8", "--resume",
                      "--out", str(tmp_path / "split")], 2, env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    c = trained(tmp_path / "split")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_two_processes_equal_one_process_running_their_episodes_side_by_side(tiny_run, tmp_path):
    """Own episodes per rank (the memory solve on) against one process with train.episodes_per_step 2: lane 1
    draws rank 1's episodes, the normaliser folds in both lanes' rows and the optimiser steps on the mean of their
    gradients, so both runs end with the same editor; the side-by-side run resumes exactly, and only with as many
    lanes as it ran."""
    import torch

    folder, _ = tiny_run
    env = dict(os.environ)
    settings = {"backtracking": "sampled", "back_samples": 1, "warm_start_max": 1}
    runs = {"two": (2, train_yaml(folder, tmp_path, **settings)),
            "lanes": (1, train_yaml(folder, tmp_path, episodes_per_step=2, **settings))}
    for name, (processes, hparams) in runs.items():
        done = rledit(["train", "--hparams", hparams, "--limit", "10", "--out", str(tmp_path / name)], processes, env)
        assert done.returncode == 0, done.stderr[-4000:]
    two, lanes = trained(tmp_path / "two"), trained(tmp_path / "lanes")
    assert two.keys() == lanes.keys()
    assert all(torch.allclose(two[k].double(), lanes[k].double(), rtol=1e-5, atol=1e-6) for k in two), \
        max((two[k].double() - lanes[k].double()).abs().max().item() for k in two)
    counts = [k for k in two if k.endswith(".count")]
    assert counts and all(torch.equal(two[k], lanes[k]) for k in counts)  # every row of both episodes, once
    log = [json.loads(line) for line in (tmp_path / "lanes" / "train_log.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in log if r["kind"] == "episode"] == [1, 2]
    hparams = runs["lanes"][1]
    split = rledit(["train", "--hparams", train_yaml(folder, tmp_path, episodes=1, episodes_per_step=2, **settings),
                    "--limit", "10", "--out", str(tmp_path / "split")], 1, env)
    assert split.returncode == 0, split.stderr[-4000:]
    refused = rledit(["train", "--hparams", train_yaml(folder, tmp_path, **settings), "--limit", "10", "--resume",
                      "--out", str(tmp_path / "split")], 1, env)
    assert refused.returncode != 0 and "method.train.episodes_per_step: 2 -> 1" in refused.stderr
    resumed = rledit(["train", "--hparams", hparams, "--limit", "10", "--resume", "--out", str(tmp_path / "split")],
                     1, env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = trained(tmp_path / "split")
    assert all(torch.equal(lanes[k], again[k]) for k in lanes)


def test_a_process_group_that_cannot_start_is_refused_before_any_work(tiny_run, tmp_path):
    folder, data = tiny_run
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env |= {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "never.json"
    done = subprocess.run([sys.executable, "-m", "rledit.cli", "eval", "--model", str(folder), "--data", str(data),
                           "--out", str(out)], capture_output=True, text=True, env=env, check=False, timeout=120)
    assert done.returncode == 1 and "the process group of 2 processes could not start" in done.stderr
    assert "MASTER_ADDR" in done.stderr and not out.exists()
