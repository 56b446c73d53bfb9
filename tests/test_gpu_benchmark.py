"""The one-GPU benchmark script, run on the CPU on a tiny model: it must work before anyone spends GPU time."""

import json
import sys
from pathlib import Path

from tiny import tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"))

import gpu_benchmark


def test_the_gpu_benchmark_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "gpu"
    code = gpu_benchmark.main(["--model", str(folder), "--layers", "2", "3", "--device", "cpu", "--dtype", "float32",
                               "--steps", "2", "--batch", "2", "--train-steps", "2", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "gpu.json").read_text())
    result = summary["result"]
    assert summary["device_name"] == "cpu" and summary["steps"] == 2 and summary["skipped"] == []
    assert set(result["bench"]["metrics"]) >= {"efficacy", "generalization", "locality"}
    assert result["train"]["wall_seconds"] > 0 and (out / "model" / "train" / "editor" / "checkpoint.json").is_file()
    assert "bench" in (out / "gpu.md").read_text()
    # without a memory budget (the CPU) every preset is a candidate, largest first; none fits 1 byte
    ranked = gpu_benchmark.candidates(20, 20, None)
    assert ranked[0][0] == "gemma-2-9b-it" and len(ranked) == 4
    assert gpu_benchmark.candidates(20, 20, 1) == []
