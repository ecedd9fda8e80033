"""The budget results as files: BudgetResult is budget.json (run_budget writes it; the printout and the
report read it), TowerBudgetResult towers.json (run_tower_budget: the dual-tower deployments).

The top level is typed; the records below it (an optimum, the trained shapes, a source, a deployment)
stay plain dicts: their keys depend on what was feasible and on the law set, and their readers
(text.py, report.py, towers.py) already treat every optional key as optional. A key missing from an
older file reads as None (or empty), so older files keep printing; the keys every reader needs (the
budget, the law's formula, ...) must be there, and a malformed one (a wrong JSON type; costs without a
mode) is an error naming the file and the field. Written as strict JSON with sorted keys, so the same
result gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from drscaling.errors import DrscalingError
from drscaling.files import finite_or_null, read_json, write_json

NUMBER = (int, float)


class ResultFile:
    """What the result files share (each subclass a dataclass): the dict written, reading it back
    checked against `kinds` (each field's JSON type) and `required`, and naming the file on errors."""

    what: ClassVar[str]
    hint: ClassVar[str]
    kinds: ClassVar[dict[str, tuple[type, ...]]]
    required: ClassVar[tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]:
        """Every field (not copied: the records are shared with this result)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: Any, where: str | Path | None = None) -> Any:
        """d's fields (null and unknown keys left out: the defaults stand), each of its JSON type; a
        required one missing or any of the wrong type is an error naming `where` and the field."""
        if isinstance(d, cls):
            return d
        where = where or cls.what
        if not isinstance(d, dict):
            raise DrscalingError(f"{where}: not a {cls.what} (expected a JSON object); {cls.hint}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        values = {k: v for k, v in d.items() if k in known and v is not None}
        for key, kind in cls.kinds.items():
            if key not in values:
                if key in cls.required:
                    raise DrscalingError(f"{where}: no '{key}'; {cls.hint}")
                continue
            value = values[key]
            if not isinstance(value, kind) or (kind == NUMBER and isinstance(value, bool)):
                raise DrscalingError(f"{where}: malformed '{key}' ({type(value).__name__}); {cls.hint}")
        cls.check(values, where)
        return cls(**values)

    @classmethod
    def check(cls, values: dict[str, Any], where: str | Path) -> None:
        """What a field's type does not say (a subclass's own checks)."""

    @classmethod
    def read(cls, path: str | Path) -> Any:
        return cls.from_dict(read_json(path, what=cls.what, hint=cls.hint), path)


@dataclass
class BudgetResult(ResultFile):
    """What run_budget found. Optimum dicts: n, d, loss, cost {data, train, infer, total}, label, flags,
    ... or {"error": why} when infeasible; `recommendation` is the one `include_inference` asks for."""

    what: ClassVar[str] = "budget result"
    hint: ClassVar[str] = "run the budget stage (`drscaling budget` or `dvc repro budget`) first"
    kinds: ClassVar[dict[str, tuple[type, ...]]] = {
        "budget": NUMBER, "include_inference": (bool,), "law": (dict,), "costs": (dict,),
        "recommendation": (dict,), "without_inference": (dict,), "with_inference": (dict,), "laws": (str,),
        "laws_path": (str,), "law_set": (str,), "search": (dict,), "fitted_range": (dict,), "chance": (dict,),
        "shapes": (dict,), "best_measured_run": (dict,), "sources": (list,), "figures": (list,),
        "figure_budgets": (list,), "paper_check": (dict,), "flags": (list,), "fit_meta": (dict,),
        "budget_path": (str,),
    }
    required: ClassVar[tuple[str, ...]] = ("budget", "law")

    budget: float
    law: dict[str, Any]  # name, kind, formula, params, r2, flags
    include_inference: bool = False
    costs: dict[str, Any] = field(default_factory=dict)  # CostModel.to_dict(): mode, each cost's a/b, derivation, notes
    recommendation: dict[str, Any] = field(default_factory=dict)
    without_inference: dict[str, Any] = field(default_factory=dict)
    with_inference: dict[str, Any] | None = None  # None without inference costs
    laws: str | None = None  # the laws' name: a laws.json path or a published law set
    laws_path: str | None = None
    law_set: str | None = None  # the published law set's name, None for fitted laws
    search: dict[str, Any] | None = None
    fitted_range: dict[str, Any] | None = None
    chance: dict[str, Any] | None = None
    shapes: dict[str, Any] | None = None  # {"best", "shapes"} or {"error"}; None without trained shapes
    best_measured_run: dict[str, Any] | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    figure_budgets: list[float] = field(default_factory=list)
    paper_check: dict[str, Any] | None = None
    flags: list[str] = field(default_factory=list)
    fit_meta: dict[str, Any] = field(default_factory=dict)
    budget_path: str | None = None

    def write(self, path: str | Path) -> dict[str, Any]:
        """Write strict JSON (atomically); a non-finite number becomes null and a flag. Returns what was written."""
        doc = self.to_dict()
        replaced: list[str] = []
        finite_or_null(doc, replaced=replaced)
        if replaced:
            self.flags.append("non-finite number(s) written as null: " + ", ".join(replaced))
        write_json(path, doc)
        return doc

    @classmethod
    def check(cls, values: dict[str, Any], where: str | Path) -> None:
        for key, inner in (("law", "formula"), ("costs", "mode")):
            if key in values and not isinstance(values[key].get(inner), str):
                raise DrscalingError(f"{where}: malformed '{key}' (no '{inner}'); {cls.hint}")


@dataclass
class TowerBudgetResult(ResultFile):
    """towers.json: each deployment's cost split and measured CE (towers.compare_towers's records), which
    fit the budget (`ranking`, lowest CE first), the best and the cheapest."""

    what: ClassVar[str] = "tower budget result"
    hint: ClassVar[str] = "run `drscaling budget --towers <distillation metrics.json>` first"
    kinds: ClassVar[dict[str, tuple[type, ...]]] = {
        "budget": NUMBER, "workload": (dict,), "costs_mode": (str,), "deployments": (list,),
        "device_hour_usd": NUMBER, "ranking": (list,), "best": (str,), "cheapest": (str,), "flags": (list,),
        "metrics_path": (str,), "costs_path": (str,),
    }
    required: ClassVar[tuple[str, ...]] = ("budget", "workload", "costs_mode", "deployments")

    budget: float
    workload: dict[str, Any]  # TowerWorkload as a dict
    costs_mode: str
    deployments: list[dict[str, Any]]
    device_hour_usd: float | None = None
    ranking: list[str] = field(default_factory=list)
    best: str | None = None
    cheapest: str | None = None
    flags: list[str] = field(default_factory=list)
    metrics_path: str | None = None
    costs_path: str | None = None  # None on paper costs

    def write(self, path: str | Path) -> dict[str, Any]:
        """Write strict JSON (atomically; files.write_json refuses a non-finite number). Returns the dict."""
        doc = self.to_dict()
        write_json(path, doc)
        return doc
