"""What every command group shares: the default folders, params.yaml lookups and flag types."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

from drscaling import params
from drscaling.params import ARTIFACTS as A
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


# ---------------------------------------------------------------------------------------------
# --help: the effective default of a flag that reads params.yaml
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _params_file(path: str, stamp: tuple[int, int]) -> dict:
    return params.load(path)


def current_params() -> dict:
    """params.yaml as the commands will read it (parsed once per file version: --help asks often)."""
    path = params.default_path()
    if not path.exists():
        return {}
    st = path.stat()
    return _params_file(str(path), (st.st_mtime_ns, st.st_size))


def params_default(key: str, fallback=None, note: str = "") -> str:
    """'default: VALUE, from params.yaml KEY' where params.yaml sets the dotted KEY (e.g.
    budget.measured.steps), else 'default: FALLBACK' (the value the code uses when params.yaml is
    silent), with `note` after it; '%' escaped for argparse."""
    value = params.lookup(current_params(), key)
    if value is not None:
        text = f"default: {params.show(value)}, from params.yaml {key}"
    else:
        text = f"default: {params.show(fallback) if fallback is not None else 'none'}; params.yaml {key} is not set"
    return (text + (f"; {note}" if note else "")).replace("%", "%%")


def params_flag(p: argparse.ArgumentParser, flag: str, key: str, help: str, fallback=None, note: str = "",
                **kwargs) -> argparse.Action:
    """A flag whose value, when not given, comes from params.yaml KEY: its help ends with the effective
    default, and the action carries `params_key` (a test checks the help against params.yaml)."""
    action = p.add_argument(flag, help=f"{help} ({params_default(key, fallback, note)})", **kwargs)
    action.params_key = key
    return action


def prepared_flag(p: argparse.ArgumentParser, help: str = "canonical dataset folder (train/dev/test)") -> None:
    params_flag(p, "--prepared", "data.prepared", help, f"{A}/prepared")


VERBOSE_HELP = "show the libraries' own logging (transformers' load reports, MLflow's INFO lines, warnings)"


def verbose_flag(p: argparse.ArgumentParser) -> None:
    """--verbose after the command too; SUPPRESS: an absent flag keeps `drscaling --verbose CMD`'s value."""
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
