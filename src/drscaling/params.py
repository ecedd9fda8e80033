"""params.yaml: the one place stage parameters live (DVC tracks it; the CLI and MLproject read it).

Precedence: dataclass default < params.yaml section < command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from drscaling.errors import DrscalingError
from drscaling.tracking import REPO

def default_path() -> Path:
    """The working directory's params.yaml (DVC runs stages at the repo root), else the project's."""
    here = Path.cwd() / "params.yaml"
    return here if here.exists() else REPO / "params.yaml"


def load(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else default_path()
    if not path.exists():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DrscalingError(f"{path}: not valid YAML ({exc})") from exc


def section(name: str, path: str | Path | None = None) -> dict[str, Any]:
    return dict(load(path).get(name) or {})


def build(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate a (possibly nested) config dataclass from a dict; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise DrscalingError(f"unknown {cls.__name__} parameter(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = build(hint, value)
        kwargs[key] = value
    return cls(**kwargs)


def _flag_type(hint: Any):
    """The flag's parser; an empty value (what MLproject passes for a parameter left at "") is "not
    given", so params.yaml governs."""
    if hint is bool:
        convert = lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]  # noqa: E731
    else:
        convert = hint if hint in (int, float, str) else str

    def parse(text: str):
        return None if text == "" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One --flag per dataclass field (nested dataclasses get a prefix, e.g. --eval-negatives)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_flags(parser, hint, prefix=f"{prefix}{f.name}-")
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            f"--{prefix}{f.name}".replace("_", "-"), dest=f"{prefix}{f.name}".replace("-", "__"),
            type=_flag_type(hint), default=None,
            help=f"(default: params.yaml, else {default!r})",
        )


def from_args(cls: type, args: argparse.Namespace, base: dict[str, Any], prefix: str = "") -> Any:
    """Merge flags given on the command line over `base` (a params.yaml section)."""
    hints = typing.get_type_hints(cls)
    values = dict(base)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = dataclasses.asdict(from_args(hint, args, dict(base.get(f.name) or {}), f"{prefix}{f.name}-"))
            continue
        v = getattr(args, f"{prefix}{f.name}".replace("-", "__"), None)
        if v is not None:
            values[f.name] = v
    return build(cls, values)
