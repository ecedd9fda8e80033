"""BudgetResult: the budget stage's budget.json (run_budget writes it; the printout, MLflow and the report read it).

The top level is typed; the records below it (an optimum, the trained shapes, a source, the paper check)
stay plain dicts: their keys depend on what was feasible and on the law set, and their readers
(text.py, report.py) already treat every optional key as optional. A key missing from an older
budget.json reads as None (or empty), so older files keep printing; the keys every reader needs
(budget, the law's formula) must be there, and a malformed one (a wrong JSON type; costs without a
mode) is an error naming the file and the field. Written as strict JSON: a non-finite number becomes null
and a flag (files.finite_or_null), with sorted keys, so the same result gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from drscaling.errors import DrscalingError
from drscaling.files import finite_or_null, read_json, write_json

BUDGET_HINT = "run the budget stage (`drscaling budget` or `dvc repro budget`) first"


@dataclass
class BudgetResult:
    """What run_budget found. Optimum dicts: n, d, loss, cost {data, train, infer, total}, label, flags,
    ... or {"error": why} when infeasible; `recommendation` is the one `include_inference` asks for."""

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

    def to_dict(self) -> dict[str, Any]:
        """Every field (not copied: the records are shared with this result)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

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
    def from_dict(cls, d: Any, where: str | Path = "budget result") -> BudgetResult:
        if isinstance(d, BudgetResult):
            return d
        if not isinstance(d, dict):
            raise DrscalingError(f"{where}: not a budget result (expected a JSON object); {BUDGET_HINT}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        for key, kinds in _KINDS.items():
            if key not in values:
                if key in _REQUIRED:
                    raise DrscalingError(f"{where}: no '{key}'; {BUDGET_HINT}")
                continue
            value = values[key]
            if not isinstance(value, kinds) or (kinds == (int, float) and isinstance(value, bool)):
                raise DrscalingError(f"{where}: malformed '{key}' ({type(value).__name__}); {BUDGET_HINT}")
        for key, inner in (("law", "formula"), ("costs", "mode")):
            if key in values and not isinstance(values[key].get(inner), str):
                raise DrscalingError(f"{where}: malformed '{key}' (no '{inner}'); {BUDGET_HINT}")
        return cls(**values)

    @classmethod
    def read(cls, path: str | Path) -> BudgetResult:
        return cls.from_dict(read_json(path, what="budget result", hint=BUDGET_HINT), path)


# The JSON type of each field (checked on reading), and the fields every reader needs.
_KINDS: dict[str, tuple[type, ...]] = {
    "budget": (int, float), "include_inference": (bool,), "law": (dict,), "costs": (dict,),
    "recommendation": (dict,), "without_inference": (dict,), "with_inference": (dict,), "laws": (str,),
    "laws_path": (str,), "law_set": (str,), "search": (dict,), "fitted_range": (dict,), "chance": (dict,),
    "shapes": (dict,), "best_measured_run": (dict,), "sources": (list,), "figures": (list,),
    "figure_budgets": (list,), "paper_check": (dict,), "flags": (list,), "fit_meta": (dict,),
    "budget_path": (str,),
}
_REQUIRED = ("budget", "law")
