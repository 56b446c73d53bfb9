"""Typed, composable YAML hyper-parameters: validation, composition, overrides, round trips, shipped files."""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from rledit.hparams import (
    HPARAMS_DIR,
    DataHparams,
    ExperimentHparams,
    Hparams,
    HparamsError,
    ModelHparams,
    from_dict,
    load_hparams,
    load_section,
    method_hparams_class,
    parse_overrides,
    register_method_hparams,
    registered_method_hparams,
    save_hparams,
)

try:  # the method packages register their schemas on import
    import rledit.methods  # noqa: F401
except ModuleNotFoundError as exc:
    if not (exc.name or "").startswith("rledit.methods"):
        raise


@dataclass
class ToyInner:
    depth: int = 2
    width: int = 8


@register_method_hparams("toy-sgd")
@dataclass
class ToySGDHparams:
    name: str = "toy-sgd"
    lr_init: float = 0.1
    steps: int = 3
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)
    inner: ToyInner = field(default_factory=ToyInner)
    note: str | None = None
    maybe_mode: Literal["a", "b"] | None = None

    def __post_init__(self):
        if self.lr_init <= 0:
            raise ValueError(f"lr_init must be > 0, got {self.lr_init}")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A small hparams/ folder: one model file, one method file, one experiment composing them."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "hparams"
    write(root / "models" / "m.yaml", "model: {name: tiny, dtype: bfloat16, layers: [1, 2], modules: [up_proj]}\n")
    write(root / "methods" / "toy.yaml",
          "method:\n  name: toy-sgd\n  lr_init: 0.5\n  steps: 7\n  tags: [x]\n  inner: {depth: 3, width: 16}\n")
    write(root / "experiments" / "e.yaml",
          "defaults: {model: models/m.yaml, method: ../methods/toy.yaml}\n"
          "method: {lr_init: 0.25, inner: {depth: 4}}\nexperiment: {steps: 5, timing: curve}\n")
    return root


# ------------------------------------------------------------------------------------------ validation
def test_from_dict_converts_types():
    hp = from_dict(ToySGDHparams, {"name": "toy-sgd", "lr_init": "1e-4", "steps": 4, "flag": True, "mode": "b",
                                   "tags": ["p", "q"], "scales": {"a": 2}, "inner": {"width": 3}, "note": None},
                   "x.yaml", "method")
    assert hp == ToySGDHparams(lr_init=1e-4, steps=4, flag=True, mode="b", tags=["p", "q"], scales={"a": 2.0},
                               inner=ToyInner(depth=2, width=3), note=None)
    assert type(hp.lr_init) is float and type(hp.scales["a"]) is float
    assert from_dict(ToySGDHparams, {"lr_init": 3}, "x.yaml").lr_init == 3.0
    assert from_dict(ModelHparams, {"layers": [18, "20-21"]}, "x.yaml").layers == [18, "20-21"]


@pytest.mark.parametrize("data, message", [
    ({"lr_init": "abc"}, "x.yaml: method.lr_init: expected float, got 'abc'"),
    ({"lr_init": True}, "x.yaml: method.lr_init: expected float, got True"),
    ({"steps": True}, "x.yaml: method.steps: expected int, got True"),
    ({"steps": 2.5}, "x.yaml: method.steps: expected int, got 2.5"),
    ({"flag": "yes"}, "x.yaml: method.flag: expected bool, got 'yes'"),
    ({"tags": "x"}, "x.yaml: method.tags: expected a list of str, got 'x'"),
    ({"tags": ["x", 3]}, "x.yaml: method.tags[1]: expected str, got 3"),
    ({"scales": {"a": "big"}}, "x.yaml: method.scales.a: expected float, got 'big'"),
    ({"inner": {"depth": 1.5}}, "x.yaml: method.inner.depth: expected int, got 1.5"),
    ({"inner": 3}, "x.yaml: method.inner: expected a mapping of ToyInner keys, got 3"),
    ({"note": 5}, "x.yaml: method.note: expected str or null, got 5"),
    ({"mode": "c"}, "x.yaml: method.mode: expected one of 'a', 'b', got 'c'"),
    ({"mode": None}, "x.yaml: method.mode: expected one of 'a', 'b', got None"),
    ({"maybe_mode": "c"}, "x.yaml: method.maybe_mode: expected one of 'a', 'b' or null, got 'c'"),
    ({"lr_init": 0}, "x.yaml: method: lr_init must be > 0, got 0.0"),
])
def test_from_dict_rejects_ill_typed_values(data, message):
    with pytest.raises(HparamsError) as err:
        from_dict(ToySGDHparams, data, "x.yaml", "method")
    assert str(err.value) == message


