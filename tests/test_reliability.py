"""Nothing lost, nothing silently wrong: saves never touch foreign files, failed loads leave the model as it
was, damaged or mismatched files are refused by name.

What is covered, one regression test per defect class of the reliability review (the kill-at-every-rename and
random-kill tests of atomic saves are in test_files.py):

 1. saves replacing folders that are not ours: test_no_save_replaces_a_folder_that_merely_holds_a_file_with_our_name
 2. non-atomic replacement, debris of killed saves: test_an_editor_save_killed_after_its_swap_..., test_files.py
 3. failed loads leaving hooks, stacked stores: test_a_failed_load_leaves_..., test_one_model_carries_one_store_...
 4. no integrity check of method state / checkpoints: test_flipped_bits_..., test_every_shipped_editor_carries_...
 5. saves loading into other weights of the same shape: test_a_save_refuses_a_model_with_other_weights_...
 6. unbounded apply memory: test_apply_builds_no_autograd_graph_..., test_a_step_too_large_for_the_memory_limit_...
 7. resume of another run, duplicated log lines, failed starts: test_train_resume_checks_that_it_continues_...
 8. tracebacks instead of errors: test_damaged_inputs_give_one_line_errors_not_tracebacks, test_train_resume_...
 9. dict hparams skipping validation: test_hparams_given_as_a_dict_get_the_validation_a_yaml_file_gets
10. checkpoint mismatches misreported: test_checkpoint_mismatches_name_the_checkpoint_and_explicit_layers_...
11. ambiguous step handles: test_step_handles_are_exact_and_belong_to_their_editor
12. special tokens and invisible targets: test_special_token_strings_in_user_text_stay_text_and_invisible_...
13. YAML alias bomb: test_damaged_inputs_give_one_line_errors_not_tracebacks
14. misuse (apply in unedited(), contradictory edits): test_apply_inside_the_unedited_view_is_refused_and_...
"""

import copy
import json
import multiprocessing
import os

import pytest
import torch
from tiny import tiny_model

from rledit.checkpoints import CheckpointError, read_checkpoint, shipped_checkpoints
from rledit.deltas import DeltaError, DeltaStore
from rledit.editor import Editor, EditorError
from rledit.files import SAVE_MARKER, ForeignFolderError
from rledit.tokens import answer_logits, encode

EDITS = [{"prompt": "The capital of France is", "target_new": "Rome"},
         {"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "German"}]


def _model():
    torch.manual_seed(0)
    return tiny_model("llama")


def _editor(tokenizer, model=None, **kwargs):
    return Editor.from_pretrained(model if model is not None else _model(), tokenizer=tokenizer, layers=[2, 3],
                                  **kwargs)


def _untouched(model):
    return all(not m._forward_hooks for m in model.modules())


def _logits(model, tokenizer):
    with torch.no_grad():
        return answer_logits(model, encode(tokenizer, ["The capital of France is"], ["Rome"]))


def _project_folder(tmp_path, own_file):
    """A user's folder that happens to hold a file with one of our names, beside their own files."""
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / own_file).write_text('{"format": "rledit-editor", "version": 2}')
    (folder / "notes.md").write_text("my notes")
    (folder / "src" / "main.py").write_text("print('hi')")
    return folder


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("own_file", ["editor.json", "deltas.json", "adapter_config.json"])
def test_no_save_replaces_a_folder_that_merely_holds_a_file_with_our_name(tokenizer, tmp_path, own_file):
    editor = _editor(tokenizer)
    editor.apply(EDITS)
    folder = _project_folder(tmp_path, own_file)
    before = _files(folder)
    for save in (editor.save, editor.store.save, editor.store.export_peft):
        with pytest.raises(ForeignFolderError, match="not an earlier rledit save"):
            save(folder)
        assert _files(folder) == before and (folder / "notes.md").read_text() == "my notes"
    editor.save(tmp_path / "saved")
    (tmp_path / "saved" / "my-results.csv").write_text("a,b")  # a user's file beside our save
    with pytest.raises(ForeignFolderError, match="my-results.csv"):
        editor.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "my-results.csv").read_text() == "a,b"
    with pytest.raises(ForeignFolderError, match="'editor' save, not a 'peft-adapter'"):
        editor.store.export_peft(tmp_path / "saved")


