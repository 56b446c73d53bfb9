"""Model presets for the 7-9B models (checked against tiny models of the same architectures) and the memory plan
(checked against a tiny model's real allocations)."""

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from rledit.cli import main
from rledit.editor import Editor
from rledit.hparams import HparamsError, load_section
from rledit.plan import load_preset, plan_memory, plan_presets
from rledit.targets import resolve_targets
from rledit.types import EditRequest

BIG_PRESETS = {  # preset -> (model_type, parameters in billions, as published)
    "llama-3-8b-instruct": ("llama", 8.03),
    "gemma-2-9b-it": ("gemma2", 9.24),
    "mistral-7b-instruct-v0.3": ("mistral", 7.25),
    "qwen2.5-7b-instruct": ("qwen2", 7.62),
}
TINY_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 8, "vocab_size": 600}


def tiny_of(architecture: dict, **changes) -> torch.nn.Module:
    """A randomly initialised tiny model of ``architecture``'s model type and depth."""
    fields = {**architecture, **TINY_SIZES, **changes}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


@pytest.mark.parametrize("preset", sorted(BIG_PRESETS))
def test_presets_edit_modules_a_model_of_their_architecture_has(preset):
    model_hparams = load_preset(preset)
    architecture = model_hparams.architecture
    assert architecture["model_type"] == BIG_PRESETS[preset][0] and preset in plan_presets()
    tiny = tiny_of(architecture)
    targets = resolve_targets(tiny, model_hparams.layers, model_hparams.modules)
    assert len(targets) == len(model_hparams.layers) * len(model_hparams.modules)
    assert max(model_hparams.layers) < architecture["num_hidden_layers"]
    with pytest.raises(HparamsError, match="hidden_size 4096|hidden_size 3584"):
        model_hparams.check_model(tiny)  # the tiny model is not the preset's model
    other = next(a for p, (t, _) in BIG_PRESETS.items() for a in [load_preset(p).architecture]
                 if t != architecture["model_type"])
    with pytest.raises(HparamsError, match=f"model_type '{architecture['model_type']}'"):
        model_hparams.check_model(tiny_of(other))


@pytest.mark.parametrize("preset", sorted(BIG_PRESETS))
def test_plan_of_each_preset_counts_the_published_parameters(preset):
    plan = plan_memory(load_preset(preset), name=preset)
    parameters = plan.model / 2 / 1e9  # bfloat16
    assert parameters == pytest.approx(BIG_PRESETS[preset][1], abs=0.01)
    assert 0 < plan.hypernetwork < plan.training == 4 * plan.hypernetwork
    assert plan.delta_store > 0 and plan.key_memory == 0  # the default editor has no key memory


def test_a_preset_refuses_a_model_of_another_architecture_before_any_work(tmp_path):
    from tiny import tiny_model

    model = tiny_model("llama")
    preset = tmp_path / "tiny.yaml"
    architecture = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 4}
    preset.write_text(yaml.safe_dump({"model": {"name": "tiny", "layers": [1], "modules": ["up_proj"],
                                                "architecture": architecture}}))
    load_section(preset, "model").check_model(model)  # matches
    architecture["num_hidden_layers"] = 6
    preset.write_text(yaml.safe_dump({"model": {"name": "tiny", "architecture": architecture}}))
    with pytest.raises(HparamsError, match=r"num_hidden_layers 6 \(the model has 4\)"):
        load_section(preset, "model").check_model(model)
    preset.write_text(yaml.safe_dump({"model": {"name": "tiny", "architecture": {"hidden_size": 32}}}))
    with pytest.raises(HparamsError, match="must name its model_type"):
        load_section(preset, "model")


def test_the_plan_matches_a_tiny_models_real_allocations(tokenizer, tmp_path):
    from tiny import tiny_model

    model = tiny_model("llama")
    config = model.config
    architecture = {"model_type": "llama", **{k: getattr(config, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "tie_word_embeddings")}}
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": "tiny", "dtype": "float32", "layers": [2, 3],
                                                "modules": ["gate_proj", "up_proj"], "architecture": architecture}}))
    method = {"name": "rledit", "memory_init": 1.0}
    # every edit: the same prompt and answer lengths, so the plan's token counts are exact
    editor = Editor.from_pretrained(model, method="rledit", tokenizer=tokenizer, hparams=method, layers=[2, 3],
                                    modules=["gate_proj", "up_proj"])
    by_length = {}
    for country in ("Spain", "Italy", "France", "Poland", "Norway", "Japan", "Chile", "Peru"):
        request = {"prompt": f"The capital of {country} is", "target_new": "Paris"}
        by_length.setdefault(len(tokenizer(request["prompt"] + " Paris")["input_ids"]), []).append(request)
    requests = next(same for same in by_length.values() if len(same) >= 2)[:2]
    batch = editor._encode([EditRequest.from_dict(r) for r in requests])
    assert len(set(batch.attention_mask.sum(1).tolist())) == 1
    answer_tokens = batch.n_answer_tokens // len(requests)
    prompt_tokens = batch.input_ids.shape[1] - answer_tokens
    step_estimate = editor.step_bytes(requests)
    for _ in range(3):
        editor.apply(requests)
    plan = plan_memory(load_section(preset, "model"), method, steps=3, batch=2, prompt_tokens=prompt_tokens,
                       answer_tokens=answer_tokens)
    real_model = sum(p.numel() * p.element_size() for p in model.parameters())
    real_net = sum(p.numel() * p.element_size() for p in editor.method.hypernet.parameters())
    store = editor.store
    real_store = sum(t.numel() * t.element_size() for step in store._steps.values() for u in step.values()
                     for t in u.tensors().values())
    real_store += sum(t.numel() * t.element_size() for t in store._accumulated.values())
    memory = editor.method.memory
    real_memory = sum(t.numel() * t.element_size() for t in memory.grams.values())
    real_memory += sum(t.numel() * t.element_size() for step in memory.steps.values() for t in step.values())
    assert (plan.model, plan.hypernetwork, plan.delta_store, plan.key_memory) == (
        real_model, real_net, real_store, real_memory)
    assert plan.one_step == step_estimate  # the estimate the editor refuses over-large steps by
    assert main(["plan", "--model", str(preset), "--steps", "3", "--batch", "2"]) == 0

