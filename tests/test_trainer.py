"""RL training over edit sequences on a tiny model: the loss goes down, logs and checkpoints, exact resume."""

import dataclasses
import json
import math

import pytest
import torch
from tiny import tiny_model

from rledit.checkpoints import CheckpointError, read_checkpoint
from rledit.data import load_requests
from rledit.editor import Editor
from rledit.eval.forced import predict_answers
from rledit.files import command_line
from rledit.hooks import answer_token_loss, capture_features
from rledit.methods.rledit.config import RLEditHparams, TrainHparams
from rledit.methods.rledit.trainer import RLEditTrainer, locality_margin
from rledit.tokens import answer_logits, encode


def _trainer(tokenizer, out, episodes, init_from=None, layers=(2, 3), memory_init=0.0, **train):
    torch.manual_seed(0)
    settings = {"episodes": episodes, "steps_per_episode": 2, "batch": 2, "back_depth": 2, "meta_lr": 1e-3,
                    "scalar_meta_lr": 3e-1, "checkpoint_every": 2, "loc_reference": "unedited"} | train
    hparams = RLEditHparams(rank=16, lr_init=30.0, memory_init=memory_init, train=TrainHparams(**settings))
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


@pytest.mark.parametrize("settings", [{}, {"memory_init": 1.0, "backtracking": "sampled", "back_samples": 1,
                                           "back_depth": 1, "loss_rows": 0.5}], ids=["window", "sampled-memory-rows"])
def test_resume_continues_exactly(tokenizer, tmp_path, settings):
    straight = _trainer(tokenizer, tmp_path / "straight", episodes=4, **settings)
    straight.train()
    _trainer(tokenizer, tmp_path / "split", episodes=2, **settings).train()
    assert not [k for k in torch.load(tmp_path / "split" / "trainer_state.pt")["method"] if "key_memory" in k]
    resumed = _trainer(tokenizer, tmp_path / "split", episodes=4, **settings)
    resumed.train(resume=True)
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    runs = [r for r in _log(tmp_path / "split") if r["kind"] == "run"]  # each start says how it was made
    assert [(r["resume"], r["from_episode"]) for r in runs] == [(False, 0), (True, 2)]
    assert all(r["command"] == command_line() and r["torch"] == torch.__version__ for r in runs)
    assert read_checkpoint(tmp_path / "split" / "editor").extra["command"] == command_line()


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


def _log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_sampled_backtracking_covers_earlier_steps_with_mean_weights(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, episodes=1, backtracking="sampled", back_samples=2, past_weight=0.5)
    earlier = ["s0", "s1", "s2", "s3"]
    chosen, weights = trainer._past(earlier)
    assert len(chosen) == 2 and set(chosen) <= set(earlier) and len(set(chosen)) == 2
    assert weights == [0.25, 0.25]  # past_weight × the mean over the sample
    assert trainer._past([]) == ([], []) and trainer._past(["s0"]) == (["s0"], [0.5])
    window = _trainer(tokenizer, tmp_path / "w", episodes=1, back_depth=3, time_decay=0.5)
    assert window._past(earlier) == (["s3", "s2"], [0.5, 0.25])  # the last steps, newest first, γ^j


def test_long_episodes_with_memory_validation_and_warm_starts(tokenizer, tmp_path):
    torch.manual_seed(0)
    settings = TrainHparams(episodes=2, steps_per_episode=3, batch=2, backtracking="sampled", back_samples=1,
                            warm_start_max=1, validation_size=4, validation_batch=2, meta_lr=1e-3,
                            loc_reference="unedited", relation_locality=True, checkpoint_every=1)
    hparams = RLEditHparams(rank=8, lr_init=30.0, memory_init=1.0, train=settings)
    editor = Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, hparams=hparams, layers=[2, 3])
    requests = load_requests("zsre", "train", limit=12)
    trainer = RLEditTrainer(editor, requests, tmp_path, progress=False)
    assert len(trainer.validation) == 4 and not {r.prompt for r in trainer.validation} & {
        r.prompt for r in trainer.requests}
    trainer.train()
    log = _log(tmp_path)
    episodes = [r for r in log if r["kind"] == "episode"]
    validations = [r for r in log if r["kind"] == "validation"]
    assert len(episodes) == 2 and len(validations) == 3  # the starting editor, then after each episode
    assert [r["episode"] for r in validations] == [0, 1, 2]
    assert all(r["update_norm"] > 0 and r["warm_start_steps"] in (0, 1) and r["scalars"]["beta"] > 0
               for r in episodes)
    assert validations[0]["protocol"] == "zsre-token-acc@2" and validations[0]["best"]
    best = read_checkpoint(tmp_path / "editor-best")
    assert round(best.extra["validation"]["score"], 3) == max(r["score"] for r in validations)
    assert not [k for k in best.state if k.startswith("key_memory/")]
    assert editor.store.steps == [] and len(editor.method.memory) == 0  # left unedited, memory empty


