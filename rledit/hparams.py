"""Typed hyper-parameters from composable YAML files, with errors that name the file and the key.

The ``hparams/`` folder holds ``models/*.yaml`` (a ``model:`` section), ``methods/*.yaml`` (a ``method:``
section) and ``experiments/*.yaml``, which name a model file and a method file and override any key::

    defaults: {model: models/smollm2-135m.yaml, method: methods/rledit.yaml}
    method: {lr_init: 1.0}
    experiment: {steps: 20}

A variant of an experiment names it as its ``base`` and says only what differs (every section of the base file,
itself composed with its own ``defaults:``, is taken)::

    defaults: {base: experiments/train-rledit-smollm2-counterfact-split.yaml}
    method: {train: {meta_lr: 0.0}}

Precedence, lowest first: the ``base`` file, the named section of each other ``defaults:`` file (paths relative
to the file or to the ``hparams/`` root), the file's own sections (merged key by key), then dotted command-line
overrides such as ``method.lr_init=1e-3`` or ``model.layers=[18,19]`` (values read as YAML). The result is
validated against dataclasses: ``model``, ``data`` and ``experiment`` against the schemas below, ``method``
against the schema its ``name`` selects (registered with :func:`register_method_hparams`, or the ``hparams_class`` of a method
registered in :mod:`rledit.methods`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from rledit.files import write_text_atomically

SECTIONS = ("model", "method", "data", "experiment")
BASE = "base"  # defaults.base: another experiment file, every section of it
COMMAND_LINE = "command line"
def _shipped_hparams() -> Path:
    """The shipped YAML: the source checkout's hparams/, else the copy an installed wheel carries."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "hparams"
    return checkout if (checkout / "models").is_dir() else package / "_shipped" / "hparams"


HPARAMS_DIR = _shipped_hparams()
_METHOD_FIELD = "rledit.hparams/method"  # field metadata: the schema is chosen by the value's ``name``


class HparamsError(ValueError):
    """A hyper-parameter file, section, key or value that cannot be used; the message names the file and key."""


class _KeyError(Exception):
    """A problem at a dotted key, raised before the file it came from is known."""

    def __init__(self, key: str, text: str, whole_section: bool = False):
        super().__init__(text)
        self.key, self.text, self.whole_section = key, text, whole_section


# ----------------------------------------------------------------------------------------------- schemas
@dataclass
class ModelHparams:
    """The model to edit and its edited MLP modules (see :func:`rledit.targets.resolve_targets`).

    Attributes:
        name: hub id, local directory, or the offline alias ``smollm2-135m``.
        dtype: the weights' dtype once loaded.
        layers: edit layers: ints (negative count from the end) or inclusive ranges like ``"18-21"``;
            None: the architecture's default layers.
        modules: MLP module names edited in each layer, e.g. ``[gate_proj, up_proj]``; None: the default.
        device: ``cpu``, ``cuda``, ``cuda:1``; None: the model loader's choice.
        architecture: the Hugging Face config fields of the model a preset was written for (``model_type`` and
            its sizes), or None. With it, a loaded model of another architecture is refused before any work
            (:meth:`check_model`), and ``rledit plan`` builds the model on the meta device offline.
    """

    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    layers: list[int | str] | None = None
    modules: list[str] | None = None
    device: str | None = None
    architecture: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.architecture is not None and not isinstance(self.architecture.get("model_type"), str):
            raise ValueError("architecture must name its model_type (e.g. model_type: llama)")

    def check_model(self, model: Any) -> None:
        """Raise :class:`HparamsError` unless ``model``'s config has every field of :attr:`architecture` with
        the same value (nothing to check without one)."""
        if not self.architecture:
            return
        config = getattr(model, "config", None)
        wrong = {key: (value, getattr(config, key, None)) for key, value in self.architecture.items()
                 if getattr(config, key, None) != value}
        if wrong:
            details = ", ".join(f"{key} {want!r} (the model has {got!r})" for key, (want, got) in wrong.items())
            raise HparamsError(f"the model preset for {self.name!r} expects {details}: this model has another "
                               "architecture; use its own preset, or drop model.architecture")


