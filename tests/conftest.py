import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def tokenizer():
    """SmolLM2-like: no BOS, right padding."""
    return tiny_tokenizer()


@pytest.fixture
def tokenizer_bos_left():
    """Gemma-like: BOS prepended, left padding."""
    return tiny_tokenizer(bos=True, padding_side="left")


@pytest.fixture(params=["llama", "gpt2", "gpt_neox"])
def any_model(request):
    return tiny_model(request.param)


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama saved as a Hugging Face folder, so the CLI and loaders read it like any local model."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def llama():
    return tiny_model("llama")
