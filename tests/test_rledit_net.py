"""The RLEdit hypernetwork, normaliser, factored ridge solve and method contract, on small random tensors."""

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from rledit.methods.base import (
    EditMethod,
    UnknownMethodError,
    UpdateError,
    check_updates,
    get_method,
    register_method,
)
from rledit.methods.rledit import (
    EditorNet,
    HyperNetwork,
    MALMENHparams,
    RLEditHparams,
    RLEditMethod,
    RunningNormalizer,
    factored_frobenius_sq,
    ridge_factors,
    value_shifts,
)

SHAPES = {"layers.1.mlp.up_proj": (6, 10), "layers.2.mlp.up_proj": (6, 10), "layers.2.mlp.down_proj": (10, 6)}


@dataclass
class Features:
    keys: dict
    grads: dict


def random_features(n=7, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    keys = {m: torch.randn(n, d_in, generator=g) + 2.0 for m, (d_in, _) in shapes.items()}
    grads = {m: torch.randn(n, d_out, generator=g) * 1e-3 for m, (_, d_out) in shapes.items()}
    return Features(keys, grads)


def make_method(normalizer="lifelong", **kw):
    method = RLEditMethod(RLEditHparams(rank=4, n_blocks=2, lr_init=1e-2, normalizer=normalizer, **kw))
    method.build(SHAPES)
    return method


def dense_ridge(keys, shifts, ridge_log):
    k, d = keys.double(), shifts.double()
    return torch.linalg.solve(k.T @ k + ridge_log.double().exp() * torch.eye(k.shape[1], dtype=k.dtype), k.T @ d)


# ---- normaliser ---------------------------------------------------------------------------------------------


def test_normalizer_running_stats_equal_the_batch_stats_of_all_rows():
    x = torch.randn(50, 5) * 3 + 1
    norm = RunningNormalizer(5)
    for chunk in (x[:7], x[7:8], x[8:30], x[30:]):
        norm.update(chunk)
    assert norm.count.item() == 50
    torch.testing.assert_close(norm.mean, x.double().mean(0))
    torch.testing.assert_close(norm.std(), x.double().std(0, unbiased=False))
    torch.testing.assert_close(norm.normalize(x).mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)


def test_empty_normalizer_is_the_identity():
    x = torch.randn(3, 4)
    torch.testing.assert_close(RunningNormalizer(4).normalize(x), x)


def test_frozen_mode_never_updates_and_lifelong_updates_then_normalises():
    feats = random_features()
    name = next(iter(SHAPES))
    frozen, lifelong = make_method("frozen"), make_method("lifelong")
    for method in (frozen, lifelong):  # the same "training" statistics for both
        method.hypernet.normalizer(name).update(torch.ones(2, 16))
    frozen_state = {k: v.clone() for k, v in frozen.hypernet.normalizers.state_dict().items()}
    frozen.compute_updates(feats)
    for k, v in frozen.hypernet.normalizers.state_dict().items():
        assert torch.equal(v, frozen_state[k])

    seen = {}
    net = lifelong.hypernet.nets["6x10"]
    net.register_forward_hook(lambda mod, args, out: seen.setdefault("h0", args[0].clone()))
    lifelong.compute_updates(feats)
    norm = lifelong.hypernet.normalizer(name)
    assert norm.count.item() == 2 + 7  # the step's rows were folded in ...
    rows = torch.cat([feats.keys[name], feats.grads[name]], -1)
    all_rows = torch.cat([torch.ones(2, 16), rows]).double()
    torch.testing.assert_close(norm.mean, all_rows.mean(0))
    # ... before normalising: the net saw the rows normalised with the updated statistics
    torch.testing.assert_close(seen["h0"], ((rows - all_rows.mean(0)) / all_rows.std(0, unbiased=False)).float())
    # the trainer can force an update whatever the mode
    frozen.compute_updates(feats, update_stats=True)
    assert frozen.hypernet.normalizer(name).count.item() == 9


# ---- network ------------------------------------------------------------------------------------------------


def test_untrained_network_is_the_identity_and_editor_is_gradient_like():
    net = EditorNet(6, 10, rank=4, n_blocks=3, n_modules=2)
    h = torch.randn(5, 16)
    torch.testing.assert_close(net(h, 1), h, rtol=0, atol=0)

    method = make_method()
    feats = random_features()
    name = "layers.2.mlp.up_proj"
    k, g = feats.keys[name], feats.grads[name]
    method.fold_statistics([feats])
    edited_k, edited_g = method.hypernet(name, k, g)
    torch.testing.assert_close(edited_k, k)
    torch.testing.assert_close(edited_g, g)
    shifts = value_shifts(k, edited_k, edited_g, method.hypernet.lr(name))
    expected = -1e-2 * (k * k).sum(-1, keepdim=True) * g  # d_i = -lr ||k_i||² g_i
    torch.testing.assert_close(shifts, expected)


def test_module_index_selects_its_own_embeddings():
    net = EditorNet(3, 2, rank=2, n_blocks=1, n_modules=3)
    block = net.blocks[0]
    with torch.no_grad():
        block.B.normal_()
        block.bias.fill_(10.0)  # every pre-activation positive: z = h A B + b exactly
        block.scale[1] = 2.0
        block.shift[2] = 5.0
    h = torch.randn(4, 5)
    z = h @ block.A @ block.B + block.bias
    assert (z > 0).all()
    torch.testing.assert_close(net(h, 0), z + h)
    torch.testing.assert_close(net(h, 1), 2 * z + h)
    torch.testing.assert_close(net(h, 2), z + 5 + h)
    with pytest.raises(IndexError):
        net(h, 3)


def test_modules_of_one_shape_share_a_network():
    hyper = make_method().hypernet
    assert set(hyper.nets) == {"6x10", "10x6"}
    assert hyper.slots["layers.1.mlp.up_proj"][:2] == ("6x10", 0)
    assert hyper.slots["layers.2.mlp.up_proj"][:2] == ("6x10", 1)
    assert hyper.slots["layers.2.mlp.down_proj"][:2] == ("10x6", 0)
    assert hyper.nets["6x10"].blocks[0].scale.shape == (2, 16)


# ---- factored ridge solve -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d_in", [(5, 12), (12, 5)])
def test_factored_solve_equals_dense_normal_equations(n, d_in):
    g = torch.Generator().manual_seed(n)
    keys, shifts = torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g)
    ridge_log = torch.tensor(-0.5)
    u, v = ridge_factors(keys, shifts, ridge_log)
    assert u.dtype == v.dtype == torch.float32 and u.shape == (d_in, n) and v.shape == (n, 4)
    torch.testing.assert_close((u.double() @ v.double()), dense_ridge(keys, shifts, ridge_log), rtol=1e-5, atol=1e-6)


