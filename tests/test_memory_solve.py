"""The memory-aware ridge solve (ALGORITHM.md §4b) and the key memory of applied steps, on small tensors and a
tiny model: the plain solve is unchanged, the penalised solve is the normal-equation solution, the memory
follows applies, reverts, saves and loads exactly, and a checkpoint never carries it."""

import warnings

import pytest
import torch
from test_rledit_net import SHAPES, dense_ridge, make_method, random_features
from tiny import tiny_model

from rledit.checkpoints import read_checkpoint
from rledit.data import load_requests
from rledit.deltas import DeltaError
from rledit.editor import Editor, EditorError, as_requests
from rledit.methods.base import UpdateError
from rledit.methods.memory import KeyMemory
from rledit.methods.rledit import RLEditHparams, ridge_factors


def _system(n=5, d_in=6, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, shifts = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    earlier = torch.randn(9, d_in, generator=g).double()
    return keys, shifts, earlier.T @ earlier


def test_without_a_penalty_the_solve_is_the_plain_push_through_solve():
    keys, shifts, _ = _system()
    ridge_log = torch.tensor(0.3)
    u, v = ridge_factors(keys, shifts, ridge_log)
    assert torch.equal(u, keys.T)
    assert torch.allclose((u @ v).double(), dense_ridge(keys, shifts, ridge_log), atol=1e-6)
    zero_penalty = ridge_factors(keys, shifts, ridge_log, torch.zeros(6, 6, dtype=torch.float64))
    assert torch.allclose(zero_penalty[0] @ zero_penalty[1], u @ v, atol=1e-6)


def test_the_penalised_solve_is_the_normal_equation_solution_with_rank_at_most_n():
    keys, shifts, penalty = _system()
    ridge_log = torch.tensor(-0.5)
    u, v = ridge_factors(keys, shifts, ridge_log, penalty)
    assert u.shape == (6, 5) and v.shape == (5, 4) and u.dtype == v.dtype == torch.float32
    k, d = keys.double(), shifts.double()
    expected = torch.linalg.solve(k.T @ k + ridge_log.exp().double() * torch.eye(6, dtype=k.dtype) + penalty,
                                  k.T @ d)
    assert torch.allclose((u @ v).double(), expected, atol=1e-5)


def test_gradients_reach_the_memory_weight():
    keys, shifts, gram = _system()
    log_beta = torch.tensor(0.0, requires_grad=True)
    u, v = ridge_factors(keys, shifts, torch.tensor(0.0), log_beta.exp().double() * gram)
    (u @ v).square().sum().backward()
    assert log_beta.grad is not None and log_beta.grad < 0  # a stronger memory shrinks the update


def test_key_memory_commits_reverts_exactly_and_round_trips():
    memory = KeyMemory({"m": (3, 2)})
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(4, 3, generator=g) for _ in range(3)]
    grams = []
    for step_id, keys in enumerate(steps):
        memory.stage({"m": keys})
        memory.commit(step_id)
        grams.append(memory.gram("m").clone())
    memory.stage({"m": torch.ones(2, 3)})
    memory.discard()
    assert len(memory) == 3 and torch.equal(memory.gram("m"), grams[-1])
    restored = KeyMemory({"m": (3, 2)})
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.gram("m"), grams[-1])
    memory.revert(2)
    assert torch.equal(memory.gram("m"), grams[1])  # as if step 2 had never been applied
    memory.revert(7)  # a step it never saw: nothing happens
    assert torch.equal(memory.gram("m"), grams[1])
    with pytest.raises(RuntimeError, match="no staged keys"):
        memory.commit(3)
    with pytest.raises(ValueError, match="does not fit"):
        restored.load_state_dict({"key_memory/0/m": torch.zeros(2, 5)})
    memory.reset()
    assert len(memory) == 0 and not memory.gram("m").any()


def test_an_editor_without_memory_computes_exactly_what_it_did_before():
    plain, remembering = make_method(), make_method(memory_init=1.0)
    remembering.hypernet.load_state_dict(plain.hypernet.state_dict())
    remembering.memory = KeyMemory(SHAPES)  # what prepare() builds when memory_init > 0
    first, second = random_features(seed=0), random_features(seed=1)
    assert plain.memory is None
    a = plain.compute_updates(first)
    b = remembering.compute_updates(first)  # an empty memory: the plain solve, bit for bit
    assert all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    remembering.step_applied(0)
    plain.step_applied(0)
    c, d = plain.compute_updates(second), remembering.compute_updates(second)
    assert all(not torch.allclose(c[n][0] @ c[n][1], d[n][0] @ d[n][1]) for n in c)  # the memory now acts


LAYERS = [1, 2]


