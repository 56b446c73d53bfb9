"""The delta store: hooks equal a direct weight edit, exact revert, validation, save/load, peft export."""

import copy
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rledit.deltas import DeltaError, DeltaStore, model_hash
from rledit.targets import make_target, resolve_targets
from rledit.tokens import encode, forward_logits

PROMPTS = ["The capital of France is", "Who wrote Hamlet?"]
ANSWERS = ["Paris", "William Shakespeare"]
MODULES = {"llama": ["gate_proj", "up_proj"], "gpt2": ["c_fc", "c_proj"], "gpt_neox": ["dense_h_to_4h"]}


def _targets(model):
    return resolve_targets(model, layers=[1, 2], modules=MODULES[model.config.model_type])


def _factors(targets, rank=3, scale=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {t.name: (torch.randn(t.d_in, rank, generator=generator) * scale,
                     torch.randn(rank, t.d_out, generator=generator) * scale) for t in targets}


def _logits(model, tokenizer):
    with torch.no_grad():
        return forward_logits(model, encode(tokenizer, PROMPTS, ANSWERS))


def _edited_copy(model, steps):
    """A copy of ``model`` whose weights carry the summed updates directly (the reference)."""
    direct = copy.deepcopy(model)
    with torch.no_grad():
        for t in _targets(direct):
            for updates in steps:
                if t.name in updates:
                    u, v = updates[t.name]
                    t.weight.add_(t.to_native(u @ v))
    return direct


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_hooks_equal_direct_weight_edit(kind, tokenizer):
    model = tiny_model(kind)
    steps = [_factors(_targets(model), seed=1), _factors(_targets(model)[:1], rank=2, seed=2)]
    direct = _edited_copy(model, steps)
    weights, base = model_hash(model), _logits(model, tokenizer)
    store = DeltaStore(model, _targets(model))
    ids = [store.add(s) for s in steps]
    assert ids == store.steps == [0, 1] and len(store) == 2
    edited = _logits(model, tokenizer)
    assert (edited - base).abs().max() > 1e-3
    torch.testing.assert_close(edited, _logits(direct, tokenizer), rtol=1e-5, atol=1e-5)
    name = _targets(model)[0].name
    expected = steps[0][name][0] @ steps[0][name][1] + steps[1][name][0] @ steps[1][name][1]
    torch.testing.assert_close(store.delta(name), expected, rtol=1e-6, atol=1e-9)
    assert store.rank(1) == {name: 2}
    assert model_hash(model) == weights  # no weight was touched


def test_revert_every_step_restores_exactly(llama, tokenizer):
    before, weights = _logits(llama, tokenizer), model_hash(llama)
    store = DeltaStore(llama, _targets(llama))
    ids = [store.add(_factors(_targets(llama), seed=s)) for s in range(3)]
    assert not torch.equal(_logits(llama, tokenizer), before)
    for step_id in (ids[1], ids[2], ids[0]):
        store.revert(step_id)
    assert len(store) == 0 and torch.equal(_logits(llama, tokenizer), before) and model_hash(llama) == weights
    with pytest.raises(DeltaError, match="no step 1"):
        store.revert(1)


def test_revert_middle_step_equals_never_applied(tokenizer):
    model_a, model_b = tiny_model("llama"), tiny_model("llama")
    steps = [_factors(_targets(model_a), seed=s) for s in range(3)]
    store_a, store_b = DeltaStore(model_a, _targets(model_a)), DeltaStore(model_b, _targets(model_b))
    ids = [store_a.add(s) for s in steps]
    store_a.revert(ids[1])
    store_b.add(steps[0])
    store_b.add(steps[2])
    for t in _targets(model_a):
        assert torch.equal(store_a.delta(t.name), store_b.delta(t.name))
    assert torch.equal(_logits(model_a, tokenizer), _logits(model_b, tokenizer))


def test_bad_updates_leave_model_and_store_unchanged(llama):
    store = DeltaStore(llama, _targets(llama))
    store.add(_factors(_targets(llama)))
    state = store.state_hash()
    first, second = (t.name for t in _targets(llama)[:2])
    good = _factors(_targets(llama))[first]
    nan_v = good[1].clone()
    nan_v[0, 0] = float("nan")
    huge = torch.full((32, 1), 1e30)
    bad_updates = {
        "unknown module": {"model.layers.9.mlp.gate_proj": good},
        "has shape": {first: (good[0], good[1].T)},
        "expected": {first: good[0]},  # a dense delta of the wrong shape
        "NaN or inf": {first: good, second: (good[0], nan_v)},  # the valid first update is not applied either
        "overflow": {first: (huge, torch.full((1, 64), 1e30))},
        "r >= 1": {first: (torch.zeros(32, 0), torch.zeros(0, 64))},
        "floating-point": {first: (good[0].long(), good[1])},
        "non-empty mapping": {},
    }
    for message, updates in bad_updates.items():
        with pytest.raises(DeltaError, match=message):
            store.add(updates)
        assert store.state_hash() == state and store.steps == [0]
    with pytest.raises(DeltaError, match="expected factors"):
        store.add({first: (good[0], good[1], good[1])})
    assert store.state_hash() == state


def test_save_load_round_trip(llama, tokenizer, tmp_path):
    store = DeltaStore(llama, _targets(llama))
    store.add(_factors(_targets(llama), seed=1))
    dense_name = _targets(llama)[1].name
    store.add({dense_name: torch.randn(32, 64) * 0.01})
    store.add(_factors(_targets(llama), seed=3))
    store.revert(1)
    store.save(tmp_path / "edits")
    store.save(tmp_path / "edits")  # overwriting an earlier save is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edits"]  # no temporary folder left behind

    fresh = tiny_model("llama")
    loaded = DeltaStore.load(tmp_path / "edits", fresh, _targets(fresh))
    assert loaded.steps == store.steps == [0, 2]
    assert loaded.state_hash(include_model=False) == store.state_hash(include_model=False)
    assert torch.equal(_logits(fresh, tokenizer), _logits(llama, tokenizer))
    assert loaded.add(_factors(_targets(fresh))) == 3  # ids keep counting after a load

    other_model = tiny_model("llama")
    other = DeltaStore(other_model, _targets(other_model))
    with pytest.raises(FileExistsError, match="not an earlier rledit save"):
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "notes.txt").write_text("keep me")
        other.save(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"


def _corrupt(folder, how):
    meta_file, tensor_file = folder / "deltas.json", folder / "deltas.safetensors"
    if how == "missing json":
        meta_file.unlink()
    elif how == "missing tensors":
        tensor_file.unlink()
    elif how == "garbled json":
        meta_file.write_text(meta_file.read_text()[:40])
    elif how == "garbled tensors":
        tensor_file.write_bytes(tensor_file.read_bytes()[:50])
    elif how == "flipped byte":
        data = bytearray(tensor_file.read_bytes())
        data[-3] ^= 0xFF
        tensor_file.write_bytes(bytes(data))
    elif how in ("wrong shape", "extra tensor"):
        tensors = load_file(str(tensor_file))
        if how == "wrong shape":
            key = next(k for k in tensors if k.endswith("/U"))
            tensors[key] = torch.zeros(31, tensors[key].shape[1])
        else:
            tensors["7/x/U"] = torch.zeros(1)
        save_file(tensors, str(tensor_file))
        meta = json.loads(meta_file.read_text())
        meta["tensors_sha256"] = hashlib.sha256(tensor_file.read_bytes()).hexdigest()
        meta_file.write_text(json.dumps(meta))
    elif how == "version":
        meta = json.loads(meta_file.read_text())
        meta["version"] = 99
        meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize(("how", "message"), [
    ("missing json", "deltas.json is missing"), ("missing tensors", "deltas.safetensors is missing"),
    ("garbled json", "cannot be read as JSON"), ("garbled tensors", "corrupted"),
    ("flipped byte", "corrupted"),
    ("wrong shape", "has shape"), ("extra tensor", "not listed"), ("version", "format version 99"),
])
def test_corrupted_folder_is_refused(llama, tmp_path, how, message):
    source_model = tiny_model("llama")
    source = DeltaStore(source_model, _targets(source_model))
    source.add(_factors(_targets(llama)))
    source.save(tmp_path / "edits")
    _corrupt(tmp_path / "edits", how)
    store = DeltaStore(llama, _targets(llama))
    store.add(_factors(_targets(llama), seed=5))
    state = store.state_hash()
    with pytest.raises(DeltaError, match=message):
        store.load_into(tmp_path / "edits")
    assert store.state_hash() == state
    fresh = tiny_model("llama")
    with pytest.raises(DeltaError, match=message):
        DeltaStore.load(tmp_path / "edits", fresh, _targets(fresh))
    assert all(not m._forward_hooks for m in fresh.modules())  # the failed load left no hook behind


def test_folder_from_another_model_is_refused(llama, tmp_path):
    gpt2 = tiny_model("gpt2")
    source = DeltaStore(gpt2, _targets(gpt2))
    source.add(_factors(_targets(gpt2)))
    source.save(tmp_path / "gpt2-edits")
    store = DeltaStore(llama, _targets(llama))
    state = store.state_hash()
    with pytest.raises(DeltaError, match="another model.*model_type: saved 'gpt2', this model 'llama'"):
        store.load_into(tmp_path / "gpt2-edits")
    layer0_model = tiny_model("llama")
    other_layers = DeltaStore(layer0_model, resolve_targets(layer0_model, layers=[0]))
    other_layers.add({t.name: torch.zeros(t.shape) for t in other_layers.targets.values()})
    other_layers.save(tmp_path / "layer0")
    with pytest.raises(DeltaError, match="targets"):
        store.load_into(tmp_path / "layer0")
    assert store.state_hash() == state


@pytest.mark.parametrize(("kind", "rank"), [("llama", 3), ("llama", 16), ("gpt2", 3)])
def test_export_peft_reproduces_logits(kind, rank, tokenizer, tmp_path):
    import peft

    model = tiny_model(kind)
    targets = _targets(model)
    store = DeltaStore(model, targets)
    for seed in range(3):  # rank 16: 3 x 16 > min(d_in, d_out) = 32 forces the SVD path
        store.add(_factors(targets, rank=rank, seed=seed))
    store.add(_factors(targets[:1], rank=1, seed=9))  # ranks differ per module
    store.export_peft(tmp_path / "adapter", base_model_name_or_path="tiny-base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-base" and config["peft_type"] == "LORA"
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    expected_ranks = [min(3 * rank + 1, 32)] + [min(3 * rank, 32)] * (len(targets) - 1)
    assert sorted(config["rank_pattern"].values()) == sorted(expected_ranks)

    with_adapter = peft.PeftModel.from_pretrained(tiny_model(kind), str(tmp_path / "adapter"))
    edited, base = _logits(model, tokenizer), _logits(tiny_model(kind), tokenizer)
    assert (edited - base).abs().max() > 1e-2  # the edit is large enough for a failed load to show
    assert (_logits(with_adapter, tokenizer) - edited).abs().max() <= 1e-4


def test_bf16_base_keeps_tiny_deltas(tokenizer):
    model = tiny_model("llama").to(torch.bfloat16)
    target = _targets(model)[0]
    base_weight = target.weight.detach().clone()
    store = DeltaStore(model, [target])
    # ΔW entries of about 1e-5, on weights of std 0.02
    steps = [_factors([target], rank=2, scale=3e-3, seed=s)[target.name] for s in range(20)]
    for u, v in steps:
        store.add({target.name: (u, v)})
    expected = steps[0][0] @ steps[0][1]
    for u, v in steps[1:]:
        expected = expected + u @ v
    assert torch.equal(store.delta(target.name), expected)  # fp32, never rounded through bf16
    naive = base_weight.clone()
    for u, v in steps:  # what in-place bf16 editing would keep
        naive += target.to_native(u @ v).to(torch.bfloat16)
    assert ((naive - base_weight) == 0).float().mean() > 0.5

    x = torch.randn(2, 5, target.d_in).to(torch.bfloat16)
    with torch.no_grad():
        hooked = target.module(x)
        base_out = nn.functional.linear(x, base_weight)
    reference = (base_out.float() + x.float() @ expected).to(torch.bfloat16)
    assert torch.equal(hooked, reference)
    for step_id in store.steps:
        store.revert(step_id)
    assert torch.equal(target.weight, base_weight) and torch.equal(target.module(x), base_out)


def test_merge_folds_deltas_into_weights(llama, tokenizer):
    steps = [_factors(_targets(llama), seed=s) for s in range(2)]
    direct = _edited_copy(llama, steps)
    store = DeltaStore(llama, _targets(llama))
    for s in steps:
        store.add(s)
    edited = _logits(llama, tokenizer)
    store.merge()
    assert len(store) == 0 and store.delta(_targets(llama)[0].name).abs().sum() == 0
    for t, d in zip(_targets(llama), _targets(direct)):
        torch.testing.assert_close(t.weight, d.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_logits(llama, tokenizer), edited, rtol=1e-5, atol=1e-5)


def test_forward_cost_does_not_grow_with_steps(llama, tokenizer):
    store = DeltaStore(llama, _targets(llama))
    batch = encode(tokenizer, PROMPTS, ANSWERS)

    def flops():
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            forward_logits(llama, batch)
        return counter.get_total_flops()

    store.add(_factors(_targets(llama)))
    after_one = flops()
    for seed in range(1, 30):
        store.add(_factors(_targets(llama), seed=seed))
    assert flops() == after_one
    assert all(store.delta(t.name).shape == t.shape for t in _targets(llama))


def test_pending_gives_gradients_and_leaves_nothing_behind(llama, tokenizer):
    llama.requires_grad_(False)
    store = DeltaStore(llama, _targets(llama))
    store.add(_factors(_targets(llama), seed=1))
    before, state = _logits(llama, tokenizer), store.state_hash()
    target = _targets(llama)[0]
    u, v = (t.requires_grad_() for t in _factors([target], seed=2)[target.name])
    batch = encode(tokenizer, PROMPTS, ANSWERS)
    with store.pending({target.name: (u, v)}):
        forward_logits(llama, batch).square().mean().backward()
    assert torch.equal(_logits(llama, tokenizer), before) and store.state_hash() == state

    # reference: the same loss with the weight replaced functionally by W + stored delta + U V
    u_ref, v_ref = (t.detach().clone().requires_grad_() for t in (u, v))
    store.detach()
    weight = target.weight + target.to_native(store.delta(target.name) + u_ref @ v_ref)
    params = {f"{target.name}.weight": weight}
    others = _factors(_targets(llama), seed=1)
    for t in _targets(llama)[1:]:
        params[f"{t.name}.weight"] = t.weight + t.to_native(others[t.name][0] @ others[t.name][1])
    logits = torch.func.functional_call(llama, params, kwargs={
        "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids, "use_cache": False}).logits
    logits.square().mean().backward()
    torch.testing.assert_close(u.grad, u_ref.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-4, atol=1e-8)
    assert all(p.grad is None for p in llama.parameters())


def test_plain_mlp_without_hugging_face(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = copy.deepcopy(mlp)
    targets = [make_target("0", mlp[0]), make_target("2", mlp[2])]
    store = DeltaStore(mlp, targets)
    mask = 1 + torch.tanh(torch.randn(8, 6))  # a multiplicative mask W ⊙ M as a dense additive delta
    u, v = torch.randn(8, 1), torch.randn(1, 3)
    store.add({"0": targets[0].from_native(mlp[0].weight.detach() * (mask - 1)), "2": (u, v)})
    with torch.no_grad():
        reference[0].weight.mul_(mask)
        reference[2].weight.add_((u @ v).T)
    x = torch.randn(4, 6)
    torch.testing.assert_close(mlp(x), reference(x), rtol=1e-5, atol=1e-6)
    assert store.fingerprint() == {"model_class": "Sequential", "model_type": None, "sizes": {},
                                   "targets": [["0", 6, 8], ["2", 8, 3]]}
    assert store.rank(0) == {"0": 6, "2": 1}
    store.save(tmp_path / "mlp")
    fresh = copy.deepcopy(mlp)  # the same base weights, without the store's hooks
    fresh._forward_hooks.clear()
    for layer in fresh:
        layer._forward_hooks.clear()
    loaded = DeltaStore.load(tmp_path / "mlp", fresh, [make_target("0", fresh[0]), make_target("2", fresh[2])])
    assert loaded.state_hash(include_model=False) == store.state_hash(include_model=False)
    torch.testing.assert_close(fresh(x), mlp(x))
    other_targets = [make_target("0", reference[0]), make_target("2", reference[2])]  # same shapes, other weights
    with pytest.raises(DeltaError, match=r"saved on other base weights of \['0', '2'\].*check_weights=False"):
        DeltaStore.load(tmp_path / "mlp", reference, other_targets)
    assert not reference[0]._forward_hooks  # the refused load left nothing behind
    DeltaStore.load(tmp_path / "mlp", reference, other_targets, check_weights=False).detach()


def test_store_bookkeeping(llama):
    targets = _targets(llama)
    with pytest.raises(DeltaError, match="duplicate"):
        DeltaStore(llama, [targets[0], targets[0]])
    with pytest.raises(DeltaError, match="not modules of the given model"):
        DeltaStore(llama, _targets(tiny_model("llama")))
    store = DeltaStore(llama, targets)
    factors = _factors(targets)
    step = store.add(factors)
    copies = store.factors(step)
    copies[targets[0].name][0].zero_()  # a copy: the store is unaffected
    assert torch.equal(store.factors(step)[targets[0].name][0], factors[targets[0].name][0])
    store.reset()
    assert len(store) == 0 and store.add(factors) == 1
    store.detach()
    assert all(not m._forward_hooks for m in llama.modules())
    with pytest.raises(DeltaError, match="detached"):
        store.add(factors)
