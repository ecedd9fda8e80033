"""What every command group shares: the default folders, params.yaml lookups and flag types."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from drscaling import params

A = "artifacts"
# Measured costs are versioned data in git (timings are not reproducible, so not a DVC stage output):
# `make measure` re-measures them, the budget reads them (params.yaml budget.costs_path).
COSTS = "costs/costs.json"

Register = Callable[[str, Callable | None, str], argparse.ArgumentParser]


def param(args: argparse.Namespace, name: str, section: str, default):
    """A path or value: the flag if given, else params.yaml[section][name], else the default."""
    value = getattr(args, name, None)
    return value if value is not None else params.section(section).get(name, default)


def picker(args: argparse.Namespace, section: str) -> Callable:
    """pick(name, default): the flag if given, else params.yaml[section][name], else default."""
    values = params.section(section)

    def pick(name: str, default=None):
        v = getattr(args, name, None)
        return v if v is not None else values.get(name, default)

    return pick


def prepared(args: argparse.Namespace) -> str:
    """The canonical dataset folder: --prepared, else params.yaml data.prepared, else artifacts/prepared."""
    return param(args, "prepared", "data", f"{A}/prepared")


def opt_float(text: str) -> float | None:
    """A float flag where "" (an MLproject parameter left empty) means not given."""
    return None if text == "" else float(text)


def opt_str(text: str) -> str | None:
    return text or None


def costs_mode(text: str) -> str | None:
    if text == "":
        return None
    if text not in ("paper", "measured"):
        raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from 'paper', 'measured')")
    return text