def _editor(tokenizer, **hparams):
    torch.manual_seed(0)
    return Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, layers=LAYERS,
                                  hparams=RLEditHparams(**{"rank": 8, "lr_init": 30.0, **hparams}))


def test_editor_memory_follows_apply_revert_save_and_load(tokenizer, tmp_path, monkeypatch):
    editor = _editor(tokenizer, memory_init=1.0)
    requests = load_requests("zsre", "train", limit=6)
    memory, names = editor.method.memory, [t.name for t in editor.targets]
    first = editor.apply(requests[:2])
    after_first = {n: memory.gram(n).clone() for n in names}
    second = editor.apply(requests[2:4])
    assert len(memory) == 2 and all(not torch.equal(memory.gram(n), after_first[n]) for n in names)
    before = {n: memory.gram(n).clone() for n in names}

    def refuse(updates):
        raise DeltaError("refused")

    with monkeypatch.context() as patch:  # a step that fails after its update was computed
        patch.setattr(editor.store, "add", refuse)
        with pytest.raises(DeltaError):
            editor.apply(requests[4:6])
    memory = editor.method.memory  # restored as it was: two steps, nothing staged
    assert len(memory) == 2 and memory.staged is None
    assert all(torch.equal(memory.gram(n), before[n]) for n in names)
    editor.save(tmp_path / "edited")
    loaded = Editor.load(tmp_path / "edited", model=tiny_model("llama"), tokenizer=tokenizer)
    assert all(torch.equal(loaded.method.memory.gram(n), memory.gram(n)) for n in names)
    loaded.revert(second.id)
    editor.revert(second.id)
    assert all(torch.equal(m.method.memory.gram(n), after_first[n]) for m in (editor, loaded) for n in names)
    # the next step is the same whether or not the reverted step was ever applied
    fresh = _editor(tokenizer, memory_init=1.0)
    fresh.apply(requests[:2])
    third, again = editor.apply(requests[4:6]), fresh.apply(requests[4:6])
    a, b = editor.store.factors(third.id), fresh.store.factors(again.id)
    assert all(torch.allclose(a[n][0] @ a[n][1], b[n][0] @ b[n][1], atol=1e-6) for n in names)
    editor.revert(first.id)
    editor.revert(third.id)
    assert len(memory) == 0


def test_checkpoints_leave_the_memory_out_and_old_checkpoints_take_a_memory(tokenizer, tmp_path):
    editor = _editor(tokenizer, memory_init=2.0)
    editor.apply(load_requests("zsre", "train", limit=2))
    editor.save_checkpoint(tmp_path / "ckpt")
    saved = read_checkpoint(tmp_path / "ckpt")
    assert not [k for k in saved.state if k.startswith("key_memory/")]
    assert torch.allclose(saved.state["memory_log"].exp(), torch.full((len(LAYERS) * 2,), 2.0))
    plain = _editor(tokenizer)
    plain.save_checkpoint(tmp_path / "old")
    state = read_checkpoint(tmp_path / "old").state
    del state["memory_log"], state["corpus_log"]  # a checkpoint from before the memory-aware solve
    method = _editor(tokenizer, memory_init=0.5).method
    method.load_state_dict(state)
    assert torch.allclose(method.hypernet.memory_log.exp(), torch.full((4,), 0.5))
    with pytest.raises(UpdateError, match="holds a key memory"):
        plain.method.load_state_dict(editor.method.state_dict())
    with pytest.raises(EditorError, match="not settings of a rledit editor"):
        Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, checkpoint=tmp_path / "ckpt",
                               hparams={"memory": 1.0})
    overridden = Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, checkpoint=tmp_path / "old",
                                        hparams={"memory_init": 1.0})
    assert overridden.method.memory is not None


def test_edit_passes_fit_what_one_pass_left_and_remember_the_step_once(tokenizer):
    from rledit.hooks import capture_features

    requests = load_requests("zsre", "train", limit=4)
    losses, ranks = {}, {}
    for passes, refine in ((1, "network"), (2, "network"), (3, "network"), ("3g", "gradient")):
        editor = _editor(tokenizer, memory_init=1.0, passes=int(str(passes)[0]), refine=refine)
        step = editor.apply(requests)
        batch = editor._encode(as_requests(requests))
        losses[passes] = capture_features(editor.model, editor.targets, batch).loss
        ranks[passes] = set(step.ranks.values())
        memory = editor.method.memory
        assert len(memory) == 1 and memory.staged is None
        keys = next(iter(memory.steps.values()))
        assert all(k.shape[0] == batch.n_answer_tokens for k in keys.values())  # the first pass's keys, once
    assert losses[3] < losses[2] < losses[1] and losses["3g"] < losses[1]
    n = batch.n_answer_tokens
    assert ranks[1] == {n} and max(ranks[2]) > n  # a second pass adds directions (kept dense once larger)
    with pytest.raises(ValueError, match="passes must be >= 1"):
        RLEditHparams(passes=0)
    with pytest.raises(ValueError, match="refine must be one of"):
        RLEditHparams(refine="newton")