def test_validation_logs_the_training_objective_on_the_held_out_edits(tokenizer, tmp_path):
    """Each validation record carries the loss's terms on the held-out stream, each step scored right after it
    is applied: the gen term is the target cross-entropy of its rephrases and edit prompts on the edited model."""
    torch.manual_seed(0)
    settings = TrainHparams(episodes=1, steps_per_episode=2, batch=2, back_depth=2, validation_size=4,
                            validation_batch=2, meta_lr=1e-3, loc_reference="unedited", loc_coef=3.0)
    editor = Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, layers=[2, 3],
                                    hparams=RLEditHparams(rank=8, lr_init=30.0, train=settings))
    trainer = RLEditTrainer(editor, load_requests("zsre", "train", limit=8), tmp_path, progress=False)
    trainer.train()
    last = [r for r in _log(tmp_path) if r["kind"] == "validation"][-1]["objective"]
    assert last["loss"] == pytest.approx(last["gen"] + 3.0 * last["loc"], abs=1e-3) and last["loc"] > 0
    gens, unedited = [], []
    for i in (0, 2):
        requests = trainer.validation[i:i + 2]
        prompts = [p for r in requests for p in r.rephrase_prompts] + [r.prompt for r in requests]
        targets = [r.target_new for r in requests for _ in r.rephrase_prompts] + [r.target_new for r in requests]
        batch = encode(tokenizer, prompts, targets, padding_side="left")
        with torch.no_grad():
            unedited.append(float(answer_token_loss(answer_logits(editor.model, batch), batch)))
            editor.apply(requests)
            gens.append(float(answer_token_loss(answer_logits(editor.model, batch), batch)))
    assert last["gen"] == pytest.approx(sum(gens) / 2, abs=1e-3)
    assert last["gen"] < sum(unedited) / 2  # the edits took: the held-out targets got likelier


def test_the_margin_locality_term_reads_only_whether_the_argmax_keeps_its_lead(tokenizer, tmp_path):
    """``loc_objective: margin``: max(0, min(m, r) - d) per position, d the unedited argmax's lead under the
    edited model, r under the unedited one; zero for an unchanged model and for changes that keep the lead."""
    ref = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.5, 0.2]]), -1)
    assert float(locality_margin(ref, ref, 1.0)) == 0.0
    tail_moved = torch.log_softmax(torch.tensor([[3.0, 0.0, 1.5], [0.0, 0.5, -2.0]]), -1)  # leads 1.5 and 0.5 kept
    assert float(locality_margin(ref, tail_moved, 1.0)) == 0.0
    flipped = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.5, 0.2]]), -1)  # row 0: lead 2 -> -1
    assert float(locality_margin(ref, flipped, 1.0)) == pytest.approx((1.0 - (-1.0)) / 2)
    assert float(locality_margin(ref, flipped, 0.5)) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="loc_objective"):
        TrainHparams(loc_objective="l2")
    trainer = _trainer(tokenizer, tmp_path, episodes=2, loc_objective="margin", loc_margin=0.5)
    trainer.train()
    episodes = [r for r in _log(tmp_path) if r["kind"] == "episode"]
    assert len(episodes) == 2 and all(math.isfinite(r["loss"]) and r["loc"] >= 0 for r in episodes)


def test_training_stops_when_the_loss_diverges(tokenizer, tmp_path):
    trainer = _trainer(tokenizer, tmp_path, episodes=5, diverge_factor=1e-9)  # any loss after the first "diverges"
    trainer.train()
    log = _log(tmp_path)
    assert [r["kind"] for r in log] == ["run", "episode", "episode", "stopped"]
    assert (tmp_path / "editor").is_dir() and trainer.episode == 2


