"""The lifelong benchmark: one seeded stream of T steps x B edits, one method, one results file.

:func:`run_benchmark` builds an :class:`rledit.Editor` for a method on an already loaded model, applies the
stream with :func:`rledit.eval.run_lifelong`, and returns the results as a JSON-ready dict: the headline
protocol's metrics (``zsre-token-acc@2`` for zsRE when it was run, else ``zsre-token-acc@1``; ``cf-prob@1`` for
CounterFact), every other applicable protocol under ``metrics_by_protocol``, the unedited model's scores, and the seconds of setup, applying and
evaluating. ``floor_step_median`` is one plain forward+backward of the model (LM loss on the step's
prompt+target rows, gradients for every weight, as in ordinary training), measured on the same step's rows
right before that step is applied, so that the ratio ``apply_step_median / floor_step_median`` is immune to
the machine's speed and load.
"""

from __future__ import annotations

import json
import platform
import random
import resource
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import rledit
from rledit.chat import chat_framing
from rledit.data import EditStream, dataset_file, load_requests
from rledit.editor import Editor, method_hparams_dict
from rledit.eval import LifelongProgress, LifelongResult, run_lifelong
from rledit.eval.general import TASKS as GENERAL_TASKS
from rledit.eval.general import general_probe
from rledit.files import atomic_directory, atomic_file, check_replaceable, command_line, file_sha256
from rledit.methods import get_method
from rledit.targets import architecture_of
from rledit.tokens import answer_logits, context_length, encode
from rledit.types import EditRequest

HEADLINE = {"zsre": ("zsre-token-acc@2", "zsre-token-acc@1"), "counterfact": ("cf-prob@1",)}  # first one run
PROGRESS_KIND = "bench-progress"  # the marker kind of a run's saved progress folder
PROGRESS_FILE = "progress.pt"


@dataclass
class BenchSpec:
    """What one benchmark run edits: method (and its trained checkpoint or hparams), data, schedule, timing."""

    method: str
    data: str = "zsre"
    split: str = "eval"
    steps: int = 50
    batch: int = 20
    timing: str = "end"
    seed: int = 0
    eval_every: int = 10
    checkpoint: str | None = None
    hparams: Any = None  # the method's hparams dataclass or dict (None: defaults)
    layers: Sequence[int | str] | None = None  # edited layers/modules (ignored with a checkpoint)
    modules: Sequence[str] | None = None
    label: str | None = None  # the row's name in tables (default: the method, with the checkpoint)
    protocols: Sequence[str] | None = None
    general: bool = False  # also score general ability (rledit.eval.general) unedited, at the end, on the curve
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The row label: ``label``, else ``method`` (``method:checkpoint`` for a trained editor)."""
        return self.label or (f"{self.method}:{self.checkpoint}" if self.checkpoint else self.method)


def check_spec(spec: BenchSpec) -> list[EditRequest]:
    """Every check that can fail before work starts: method name, data, schedule size, subjects of the stream.

    Returns the requests of the stream's source. Raises ``ValueError``/``DataError`` with what to change.
    """
    method_class = get_method(spec.method)
    requests = load_requests(spec.data, spec.split)
    EditStream(requests, spec.steps, spec.batch, spec.seed)  # T×B larger than the data: DataError
    if getattr(method_class, "requires_subject", False):
        method_class.check_requests(EditStream(requests, spec.steps, spec.batch, spec.seed).edits)
    return requests


def dataset_kind(requests: Sequence[EditRequest]) -> str:
    """``counterfact`` when the records carry an old target and neighbourhood prompts, else ``zsre``."""
    kinds = {item.kind for r in requests for item in r.locality}
    return "counterfact" if all(r.ground_truth for r in requests) and kinds == {"neighborhood"} else "zsre"


def floor_seconds(model: torch.nn.Module, tokenizer, requests: Sequence[EditRequest]) -> float:
    """Seconds of one ordinary forward+backward (all weights get gradients) on the step's prompt+target rows."""
    batch = encode(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                   max_length=context_length(model))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        start = time.perf_counter()
        logits = answer_logits(model, batch)
        labels = batch.labels[batch.answer_mask].to(logits.device)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        if logits.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)


