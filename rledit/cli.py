"""The ``rledit`` command line: ``train | eval | edit | generate | demo | bench | worlds``.

Each subcommand is a thin layer over the library: it parses arguments, calls the same functions a user would
call from Python, and writes results files that say how they were produced.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # rledit.models.DTYPES, without torch
RESTARTABLE = {"hparams.yaml", "train_log.jsonl", "training_curve.png"}  # what a run writes before its 1st checkpoint
RESUMABLE_CHANGES = {"method.train.episodes"}  # extending a run is resuming it


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rledit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_rledit_messages()
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        code = int(args.handler(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:
        if getattr(args, "traceback", False):
            raise
        print(f"rledit {args.command}: error: {exc}", file=sys.stderr)
        _end_launched_process(1, wait=False)
        return 1
    _end_launched_process(code, wait=True)  # the processes of a launched run end together
    return code


def _end_launched_process(code: int, wait: bool) -> None:
    """:func:`rledit.distributed.finish` for a command that joined a process group (it does not return then);
    nothing for the others, which may never have imported torch."""
    distributed = sys.modules.get("rledit.distributed")
    if distributed is not None:
        distributed.finish(code, wait)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless it is empty or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _show_rledit_messages() -> None:
    """rledit's one-line notes (which modules are edited, an untrained editor, skipped protocols) on stderr."""
    import logging

    logger = logging.getLogger("rledit")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("rledit: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _version() -> str:
    import rledit

    return rledit.__version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="rledit", description="Lifelong editing of language models.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"rledit {_version()}")
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="train an RLEdit-family editor over edit sequences")
    train.add_argument("--hparams", required=True, help="experiment YAML (e.g. hparams/experiments/train-*.yaml)")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    train.add_argument("--out", default=None, help="output folder (default: runs/<hparams file name>)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    train.add_argument("--limit", type=int, default=None, help="use only the first N training records")
    train.add_argument("--init", default=None, metavar="CHECKPOINT",
                       help="start from a trained editor (name or folder) with the same modules and network shape")
    train.set_defaults(handler=_train)

    evaluate = sub.add_parser("eval", help="score a model (unedited, or edited with --editor) under every "
                                           "applicable protocol")
    _add_model_and_data(evaluate)
    edited = evaluate.add_mutually_exclusive_group()
    edited.add_argument("--editor", default=None, help="score this saved edited model (rledit edit --out) instead")
    edited.add_argument("--adapter", default=None, help="score --model with this peft adapter (e.g. from "
                                                        "rledit edit --export-peft); locality against --model alone")
    evaluate.add_argument("--protocols", nargs="*", default=None, help="protocol ids (default: all applicable)")
    evaluate.add_argument("--out", required=True, help="summary JSON path (per-example records go beside it)")
    evaluate.set_defaults(handler=_eval)

    demo = sub.add_parser("demo", help="edit SmolLM2-135M with a handful of real zsRE facts; before/after table")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--checkpoint", default="smollm2-135m-zsre", help="trained editor (name or folder)")
    demo.add_argument("--edits", type=int, default=8, help="number of zsRE eval edits (one step)")
    demo.set_defaults(handler=_demo)

    bench = sub.add_parser("bench", help="lifelong benchmark: T steps x B edits with one or several methods")
    which = bench.add_mutually_exclusive_group(required=True)
    which.add_argument("--method", help="method name, or name:checkpoint for a trained editor (rledit:smollm2-135m-zsre)")
    which.add_argument("--methods", help="comma-separated methods (each name or name:checkpoint), same stream")
    which.add_argument("--hparams", help="an experiment YAML: its model, method, data and experiment sections "
                                         "define the run (--set overrides them; other options are not used)")
    _add_model_and_data(bench)
    bench.add_argument("--steps", type=int, default=50, help="edit steps T")
    bench.add_argument("--batch", type=int, default=20, help="edits per step B")
    bench.add_argument("--timing", choices=["end", "immediate", "curve"], default="end", help="when edits are scored")
    bench.add_argument("--eval-every", type=int, default=10, help="steps between curve points (--timing curve)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the edit stream")
    bench.add_argument("--layers", type=int, nargs="*", default=None,
                       help="edited layers of methods without a checkpoint (default: hparams/models/<model>.yaml)")
    bench.add_argument("--modules", nargs="*", default=None,
                       help="edited MLP modules of methods without a checkpoint, e.g. down_proj (default: "
                            "hparams/models/<model>.yaml; MEMIT and AlphaEdit edit the output projection)")
    bench.add_argument("--protocols", nargs="*", default=None, help="protocol ids (default: all applicable)")
    bench.add_argument("--general", action="store_true",
                       help="also score general ability (SST-2 zero-shot accuracy, perplexity on held-out text) "
                            "unedited, after the last step and at every curve point; ~5 min per probe on one core")
    bench.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                       help="method hparams overrides, e.g. method.lr_init=1.0; with a trained editor only its "
                            "top-level keys, e.g. method.memory_init=1.0")
    bench.add_argument("--label", default=None,
                       help="the run's row name in tables (and file name in a --methods folder); one method only")
    bench.add_argument("--out", required=True,
                       help="results JSON (with --method) or folder for per-method JSON, table and plot (--methods)")
    bench.add_argument("--save-every", type=float, default=10.0, metavar="MINUTES",
                       help="save a run's progress (beside its results file, as NAME.partial/) after a step when "
                            "this many minutes have passed since the last save; 0: after every step (default 10)")
    bench.add_argument("--resume", action="store_true",
                       help="go on from each run's saved progress; runs whose results file exists are skipped")
    bench.set_defaults(handler=_bench)

    from rledit.cli_edit import add_edit_parsers

    add_edit_parsers(sub)

    report = sub.add_parser("bench-report", help="table.md + curves.png of every bench run in a results folder")
    report.add_argument("folder", help="a folder written by `rledit bench --methods ... --out FOLDER`")
    report.set_defaults(handler=_bench_report)

    listing = sub.add_parser("list", help="what is available: methods, protocols, shipped editors, model presets")
    listing.set_defaults(handler=_list)

    plan = sub.add_parser("plan", help="memory on paper: model, editor, one step and the delta store for a preset",
                          formatter_class=DefaultsHelpFormatter)
    plan.add_argument("--model", nargs="+", required=True, help="model presets (hparams/models) or YAML files; "
                                                                 "'all' for every preset")
    plan.add_argument("--hparams", default=None, help="a YAML file whose method section is the RLEdit editor "
                                                      "(default: hparams/methods/rledit.yaml)")
    plan.add_argument("--steps", type=int, default=50, help="edit steps T the delta store holds")
    plan.add_argument("--batch", type=int, default=20, help="edits per step")
    plan.add_argument("--prompt-tokens", type=int, default=16, help="prompt tokens per edit")
    plan.add_argument("--answer-tokens", type=int, default=4, help="answer tokens per edit")
    plan.set_defaults(handler=_plan)

    try:
        from rledit.worlds.cli import add_worlds_parser
    except ImportError:  # the worlds extra is optional at import time
        add_worlds_parser = None
    if add_worlds_parser is not None:
        add_worlds_parser(sub)
    for command in sub.choices.values():  # every --help shows the defaults
        command.formatter_class = DefaultsHelpFormatter
    return parser


