"""Solving the budget: for a budget, all money not spent on training and serving the model buys data,
D(N) = (budget - Ztrain(N) - Zinfer(N)) / Zdata, so the choice is one number, N: minimise L(N, D(N))
over log N (continuous), or over the shapes one has actually trained. The joint law's bootstrap
samples are pushed through the same optimisation to give 95% intervals.

Every answer is checked against what the law knows: an N or a D outside the fitted range by more
than a factor (either direction) is an extrapolation, and a predicted contrastive entropy at or
above ln(negatives + 1), the loss of a retriever that scores at random, is meaningless.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from drscaling.budget.cost_model import CostModel
from drscaling.budget.law_sets import DEFAULT_NEGATIVES, PaperLawSet
from drscaling.errors import DrscalingError
from drscaling.laws import FitResult, predict

N_MIN = 1e4
N_MAX = 1e12
GRID_POINTS = 2001  # over log N: 0.005 decades apart on the default range
EXTRAPOLATION_FACTOR = 2.0


# --------------------------------------------------------------------------------------------
# The law, at one parameter set or at every bootstrap sample
# --------------------------------------------------------------------------------------------


def law_loss(fit: FitResult, n: Any, d: Any) -> np.ndarray:
    """L(N, D) of the law's point estimate, through the law registry (one definition)."""
    return np.asarray(predict(fit.kind, fit.params, n=n, d=d), dtype=float)


def n_samples(fit: FitResult) -> int:
    """How many bootstrap samples the law carries (0 when some parameter has none)."""
    lengths = {len(fit.bootstrap.get(p) or []) for p in fit.params} if fit.bootstrap else {0}
    return min(lengths) if lengths else 0


def law_loss_samples(fit: FitResult, n: Any, d: Any) -> np.ndarray:
    """L(N, D) under every bootstrap sample: shape (samples, points); (0, points) without samples."""
    n_arr = np.atleast_1d(np.asarray(n, dtype=float))
    d_arr = np.atleast_1d(np.asarray(d, dtype=float))
    size = np.broadcast(n_arr, d_arr).size
    if n_samples(fit) == 0:
        return np.empty((0, size))
    return np.asarray(fit.predict_bootstrap(n=n_arr, d=d_arr), dtype=float).reshape(-1, size)