@pytest.mark.parametrize("refine_layers", [[], [3]])
def test_a_training_step_makes_the_passes_of_an_edit(tokenizer, tmp_path, refine_layers):
    """With passes > 1 the trainer acts as an edit does: the step it keeps is the editor's own multi-pass update
    of the same requests from the same state (later passes on every layer, or on layer 3 only), and the loss
    reaches the scalars through it."""
    def editor():
        torch.manual_seed(0)
        hparams = RLEditHparams(rank=16, lr_init=30.0, memory_init=1.0, passes=3, refine="gradient",
                                refine_layers=refine_layers,
                                train=TrainHparams(episodes=1, steps_per_episode=1, batch=2, back_depth=1,
                                                   loc_reference="unedited"))
        return Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, hparams=hparams, layers=[2, 3])

    requests = load_requests("zsre", "train", limit=4)
    at_edit_time = editor()
    expected = at_edit_time.store.factors(at_edit_time.apply(requests[:2]).id)
    trainer = RLEditTrainer(editor(), requests, tmp_path, progress=False)
    step = trainer._tokenise(requests[:2])
    assert len(step.passes) == 2
    trainer.learn_step(step)
    store = trainer.editor.store
    kept = store.factors(store.steps[-1])
    assert kept.keys() == expected.keys()
    for name, (u, v) in kept.items():
        n = step.edit.n_key_tokens
        passes = 3 if not refine_layers or ".3." in name else 1
        assert u.shape[1] == v.shape[0] == passes * n  # the passes' factors, appended
        assert torch.allclose(u @ v, expected[name][0] @ expected[name][1], atol=1e-5, rtol=1e-4)
    net = trainer.method.hypernet
    assert net.log_lr.grad is not None and bool(net.log_lr.grad.abs().sum() > 0)
    assert len(trainer.method.memory) == 1  # one step, remembered once


@pytest.mark.parametrize("held", ["scalar_meta_lr", "meta_lr"])
def test_a_learning_rate_of_zero_holds_its_group_and_trains_the_other(tokenizer, tmp_path, held):
    """scalar_meta_lr 0: scalars chosen on validation, only the network learns; meta_lr 0: the network held
    (e.g. at its identity), only the per-module scalars learn."""
    trainer = _trainer(tokenizer, tmp_path, episodes=1, memory_init=1.0, **{held: 0.0})
    net = trainer.method.hypernet
    groups = {"scalar_meta_lr": [net.log_lr, net.ridge_log, net.memory_log, net.corpus_log],
              "meta_lr": list(net.nets.parameters())}
    before = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
    trainer.train()
    trained = "meta_lr" if held == "scalar_meta_lr" else "scalar_meta_lr"
    assert all(torch.equal(p, q) for p, q in zip(groups[held], before[held]))
    assert all(p.grad is None for p in groups[held])  # held: not even a gradient is computed
    assert any(not torch.equal(p, q) for p, q in zip(groups[trained], before[trained]))
    with pytest.raises(ValueError, match=f"{held} must be >= 0"):
        TrainHparams(**{held: -1.0})
    with pytest.raises(ValueError, match="nothing would be trained"):
        TrainHparams(meta_lr=0.0, scalar_meta_lr=0.0)


def test_the_margin_objective_scores_new_over_old_as_the_protocol_does(tokenizer, tmp_path):
    """``gen_objective: margin``: per rephrase/edit prompt, max(0, m - (mean log p(new) - mean log p(old))), the
    log-probabilities the cf-prob protocol compares; data without old targets is refused."""
    torch.manual_seed(0)
    hparams = RLEditHparams(rank=16, lr_init=30.0, train=TrainHparams(
        episodes=2, steps_per_episode=2, batch=2, back_depth=2, loc_reference="unedited", train_data="counterfact",
        gen_objective="margin", gen_margin=0.05))
    editor = Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, hparams=hparams, layers=[2, 3])
    requests = load_requests("counterfact", "train", limit=4)
    with pytest.raises(ValueError, match="no ground_truth"):
        RLEditTrainer(editor, [dataclasses.replace(r, ground_truth=None) for r in requests], tmp_path / "none")
    trainer = RLEditTrainer(editor, requests, tmp_path / "cf", progress=False)
    step = trainer._tokenise(requests[:2])
    prompts = [p for r in requests[:2] for p in r.rephrase_prompts] + [r.prompt for r in requests[:2]]
    olds = [r.ground_truth for r in requests[:2] for _ in r.rephrase_prompts] + [r.ground_truth for r in requests[:2]]
    news = [r.target_new for r in requests[:2] for _ in r.rephrase_prompts] + [r.target_new for r in requests[:2]]
    predicted = predict_answers(editor.model, tokenizer, list(zip(prompts, news)) + list(zip(prompts, olds)))
    wins = torch.tensor([predicted[(p, new)].mean_log_prob - predicted[(p, old)].mean_log_prob
                         for p, new, old in zip(prompts, news, olds)])
    assert 0 < int((wins < 0.05).sum()) < len(wins)  # some prompts inside the margin, some past it
    with torch.no_grad(), trainer._upper_layers_only():
        term = trainer._gen_term(answer_logits(editor.model, step.gen), step)
    assert torch.allclose(term, torch.relu(0.05 - wins).mean(), atol=1e-4)
    trainer.train()
    assert [r["kind"] for r in _log(tmp_path / "cf")] == ["run", "episode", "episode"]
    assert all(math.isfinite(r["loss"]) for r in _log(tmp_path / "cf") if r["kind"] == "episode")