def test_unknown_key_names_file_key_and_suggestion():
    with pytest.raises(HparamsError) as err:
        from_dict(ToySGDHparams, {"lrr_init": 1.0}, "hparams/methods/toy.yaml", "method")
    assert str(err.value) == (
        "hparams/methods/toy.yaml: unknown key method.lrr_init (did you mean lr_init?); "
        "known keys: name, lr_init, steps, flag, mode, tags, scales, inner, note, maybe_mode")
    with pytest.raises(HparamsError, match=r"x.yaml: unknown key method.inner.dpth \(did you mean depth\?\)"):
        from_dict(ToySGDHparams, {"inner": {"dpth": 1}}, "x.yaml", "method")


@pytest.mark.parametrize("timing", ["end", "immediate", "curve"])
def test_literal_choices_accept_each_choice(timing):
    assert from_dict(ExperimentHparams, {"timing": timing}, "x.yaml").timing == timing


def test_literal_choices_reject_others_with_a_suggestion():
    with pytest.raises(HparamsError) as err:
        from_dict(ModelHparams, {"dtype": "bfloat"}, "m.yaml", "model")
    assert str(err.value) == ("m.yaml: model.dtype: expected one of 'float32', 'bfloat16', 'float16', "
                              "got 'bfloat' (did you mean bfloat16?)")


def test_schema_range_checks():
    with pytest.raises(HparamsError, match="experiment: batch must be >= 1, got 0"):
        from_dict(ExperimentHparams, {"batch": 0}, "x.yaml", "experiment")
    with pytest.raises(HparamsError, match="data: limit must be >= 1 or null"):
        from_dict(DataHparams, {"limit": 0}, "x.yaml", "data")


# ------------------------------------------------------------------------------------ method registry
def test_method_schema_is_chosen_by_name():
    hp = from_dict(Hparams, {"method": {"name": "toy-sgd", "steps": 9}}, "x.yaml")
    assert hp.method == ToySGDHparams(steps=9)
    assert hp.model == ModelHparams() and hp.data == DataHparams() and hp.experiment == ExperimentHparams()
    assert method_hparams_class("toy-sgd") is ToySGDHparams
    assert registered_method_hparams()["toy-sgd"] is ToySGDHparams


def test_unknown_or_missing_method_name_lists_registered_names():
    with pytest.raises(HparamsError) as err:
        from_dict(Hparams, {"method": {"name": "toy-sdg"}}, "x.yaml")
    assert "x.yaml: method.name: unknown method 'toy-sdg' (did you mean toy-sgd?); registered methods: [" in str(
        err.value)
    assert "'toy-sgd'" in str(err.value)
    with pytest.raises(HparamsError, match=r"x.yaml: method.name: say which method .*'toy-sgd'"):
        from_dict(Hparams, {"method": {"lr_init": 1.0}}, "x.yaml")
    with pytest.raises(HparamsError, match="x.yaml: missing section method"):
        from_dict(Hparams, {"model": {}}, "x.yaml")
    with pytest.raises(HparamsError, match=r"x.yaml: unknown key modle \(did you mean model\?\)"):
        from_dict(Hparams, {"modle": {}, "method": {"name": "toy-sgd"}}, "x.yaml")


