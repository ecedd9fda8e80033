"""params.yaml: the one place stage parameters live (DVC tracks it; the CLI and MLproject read it).

Precedence: dataclass default < params.yaml section < command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from drscaling.errors import DrscalingError

# The project's root: params.yaml, mlflow.db, pipelines/, costs/ and serving/ live there.
REPO = Path(__file__).resolve().parents[2]


# Where the stages write, relative to the repository (or a study folder): params.yaml's default paths.
ARTIFACTS = "artifacts"


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


def field_notes(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the class source (`name: type = default  # note`): its --help.
    Inherited fields take their base class's note unless the subclass redeclares them with one."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a frozen build): the flags keep their generic help
            continue
        notes |= {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.MULTILINE)}
    return notes


def add_flags(parser: argparse.ArgumentParser, cls: type, values: dict[str, Any] | None = None, where: str = "",
              prefix: str = "") -> None:
    """One --flag per dataclass field (nested dataclasses get a prefix, e.g. --eval-negatives). `values`:
    the params.yaml section the flags override (its key `where`, e.g. train): --help shows its value as
    the default where it sets one, else the dataclass default."""
    hints = typing.get_type_hints(cls)
    notes = field_notes(cls)
    values = values or {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(hint):
            add_flags(parser, hint, dict(values.get(f.name) or {}), key, prefix=f"{prefix}{f.name}-")
            continue
        if values.get(f.name) is not None:
            default = f"{show(values[f.name])}, from params.yaml {key}"
        else:
            default = show(f.default) if f.default is not dataclasses.MISSING else "none"
        text = notes.get(f.name) or f.name.replace("_", " ")
        action = parser.add_argument(
            f"--{prefix}{f.name}".replace("_", "-"), dest=f"{prefix}{f.name}".replace("-", "__"),
            type=_flag_type(hint), default=None, help=f"{text} (default: {default})".replace("%", "%%"),
        )
        action.params_key = key if where else None


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


def lookup(values: dict[str, Any], key: str) -> Any:
    """The value at a dotted key (e.g. budget.measured.steps) of loaded params; None where it is not set."""
    value: Any = values
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def show(value: Any) -> str:
    """A default as --help prints it: "" for an empty string, lists space-separated."""
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return " ".join(show(v) for v in value)
    return str(value)
