"""FT, MEND and the UltraEdit-style closed form, checked against the formulas they implement, computed here
independently (autograd gradients, direct d_in × d_in solves, hand-made norm projections)."""

import copy
import json

import pytest
import torch
from test_methods_editor import REQUESTS, peaked_tiny_llama
from tiny import tiny_model

from rledit.data import load_requests
from rledit.editor import Editor
from rledit.hooks import answer_token_loss, capture_features
from rledit.methods.ft import FTHparams, project_to_norm_ball
from rledit.methods.mend import MENDHparams
from rledit.methods.rledit.trainer import RLEditTrainer
from rledit.targets import resolve_targets
from rledit.tokens import answer_logits, encode


def step_batch(editor):
    """The batch the editor encodes for REQUESTS (left-padded, as the editor does)."""
    return encode(editor.tokenizer, [r["prompt"] for r in REQUESTS], [r["target_new"] for r in REQUESTS],
                  padding_side="left")


def applied_deltas(editor, step):
    """The dense (d_in, d_out) update of one step per module."""
    return {name: u if isinstance(u, torch.Tensor) else u[0] @ u[1]
            for name, u in editor.store.factors(step.id).items()}


# ------------------------------------------------------------------------------------------------------ FT
def test_norm_ball_projections_by_hand():
    delta = torch.tensor([[0.3, -0.05], [-0.2, 0.01]])
    box = delta.clone()
    project_to_norm_ball(box, "linf", 0.1)
    assert torch.equal(box, torch.tensor([[0.1, -0.05], [-0.1, 0.01]]))
    ball = delta.clone()  # ||delta||_F = sqrt(0.09 + 0.0025 + 0.04 + 0.0001) = sqrt(0.1326)
    project_to_norm_ball(ball, "fro", 0.2)
    assert torch.allclose(ball, delta * (0.2 / 0.1326 ** 0.5))
    assert torch.linalg.vector_norm(ball).item() == pytest.approx(0.2)
    inside = delta.clone()
    project_to_norm_ball(inside, "fro", 1.0)
    assert torch.equal(inside, delta)
    free = delta.clone()
    project_to_norm_ball(free, "none", 1e-9)
    assert torch.equal(free, delta)


@pytest.mark.parametrize("norm, max_norm", [("linf", 2e-3), ("fro", 0.05)])
def test_ft_deltas_stay_in_their_norm_ball(tokenizer, norm, max_norm):
    editor = Editor.from_pretrained(peaked_tiny_llama(), method="ft", tokenizer=tokenizer,
                                    hparams={"steps": 4, "lr": 0.05, "norm": norm, "max_norm": max_norm})
    step = editor.apply(REQUESTS)
    losses = editor.method.last_losses
    assert len(losses) == 4 and losses[-1] < losses[0]
    for delta in applied_deltas(editor, step).values():
        size = delta.abs().max() if norm == "linf" else torch.linalg.vector_norm(delta)
        assert 0 < size.item() <= max_norm * (1 + 1e-5)


def test_ft_stops_early_once_the_loss_is_low(tokenizer):
    editor = Editor.from_pretrained(peaked_tiny_llama(), method="ft", tokenizer=tokenizer,
                                    hparams={"steps": 5, "early_stop_loss": 1e3})
    step = editor.apply(REQUESTS)
    assert len(editor.method.last_losses) == 1  # the first loss is already below the threshold
    assert all(not d.any() for d in applied_deltas(editor, step).values())


def test_ft_hparams_validation():
    with pytest.raises(ValueError, match="norm must be one of"):
        FTHparams(norm="l2")
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        FTHparams(max_norm=0.0)