@dataclass
class DataHparams:
    """The edit requests: a dataset name known to :mod:`rledit.data` or a record file, its split, a limit."""

    dataset: str = "zsre"
    split: str = "eval"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null (all records), got {self.limit}")


@dataclass
class ExperimentHparams:
    """A lifelong editing run: ``steps`` edit steps of ``batch`` requests, the seed of the request stream,
    when edits are scored (``timing``), how often a ``curve`` is scored, and the protocols (None: all that
    apply to the data)."""

    steps: int = 50
    batch: int = 20
    seed: int = 0
    timing: Literal["end", "immediate", "curve"] = "end"
    eval_every: int = 10
    protocols: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class Hparams:
    """Everything one run needs; ``method`` is the schema registered for ``method.name``.

    ``source`` is the file it was loaded from (not part of equality, :meth:`to_dict` or :meth:`digest`)."""

    model: ModelHparams = field(default_factory=ModelHparams)
    method: Any = field(metadata={_METHOD_FIELD: True})
    data: DataHparams = field(default_factory=DataHparams)
    experiment: ExperimentHparams = field(default_factory=ExperimentHparams)
    source: str | None = field(default=None, compare=False, init=False)

    def to_dict(self) -> dict[str, Any]:
        """The four sections as plain, JSON-ready dicts (what results record)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def digest(self) -> str:
        """A short sha256 of the canonical JSON of :meth:`to_dict`: equal values give equal digests."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------ method registry
_METHOD_SCHEMAS: dict[str, type] = {}
S = TypeVar("S", bound=type)


def register_method_hparams(name: str, schema: S | None = None) -> S | Callable[[S], S]:
    """Register the hparams dataclass of method ``name`` (it must have a ``name: str`` field). Use as a
    decorator, ``@register_method_hparams("ft")``, or call it: ``register_method_hparams("ft", FTHparams)``."""

    def register(cls: S) -> S:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"register_method_hparams({name!r}) expects a dataclass, got {cls!r}")
        if "name" not in {f.name for f in dataclasses.fields(cls)}:
            raise TypeError(f"{cls.__name__} needs a `name: str` field holding the method name {name!r}")
        unsupported = [f"{key}: {tp}" for key, tp in _unsupported_fields(cls)]
        if unsupported:
            raise TypeError(f"{cls.__name__} has field types rledit.hparams cannot validate: {unsupported}; "
                            "use bool, int, float, str, Literal, Optional, list[...], dict[str, ...], dataclasses")
        if _METHOD_SCHEMAS.get(name, cls) is not cls:
            raise ValueError(f"method hparams {name!r} are already registered to {_METHOD_SCHEMAS[name].__name__}")
        _METHOD_SCHEMAS[name] = cls
        return cls

    return register(schema) if schema is not None else register


def registered_method_hparams() -> dict[str, type]:
    """Method name → hparams dataclass, from :func:`register_method_hparams` and :mod:`rledit.methods`."""
    schemas: dict[str, type] = {}
    try:
        from rledit.methods import available_methods, get_method
    except ModuleNotFoundError as exc:  # only a missing methods package is tolerated
        if not (exc.name or "").startswith("rledit.methods"):
            raise
    else:
        for name in available_methods():
            schema = get_method(name).hparams_class
            if schema is not None:
                schemas[name] = schema
    schemas.update(_METHOD_SCHEMAS)
    return schemas


def method_hparams_class(name: str) -> type:
    """The hparams dataclass of method ``name``, or an :class:`HparamsError` listing the registered names."""
    try:
        return _method_schema(name, "method.name")
    except _KeyError as err:
        raise HparamsError(err.text) from None


def _method_schema(name: str, key: str) -> type:
    schemas = _METHOD_SCHEMAS if name in _METHOD_SCHEMAS else registered_method_hparams()
    if name not in schemas:
        raise _KeyError(key, f"{key}: unknown method {name!r}{_did_you_mean(name, schemas)}; registered methods: "
                             f"{sorted(registered_method_hparams())}")
    return schemas[name]


