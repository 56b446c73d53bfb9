"""RL training over edit sequences on a tiny model: the loss goes down, logs and checkpoints, exact resume."""

import json

import pytest
import torch
from tiny import tiny_model

from rledit.checkpoints import CheckpointError, read_checkpoint
from rledit.data import load_requests
from rledit.editor import Editor
from rledit.methods.rledit.config import RLEditHparams, TrainHparams
from rledit.methods.rledit.trainer import RLEditTrainer


def _trainer(tokenizer, out, episodes, init_from=None, layers=(2, 3), **train):
    torch.manual_seed(0)
    settings = {"episodes": episodes, "steps_per_episode": 2, "batch": 2, "back_depth": 2, "meta_lr": 1e-3,
                    "scalar_meta_lr": 3e-1, "checkpoint_every": 2, "loc_reference": "unedited"} | train
    hparams = RLEditHparams(rank=16, lr_init=30.0, train=TrainHparams(**settings))
    editor = Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, hparams=hparams, layers=list(layers))
    requests = load_requests("zsre", "train", limit=4)  # the same 4 edits every episode: a loss that can fall
    return RLEditTrainer(editor, requests, out, progress=False, init_from=init_from)


def test_training_reduces_the_sequence_loss_and_writes_a_checkpoint(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, episodes=30)
    final = trainer.train()
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "episode"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.97 * sum(losses[:5]) / 5  # a tiny random LM barely responds to edits
    saved = read_checkpoint(final)
    assert saved.method == "rledit" and saved.layers == [2, 3]
    assert (tmp_path / "editor-ep00002").is_dir() and (tmp_path / "trainer_state.pt").is_file()
    assert trainer.editor.store.steps == []  # the model is left unedited


def test_resume_continues_exactly(tokenizer, tmp_path):
    straight = _trainer(tokenizer, tmp_path / "straight", episodes=4)
    straight.train()
    _trainer(tokenizer, tmp_path / "split", episodes=2).train()
    resumed = _trainer(tokenizer, tmp_path / "split", episodes=4)
    resumed.train(resume=True)
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_training_can_start_from_a_trained_editor(tokenizer, tmp_path):
    first = _trainer(tokenizer, tmp_path / "first", episodes=2)
    final = first.train()
    trained = first.method.state_dict()
    second = _trainer(tokenizer, tmp_path / "second", episodes=3, init_from=final, back_depth=1)
    assert all(torch.equal(v, trained[k]) for k, v in second.method.state_dict().items())
    second.train()
    assert read_checkpoint(tmp_path / "second" / "editor").extra["init_from"] == str(final)
    with pytest.raises(CheckpointError, match="was trained for modules"):
        _trainer(tokenizer, tmp_path / "third", episodes=1, init_from=final, layers=(1, 2))
