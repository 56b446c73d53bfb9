"""Keys and value-gradients at the edited modules, checked against plain autograd references."""

import copy

import pytest
import torch
from tiny import tiny_model

from rledit.deltas import DeltaStore
from rledit.hooks import FeatureError, answer_token_loss, capture_features
from rledit.targets import resolve_targets
from rledit.tokens import answer_logits, encode

PROMPTS = ["The capital of France is", "The mother tongue of Danielle Darrieux is", "Who wrote Hamlet?"]
ANSWERS = ["Paris", "French language", "William Shakespeare"]
ALL_MLP = {"llama": ["gate_proj", "up_proj", "down_proj"], "gpt2": ["c_fc", "c_proj"],
           "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"]}


def _targets(model, kind):
    return resolve_targets(model, layers=[1, 2], modules=ALL_MLP[kind])


def _reference(model, kind, batch):
    """Plain autograd on a copy: inputs, dS/d(outputs), and dS/dΔ of an answer-only additive Δ per module,
    where S is the summed answer-token cross-entropy; also the mean loss."""
    model = copy.deepcopy(model)
    targets = _targets(model, kind)
    mask = batch.answer_mask
    inputs, outputs, probes = {}, {}, {}
    handles = []
    for t in targets:
        probes[t.name] = torch.zeros(t.d_in, t.d_out, requires_grad=True)

        def hook(module, args, out, name=t.name):
            inputs[name] = args[0].detach()
            out = out + (args[0] * mask[..., None]) @ probes[name]  # Δ applied at answer positions only
            out.retain_grad()
            outputs[name] = out
            return out

        handles.append(t.module.register_forward_hook(hook))
    loss = answer_token_loss(answer_logits(model, batch), batch)
    (loss * batch.n_answer_tokens).backward()
    for h in handles:
        h.remove()
    output_grads = {n: o.grad for n, o in outputs.items()}
    return loss.item(), inputs, output_grads, {n: p.grad for n, p in probes.items()}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox", "gptj"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_answer_logits_are_the_full_models_logits_at_the_answer_positions(kind, padding_side, tokenizer):
    torch.manual_seed(0)
    model = tiny_model(kind)
    batch = encode(tokenizer, PROMPTS, ANSWERS, padding_side=padding_side)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False).logits
        answers = answer_logits(model, batch)
    assert answers.shape == (batch.n_answer_tokens, full.shape[-1])
    torch.testing.assert_close(answers, full[batch.answer_mask], atol=1e-5, rtol=1e-5)
    loss = answer_token_loss(answer_logits(model, batch), batch)
    loss.backward()  # the projection of the gathered rows passes gradients to the model's weights
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_features_match_autograd(kind, tokenizer):
    model = tiny_model(kind)
    targets = _targets(model, kind)
    batch = encode(tokenizer, PROMPTS, ANSWERS)
    mask = batch.answer_mask
    features = capture_features(model, targets, batch)
    ref_loss, ref_inputs, ref_out_grads, ref_weight_grads = _reference(model, kind, batch)

    assert features.n_tokens == batch.n_answer_tokens == int(mask.sum())
    assert features.loss == pytest.approx(ref_loss, rel=1e-6)
    for t in targets:
        keys, grads = features.keys[t.name], features.grads[t.name]
        assert keys.shape == (features.n_tokens, t.d_in) and grads.shape == (features.n_tokens, t.d_out)
        assert keys.dtype == grads.dtype == torch.float32
        assert not keys.requires_grad and not grads.requires_grad
        torch.testing.assert_close(keys, ref_inputs[t.name][mask], rtol=0, atol=0)
        # total derivative, including the paths through the later edited modules
        torch.testing.assert_close(grads, ref_out_grads[t.name][mask], rtol=1e-5, atol=1e-8)
        # the weight gradient restricted to answer tokens is Kᵀ G
        torch.testing.assert_close(keys.T @ grads, ref_weight_grads[t.name], rtol=1e-4, atol=1e-8)
        assert grads.abs().sum() > 0


def test_no_grad_buffers_and_flags_and_modes_restored(tokenizer):
    model = tiny_model("gpt2")  # GPT-2 has dropout: train-mode features would be random
    targets = _targets(model, "gpt2")
    batch = encode(tokenizer, PROMPTS, ANSWERS)
    expected = capture_features(model, targets, batch)
    model.train()
    model.transformer.h[0].eval()
    model.transformer.wte.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    features = capture_features(model, targets, batch)

    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(not m._forward_hooks for m in model.modules())
    for t in targets:  # eval semantics: no dropout, same features as in eval mode
        torch.testing.assert_close(features.grads[t.name], expected.grads[t.name], rtol=0, atol=0)


def test_features_follow_the_delta_store(tokenizer_bos_left):
    """On an edited model, features equal those of a model whose weights carry the deltas directly."""
    model = tiny_model("llama")
    direct = copy.deepcopy(model)
    targets, direct_targets = _targets(model, "llama"), _targets(direct, "llama")
    generator = torch.Generator().manual_seed(0)
    updates = {t.name: (torch.randn(t.d_in, 2, generator=generator) * 0.1,
                        torch.randn(2, t.d_out, generator=generator)) for t in targets}
    DeltaStore(model, targets).add(updates)
    with torch.no_grad():
        for t in direct_targets:
            u, v = updates[t.name]
            t.weight.add_(t.to_native(u @ v))
    batch = encode(tokenizer_bos_left, PROMPTS, ANSWERS)
    edited = capture_features(model, targets, batch)
    reference = capture_features(direct, direct_targets, batch)
    assert edited.loss == pytest.approx(reference.loss, rel=1e-5)
    for t in targets:
        torch.testing.assert_close(edited.keys[t.name], reference.keys[t.name], rtol=1e-4, atol=1e-5)
        # x W + (x u) v and x (W + u v) round differently in fp32; gradients of ~1e-2 differ by a few 1e-6
        torch.testing.assert_close(edited.grads[t.name], reference.grads[t.name], rtol=1e-4, atol=1e-5)


def test_bad_batches_and_targets(tokenizer):
    model = tiny_model("llama")
    targets = _targets(model, "llama")
    with pytest.raises(FeatureError, match="no answer tokens"):
        capture_features(model, targets, encode(tokenizer, PROMPTS))
    with pytest.raises(FeatureError, match="no edit targets"):
        capture_features(model, [], encode(tokenizer, PROMPTS, ANSWERS))
    other = tiny_model("llama", seed=1)
    with pytest.raises(FeatureError, match="did not run"):
        capture_features(model, _targets(other, "llama"), encode(tokenizer, PROMPTS, ANSWERS))
    assert all(not m._forward_hooks for m in other.modules())