def _save_and_die_after_the_swap(editor, path):
    from rledit import files

    real = files._exchange

    def swap_then_die(a, b):
        real(a, b)
        os._exit(9)

    files._exchange = swap_then_die
    editor.save(path)
    os._exit(0)


def test_an_editor_save_killed_after_its_swap_leaves_the_new_save_loadable(tokenizer, tmp_path):
    editor = _editor(tokenizer)
    editor.apply(EDITS[0])
    editor.save(tmp_path / "saved")
    editor.apply(EDITS[1])
    child = multiprocessing.get_context("fork").Process(target=_save_and_die_after_the_swap,
                                                        args=(editor, tmp_path / "saved"))
    child.start()
    child.join()
    assert child.exitcode == 9
    editor.store.detach()
    loaded = Editor.load(tmp_path / "saved", model=_model(), tokenizer=tokenizer)
    assert len(loaded.steps) == 2
    assert len(list(tmp_path.iterdir())) == 2  # the hidden old copy is still there ...
    loaded.save(tmp_path / "saved")
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # ... until the next save tidies it


def test_a_failed_load_leaves_the_given_model_exactly_as_it_was(tokenizer, tmp_path):
    editor = _editor(tokenizer)
    editor.apply(EDITS)
    editor.save(tmp_path / "saved")
    tensors = tmp_path / "saved" / "deltas" / "deltas.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the deltas: detected after the store was attached
    tensors.write_bytes(bytes(data))
    model = _model()
    reference = _logits(model, tokenizer)
    with pytest.raises(EditorError, match="does not match its recorded sha256"):
        Editor.load(tmp_path / "saved", model=model, tokenizer=tokenizer)
    assert _untouched(model) and torch.equal(_logits(model, tokenizer), reference)

    description = tmp_path / "saved" / "editor.json"
    for damage in ('{"format": "rledit-editor", "version": 2, "model": 3}', "[" * 50000 + "]" * 50000,
                   json.dumps({**json.loads(json.dumps({"format": "rledit-editor"})), "version": 99})):
        description.write_text(damage)
        with pytest.raises(EditorError, match="not a readable saved editor"):
            Editor.load(tmp_path / "saved", model=model, tokenizer=tokenizer)
        assert _untouched(model)


def test_one_model_carries_one_store_so_loads_and_editors_never_stack(tokenizer, tmp_path):
    editor = _editor(tokenizer)
    editor.apply(EDITS)
    editor.save(tmp_path / "saved")
    model = _model()
    first = Editor.load(tmp_path / "saved", model=model, tokenizer=tokenizer)
    edited = _logits(model, tokenizer)
    with pytest.raises(DeltaError, match="already carries an rledit delta store .*detach"):
        Editor.load(tmp_path / "saved", model=model, tokenizer=tokenizer)
    with pytest.raises(DeltaError, match="already carries"):
        _editor(tokenizer, model=model)
    assert torch.equal(_logits(model, tokenizer), edited)  # still exactly one copy of the edits
    first.store.detach()
    second = _editor(tokenizer, model=model)  # once detached, a new editor starts from the unedited model
    with second.unedited():
        assert not torch.equal(_logits(model, tokenizer), edited)
    stacked = DeltaStore(model, second.targets, stack=True)  # asked for explicitly
    stacked.detach()


def test_flipped_bits_in_method_state_and_checkpoints_are_caught(tokenizer, tmp_path):
    editor = _editor(tokenizer)
    editor.apply(EDITS)
    editor.save(tmp_path / "saved")
    editor.save_checkpoint(tmp_path / "trained")
    for path, load, error in [
        (tmp_path / "saved" / "method_state.safetensors",
         lambda: Editor.load(tmp_path / "saved", model=_model(), tokenizer=tokenizer), EditorError),
        (tmp_path / "trained" / "checkpoint.safetensors", lambda: read_checkpoint(tmp_path / "trained"),
         CheckpointError),
    ]:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(error, match="does not match its recorded sha256"):
            load()
    meta = tmp_path / "trained" / "checkpoint.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 7}))
    with pytest.raises(CheckpointError, match="format version 7"):
        read_checkpoint(tmp_path / "trained")


