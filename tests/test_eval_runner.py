"""The lifelong runner's timings, its unedited references, and the result files it writes."""

import copy
import json
import time

import pytest
import torch

import rledit
from rledit.data import load_requests
from rledit.eval import compute_references, evaluate, run_lifelong, write_results
from rledit.files import command_line

N_STEPS, PER_STEP = 3, 2


def step_noise(model, step: int) -> torch.Tensor:
    """The deterministic change edit step ``step`` (1-based) makes to the last MLP's output weight."""
    weight = model.model.layers[-1].mlp.down_proj.weight
    return 2.0 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(step))


def add_noise(model, step: int) -> None:
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.add_(step_noise(model, step))


def model_after(original, n_steps: int):
    """An independent copy of ``original`` with the first ``n_steps`` steps applied."""
    model = copy.deepcopy(original)
    for step in range(1, n_steps + 1):
        add_noise(model, step)
    return model


@pytest.fixture
def requests():
    return load_requests("zsre", split="eval", limit=N_STEPS * PER_STEP)


def run(llama, tokenizer, requests, timing, **kwargs):
    """Run the lifelong loop on a copy of ``llama``; returns (result, sizes of the steps apply_step saw)."""
    model, seen = copy.deepcopy(llama), []

    def apply_step(step_requests):
        seen.append([requests.index(r) for r in step_requests])
        add_noise(model, len(seen))
        time.sleep(0.01)

    steps = [requests[i : i + PER_STEP] for i in range(0, len(requests), PER_STEP)]
    result = run_lifelong(model, tokenizer, steps, apply_step, timing=timing, batch_size=4, progress=False, **kwargs)
    return result, seen


def scores(records):
    return [(r.protocol, r.index, r.scores) for r in records]


def expected_scores(llama, tokenizer, requests, n_steps, indices, references):
    """What an evaluation of edits ``indices`` after ``n_steps`` steps must give, computed independently."""
    result = evaluate(model_after(llama, n_steps), tokenizer, [requests[i] for i in indices], references=references)
    return [(r.protocol, indices[r.index], r.scores) for r in result.records]


def test_end_scores_every_edit_once_after_the_last_step(llama, tokenizer, requests):
    result, seen = run(llama, tokenizer, requests, "end")
    assert seen == [[0, 1], [2, 3], [4, 5]]
    references = compute_references(llama, tokenizer, requests)  # from the unedited model
    assert scores(result.records) == expected_scores(llama, tokenizer, requests, N_STEPS, range(6), references)
    assert {r.after_steps for r in result.records} == {N_STEPS}
    assert [r.step for r in result.records if r.protocol == "zsre-token-acc@2"] == [1, 1, 2, 2, 3, 3]
    # locality compares with the unedited model: references recomputed on the edited model would give 100
    assert result.metrics["zsre-token-acc@2"]["locality"] < 100.0
    assert result.metrics["gen-exact@1"]["locality"] < 100.0
    unedited = evaluate(llama, tokenizer, requests)
    assert scores(result.unedited.records) == scores(unedited.records)
    assert result.unedited.metrics == unedited.metrics
    assert result.unedited.metrics["zsre-token-acc@2"]["locality"] == 100.0
    assert {r.after_steps for r in result.unedited.records} == {0}
    assert len(result.step_seconds) == N_STEPS and min(result.step_seconds) >= 0.01
    assert (result.curve, result.eval_every, result.n_examples) == ([], None, 6)


def test_immediate_scores_each_step_right_after_it(llama, tokenizer, requests):
    result, _ = run(llama, tokenizer, requests, "immediate")
    references = compute_references(llama, tokenizer, requests)
    expected = []
    for step in range(1, N_STEPS + 1):
        step_records = [r for r in result.records if r.after_steps == step]
        assert {r.step for r in step_records} == {step}
        indices = range((step - 1) * PER_STEP, step * PER_STEP)
        expected = expected_scores(llama, tokenizer, requests, step, indices, references)
        assert scores(step_records) == expected
    efficacies = [r.scores["efficacy"] for r in result.records if r.protocol == "zsre-token-acc@2"]
    assert len(efficacies) == 6
    assert result.metrics["zsre-token-acc@2"]["efficacy"] == pytest.approx(sum(efficacies) / 6)


