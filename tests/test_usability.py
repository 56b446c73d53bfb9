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