def test_gradients_through_the_solve_match_the_dense_solve_and_finite_differences():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(6, 4, generator=g, dtype=torch.float64)
    target = torch.randn(4, 3, generator=g, dtype=torch.float64)

    def loss_factored(shifts, ridge_log):
        u, v = ridge_factors(keys, shifts, ridge_log)
        return ((u.double() @ v.double() - target) ** 2).sum()

    def loss_dense(shifts, ridge_log):
        return ((dense_ridge(keys, shifts, ridge_log) - target) ** 2).sum()

    shifts = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ridge_log = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    grads_factored = torch.autograd.grad(loss_factored(shifts, ridge_log), (shifts, ridge_log))
    grads_dense = torch.autograd.grad(loss_dense(shifts, ridge_log), (shifts, ridge_log))
    for a, b in zip(grads_factored, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # the factors pass through fp32
    eps = 1e-6
    with torch.no_grad():
        fd = (loss_dense(shifts, ridge_log + eps) - loss_dense(shifts, ridge_log - eps)) / (2 * eps)
    torch.testing.assert_close(grads_factored[1], fd, rtol=1e-4, atol=1e-6)


def test_factored_frobenius_norm():
    u, v = torch.randn(7, 3), torch.randn(3, 5)
    torch.testing.assert_close(factored_frobenius_sq(u, v), (u @ v).pow(2).sum())


# ---- the method ---------------------------------------------------------------------------------------------


def test_compute_updates_returns_fp32_factors_of_the_ridge_solution():
    method = make_method()
    feats = random_features()
    updates = method.compute_updates(feats)
    assert set(updates) == set(SHAPES)
    for name, (u, v) in updates.items():
        k = feats.keys[name]
        assert u.dtype == v.dtype == torch.float32 and u.shape == (SHAPES[name][0], 7)
        shifts = -1e-2 * (k * k).sum(-1, keepdim=True) * feats.grads[name]
        torch.testing.assert_close(u @ v, dense_ridge(k, shifts, torch.tensor(0.0)).float(), rtol=1e-4, atol=1e-9)


def test_a_few_optimiser_steps_reduce_a_toy_objective():
    torch.manual_seed(0)
    method = make_method("frozen")
    hyper = method.hypernet
    feats = random_features(n=9, seed=1)
    name = "layers.1.mlp.up_proj"
    feats.keys[name] = feats.keys[name] - 2.0  # rows with mean-dominated keys get a wrong-signed update
    # objective: the update's effect on fresh keys should follow a fixed linear map of them
    probe = torch.randn(20, 6)
    wanted = probe @ torch.randn(6, 10) * 1e-3

    def objective():
        u, v = method.compute_updates(feats)[name]
        return ((probe @ u @ v - wanted) ** 2).mean() + 1e-4 * factored_frobenius_sq(u, v)

    optimiser = torch.optim.Adam(hyper.parameter_groups(meta_lr=1e-2, scalar_meta_lr=1e-2))
    first = objective()
    first.backward()
    assert hyper.nets["6x10"].blocks[-1].B.grad.abs().sum() > 0  # the zero-initialised B does learn
    optimiser.step()
    losses = [first.item()]
    for _ in range(30):
        optimiser.zero_grad()
        loss = objective()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (hyper.nets["6x10"].blocks[-1].B != 0).any()


def test_state_dict_round_trip_through_safetensors(tmp_path):
    method = make_method()
    method.compute_updates(random_features())  # non-trivial normaliser statistics
    with torch.no_grad():
        method.hypernet.nets["6x10"].blocks[0].B.normal_()
        method.hypernet.ridge_log.add_(0.7)
    save_file(method.state_dict(), tmp_path / "editor.safetensors")
    loaded = make_method("frozen")
    loaded.load_state_dict(load_file(tmp_path / "editor.safetensors"))
    feats = random_features(seed=5)
    for name, (u, v) in method.compute_updates(feats, update_stats=False).items():
        u2, v2 = loaded.compute_updates(feats)[name]
        assert torch.equal(u, u2) and torch.equal(v, v2)

    other = RLEditMethod(RLEditHparams(rank=3, n_blocks=2))
    other.build(SHAPES)
    with pytest.raises(UpdateError, match="another rank"):
        other.load_state_dict(method.state_dict())


def test_non_finite_features_raise_and_leave_the_normaliser_untouched():
    method = make_method()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    feats = random_features()
    feats.grads["layers.2.mlp.down_proj"][3, 1] = float("nan")
    with pytest.raises(UpdateError, match="not finite"):
        method.compute_updates(feats)
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k])


