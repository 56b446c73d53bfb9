"""MEMIT and AlphaEdit: corpus key statistics (values, cache), corpora, and the two solves checked against
their optimality conditions and the null-space property."""

import contextlib
import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from test_methods_editor import (
    OUTPUT_PROJECTIONS,
    REQUESTS,
    TINY_HPARAMS,
    make_editor,
    peaked_tiny_llama,
    peaked_tiny_model,
)
from tiny import tiny_model, tiny_tokenizer

from rledit.editor import Editor
from rledit.hooks import per_row_target_nll
from rledit.methods.alphaedit import AlphaEditHparams, AlphaEditMethod, nullspace_projection
from rledit.methods.base import UpdateError
from rledit.methods.memit import (
    CorpusError,
    MEMITHparams,
    MEMITMethod,
    compute,
    load_corpus,
    load_or_compute_statistics,
)
from rledit.methods.memit.contexts import context_prefixes, sample_text
from rledit.methods.memit.stats import KeyStatistics, corpus_texts
from rledit.targets import find_blocks, resolve_targets
from rledit.tokens import answer_logits
from rledit.types import EditRequest

TEXTS = ["the film is a charming comedy", "dull", "a long , slow and ultimately empty movie about nothing much"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLEDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text("\n".join(TEXTS[:2]) + "\n\n" + TEXTS[2] + "\n")
    return path


# -------------------------------------------------------------------------------------------------- corpora
def test_corpus_files_and_the_bundled_corpus(tmp_path, corpus_file):
    assert load_corpus(str(corpus_file), limit=10).texts == TEXTS  # the blank line is skipped
    assert load_corpus(str(corpus_file), limit=2).texts == TEXTS[:2]
    jsonl = tmp_path / "reviews.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.write("\n".join(json.dumps({"review": t}) for t in TEXTS))
    assert load_corpus(str(jsonl), limit=10, column="review").texts == TEXTS
    with pytest.raises(CorpusError, match="line 1: not a JSON object with a 'text' field"):
        load_corpus(str(jsonl), limit=10)
    bundled = load_corpus("sst2", limit=3)
    assert bundled.texts[0] == "hide new secretions from the parental units"
    assert len(bundled.texts) == 3 and bundled.identifier.startswith("sst2_sentences-")
    changed = tmp_path / "other.txt"
    changed.write_text("\n".join(reversed(TEXTS)))
    assert load_corpus(str(changed), 10).identifier != load_corpus(str(corpus_file), 10).identifier
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(CorpusError, match="holds no text"):
        load_corpus(str(tmp_path / "empty.txt"), limit=5)
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match="unknown corpus file type"):
        load_corpus(str(tmp_path / "notes.csv"), limit=5)


def test_training_split_corpora_leave_the_validation_half_out():
    from rledit.data import load_requests
    from rledit.eval.relations import in_half

    facts = load_corpus("counterfact-train-facts", limit=100_000)
    assert facts.identifier.startswith("counterfact_train_facts2-")
    records = load_requests("counterfact", split="train")
    held = {p for r in records if in_half(r, "metric") for p in (r.prompt, *(i.prompt for i in r.locality))}
    kept = {f"{r.prompt} {r.ground_truth}" for r in records if in_half(r, "train") and r.prompt not in held}
    assert kept <= set(facts.texts) and len(facts.texts) > len(kept)  # with the neighbourhood facts
    held_facts = {f"{i.prompt} {i.answer}" for r in records if in_half(r, "metric") for i in r.locality}
    assert not held_facts & set(facts.texts)
    questions = load_corpus("zsre-train-questions", limit=3)
    assert len(questions.texts) == 3 and all("?" in t for t in questions.texts)
    zsre = load_requests("zsre", split="train")
    zsre_facts = load_corpus("zsre-train-facts", limit=100_000)
    assert set(zsre_facts.texts) == {f"{r.prompt} {r.ground_truth}" for r in zsre if in_half(r, "train")}
    assert not {f"{r.prompt} {r.ground_truth}" for r in zsre if in_half(r, "metric")} & set(zsre_facts.texts)