def test_register_method_hparams_checks_the_schema():
    @dataclass
    class Nameless:
        lr: float = 1.0

    @dataclass
    class WithTuple:
        name: str = "t"
        sizes: tuple = (1, 2)

    with pytest.raises(TypeError, match="expects a dataclass"):
        register_method_hparams("toy-bad", dict)
    with pytest.raises(TypeError, match="needs a `name: str` field"):
        register_method_hparams("toy-bad", Nameless)
    with pytest.raises(TypeError, match="cannot validate.*sizes"):
        register_method_hparams("toy-bad", WithTuple)
    @dataclass
    class Impostor:
        name: str = "toy-sgd"

    with pytest.raises(ValueError, match="already registered to ToySGDHparams"):
        register_method_hparams("toy-sgd", Impostor)
    assert register_method_hparams("toy-sgd", ToySGDHparams) is ToySGDHparams  # re-registering is harmless


def test_methods_registered_in_rledit_methods_are_found(tmp_path):
    methods = pytest.importorskip("rledit.methods")
    if "rledit" not in methods.available_methods():
        pytest.skip("no rledit method registered")
    file = write(tmp_path / "r.yaml", "method: {name: rledit}\n")
    hp = load_section(file, "method")
    assert type(hp) is methods.get_method("rledit").hparams_class


# ----------------------------------------------------------------------------------------- composition
def test_precedence_defaults_then_file_then_overrides(tree):
    hp = load_hparams("hparams/experiments/e.yaml")
    assert hp.model == ModelHparams(name="tiny", dtype="bfloat16", layers=[1, 2], modules=["up_proj"])
    # from the method file: steps, tags, inner.width; from the experiment file: lr_init, inner.depth
    assert hp.method == ToySGDHparams(lr_init=0.25, steps=7, tags=["x"], inner=ToyInner(depth=4, width=16))
    assert hp.experiment == ExperimentHparams(steps=5, timing="curve")
    assert hp.data == DataHparams()
    assert hp.source == str(Path("hparams/experiments/e.yaml"))

    hp = load_hparams(tree / "experiments" / "e.yaml",
                      ["method.lr_init=1e-3", "model.layers=[18,19]", "experiment.steps=2", "method.inner.width=4"])
    assert hp.method == ToySGDHparams(lr_init=1e-3, steps=7, tags=["x"], inner=ToyInner(depth=4, width=4))
    assert hp.model.layers == [18, 19] and hp.model.dtype == "bfloat16"
    assert hp.experiment.steps == 2 and hp.experiment.timing == "curve"


def test_a_variant_names_its_base_experiment_and_says_only_what_differs(tree):
    write(tree / "experiments" / "variant.yaml", "defaults: {base: experiments/e.yaml}\n"
                                                 "method: {inner: {width: 2}}\nexperiment: {steps: 9}\n")
    base, variant = load_hparams(tree / "experiments" / "e.yaml"), load_hparams(tree / "experiments" / "variant.yaml")
    assert variant.model == base.model and variant.experiment.timing == base.experiment.timing
    assert variant.method == dataclasses.replace(base.method, inner=ToyInner(depth=4, width=2))
    assert variant.experiment.steps == 9
    # a section default still wins over the base, and the variant's own keys over both
    write(tree / "models" / "m2.yaml", "model: {name: other}\n")
    write(tree / "experiments" / "variant.yaml", "defaults: {model: models/m2.yaml, base: experiments/e.yaml}\n")
    assert load_hparams(tree / "experiments" / "variant.yaml").model.name == "other"
    write(tree / "experiments" / "variant.yaml", "defaults: {base: experiments/variant.yaml}\n")
    with pytest.raises(HparamsError, match="defaults form a cycle"):
        load_hparams(tree / "experiments" / "variant.yaml")


