"""The lifelong benchmark: every results field, errors before any work, and a real two-method run."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from rledit.bench import BenchSpec, check_spec, run_benchmark
from rledit.bench_report import (
    edited_summary,
    markdown_table,
    plot_curves,
    speed_table,
    write_report,
    write_run,
)
from rledit.cli import main
from rledit.data import DataError
from rledit.deltas import model_hash
from rledit.methods.base import UnknownMethodError
from rledit.types import EditRequestError

DATA = Path(__file__).parent / "data"
FIELDS = {"method", "model", "dataset", "data_file", "steps", "batch", "n_edits", "timing", "protocol", "metrics",
          "unedited", "seconds", "peak_rss_mb", "seed", "version", "command", "metrics_by_protocol", "torch",
          "transformers", "peft", "machine", "started_at", "finished_at"}
SECONDS = {"setup", "apply_total", "apply_step_median", "floor_step_median", "eval"}


def test_results_have_every_field_and_the_model_is_left_as_it_was(tokenizer, tmp_path):
    model = tiny_model("llama")
    before = model_hash(model)
    spec = BenchSpec(method="rledit", data="zsre", steps=2, batch=2, timing="curve", eval_every=1,
                     protocols=["zsre-token-acc@1"])
    summary, result = run_benchmark(model, tokenizer, "tiny-llama", spec, progress=False)
    assert FIELDS <= set(summary) and SECONDS <= set(summary["seconds"])
    assert (summary["dataset"], summary["protocol"], summary["n_edits"]) == ("zsre", "zsre-token-acc@1", 4)
    assert summary["data_sha256"] == hashlib.sha256(Path(summary["data_file"]).read_bytes()).hexdigest()
    assert {"efficacy", "generalization", "locality", "specificity"} <= set(summary["metrics"])
    assert summary["unedited"]["locality"] == 100.0
    assert [p["n_edits"] for p in summary["curve"]] == [2, 4]
    assert len(summary["step_seconds"]) == len(summary["floor_seconds"]) == 2
    assert summary["apply_over_floor"] > 0
    assert summary["machine"]["cpu"] and summary["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert model_hash(model) == before  # the benchmark's deltas are gone afterwards
    path, records = write_run(tmp_path / "run.json", summary, result)
    assert json.loads(path.read_text())["records_file"] == "run.jsonl"
    assert len(records.read_text().splitlines()) == 4 + 2 + 4  # unedited, curve after step 1, after step 2
    table = markdown_table([summary])
    assert "| unedited |" in table and "| rledit |" in table
    speed = speed_table([summary]).splitlines()
    assert len(speed) == 3 and speed[2].startswith("| rledit | ") and speed[2].count("|") == 10
    assert summary["method_setup"] == {}
    assert edited_summary(summary) == "L0-3 gate_proj, up_proj" and table.splitlines()[-1].endswith("up_proj |")
    assert edited_summary({"edited_modules": ["h.0.mlp.c_fc", "h.3.mlp.c_fc"]}) == "L0,3 c_fc"
    assert plot_curves([summary], tmp_path / "curves.png").stat().st_size > 0


def test_a_results_folder_tabulates_every_run_of_its_stream_and_rejects_another(tokenizer, tmp_path):
    spec = BenchSpec(method="ultraedit", data="zsre", steps=1, batch=2, protocols=["zsre-token-acc@1"])
    summary, result = run_benchmark(tiny_model("llama"), tokenizer, "tiny-llama", spec, progress=False)
    write_run(tmp_path / "ultraedit.json", summary, result)  # e.g. written by one process ...
    trained = {**summary, "method": "rledit", "checkpoint": "some-editor", "name": "rledit:some-editor"}
    write_run(tmp_path / "rledit.json", trained, result)  # ... and this one by another
    table, _ = write_report(tmp_path)
    rows = [line.split("|")[1].strip() for line in table.read_text().splitlines() if line.startswith("| ")]
    assert rows == ["method", "unedited", "rledit:some-editor", "ultraedit"] + ["method", "rledit:some-editor",
                                                                              "ultraedit"]  # quality, then speed
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # edits against locality
    write_run(tmp_path / "longer.json", {**summary, "steps": 2}, result)
    with pytest.raises(ValueError, match="steps"):
        write_report(tmp_path)


def test_the_table_shows_every_protocol_the_runs_were_scored_by(tokenizer, tmp_path):
    spec = BenchSpec(method="ultraedit", data="zsre", steps=1, batch=2,
                     protocols=["zsre-token-acc@1", "gen-exact@1"])
    summary, result = run_benchmark(tiny_model("llama"), tokenizer, "tiny-llama", spec, progress=False)
    write_run(tmp_path / "ultraedit.json", summary, result)
    table, _ = write_report(tmp_path)
    text = table.read_text()
    assert text.index("`zsre-token-acc@1`, seed 0") < text.index("`gen-exact@1`, the same edits:") < text.index("Speed:")
    block = text.split("`gen-exact@1`, the same edits:")[1].split("Speed:")[0].strip().splitlines()
    assert block[0] == "| method | efficacy | generalization | locality |"
    unedited, edited = summary["unedited_by_protocol"]["gen-exact@1"], summary["metrics_by_protocol"]["gen-exact@1"]
    assert block[2] == f"| unedited | {unedited['efficacy']:.1f} | {unedited['generalization']:.1f} | 100.0 |"
    assert block[3] == (f"| ultraedit | {edited['efficacy']:.1f} | {edited['generalization']:.1f} | "
                        f"{edited['locality']:.1f} |")
    assert "the same edits" not in markdown_table([summary])  # the headline table stays as it was


def test_bad_benchmarks_fail_before_any_work(tmp_path):
    with pytest.raises(UnknownMethodError, match="registered methods"):
        check_spec(BenchSpec(method="rome"))
    with pytest.raises(DataError, match="needs 2000 requests"):
        check_spec(BenchSpec(method="rledit", steps=100, batch=20))
    unknown = tmp_path / "weird.json"
    unknown.write_text(json.dumps([{"question": "q", "reply": "a"}]))
    with pytest.raises(DataError):
        check_spec(BenchSpec(method="rledit", data=str(unknown), steps=1, batch=1))
    no_subject = str(DATA / "zsre_rledit.jsonl")  # the RLEdit zsRE format carries no subjects
    with pytest.raises(EditRequestError, match="subject"):
        check_spec(BenchSpec(method="memit", data=no_subject, steps=1, batch=1))


def test_a_locate_then_edit_bench_names_the_modules_it_edits_and_refuses_others(tokenizer):
    """MEMIT and AlphaEdit edit the output projection: the CLI's spec does not record the model preset's modules
    for them, and a spec asking for another module is refused before any edit."""
    import argparse

    from rledit.cli import _bench_spec

    args = argparse.Namespace(set=[], model="smollm2-135m", layers=[18], modules=None, data="zsre", split="eval",
                              steps=1, batch=1, timing="end", seed=0, eval_every=1, protocols=None, label=None)
    assert _bench_spec(args, "alphaedit").modules is None and _bench_spec(args, "rledit").modules is not None
    model = tiny_model("llama")
    before = model_hash(model)
    spec = BenchSpec(method="alphaedit", data="zsre", steps=1, batch=1, layers=[1], modules=["gate_proj"])
    with pytest.raises(ValueError, match="edits the MLP output projection \\(down_proj\\)"):
        run_benchmark(model, tokenizer, "tiny-llama", spec, progress=False)
    assert model_hash(model) == before


@pytest.mark.slow
def test_bench_two_methods_on_smollm2(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "compare"
    assert main(["bench", "--methods", "rledit,ultraedit", "--model", "smollm2-135m", "--data", "zsre",
                 "--steps", "2", "--batch", "2", "--timing", "curve", "--eval-every", "1", "--out", str(out)]) == 0
    for name in ("rledit", "ultraedit"):
        summary = json.loads((out / f"{name}.json").read_text())
        assert FIELDS <= set(summary) and summary["n_edits"] == 4
        assert summary["metrics"]["efficacy"] > summary["unedited"]["efficacy"]
    assert (out / "table.md").read_text().count("|") > 20 and (out / "curves.png").is_file()


def test_runs_scored_by_a_newer_headline_protocol_tabulate_by_it():
    from rledit.bench_report import with_preferred_headline

    old = {"dataset": "zsre", "protocol": "zsre-token-acc@1", "metrics": {"efficacy": 1.0}, "unedited": {},
           "metrics_by_protocol": {"zsre-token-acc@1": {"efficacy": 1.0}, "zsre-token-acc@2": {"efficacy": 2.0}},
           "unedited_by_protocol": {"zsre-token-acc@1": {}, "zsre-token-acc@2": {"efficacy": 0.5}},
           "curve": [{"step": 1}]}
    new = with_preferred_headline(old)
    assert (new["protocol"], new["metrics"], new["unedited"]) == ("zsre-token-acc@2", {"efficacy": 2.0},
                                                                  {"efficacy": 0.5})
    assert "curve" not in new and old["protocol"] == "zsre-token-acc@1"  # the summary itself is not changed
    only_v1 = {**old, "metrics_by_protocol": {"zsre-token-acc@1": {"efficacy": 1.0}}}
    assert with_preferred_headline(only_v1) is only_v1


def test_rows_order_the_numbers_in_their_labels_by_value():
    from rledit.bench_report import natural_key

    labels = ["alphaedit (statistics 1000000 tokens)", "alphaedit (statistics 30000 tokens)",
              "alphaedit (statistics 300000 tokens)", "alphaedit (absolute 2e-2)"]
    assert sorted(labels, key=natural_key) == ["alphaedit (absolute 2e-2)", "alphaedit (statistics 30000 tokens)",
                                               "alphaedit (statistics 300000 tokens)",
                                               "alphaedit (statistics 1000000 tokens)"]