class _Draw:
    """A generator that draws the rows it is given, one list per draw."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def sample(self, population, k):
        rows = self.draws.pop(0)
        assert len(rows) == k and all(r in population for r in rows)
        return rows


@pytest.mark.parametrize("gen_objective", ["ce", "margin"])
def test_sampled_loss_rows_are_an_unbiased_estimate_of_the_step_loss(tokenizer, tmp_path, gen_objective):
    """With ``loss_rows`` a step keeps one generalization row and one locality row: over every row it may draw,
    the sampled terms average to the terms over all rows (the token means are rescaled, not biased towards
    short answers), and its cached states and references cover the drawn rows alone."""
    trainer = _trainer(tokenizer, tmp_path, episodes=1, gen_objective=gen_objective)
    requests = load_requests("counterfact", "train", limit=4) if gen_objective == "margin" else trainer.requests
    whole = trainer._tokenise(requests)
    features = capture_features(trainer.editor.model, trainer.editor.targets, whole.edit)
    trainer.method.fold_statistics([features])
    n_gen, n_loc = whole.gen.input_ids.shape[0], whole.loc.input_ids.shape[0]
    assert n_gen == 8 and n_loc == 4 and len(set(whole.gen.answer_mask.sum(1).tolist())) > 1
    trainer.hp = dataclasses.replace(trainer.hp, loss_rows=1 / n_gen)  # one row of each (at least one)
    with torch.no_grad():
        updates = trainer.action(whole, features)
        expected = trainer.step_loss(updates, [whole], [1.0])[1]
        sampled = []
        for g in range(n_gen):
            trainer.lanes[0].rng = _Draw([g], [g % n_loc])
            step = trainer._tokenise(requests, sampled=True)
            assert step.gen.input_ids.shape[0] == 1 and step.loc.input_ids.shape[0] == 1
            assert step.gen.inputs_embeds.shape[:2] == step.gen.input_ids.shape
            assert step.loc_ref.shape[0] == step.loc.n_answer_tokens
            sampled.append(trainer.step_loss(updates, [step], [1.0])[1])
    assert sum(s["gen"] for s in sampled) / n_gen == pytest.approx(expected["gen"], rel=1e-5)
    assert sum(s["loc"] for s in sampled[:n_loc]) / n_loc == pytest.approx(expected["loc"], rel=1e-5, abs=1e-9)
    assert len({round(s["gen"], 6) for s in sampled}) > 1  # the draws do differ
    with pytest.raises(ValueError, match="loss_rows"):
        TrainHparams(loss_rows=0)


def test_differentiable_passes_give_the_gradient_of_the_step_loss(tokenizer, tmp_path):
    """With ``differentiable_passes`` the meta-gradient of a multi-pass step is the gradient of its loss (a
    central finite difference in each module's log step size agrees); read detached, the later passes' features
    leave it biased."""
    torch.manual_seed(0)
    hparams = RLEditHparams(rank=16, lr_init=30.0, memory_init=1.0, passes=3, refine="gradient",
                            train=TrainHparams(episodes=1, steps_per_episode=1, batch=2, back_depth=1,
                                               loc_reference="unedited", differentiable_passes=True))
    editor = Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, hparams=hparams, layers=[2, 3])
    trainer = RLEditTrainer(editor, load_requests("zsre", "train", limit=4), tmp_path, progress=False)
    step = trainer._tokenise(trainer.requests[:2])
    features = capture_features(editor.model, editor.targets, step.edit)
    trainer.method.fold_statistics([features])
    log_lr = trainer.method.hypernet.log_lr

    def loss(differentiable: bool = False) -> torch.Tensor:
        return trainer.step_loss(trainer.action(step, features, differentiable), [step], [1.0])[0]

    gradients = {}
    for differentiable in (True, False):
        log_lr.grad = None
        loss(differentiable).backward()
        gradients[differentiable] = log_lr.grad.clone()
    measured = torch.zeros_like(log_lr)
    eps = 1e-3
    with torch.no_grad():
        for i in range(log_lr.numel()):
            moved = []
            for sign in (1.0, -1.0):
                log_lr[i] += sign * eps
                moved.append(loss().item())
                log_lr[i] -= sign * eps
            measured[i] = (moved[0] - moved[1]) / (2 * eps)
    def error(gradient: torch.Tensor) -> float:
        return float((gradient - measured).norm() / measured.norm())

    assert error(gradients[True]) < 0.02  # exact up to the finite difference's own error
    assert error(gradients[False]) > 0.5