def test_errors_name_the_file_the_bad_key_came_from(tree):
    write(tree / "methods" / "toy.yaml", "method: {name: toy-sgd, stepz: 3}\n")
    with pytest.raises(HparamsError, match=r"^hparams/methods/toy.yaml: unknown key method.stepz \(did you mean steps"):
        load_hparams("hparams/experiments/e.yaml")
    write(tree / "methods" / "toy.yaml", "method: {name: toy-sgd, steps: many}\n")
    with pytest.raises(HparamsError, match="^hparams/methods/toy.yaml: method.steps: expected int, got 'many'$"):
        load_hparams("hparams/experiments/e.yaml")
    write(tree / "methods" / "toy.yaml", "method: {name: toy-sgd}\n")
    write(tree / "experiments" / "e.yaml",
          "defaults: {model: models/m.yaml, method: methods/toy.yaml}\nmodel: {layers: 18}\n")
    with pytest.raises(HparamsError, match="^hparams/experiments/e.yaml: model.layers: expected a list of"):
        load_hparams("hparams/experiments/e.yaml")
    with pytest.raises(HparamsError, match="^command line: unknown key experiment.stpes"):
        load_hparams("hparams/experiments/e.yaml", ["model.layers=[1]", "experiment.stpes=5"])
    with pytest.raises(HparamsError, match="^command line: model.layers\\[1\\]: expected int or str, got 2.5$"):
        load_hparams("hparams/experiments/e.yaml", ["model.layers=[1, 2.5]"])
    with pytest.raises(HparamsError, match="^command line: experiment: steps must be >= 1, got 0$"):
        load_hparams("hparams/experiments/e.yaml", ["model.layers=[1]", "experiment.steps=0"])


def test_defaults_errors(tree):
    cases = {
        "defaults: {method: methods/none.yaml}\n": "hparams/experiments/e.yaml: defaults.method: file 'methods/none.yaml' "
                                                   "not found",
        "defaults: {methd: methods/toy.yaml}\n": r"unknown key defaults.methd \(did you mean method\?\)",
        "defaults: {model: methods/toy.yaml}\n": r"defaults.model names hparams/methods/toy.yaml, which has sections "
                                                 r"\['method'\]",
        "defaults: [models/m.yaml]\n": "defaults must map sections to files",
        "defaults: {model: experiments/e.yaml}\n": "defaults form a cycle",
        "method: [1, 2\n": "hparams/experiments/e.yaml: cannot read it as YAML",
        "- 1\n": "expected a mapping of sections",
    }
    for text, message in cases.items():
        write(tree / "experiments" / "e.yaml", text)
        with pytest.raises(HparamsError, match=message):
            load_hparams("hparams/experiments/e.yaml")
    with pytest.raises(HparamsError, match="hparams file 'nowhere.yaml' not found"):
        load_hparams("nowhere.yaml")


def test_parse_overrides():
    assert parse_overrides(["method.lr_init=1e-3", "model.layers=[18,19]", "experiment.steps=5",
                            "method.train.batch=4", "model.device=", "data.dataset=a=b"]) == {
        "method": {"lr_init": "1e-3", "train": {"batch": 4}},
        "model": {"layers": [18, 19], "device": None},
        "experiment": {"steps": 5},
        "data": {"dataset": "a=b"},
    }
    for bad in ["method.lr_init", "method..lr=1", "=3"]:
        with pytest.raises(HparamsError, match="^command line: override .* must look like section.key=value"):
            parse_overrides([bad])
    with pytest.raises(HparamsError, match="^command line: model.layers: value '\\[1,' is not valid YAML"):
        parse_overrides(["model.layers=[1,"])
    with pytest.raises(HparamsError, match="method.train is set to a value by another override"):
        parse_overrides(["method.train=3", "method.train.batch=4"])


