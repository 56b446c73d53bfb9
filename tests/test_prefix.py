"""Skipping the unedited lower layers gives the full model's logits and features, with deltas applied."""

import pytest
import torch
from tiny import tiny_model

from rledit.deltas import DeltaStore
from rledit.hooks import capture_features
from rledit.prefix import Prefix
from rledit.targets import resolve_targets
from rledit.tokens import answer_logits, encode, select_rows

PROMPTS = ["The capital of France is", "The mother tongue of Danielle Darrieux is", "Who wrote Hamlet?"]
ANSWERS = ["Paris", "French language", "William Shakespeare"]
MODULES = {"llama": ["gate_proj", "up_proj"], "gpt_neox": ["dense_h_to_4h"], "gptj": ["fc_in"]}


def _edited(kind):
    torch.manual_seed(0)
    model = tiny_model(kind)
    targets = resolve_targets(model, layers=[2, 3], modules=MODULES[kind])
    store = DeltaStore(model, targets)
    store.add({t.name: 0.3 * torch.randn(t.d_in, t.d_out) for t in targets})
    return model, targets


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "gptj"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_suffix_logits_and_features_equal_the_full_model(kind, padding_side, tokenizer):
    model, targets = _edited(kind)
    prefix = Prefix.for_targets(model, targets)
    assert prefix is not None and prefix.start == 2
    batch = encode(tokenizer, PROMPTS, ANSWERS, padding_side=padding_side)
    with torch.no_grad():
        full = answer_logits(model, batch)
    full_features = capture_features(model, targets, batch)

    attached = prefix.attach(batch)
    assert attached.inputs_embeds.shape == (*batch.input_ids.shape, model.config.hidden_size)
    with prefix.skipped(), torch.no_grad():
        skipped = answer_logits(model, attached)
    with prefix.skipped():
        skipped_features = capture_features(model, targets, attached)

    torch.testing.assert_close(skipped, full, atol=1e-5, rtol=1e-5)
    for name in full_features.keys:
        torch.testing.assert_close(skipped_features.keys[name], full_features.keys[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(skipped_features.grads[name], full_features.grads[name], atol=1e-5, rtol=1e-5)
    assert len(getattr(prefix.owner, prefix.attr)) == 4  # the full stack is back after the block


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "gptj"])
def test_a_prefix_inside_another_prefix_starts_from_its_hidden_state(kind, tokenizer):
    model, _ = _edited(kind)
    targets = resolve_targets(model, layers=[1, 3], modules=MODULES[kind])
    batch = encode(tokenizer, PROMPTS, ANSWERS)
    with torch.no_grad():
        full = answer_logits(model, batch)
    outer = Prefix.for_targets(model, targets)
    attached = outer.attach(batch)
    with outer.skipped():
        inner = Prefix.for_targets(model, [t for t in targets if t.layer == 3])
        assert inner.start == 2 and inner.nested  # layer 3 is the third of the layers from 1 up
        twice = inner.attach(attached)
        with inner.skipped(), torch.no_grad():
            torch.testing.assert_close(answer_logits(model, twice), full, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="must carry that prefix's hidden state"):
            inner.attach(batch)
    assert not outer.nested and len(getattr(outer.owner, outer.attr)) == 4


def test_unsupported_architectures_and_layer_zero_run_in_full():
    gpt2 = tiny_model("gpt2")  # adds position embeddings to inputs_embeds: cannot start mid-stack
    assert Prefix.for_targets(gpt2, resolve_targets(gpt2, layers=[2], modules=["c_fc"])) is None
    llama = tiny_model("llama")
    assert Prefix.for_targets(llama, resolve_targets(llama, layers=[0, 3], modules=["up_proj"])) is None


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_selected_rows_keep_their_logits_and_drop_the_padding_they_do_not_use(padding_side, tokenizer):
    model, targets = _edited("llama")
    prefix = Prefix.for_targets(model, targets)
    batch = prefix.attach(encode(tokenizer, PROMPTS, ANSWERS, padding_side=padding_side))
    with prefix.skipped(), torch.no_grad():
        full = answer_logits(model, batch)
        row_of_answer = batch.answer_mask.nonzero()[:, 0]
        for rows in ([0], [2, 0], [1, 2]):
            part = select_rows(batch, rows)
            assert part.target_ids == [batch.target_ids[r] for r in rows]
            assert part.input_ids.shape[1] == int(batch.attention_mask[rows].sum(1).max())  # no unused column
            assert part.inputs_embeds.shape[:2] == part.input_ids.shape
            expected = torch.cat([full[row_of_answer == r] for r in rows])
            torch.testing.assert_close(answer_logits(model, part), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one row"):
        select_rows(batch, [])