def test_subject_keys_add_one_feature_row_per_edit_at_its_subject_and_need_subjects(tokenizer):
    from rledit.hooks import capture_features
    from rledit.tokens import encode, with_subject_keys
    from rledit.types import EditRequest, EditRequestError

    requests = as_requests(load_requests("zsre", "train", limit=4))
    editor = _editor(tokenizer, memory_init=1.0, passes=2, refine="gradient", key_positions="answer+subject")
    plain = encode(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
    marked = with_subject_keys(tokenizer, plain, requests)
    assert marked.n_answer_tokens == plain.n_answer_tokens and marked.n_key_tokens == plain.n_answer_tokens + 4
    subjects_only = with_subject_keys(tokenizer, plain, requests, answers=False)
    subject_mask = marked.key_mask & ~plain.answer_mask
    assert subjects_only.n_key_tokens == 4 and torch.equal(subjects_only.key_mask, subject_mask)
    for row, request in enumerate(requests):  # the marked token is the subject's last, inside the prompt
        token = marked.input_ids[row][subject_mask[row]]
        assert tokenizer.decode(token).strip() and tokenizer.decode(token).strip() in request.subject
    features, answer_only = (capture_features(editor.model, editor.targets, b) for b in (marked, plain))
    assert features.loss == pytest.approx(answer_only.loss)  # the loss is the answer tokens' alone
    for name, keys in answer_only.keys.items():  # answer rows are the same rows, subject rows come in between
        rows = plain.answer_mask[marked.key_mask]
        assert torch.allclose(features.keys[name][rows], keys) and torch.allclose(features.grads[name][rows],
                                                                                  answer_only.grads[name])
    step = editor.apply(requests)
    keys = next(iter(editor.method.memory.steps[step.id].values()))
    assert keys.shape[0] == marked.n_key_tokens  # the memory holds the subject rows too
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    memory_before = editor.method.memory.state_dict()
    with pytest.raises(EditRequestError, match="key_positions 'answer\\+subject'.*set key_positions: answer"):
        editor.apply([EditRequest(prompt="What is the capital of Mars?", target_new="Olympus")])
    with pytest.raises(EditRequestError, match="does not occur in its prompt"):
        editor.apply([EditRequest(prompt="What is the capital of Mars?", target_new="Olympus", subject="Venus")])
    assert all(torch.equal(v, before[k]) for k, v in editor.model.state_dict().items())
    assert all(torch.equal(v, editor.method.memory.state_dict()[k]) for k, v in memory_before.items())
    with pytest.raises(ValueError, match="key_positions must be one of"):
        RLEditHparams(key_positions="prompt")


def test_kept_inverses_follow_the_memory_and_give_the_factored_solve():
    from rledit.methods.rledit import PenaltyInverses

    keys, shifts, c0 = _system(n=5, d_in=6)
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(4, 6, generator=g) for _ in range(3)]
    ridge_log, beta, alpha = torch.tensor(-1.0), 0.7, 2.0
    scalars = (-1.0, beta, alpha)
    inverses, memory = PenaltyInverses(), torch.zeros(6, 6, dtype=torch.float64)
    def system():
        return alpha * c0 + beta * memory + ridge_log.double().exp() * torch.eye(6, dtype=torch.float64)

    for step in steps:
        inverse = inverses.get("m", scalars, system)
        fast = ridge_factors(keys, shifts, ridge_log, inverse=inverse)
        exact = ridge_factors(keys, shifts, ridge_log, alpha * c0 + beta * memory)
        assert torch.allclose(fast[0] @ fast[1], exact[0] @ exact[1], atol=1e-5)
        inverses.add_keys("m", scalars, step)  # Woodbury: the next get reuses it
        memory = memory + step.double().T @ step.double()
        assert torch.allclose(inverses.entries["m"][1], torch.linalg.inv(system()), atol=1e-9)
    inverses.add_keys("m", (-1.0, beta, 3.0), steps[0])  # other scalars: the entry is dropped, not updated
    assert inverses.entries == {} and inverses.nbytes() == 0


def _assert_kept_inverses_give_the_direct_solve(editor, requests):
    """The next step's update through the kept inverses of A (edit time, no gradients) is the direct solve's."""
    from rledit.hooks import capture_features

    method = editor.method
    features = capture_features(editor.model, editor.targets, editor._encode(as_requests(requests)))
    with torch.no_grad():
        fast = method.compute_updates(features, editor.targets, update_stats=False)
    with torch.enable_grad():
        exact = method.compute_updates(features, editor.targets, update_stats=False)
    method.memory.discard()
    for name in fast:
        assert torch.allclose(fast[name][0] @ fast[name][1], (exact[name][0] @ exact[name][1]).detach(),
                              rtol=1e-4, atol=1e-7)