# ---------------------------------------------------------------------------------------------- statistics
def test_second_moments_match_a_text_by_text_reference(tokenizer, corpus_file):
    model = tiny_model("llama")
    targets = resolve_targets(model, [0, 2], ["down_proj"])
    stats = load_or_compute_statistics(model, tokenizer, targets, str(corpus_file), samples=10, max_length=6,
                                       batch_size=2)  # padded batches, and texts cut to 6 tokens
    seen = {}
    handles = [t.module.register_forward_hook(lambda m, args, out, name=t.name: seen.setdefault(name, []).append(
        args[0][0].double())) for t in targets]
    with torch.no_grad():
        for text in TEXTS:  # one text at a time: no padding at all
            ids = tokenizer(text)["input_ids"][:6]
            model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    n_tokens = sum(min(6, len(tokenizer(t)["input_ids"])) for t in TEXTS)
    assert stats.n_tokens == n_tokens and stats.n_texts == 3 and not stats.cached
    for target in targets:
        keys = torch.cat(seen[target.name])
        assert torch.allclose(stats.second_moments[target.name], keys.T @ keys / n_tokens, rtol=1e-5, atol=1e-9)


def test_answer_position_statistics_count_the_keys_an_edit_would_read(tokenizer):
    from rledit.hooks import capture_features
    from rledit.tokens import encode

    model = tiny_model("llama")
    targets = resolve_targets(model, [1, 2], ["gate_proj"])
    corpus = "zsre-train-questions+zsre-train-facts"
    stats = load_or_compute_statistics(model, tokenizer, targets, corpus, 6, 128, 4, positions="answers")
    texts = corpus_texts(model, tokenizer, corpus, 6, 128)
    pairs = [(t[:a], t[a:].strip()) for t, a in zip(texts.texts, texts.answer_starts)]
    assert len(pairs) == 6 and all(answer for _, answer in pairs) and "_answers_" in stats.path.name
    features = capture_features(model, targets, encode(tokenizer, [p for p, _ in pairs], [a for _, a in pairs]))
    assert stats.n_tokens == features.n_tokens
    for target in targets:
        keys = features.keys[target.name].double()
        assert torch.allclose(stats.second_moments[target.name], keys.T @ keys / features.n_tokens, rtol=1e-4,
                              atol=1e-8)
    everything = load_or_compute_statistics(model, tokenizer, targets, corpus, 6, 128, 4)
    assert everything.n_tokens > stats.n_tokens and everything.path != stats.path
    with pytest.raises(ValueError, match="need a question-answer corpus"):
        load_or_compute_statistics(model, tokenizer, targets, "sst2", 6, 128, 4, positions="answers")


def test_subject_position_statistics_count_each_subjects_last_token_key(tokenizer):
    from rledit.tokens import subject_last_token

    model = tiny_model("llama")
    targets = resolve_targets(model, [1], ["down_proj"])
    corpus = "counterfact-train-subjects+zsre-train-subjects"
    stats = load_or_compute_statistics(model, tokenizer, targets, corpus, 6, 128, 4, positions="subjects")
    texts = corpus_texts(model, tokenizer, corpus, 6, 128)
    assert len(texts.texts) == 6 and stats.n_tokens == 6 and "_subjects_" in stats.path.name
    seen = []
    handle = targets[0].module.register_forward_hook(lambda m, args, out: seen.append(args[0][0].double()))
    with torch.no_grad():  # one text at a time, the key read where the tokenizer's offsets put the subject's end
        for text, end in zip(texts.texts, texts.subject_ends):
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
            word = text[:end].split()[-1]  # the subject's last word ends where the subject does
            seen[-1] = seen[-1][subject_last_token(tokenizer, text, word, end - len(word))][None]
    handle.remove()
    keys = torch.cat(seen)
    assert torch.allclose(stats.second_moments[targets[0].name], keys.T @ keys / 6, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="need a corpus that knows its subjects"):
        load_or_compute_statistics(model, tokenizer, targets, "counterfact-train-facts", 6, 128, 4,
                                   positions="subjects")


