"""What a new user does first works: paths independent of the working directory, ..."""

import json

from tiny import tiny_model, tiny_tokenizer

from rledit.editor import Editor
from rledit.hparams import load_hparams


def test_shipped_hparams_paths_work_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hparams = load_hparams("hparams/experiments/train-rledit-smollm2-zsre.yaml")
    assert hparams.method.name == "rledit" and hparams.model.layers == [24, 25, 26, 27]


def test_a_save_of_a_local_model_folder_loads_from_another_working_directory(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    tiny_model("llama").save_pretrained(tmp_path / "work" / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "work" / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    editor = Editor.from_pretrained("tiny", layers=[2, 3])  # a relative folder
    editor.apply({"prompt": "The capital of France is", "target_new": "Rome"})
    editor.save("edited")
    assert json.loads((tmp_path / "work" / "edited" / "editor.json").read_text())["model"] == str(
        (tmp_path / "work" / "tiny").resolve())
    editor.store.detach()
    monkeypatch.chdir(tmp_path)
    loaded = Editor.load(tmp_path / "work" / "edited")
    assert len(loaded.steps) == 1


def _edited(tokenizer):
    import torch

    torch.manual_seed(0)
    editor = Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, layers=[2, 3])
    step = editor.apply([{"prompt": "The capital of France is", "target_new": "Rome"}])
    return editor, step


def _logits(model, tokenizer):
    import torch

    from rledit.tokens import answer_logits, encode

    with torch.no_grad():
        return answer_logits(model, encode(tokenizer, ["The capital of France is"], ["Rome"]))


def test_save_pretrained_writes_a_plain_hugging_face_model_with_the_edits_merged(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    editor, step = _edited(tokenizer)
    edited = _logits(editor.model, tokenizer)
    editor.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(plain, AutoTokenizer.from_pretrained(tmp_path / "merged")), edited,
                               atol=1e-5, rtol=1e-5)
    assert editor.steps == [step] and torch.equal(_logits(editor.model, tokenizer), edited)  # editor untouched
    with editor.unedited():
        assert not torch.allclose(_logits(editor.model, tokenizer), edited)


def test_merge_and_unload_returns_the_plain_model_and_the_editor_says_it_is_spent(tokenizer):
    import pytest
    import torch

    from rledit.deltas import DeltaError
    from rledit.editor import EditorError

    editor, step = _edited(tokenizer)
    edited = _logits(editor.model, tokenizer)
    model = editor.merge_and_unload()
    assert all(not m._forward_hooks for m in model.modules())
    torch.testing.assert_close(_logits(model, tokenizer), edited, atol=1e-5, rtol=1e-5)
    for action in (editor.unedited, lambda: editor.revert(step), lambda: editor.references(["x"]),
                   lambda: editor.apply({"prompt": "a b", "target_new": "c"})):
        with pytest.raises(EditorError, match="merge_and_unload"):
            action()

    other, first = _edited(tokenizer)  # a direct store.merge(): the history and unedited view say so
    other.store.merge()
    with pytest.raises(EditorError, match=r"steps \[0\] were merged into the base weights"):
        other.unedited()
    with pytest.raises(DeltaError, match="merged into the base weights"):
        other.revert(first)
    assert other.steps == []


def test_generate_and_compare_show_greedy_text_of_the_edited_and_unedited_model(tokenizer):
    from rledit.editor import comparison_table
    from rledit.eval.generation import greedy_decode

    editor, _ = _edited(tokenizer)
    text = editor.generate("The capital of France is", max_new_tokens=4)
    expected = greedy_decode(editor.model, tokenizer, ["The capital of France is"], [4])[0]
    assert text == [tokenizer.decode(expected, skip_special_tokens=True)]
    rows = editor.compare(["The capital of France is", "Who wrote Hamlet?"], max_new_tokens=4)
    with editor.unedited():
        assert rows[0]["unedited"] == editor.generate("The capital of France is", max_new_tokens=4)[0]
    assert rows[0]["edited"] == text[0] and [r["prompt"] for r in rows][1] == "Who wrote Hamlet?"
    table = comparison_table(rows)
    assert "unedited (greedy)" in table and len(table.splitlines()) == 3


NATIVE = [{"prompt": "The capital of France is", "target_new": "Rome", "rephrase_prompts": ["France's capital:"],
           "locality": [{"prompt": "Who wrote Hamlet?", "answer": "Shakespeare"}]},
          {"prompt": "{} speaks", "subject": "Danielle Darrieux", "target_new": "German"}]


def test_the_native_record_format_is_a_sixth_format_in_json_and_jsonl(tmp_path):
    from rledit.data import detect_format, load_requests

    assert detect_format(NATIVE[0]) == "rledit"
    (tmp_path / "facts.json").write_text(json.dumps(NATIVE))
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in NATIVE))
    for name in ("facts.json", "facts.jsonl"):
        requests = load_requests(tmp_path / name)
        assert [r.prompt for r in requests] == ["The capital of France is", "Danielle Darrieux speaks"]
        assert requests[0].locality[0].answer == "Shakespeare" and requests[0].rephrase_prompts == ("France's capital:",)
    round_trip = [r.to_dict() for r in load_requests(tmp_path / "facts.json")]
    assert [detect_format(r) for r in round_trip] == ["rledit", "rledit"]
    knowedit = load_requests("zsre-knowedit", limit=1)  # same prompt/target_new keys, still its own format
    assert knowedit[0].locality