def test_edit_time_solve_through_kept_inverses_equals_the_factorised_solve(tokenizer):
    editor = _editor(tokenizer, memory_init=1.0, passes=2, refine="gradient")
    requests = load_requests("zsre", "train", limit=8)
    for i in range(3):
        editor.apply(requests[2 * i:2 * i + 2])
    method, names = editor.method, [t.name for t in editor.targets]
    assert set(method.inverses.entries) == set(names)  # built once, then updated at every commit
    for name in names:
        assert torch.allclose(method.inverses.entries[name][1], torch.linalg.inv(method.system(name)), atol=1e-8)
    _assert_kept_inverses_give_the_direct_solve(editor, requests[6:])
    editor.revert(sorted(editor.history)[1])
    assert method.inverses.entries == {}  # a revert drops them; the next step rebuilds from the memory


def test_the_passes_of_a_step_run_the_unedited_layers_once_and_give_the_same_update(tokenizer, monkeypatch):
    from rledit.prefix import Prefix

    requests = load_requests("zsre", "train", limit=4)
    runs = {}
    for skipped in (True, False):
        if not skipped:
            monkeypatch.setattr(Prefix, "for_targets", classmethod(lambda cls, model, targets: None))
        editor = _editor(tokenizer, memory_init=1.0, passes=3, refine="gradient")
        assert editor.targets[0].layer > 0  # there are unedited layers below the edited ones
        lowest = editor.model.model.layers[0]
        runs_of_lowest = []
        lowest.register_forward_hook(lambda module, args, output, runs=runs_of_lowest: runs.append(1))
        editor.apply(requests[:2])
        editor.apply(requests[2:])
        # with the prefix: once per step (the first capture's, reused by both later passes); without: every pass
        assert len(runs_of_lowest) == (2 if skipped else 6)
        runs[skipped] = {t.name: editor.store.delta(t.name) for t in editor.targets}
    for name, delta in runs[True].items():
        assert torch.allclose(delta, runs[False][name], rtol=1e-4, atol=1e-6)


LAYER_2_UP = "model.layers.2.mlp.up_proj"