# ------------------------------------------------------------------------------------------ validation
def from_dict(cls: type, data: Any, where: str, key: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, checking every field's type. Unknown keys and ill-typed
    values raise :class:`HparamsError` naming ``where`` (e.g. the file) and the dotted key (below ``key``)."""
    try:
        return _build(cls, data, key)
    except _KeyError as err:
        raise HparamsError(f"{where}: {err.text}") from None


def _build(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        scalar = members[0] in (bool, int, float, str) or typing.get_origin(members[0]) is Literal
        if len(members) == 1 and not scalar:  # a list or dataclass: its own errors name the inner key
            return _build(members[0], value, key)
        for member in members:
            try:
                return _build(member, value, key)
            except _KeyError:
                continue
    elif origin is Literal:
        if any(value == c and type(value) is type(c) for c in args):
            return value
        raise _KeyError(key, f"{key}: expected {_type_name(tp)}, got {value!r}{_did_you_mean(value, args)}")
    elif origin is list and isinstance(value, (list, tuple)):
        return [_build(args[0] if args else Any, item, f"{key}[{i}]") for i, item in enumerate(value)]
    elif origin is dict and isinstance(value, Mapping):
        for name in value:
            if not isinstance(name, str):
                raise _KeyError(key, f"{key}: keys must be strings, got {name!r}")
        return {name: _build(args[1], item, _join(key, name)) for name, item in value.items()}
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, {} if value is None else value, key)
    elif tp in (bool, int, str) and type(value) is tp:  # exact: True is not an int here
        return value
    elif tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
        else:
            if not math.isfinite(number):
                raise _KeyError(key, f"{key}: expected a finite number, got {value!r}")
            return number
    elif not _supported(tp):
        raise _KeyError(key, f"{key}: the schema's type {tp} is not supported by rledit.hparams")
    raise _KeyError(key, f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build_dataclass(cls: type, value: Any, key: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise _KeyError(key, f"{key}: expected a mapping of {cls.__name__} keys, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in value:
        if name not in fields:
            dotted = _join(key, str(name))
            raise _KeyError(dotted, f"unknown key {dotted}{_did_you_mean(name, fields)}; "
                                    f"known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        dotted = _join(key, name)
        if name in value and f.metadata.get(_METHOD_FIELD):
            kwargs[name] = _build_method(value[name], dotted)
        elif name in value:
            kwargs[name] = _build(hints[name], value[name], dotted)
        elif f.metadata.get(_METHOD_FIELD):
            raise _KeyError(dotted, f"missing section {dotted}: name a method file under defaults "
                                    f"(defaults: {{method: methods/NAME.yaml}}) or write {dotted}: {{name: ...}}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _KeyError(dotted, f"missing required key {dotted}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a check in __post_init__; find the key if the message names it
        named = re.match(r"[\w.]+", str(exc))
        culprit = named.group().rsplit(".", 1)[-1] if named else ""
        if culprit in kwargs:
            raise _KeyError(_join(key, culprit), f"{key or cls.__name__}: {exc}") from exc
        raise _KeyError(key, f"{key or cls.__name__}: {exc}", whole_section=True) from exc


def _build_method(value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    if not isinstance(value, Mapping):
        raise _KeyError(key, f"{key}: expected a mapping with the method's name and hparams, got {value!r}")
    name = value.get("name")
    if not isinstance(name, str):
        raise _KeyError(_join(key, "name"), f"{_join(key, 'name')}: say which method these hparams are for "
                                            f"(got {name!r}); registered methods: {sorted(registered_method_hparams())}")
    return _build_dataclass(_method_schema(name, _join(key, "name")), value, key)


def _supported(tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (Any, bool, int, float, str, type(None)) or origin is Literal:
        return True
    if origin in (Union, types.UnionType) or origin is list and args:
        return all(_supported(a) for a in args)
    if origin is dict:
        return args[:1] == (str,) and _supported(args[1])
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and not _unsupported_fields(tp)


def _unsupported_fields(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init and not _supported(hints[f.name])]


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of str to {_type_name(args[1])}"
    if origin is Literal:
        return f"one of {', '.join(map(repr, args))}"
    return getattr(tp, "__name__", str(tp))


def _did_you_mean(name: Any, known: Iterable[Any]) -> str:
    match = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------------------- composition
Provenance = dict[str, str]  # dotted key → the file (or "command line") that last set it


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _locate(path: str | Path) -> Path:
    path = Path(path)
    candidates = (path, HPARAMS_DIR / path, HPARAMS_DIR.parent / path) if not path.is_absolute() else (path,)
    for candidate in candidates:  # "hparams/experiments/x.yaml" works from any working directory
        if candidate.is_file():
            return candidate.resolve()
    raise HparamsError(f"hparams file {str(path)!r} not found (looked in the working directory, {HPARAMS_DIR} "
                       f"and {HPARAMS_DIR.parent})")


def _find_default(ref: str, referrer: Path, what: str) -> Path:
    root = next((p for p in referrer.parents if p.name == "hparams"), HPARAMS_DIR)
    candidates = [Path(ref)] if Path(ref).is_absolute() else [referrer.parent / ref, root / ref]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise HparamsError(f"{what}: file {ref!r} not found; looked for {[str(c) for c in candidates]}")


MAX_YAML_NODES = 100_000  # far above any hparams file; an "alias bomb" expands past it at once


def load_yaml_text(text: str) -> Any:
    """Parse YAML text safely (plain data only) and refuse a document whose aliases expand to more than
    :data:`MAX_YAML_NODES` values (an "alias bomb": nested anchors that make billions of nodes from a few
    hundred bytes), before anything walks the expanded tree."""
    data = yaml.safe_load(text)
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise yaml.YAMLError(f"the document expands to more than {MAX_YAML_NODES} values (nested aliases?)")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else exc
        raise HparamsError(f"{_display(path)}: cannot read it as YAML: {reason}") from None
    if not isinstance(data, (dict, type(None))):
        raise HparamsError(f"{_display(path)}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                           f"got {type(data).__name__}")
    return data or {}


def _compose(path: Path, stack: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Provenance]:
    shown = _display(path)
    if path in stack:
        raise HparamsError(f"{shown}: defaults form a cycle: {' -> '.join(map(_display, stack + (path,)))}")
    raw = _read_yaml(path)
    defaults = raw.pop("defaults", None) or {}
    if not isinstance(defaults, Mapping):
        raise HparamsError(f"{shown}: defaults must map sections to files, e.g. defaults: "
                           f"{{model: models/smollm2-135m.yaml, method: methods/rledit.yaml}}; got {defaults!r}")
    data: dict[str, Any] = {}
    provenance: Provenance = {}
    keys = (BASE, *SECTIONS)
    for section, ref in sorted(defaults.items(), key=lambda item: item[0] != BASE):  # the base first
        if section not in keys:
            raise HparamsError(f"{shown}: unknown key defaults.{section}{_did_you_mean(section, keys)}; "
                               f"known keys: {', '.join(keys)}")
        if not isinstance(ref, str):
            raise HparamsError(f"{shown}: defaults.{section}: expected a file path, got {ref!r}")
        sub_path = _find_default(ref, path, f"{shown}: defaults.{section}")
        sub, sub_provenance = _compose(sub_path, stack + (path,))
        if section != BASE and set(sub) != {section}:
            raise HparamsError(f"{shown}: defaults.{section} names {_display(sub_path)}, which has sections "
                               f"{sorted(sub)}; a file named there must hold exactly one {section}: section")
        _merge(data, provenance, sub, sub_provenance)
    _merge(data, provenance, raw, {key: shown for key in _dotted_keys(raw)})
    return data, provenance


def _merge(base: dict, base_provenance: Provenance, top: Mapping, top_provenance: Provenance, prefix: str = "") -> None:
    for name, value in top.items():
        dotted = _join(prefix, str(name))
        if isinstance(value, Mapping) and isinstance(base.get(name), dict):
            _merge(base[name], base_provenance, value, top_provenance, dotted)
        else:
            base[name] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
            base_provenance.update((k, s) for k, s in top_provenance.items()
                                   if k == dotted or k.startswith(dotted + "."))


def _dotted_keys(data: Mapping, prefix: str = "") -> Iterator[str]:
    for name, value in data.items():
        dotted = _join(prefix, str(name))
        yield dotted
        if isinstance(value, Mapping):
            yield from _dotted_keys(value, dotted)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Dotted ``section.key=value`` strings → a nested dict; values are read as YAML (``[18,19]``, ``1e-3``)."""
    data: dict[str, Any] = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise HparamsError(f"{COMMAND_LINE}: override {text!r} must look like section.key=value, "
                               "e.g. method.lr_init=1e-3 or model.layers=[18,19]")
        try:
            value = load_yaml_text(raw)
        except (yaml.YAMLError, RecursionError) as exc:
            raise HparamsError(f"{COMMAND_LINE}: {key.strip()}: value {raw!r} is not valid YAML: {exc}") from None
        node = data
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise HparamsError(f"{COMMAND_LINE}: {key.strip()}: {'.'.join(parts[:i + 1])} is set to a value "
                                   "by another override, so it has no keys")
        node[parts[-1]] = value
    return data


def _source_of(err: _KeyError, provenance: Provenance, default: str) -> str:
    if err.whole_section:
        sources = [s for k, s in provenance.items() if not err.key or k == err.key or k.startswith(err.key + ".")]
        return ", ".join(dict.fromkeys(sources)) or default
    key = err.key
    while key:
        if key in provenance:
            return provenance[key]
        key = re.sub(r"(\.[^.\[]*|\[\d+\]|^[^.\[]*)$", "", key)
    return default


def _compose_with(path: str | Path, overrides: Iterable[str]) -> tuple[Path, dict[str, Any], Provenance]:
    file = _locate(path)
    data, provenance = _compose(file)
    extra = parse_overrides(overrides)
    _merge(data, provenance, extra, {key: COMMAND_LINE for key in _dotted_keys(extra)})
    return file, data, provenance


# --------------------------------------------------------------------------------------------- loading
def load_hparams(path: str | Path, overrides: Iterable[str] = ()) -> Hparams:
    """Load an experiment file (composed with its ``defaults:``), apply dotted ``overrides``, validate all."""
    file, data, provenance = _compose_with(path, overrides)
    try:
        hparams = _build(Hparams, data, "")
    except _KeyError as err:
        raise HparamsError(f"{_source_of(err, provenance, _display(file))}: {err.text}") from None
    hparams.source = _display(file)
    return hparams


def load_section(path: str | Path, section: str, cls: type | None = None, overrides: Iterable[str] = ()) -> Any:
    """Load and validate one section of a file (composed, with ``overrides``), e.g. ``load_section(p, "model")``.
    ``cls`` defaults to the section's schema in :class:`Hparams` (``method``: chosen by ``method.name``)."""
    file, data, provenance = _compose_with(path, overrides)
    shown = _display(file)
    if cls is None and section not in SECTIONS:
        raise HparamsError(f"{shown}: unknown section {section}{_did_you_mean(section, SECTIONS)}; "
                           f"known sections: {', '.join(SECTIONS)}")
    if section not in data:
        raise HparamsError(f"{shown}: no {section}: section (it has: {', '.join(map(str, data)) or 'nothing'})")
    try:
        if cls is not None:
            return _build(cls, data[section], section)
        if section == "method":
            return _build_method(data[section], section)
        return _build(typing.get_type_hints(Hparams)[section], data[section], section)
    except _KeyError as err:
        raise HparamsError(f"{_source_of(err, provenance, shown)}: {err.text}") from None


def save_hparams(hparams: Hparams, path: str | Path) -> None:
    """Write ``hparams`` as a self-contained YAML file (no ``defaults:``) that loads back to an equal object."""
    path = Path(path)
    origin = f", composed from {hparams.source}" if hparams.source else ""
    header = f"# rledit hparams {hparams.digest()}{origin}\n# load with: rledit.hparams.load_hparams({str(path)!r})\n"
    write_text_atomically(path, header + yaml.safe_dump(hparams.to_dict(), sort_keys=False))