def _add_model_and_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="hub id, local folder or alias")
    parser.add_argument("--data", default="zsre", help="zsre | zsre-knowedit | counterfact | PATH")
    parser.add_argument("--split", default="eval", help="train | eval")
    parser.add_argument("--limit", type=int, default=None, help="first N records")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the model's weights")
    parser.add_argument("--device-map", default=None,
                        help="place the model across devices with accelerate, e.g. auto (default: one device)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per scoring batch")
    add_chat_template_flag(parser)


def add_chat_template_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template", action="store_true",
                        help="prompt the model through its tokenizer's chat template (default: raw prompts, as "
                             "the published protocols)")


def chat_template_flag(args: argparse.Namespace, tokenizer) -> None:
    """Switch ``tokenizer`` to chat framing when ``--chat-template`` was given (else leave its mode alone)."""
    if getattr(args, "chat_template", False):
        from rledit.chat import use_chat_template

        use_chat_template(tokenizer)


def loaded_model(args: argparse.Namespace):
    """The model of ``--model`` (with ``--dtype`` and ``--device-map``), its tokenizer in chat framing when
    ``--chat-template``."""
    from rledit.models import load_model

    loaded = load_model(args.model, dtype=getattr(args, "dtype", "float32"),
                        device_map=getattr(args, "device_map", None))
    chat_template_flag(args, loaded.tokenizer)
    return loaded