def test_refine_layers_keep_the_later_passes_to_the_upper_layers_and_run_only_those(tokenizer, monkeypatch):
    from rledit.prefix import Prefix

    requests = load_requests("zsre", "train", limit=4)
    runs, deltas = {}, {}
    for way in ("upper only", "upper only, whole model", "every layer"):
        if way == "upper only, whole model":
            monkeypatch.setattr(Prefix, "for_targets", classmethod(lambda cls, model, targets: None))
        refine = [] if way == "every layer" else [2]
        editor = _editor(tokenizer, memory_init=1.0, passes=3, refine="gradient", refine_layers=refine)
        layer_1 = editor.model.model.layers[1]
        runs[way] = []
        layer_1.register_forward_hook(lambda module, args, output, runs=runs[way]: runs.append(1))
        step = editor.apply(requests)
        n = editor._encode(as_requests(requests)).n_answer_tokens
        for target in editor.targets:  # pass 1 writes every layer, the later passes layer 2 only
            refined = way == "every layer" or target.layer == 2
            assert step.ranks[target.name] == (min(3 * n, target.d_in, target.d_out) if refined else n)
        deltas[way] = {t.name: editor.store.delta(t.name) for t in editor.targets}
        assert len(editor.method.memory) == 1
    # layer 1 runs in the first capture and once more for what enters layer 2; then the passes run from layer 2
    assert len(runs["upper only"]) == 2 and len(runs["upper only, whole model"]) == 3
    for name, delta in deltas["upper only"].items():
        torch.testing.assert_close(delta, deltas["upper only, whole model"][name], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(deltas["upper only"][LAYER_2_UP], deltas["every layer"][LAYER_2_UP])
    with pytest.raises(UpdateError, match=r"refine_layers \[3\] are not edited layers"):
        _editor(tokenizer, memory_init=1.0, passes=3, refine_layers=[2, 3])


def test_the_solve_cost_benchmark_measures_both_solves_and_they_agree(tmp_path, monkeypatch):
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import solve_cost

    monkeypatch.setattr(sys, "argv", ["solve_cost.py", "--dims", "24", "40", "--tokens", "6", "--passes", "2",
                                      "--steps", "2", "--d-out", "8", "--out", str(tmp_path)])
    solve_cost.main()
    summary = json.loads((tmp_path / "solve_cost.json").read_text())
    assert [r["d_in"] for r in summary["rows"]] == [24, 40] and "| 40 |" in (tmp_path / "solve_cost.md").read_text()
    assert all(r["max_relative_difference"] < 1e-5 and r["factorised_seconds_per_step"] > 0 for r in summary["rows"])


def test_pass_positions_choose_where_each_later_pass_reads_its_features(tokenizer):
    requests = load_requests("zsre", "train", limit=4)
    losses = {}
    for schedule in (("answer",), ("subject",), ("answer+subject",)):
        editor = _editor(tokenizer, memory_init=1.0, passes=2, refine="gradient", key_positions="subject",
                         pass_positions=schedule)
        step = editor.apply(requests)
        batch = editor._encode(as_requests(requests))
        n_edits, n_answers = len(requests), batch.n_answer_tokens
        rows = {"subject": n_edits, "answer": n_answers, "answer+subject": n_answers + n_edits}
        expected = n_edits + sum(rows[where] for where in schedule)
        for target in editor.targets:  # one factor column per feature row of every pass (kept dense past d)
            assert step.ranks[target.name] == min(expected, target.d_in, target.d_out)
        from rledit.hooks import capture_features

        losses[schedule] = capture_features(editor.model, editor.targets, editor._encode(as_requests(requests))).loss
    assert len(set(losses.values())) == 3  # the schedules write different updates
    with pytest.raises(ValueError, match="2 entries for passes = 3"):
        RLEditHparams(passes=3, pass_positions=["answer"])
    with pytest.raises(ValueError, match="pass_positions must hold entries"):
        RLEditHparams(passes=2, pass_positions=["everywhere"])


def test_context_prefixes_add_one_row_per_prefix_read_at_the_subject_after_it(tokenizer):
    from rledit.methods.memit import compute
    from rledit.tokens import context_length

    requests = as_requests(load_requests("counterfact", "train", limit=3))
    editor = _editor(tokenizer, memory_init=1.0, passes=2, refine="gradient", key_positions="subject",
                     context_lengths=[[3, 2]])
    method = editor.method
    assert len(method.prefixes) == 3 and method.prefixes[0] == ""
    assert method.setup_report()["context_prefixes"] == method.prefixes
    plain = method.plain_batch(tokenizer, requests)
    rows, _, _ = compute.edit_rows(tokenizer, requests, method.prefixes, None)  # MEMIT's rows: the same batch
    assert torch.equal(plain.input_ids, rows.input_ids) and plain.input_ids.shape[0] == 9
    marked = method.edit_batch(tokenizer, requests, context_length(editor.model))
    assert marked.n_key_tokens == 9 and (marked.key_mask.sum(1) == 1).all()  # one subject row per prompt
    for row, (request, prefix) in enumerate((r, p) for r in requests for p in method.prefixes):
        token = tokenizer.decode(marked.input_ids[row][marked.key_mask[row]]).strip()
        assert token and token in request.subject
        text = tokenizer.decode(marked.input_ids[row][marked.attention_mask[row].bool()], skip_special_tokens=True)
        assert text.replace(" ", "").startswith((prefix + request.prompt).replace(" ", ""))
    step = editor.apply(requests)
    keys = next(iter(method.memory.steps[step.id].values()))
    assert keys.shape[0] == 9  # every context row's key joins the memory
    bare = _editor(tokenizer, memory_init=1.0, key_positions="subject")
    assert bare.method.prefixes == [""] and bare.method.edit_batch(tokenizer, requests).n_key_tokens == 3
    with pytest.raises(ValueError, match="context_lengths must hold"):
        RLEditHparams(context_lengths=[[3, 0]])


def test_a_rank_limited_c0_keeps_its_leading_directions_and_the_editor_reports_it(tokenizer, tmp_path, monkeypatch):
    from rledit.methods.rledit.solve import leading_part

    _, _, moment = _system(d_in=6)
    values, vectors = torch.linalg.eigh(moment)
    part = leading_part(moment, 2)
    assert torch.linalg.matrix_rank(part) == 2 and torch.equal(leading_part(moment, None), moment)
    assert torch.allclose(part @ vectors[:, -2:], vectors[:, -2:] * values[-2:], atol=1e-9)  # kept as they were
    assert torch.allclose(part @ vectors[:, :-2], torch.zeros(6, 4, dtype=moment.dtype), atol=1e-9)  # the rest gone
    assert torch.equal(leading_part(moment, 6), moment)

    monkeypatch.setenv("RLEDIT_CACHE", str(tmp_path / "cache"))
    settings = {"corpus_init": 10.0, "corpus": "counterfact-train-subjects", "corpus_positions": "subjects",
                "stats_samples": 40, "key_positions": "subject"}
    full, limited = _editor(tokenizer, **settings), _editor(tokenizer, corpus_rank=3, **settings)
    for name, moment in full.method.corpus_moments.items():
        assert torch.allclose(limited.method.corpus_moments[name], leading_part(moment, 3))
    assert limited.method.setup_report()["statistics"]["rank"] == 3
    assert limited.method.setup_report()["statistics"]["n_tokens"] == 40  # one subject key per text
    requests = load_requests("counterfact", split="train")[:2]
    ids = torch.tensor([tokenizer(requests[0].prompt)["input_ids"]])
    with torch.no_grad():
        before = limited.model(input_ids=ids).logits
        limited.apply(requests)  # the rank-limited solve edits
        assert not torch.allclose(limited.model(input_ids=ids).logits, before)
    with pytest.raises(ValueError, match="corpus_rank"):
        RLEditHparams(corpus_rank=0)


def test_contrast_rows_put_each_edit_in_other_subjects_and_keep_their_outputs(tokenizer):
    from rledit.hooks import capture_keys

    requests = load_requests("zsre", "train", limit=3)
    editor = _editor(tokenizer, memory_init=1.0, contrast_subjects=1, contrast_weight=1e4)
    contrast = editor.method.contrast_requests(requests)
    assert [c.subject for c in contrast] == [requests[1].subject, requests[2].subject, requests[0].subject]
    assert contrast[0].prompt == requests[0].prompt.replace(requests[0].subject, requests[1].subject)
    assert all(c.target_new == r.target_new for c, r in zip(contrast, requests))
    batch = editor.method.marked(tokenizer, contrast, editor.method.plain_batch(tokenizer, contrast))
    contrast_keys = capture_keys(editor.model, editor.targets, batch)  # before the edit, as the step reads them

    moved = {}
    for weight in (None, 1e4):
        editor = _editor(tokenizer, memory_init=1.0, **({} if weight is None else
                                                       {"contrast_subjects": 1, "contrast_weight": weight}))
        editor.apply(requests)
        moved[weight] = sum(float((contrast_keys[t.name] @ editor.store.delta(t.name)).norm()) for t in editor.targets)
        assert editor.method.contrast_keys == {} and editor.method.contrast_inverses == {}  # one step's only
    assert moved[1e4] < 1e-3 * moved[None]  # the contrast prompts' outputs barely move

    with pytest.raises(ValueError, match="contrast_subjects"):
        RLEditHparams(contrast_subjects=-1)


def test_retuning_sets_the_scalars_an_override_names_even_when_the_checkpoint_holds_them(tokenizer, monkeypatch):
    """benchmarks/retune_scalars.py: a network trained with the corpus term off holds α = 1; the rule's override
    corpus_init = 1000 (× the alpha scale) must reach it, as it reaches a network that holds no α."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from retune_scalars import set_scalars
    from validation_sweep import scale_scalars

    net = _editor(tokenizer).method.hypernet  # memory and corpus terms off: β = α = 1 held
    before = net.scalars()
    set_scalars(net, {"memory_init": 1.0, "corpus_init": 1000.0, "passes": 6})
    scale_scalars(net, {"alpha": 0.6, "ridge": 0.1})
    after = net.scalars()
    assert all(abs(a - 600.0) < 1e-3 for a in after["alpha"]) and all(abs(b - 1.0) < 1e-6 for b in after["beta"])
    assert after["lr"] == before["lr"]  # scalars no override names keep their learned values
    assert all(abs(r - 0.1 * r0) < 1e-6 for r, r0 in zip(after["ridge"], before["ridge"]))
    set_scalars(net, {"lambda_init": -2.0})  # a log already, and negative
    assert all(abs(r - 2.718281828 ** -2.0) < 1e-6 for r in net.scalars()["ridge"])


def test_paraphrase_invariance_adds_how_paraphrases_move_the_keys_to_c0(tokenizer, tmp_path, monkeypatch):
    """invariance_weight w: C_0 + w·(tr C_0 / tr C_inv)·C_inv, where C_inv is the mean outer product of the
    paraphrase-minus-prompt key at each answer position of training pairs (checked here against a direct reading
    of every pair alone, unpadded)."""
    from rledit.methods.memit.corpus import CorpusError, paraphrase_pairs
    from rledit.tokens import encode

    monkeypatch.setenv("RLEDIT_CACHE", str(tmp_path / "cache"))
    settings = {"corpus_init": 10.0, "corpus": "zsre-train-questions", "stats_samples": 30, "invariance_samples": 12,
                "stats_batch_size": 5}
    plain, invariant = _editor(tokenizer, **settings), _editor(tokenizer, invariance_weight=0.5, **settings)
    pairs = paraphrase_pairs("zsre-train-rephrases", 12)
    assert len(pairs.prompts) == 12 and all(p != q for p, q in zip(pairs.prompts, pairs.paraphrases))
    model, targets = invariant.model, invariant.targets
    captured = {}
    handles = [t.module.register_forward_hook(lambda m, args, out, name=t.name: captured.__setitem__(name, args[0]))
               for t in targets]
    sums, count = {t.name: 0.0 for t in targets}, 0
    with torch.no_grad():
        for prompt, paraphrase, answer in zip(pairs.prompts, pairs.paraphrases, pairs.answers):
            keys = []
            for text in (prompt, paraphrase):
                batch = encode(tokenizer, [text], [answer])
                model(input_ids=batch.input_ids)
                keys.append({name: k[0][batch.answer_mask[0]].double() for name, k in captured.items()})
            count += len(keys[0][targets[0].name])
            for name, total in sums.items():
                shift = keys[1][name] - keys[0][name]
                sums[name] = total + shift.T @ shift
    for handle in handles:
        handle.remove()
    for name, c_0 in plain.method.corpus_moments.items():
        c_inv = sums[name] / count
        expected = c_0 + 0.5 * (c_0.trace() / c_inv.trace()) * c_inv
        assert torch.allclose(invariant.method.corpus_moments[name], expected, rtol=1e-4, atol=1e-6)
    report = invariant.method.setup_report()["invariance"]
    assert (report["n_pairs"], report["n_positions"], report["weight"]) == (12, count, 0.5)
    assert _editor(tokenizer, invariance_weight=0.5, **settings).method.setup_report()["invariance"]["cached"]
    with pytest.raises(ValueError, match="corpus_init"):
        RLEditHparams(invariance_weight=1.0)
    with pytest.raises(ValueError, match="invariance must be one of"):
        RLEditHparams(corpus_init=1.0, invariance_weight=1.0, invariance="sst2")
    with pytest.raises(CorpusError, match="unknown paraphrase source"):
        paraphrase_pairs("sst2", 5)


def test_paraphrase_shifts_at_the_subject_compare_each_pair_at_its_subjects_last_token(tokenizer, tmp_path,
                                                                                        monkeypatch):
    """positions="subjects" (a subject-keyed rule): one row per pair, the key at the subject's last token of the
    paraphrase minus that of the prompt, whatever the padding; cached apart from the answer positions."""
    from rledit.methods.memit.corpus import paraphrase_pairs
    from rledit.methods.memit.stats import compute_paraphrase_shifts, load_or_compute_invariance
    from rledit.tokens import subject_last_token

    monkeypatch.setenv("RLEDIT_CACHE", str(tmp_path / "cache"))
    editor = _editor(tokenizer)
    cached = {where: load_or_compute_invariance(editor.model, tokenizer, editor.targets, "counterfact-train-rephrases",
                                                6, 4, where) for where in ("answers", "subjects")}
    assert cached["answers"].path != cached["subjects"].path and cached["subjects"].n_tokens == 6
    assert cached["answers"].n_tokens > 6
    pairs = paraphrase_pairs("counterfact-train-rephrases", 6)
    moments, count = compute_paraphrase_shifts(editor.model, tokenizer, editor.targets, pairs, batch_size=4,
                                               positions="subjects")
    assert count == 6
    target = editor.targets[0]
    captured = {}
    handle = target.module.register_forward_hook(lambda m, args, out: captured.__setitem__("keys", args[0]))
    total = 0.0
    with torch.no_grad():
        for prompt, paraphrase, subject in zip(pairs.prompts, pairs.paraphrases, pairs.subjects):
            keys = []
            for text in (prompt, paraphrase):
                editor.model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
                keys.append(captured["keys"][0, subject_last_token(tokenizer, text, subject)].double())
            total = total + torch.outer(keys[1] - keys[0], keys[1] - keys[0])
    handle.remove()
    assert torch.allclose(moments[target.name], total / 6, rtol=1e-4, atol=1e-6)


def test_an_override_of_a_scalar_the_checkpoint_holds_is_flagged(tokenizer, tmp_path):
    """lr_init / lambda_init / memory_init / corpus_init only set a new network's initial values: on a checkpoint
    that holds the learned value the override changes nothing, and the editor says so."""
    _editor(tokenizer, memory_init=2.0).save_checkpoint(tmp_path / "ckpt")
    with pytest.warns(UserWarning, match=r"holds its learned \['lr_init'\]"):
        editor = Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, checkpoint=tmp_path / "ckpt",
                                        hparams={"lr_init": 9.0, "passes": 2})
    assert editor.method.hparams.passes == 2 and not torch.allclose(editor.method.hypernet.log_lr.exp(),
                                                                    torch.full((4,), 9.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Editor.from_pretrained(tiny_model("llama"), tokenizer=tokenizer, checkpoint=tmp_path / "ckpt",
                               hparams={"passes": 2, "lr_init": 30.0})  # the held value's own initial value: fine


def test_the_validation_sweep_refuses_a_setting_the_checkpoint_would_ignore(tokenizer, tmp_path, monkeypatch):
    """A sweep of a checkpoint over an ``*_init`` it holds would score the checkpoint's own value under the setting's
    name: benchmarks/validation_sweep.py refuses it before loading any model."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import validation_sweep

    _editor(tokenizer, memory_init=2.0).save_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(validation_sweep, "load_model", lambda name: pytest.fail("loaded a model"))
    monkeypatch.setattr("sys.argv", ["validation_sweep.py", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                                     str(tmp_path / "sweep"), "--setting", '{"passes": 2}',
                                     "--setting", '{"memory_init": 3.0}'])
    with pytest.raises(SystemExit, match=r"holds its learned \['memory_init'\]"):
        validation_sweep.main()
    assert not (tmp_path / "sweep").exists()


def test_memory_paraphrases_widen_each_remembered_key_by_the_paraphrase_shifts(tokenizer, tmp_path, monkeypatch):
    """memory_paraphrases γ: the memory term is β(C_mem + γ·n·C_inv), n the keys remembered; the edit-time
    solve through kept inverses equals the direct one after several steps, and γ 0 is the memory as before."""
    monkeypatch.setenv("RLEDIT_CACHE", str(tmp_path / "cache"))
    settings = {"memory_init": 1.0, "invariance_samples": 12, "stats_batch_size": 5, "passes": 2,
                "refine": "gradient"}
    plain, wide = _editor(tokenizer, **settings), _editor(tokenizer, memory_paraphrases=0.5, **settings)
    assert plain.method.paraphrase_moments == {}
    requests = load_requests("zsre", "train", limit=8)
    names = [t.name for t in wide.targets]
    for i in range(3):
        for editor in (plain, wide):
            editor.apply(requests[2 * i:2 * i + 2])
    method = wide.method
    for name in names:
        c_inv = method.paraphrase_moments[name]
        rows = method.memory.rows(name)
        assert rows == sum(len(keys[name]) for keys in method.memory.steps.values()) > 0
        beta = float(method.hypernet.memory_weight(name).detach())
        expected = beta * (method.memory.gram(name) + 0.5 * rows * c_inv)
        assert torch.allclose(method.penalty(name).detach(), expected, rtol=1e-10)
        assert c_inv.trace() > 0
    a, b = wide.store.factors(max(wide.history)), plain.store.factors(max(plain.history))
    assert not all(torch.allclose(a[n][0] @ a[n][1], b[n][0] @ b[n][1], atol=1e-6) for n in names)  # it acts
    _assert_kept_inverses_give_the_direct_solve(wide, requests[6:])
    assert method.setup_report()["invariance"]["memory_paraphrases"] == 0.5
    with pytest.raises(ValueError, match="memory_init"):
        RLEditHparams(memory_paraphrases=1.0)


def test_rehearsal_pulls_earlier_edits_back_and_follows_apply_revert_save_and_load(tokenizer, tmp_path):
    from test_methods_editor import target_nll

    requests = load_requests("zsre", "train", limit=8)
    old = [{"prompt": r.prompt, "target_new": r.target_new} for r in requests[:4]]
    lost = {}
    for rehearsal in (0, 4):
        editor = _editor(tokenizer, memory_init=1.0, passes=3, refine="gradient", lr_init=3.0, rehearsal=rehearsal)
        first = editor.apply(requests[:4])
        second = editor.apply(requests[4:8])
        lost[rehearsal] = float(target_nll(editor.model, tokenizer, old).sum())
    assert lost[4] < lost[0]  # the second step's later passes pulled the first step's edits back toward their targets

    method = editor.method
    with torch.no_grad():  # (edit time)
        drawn = method.rehearsed()
    assert len(drawn) == 4 and {r.prompt for r in drawn} <= {r.prompt for r in requests}
    assert sorted(method.applied_requests) == [first.id, second.id]
    assert method.applied_requests[first.id] == list(requests[:4])
    editor.save(tmp_path / "edited")
    loaded = Editor.load(tmp_path / "edited", model=tiny_model("llama"), tokenizer=tokenizer)
    assert {k: [(r.prompt, r.target_new, r.subject) for r in v] for k, v in loaded.method.applied_requests.items()} == {
        k: [(r.prompt, r.target_new, r.subject) for r in v] for k, v in method.applied_requests.items()}
    with torch.no_grad():
        assert [r.prompt for r in loaded.method.rehearsed()] == [r.prompt for r in drawn]
    editor.revert(second.id)
    assert sorted(method.applied_requests) == [first.id]
    with pytest.raises(ValueError, match="needs passes > 1"):
        RLEditHparams(rehearsal=4)
    with pytest.raises(ValueError, match="rehearsal must be >= 0"):
        RLEditHparams(rehearsal=-1, passes=2)
