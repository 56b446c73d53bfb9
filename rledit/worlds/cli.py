"""``rledit worlds run --hparams FILE [--out FILE.json] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import shlex
import sys

from rledit.worlds.config import ConfigError, load_run_settings


def add_worlds_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``worlds`` command (with its ``run`` subcommand) on the main CLI's subparsers."""
    worlds = subparsers.add_parser("worlds", help="MaskWorld / ShiftWorld: RL editing of trained networks")
    commands = worlds.add_subparsers(dest="worlds_command", required=True)
    run = commands.add_parser("run", help="train an agent in a world on a task; write results JSON and a plot")
    run.add_argument("--hparams", required=True, help="YAML settings, e.g. hparams/worlds/shiftworld-unlearning.yaml")
    run.add_argument("--out", help="results JSON path (the plot is written next to it as .png)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, e.g. --set agent.env_steps=512 (repeatable)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.set_defaults(handler=run_command)
    return worlds


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (recorded in the results JSON)."""
    parts = ["rledit", "worlds", "run", "--hparams", args.hparams]
    parts += ["--out", args.out] if args.out else []
    for override in args.overrides:
        parts += ["--set", override]
    return shlex.join(parts)


def run_command(args: argparse.Namespace) -> int:
    """Handler of ``rledit worlds run``: returns the process exit code."""
    from rledit.worlds.run import run_world, save_results, summary_table

    try:
        settings = load_run_settings(args.hparams, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_world(settings, command=command_line(args), show_progress=not args.no_progress)
    print(summary_table(result))
    if args.out:
        json_path, png_path = save_results(result, args.out)
        print(f"wrote {json_path} and {png_path}")
    return 0
