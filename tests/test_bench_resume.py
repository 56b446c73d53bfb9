"""A benchmark stopped midway goes on from its saved progress to the results of a run never stopped."""

import json

import pytest
import torch
from tiny import tiny_model

from rledit.bench import PROGRESS_FILE, BenchSpec, run_benchmark
from rledit.cli import main
from rledit.deltas import model_hash
from rledit.editor import Editor


def _killed_on_step(monkeypatch, step: int) -> None:
    """Editor.apply raises on its ``step``-th call, as a kill in the middle of that step would stop the run."""
    real, calls = Editor.apply, []

    def apply(self, edits):
        calls.append(1)
        if len(calls) == step:
            raise RuntimeError("killed")
        return real(self, edits)

    monkeypatch.setattr(Editor, "apply", apply)


@pytest.mark.parametrize("method, hparams, layers", [("rledit", {"memory_init": 1.0}, None), ("ultraedit", None, None),
                                                     ("alphaedit", None, [1, 2])])
def test_a_stopped_run_resumes_to_the_results_of_a_run_never_stopped(tokenizer, tmp_path, monkeypatch, method,
                                                                     hparams, layers):
    spec = BenchSpec(method=method, hparams=hparams, data="zsre", steps=4, batch=2, timing="curve", eval_every=2,
                     protocols=["zsre-token-acc@1"], layers=layers,
                     modules=["down_proj"] if method == "alphaedit" else None)
    model = tiny_model("llama")
    before = model_hash(model)
    torch.manual_seed(0)
    whole, whole_result = run_benchmark(model, tokenizer, "tiny-llama", spec, progress=False)
    progress_dir = tmp_path / "run.partial"
    torch.manual_seed(0)
    with monkeypatch.context() as patch:
        _killed_on_step(patch, 4)
        with pytest.raises(RuntimeError, match="killed"):
            run_benchmark(model, tokenizer, "tiny-llama", spec, progress=False, progress_dir=progress_dir,
                          save_every=0.0)
    assert model_hash(model) == before and (progress_dir / PROGRESS_FILE).is_file()
    torch.manual_seed(123)  # the saved random state is restored, whatever it is now
    resumed, resumed_result = run_benchmark(model, tokenizer, "tiny-llama", spec, progress=False,
                                            progress_dir=progress_dir, resume=True, save_every=0.0)
    assert resumed["resumed"][0]["from_step"] == 3
    assert resumed["metrics_by_protocol"] == whole["metrics_by_protocol"] and resumed["curve"] == whole["curve"]
    assert [r.scores for r in resumed_result.records] == [r.scores for r in whole_result.records]
    assert len(resumed["step_seconds"]) == len(resumed["floor_seconds"]) == 4
    assert model_hash(model) == before


def test_the_command_line_refuses_to_start_over_saved_progress_and_skips_finished_runs(tiny_folder, tmp_path,
                                                                                        monkeypatch):
    out = tmp_path / "results"
    args = ["bench", "--methods", "ultraedit", "--model", str(tiny_folder), "--data", "zsre", "--steps", "3",
            "--batch", "2", "--protocols", "zsre-token-acc@1", "--save-every", "0", "--out", str(out)]
    with monkeypatch.context() as patch:
        _killed_on_step(patch, 3)
        assert main(args) == 1  # the error is reported, the progress of steps 1-2 kept
    assert (out / "ultraedit.partial" / PROGRESS_FILE).is_file() and not (out / "ultraedit.json").exists()
    assert main(args) == 1  # without --resume the saved progress is not overwritten
    assert (out / "ultraedit.partial" / PROGRESS_FILE).is_file()
    assert main(args + ["--resume"]) == 0
    summary = json.loads((out / "ultraedit.json").read_text())
    assert summary["resumed"][0]["from_step"] == 2 and summary["n_edits"] == 6
    assert not (out / "ultraedit.partial").exists()  # gone once the results are written
    written = (out / "ultraedit.json").stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0 and (out / "ultraedit.json").stat().st_mtime_ns == written  # done already