def test_every_shipped_editor_carries_a_checked_digest():
    names = shipped_checkpoints()
    assert len(names) >= 3
    for name in names:
        checkpoint = read_checkpoint(name)  # the digest is verified while reading
        meta = json.loads((checkpoint.path / "checkpoint.json").read_text())
        assert meta["version"] == 2 and len(meta["state_sha256"]) == 64


def test_a_save_refuses_a_model_with_other_weights_of_the_same_shape(tokenizer, tmp_path):
    editor = _editor(tokenizer)
    editor.apply(EDITS)
    editor.save(tmp_path / "saved")
    tuned, changed = _model(), editor.targets[-1].name
    with torch.no_grad():
        tuned.get_submodule(changed).weight.mul_(1.01)  # "another fine-tune" of the same architecture
    with pytest.raises(EditorError, match=rf"other base weights of \['{changed}'\]"):
        Editor.load(tmp_path / "saved", model=tuned, tokenizer=tokenizer)
    assert _untouched(tuned)
    loaded = Editor.load(tmp_path / "saved", model=tuned, tokenizer=tokenizer, check_weights=False)
    assert len(loaded.steps) == 1


def test_checkpoint_mismatches_name_the_checkpoint_and_explicit_layers_are_not_replaced(tokenizer, tmp_path):
    editor = _editor(tokenizer)
    editor.save_checkpoint(tmp_path / "trained")
    editor.store.detach()
    with pytest.raises(EditorError, match="edits layers \\[2, 3\\]; layers=\\[1\\] cannot change that"):
        Editor.from_pretrained(_model(), tokenizer=tokenizer, checkpoint=tmp_path / "trained", layers=[1])
    shallow = copy.deepcopy(_model())
    shallow.model.layers = shallow.model.layers[:2]  # no layer 2 or 3
    with pytest.raises(EditorError, match="trained for .* does not fit this model"):
        Editor.from_pretrained(shallow, tokenizer=tokenizer, checkpoint=tmp_path / "trained")
    assert _untouched(shallow)
    marker = json.loads((tmp_path / "trained" / SAVE_MARKER).read_text())
    assert marker["kind"] == "checkpoint"


def test_apply_builds_no_autograd_graph_and_keeps_no_factor_larger_than_its_product(tokenizer):
    editor = _editor(tokenizer)
    seen = []
    solve = editor.method.module_update

    def recording(*args):
        seen.append(torch.is_grad_enabled())
        return solve(*args)

    editor.method.module_update = recording
    step = editor.apply(EDITS)
    assert seen and not any(seen)
    for update in editor.store.factors(step.id).values():
        assert all(not t.requires_grad for t in (update if isinstance(update, tuple) else (update,)))
    target = editor.targets[0]
    wide = max(target.d_in, target.d_out)  # r (d_in + d_out) > d_in d_out: folded into the dense product
    u, v = torch.randn(target.d_in, wide) * 1e-3, torch.randn(wide, target.d_out) * 1e-3
    folded = editor.store.add({target.name: (u, v)})
    kept = editor.store.factors(folded)[target.name]
    assert isinstance(kept, torch.Tensor) and torch.equal(kept, u @ v)


def test_a_step_too_large_for_the_memory_limit_is_refused_before_any_work(tokenizer):
    editor = _editor(tokenizer)
    editor.apply(EDITS)
    before = editor.store.state_hash()
    many = [EDITS[i % 2] for i in range(400)]
    small, large = editor.step_bytes(EDITS), editor.step_bytes(many)
    assert large > 200 * small  # the N×N solve grows with the square of the step's tokens
    editor.memory_limit = (small + large) // 20
    with pytest.raises(EditorError, match=r"a step of 400 edits .* needs about .*nothing was changed. Apply the "
                                          r"edits in steps of at most about \d+ edits"):
        editor.apply(many)
    assert editor.store.state_hash() == before and len(editor.steps) == 1
    fits = int(str(pytest.raises(EditorError, editor.apply, many).value).rsplit("about ", 1)[1].split()[0])
    assert 1 <= fits < 400 and editor.step_bytes(many[:fits]) <= editor.memory_limit
    editor.apply(many[:fits])


