"""The Editor: one object that holds a model, an editing method and the delta store of applied steps.

    editor = Editor.from_pretrained("smollm2-135m", method="rledit", checkpoint="smollm2-135m-zsre")
    step = editor.apply([{"prompt": "The native language of X is", "target_new": "German"}])
    editor.revert(step)
    editor.save("edited/")            # later: Editor.load("edited/")

Data flows one way (ARCHITECTURE.md): requests → tokens → features → method → deltas → model. The method
never touches the weights; the store applies what it returns. Every step is all-or-nothing: a request that
cannot be tokenised, a method error or a non-finite update raises before anything changes, and the method's
own state (e.g. a lifelong normaliser) is restored too.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import rledit
from rledit.chat import chat_framing, restore_chat_framing, use_chat_template
from rledit.checkpoints import read_checkpoint, shipped_checkpoints, write_checkpoint
from rledit.deltas import DeltaError, DeltaStore
from rledit.files import atomic_directory, file_sha256, read_json, read_safetensors
from rledit.hooks import capture_bytes
from rledit.hparams import HparamsError, from_dict
from rledit.methods import EditMethod, get_method
from rledit.methods.rledit.net import LEARNED_SCALARS
from rledit.targets import EditTarget, TargetError, resolve_targets
from rledit.tokens import context_length
from rledit.types import EditRequest, EditRequestError, EditStep

_log = logging.getLogger("rledit")
UNTRAINED_WARNING = ("rledit", "malmen", "mend")  # hypernetwork methods: without a checkpoint they are untrained
EDITOR_FILE = "editor.json"
EDITOR_FORMAT = "rledit-editor"
EDITOR_VERSIONS = (1, 2)  # 2 adds method_state_sha256 (required from 2 on)
METHOD_STATE_FILE = "method_state.safetensors"
DELTAS_DIR = "deltas"


# hparams override -> the learned tensor a checkpoint may hold
HELD_SCALARS = {init: tensor for tensor, init in LEARNED_SCALARS.values()}


def held_overrides(saved: Any, overrides: Mapping[str, Any]) -> list[str]:
    """The ``*_init`` overrides that a checkpoint's learned scalars make void: it holds its own value of each
    (hparams only initialise a new network's scalars), and the override asks for another."""
    return [key for key, tensor in HELD_SCALARS.items() if key in overrides and tensor in saved.state
            and overrides[key] != saved.hparams.get(key)]


class EditorError(ValueError):
    """An editor that cannot be built, loaded or saved as asked."""


class EditConflictWarning(UserWarning):
    """One step holds edits that contradict each other (the same prompt, different targets)."""


def as_requests(edits: Any) -> list[EditRequest]:
    """Normalise one request or dict, or any iterable of them (a list, a ``datasets.Dataset``, a generator),
    into a non-empty list of EditRequests. Dicts may be in rledit's own format (the EditRequest fields) or in any
    of the dataset formats :mod:`rledit.data.formats` reads."""
    from rledit.data.formats import NATIVE_KEYS, parse_record

    if isinstance(edits, (EditRequest, Mapping)):
        edits = [edits]
    if isinstance(edits, (str, bytes)) or not isinstance(edits, Iterable):
        raise EditRequestError(f"edits must be an EditRequest, a dict, or an iterable of them; got {type(edits).__name__}")
    requests = []
    for i, edit in enumerate(edits):
        try:
            if isinstance(edit, Mapping) and not set(edit) <= NATIVE_KEYS:
                requests.append(parse_record(edit, "record"))
                continue
            requests.append(EditRequest.from_dict(edit))
        except (EditRequestError, TypeError) as exc:
            raise EditRequestError(f"edit {i}: {exc}") from exc
    if not requests:
        raise EditRequestError("no edits given")
    return requests


class Editor:
    """A model, an editing method and the delta store of the steps applied so far.

    Build one with :meth:`from_pretrained` (a model name or a loaded model) or :meth:`load` (a saved editor).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        method: EditMethod,
        targets: Sequence[EditTarget],
        model_name: str = "",
        checkpoint: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.targets = list(targets)
        self.model_name = model_name or getattr(model, "name_or_path", "") or type(model).__name__
        self.checkpoint = checkpoint
        self.method.prepare(model, tokenizer, self.targets)
        self.store = DeltaStore(model, self.targets)
        self.history: dict[int, EditStep] = {}
        self._token = uuid.uuid4().hex  # marks this editor's step handles
        self.merged = False  # merge_and_unload() was called
        self.targets_by_name = {t.name: t for t in self.targets}
        self.memory_limit: int | None = None  # bytes a step may use; None: what the model's device has free

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_pretrained(
        cls,
        model_or_name: str | nn.Module,
        method: str = "rledit",
        hparams: Any = None,
        checkpoint: str | Path | None = None,
        tokenizer: Any = None,
        layers: Sequence[int | str] | None = None,
        modules: Sequence[str] | None = None,
        dtype: str = "float32",
        device: str | None = None,
        chat_template: bool | None = None,
        device_map: str | dict | None = None,
        **model_kwargs: Any,
    ) -> Editor:
        """An editor for a model given by name (hub id, local folder, ``"smollm2-135m"``) or already loaded.

        ``checkpoint`` names a trained editor (a shipped name such as ``"smollm2-135m-zsre"`` or a folder); it
        fixes the method, its hyper-parameters and the edited modules (a dict ``hparams`` then overrides
        top-level keys of the saved ones, e.g. ``{"memory_init": 1.0}``). Otherwise ``hparams`` (a method
        hparams dataclass, a dict of its fields, or None for the defaults) configures ``method``, and
        ``layers``/``modules`` pick the edited modules (None: the architecture's defaults).
        ``chat_template=True`` prompts the model through its tokenizer's chat template for editing, evaluation
        and generation (:mod:`rledit.chat`; False: raw prompts, as the published protocols; None: the
        tokenizer's current mode, raw unless switched). A model given by name is loaded with ``dtype`` and
        ``device`` or ``device_map`` (e.g. ``"auto"``: placed across the available devices by accelerate), and
        any other ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained``; each edited module's deltas
        then live on that module's device. An edited module left on the meta device (offloaded) is refused.
        """
        saved = read_checkpoint(checkpoint) if checkpoint is not None else None
        if saved is not None:
            if method not in ("rledit", saved.method):
                raise EditorError(f"checkpoint {checkpoint} is a {saved.method!r} editor, not {method!r}")
            overrides = dict(hparams) if isinstance(hparams, Mapping) else {}
            fields = getattr(get_method(saved.method).hparams_class, "__dataclass_fields__", {})
            unknown = sorted(set(overrides) - set(fields) - {"name"})
            if unknown:
                raise EditorError(f"hparams {unknown} are not settings of a {saved.method} editor: {sorted(fields)}")
            method, hparams = saved.method, {**saved.hparams, **overrides}
            held = held_overrides(saved, overrides)
            if held:
                warnings.warn(f"checkpoint {checkpoint} holds its learned {held} values, which these overrides do not "
                              "change (they only set the initial value of a new network); set the held values with "
                              "benchmarks/retune_scalars.py", stacklevel=2)
            for given, fixed, what in ((layers, saved.layers, "layers"), (modules, saved.modules, "modules")):
                if given is not None and list(given) != list(fixed):
                    raise EditorError(f"checkpoint {checkpoint} edits {what} {list(fixed)}; {what}={list(given)} "
                                      f"cannot change that (leave {what} out, or train an editor for them)")
            layers, modules = saved.layers, saved.modules
        if isinstance(model_or_name, nn.Module):
            if tokenizer is None:
                raise EditorError("a loaded model needs its tokenizer: Editor.from_pretrained(model, tokenizer=...)")
            if device_map is not None or model_kwargs:
                raise EditorError("device_map and model loading options apply to a model given by name; place a "
                                  "loaded model yourself (AutoModelForCausalLM.from_pretrained(..., device_map=...)) "
                                  "and pass it")
            model, name = model_or_name, getattr(model_or_name, "name_or_path", "")
        else:
            from rledit.models import load_model

            loaded = load_model(str(model_or_name), dtype=dtype, device=device, device_map=device_map,
                                **model_kwargs)
            model, tokenizer, name = loaded.model, loaded.tokenizer, loaded.name
        edit_method = build_method(method, hparams)
        try:
            targets = resolve_targets(model, layers, modules)
        except TargetError as exc:
            if saved is None:
                raise
            raise EditorError(f"checkpoint {checkpoint} was trained for {saved.model!r} (layers {saved.layers}, "
                              f"modules {saved.modules}) and does not fit this model: {exc}") from exc
        offloaded = [t.name for t in targets if t.weight.device.type == "meta"]
        if offloaded:
            raise EditorError(f"edited modules {offloaded} have their weights on the meta device (offloaded to CPU "
                              "or disk by the device map); rledit edits modules whose weights are in memory: give "
                              "them a device in device_map, or set max_memory so that they fit")
        if saved is not None:
            saved.check_targets(targets)
        _log.info("editing %d modules with %s: %s", len(targets), method, ", ".join(t.name for t in targets))
        if saved is None and method in UNTRAINED_WARNING:
            _log.warning("%s without a checkpoint: its hypernetwork is untrained (the gradient-like editor "
                         "d = -lr·|k|²·g); pass checkpoint= for a trained editor (shipped: %s)", method,
                         ", ".join(shipped_checkpoints()) or "none")
        mode = chat_framing(tokenizer)
        if chat_template is not None:
            use_chat_template(tokenizer, chat_template)  # ChatTemplateError before the model is touched
        try:
            editor = cls(model, tokenizer, edit_method, targets, model_name=name,
                         checkpoint=str(checkpoint) if checkpoint is not None else None)
        except BaseException:
            restore_chat_framing(tokenizer, mode)
            raise
        if saved is not None:
            try:
                edit_method.load_state_dict(saved.state)
            except BaseException:
                editor.store.detach()
                restore_chat_framing(tokenizer, mode)
                raise
        return editor

    @classmethod
    def from_hparams(cls, path: str | Path, overrides: Sequence[str] = ()) -> Editor:
        """An editor as an hparams YAML describes it (its ``model`` and ``method`` sections; ``overrides`` are
        dotted ``section.key=value`` strings), e.g. ``Editor.from_hparams("hparams/experiments/x.yaml")``."""
        from rledit.hparams import load_hparams

        hparams = load_hparams(path, overrides)
        return cls.from_model_hparams(hparams.model, hparams.method)

    @classmethod
    def from_model_hparams(cls, model_hparams: Any, method_hparams: Any) -> Editor:
        """An editor for the model a :class:`rledit.hparams.ModelHparams` section describes (a preset of
        ``hparams/models``), editing with ``method_hparams``; a model that does not match the preset's
        ``architecture`` is refused before anything else is set up."""
        from rledit.models import load_model

        loaded = load_model(model_hparams.name, dtype=model_hparams.dtype, device=model_hparams.device)
        model_hparams.check_model(loaded.model)
        editor = cls.from_pretrained(loaded.model, method=method_hparams.name, hparams=method_hparams,
                                     tokenizer=loaded.tokenizer, layers=model_hparams.layers,
                                     modules=model_hparams.modules)
        editor.model_name = loaded.name  # the alias or hub id, as from_pretrained(name) records it
        return editor

    # ------------------------------------------------------------------------------------------ editing
    def apply(self, edits: EditRequest | Mapping | Sequence[EditRequest | Mapping]) -> EditStep:
        """Apply one batch of edits as one step; returns its :class:`EditStep` handle.

        Nothing changes unless the whole step succeeds (bad requests, over-long prompts, a method error or a
        non-finite update raise before the store or the method's state is touched).
        """
        start = time.perf_counter()
        if self.merged:
            raise EditorError("this editor was spent by merge_and_unload(); build a new Editor on the merged model")
        if self.store.is_bypassed:
            raise EditorError("apply inside `with editor.unedited()`: the model is computing as unedited there, so "
                              "the step's features would be wrong; apply outside the block")
        requests = as_requests(edits)
        _check_contradictions(requests)
        batch = self._encode(requests)
        self._check_memory(requests, batch)
        method_state = {k: v.clone() for k, v in self.method.state_dict().items()}
        step_id = None
        try:
            features = self.method.capture(self.model, self.targets, batch) if self.method.uses_features else None
            with torch.no_grad():  # inference: no autograd graph of the solve (methods that optimise enable it)
                updates = self.method.compute_step(self.model, self.tokenizer, self.targets, requests, features)
            step_id = self.store.add(updates)
            self.method.step_applied(step_id)
        except BaseException:
            if step_id is not None:
                self.store.revert(step_id)
            self.method.load_state_dict(method_state)
            raise
        step = EditStep(id=step_id, n_edits=len(requests), ranks=self.store.rank(step_id),
                        seconds=time.perf_counter() - start, editor=self._token)
        self.history[step_id] = step
        return step

    def _encode(self, requests: Sequence[EditRequest]):
        return self.method.edit_batch(self.tokenizer, requests, context_length(self.model))

    def step_bytes(self, requests: EditRequest | Mapping | Sequence[EditRequest | Mapping], batch: Any = None) -> int:
        """The estimated memory (bytes) of applying ``requests`` as one step: feature capture plus the method."""
        batch = batch if batch is not None else self._encode(as_requests(requests))
        capture = capture_bytes(self.model, self.targets, batch) if self.method.uses_features else 0
        return capture + self.method.step_bytes(batch.n_key_tokens, self.targets)

    def _check_memory(self, requests: Sequence[EditRequest], batch: Any) -> None:
        """Refuse, before any work, a step whose estimated memory exceeds :attr:`memory_limit` (default: the
        memory available on the model's device), saying how many edits per step would fit."""
        limit = self.memory_limit if self.memory_limit is not None else available_memory(self.model)
        needed = self.step_bytes(requests, batch)
        if limit is None or needed <= limit:
            return
        fits = len(requests)
        while fits > 1 and self.step_bytes(requests[:fits]) > limit:
            fits //= 2
        raise EditorError(
            f"a step of {len(requests)} edits ({batch.n_answer_tokens} answer tokens) needs about "
            f"{needed / 2**30:.2f} GiB, more than the {limit / 2**30:.2f} GiB available "
            f"({'editor.memory_limit' if self.memory_limit is not None else 'free memory'}); nothing was changed. "
            f"Apply the edits in steps of at most about {fits} edits"
        )

    def revert(self, step: EditStep | int) -> None:
        """Remove one applied step exactly (the other steps stay applied). ``step`` is the handle
        :meth:`apply` returned, or its integer id."""
        if self.merged:
            raise EditorError("merge_and_unload() folded every step into the weights; no step can be reverted")
        if isinstance(step, EditStep):
            if step.editor and step.editor != self._token:
                raise EditorError(f"step {step.id} was applied by another editor; revert it there")
            step_id = step.id
        elif isinstance(step, int) and not isinstance(step, bool):
            step_id = step
        else:
            raise EditorError(f"revert takes the EditStep that apply returned or its int id, not {step!r}")
        self.store.revert(step_id)
        self.method.step_reverted(step_id)
        self.history.pop(step_id, None)

    @property
    def steps(self) -> list[EditStep]:
        """The handles of the applied steps, in order."""
        return [self.history[i] for i in self.store.steps if i in self.history]

    def unedited(self):
        """Context manager: inside it the model behaves as unedited (the store's deltas are bypassed)."""
        self._check_not_merged("the unedited model")
        return self.store.bypassed()

    def _check_not_merged(self, what: str) -> None:
        if self.merged:
            raise EditorError(f"{what} is gone: the edits were merged into the weights (merge_and_unload)")
        if self.store.merged_steps:
            raise EditorError(f"{what} is gone: steps {self.store.merged_steps} were merged into the base weights "
                              "(store.merge()), which now hold them")

    # ------------------------------------------------------------------------------------- free text
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 20, batch_size: int = 32) -> list[str]:
        """The edited model's greedy continuation of each prompt (text, without the prompt), at most
        ``max_new_tokens`` tokens, stopping at the end-of-sequence token."""
        from rledit.eval.generation import greedy_decode

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise EditorError("generate takes a prompt or a non-empty list of non-empty prompts")
        ids = greedy_decode(self.model, self.tokenizer, prompts, [max_new_tokens] * len(prompts), batch_size)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    def compare(self, prompts: str | Sequence[str], max_new_tokens: int = 20) -> list[dict[str, str]]:
        """Greedy continuations of the unedited and the edited model side by side: per prompt
        ``{"prompt", "unedited", "edited"}``. :func:`comparison_table` prints them."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self.unedited():
            before = self.generate(prompts, max_new_tokens)
        after = self.generate(prompts, max_new_tokens)
        return [{"prompt": p, "unedited": b, "edited": a} for p, b, a in zip(prompts, before, after)]

    # ---------------------------------------------------------------------------------- plain models out
    def save_pretrained(self, path: str | Path, merge: bool = True) -> None:
        """Write the edited model and its tokenizer as a plain Hugging Face folder that
        ``AutoModelForCausalLM.from_pretrained`` loads: the edited modules' weights with the deltas folded in
        (rounded once to their dtype). The editor and its model are left as they are. Atomic, like every save.
        """
        if not merge:
            raise EditorError("save_pretrained writes the merged model; for the edits alone use editor.save "
                              "(rledit) or editor.store.export_peft (a peft LoRA adapter)")
        if not hasattr(self.model, "save_pretrained"):
            raise EditorError(f"the model ({type(self.model).__name__}) is not a Hugging Face model")
        paths = {id(m): n for n, m in self.model.named_modules()}
        state = self.model.state_dict()
        for name, weight in self.store.merged_weights().items():
            state[f"{paths[id(self.targets_by_name[name].module)]}.weight"] = weight
        with atomic_directory(Path(path), "pretrained-model") as folder:
            self.model.save_pretrained(folder, state_dict=state)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(folder)

    def merge_and_unload(self) -> nn.Module:
        """Fold every applied step into the model's weights, remove the store's hooks and return the model (a
        plain model from then on, as peft's ``merge_and_unload``). The editor is spent: apply, revert, unedited
        and references raise afterwards."""
        self._check_not_merged("merge_and_unload")
        self.store.merge()
        self.store.detach()
        self.history.clear()
        self.merged = True
        return self.model

    def evaluate(self, requests: Sequence[EditRequest | Mapping], protocols: Sequence[str] | None = None,
                 references: Any = None, batch_size: int = 32):
        """Score the current (edited) model on ``requests`` with ``rledit.eval`` (never mutates anything).

        Locality compares against the unedited model: its references are computed with the deltas bypassed
        unless given (compute them once with :meth:`references` when evaluating repeatedly).
        """
        from rledit.eval import evaluate

        requests = as_requests(requests)
        if references is None:
            references = self.references(requests, protocols, batch_size=batch_size)
        return evaluate(self.model, self.tokenizer, requests, protocols=protocols, references=references,
                        batch_size=batch_size)

    def references(self, requests: Sequence[EditRequest | Mapping], protocols: Sequence[str] | None = None,
                   batch_size: int = 32):
        """The unedited model's outputs on the locality prompts of ``requests``, for :meth:`evaluate`."""
        from rledit.eval import compute_references

        with self.unedited():
            return compute_references(self.model, self.tokenizer, as_requests(requests), protocols=protocols,
                                      batch_size=batch_size)

    # ---------------------------------------------------------------------------------- save and load
    def save(self, path: str | Path) -> None:
        """Save the applied steps, the method's state and how to rebuild this editor, atomically."""
        description = {
            "format": EDITOR_FORMAT,
            "version": 2,
            "rledit_version": rledit.__version__,
            "model": _portable_model_name(self.model_name),
            "method": self.method.name,
            "hparams": method_hparams_dict(self.method),
            "checkpoint": self.checkpoint,
            "targets": [[t.name, t.d_in, t.d_out] for t in self.targets],
            "layers": sorted({t.layer for t in self.targets}),
            "modules": list(dict.fromkeys(t.name.rsplit(".", 1)[-1] for t in self.targets)),
            "steps": [s.to_dict() for s in self.steps],
            "chat_template": chat_framing(self.tokenizer) is not None,
        }
        with atomic_directory(Path(path), "editor") as folder:
            self.store.save(folder / DELTAS_DIR)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.method.state_dict().items()},
                      str(folder / METHOD_STATE_FILE))
            description["method_state_sha256"] = file_sha256(folder / METHOD_STATE_FILE)
            (folder / EDITOR_FILE).write_text(json.dumps(description, indent=1))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, tokenizer: Any = None,
             dtype: str = "float32", device: str | None = None, check_weights: bool = True) -> Editor:
        """Rebuild a saved editor (loading its model by name unless ``model``/``tokenizer`` are given).

        Everything is checked (the description's format and version, the method state's and the deltas'
        sha256, the model's layout, and with ``check_weights`` that the edited modules' base weights are the
        ones the edits were made on); on any problem an :class:`EditorError` names it and a given ``model`` is
        left exactly as it was.
        """
        folder = Path(path)
        description, state = _read_saved_editor(folder)
        editor = cls.from_pretrained(
            model if model is not None else description["model"], method=description["method"],
            hparams=description["hparams"], tokenizer=tokenizer, layers=description["layers"],
            modules=description["modules"], dtype=dtype, device=device,
            chat_template=bool(description.get("chat_template", False)),
        )
        try:
            saved_targets = [list(t) for t in description["targets"]]
            current = [[t.name, t.d_in, t.d_out] for t in editor.targets]
            if saved_targets != current:
                raise EditorError(f"{folder} was saved for modules {saved_targets}, this model has {current}")
            editor.method.load_state_dict(state)
            editor.store.load_into(folder / DELTAS_DIR, check_weights=check_weights)
            editor.checkpoint = description.get("checkpoint")
            for s in description["steps"]:
                editor.history[s["id"]] = EditStep(id=s["id"], n_edits=s["n_edits"], ranks=dict(s["ranks"]),
                                                   seconds=s["seconds"], editor=editor._token)
        except BaseException as exc:
            editor.store.detach()
            if isinstance(exc, EditorError):
                raise
            if isinstance(exc, (DeltaError, ValueError, KeyError, TypeError, RuntimeError)):
                raise EditorError(f"{folder} cannot be loaded into this model: {exc}") from exc
            raise
        return editor

    def save_checkpoint(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
        """Save the method's trained state (not the applied steps) as a reusable editor checkpoint."""
        write_checkpoint(path, self.method, self.targets, self.model_name, extra or {})


def build_method(name: str, hparams: Any = None) -> EditMethod:
    """Instantiate the registered method ``name`` with ``hparams`` (dataclass, dict of fields, or None)."""
    method_class = get_method(name)
    schema = method_class.hparams_class
    if hparams is None or schema is None:
        return method_class() if schema is None else method_class(schema())
    if isinstance(hparams, Mapping):  # the same validation as a YAML file's method section
        fields = {k: v for k, v in hparams.items() if k != "name"}
        if "name" in schema.__dataclass_fields__:
            fields["name"] = name
        try:
            hparams = from_dict(schema, fields, where=f"hparams for method {name!r}")
        except HparamsError as exc:
            raise EditorError(str(exc)) from exc
    elif not isinstance(hparams, schema):
        raise EditorError(f"method {name!r} takes {schema.__name__} hparams, got {type(hparams).__name__}")
    return method_class(hparams)


def method_hparams_dict(method: EditMethod) -> dict[str, Any]:
    """The method's hyper-parameters as a JSON-ready dict (empty when it has none)."""
    from dataclasses import asdict, is_dataclass

    hparams = getattr(method, "hparams", None)
    return asdict(hparams) if is_dataclass(hparams) else {}



def _read_saved_editor(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checked description (``editor.json``) and method state of a saved editor, or an EditorError."""
    try:
        description = read_json(folder / EDITOR_FILE)
        if not isinstance(description, dict) or description.get("format") != EDITOR_FORMAT:
            raise ValueError(f"{EDITOR_FILE} is not an rledit editor description")
        version = description.get("version")
        if version not in EDITOR_VERSIONS:
            raise ValueError(f"{EDITOR_FILE} has format version {version!r}; this rledit reads {EDITOR_VERSIONS}")
        expected = {"model": str, "method": str, "hparams": dict, "layers": list, "modules": list,
                    "targets": list, "steps": list}
        wrong = [k for k, kind in expected.items() if not isinstance(description.get(k), kind)]
        wrong += [] if isinstance(description.get("chat_template", False), bool) else ["chat_template"]
        if wrong:
            raise ValueError(f"{EDITOR_FILE} has missing or mistyped fields {wrong}")
        malformed = [step for step in description["steps"] if not _is_step_entry(step)]
        if malformed:
            raise ValueError(f"{EDITOR_FILE} has a malformed step entry {str(malformed[0])[:80]}")
        digest = description.get("method_state_sha256")
        if version >= 2 and not isinstance(digest, str):
            raise ValueError(f"{EDITOR_FILE} has no method_state_sha256")
        state = read_safetensors(folder / METHOD_STATE_FILE, digest)
    except ValueError as exc:  # FileFormatError is a ValueError
        raise EditorError(f"{folder} is not a readable saved editor: {exc}") from exc
    return description, state


def _is_step_entry(step: Any) -> bool:
    return (isinstance(step, dict) and isinstance(step.get("id"), int) and isinstance(step.get("n_edits"), int)
            and isinstance(step.get("ranks"), dict) and isinstance(step.get("seconds"), (int, float)))


def available_memory(model: nn.Module) -> int | None:
    """Free memory (bytes) on the device of ``model``'s parameters: CUDA's free memory, or on CPU the
    kernel's MemAvailable (Linux); None when it cannot be told."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_contradictions(requests: Sequence[EditRequest]) -> None:
    """Warn when one step asks the same prompt for two different targets (CounterFact's multi-valued
    relations do): both edits are applied, so the model is pushed toward both and at most one can be its
    answer; the later one in the step is not preferred."""
    seen: dict[str, tuple[int, str]] = {}
    for i, request in enumerate(requests):
        earlier = seen.setdefault(request.prompt, (i, request.target_new))
        if earlier[1] != request.target_new:
            warnings.warn(f"edits {earlier[0]} and {i} of this step ask the same prompt {request.prompt!r} for "
                          f"{earlier[1]!r} and {request.target_new!r}: both are applied and at most one can hold; "
                          "put them in different steps (the later step then wins) or keep one",
                          EditConflictWarning, stacklevel=3)


def _portable_model_name(name: str) -> str:
    """The model as a save records it: a local folder as an absolute path (so that the save loads from any
    working directory), anything else (alias, hub id) as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if name and (path / "config.json").is_file() else name


def shorten(text: str, width: int) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``width`` characters with "…"."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def comparison_table(rows: Sequence[Mapping[str, str]], width: int = 40) -> str:
    """A plain-text table of :meth:`Editor.compare` rows (greedy text of the unedited and edited model)."""
    lines = [f"{'prompt':<{width}}  {'unedited (greedy)':<{width}}  {'edited (greedy)':<{width}}"]
    lines += [f"{shorten(r['prompt'], width):<{width}}  {shorten(r['unedited'], width):<{width}}  "
              f"{shorten(r['edited'], width):<{width}}" for r in rows]
    return "\n".join(lines)