def test_records_in_memory_a_dataset_or_any_iterable_are_accepted(tokenizer):
    import datasets
    import pytest

    from rledit.data import load_requests
    from rledit.types import EditRequestError

    table = datasets.Dataset.from_list([{"prompt": r["prompt"].replace("{}", "Danielle Darrieux"),
                                         "target_new": r["target_new"]} for r in NATIVE])
    assert [r.target_new for r in load_requests(table)] == ["Rome", "German"]
    easyedit = {"prompt": "The twin city of Lyon is", "subject": "Lyon", "target_new": "Manila",
                "ground_truth": "Beirut", "rephrase_prompt": "Lyon's twin city is",
                "locality_prompt": "The twin city of Paris is", "locality_ground_truth": "Rome"}
    editor, _ = _edited(tokenizer)
    step = editor.apply(table)
    assert step.n_edits == 2
    assert editor.apply(r for r in [easyedit]).n_edits == 1  # a generator of another format's records
    assert editor.evaluate(table).metrics
    with pytest.raises(EditRequestError, match="edit 0: record with keys .* is in no known format"):
        editor.apply([{"question": "x", "answer": "y"}])


def test_cli_edit_generate_and_eval_an_edited_model_from_a_facts_file(tmp_path, capsys, tiny_folder):
    from transformers import AutoModelForCausalLM

    from rledit.cli import main

    folder = tiny_folder
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in NATIVE))
    out = tmp_path / "edited"
    assert main(["edit", "--data", str(facts), "--model", str(folder), "--out", str(out), "--step-size", "1",
                 "--save-pretrained", str(tmp_path / "merged"), "--export-peft", str(tmp_path / "adapter")]) == 0
    printed = capsys.readouterr().out
    assert "untrained hypernetwork" in printed and "step 1: 1 edits" in printed and "edited (greedy)" in printed
    assert Editor.load(out).steps[-1].id == 1
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert main(["generate", "--editor", str(out), "--prompt", "The capital of France is", "--compare",
                 "--max-new-tokens", "3"]) == 0
    assert "unedited (greedy)" in capsys.readouterr().out
    assert main(["generate", "--model", str(folder), "--prompt", "The capital of France is"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is")
    assert main(["eval", "--editor", str(out), "--data", str(facts), "--out", str(tmp_path / "scores.json")]) == 0
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert summary["editor"] == str(out.resolve()) and summary["timing"] == "edited" and summary["unedited"] is None
    assert [s["n_edits"] for s in summary["edit_steps"]] == [1, 1] and summary["metrics"]
    assert main(["eval", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--data", str(facts),
                 "--out", str(tmp_path / "adapter.json")]) == 0
    through_peft = json.loads((tmp_path / "adapter.json").read_text())
    for protocol, metrics in summary["metrics"].items():  # the adapter scores as the rledit save does
        for metric, value in metrics.items():
            assert abs(through_peft["metrics"][protocol][metric] - value) < 1e-6, (protocol, metric)


def test_defaults_are_said_not_silent(tokenizer, caplog):
    import logging

    from rledit.eval import evaluate
    from rledit.types import EditRequest

    caplog.set_level(logging.INFO, logger="rledit")
    Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, layers=[2, 3])
    messages = [r.getMessage() for r in caplog.records]
    assert any("editing 4 modules with rledit: model.layers.2.mlp.gate_proj" in m for m in messages)
    assert any("hypernetwork is untrained" in m for m in messages)
    caplog.clear()
    evaluate(tiny_model("llama"), tokenizer, [EditRequest("The capital of France is", "Rome")])
    assert any(m.startswith("evaluate: skipping cf-prob@1: ") for m in (r.getMessage() for r in caplog.records))


def test_cli_version_list_and_help_with_defaults(capsys):
    import pytest

    import rledit
    from rledit.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"rledit {rledit.__version__}"
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m-zsre" in listing and "zsre-token-acc@2" in listing and "alphaedit" in listing
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 50)" in help_text and "(default: None)" not in help_text
    with pytest.raises(SystemExit):
        main(["eval", "--dtype", "float64", "--out", "x.json"])
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_an_experiment_yaml_drives_bench_and_from_hparams(tmp_path, tiny_folder):
    from rledit.cli import main

    folder = tiny_folder
    config = tmp_path / "experiment.yaml"
    config.write_text(f"""defaults:
  method: methods/rledit.yaml
model:
  name: {folder}
  layers: [2, 3]
data:
  dataset: zsre
  split: eval
experiment:
  steps: 2
  batch: 3
  seed: 5
  protocols: [zsre-token-acc@2]
""")
    assert main(["bench", "--hparams", str(config), "--set", "experiment.batch=2", "--out",
                 str(tmp_path / "run.json")]) == 0
    summary = json.loads((tmp_path / "run.json").read_text())
    assert (summary["steps"], summary["batch"], summary["seed"], summary["protocol"]) == (2, 2, 5, "zsre-token-acc@2")
    assert summary["hparams_file"] == str(config) and summary["edited_modules"][0] == "model.layers.2.mlp.gate_proj"
    editor = Editor.from_hparams(config, ["method.rank=8"])
    assert editor.method.hparams.rank == 8 and sorted({t.layer for t in editor.targets}) == [2, 3]


