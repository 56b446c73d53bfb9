"""A shipped editor on the real SmolLM2-135M: 20 zsRE edits in one step take hold, and revert undoes them."""

import pytest

from rledit.data import load_requests
from rledit.deltas import model_hash
from rledit.editor import Editor


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["smollm2-135m-zsre"])
def test_shipped_editor_makes_20_zsre_edits_hold(checkpoint):
    editor = Editor.from_pretrained("smollm2-135m", checkpoint=checkpoint)
    weights = model_hash(editor.model)
    edits = load_requests("zsre", "eval", limit=20)
    references = editor.references(edits, ["zsre-token-acc@1"])
    before = editor.evaluate(edits, ["zsre-token-acc@1"], references=references).metrics["zsre-token-acc@1"]
    step = editor.apply(edits)
    after = editor.evaluate(edits, ["zsre-token-acc@1"], references=references).metrics["zsre-token-acc@1"]
    assert before["efficacy"] < 40 and after["efficacy"] > 80
    assert after["generalization"] > before["generalization"] + 20
    editor.revert(step)
    assert model_hash(editor.model) == weights
    restored = editor.evaluate(edits, ["zsre-token-acc@1"], references=references).metrics["zsre-token-acc@1"]
    assert restored == before