def test_non_finite_update_raises_and_rolls_back_the_normaliser():
    method = make_method()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        method.hypernet.log_lr.fill_(200.0)  # lr = e^200 overflows fp32
    with pytest.raises(UpdateError, match="not finite"):
        method.compute_updates(random_features())
    for k, v in method.state_dict().items():
        if k != "log_lr":
            assert torch.equal(v, before[k])


def test_features_for_unknown_modules_or_wrong_widths_are_refused():
    method = make_method()
    feats = random_features(shapes={"layers.9.mlp.up_proj": (6, 10)})
    with pytest.raises(UpdateError, match="does not edit"):
        method.compute_updates(feats)
    feats = random_features()
    feats.keys["layers.1.mlp.up_proj"] = torch.randn(7, 5)
    with pytest.raises(UpdateError, match="widths"):
        method.compute_updates(feats)
    with pytest.raises(UpdateError, match="built for modules"):
        method.build({"x": (6, 10)})


# ---- registry -----------------------------------------------------------------------------------------------


def test_registry_finds_rledit_and_malmen_and_lists_names_on_error():
    assert get_method("rledit") is RLEditMethod
    malmen = get_method("malmen")()
    assert isinstance(malmen, RLEditMethod) and isinstance(malmen.hparams, MALMENHparams)
    assert malmen.hparams.train.steps_per_episode == 1 and malmen.hparams.train.back_depth == 1
    with pytest.raises(UnknownMethodError, match="rledit"):
        get_method("no-such-method")
    with pytest.raises(ValueError, match="already registered"):
        register_method("rledit")(type("Other", (EditMethod,), {}))


