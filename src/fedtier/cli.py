"""Command line: ``fedtier run|pretrain|presets|report|schema``. User mistakes print one clear line, exit 2.

Exit status: 0 done; 2 a user mistake (one line on stderr) or no command (usage); 130
interrupted (Ctrl-C; the run directory keeps what was computed, marked incomplete).
"""

from __future__ import annotations

import argparse
import os
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
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (only once the new run is prepared); "
        "without it an existing run directory is refused",
    )
    run.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue the killed or interrupted run in DIR from its last checkpoint",
    )
    run.add_argument(
        "--jobs",
        default="auto",
        metavar="N",
        help="arms run at once, each in its own process (default auto: one per core, or "
        "$FEDTIER_JOBS); the numbers are those of one arm at a time",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pre = sub.add_parser(
        "pretrain", help="build (or find in the cache) the pretrained model of a config"
    )
    pre.add_argument("config", help="preset name or YAML file with a 'pretrain' section")
    pre.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pre.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("presets", help="list the built-in presets")
    sub.add_parser("schema", help="print the JSON Schema of config files (for editors)")
    rep = sub.add_parser("report", help="re-render tables and plots of a finished run")
    rep.add_argument("dir", type=Path)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from fedtier.config import load_config
    from fedtier.experiment import run_experiment
    from fedtier.presets import DEFAULT_PRESET
    from fedtier.results import console_report

    if args.resume is not None:
        out = args.resume
        if args.out is not None and args.out != out:
            raise FedtierError("--resume DIR continues DIR; leave out --out (or give the same DIR)")
        if args.overwrite:
            raise FedtierError("--resume continues a run; it cannot be combined with --overwrite")
        if not (out / "config.yaml").is_file():
            raise FedtierError(f"--resume: '{out}' is not a fedtier run directory (no config.yaml)")
        source = args.config if args.config is not None else out / "config.yaml"
        cfg = load_config(source, args.overrides)
    else:
        cfg = load_config(args.config or DEFAULT_PRESET, args.overrides)
        out = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    show_log()
    args.out = out  # for the message if the run is interrupted
    summary = run_experiment(
        cfg,
        out,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        resume=args.resume is not None,
        jobs=args.jobs,
    )
    print("\n" + console_report(summary))
    print(f"\nresults in {out}/ (report.md, summary.json, metrics.jsonl, plots, models/)")
    return 0


def show_log() -> None:
    """Print fedtier's INFO log lines (e.g. which executor trains the clients) on stderr."""
    import logging

    class CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
        """Writes to whatever sys.stderr is now (main() may run many times in a process)."""

        @property  # type: ignore[override]
        def stream(self):  # type: ignore[no-untyped-def]
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:  # type: ignore[no-untyped-def]
            pass

    log = logging.getLogger("fedtier")
    if not log.handlers:
        handler = CurrentStderr()
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


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedtier.config import load_config
    from fedtier.experiment import load_arm_data, pretrain_arms

    cfg = load_config(args.config, args.overrides)
    arms = cfg.arm_configs()
    if all(a.pretrain is None for a in arms.values()):
        raise FedtierError(f"config '{args.config}' has no 'pretrain' section: nothing to build")
    built = pretrain_arms(arms, load_arm_data(arms), progress=not args.no_progress)
    for p in {p.path: p for p in built.values()}.values():
        how = "in the cache" if p.cached else "trained now"
        print(f"{p.path}  ({how}; training took {p.seconds:.0f} s)")
    return 0


def cmd_schema() -> int:
    import json

    from fedtier.config import schema

    print(json.dumps(schema(), indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedtier.results import console_report, read_run, render_report

    path = render_report(args.dir)
    _, summary = read_run(args.dir)
    print(console_report(summary))
    print(f"\nwrote {path}")
    return 0


def _marked_incomplete(out: Path) -> bool:
    """True when ``out`` holds a run that this interrupted process marked incomplete."""
    import json

    try:
        return json.loads(Path(out, "summary.json").read_text()).get("complete") is False
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `fedtier`: say what it can do (argparse's exit status)
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            code = cmd_run(args)
        elif args.command == "pretrain":
            code = cmd_pretrain(args)
        elif args.command == "presets":
            code = cmd_presets()
        elif args.command == "schema":
            code = cmd_schema()
        else:
            code = cmd_report(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at exit
        return code
    except FedtierError as e:
        print(f"fedtier: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        where = (
            f"the run directory {out}/ keeps the evaluations so far (marked incomplete); "
            f"continue it with: fedtier run --resume {out}"
            if out is not None and _marked_incomplete(out)
            else "the run had not started; nothing was written"
        )
        print(f"\nfedtier: interrupted; {where}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`fedtier presets | head -3`): stop quietly, as Unix tools do;
        # stdout goes to /dev/null so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a tool killed by the pipe


if __name__ == "__main__":
    sys.exit(main())