def test_step_handles_are_exact_and_belong_to_their_editor(tokenizer):
    editor = _editor(tokenizer)
    first, second = editor.apply(EDITS[0]), editor.apply(EDITS[1])
    for wrong in (True, 1.0, "1", None):
        with pytest.raises(EditorError, match="EditStep that apply returned or its int id"):
            editor.revert(wrong)
    assert [s.id for s in editor.steps] == [first.id, second.id]
    other = _editor(tokenizer)
    theirs = other.apply(EDITS[0])
    assert theirs.id == first.id
    with pytest.raises(EditorError, match="applied by another editor"):
        editor.revert(theirs)
    assert len(editor.steps) == 2
    editor.revert(second.id)
    editor.store.merge()
    with pytest.raises(DeltaError, match="merged into the base weights"):
        editor.revert(first)


def test_apply_inside_the_unedited_view_is_refused_and_contradictions_are_reported(tokenizer):
    from rledit.editor import EditConflictWarning

    editor = _editor(tokenizer)
    with editor.unedited(), pytest.raises(EditorError, match="apply inside `with editor.unedited\\(\\)`"):
        editor.apply(EDITS)
    assert editor.steps == []
    twin = [{"prompt": "The twin city of Lyon is", "target_new": "Karachi"},
            {"prompt": "The twin city of Lyon is", "target_new": "Manila"}]
    with pytest.warns(EditConflictWarning, match="edits 0 and 1 .*'Karachi' and 'Manila'"):
        editor.apply(twin)


def _train_yaml(tmp_path, model_folder):
    path = tmp_path / "train.yaml"
    path.write_text(f"""defaults:
  method: methods/rledit.yaml
model:
  name: {model_folder}
  layers: [2, 3]
  modules: [gate_proj, up_proj]
method:
  rank: 8
  train:
    episodes: 3
    steps_per_episode: 2
    batch: 2
    back_depth: 1
    checkpoint_every: 2
    loc_reference: unedited
""")
    return path


def _episodes(out):
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["episode"] for r in log if r["kind"] == "episode"]