def _ci(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------------------------
# What the law knows: the fitted range and chance
# --------------------------------------------------------------------------------------------

Bounds = tuple[float | None, float | None]


def _bounds(values: Sequence[Any]) -> Bounds:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    return (min(xs), max(xs)) if xs else (None, None)


def _range_text(b: Bounds) -> str:
    return f"{'?' if b[0] is None else f'{b[0]:.3g}'}..{'?' if b[1] is None else f'{b[1]:.3g}'}"


@dataclass(frozen=True)
class FittedRange:
    """The N and D the law was fitted on (and checked against, held-out points included); a value
    further than `factor` outside it, in either direction, is an extrapolation."""

    n: Bounds = (None, None)
    d: Bounds = (None, None)
    factor: float = EXTRAPOLATION_FACTOR
    source: str = "no points"

    @classmethod
    def of_fit(cls, fit: FitResult, factor: float = EXTRAPOLATION_FACTOR) -> FittedRange:
        held = (getattr(fit, "heldout", None) or {}).get("points") or []
        ns = list(fit.points.get("n") or []) + [p.get("n") for p in held]
        ds = list(fit.points.get("d") or []) + [p.get("d") for p in held]
        inside = (getattr(fit, "heldout", None) or {}).get("refit") == "separate"  # held-out points are in the fit
        source = f"{len(fit.points.get('n') or fit.points.get('d') or [])} fitted points" + (
            "" if not held else f", {len(held)} of them held out of the check" if inside else f" + {len(held)} held out")
        return cls(_bounds(ns), _bounds(ds), _check_factor(factor), source)

    @classmethod
    def of_published(cls, published: PaperLawSet, factor: float = EXTRAPOLATION_FACTOR) -> FittedRange:
        return cls(published.n_range, published.d_range, _check_factor(factor),
                   f"the paper: {published.range_note}")

    def to_dict(self) -> dict[str, Any]:
        return {"n": list(self.n), "d": list(self.d), "factor": self.factor, "source": self.source}

    def _axis(self, axis: str, x: float, b: Bounds) -> tuple[bool | None, list[str]]:
        lo, hi = b
        if lo is None and hi is None:
            return None, [f"unchecked: the law records no fitted {axis} range"]
        if lo is not None and x < lo / self.factor:
            return False, [f"extrapolation: {axis}={x:.3g} is {lo / x:.3g}x below the smallest fitted "
                           f"{axis} ({lo:.3g})"]
        if hi is not None and x > hi * self.factor:
            return False, [f"extrapolation: {axis}={x:.3g} is {x / hi:.3g}x above the largest fitted "
                           f"{axis} ({hi:.3g})"]
        return True, []

    def check(self, n: float | None, d: float | None) -> dict[str, Any]:
        """{n_in_range, d_in_range, label, extrapolation, flags} of a point (n or d None: not checked)."""
        out: dict[str, Any] = {"flags": []}
        for axis, x, b in (("N", n, self.n), ("D", d, self.d)):
            ok, flags = self._axis(axis, float(x), b) if x is not None else (None, [])
            out[f"{axis.lower()}_in_range"] = ok
            out["flags"] += flags
        checked = [out[k] for k, x in (("n_in_range", n), ("d_in_range", d)) if x is not None]
        out["extrapolation"] = any(ok is False for ok in checked)
        out["label"] = ("extrapolation" if out["extrapolation"]
                        else "interpolation" if all(ok is True for ok in checked) else "unchecked")
        return out


def _check_factor(factor: float) -> float:
    factor = float(factor)
    if not (math.isfinite(factor) and factor >= 1):
        raise DrscalingError(f"extrapolation_factor must be a number >= 1 (got {factor:g})")
    return factor


@dataclass(frozen=True)
class Chance:
    """ln(negatives + 1): the contrastive entropy of random scores among `negatives` + 1 passages."""

    negatives: int = DEFAULT_NEGATIVES
    source: str = "default"

    def __post_init__(self) -> None:
        if not (isinstance(self.negatives, int) and self.negatives >= 1):
            raise DrscalingError(f"negatives must be an integer >= 1 (got {self.negatives!r})")

    @property
    def loss(self) -> float:
        return math.log(self.negatives + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"negatives": self.negatives, "loss": self.loss, "source": self.source}

    def check(self, loss: float, ci: list[float] | None = None) -> tuple[bool, list[str]]:
        if not math.isfinite(loss) or loss >= self.loss:
            return True, [f"meaningless: predicted CE {loss:.4g} >= ln({self.negatives + 1}) = "
                          f"{self.loss:.4f}, the CE of random scores with {self.negatives} negatives"]
        if ci and ci[1] >= self.loss:
            return False, [f"the 95% interval of the predicted CE reaches chance (ln({self.negatives + 1}) "
                           f"= {self.loss:.4f})"]
        return False, []


def annotate(point: dict[str, Any], rng: FittedRange, chance: Chance) -> dict[str, Any]:
    """Add the range and chance checks to a point with n, d, loss (and loss_ci95)."""
    checked = rng.check(point.get("n"), point.get("d"))
    above, chance_flags = chance.check(point["loss"], point.get("loss_ci95"))
    point.update({k: checked[k] for k in ("n_in_range", "d_in_range", "label", "extrapolation")})
    point["above_chance"] = above
    point["flags"] = [*point.get("flags", []), *checked["flags"], *chance_flags]
    return point


# --------------------------------------------------------------------------------------------
# Solving
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRange:
    """Where the continuous optimum is searched: N in [n_min, n_max], log-spaced."""

    n_min: float = N_MIN
    n_max: float = N_MAX
    grid_points: int = GRID_POINTS

    def grid(self) -> np.ndarray:
        if not (0 < self.n_min < self.n_max):
            raise DrscalingError(f"need 0 < n_min < n_max (got {self.n_min:g}, {self.n_max:g})")
        return np.geomspace(self.n_min, self.n_max, self.grid_points)


def check_budget(budget: float) -> float:
    try:
        budget = float(budget)
    except (TypeError, ValueError) as exc:
        raise DrscalingError(f"budget must be a number of dollars (got {budget!r})") from exc
    if not math.isfinite(budget) or budget <= 0:
        raise DrscalingError(f"budget must be a positive number of dollars (got {budget:g})")
    return budget


def cost_split(costs: CostModel, n: float, d: float, include_inference: bool) -> dict[str, float]:
    train = float(costs.z_train(n))
    infer = float(costs.z_infer(n)) if include_inference else 0.0
    data = float(costs.usd_per_pair * d)
    return {"data": data, "train": train, "infer": infer, "total": data + train + infer}


def minimum_cost(costs: CostModel, n_min: float, include_inference: bool) -> float:
    """The cheapest feasible point: the smallest model and one annotated pair."""
    return float(costs.model_cost(n_min, include_inference)) + costs.usd_per_pair


def solve(
    fit: FitResult,
    costs: CostModel,
    budget: float,
    include_inference: bool,
    search: SearchRange | None = None,
    *,
    fitted_range: FittedRange | None = None,
    chance: Chance | None = None,
) -> dict[str, Any]:
    """The continuous optimum N (and D = leftover budget / Zdata) minimising the joint law, checked
    against the fitted range (default: the law's points) and chance (default: 256 negatives)."""
    budget = check_budget(budget)
    search = search or SearchRange()
    fitted_range = fitted_range or FittedRange.of_fit(fit)
    chance = chance or Chance()
    if costs.usd_per_pair <= 0:
        raise DrscalingError("the $ per annotated pair must be > 0 to trade data against model size")
    cheapest = minimum_cost(costs, search.n_min, include_inference)
    if budget <= cheapest:
        raise DrscalingError(
            f"budget ${budget:,.2f} is below the cheapest feasible point: N={search.n_min:.3g} "
            f"parameters with one annotated pair costs ${cheapest:,.2f}"
            + (" (inference included)" if include_inference else "")
            + "; raise the budget or lower n_min"
        )
    ns = search.grid()
    ds = costs.data_pairs(ns, budget, include_inference)
    feasible = ds >= 1.0
    safe_d = np.where(feasible, ds, 1.0)
    losses = np.where(feasible, law_loss(fit, ns, safe_d), np.inf)
    i = int(np.argmin(losses))
    n_opt = _refine(fit, costs, budget, include_inference, np.log(ns), feasible, i)
    d_opt = float(costs.data_pairs(n_opt, budget, include_inference))
    flags = []
    if i == 0:
        flags.append(f"optimum at the lower search bound n_min={search.n_min:.3g}: smaller models may be better")
    if i == len(ns) - 1 and bool(feasible[-1]):
        flags.append(f"optimum at the upper search bound n_max={search.n_max:.3g}")
    out: dict[str, Any] = {
        "budget": budget,
        "include_inference": include_inference,
        "n": n_opt,
        "d": d_opt,
        "loss": float(law_loss(fit, [n_opt], [d_opt])[0]),
        "cost": cost_split(costs, n_opt, d_opt, include_inference),
        "n_ci95": None,
        "loss_ci95": None,
        "optimal_loss_ci95": None,
        "n_bootstrap": 0,
        "flags": flags,
    }
    out.update(_propagate(fit, ns, safe_d, feasible, n_opt, d_opt))
    return annotate(out, fitted_range, chance)


def _refine(
    fit: FitResult,
    costs: CostModel,
    budget: float,
    include_inference: bool,
    logn: np.ndarray,
    feasible: np.ndarray,
    i: int,
) -> float:
    """Polish the grid optimum with a bounded scalar search between its feasible neighbours."""
    lo = logn[max(i - 1, 0)]
    hi_idx = min(i + 1, len(logn) - 1)
    while hi_idx > i and not feasible[hi_idx]:
        hi_idx -= 1
    hi = logn[hi_idx]
    if hi <= lo:
        return float(np.exp(logn[i]))

    def objective(x: float) -> float:
        d = float(costs.data_pairs(math.exp(x), budget, include_inference))
        if d < 1.0:
            return math.inf
        return float(law_loss(fit, [math.exp(x)], [d])[0])

    res = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    best_x = res.x if res.fun <= objective(logn[i]) else logn[i]
    return float(math.exp(best_x))


def _propagate(
    fit: FitResult, ns: np.ndarray, ds: np.ndarray, feasible: np.ndarray, n_opt: float, d_opt: float,
) -> dict[str, Any]:
    """Bootstrap samples of the joint law -> 95% intervals of the optimal N and of the loss."""
    losses = law_loss_samples(fit, ns, ds)
    if losses.shape[0] == 0:
        return {}
    losses[:, ~feasible] = np.inf
    best = np.argmin(losses, axis=1)
    optimal_losses = losses[np.arange(len(losses)), best]
    at_choice = law_loss_samples(fit, [n_opt], [d_opt])[:, 0]
    return {
        "n_ci95": _ci(ns[best]),
        "loss_ci95": _ci(at_choice),  # the loss of the recommended (N, D) under each sample
        "optimal_loss_ci95": _ci(optimal_losses),  # each sample's own optimum
        "n_bootstrap": int(len(losses)),
    }


def solve_shapes(
    fit: FitResult,
    costs: CostModel,
    budget: float,
    include_inference: bool,
    shapes: dict[str, float],
    *,
    fitted_range: FittedRange | None = None,
    chance: Chance | None = None,
) -> dict[str, Any]:
    """The best of the shapes one has trained: each shape's N, the data the rest of the budget buys,
    the law's CE there, and whether that D is inside the fitted range."""
    budget = check_budget(budget)
    if not shapes:
        raise DrscalingError("no shapes given to choose from")
    fitted_range = fitted_range or FittedRange.of_fit(fit)
    chance = chance or Chance()
    rows = []
    for name, n in sorted(shapes.items(), key=lambda kv: kv[1]):
        n = float(n)
        if not (math.isfinite(n) and n > 0):
            raise DrscalingError(f"shape '{name}' has a non-positive parameter count ({n})")
        d = float(costs.data_pairs(n, budget, include_inference))
        row: dict[str, Any] = {"shape": name, "n": n, "feasible": d >= 1.0}
        if d >= 1.0:
            row.update(d=d, loss=float(law_loss(fit, [n], [d])[0]),
                       cost=cost_split(costs, n, d, include_inference), loss_ci95=None)
            samples = law_loss_samples(fit, [n], [d])
            if samples.shape[0]:
                row["loss_ci95"] = _ci(samples[:, 0])
            annotate(row, fitted_range, chance)
        else:
            row["model_cost"] = float(costs.model_cost(n, include_inference))
        rows.append(row)
    feasible = [r for r in rows if r["feasible"]]
    if not feasible:
        cheapest = min(rows, key=lambda r: r["model_cost"])
        raise DrscalingError(
            f"budget ${budget:,.2f} buys none of the shapes: the cheapest, {cheapest['shape']} "
            f"(N={cheapest['n']:.3g}), costs ${cheapest['model_cost'] + costs.usd_per_pair:,.2f} "
            "with one annotated pair"
        )
    best = min(feasible, key=lambda r: r["loss"])
    return {"best": best, "shapes": rows}


def best_measured_run(
    rows: Sequence[dict[str, Any]], costs: CostModel, budget: float, include_inference: bool,
) -> dict[str, Any] | None:
    """The lowest measured CE among trained runs (shape, n, d, loss) whose own cost fits the budget:
    a measurement, no law involved. None when no run fits."""
    fitting = []
    for r in rows:
        try:
            n, d, loss = float(r["n"]), float(r["d"]), float(r["loss"])
        except (KeyError, TypeError, ValueError):
            continue
        if not all(math.isfinite(x) for x in (n, d, loss)):
            continue
        cost = cost_split(costs, n, d, include_inference)
        if cost["total"] <= budget:
            fitting.append({"shape": r.get("shape"), "n": n, "d": d, "loss": loss, "cost": cost,
                            "source": r.get("source"), "config_key": r.get("config_key")})
    return min(fitting, key=lambda r: r["loss"]) if fitting else None


def compare_sources(
    laws: dict[str, FitResult],
    costs: CostModel,
    budget: float,
    source_usd_per_pair: dict[str, float],
    include_inference: bool = False,
    model_n: float | None = None,
    *,
    factor: float = EXTRAPOLATION_FACTOR,
    chance: Chance | None = None,
) -> list[dict[str, Any]]:
    """For a fixed model, the best loss each annotation source reaches with the budget.

    Each source uses its own data law "D@<source>" (fitted at one model size) and its own $/pair;
    the model's training (and serving) cost comes off the budget first.
    """
    budget = check_budget(budget)
    chance = chance or Chance()
    out = []
    for name in sorted(k for k in laws if k.startswith("D@")):
        source = name.split("@", 1)[1]
        fit = laws[name]
        n = model_n if model_n is not None else _law_model_n(fit)
        row: dict[str, Any] = {"source": source, "law": name, "model_n": n}
        usd = source_usd_per_pair.get(source)
        if usd is None:
            row["note"] = (
                f"no $/pair for source '{source}': run `drscaling annotate` for it or give its cost"
            )
            out.append(row)
            continue
        row["usd_per_pair"] = usd
        left = budget - (float(costs.model_cost(n, include_inference)) if n else 0.0)
        if left <= 0:
            row["note"] = f"the model (N={n:.3g}) alone costs more than the budget"
            out.append(row)
            continue
        if usd == 0:
            # Free pairs: the budget does not limit D, the corpus does; report the law's floor.
            row.update(d=None, d_unlimited=True, loss=fit.params["delta"],
                       note="free annotation: D is limited by the corpus, not the budget; loss -> delta")
            out.append(row)
            continue
        d = left / usd
        row.update(d=d, d_unlimited=False, loss=float(predict(fit.kind, fit.params, d=[d])[0]))
        if n_samples(fit):
            row["loss_ci95"] = _ci(np.asarray(fit.predict_bootstrap(d=[d]), dtype=float)[:, 0])
        rng = FittedRange(d=_bounds(fit.points.get("d") or []), factor=factor,
                          source=f"{name} fitted points")
        d_ok, d_flags = rng._axis("D", d, rng.d) if rng.d != (None, None) else (None, [])
        above, chance_flags = chance.check(row["loss"], row.get("loss_ci95"))
        row.update(d_in_range=d_ok, above_chance=above, flags=[*d_flags, *chance_flags])
        if row["flags"]:
            row["note"] = "; ".join(row["flags"])
        out.append(row)
    ranked = sorted((r for r in out if "loss" in r), key=lambda r: r["loss"])
    for rank, r in enumerate(ranked, start=1):
        r["rank"] = rank
    return out


def _law_model_n(fit: FitResult) -> float | None:
    n = fit.points.get("n") or []
    return float(np.median(n)) if n else None