def _tiny(config_class, **extra):
    import torch
    from transformers import AutoModelForCausalLM

    config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=600, max_position_embeddings=64, pad_token_id=2,
                          bos_token_id=0, eos_token_id=0, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_llama_shaped_models_are_detected_fused_mlps_refused_and_others_registered(tokenizer, caplog):
    import logging

    import pytest
    from transformers import Olmo2Config, Phi3Config, Qwen3Config

    from rledit import ArchitectureSpec, register_architecture
    from rledit.targets import ARCHITECTURES, TargetError, resolve_targets

    caplog.set_level(logging.INFO, logger="rledit")
    for config_class, model_type in ((Qwen3Config, "qwen3"), (Olmo2Config, "olmo2")):
        assert model_type not in ARCHITECTURES
        model = _tiny(config_class)
        editor = Editor.from_pretrained(model, tokenizer=tokenizer, layers=[1])
        assert [t.name for t in editor.targets] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
        editor.apply({"prompt": "The capital of France is", "target_new": "Rome"})
        assert any(f"model_type '{model_type}' is not registered; its MLP is Llama-shaped" in r.getMessage()
                   for r in caplog.records)
    phi3 = _tiny(Phi3Config)
    with pytest.raises(TargetError, match="fuses its MLP's gate and up projections into one gate_up_proj"):
        resolve_targets(phi3)
    register_architecture("phi3", ArchitectureSpec(layer_pattern=r"(?:^|\.)layers\.(\d+)$",
                                                   mlp_modules=("down_proj",), mlp_path="mlp",
                                                   default_modules=("down_proj",)))
    try:
        assert [t.name for t in resolve_targets(phi3, layers=[0])] == ["model.layers.0.mlp.down_proj"]
    finally:
        del ARCHITECTURES["phi3"]


def test_bench_prints_one_results_table(tmp_path, capsys, tiny_folder):
    from rledit.cli import main

    folder = tiny_folder
    assert main(["bench", "--method", "rledit", "--model", str(folder), "--data", "zsre", "--steps", "1", "--batch",
                 "2", "--layers", "2", "3", "--protocols", "zsre-token-acc@2", "--out", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("| method |") == 1 and f"-> {tmp_path / 'b.json'}" in out
    assert main(["bench", "--method", "rledit", "--model", str(folder), "--data", "zsre", "--steps", "1", "--batch",
                 "2", "--layers", "3", "--modules", "down_proj", "--protocols", "zsre-token-acc@2", "--out",
                 str(tmp_path / "down.json")]) == 0
    assert json.loads((tmp_path / "down.json").read_text())["edited_modules"] == ["model.layers.3.mlp.down_proj"]


def test_a_folder_of_end_timing_runs_gets_a_bar_chart(tmp_path, tiny_folder):
    from rledit.cli import main

    folder = tiny_folder
    assert main(["bench", "--methods", "rledit,ultraedit", "--model", str(folder), "--data", "zsre", "--steps", "1",
                 "--batch", "2", "--layers", "2", "3", "--protocols", "zsre-token-acc@2", "--out",
                 str(tmp_path / "runs")]) == 0
    chart = tmp_path / "runs" / "metrics.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "runs" / "curves.png").exists()
