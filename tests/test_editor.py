"""The Editor: all-or-nothing steps, exact reverts, save/load, and clear errors on bad input."""

import json

import pytest
import torch
from tiny import tiny_model

from rledit.editor import Editor, EditorError
from rledit.methods.base import UpdateError
from rledit.targets import TargetError
from rledit.tokens import TokenizationError, answer_logits, encode
from rledit.types import EditRequestError

EDITS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "rephrase_prompts": ["France's capital is"],
     "locality": [{"prompt": "Who wrote Hamlet?", "answer": "Shakespeare"}]},
    {"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "German"},
]


def _editor(tokenizer, **kwargs):
    torch.manual_seed(0)
    return Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, layers=[2, 3], **kwargs)


def _state(editor):
    """Everything a failed step must leave as it was: weights, delta store and the method's state."""
    method_state = {k: v.clone() for k, v in editor.method.state_dict().items()}
    return editor.store.state_hash(), method_state, list(editor.history)


def _same(editor, before):
    store_hash, method_state, history = before
    now = editor.method.state_dict()
    return (editor.store.state_hash() == store_hash and list(editor.history) == history
            and all(torch.equal(now[k], v) for k, v in method_state.items()))


@pytest.mark.parametrize("bad, error", [
    ({"prompt": "The capital of Italy is", "target_new": ""}, EditRequestError),
    ({"prompt": "   ", "target_new": "Paris"}, EditRequestError),
    ({"prompt": "word " * 200, "target_new": "Paris"}, TokenizationError),  # longer than the 128 positions
    ("The capital of Italy is Paris", EditRequestError),
])
def test_bad_requests_change_nothing(tokenizer, bad, error):
    editor = _editor(tokenizer)
    editor.apply(EDITS)
    before = _state(editor)
    with pytest.raises(error):
        editor.apply([EDITS[1], bad] if isinstance(bad, dict) else bad)
    assert _same(editor, before)


def test_non_finite_update_changes_nothing(tokenizer):
    editor = _editor(tokenizer)
    editor.apply(EDITS)
    before = _state(editor)
    with torch.no_grad():
        editor.method.hypernet.log_lr.fill_(float("inf"))  # every shift becomes inf/nan
    with pytest.raises(UpdateError, match="not finite"):
        editor.apply(EDITS[1])
    with torch.no_grad():
        editor.method.hypernet.log_lr.fill_(0.0)
    store_hash, method_state, history = before
    assert editor.store.state_hash() == store_hash and list(editor.history) == history
    for name in ("normalizer", "norm"):  # the running statistics were rolled back
        state = editor.method.state_dict()
        assert all(torch.equal(state[k], v) for k, v in method_state.items() if name in k)


def test_unknown_module_in_hparams_lists_what_exists(tokenizer):
    with pytest.raises(TargetError, match="gate_proj"):
        Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, layers=[2], modules=["fc_in"])


def test_reverting_every_step_gives_back_the_original_outputs(tokenizer):
    editor = _editor(tokenizer)
    batch = encode(tokenizer, ["The capital of France is"], ["Rome"])
    with torch.no_grad():
        original = answer_logits(editor.model, batch)
    weights = {k: v.clone() for k, v in editor.model.state_dict().items()}
    steps = [editor.apply(EDITS), editor.apply(EDITS[1]), editor.apply(EDITS[0])]
    with torch.no_grad():
        assert not torch.allclose(answer_logits(editor.model, batch), original)
    for step in reversed(steps):
        editor.revert(step)
    with torch.no_grad():
        restored = answer_logits(editor.model, batch)
    assert ((restored - original).norm() / original.norm()).item() <= 1e-6
    assert all(torch.equal(editor.model.state_dict()[k], v) for k, v in weights.items())
    assert editor.steps == []


def test_save_and_load_round_trip(tokenizer, tmp_path):
    editor = _editor(tokenizer)
    first, second = editor.apply(EDITS), editor.apply(EDITS[1])
    batch = encode(tokenizer, ["The capital of France is"], ["Rome"])
    with torch.no_grad():
        edited = answer_logits(editor.model, batch)
    editor.save(tmp_path / "saved")

    torch.manual_seed(0)
    fresh = tiny_model("llama")
    loaded = Editor.load(tmp_path / "saved", model=fresh, tokenizer=tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(loaded.model, batch), edited, atol=1e-6, rtol=1e-6)
    assert [s.id for s in loaded.steps] == [first.id, second.id]
    assert loaded.store.state_hash(include_model=False) == editor.store.state_hash(include_model=False)


def test_corrupted_or_foreign_save_folders_are_refused(tokenizer, tmp_path):
    editor = _editor(tokenizer)
    editor.apply(EDITS)
    editor.save(tmp_path / "saved")
    description = tmp_path / "saved" / "editor.json"
    text = description.read_text()

    description.write_text(text[: len(text) // 2])
    with pytest.raises(EditorError, match="not a readable saved editor"):
        Editor.load(tmp_path / "saved", model=tiny_model("llama"), tokenizer=tokenizer)
    description.write_text(text)

    other = tiny_model("gpt_neox")  # another architecture: other module names
    with pytest.raises((EditorError, TargetError)):
        Editor.load(tmp_path / "saved", model=other, tokenizer=tokenizer)
    assert not other._forward_hooks and all(not m._forward_hooks for m in other.modules())
    assert json.loads(description.read_text())["method"] == "rledit"
