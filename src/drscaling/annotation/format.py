"""<source>.jsonl and its companions: the format every annotation source writes and training reads.

    <source>.jsonl        {"qid": str, "pid": str, "query": str}, one per annotated passage
    <source>.cost.json    what producing them cost (the budget model's Zdata)
    <source>.rejected.jsonl, <source>.rejected.cost.json   a set that failed the checks (checks.publish)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from drscaling.errors import DrscalingError
from drscaling.files import read_jsonl, write_json, write_jsonl


@dataclass
class Annotations:
    """One source's output before it is written: the rows of <source>.jsonl and its cost JSON.
    `finish` runs once they are published (a generated source drops its partial run then)."""

    rows: list[dict]
    cost: dict
    finish: Callable[[], None] = field(default=lambda: None, repr=False)


def companion(out: str | Path, suffix: str) -> Path:
    """A file that belongs to an annotations file, beside it: ict.jsonl -> ict<suffix>."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + suffix)


def cost_path(out: str | Path) -> Path:
    return companion(out, ".cost.json")


def rejected_path(out: str | Path) -> Path:
    """Where pairs that failed the checks are kept for inspection (with their cost file beside)."""
    return companion(out, ".rejected.jsonl")


def write_annotations(out: str | Path, ann: Annotations) -> dict:
    """Cost first, then the pairs (the .jsonl appearing marks the set complete); both atomic."""
    write_json(cost_path(out), ann.cost)
    write_jsonl(out, ann.rows)
    return ann.cost


def load_annotations(path: str | Path) -> pd.DataFrame:
    if not Path(path).exists():
        raise DrscalingError(f"annotations not found: {path} (run `drscaling annotate` for that source)")
    return pd.DataFrame(read_jsonl(path, ("qid", "pid", "query"))).astype(str)