def test_a_token_budget_counts_exactly_that_many_tokens(tokenizer, corpus_file):
    model = tiny_model("llama")
    targets = resolve_targets(model, [1], ["down_proj"])
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    budget = lengths[0] + 2  # the whole first text and two tokens of the second
    stats = load_or_compute_statistics(model, tokenizer, targets, str(corpus_file), 10, 32, 2, max_tokens=budget)
    assert stats.n_tokens == budget and f"_t{budget}_" in stats.path.name
    seen = []
    handle = targets[0].module.register_forward_hook(lambda m, args, out: seen.append(args[0][0].double()))
    with torch.no_grad():
        for text, cut in ((TEXTS[0], lengths[0]), (TEXTS[1], 2)):
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"][:cut]]))
    handle.remove()
    keys = torch.cat(seen)
    assert torch.allclose(stats.second_moments[targets[0].name], keys.T @ keys / budget, rtol=1e-5, atol=1e-9)
    everything = load_or_compute_statistics(model, tokenizer, targets, str(corpus_file), 10, 32, 2)
    assert everything.n_tokens == sum(min(32, n) for n in lengths) and everything.path != stats.path


def test_mixed_corpora_and_the_models_own_samples(tokenizer, corpus_file):
    from rledit.methods.memit.samples import model_samples
    from rledit.methods.memit.stats import corpus_texts

    model = tiny_model("llama")
    mixed = corpus_texts(model, tokenizer, f"{corpus_file}+sst2", 5, 16)
    bundled = load_corpus("sst2", 5).texts
    assert mixed.texts == [TEXTS[0], bundled[0], TEXTS[1], bundled[1], TEXTS[2]]
    assert mixed.identifier.startswith("reviews-") and "+sst2_sentences-" in mixed.identifier
    samples = model_samples(model, tokenizer, 3, 8)
    assert len(samples.texts) == 3 and all(samples.texts)
    assert model_samples(model, tokenizer, 3, 8).texts == samples.texts  # cached
    assert (Path(os.environ["RLEDIT_CACHE"]) / "samples").is_dir()
    with_samples = corpus_texts(model, tokenizer, "model-samples+sst2", 3, 8)
    assert with_samples.texts[0] == samples.texts[0] and with_samples.texts[1] == bundled[0]


def test_statistics_are_cached_per_model_layers_and_corpus(tokenizer, corpus_file, tmp_path):
    model = tiny_model("llama")
    targets = resolve_targets(model, [0, 1], ["down_proj"])
    first = load_or_compute_statistics(model, tokenizer, targets, str(corpus_file), 10, 16, 4)
    again = load_or_compute_statistics(model, tokenizer, targets, str(corpus_file), 10, 16, 4)
    assert not first.cached and again.cached and again.path == first.path
    assert again.compute_seconds == pytest.approx(first.compute_seconds)  # the setup time survives the cache
    assert all(torch.equal(again.second_moments[n], first.second_moments[n].float().double())
               for n in first.second_moments)
    assert first.path.parent == tmp_path / "cache" / "stats"
    assert first.path.name.startswith("llama_L0-1.down_proj_reviews_n10_")
    other_layers = load_or_compute_statistics(model, tokenizer, resolve_targets(model, [1, 2], ["down_proj"]),
                                              str(corpus_file), 10, 16, 4)
    other_model = load_or_compute_statistics(tiny_model("llama", seed=1), tokenizer, targets, str(corpus_file),
                                             10, 16, 4)
    assert len({first.path, other_layers.path, other_model.path}) == 3
    assert not other_layers.cached and not other_model.cached


def test_editor_setup_reports_the_statistics_time(tokenizer):
    editor = make_editor("memit", tokenizer)
    stats = editor.method.statistics
    assert not stats.cached and stats.compute_seconds > 0
    assert editor.method.setup_seconds >= stats.compute_seconds
    again = make_editor("memit", tokenizer)
    assert again.method.statistics.cached and again.method.statistics.path == stats.path
    report = again.method.setup_report()["statistics"]  # what results files record
    assert report["cached"] and report["file"] == str(stats.path)
    assert report["compute_seconds"] == round(stats.compute_seconds, 3) and report["n_texts"] == stats.n_texts