def _train(args: argparse.Namespace) -> int:
    from rledit import distributed
    from rledit.data import load_requests
    from rledit.editor import Editor
    from rledit.hparams import load_hparams, save_hparams
    from rledit.methods.rledit.trainer import STATE_FILE, RLEditTrainer

    distributed.start()  # data-parallel training when launched as several processes
    main = distributed.is_main()
    hparams = load_hparams(args.hparams, args.set)
    out = Path(args.out or Path("runs") / Path(args.hparams).stem)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the run")
    started = out.is_dir() and (out / STATE_FILE).is_file()
    if args.resume:
        if not started:
            raise ValueError(f"--resume: {out} holds no {STATE_FILE} (no episode was checkpointed); start the run "
                             "again without --resume")
        _check_same_run(load_hparams(out / "hparams.yaml"), hparams, out)
    elif out.is_dir() and (started or {p.name for p in out.iterdir()} - RESTARTABLE):
        raise ValueError(f"{out} is not empty; pass --resume to continue that run or choose another --out")
    distributed.barrier()  # every process checked the folder before the first one writes to it
    if main and out.is_dir() and not started:  # a start that failed before its first checkpoint: start afresh
        for name in RESTARTABLE:
            (out / name).unlink(missing_ok=True)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_hparams(hparams, out / "hparams.yaml")
    method = hparams.method
    editor = Editor.from_model_hparams(hparams.model, method)
    requests = load_requests(method.train.train_data, "train", limit=args.limit)
    trainer = RLEditTrainer(editor, requests, out, hparams_source=str(args.hparams), init_from=args.init)
    final = trainer.train(resume=args.resume)
    if not main:
        return 0
    from rledit.methods.rledit.plots import plot_training_log

    plot_training_log(out / "train_log.jsonl", out / "training_curve.png")
    print(f"trained editor: {final}\ntraining log: {out / 'train_log.jsonl'}\ncurve: {out / 'training_curve.png'}")
    return 0