def test_base_compute_step_delegates_to_compute_updates():
    method = make_method()
    feats = random_features()
    step = method.compute_step(None, None, [], [], feats)
    assert set(step) == set(SHAPES)
    with pytest.raises(UpdateError, match="needs the step's features"):
        method.compute_step(None, None, [], [], None)


def test_hparams_validation():
    with pytest.raises(ValueError, match="normalizer"):
        RLEditHparams(normalizer="sometimes")
    with pytest.raises(ValueError, match="loc_reference"):
        RLEditHparams(train={"loc_reference": "future"})
    assert RLEditHparams(train={"batch": 4}).train.batch == 4


def test_hypernetwork_layout_is_json_ready():
    hyper = HyperNetwork(SHAPES, rank=4, n_blocks=1, lr_init=1e-3)
    assert hyper.layout() == {"modules": {k: list(v) for k, v in SHAPES.items()}, "rank": 4, "n_blocks": 1}
    torch.testing.assert_close(hyper.lr("layers.2.mlp.down_proj"), torch.tensor(1e-3))


def test_check_updates_accepts_factors_and_dense_and_names_what_is_wrong():
    shapes = {"a": (4, 3)}
    check_updates({"a": (torch.zeros(4, 2), torch.zeros(2, 3))}, shapes)
    check_updates({"a": torch.zeros(4, 3)}, shapes)
    with pytest.raises(UpdateError, match="does not fit"):
        check_updates({"a": torch.zeros(3, 4)}, shapes)
    with pytest.raises(UpdateError, match="does not fit"):
        check_updates({"a": (torch.zeros(4, 2), torch.zeros(1, 3))}, shapes)
    with pytest.raises(UpdateError, match="not an edited module"):
        check_updates({"b": torch.zeros(4, 3)}, shapes)
    with pytest.raises(UpdateError, match="not finite"):
        check_updates({"a": torch.full((4, 3), float("inf"))}, shapes)


def test_an_editor_extended_to_more_modules_keeps_the_trained_ones_and_starts_the_new_at_identity(monkeypatch):
    """benchmarks/extend_editor.py: the trained modules map features exactly as before, with their scalars and
    normalisers; a new module's blocks pass its features through, with the trained modules' mean scalars."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from extend_editor import extend

    torch.manual_seed(0)
    old = {name: shape for name, shape in SHAPES.items() if name != "layers.1.mlp.up_proj"}
    trained = HyperNetwork(old, rank=4, n_blocks=2, lr_init=0.1, lambda_init=-1.0, memory_init=1.0, corpus_init=5.0)
    with torch.no_grad():
        for p in trained.nets.parameters():
            p.normal_()
        trained.log_lr.normal_()
    for name, shape in old.items():
        trained.normalizer(name).update(torch.randn(7, sum(shape)) * 3 + 1)
    wider = HyperNetwork(SHAPES, rank=4, n_blocks=2, lr_init=0.1, lambda_init=-1.0, memory_init=1.0, corpus_init=5.0)
    assert extend(trained, wider) == ["layers.1.mlp.up_proj"]
    for name, (d_in, d_out) in old.items():
        keys, grads = torch.randn(5, d_in), torch.randn(5, d_out)
        for a, b in zip(trained(name, keys, grads), wider(name, keys, grads)):
            assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(wider.lr(name), trained.lr(name))
    keys, grads = torch.randn(5, 6), torch.randn(5, 10)
    edited_keys, edited_grads = wider("layers.1.mlp.up_proj", keys, grads)
    assert torch.allclose(edited_keys, keys, atol=1e-5) and torch.allclose(edited_grads, grads, atol=1e-5)
    assert torch.allclose(wider.lr("layers.1.mlp.up_proj"), trained.log_lr.mean().exp())