def run_benchmark(model: torch.nn.Module, tokenizer, model_name: str, spec: BenchSpec,
                  requests: Sequence[EditRequest] | None = None, progress: bool = True,
                  baseline: Any = None, general_unedited: dict[str, float] | None = None,
                  progress_dir: str | Path | None = None, resume: bool = False, save_every: float = 600.0,
                  ) -> tuple[dict[str, Any], LifelongResult]:
    """Run one lifelong sequence of ``spec`` on ``model`` (left as it was afterwards).

    Returns the summary (a JSON-ready dict) and the full result with its per-example records. ``baseline``:
    the ``.baseline`` of an earlier result on the same stream and protocols, to skip scoring the unedited model
    again; ``general_unedited``: likewise the unedited model's general-ability scores (``spec.general``).

    With ``progress_dir`` the run's progress (the edited editor, the scores and timings so far, the random
    state) is saved there atomically after a step whenever ``save_every`` seconds have passed since the last
    save (:func:`discard_progress` removes it once the results are written); with ``resume`` a run saved there
    goes on from its last saved step, so that its results are those of a run never stopped (the seconds of
    the steps done again excepted)."""
    requests = list(requests) if requests is not None else check_spec(spec)
    stream = EditStream(requests, spec.steps, spec.batch, spec.seed)
    probe = (lambda: general_probe(model, tokenizer)) if spec.general else None
    fingerprint = _spec_fingerprint(spec, model_name)
    saved = read_progress(progress_dir, fingerprint) if resume and progress_dir is not None else None
    if probe is not None and general_unedited is None and saved is None:
        general_unedited = probe()  # before the editor exists: the model is unedited
    if saved is not None:  # the editor as saved, with the random state of that moment
        editor = Editor.load(Path(progress_dir) / "editor", model=model, tokenizer=tokenizer)
        setup, floors, general_unedited = saved["setup"], list(saved["floors"]), saved["general_unedited"]
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
    else:
        start = time.perf_counter()
        editor = _new_editor(model, tokenizer, spec)
        setup, floors = time.perf_counter() - start, []
    resumes = [*saved["resumes"], {"from_step": saved["progress"].steps_done, "command": command_line()}] \
        if saved is not None else []
    elapsed = saved["elapsed"] if saved is not None else 0.0  # seconds of the steps done before a resume

    def apply_step(step: list[EditRequest]) -> None:
        floors.append(floor_seconds(model, tokenizer, step))
        editor.apply(step)

    start = last_save = time.perf_counter()

    def save(done: LifelongProgress) -> None:
        nonlocal last_save
        if time.perf_counter() - last_save < save_every:
            return
        with atomic_directory(Path(progress_dir), PROGRESS_KIND) as folder:
            editor.save(folder / "editor")
            with atomic_file(folder / PROGRESS_FILE) as tmp:
                torch.save({"spec": fingerprint, "progress": done, "setup": setup, "floors": floors,
                            "general_unedited": general_unedited, "elapsed": elapsed + time.perf_counter() - start,
                            "resumes": resumes, "torch_rng": torch.get_rng_state(),
                            "python_rng": random.getstate()}, tmp)
        last_save = time.perf_counter()

    try:
        result = run_lifelong(model, tokenizer, list(stream), apply_step, protocols=spec.protocols,
                              timing=spec.timing, eval_every=spec.eval_every, progress=progress,
                              baseline=baseline, probe=probe, progress_from=saved["progress"] if saved else None,
                              on_step=save if progress_dir is not None else None)
        total = elapsed + time.perf_counter() - start
    finally:
        editor.store.detach()
    summary = _results(spec, editor, model_name, stream, result, setup, floors, total)
    summary["unedited_shared"] = baseline is not None  # scored once by an earlier method on the same stream
    if resumes:
        summary["resumed"] = resumes
    if probe is not None:
        summary["general"] = {"unedited": general_unedited, "edited": _without_position(result.general[-1]),
                              "curve": result.general, "tasks": GENERAL_TASKS}
    return summary, result


def _new_editor(model: torch.nn.Module, tokenizer, spec: BenchSpec) -> Editor:
    modules = spec.modules
    if getattr(get_method(spec.method), "edits_output_projection", False):
        output_projection = architecture_of(model).mlp_modules[-1]
        if modules and list(modules) != [output_projection]:
            raise ValueError(f"{spec.method} edits the MLP output projection ({output_projection}); it cannot edit "
                             f"{', '.join(modules)}. Leave out the modules or name {output_projection}")
        modules = [output_projection]
    return Editor.from_pretrained(model, method=spec.method, hparams=spec.hparams, checkpoint=spec.checkpoint,
                                  tokenizer=tokenizer, layers=spec.layers, modules=modules)


def discard_progress(progress_dir: str | Path | None) -> None:
    """Remove a run's saved progress (once its results are written); a folder that is not ours is refused."""
    if progress_dir is not None and Path(progress_dir).exists():
        check_replaceable(Path(progress_dir), PROGRESS_KIND)
        shutil.rmtree(progress_dir)