def test_load_section(tree):
    assert load_section("hparams/models/m.yaml", "model").layers == [1, 2]
    assert load_section(tree / "methods" / "toy.yaml", "method", overrides=["method.steps=1"]).steps == 1
    assert load_section(tree / "methods" / "toy.yaml", "method", cls=ToySGDHparams).lr_init == 0.5
    with pytest.raises(HparamsError, match=r"models/m.yaml: no method: section \(it has: model\)"):
        load_section(tree / "models" / "m.yaml", "method")
    with pytest.raises(HparamsError, match=r"unknown section modle \(did you mean model\?\)"):
        load_section(tree / "models" / "m.yaml", "modle")


# ------------------------------------------------------------------------------------ saving, hashing
def test_save_and_load_round_trip(tree, tmp_path):
    hp = load_hparams("hparams/experiments/e.yaml", ["method.scales={a: 0.5}", "method.note=hi", "data.limit=7"])
    saved = tmp_path / "out" / "hp.yaml"
    save_hparams(hp, saved)
    again = load_hparams(saved)
    assert again == hp and again.digest() == hp.digest()
    assert again.source == str(Path("out/hp.yaml")) and hp.digest() in saved.read_text().splitlines()[0]
    assert json.loads(json.dumps(hp.to_dict())) == hp.to_dict()


def test_digest_is_the_hash_of_canonical_json():
    hp = from_dict(Hparams, {"method": {"name": "toy-sgd", "lr_init": "1e-4"}, "experiment": {"seed": 3}}, "x")
    expected = {
        "model": {"name": "smollm2-135m", "dtype": "float32", "layers": None, "modules": None, "device": None,
                  "architecture": None},
        "method": {"name": "toy-sgd", "lr_init": 0.0001, "steps": 3, "flag": False, "mode": "a", "tags": [],
                   "scales": {}, "inner": {"depth": 2, "width": 8}, "note": None, "maybe_mode": None},
        "data": {"dataset": "zsre", "split": "eval", "limit": None},
        "experiment": {"steps": 50, "batch": 20, "seed": 3, "timing": "end", "eval_every": 10, "protocols": None},
    }
    assert hp.to_dict() == expected
    canonical = json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()
    assert hp.digest() == hashlib.sha256(canonical).hexdigest()[:12]
    # the same values written differently hash the same; any change hashes differently
    same = from_dict(Hparams, {"experiment": {"seed": 3}, "method": {"lr_init": 0.0001, "name": "toy-sgd"}}, "y")
    assert same.digest() == hp.digest()
    assert from_dict(Hparams, {"method": {"name": "toy-sgd", "lr_init": 2e-4}}, "x").digest() != hp.digest()


# ------------------------------------------------------------------------------------ the shipped YAML
SHIPPED = sorted(p for folder in ("models", "methods", "experiments") for p in (HPARAMS_DIR / folder).glob("*.yaml"))


def test_there_are_shipped_files_and_none_outside_the_known_folders():
    assert HPARAMS_DIR / "models" / "smollm2-135m.yaml" in SHIPPED
    assert sorted(HPARAMS_DIR.glob("*.yaml")) == [], "put YAML files in hparams/models, methods or experiments"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(HPARAMS_DIR)))
def test_shipped_yaml_is_valid(path):
    assert path.read_text().startswith("#"), f"{path}: start with a comment giving the command that runs it"
    if path.parent.name == "experiments":
        hp = load_hparams(path)
        assert hp.source and len(hp.digest()) == 12
        return
    sections = [s for s in yaml.safe_load(path.read_text()) if s != "defaults"]
    expected = {"models": ["model"], "methods": ["method"]}[path.parent.name]
    assert sections == expected, f"{path}: a {path.parent.name[:-1]} file holds only a {expected[0]}: section"
    load_section(path, expected[0])


def test_shipped_model_file_resolves_from_the_hparams_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: found under HPARAMS_DIR
    model = load_section("models/smollm2-135m.yaml", "model")
    assert model == ModelHparams(layers=[18, 19, 20, 21], modules=["gate_proj", "up_proj"])
