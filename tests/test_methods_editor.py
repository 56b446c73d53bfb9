"""Every baseline editing method behind the same Editor: one step raises the targets' probabilities, revert
restores the model exactly, and bad input fails before any work."""

import pytest
import torch
from tiny import tiny_model
from torch.nn import functional as F

from rledit.deltas import model_hash
from rledit.editor import Editor, EditorError
from rledit.hparams import HPARAMS_DIR, load_section
from rledit.methods import get_method
from rledit.methods.base import UnknownMethodError
from rledit.targets import TargetError
from rledit.tokens import answer_logits, encode
from rledit.types import EditRequest, EditRequestError

# Prompts end with the subject, so that on a tiny random model the residual shift of locate-then-edit methods
# (made at the subject's last token) reaches the answer's first prediction directly.
REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux", "target_new": "English", "subject": "Danielle Darrieux"},
    {"prompt": "The capital city of France", "target_new": "Berlin", "subject": "France"},
]
LOCATE_TARGETS = {"layers": [0, 1], "modules": ["down_proj"]}
OUTPUT_PROJECTIONS = {"llama": "down_proj", "gpt2": "c_proj", "gpt_neox": "dense_4h_to_h"}
# hyper-parameters that suit the tiny model (the shipped YAML files are tuned for SmolLM2)
TINY_HPARAMS = {
    "ft": {"steps": 5, "lr": 1e-2, "max_norm": 0.05},
    "mend": {"lr_init": 1.0},
    "ultraedit": {"lr": 1e-2},
    "memit": {"stats_samples": 200, "v_lr": 0.1, "cov_weight": 10.0},
    "alphaedit": {"stats_samples": 200, "v_lr": 0.1, "ridge": 1e-4, "nullspace_threshold": 0.1},
}
METHODS = sorted(TINY_HPARAMS)


def peaked_tiny_model(kind: str = "llama"):
    """A tiny model with its token embeddings and output layer scaled up, so that its next-token
    distributions are peaked and respond to changes in the residual stream like a trained model's."""
    model = tiny_model(kind)
    with torch.no_grad():
        embeddings, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embeddings.mul_(20.0)
        if output is not embeddings:  # untied (GPT-NeoX)
            output.mul_(20.0)
    return model


def peaked_tiny_llama():
    """The peaked tiny Llama (tied embeddings)."""
    return peaked_tiny_model("llama")


def make_editor(method, tokenizer, **overrides):
    """An editor on a fresh peaked tiny Llama with the tiny hparams of ``method`` (plus ``overrides``)."""
    targets = LOCATE_TARGETS if method in ("memit", "alphaedit") else {}
    return Editor.from_pretrained(peaked_tiny_llama(), method=method, tokenizer=tokenizer,
                                  hparams={**TINY_HPARAMS[method], **overrides}, **targets)