# ---------------------------------------------------------------------------------------------------- MEND
def test_untrained_mend_is_one_gradient_step_on_each_weight(tokenizer):
    lr = 0.7
    model = peaked_tiny_llama()
    reference = copy.deepcopy(model)
    editor = Editor.from_pretrained(model, method="mend", tokenizer=tokenizer, hparams={"lr_init": lr})
    step = editor.apply(REQUESTS)

    # independent: autograd of the summed answer-token loss (per-token gradients, as rledit.hooks) w.r.t. explicit
    # zero deltas D_m that act at the answer positions only (output + (mask * input) @ D_m), as the features see
    batch = step_batch(editor)
    mask = batch.answer_mask.unsqueeze(-1).float()
    for p in reference.parameters():
        p.requires_grad_(False)
    deltas = {t.name: torch.zeros(t.shape, requires_grad=True) for t in editor.targets}
    handles = [reference.get_submodule(name).register_forward_hook(
        lambda module, args, out, d=d: out + (args[0] * mask) @ d) for name, d in deltas.items()]
    (answer_token_loss(answer_logits(reference, batch), batch) * batch.n_answer_tokens).backward()
    for handle in handles:
        handle.remove()
    last_layer = max(t.layer for t in editor.targets)
    for target in editor.targets:
        delta = applied_deltas(editor, step)[target.name]
        assert torch.allclose(delta, -lr * deltas[target.name].grad, rtol=1e-4, atol=1e-8), target.name
        assert editor.store.rank(step.id)[target.name] == batch.n_answer_tokens  # one rank-1 term per token
        if target.layer == last_layer:  # there, it is the whole weight gradient (nn.Linear stores (d_out, d_in))
            weight = copy.deepcopy(target.module.weight).requires_grad_(True)
            twin = copy.deepcopy(reference)
            twin.get_submodule(target.name).weight = weight
            (answer_token_loss(answer_logits(twin, batch), batch) * batch.n_answer_tokens).backward()
            assert torch.allclose(delta, -lr * weight.grad.T, rtol=1e-4, atol=1e-8)


def test_mend_is_trained_by_the_rledit_trainer_on_single_steps(tokenizer, tmp_path):
    hparams = MENDHparams(rank=4, n_blocks=1, lr_init=0.1, train={
        "episodes": 2, "steps_per_episode": 1, "back_depth": 1, "batch": 2, "meta_lr": 1e-2,
        "checkpoint_every": 2})
    editor = Editor.from_pretrained(tiny_model("llama"), method="mend", tokenizer=tokenizer, hparams=hparams)
    initial = {k: v.clone() for k, v in editor.method.state_dict().items()}
    requests = load_requests("zsre", "train", limit=8)
    final = RLEditTrainer(editor, requests, tmp_path / "run", progress=False).train()

    trained = editor.method.state_dict()
    assert not torch.equal(trained["nets.32x64.blocks.0.B"], initial["nets.32x64.blocks.0.B"])
    assert not torch.equal(trained["log_lr"], initial["log_lr"])
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in log if r["kind"] == "episode"] == [1, 2]
    reloaded = Editor.from_pretrained(tiny_model("llama"), method="mend", checkpoint=final, tokenizer=tokenizer)
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.method.state_dict().items())


# ----------------------------------------------------------------------------------------------- UltraEdit
def test_ultraedit_matches_the_direct_ridge_solve_on_lifelong_normalised_features(tokenizer):
    lr, ridge = 1e-2, 0.5
    model = peaked_tiny_llama()
    reference = copy.deepcopy(model)
    editor = Editor.from_pretrained(model, method="ultraedit", tokenizer=tokenizer, hparams={"lr": lr, "ridge": ridge})
    step = editor.apply(REQUESTS)

    features = capture_features(reference, resolve_targets(reference), step_batch(editor))
    for name, delta in applied_deltas(editor, step).items():
        keys, grads = features.keys[name].double(), features.grads[name].double()
        rows = torch.cat([keys, grads], dim=1)  # the first step is normalised by its own statistics
        normalised = (rows - rows.mean(0)) / rows.std(0, unbiased=False).clamp_min(1e-8)
        k_hat, g_hat = normalised[:, :keys.shape[1]], normalised[:, keys.shape[1]:]
        shifts = -lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat
        expected = torch.linalg.solve(keys.T @ keys + ridge * torch.eye(keys.shape[1], dtype=torch.float64),
                                      keys.T @ shifts)
        assert torch.allclose(delta.double(), expected, rtol=1e-3, atol=1e-6), name
        normalizer = editor.method.normalizer(name)
        assert normalizer.count.item() == features.n_tokens
        assert torch.allclose(normalizer.mean, rows.mean(0))


def test_ultraedit_statistics_accumulate_are_saved_and_restored(tokenizer, tmp_path):
    editor = Editor.from_pretrained(peaked_tiny_llama(), method="ultraedit", tokenizer=tokenizer)
    first = editor.apply(REQUESTS[:1])
    editor.apply(REQUESTS[1:])
    name = editor.targets[0].name
    n_tokens = [step_batch(editor).answer_mask[i].sum().item() for i in range(2)]
    assert editor.method.normalizer(name).count.item() == sum(n_tokens)
    editor.save(tmp_path / "edited")
    loaded = Editor.load(tmp_path / "edited", model=peaked_tiny_llama(), tokenizer=tokenizer)
    assert all(torch.equal(v, editor.method.state_dict()[k]) for k, v in loaded.method.state_dict().items())
    editor.revert(first)  # reverting a step does not rewind the lifelong statistics (they are not per step)
    assert editor.method.normalizer(name).count.item() == sum(n_tokens)
