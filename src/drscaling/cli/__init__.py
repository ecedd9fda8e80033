"""drscaling command line: one sub-command per pipeline stage.

dvc.yaml stages and MLproject entry points call these commands, so every way of running a stage goes
through the same function. Defaults come from params.yaml; flags override them.

Each command group is a module (data, train, laws, deploy) holding its cmd_* functions, which parse
nothing and hand off to the library, and a register() that adds its sub-commands to the parser.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from drscaling.cli.common import VERBOSE_HELP, verbose_flag
from drscaling.errors import DrscalingError

__all__ = ["build_parser", "main", "quiet_libraries", "run_in_process"]

# Loggers of libraries that report at INFO what a user did not ask about (MLflow's run links and store
# migrations, Ray's start-up, the Hugging Face hub).
NOISY_LOGGERS = ("mlflow", "alembic", "ray", "huggingface_hub", "urllib3", "filelock")


def quiet_libraries() -> None:
    """Library noise off: transformers' LOAD REPORT tables, advisories and weight-loading bars, INFO
    lines of MLflow and the others above, Python warnings. drscaling's own messages are prints and its own loggers, which
    stay. Environment settings a user made win, and reach the subprocesses a stage starts."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (after this)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars of every load
    if "transformers" in sys.modules:  # imported already (the train flags): the variables came too late
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(hf_logging.log_levels.get(os.environ["TRANSFORMERS_VERBOSITY"], hf_logging.ERROR))
        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            hf_logging.disable_progress_bar()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.simplefilter("ignore")


def build_parser() -> argparse.ArgumentParser:
    from drscaling.cli import data, deploy, laws, train

    ap = argparse.ArgumentParser(prog="drscaling", description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        verbose_flag(p)
        return p

    for group in (data, train, laws, deploy):  # the order of `drscaling --help`: the pipeline's order
        group.register(cmd)
    return ap


def run_in_process(argv: list[str]) -> None:
    """`drscaling ARGV`'s cmd_* function called in this process (errors propagate): how `drscaling study`
    runs its stages."""
    args = build_parser().parse_args(argv)
    args.func(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    from drscaling import tracking

    tracking.attach_project_run()
    from drscaling.signals import sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM stops a command as Ctrl-C does: runs closed, temporary files removed
            args.func(args)
    except DrscalingError as exc:
        print(f"drscaling: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (signals.Terminated: at once, or at a step/batch boundary)
        print(f"drscaling: stopped: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