def _check_same_run(saved: Any, given: Any, out: Path) -> None:
    """Refuse to resume ``out`` with other hparams than it was started with (more episodes are fine)."""
    def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
        items = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                items |= flat(value, f"{prefix}{key}.")
            else:
                items[f"{prefix}{key}"] = value
        return items

    before, now = flat(saved.to_dict()), flat(given.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ValueError(f"--resume: {out} was started with other hparams ({details}); resume with the same "
                         f"--hparams and --set (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or start "
                         "a new run with --init")


def _plan(args: argparse.Namespace) -> int:
    from rledit.hparams import load_section
    from rledit.plan import load_preset, plan_memory, plan_presets

    for name, value in (("steps", args.steps), ("batch", args.batch), ("answer-tokens", args.answer_tokens)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    method = load_section(args.hparams, "method") if args.hparams else None
    presets = plan_presets() if args.model == ["all"] else args.model
    for preset in presets:
        plan = plan_memory(load_preset(preset), method, steps=args.steps, batch=args.batch,
                           prompt_tokens=args.prompt_tokens, answer_tokens=args.answer_tokens, name=preset)
        print(plan.table() + "\n")
    return 0


def _list(args: argparse.Namespace) -> int:
    from rledit.checkpoints import shipped_checkpoints
    from rledit.eval import list_protocols
    from rledit.hparams import HPARAMS_DIR
    from rledit.methods import available_methods

    presets = sorted(p.stem for p in (HPARAMS_DIR / "models").glob("*.yaml"))
    experiments = sorted(p.stem for p in (HPARAMS_DIR / "experiments").glob("*.yaml"))
    for title, items in (("methods", available_methods()), ("protocols", list_protocols()),
                         ("shipped editors", shipped_checkpoints()), ("model presets (hparams/models)", presets),
                         ("experiments (hparams/experiments)", experiments)):
        print(f"{title}:\n  " + ("\n  ".join(items) if items else "(none)"))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rledit import distributed
    from rledit.data import dataset_file, load_requests
    from rledit.eval import evaluate, write_results
    from rledit.files import file_sha256

    distributed.start()  # scoring is shared out when launched as several processes
    requests = load_requests(args.data, args.split, limit=args.limit)
    data_file = dataset_file(args.data, args.split)
    data = {"source": args.data, "split": args.split, "limit": args.limit, "file": str(data_file),
            "sha256": file_sha256(data_file)}
    if args.editor:
        from rledit.editor import Editor

        editor = Editor.load(args.editor, dtype=args.dtype)
        chat_template_flag(args, editor.tokenizer)
        result = editor.evaluate(requests, args.protocols, batch_size=args.batch_size)
        meta = {"model": editor.model_name, "editor": str(Path(args.editor).resolve()), "seed": None,
                "edit_steps": [s.to_dict() for s in editor.steps], "data": data}
        what = f"{editor.model_name} edited by {args.editor} ({len(editor.steps)} steps)"
    elif args.adapter:
        from peft import PeftModel

        from rledit.eval import compute_references

        loaded = loaded_model(args)
        references = compute_references(loaded.model, loaded.tokenizer, requests, args.protocols, args.batch_size)
        adapted = PeftModel.from_pretrained(loaded.model, args.adapter)
        result = evaluate(adapted, loaded.tokenizer, requests, protocols=args.protocols, references=references,
                          batch_size=args.batch_size)
        meta = {"model": loaded.name, "model_revision": loaded.revision, "seed": None, "data": data,
                "editor": f"peft adapter {Path(args.adapter).resolve()}"}
        what = f"{loaded.name} with the adapter {args.adapter}"
    else:
        loaded = loaded_model(args)
        result = evaluate(loaded.model, loaded.tokenizer, requests, protocols=args.protocols,
                          batch_size=args.batch_size)
        meta = {"model": loaded.name, "model_revision": loaded.revision, "seed": None, "data": data}
        what = f"unedited {loaded.name}"
    tokenizer = editor.tokenizer if args.editor else loaded.tokenizer
    if not distributed.is_main():
        return 0
    summary, records = write_results(args.out, result, meta | {"chat_template": _framed(tokenizer),
                                                               "processes": distributed.world()[1]})
    print(format_metrics(result.metrics, f"{what} on {len(requests)} {args.data} records"))
    print(f"summary: {summary}\nper-example records: {records}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from rledit import distributed
    from rledit.bench import check_spec, discard_progress, run_benchmark
    from rledit.bench_report import markdown_table, write_run

    if args.hparams:
        spec, args.model, args.dtype = _experiment_spec(args)
        specs, names = [spec], [spec.method]
    else:
        names = [args.method] if args.method else [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.label and len(names) > 1:
            raise ValueError("--label names one run; give one method")
        specs = [_bench_spec(args, name) for name in names]
    for spec in specs:
        spec.general = args.general
    requests = [check_spec(spec) for spec in specs]  # every error before any work
    paths = [Path(args.out) if not args.methods else Path(args.out) / f"{_file_name(spec.name)}.json"
             for spec in specs]
    partial = [path.with_name(f"{path.stem}.partial") for path in paths]  # each run's saved progress
    if args.save_every < 0:
        raise ValueError(f"--save-every must be >= 0 minutes, got {args.save_every}")
    if not args.resume:
        waiting = [str(folder) for folder in partial if folder.exists()]
        if waiting:
            raise ValueError(f"{', '.join(waiting)} hold(s) the saved progress of an unfinished run: pass --resume "
                             "to go on from it, or remove it to start again")
    distributed.start()  # every process runs the edits, the scoring is shared out
    main = distributed.is_main()
    if distributed.world()[1] > 1:  # (each process would need its own copy of the progress)
        if args.resume:
            raise ValueError("--resume works with one process; run the benchmark as one process to go on")
        partial = [None] * len(specs)
    loaded = loaded_model(args)
    summaries = []
    baseline = general = None  # the unedited scores, shared by every method on the same stream
    for spec, spec_requests, path, progress_dir in zip(specs, requests, paths, partial):
        if args.resume and path.exists() and not (progress_dir and progress_dir.exists()):
            print(f"== {spec.name}: done already ({path})")
            continue
        if main:
            print(f"== {spec.name}: {spec.steps} x {spec.batch} {spec.data} edits, timing {spec.timing}")
        summary, result = run_benchmark(loaded.model, loaded.tokenizer, loaded.name, spec, spec_requests,
                                        baseline=baseline, general_unedited=general, progress_dir=progress_dir,
                                        resume=args.resume, save_every=60.0 * args.save_every)
        baseline, general = result.baseline, summary.get("general", {}).get("unedited")
        summary["model_revision"] = loaded.revision
        summary["processes"] = distributed.world()[1]
        summaries.append(summary)
        if main:
            write_run(path, summary, result)
            discard_progress(progress_dir)
            print(f"{spec.name} -> {path}")
    if not main or not summaries:
        return 0
    print("\n" + markdown_table(summaries))  # one table of every run just made
    if args.methods:  # the folder's table covers these runs and any earlier ones on the same stream
        _bench_report(argparse.Namespace(folder=args.out))
    return 0


def _framed(tokenizer) -> bool:
    from rledit.chat import chat_framing

    return chat_framing(tokenizer) is not None


def _bench_report(args: argparse.Namespace) -> int:
    from rledit.bench_report import write_report

    table, plot = write_report(args.folder)
    print(table.read_text())
    print(f"wrote {table}" + (f" and {plot}" if plot else ""))
    return 0


def _experiment_spec(args: argparse.Namespace):
    """The benchmark an experiment YAML describes, with the model name and dtype to load."""
    from rledit.bench import BenchSpec
    from rledit.hparams import load_hparams

    hparams = load_hparams(args.hparams, args.set)
    data, run, model = hparams.data, hparams.experiment, hparams.model
    if data.limit is not None and data.limit < run.steps * run.batch:
        raise ValueError(f"{args.hparams}: data.limit {data.limit} is below experiment.steps x batch = "
                         f"{run.steps * run.batch}")
    spec = BenchSpec(method=hparams.method.name, hparams=hparams.method, layers=model.layers, modules=model.modules,
                     data=data.dataset, split=data.split, steps=run.steps, batch=run.batch, timing=run.timing,
                     seed=run.seed, eval_every=run.eval_every, protocols=run.protocols, label=args.label,
                     extra={"hparams_file": str(args.hparams), "hparams_digest": hparams.digest()})
    return spec, model.name, model.dtype


def _bench_spec(args: argparse.Namespace, name: str):
    from rledit.bench import BenchSpec
    from rledit.hparams import HPARAMS_DIR, load_section
    from rledit.methods import get_method

    method, _, checkpoint = name.partition(":")
    hparams = layers = modules = None
    if checkpoint and args.set:
        hparams = _checkpoint_overrides(args.set)
    if not checkpoint:
        method_file = HPARAMS_DIR / "methods" / f"{method}.yaml"
        if method_file.is_file():
            hparams = load_section(method_file, "method", overrides=args.set)
        model_file = HPARAMS_DIR / "models" / f"{args.model}.yaml"
        if model_file.is_file():
            model = load_section(model_file, "model")
            layers = model.layers
            if not getattr(get_method(method), "edits_output_projection", False):
                modules = model.modules  # the preset's modules; MEMIT/AlphaEdit edit the output projection
        elif not args.layers:
            import logging

            logging.getLogger("rledit").info("no preset %s for %s: %s edits the architecture's default layers",
                                             model_file, args.model, method)
        layers = args.layers or layers
        modules = args.modules or modules
    return BenchSpec(method=method, checkpoint=checkpoint or None, hparams=hparams, layers=layers, modules=modules,
                     data=args.data, split=args.split, steps=args.steps, batch=args.batch, timing=args.timing,
                     seed=args.seed, eval_every=args.eval_every, protocols=args.protocols, label=args.label)


def _checkpoint_overrides(items: list[str]) -> dict:
    """``method.KEY=VALUE`` overrides of a trained editor's top-level hparams (values read as YAML)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.removeprefix("method.")
        if not sep or not key.startswith("method.") or "." in name or not name:
            raise ValueError(f"--set {item!r}: a trained editor takes top-level overrides method.KEY=VALUE")
        overrides[name] = yaml.safe_load(value)
    return overrides


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def format_metrics(metrics: dict[str, dict[str, float]], title: str) -> str:
    """A plain-text table of ``metrics`` (protocol id → metric → percent)."""
    lines = [title]
    for protocol, values in metrics.items():
        shown = "  ".join(f"{name} {value:5.1f}" for name, value in values.items() if "magnitude" not in name)
        lines.append(f"  {protocol:<18} {shown}")
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    from rledit.checkpoints import shipped_checkpoints
    from rledit.data import load_requests
    from rledit.editor import Editor

    checkpoint = args.checkpoint
    if checkpoint in ("", "none") or (checkpoint not in shipped_checkpoints() and not Path(checkpoint).is_dir()):
        print(f"note: no trained editor {checkpoint!r} found; using the untrained RLEdit editor")
        checkpoint = None
    print(f"loading {args.model} ...")
    editor = Editor.from_pretrained(args.model, method="rledit", checkpoint=checkpoint)
    requests = load_requests("zsre", "eval", limit=args.edits)
    protocol = ["zsre-token-acc@1"]
    references = editor.references(requests, protocol)
    before = editor.evaluate(requests, protocol, references=references)
    step = editor.apply(requests)
    after = editor.evaluate(requests, protocol, references=references)
    greedy = editor.compare([r.prompt for r in requests], max_new_tokens=6)
    print(f"\napplied {step.n_edits} zsRE edits in one step ({step.seconds:.2f} s) with "
          f"{'editor ' + str(checkpoint) if checkpoint else 'the untrained editor'}\n")
    print(demo_table(requests, before, after, greedy))
    return 0


def demo_table(requests, before, after, greedy) -> str:
    """Per edit: the new target and the model's greedy text before and after (``Editor.compare`` rows); then
    the teacher-forced metrics before and after."""
    from rledit.editor import shorten

    protocol = before.protocols[0]
    rows = [f"{'prompt':<52} {'new target':<18} {'before (greedy)':<18} {'after (greedy)':<18}"]
    for request, text in zip(requests, greedy):
        rows.append(f"{shorten(request.prompt, 52):<52} {shorten(request.target_new, 18):<18} "
                    f"{shorten(text['unedited'], 18):<18} {shorten(text['edited'], 18):<18}")
    rows.append("")
    rows.append(f"{'metric (' + protocol + ', teacher-forced, %)':<40} {'before':>8} {'after':>8}")
    for metric in ("efficacy", "generalization", "locality", "specificity"):
        if metric in before.metrics[protocol]:
            rows.append(f"{metric:<40} {before.metrics[protocol][metric]:8.1f} {after.metrics[protocol][metric]:8.1f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
