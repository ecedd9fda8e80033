"""drscaling command line: one sub-command per pipeline stage.

dvc.yaml stages and MLproject entry points call these commands, so every way of running a stage goes
through the same function. Defaults come from params.yaml; flags override them.

Each command group is a module (data, train, laws, deploy) holding its cmd_* functions, which parse
nothing and hand off to the library, and a register() that adds its sub-commands to the parser.
"""

from __future__ import annotations

import argparse
import sys

from drscaling.errors import DrscalingError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from drscaling.cli import data, deploy, laws, train

    ap = argparse.ArgumentParser(prog="drscaling", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    for group in (data, train, laws, deploy):  # the order of `drscaling --help`: the pipeline's order
        group.register(cmd)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from drscaling import tracking

    tracking.attach_project_run()
    try:
        args.func(args)
    except DrscalingError as exc:
        print(f"drscaling: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM at a step boundary (train.Terminated)
        print(f"drscaling: stopped: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