def target_nll(model, tokenizer, requests):
    """Per request, the summed negative log-probability of its target tokens after its prompt."""
    batch = encode(tokenizer, [r["prompt"] for r in requests], [r["target_new"] for r in requests])
    with torch.no_grad():
        logits = answer_logits(model, batch).float()
    token_nll = F.cross_entropy(logits, batch.labels[batch.answer_mask], reduction="none")
    rows = batch.answer_mask.nonzero()[:, 0]
    return torch.zeros(len(requests)).index_add(0, rows, token_nll)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Key statistics go to a fresh cache folder per test."""
    monkeypatch.setenv("RLEDIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("method", METHODS)
def test_one_step_raises_every_target_probability_and_revert_restores(method, tokenizer):
    editor = make_editor(method, tokenizer)
    weights = model_hash(editor.model)
    probe = encode(tokenizer, ["What is the capital of Spain?", "The mother tongue of Danielle Darrieux"])
    with torch.no_grad():
        logits_before = editor.model(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
    before = target_nll(editor.model, tokenizer, REQUESTS)

    step = editor.apply(REQUESTS)
    after = target_nll(editor.model, tokenizer, REQUESTS)
    assert (after < before - 1e-3).all(), f"{method}: target NLL {before.tolist()} -> {after.tolist()}"
    assert step.n_edits == 2 and set(step.ranks) == {t.name for t in editor.targets}

    editor.revert(step)
    with torch.no_grad():
        logits_after = editor.model(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
    assert torch.equal(logits_before, logits_after)
    assert torch.equal(target_nll(editor.model, tokenizer, REQUESTS), before)
    assert model_hash(editor.model) == weights  # the weights were never written
    assert not any(p.grad is not None for p in editor.model.parameters())


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_edits_other_architectures(method, kind, tokenizer):
    model = peaked_tiny_model(kind)
    targets = {"layers": [0, 1], "modules": [OUTPUT_PROJECTIONS[kind]]} if method in ("memit", "alphaedit") else {}
    editor = Editor.from_pretrained(model, method=method, tokenizer=tokenizer, hparams=TINY_HPARAMS[method],
                                    **targets)
    before = target_nll(model, tokenizer, REQUESTS)
    editor.revert(editor.apply(REQUESTS))
    assert torch.equal(target_nll(model, tokenizer, REQUESTS), before)
    editor.apply(REQUESTS)
    assert (target_nll(model, tokenizer, REQUESTS) < before - 1e-3).all()


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_locate_then_edit_needs_a_subject_and_fails_before_any_work(method, tokenizer):
    editor = make_editor(method, tokenizer)
    state = {k: v.clone() for k, v in editor.method.state_dict().items()}
    no_subject = [REQUESTS[0], {"prompt": "The capital city of France", "target_new": "Berlin"}]
    with pytest.raises(EditRequestError, match="needs the subject of every edit.*edit 1"):
        editor.apply(no_subject)
    wrong_subject = [{**REQUESTS[0], "subject": "Paris"}]
    with pytest.raises(EditRequestError, match="does not occur in its prompt"):
        editor.apply(wrong_subject)
    assert editor.method.last_trace == {}  # the target values were never optimised
    with pytest.raises(EditRequestError, match="edit 1"):  # a whole run can be checked before any set-up
        get_method(method).check_requests([EditRequest.from_dict(r) for r in no_subject])
    assert editor.store.steps == []
    assert all(torch.equal(v, state[k]) for k, v in editor.method.state_dict().items())


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_locate_then_edit_rejects_modules_it_cannot_edit(method, tokenizer):
    with pytest.raises(TargetError, match="down_proj"):
        Editor.from_pretrained(peaked_tiny_llama(), method=method, tokenizer=tokenizer,
                               hparams=TINY_HPARAMS[method])  # the default targets: gate_proj, up_proj
    with pytest.raises(TargetError, match="last layer"):
        Editor.from_pretrained(peaked_tiny_llama(), method=method, tokenizer=tokenizer,
                               hparams=TINY_HPARAMS[method], layers=[2, 3], modules=["down_proj"])


def test_unknown_method_and_bad_hparams_are_clear_errors(tokenizer):
    with pytest.raises(UnknownMethodError, match="registered methods: .*alphaedit.*ft.*memit.*mend.*ultraedit"):
        Editor.from_pretrained(peaked_tiny_llama(), method="rome", tokenizer=tokenizer)
    with pytest.raises(EditorError, match="unknown key stepz \\(did you mean steps\\?\\)"):
        Editor.from_pretrained(peaked_tiny_llama(), method="ft", tokenizer=tokenizer, hparams={"stepz": 3})
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Editor.from_pretrained(peaked_tiny_llama(), method="ft", tokenizer=tokenizer, hparams={"steps": 0})


@pytest.mark.parametrize("method", METHODS)
def test_shipped_yaml_holds_the_method_defaults(method):
    loaded = load_section(HPARAMS_DIR / "methods" / f"{method}.yaml", "method")
    assert loaded == get_method(method).hparams_class()  # Editor.from_pretrained(method=...) uses these too