def test_curve_scores_all_edits_so_far_at_checkpoints(llama, tokenizer, requests):
    result, _ = run(llama, tokenizer, requests, "curve", eval_every=2)
    assert [(p.step, p.n_edits) for p in result.curve] == [(2, 4), (3, 6)]
    references = compute_references(llama, tokenizer, requests)
    for point in result.curve:
        expected = evaluate(model_after(llama, point.step), tokenizer, requests[: point.n_edits],
                            references=references)
        assert point.metrics == expected.metrics
        assert point.counts == expected.counts
        assert scores([r for r in result.records if r.after_steps == point.step]) == scores(expected.records)
    assert result.metrics == result.curve[-1].metrics
    assert result.eval_every == 2


def test_runner_rejects_bad_arguments(llama, tokenizer, requests):
    def apply_step(_):
        return None

    with pytest.raises(ValueError, match="timing must be one of"):
        run_lifelong(llama, tokenizer, [requests], apply_step, timing="later")
    with pytest.raises(ValueError, match="eval_every"):
        run_lifelong(llama, tokenizer, [requests], apply_step, timing="curve", eval_every=0)
    with pytest.raises(ValueError, match="no edit steps"):
        run_lifelong(llama, tokenizer, [], apply_step)
    with pytest.raises(TypeError, match="step 1: item 0 is a dict"):
        run_lifelong(llama, tokenizer, [[{"prompt": "a", "target_new": "b"}]], apply_step)


def test_write_results_summary_and_records(llama, tokenizer, requests, tmp_path):
    result, _ = run(llama, tokenizer, requests, "end")
    meta = {"model": "tiny-llama", "model_revision": "abc123", "data": "zsre", "seed": 3, "method": "noise"}
    path_json, path_records = write_results(tmp_path / "run.json", result, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.jsonl"]  # no temporary files left
    summary = json.loads(path_json.read_text())
    assert summary["protocols"] == ["gen-exact@1", "zsre-token-acc@2"]
    assert (summary["timing"], summary["model"], summary["model_revision"]) == ("end", "tiny-llama", "abc123")
    assert (summary["data"], summary["seed"], summary["method"]) == ("zsre", 3, "noise")
    assert summary["rledit_version"] == rledit.__version__
    assert summary["command"] == command_line()
    assert summary["n_examples"] == 6 and summary["n_steps"] == N_STEPS
    assert summary["edits_per_step"] == [PER_STEP] * N_STEPS
    assert summary["metrics"] == result.metrics and summary["unedited"] == result.unedited.metrics
    assert set(summary["metrics"]["zsre-token-acc@2"]) >= {"efficacy", "generalization", "locality", "specificity"}
    assert summary["step_seconds"] == result.step_seconds
    assert summary["started_at"] <= summary["finished_at"]
    assert summary["records_file"] == "run.jsonl"

    lines = [json.loads(line) for line in path_records.read_text().splitlines()]
    assert len(lines) == 2 * 2 * 6  # (unedited + after the last step) x protocols x examples
    first = lines[0]
    assert (first["protocol"], first["index"], first["after_steps"], first["step"]) == ("gen-exact@1", 0, 0, 1)
    assert first["texts"]["prompt"] == requests[0].prompt
    assert first["texts"]["target_new"] == requests[0].target_new
    assert set(first["scores"]) == {"efficacy", "generalization", "locality"}
    assert "generated" in first["outputs"]
    assert [line["scores"] for line in lines[12:]] == [r.scores for r in result.records]

    with pytest.raises(ValueError, match="filled in from the result"):
        write_results(tmp_path / "again.json", result, {"metrics": {}})
    with pytest.raises(ValueError, match="must end in .json"):
        write_results(tmp_path / "run.txt", result, meta)


def test_write_results_of_an_unedited_evaluation(llama, tokenizer, requests, tmp_path):
    result = evaluate(llama, tokenizer, requests[:2], ["zsre-token-acc"])
    write_results(tmp_path / "eval.json", result, {"model": "tiny-llama"})
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["timing"] == "unedited"
    assert summary["metrics"] == summary["unedited"] == result.metrics
    assert summary["counts"]["zsre-token-acc@2"]["efficacy"] == 2
    assert summary["seed"] is None and summary["data"] is None
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 2