def read_progress(progress_dir: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The progress saved in ``progress_dir`` (None when there is none), checked to be of the same run."""
    path = Path(progress_dir) / PROGRESS_FILE
    if not path.is_file():
        return None
    check_replaceable(Path(progress_dir), PROGRESS_KIND)
    saved = torch.load(path, weights_only=False)  # our own file, written by run_benchmark
    if saved["spec"] != fingerprint:
        raise ValueError(f"{progress_dir} holds the progress of another run ({saved['spec']}); this run is "
                         f"{fingerprint}. Resume with the same settings, or remove that folder to start again")
    return saved


def _spec_fingerprint(spec: BenchSpec, model_name: str) -> str:
    """What makes two runs the same run: the model and every field of the spec but its label."""
    fields = {k: v for k, v in asdict(spec).items() if k != "label"}
    return json.dumps({"model": model_name, **fields}, sort_keys=True, default=str)


def _without_position(point: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in point.items() if k not in ("step", "n_edits")}


def speed(timed: Sequence[float], floors: Sequence[float]) -> dict[str, float]:
    """Apply-time figures from the timed steps (each = floor measurement + the editor's apply) and the floors."""
    apply = [t - f for t, f in zip(timed, floors)]
    return {
        "apply_total": round(sum(apply), 3),
        "apply_step_median": round(statistics.median(apply), 4),
        "floor_step_median": round(statistics.median(floors), 4),
        "apply_first5_median": round(statistics.median(apply[:5]), 4),
        "apply_last5_median": round(statistics.median(apply[-5:]), 4),
        "apply_over_floor": round(statistics.median(apply) / statistics.median(floors), 3),
    }


def _results(spec, editor, model_name, stream, result, setup, floors, total) -> dict[str, Any]:
    kind = dataset_kind(stream.edits)
    headline = next((p for p in HEADLINE[kind] if p in result.protocols), result.protocols[0])
    data_file = dataset_file(spec.data, spec.split)

    def headline_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
        return {k: round(v, 2) for k, v in metrics.get(headline, {}).items()}

    out = {
        "format": "rledit-bench@1",
        "method": spec.method,
        "name": spec.name,
        "checkpoint": spec.checkpoint,
        "method_hparams": method_hparams_dict(editor.method),
        "edited_modules": [t.name for t in editor.targets],
        "chat_template": chat_framing(editor.tokenizer) is not None,
        "method_setup": editor.method.setup_report(),
        "model": model_name,
        "dataset": kind,
        "data": spec.data,
        "split": spec.split,
        "data_file": str(data_file),
        "data_sha256": file_sha256(data_file),
        "steps": spec.steps,
        "batch": spec.batch,
        "n_edits": spec.steps * spec.batch,
        "timing": spec.timing,
        "protocol": headline,
        "metrics": headline_metrics(result.metrics),
        "unedited": headline_metrics(result.unedited.metrics),
        "metrics_by_protocol": {p: {k: round(v, 2) for k, v in m.items()} for p, m in result.metrics.items()},
        "unedited_by_protocol": {p: {k: round(v, 2) for k, v in m.items()}
                                 for p, m in result.unedited.metrics.items()},
        "seconds": {"setup": round(setup, 3), **speed(result.step_seconds, floors),
                    "eval": round(total - sum(result.step_seconds), 3)},
        "apply_over_floor": speed(result.step_seconds, floors)["apply_over_floor"],
        "step_seconds": [round(s - f, 4) for s, f in zip(result.step_seconds, floors)],
        "floor_seconds": [round(s, 4) for s in floors],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seed": spec.seed,
        "version": rledit.__version__,
        "torch": torch.__version__,
        "transformers": _version_of("transformers"),
        "peft": _version_of("peft"),
        "threads": torch.get_num_threads(),
        "machine": machine_description(),
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "command": command_line(),
        "protocol_note": ("floor_step_median: one forward+backward with gradients for every weight on the same "
                          "step's prompt+target rows, measured right before that step"),
    }
    if result.curve:
        out["curve"] = [{"step": p.step, "n_edits": p.n_edits, **headline_metrics(p.metrics)} for p in result.curve]
    out.update(spec.extra)
    return out


def machine_description() -> dict[str, Any]:
    """What a run's arithmetic ran on: the CPU and the instruction set torch's kernels use on it (and the GPUs).
    The same code, data and seed give float results that differ in the last bits on CPUs whose kernels differ,
    and a long edit sequence can carry such differences into its figures."""
    described: dict[str, Any] = {"cpu": _cpu_model() or platform.processor() or platform.machine(),
                                 "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        described["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return described


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