# ------------------------------------------------------------------------------------------------ the solves
def synthetic_statistics(d_in, name, seed=0):
    """A key second moment with known eigenvalues (two large, three tiny) and its eigenvectors."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64))
    eigenvalues = torch.tensor([4.0, 2.0, 1e-3, 5e-4, 1e-4], dtype=torch.float64)
    second_moment = basis @ torch.diag(eigenvalues) @ basis.T
    return KeyStatistics({name: second_moment}, 1, 1, 0.0, None, False), basis, eigenvalues


def test_memit_solve_satisfies_its_normal_equations():
    name = "layer.down_proj"
    method = MEMITMethod(MEMITHparams(cov_weight=3.0))
    method.statistics, _, _ = synthetic_statistics(5, name)
    generator = torch.Generator().manual_seed(1)
    keys, residuals = torch.randn(3, 5, generator=generator), torch.randn(3, 4, generator=generator)
    u, v = method.solve(name, keys, residuals)
    delta, k, r = (u @ v).double(), keys.double(), residuals.double()
    # ΔW minimises λ tr(ΔWᵀ C ΔW) + ||K ΔW - R||²: its gradient λ C ΔW + Kᵀ (K ΔW - R) vanishes
    gradient = 3.0 * method.statistics.second_moments[name] @ delta + k.T @ (k @ delta - r)
    assert gradient.abs().max() < 1e-5


def test_nullspace_projection_keeps_the_small_eigen_directions():
    stats, basis, _ = synthetic_statistics(5, "m")
    projection, dim = nullspace_projection(stats.second_moments["m"], threshold=1e-2)
    assert dim == 3
    assert torch.allclose(projection, basis[:, 2:] @ basis[:, 2:].T, atol=1e-10)
    assert torch.allclose(projection @ projection, projection, atol=1e-10)


def test_alphaedit_update_lies_in_the_null_space_and_solves_the_projected_problem():
    name = "layer.down_proj"
    method = AlphaEditMethod(AlphaEditHparams(nullspace_rule="absolute", nullspace_threshold=1e-2, ridge=0.5))
    method.statistics, basis, eigenvalues = synthetic_statistics(5, name)
    method.after_statistics([type("Target", (), {"name": name})()])
    generator = torch.Generator().manual_seed(2)
    earlier = torch.randn(2, 5, generator=generator)
    method.after_step({name: earlier})
    method.step_applied(0)  # the cache now holds K_pᵀK_p of an earlier, applied step
    keys, residuals = torch.randn(3, 5, generator=generator), torch.randn(3, 4, generator=generator)
    u, v = method.solve(name, keys, residuals)
    delta, k, r, kp = (u @ v).double(), keys.double(), residuals.double(), earlier.double()
    assert (basis[:, :2].T @ delta).abs().max() < 1e-6  # the preserved (large-eigenvalue) keys see no change
    second_moment = method.statistics.second_moments[name]
    assert torch.trace(delta.T @ second_moment @ delta) <= 1e-2 * (delta ** 2).sum()
    projection = method.projections[name]  # stationary for min over ΔW = PΔW of the AlphaEdit objective
    gradient = projection @ (k.T @ (k @ delta - r) + kp.T @ kp @ delta) + 0.5 * delta
    assert gradient.abs().max() < 1e-5
    assert torch.allclose(method.edited_keys.gram(name), kp.T @ kp)
    assert torch.equal(method.state_dict()["key_memory/0/" + name], earlier)
    assert eigenvalues[2] < 1e-2 <= eigenvalues[1]


def test_alphaedit_caches_edited_keys_across_steps_and_saves_them(tokenizer, tmp_path):
    editor = make_editor("alphaedit", tokenizer)
    names = [t.name for t in editor.targets]
    assert all(0 < editor.method.nullspace_dims[n] < 64 for n in names)
    assert editor.method.setup_report()["nullspace_dims"] == editor.method.nullspace_dims
    memory = editor.method.edited_keys
    first = editor.apply(REQUESTS)
    assert [int(torch.linalg.matrix_rank(memory.gram(n))) for n in names] == [2, 2]
    after_first = {n: memory.gram(n).clone() for n in names}
    second = editor.apply([{**REQUESTS[0], "target_new": "German"}])  # same subject: same key at the first layer
    assert int(torch.linalg.matrix_rank(memory.gram(names[0]), rtol=1e-6)) == 2
    state = editor.method.state_dict()
    editor.save(tmp_path / "edited")
    loaded = Editor.load(tmp_path / "edited", model=peaked_tiny_llama(), tokenizer=tokenizer)
    assert loaded.method.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.method.state_dict().items())
    loaded.revert(second.id)  # a reverted step's keys leave the cache, exactly
    assert all(torch.equal(loaded.method.edited_keys.gram(n), after_first[n]) for n in names)
    editor.revert(first.id)
    editor.revert(second.id)
    assert all(not memory.gram(n).any() for n in names) and len(memory) == 0
    with pytest.raises(UpdateError, match="does not fit the edited modules"):
        loaded.method.load_state_dict({"edited_keys_gram/" + names[0]: torch.zeros(64, 64)})


def test_alphaedit_refuses_an_empty_null_space(tokenizer):
    with pytest.raises(UpdateError, match="no eigen-direction .* is within nullspace_threshold=1e-12"):
        make_editor("alphaedit", tokenizer, nullspace_threshold=1e-12)
    assert TINY_HPARAMS["alphaedit"]["nullspace_threshold"] > 1e-12


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_target_values_replay_the_blocks_below_exactly(tokenizer, kind, monkeypatch):
    """The δ optimisation computes only the blocks above the shifted one, with the same result as full passes."""
    model = peaked_tiny_model(kind)
    editor = Editor.from_pretrained(model, method="memit", tokenizer=tokenizer, hparams=TINY_HPARAMS["memit"],
                                    layers=[1, 2], modules=[OUTPUT_PROJECTIONS[kind]])
    requests = [EditRequest.from_dict(r) for r in REQUESTS]
    lowest = find_blocks(model)[0][1]
    calls = []
    lowest.mlp.register_forward_hook(lambda *args: calls.append(1))  # not reached when the block replays
    replayed = editor.method.compute_step(model, tokenizer, editor.targets, requests)
    trace = editor.method.last_trace["nll"]
    replay_calls = len(calls)
    monkeypatch.setattr(compute, "replayed_blocks", lambda blocks, outputs: contextlib.nullcontext())
    calls.clear()
    full = editor.method.compute_step(model, tokenizer, editor.targets, requests)
    assert len(trace) > 2 and editor.method.last_trace["nll"] == pytest.approx(trace, rel=1e-5)
    assert replay_calls < len(calls)  # the lowest block ran only in the recording passes
    for name, (u, v) in full.items():
        assert torch.allclose(replayed[name][0], u, atol=1e-5) and torch.allclose(replayed[name][1], v, atol=1e-5)
    assert "forward" not in lowest.__dict__  # the block computes again afterwards


def test_each_edit_stops_on_its_own_as_if_optimised_alone(tokenizer):
    """A request whose loss is below early_stop_loss keeps its δ and leaves the batch; the others go on exactly as
    each would alone (the published per-request loop), with its rows no longer computed. (At δ = 0 the loss is the
    target cross-entropy: the KL and the decay are 0.)"""
    model = peaked_tiny_llama()
    blocks = [module for layer, (_, module) in find_blocks(model).items() if layer <= 2]
    requests = [EditRequest.from_dict(r) for r in REQUESTS]
    prefixes = ["", "a b c"]

    def optimise(rs, stop):
        hp = MEMITHparams(**{**TINY_HPARAMS["memit"], "early_stop_loss": stop})
        batch, subject, owner = compute.edit_rows(tokenizer, rs, prefixes, None)
        kl_batch, kl_subject = compute.essence_rows(tokenizer, rs, hp.kl_prompt)
        return compute.optimise_target_values(model, blocks, batch, subject, kl_batch, kl_subject, hp, owner)

    batch, _, owner = compute.edit_rows(tokenizer, requests, prefixes, None)
    with torch.no_grad():
        start = compute.mean_per_edit(per_row_target_nll(answer_logits(model, batch), batch), owner)
    easy, hard = int(start.argmin()), int(start.argmax())
    stop = float(start.mean())  # the easier edit starts below it, the harder one above
    values, trace = optimise(requests, stop)
    alone, alone_trace = optimise([requests[hard]], stop)
    untouched, _ = optimise(requests, 0.0)  # nobody stops: every δ moves
    assert trace["steps"][easy] == 0 and trace["steps"][hard] == alone_trace["steps"][0] > 0
    assert torch.allclose(values[hard], alone[0], atol=1e-5)
    assert not torch.allclose(values[easy], untouched[easy], atol=1e-3)  # it would have moved
    h, _ = optimise(requests, float("inf"))  # everyone stops at once: z = h
    assert torch.equal(values[easy], h[easy])


# ------------------------------------------------------------------------------------------- context prefixes
def test_context_prefixes_are_sampled_once_per_model_and_setting_and_cached(tokenizer):
    model = tiny_model("llama")
    prefixes = context_prefixes(model, tokenizer, [[4, 3], [2, 2]], seed=0, top_k=5)
    assert len(prefixes) == 6 and prefixes[0] == ""
    assert all(p.endswith(". ") and "{" not in p for p in prefixes[1:])
    starts = ["The", "Therefore", "Because", "The", "Therefore"]  # the starts in turn, per [tokens, count]
    assert all(p.startswith(start) for p, start in zip(prefixes[1:], starts))
    cached = sorted((Path(os.environ["RLEDIT_CACHE"]) / "contexts").glob("prefixes_*.json"))
    assert len(cached) == 1
    assert context_prefixes(model, tokenizer, [[4, 3], [2, 2]], seed=0, top_k=5) == prefixes  # read back
    assert context_prefixes(model, tokenizer, [[4, 3], [2, 2]], seed=1, top_k=5) != prefixes
    assert context_prefixes(model, tokenizer, [], seed=0, top_k=5) == [""]
    assert len(sorted(cached[0].parent.glob("prefixes_*.json"))) == 2


@pytest.mark.parametrize("bos", [False, True], ids=["no-framing", "bos"])
def test_prefixes_are_sampled_as_a_new_document(bos):
    """A tokenizer that frames text with nothing gets the end-of-text token first, as between pre-training
    documents; one that adds a BOS keeps its own framing and nothing more."""
    tokenizer = tiny_tokenizer(bos=bos)
    model, seen = tiny_model("llama"), []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
                                    with_kwargs=True)
    sample_text(model, tokenizer, "The", 3, top_k=5, generator=torch.Generator().manual_seed(0))
    start = tokenizer("The", add_special_tokens=False)["input_ids"]
    first = [tokenizer.bos_token_id] if bos else [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert seen[0] == first + start


def test_edit_rows_read_the_subject_after_every_prefix(tokenizer):
    requests = [EditRequest.from_dict(r) for r in REQUESTS]
    prefixes = ["", "France is far. ", "Danielle Darrieux said so. "]  # the subject inside a prefix is skipped
    batch, (rows, positions), owner = compute.edit_rows(tokenizer, requests, prefixes, None)
    assert owner.tolist() == [0, 0, 0, 1, 1, 1]
    assert compute.first_row_of_each(owner).tolist() == [0, 3]
    for row, position, (request, prefix) in zip(rows, positions, [(r, p) for r in requests for p in prefixes]):
        before = tokenizer.decode(batch.input_ids[row, batch.attention_mask[row].argmax():position + 1])
        assert before.replace(" ", "").endswith((prefix + request.prompt).replace(" ", "")[
            :(prefix + request.prompt).index(request.subject, len(prefix)) + len(request.subject)].replace(" ", ""))
    means = compute.mean_per_edit(torch.arange(12.0).reshape(6, 2), owner)
    assert means.tolist() == [[2.0, 3.0], [8.0, 9.0]]


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_keys_are_averaged_over_the_context_prefixes(tokenizer, method):
    editor = make_editor(method, tokenizer, context_lengths=[[3, 2]])
    prefixes = editor.method.prefixes
    assert len(prefixes) == 3 and editor.method.setup_report()["context_prefixes"] == prefixes
    requests = [EditRequest.from_dict(r) for r in REQUESTS]
    seen = {}
    editor.method.after_step = lambda keys: seen.update(keys)
    editor.method.compute_step(editor.model, tokenizer, editor.targets, requests)
    lowest = min(editor.targets, key=lambda t: t.layer)  # nothing pending below it: keys on the unedited model
    batch, subject, owner = compute.edit_rows(tokenizer, requests, prefixes, None)
    assert owner.tolist() == [0, 0, 0, 1, 1, 1]
    block = find_blocks(editor.model)[max(t.layer for t in editor.targets)][1]
    row_keys, _ = compute.keys_and_outputs(editor.model, batch, subject, lowest.module, block)
    expected = torch.stack([row_keys[0:3].mean(0), row_keys[3:6].mean(0)])
    assert torch.allclose(seen[lowest.name], expected, atol=1e-6)
    bare = make_editor(method, tokenizer, context_lengths=[])
    assert bare.method.prefixes == [""]


def test_nullspace_rules_energy_share_largest_eigenvalue_and_absolute():
    stats, basis, _ = synthetic_statistics(5, "m")  # eigenvalues 4, 2, 1e-3, 5e-4, 1e-4 (trace 6.0016)
    moment = stats.second_moments["m"]
    assert nullspace_projection(moment, 1e-3, rule="largest")[1] == 3  # below 4e-3
    projection, dim = nullspace_projection(moment, 2e-4, rule="largest")  # below 8e-4
    assert dim == 2 and torch.allclose(projection, basis[:, 3:] @ basis[:, 3:].T, atol=1e-10)
    assert nullspace_projection(moment, 1.6e-3 / 6.0016 + 1e-9, rule="energy")[1] == 3  # 1e-4 + 5e-4 + 1e-3
    assert nullspace_projection(moment, 1.5e-3 / 6.0016, rule="energy")[1] == 2
    method = AlphaEditMethod(AlphaEditHparams(nullspace_rule="absolute", nullspace_threshold=6e-4))
    method.statistics = stats
    method.after_statistics([type("Target", (), {"name": "m"})()])
    assert method.nullspace_dims == {"m": 2}
    with pytest.raises(ValueError, match="must be < 1 with nullspace_rule 'energy'"):
        AlphaEditHparams(nullspace_threshold=2.0)


def test_the_key_statistics_study_follows_the_null_space_across_token_budgets(tokenizer, tmp_path):
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import key_statistics_study

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "study"
    assert key_statistics_study.main(["--model", str(folder), "--layers", "1", "2", "--corpus", "sst2",
                                      "--tokens", "400", "100", "--samples", "100", "--out", str(out)]) == 0
    rows = json.loads((out / "study.json").read_text())["rows"]
    assert [(r["tokens"], r["module"].split(".")[2]) for r in rows] == [(100, "1"), (100, "2"), (400, "1"), (400, "2")]
    assert all(0 < r["nullspace_energy_0.05"] < 64 for r in rows)
    assert "nullspace_kept" not in rows[0] and 0 <= rows[2]["nullspace_kept"] <= 1 + 1e-9
    assert rows[2]["change_from_previous"] > 0
    key_statistics_study.main(["--model", str(folder), "--layers", "1", "--corpus", "sst2", "--tokens", "100", "10000000",
                               "--samples", "100", "--out", str(out)])  # more than 100 texts hold
    rows = json.loads((out / "study.json").read_text())["rows"]
    assert rows[1]["tokens_asked"] == 10_000_000 and rows[1]["tokens"] < 10_000_000 and rows[1]["texts"] == 100
    assert f"10000000 tokens asked: the corpus holds {rows[1]['tokens']} (100 texts)" in (out / "study.md").read_text()
