"""Command line: ``fedtier run|presets|report``. User mistakes print one clear line, exit 2."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedtier.errors import FedtierError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedtier", description="Hierarchical federated learning with QAT."
    )
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run an experiment (default: the qafed-mnist preset)")
    run.add_argument("config", nargs="?", default=None, help="preset name or YAML file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.rounds=10 (repeatable)",
    )
    run.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/<name>-<time>)"
    )
    run.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue the killed or interrupted run in DIR from its last checkpoint",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("presets", help="list the built-in presets")
    sub.add_parser("schema", help="print the JSON Schema of config files (for editors)")
    rep = sub.add_parser("report", help="re-render tables and plots of a finished run")
    rep.add_argument("dir", type=Path)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from fedtier.config import load_config
    from fedtier.experiment import run_experiment
    from fedtier.presets import DEFAULT_PRESET
    from fedtier.results import security_section, summary_tables

    if args.resume is not None:
        out = args.resume
        if args.out is not None and args.out != out:
            raise FedtierError("--resume DIR continues DIR; leave out --out (or give the same DIR)")
        if not (out / "config.yaml").is_file():
            raise FedtierError(f"--resume: '{out}' is not a fedtier run directory (no config.yaml)")
        if (out / "summary.json").is_file() and not (out / "checkpoint.pt").is_file():
            raise FedtierError(f"--resume: '{out}' has no checkpoint to continue from")
        source = args.config if args.config is not None else out / "config.yaml"
        cfg = load_config(source, args.overrides)
    else:
        cfg = load_config(args.config or DEFAULT_PRESET, args.overrides)
        out = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    show_log()
    summary = run_experiment(
        cfg, out, progress=not args.no_progress, resume=args.resume is not None
    )
    print(f"\n{cfg.name} (B = {summary.get('target_bits')})\n")
    print(summary_tables(summary))
    if any("costs" in a for a in summary.get("arms", {}).values()):
        from fedtier.results import costs_table

        print("\ncommunication and energy (fedtier.costs):")
        print(costs_table(summary))
    security = security_section(summary)
    if security:
        print("\n" + security)
    print(f"\nresults in {out}/ (report.md, summary.json, metrics.jsonl, plots)")
    return 0


def show_log() -> None:
    """Print fedtier's INFO log lines (e.g. which executor trains the clients) on stderr."""
    import logging

    log = logging.getLogger("fedtier")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedtier: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def cmd_presets() -> int:
    from fedtier.presets import describe, preset_names

    names = preset_names()
    width = max(map(len, names))
    for n in names:
        print(f"{n:<{width}}  {describe(n)}")
    return 0


def cmd_schema() -> int:
    import json

    from fedtier.config import schema

    print(json.dumps(schema(), indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedtier.results import read_run, render_report, summary_tables

    path = render_report(args.dir)
    _, summary = read_run(args.dir)
    print(summary_tables(summary))
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in (None, "run"):
            if args.command is None:
                args = build_parser().parse_args(
                    ["run", *(argv if argv is not None else sys.argv[1:])]
                )
            return cmd_run(args)
        if args.command == "presets":
            return cmd_presets()
        if args.command == "schema":
            return cmd_schema()
        return cmd_report(args)
    except FedtierError as e:
        print(f"fedtier: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtier: interrupted; evaluations so far are in the run directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