def test_train_resume_checks_that_it_continues_the_same_run(tmp_path, capsys, tiny_folder):
    from rledit.cli import main

    config, out = _train_yaml(tmp_path, tiny_folder), tmp_path / "run"
    common = ["train", "--hparams", str(config), "--out", str(out), "--limit", "8"]
    assert main(common) == 0
    assert _episodes(out) == [1, 2, 3]  # checkpoints after episodes 2 and 3
    capsys.readouterr()
    assert main([*common, "--resume", "--set", "method.rank=4"]) == 1
    assert "was started with other hparams (method.rank: 8 -> 4)" in capsys.readouterr().err
    assert main(["train", "--hparams", str(config), "--out", str(out), "--limit", "6", "--resume"]) == 1
    assert "trained on 8 records, this one was given 6" in capsys.readouterr().err
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    state["episode"] = 2  # as if episode 3 ran after the last checkpoint and was lost
    torch.save(state, out / "trainer_state.pt")
    assert main([*common, "--resume", "--set", "method.train.episodes=4"]) == 0  # more episodes: still the run
    assert _episodes(out) == [1, 2, 3, 4]  # episode 3 was run again and is logged once

    (out / "trainer_state.pt").write_bytes((out / "trainer_state.pt").read_bytes()[:1000])
    assert main([*common, "--resume"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rledit train: error:") and "is truncated or damaged" in last and "Traceback" not in err

    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "hparams.yaml").write_text("written before a crash")  # a start that died before any checkpoint
    assert main(["train", "--hparams", str(config), "--out", str(failed), "--resume"]) == 1
    assert "start the run again without --resume" in capsys.readouterr().err
    assert main(["train", "--hparams", str(config), "--out", str(failed), "--limit", "4",
                 "--set", "method.train.episodes=1"]) == 0
    assert _episodes(failed) == [1]
    (tmp_path / "a-file").write_text("x")
    assert main(["train", "--hparams", str(config), "--out", str(tmp_path / "a-file")]) == 1
    assert "is a file; give a folder" in capsys.readouterr().err


def test_damaged_inputs_give_one_line_errors_not_tracebacks(tmp_path, capsys):
    import gzip

    from rledit.cli import main
    from rledit.data import DataError, load_requests
    from rledit.hparams import HparamsError, load_hparams
    from rledit.models import ModelLoadError, load_model
    from rledit.types import EditRequest, EditRequestError

    whole = gzip.compress(json.dumps([{"src": "Who?", "alt": "X", "rephrase": "Who", "loc": "a", "loc_ans": "b"}]
                                     * 50).encode())
    (tmp_path / "cut.json.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="cut.json.gz: cannot read the file \\(the compressed file is truncated\\)"):
        load_requests(tmp_path / "cut.json.gz")
    assert main(["eval", "--model", "x", "--data", str(tmp_path / "cut.json.gz"), "--out", str(tmp_path / "o.json")]) == 1
    assert "truncated" in capsys.readouterr().err
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_requests(tmp_path / "deep.json")
    with pytest.raises(EditRequestError, match="prompt is not valid text: surrogates not allowed"):
        EditRequest.from_dict({"prompt": "The capital of \ud800 is", "target_new": "Rome"})

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    (tmp_path / "bomb.yaml").write_text("method:\n  " + bomb.replace("\n", "\n  "))
    assert len(bomb) < 800
    with pytest.raises(HparamsError, match="expands to more than 100000 values"):
        load_hparams(tmp_path / "bomb.yaml")

    folder = tmp_path / "pickled"
    model = _model()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the old pickle format
    with pytest.raises(ModelLoadError, match="only as pickle files .*safetensors only"):
        load_model(str(folder))


@pytest.mark.parametrize("bad, message", [({"rank": 2.5}, "rank: expected int, got 2.5"),
                                          ({"rank": True}, "rank: expected int, got True"),
                                          ({"lr_init": "abc"}, "lr_init: expected float, got 'abc'"),
                                          ({"lr_init": float("inf")}, "lr_init: expected a finite number"),
                                          ({"train": {"batch": "20"}}, "train.batch: expected int"),
                                          ({"rnak": 4}, "unknown key rnak")])
def test_hparams_given_as_a_dict_get_the_validation_a_yaml_file_gets(tokenizer, bad, message):
    model = _model()
    with pytest.raises(EditorError, match=f"hparams for method 'rledit': .*{message}"):
        Editor.from_pretrained(model, tokenizer=tokenizer, layers=[2, 3], hparams=bad)
    assert _untouched(model)


def test_special_token_strings_in_user_text_stay_text_and_invisible_targets_are_refused(tokenizer):
    from rledit.tokens import TokenizationError, target_token_ids
    from rledit.types import EditRequest, EditRequestError

    specials = set(tokenizer.all_special_ids)
    for target in ("<|endoftext|>", "<pad>", "Paris<|endoftext|>"):
        _, ids = target_token_ids(tokenizer, "The capital of France is", target)
        assert not specials & set(ids) and tokenizer.decode(ids).strip() == target  # text, not control tokens
    for invisible in ("\u200b", "\u2060\ufeff", " \u200b "):
        with pytest.raises(EditRequestError, match="only invisible characters"):
            EditRequest.from_dict({"prompt": "The capital of France is", "target_new": invisible})

    class Normalising:  # a tokenizer whose normaliser drops the target's characters
        eos_token_id = None

        def __call__(self, text, add_special_tokens=True, split_special_tokens=False):
            return {"input_ids": [ord(c) for c in text if c.isascii()]}

        def decode(self, ids):
            return "".join(map(chr, ids))

    with pytest.raises(TokenizationError, match="tokenises to ' ': nothing to learn"):
        target_token_ids(Normalising(), "The capital of France is", "Париж")
