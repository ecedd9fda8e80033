"""CostsFile: the measure stage's costs.json (costs.combine writes it; the budget and towers read it).

The contract (costs.py's docstring has the meaning of every key):
    {"device_hour_usd", "device", "measured_at", "machine", "repeats", "duration_s", "flags",
     "inference": {"points": [...], "fit": {"a", "b"[, "interval"]}},
     "training":  {"points": [...], "fit": {"a", "b"[, "interval"]}},   # absent before training runs
     "towers": [...]}                                                   # absent without dual towers
Every key but a section's fit may be missing from an older or hand-written file: a reader then gets
None (or an empty list) and decides whether it can do without (written again, such a file gains the
description keys as null). Points and towers stay plain dicts:
their keys differ by kind (tower role, repeats or not), and the readers look up one or two of them.
Written as strict JSON with sorted keys (files.write_json), so a file read and written again is
byte-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drscaling.errors import DrscalingError
from drscaling.files import finite_copy, read_json, write_json

MEASURE_HINT = ("run `drscaling measure` first (inference $/token on Triton; training $/step comes from the "
                "training runs): `make measure` writes the versioned costs/costs.json the pipeline reads "
                "(commit it), or use --costs paper")


@dataclass
class CostFit:
    """usd = a * N**b (per token for inference, per step for training); null (a degenerate fit) is NaN."""

    a: float
    b: float
    interval: dict[str, Any] | None = None  # {"a": [lo, hi], "b": [lo, hi], "level", "method"}

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b} | ({} if self.interval is None else {"interval": self.interval})

    @classmethod
    def from_dict(cls, d: Any) -> CostFit:
        interval = d.get("interval")
        if interval is not None and not isinstance(interval, dict):
            raise TypeError(f"'interval' is {type(interval).__name__}, not an object")
        return cls(a=_number(d["a"]), b=_number(d["b"]), interval=interval)

    def usable(self, section: str, path: Path | str, hint: str) -> tuple[float, float]:
        """(a, b), or an error naming the file and the section when the fit predicts nothing."""
        a, b = self.a, self.b
        if not (math.isfinite(a) and math.isfinite(b) and a > 0):
            raise DrscalingError(f"{path}: '{section}' fit has a={a}, b={b} (need a finite a > 0); {hint}")
        return a, b


@dataclass
class CostSection:
    """The measured points of one cost (inference or training) and the power law fitted to them."""

    points: list[dict[str, Any]]
    fit: CostFit

    def to_dict(self) -> dict[str, Any]:
        return {"points": self.points, "fit": self.fit.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> CostSection:
        points = d.get("points", [])
        if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
            raise TypeError("'points' is not a list of objects")
        return cls(points=points, fit=CostFit.from_dict(d["fit"]))


@dataclass
class CostsFile:
    """costs.json. A key missing from an older file reads as None; the description keys are always
    written (null when unknown), the sections and towers only when there are some."""

    device_hour_usd: float | None = None
    device: str | None = None
    measured_at: str | None = None
    machine: dict[str, Any] | None = None
    repeats: int | None = None
    duration_s: float | None = None
    flags: list[str] | None = None
    inference: CostSection | None = None
    training: CostSection | None = None
    towers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        plain = {"device_hour_usd": self.device_hour_usd, "device": self.device, "measured_at": self.measured_at,
                 "machine": self.machine, "repeats": self.repeats, "duration_s": self.duration_s,
                 "flags": self.flags}
        out: dict[str, Any] = dict(plain)  # always written (null when unknown), as combine always has
        for name in ("inference", "training"):
            section = getattr(self, name)
            if section is not None:
                out[name] = section.to_dict()
        if self.towers:
            out["towers"] = self.towers
        return out

    def write(self, path: str | Path) -> Path:
        """Atomically, as strict JSON (a degenerate fit's NaN as null)."""
        write_json(path, finite_copy(self.to_dict()))
        return Path(path)

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = "costs") -> CostsFile:
        """The file's object, checked; a malformed field is an error naming `where` and the field."""
        if not isinstance(d, dict):
            raise DrscalingError(f"{where}: not a costs file (expected a JSON object)")
        key = ""
        try:
            values = {}
            for key, kind in _PLAIN_KEYS:
                values[key] = _optional(d, key, kind)
            out = cls(**values)
            key = "flags"
            out.flags = None if d.get(key) is None else [str(f) for f in d[key]]
            for key in ("inference", "training"):
                if d.get(key) is not None:
                    setattr(out, key, CostSection.from_dict(d[key]))
            key = "towers"
            towers = d.get(key) or []
            if not isinstance(towers, list) or not all(isinstance(t, dict) for t in towers):
                raise TypeError("not a list of objects")
            out.towers = towers
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DrscalingError(f"{where}: malformed '{key}' ({exc!r}); re-run `drscaling measure`") from None
        return out

    @classmethod
    def read(cls, path: str | Path) -> CostsFile:
        return cls.from_dict(read_json(path, what="costs file", hint=MEASURE_HINT), path)


_PLAIN_KEYS = (("device_hour_usd", float), ("device", str), ("measured_at", str), ("machine", dict),
               ("repeats", int), ("duration_s", float))


def _number(value: Any) -> float:
    """A fit's number: null (how a non-finite one is written) reads back as NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
        raise TypeError(f"{value!r} is not a number")
    return float("nan") if value is None else float(value)


def _optional(d: dict[str, Any], key: str, kind: type) -> Any:
    """d[key] as `kind` (None when absent or null); the value itself when it is already a `kind`, so
    what is written back is what was read (an int stays an int where a float is allowed)."""
    value = d.get(key)
    if value is None:
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{value!r} is not a number")
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{value!r} is not {kind.__name__}")
    return value
