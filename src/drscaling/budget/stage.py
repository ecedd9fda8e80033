"""The budget stage: laws (fitted or published) + costs -> budget.json, Figs 7/8, a printable answer.

The answer leads with what was measured: the best trained shape the budget can afford (the law's CE
at the D the budget leaves it, and whether that D is inside the fitted range) and the best trained
run that fits the budget. The continuous optimum follows, labelled interpolation or extrapolation;
an extrapolation is never presented as a measurement. budget.json is strict JSON (no Infinity/NaN).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from drscaling.budget.cost_model import HUMAN_USD_PER_PAIR, CostModel, build_cost_model, read_annotation_cost
from drscaling.budget.law_sets import DEFAULT_NEGATIVES, LawSource, resolve_laws
from drscaling.budget.result import BudgetResult
from drscaling.budget.solve import (
    EXTRAPOLATION_FACTOR, N_MAX, N_MIN, Chance, FittedRange, SearchRange, best_measured_run, check_budget,
    compare_sources, law_loss, law_loss_samples, solve, solve_shapes,
)
from drscaling.design import BUDGET_FILE, PAPER_BUDGET, POINTS_FILE
from drscaling.errors import DrscalingError
from drscaling.files import atomic_path
from drscaling.laws import FitResult
from drscaling.numbers import finite_or_none



def formula(fit: FitResult) -> str:
    """The law as a short string (figure titles, the printout, the report): the law's own where it
    has one, else built here for the paper's three forms."""
    own = getattr(fit, "formula", None)
    if callable(own):
        try:
            return str(own())
        except (DrscalingError, KeyError, ValueError):  # a form without a formula: built below
            pass
    p = fit.params
    if fit.kind == "ND":
        return (f"L(N,D) = [({p['A']:.3g}/N)^({p['alpha']:.3g}/{p['beta']:.3g}) + {p['B']:.3g}/D]"
                f"^{p['beta']:.3g} + {p['delta']:.3g}")
    if fit.kind == "N":
        return f"L(N) = ({p['A']:.3g}/N)^{p['alpha']:.3g} + {p['delta']:.3g}"
    if fit.kind == "D":
        return f"L(D) = ({p['B']:.3g}/D)^{p['beta']:.3g} + {p['delta']:.3g}"
    return f"L[{fit.kind}] " + ", ".join(f"{k}={v:.3g}" for k, v in p.items())


def joint_fit(source: LawSource, law: str) -> FitResult:
    laws = source.laws
    if law not in laws:
        have = ", ".join(sorted(laws)) or "none"
        if source.published is not None:
            notes = " ".join(source.published.notes)
            raise DrscalingError(
                f"law set {source.name} has no '{law}' law (it has: {have}). {notes} The budget needs "
                "the joint L(N,D): use --laws paper (MS MARCO) or a fitted laws.json"
            )
        raise DrscalingError(
            f"{source.name} has no '{law}' law (it has: {have}); run a joint sweep and `drscaling fit` first"
        )
    fit = laws[law]
    if not is_joint(fit):
        raise DrscalingError(f"law '{law}' is a {fit.kind} law; the budget needs a joint L(N,D)")
    return fit


def is_joint(fit: FitResult) -> bool:
    """A law of both N and D: the registry's form says so where there is one; else kind "ND"."""
    try:
        form = getattr(fit, "form", None)
    except DrscalingError:  # an unregistered kind: judge by the name below
        form = None
    if form is not None and hasattr(form, "needs_n") and hasattr(form, "needs_d"):
        return bool(form.needs_n and form.needs_d)
    return fit.kind == "ND"


# --------------------------------------------------------------------------------------------
# Figures 7 and 8
# --------------------------------------------------------------------------------------------


def budget_figure(
    fit: FitResult,
    costs: CostModel,
    budgets: Sequence[float],
    include_inference: bool,
    search: SearchRange,
    path: Path,
    fitted_range: FittedRange | None = None,
    chance: Chance | None = None,
) -> Path | None:
    """Fig 7 / 8 (draw_budget_figure) written to `path`; None when no budget affords a model."""
    import matplotlib.pyplot as plt

    fig = draw_budget_figure(fit, costs, budgets, include_inference, search, fitted_range, chance)
    if fig is None:
        return None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def draw_budget_figure(
    fit: FitResult,
    costs: CostModel,
    budgets: Sequence[float],
    include_inference: bool,
    search: SearchRange,
    fitted_range: FittedRange | None = None,
    chance: Chance | None = None,
):
    """Predicted loss vs N for several budgets, each with the 95% band of the law's bootstrap refits;
    a dot marks each budget's optimum; the fitted N range is shaded and chance drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = search.grid()
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    optima = []
    for i, budget in enumerate(sorted(budgets)):
        ds = costs.data_pairs(ns, budget, include_inference)
        ok = ds >= 1.0
        if not ok.any():
            continue
        ls = law_loss(fit, ns[ok], ds[ok])
        color = f"C{i % 10}"
        ax.plot(ns[ok], ls, color=color, label=f"${budget:,.0f} (predicted)")
        samples = law_loss_samples(fit, ns[ok], ds[ok])
        if samples.shape[0]:
            lo, hi = np.nanpercentile(samples, [2.5, 97.5], axis=0)
            ax.fill_between(ns[ok], lo, hi, color=color, alpha=0.15, lw=0,
                            label=None if len(optima) else "95% bootstrap band")
        j = int(np.argmin(ls))
        ax.scatter([ns[ok][j]], [ls[j]], color=color, zorder=3)
        optima.append(float(ls[j]))
    if not optima:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = fitted_range.n if fitted_range else (None, None)
    if lo is not None or hi is not None:
        ax.axvspan(lo or ns[0], hi or ns[-1], color="0.85", alpha=0.5, zorder=0, label="fitted N")
    if chance is not None:
        ax.axhline(chance.loss, color="0.4", ls=":", lw=1, label=f"chance ln({chance.negatives + 1})")
    # The curves shoot up where the model leaves no money for data; keep the optima readable.
    ax.set_ylim(top=30 * max(optima))
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("predicted contrastive entropy")
    which = "including" if include_inference else "excluding"
    fig_no = 8 if include_inference else 7
    ax.set_title(f"Fig {fig_no}: predicted loss vs model size, {which} inference ({costs.mode} costs)",
                 fontsize=9)
    ax.legend(title="budget (dots: its optimum)", fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return fig


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _default_shapes(fit: FitResult) -> dict[str, float]:
    shapes = {str(s): float(n) for s, n in zip(fit.points.get("shape") or [], fit.points.get("n") or [],
                                                strict=False) if s}
    for p in (getattr(fit, "heldout", None) or {}).get("points", []):
        if p.get("shape"):
            shapes[str(p["shape"])] = float(p["n"])
    return shapes


def _law_runs(fit: FitResult) -> list[dict[str, Any]]:
    """The trained runs behind the law: its fitted points and its held-out points."""
    pts = fit.points
    keys = ("shape", "n", "d", "loss", "source")
    size = len(pts.get("loss") or [])
    rows = [{k: (pts.get(k) or [None] * size)[i] for k in keys} for i in range(size)]
    for p in (getattr(fit, "heldout", None) or {}).get("points", []):
        rows.append({"shape": p.get("shape"), "n": p.get("n"), "d": p.get("d"),
                     "loss": p.get("observed"), "source": p.get("source")})
    return rows


def _chance(source: LawSource, negatives: int | None, default_negatives: int | None) -> Chance:
    if negatives is not None:
        return Chance(int(negatives), "given")
    if source.negatives is not None:
        return Chance(source.negatives, "the laws' metadata" if source.published is None
                      else f"the paper ({source.name})")
    if default_negatives is not None:
        return Chance(int(default_negatives), "params.yaml train.eval.negatives")
    return Chance(DEFAULT_NEGATIVES, "default")


def _paper_check(source: LawSource, costs: CostModel, without: dict[str, Any],
                 with_inf: dict[str, Any] | None, budget: float) -> dict[str, Any] | None:
    published = source.published
    if published is None or not published.claims:
        return None
    return {
        "law_set": published.name,
        "dataset": published.dataset,
        "paper_costs": costs.mode == "paper",
        "paper_budget": float(PAPER_BUDGET),
        "at_paper_budget": math.isclose(budget, PAPER_BUDGET),
        "claims": dict(published.claims),
        "without_inference_n": without.get("n"),
        "with_inference_n": (with_inf or {}).get("n"),
        "notes": list(published.notes),
    }


@dataclasses.dataclass(frozen=True)
class _Problem:
    """What every part of the budget's answer is computed from: the joint law, the costs, the budget
    and the checks each optimum gets (fitted range, chance)."""

    fit: FitResult
    costs: CostModel
    budget: float
    include_inference: bool
    search: SearchRange
    fitted_range: FittedRange
    chance: Chance

    @property
    def checks(self) -> dict[str, Any]:
        return {"fitted_range": self.fitted_range, "chance": self.chance}


def _cost_source_flags(annotation_cost_path: str | Path | None, law_sources: list[str]) -> list[str]:
    """A flag when the annotation cost prices another source than the joint law was fitted on."""
    if annotation_cost_path is None or not law_sources:
        return []
    cost_source = read_annotation_cost(annotation_cost_path)[0]
    if cost_source in law_sources:
        return []
    return [f"the annotation cost is for source '{cost_source}' but the joint law was fitted on {law_sources}"]


def _optima(pb: _Problem) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The continuous optimum without and with inference (the latter when its costs are known; an
    error in it is reported, not raised, unless the recommendation follows it)."""
    without = solve(pb.fit, pb.costs, pb.budget, False, pb.search, **pb.checks)
    if not pb.costs.has_inference:
        return without, None
    try:
        return without, solve(pb.fit, pb.costs, pb.budget, True, pb.search, **pb.checks)
    except DrscalingError as exc:
        if pb.include_inference:
            raise
        return without, {"error": str(exc)}


def _shape_optimum(pb: _Problem, shapes: dict[str, float] | None) -> dict[str, Any] | None:
    """The best trained shape the budget affords (default shapes: the joint law's)."""
    shape_map = shapes if shapes is not None else _default_shapes(pb.fit)
    if not shape_map:
        return None
    try:
        return solve_shapes(pb.fit, pb.costs, pb.budget, pb.include_inference, shape_map, **pb.checks)
    except DrscalingError as exc:
        return {"error": str(exc)}


def _best_run(pb: _Problem, measured_runs: Sequence[dict[str, Any]] | None, law_sources: list[str]
              ) -> dict[str, Any] | None:
    """The best trained run within the budget, among runs of the law's sources (default runs: the law's points)."""
    runs = list(measured_runs) if measured_runs is not None else _law_runs(pb.fit)
    if law_sources:
        runs = [r for r in runs if not r.get("source") or r.get("source") in law_sources]
    return best_measured_run(runs, pb.costs, pb.budget, pb.include_inference)


def _source_comparison(pb: _Problem, laws: dict[str, FitResult], usd_per_pair: float | None,
                       cost_paths: Sequence[str | Path]) -> dict[str, Any]:
    """Each source at its own price: human at the configured $/pair (the paper's 0.6 by default),
    the others from their annotation cost files."""
    source_costs = {"human": usd_per_pair if usd_per_pair is not None else HUMAN_USD_PER_PAIR}
    for p in cost_paths:
        name, usd = read_annotation_cost(p)
        source_costs[name] = usd
    return compare_sources(laws, pb.costs, pb.budget, source_costs,
                           include_inference=pb.include_inference and pb.costs.has_inference,
                           factor=pb.fitted_range.factor, chance=pb.chance)


def _budget_figures(pb: _Problem, budgets: list[float], fig_dir: Path) -> list[str]:
    """Fig 7 (without inference) and, when inference costs are known, Fig 8; the paths drawn."""
    cases = [(False, "fig7_budget_no_inference.png")]
    if pb.costs.has_inference:
        cases.append((True, "fig8_budget_with_inference.png"))
    figures = [budget_figure(pb.fit, pb.costs, budgets, inference, pb.search, fig_dir / name, pb.fitted_range,
                             pb.chance) for inference, name in cases]
    return [str(f) for f in figures if f is not None]


def _law_record(fit: FitResult, law: str) -> dict[str, Any]:
    return {"name": law, "kind": fit.kind, "formula": formula(fit), "params": dict(fit.params),
            "r2": finite_or_none(getattr(fit, "r2", None)), "flags": list(fit.flags)}


def run_budget(
    laws_path: str | Path,
    budget: float,
    include_inference: bool = False,
    costs_mode: str = "paper",
    costs_path: str | Path | None = None,
    out_dir: str | Path = "reports/budget",
    *,
    usd_per_pair: float | None = None,
    annotation_cost_path: str | Path | None = None,
    source_cost_paths: Sequence[str | Path] = (),
    steps: int | None = None,
    corpus_pages: float | None = None,
    tokens_per_page: float | None = None,
    shapes: dict[str, float] | None = None,
    measured_runs: Sequence[dict[str, Any]] | None = None,
    n_min: float = N_MIN,
    n_max: float = N_MAX,
    figure_budgets: Sequence[float] | None = None,
    law: str = "ND",
    extrapolation_factor: float = EXTRAPOLATION_FACTOR,
    negatives: int | None = None,
    default_negatives: int | None = None,
) -> dict[str, Any]:
    """Recommend (N, D) for a budget; write out_dir/budget.json and Figs 7/8; return the result.

    `laws_path`: a laws.json from the fit stage, or a published law set's name (law_sets.LAW_SETS:
    "paper", "paper-msmarco", "paper-t2ranking"), which needs no fit and no artifacts.
    The recommendation follows `include_inference`; the other case is reported alongside when its
    costs are known. `shapes` (name -> N) are the trained shapes to choose from (default: the joint
    law's); `measured_runs` (shape, n, d, loss, source) the trained runs (default: the law's points).
    Optima further than `extrapolation_factor` outside the fitted N or D range are flagged, and so
    is a predicted CE at or above ln(negatives + 1) (negatives: given, else the laws' metadata,
    else `default_negatives`, else 256).
    """
    budget = check_budget(budget)
    source = resolve_laws(laws_path)
    out_dir = Path(out_dir)
    fit = joint_fit(source, law)
    costs = build_cost_model(
        costs_mode, costs_path, need_inference=include_inference, usd_per_pair=usd_per_pair,
        annotation_cost_path=annotation_cost_path, steps=steps, corpus_pages=corpus_pages,
        tokens_per_page=tokens_per_page,
    )
    fitted_range = (FittedRange.of_published(source.published, extrapolation_factor)
                    if source.published is not None else FittedRange.of_fit(fit, extrapolation_factor))
    pb = _Problem(fit, costs, budget, include_inference, SearchRange(n_min=n_min, n_max=n_max), fitted_range,
                  _chance(source, negatives, default_negatives))
    law_sources = sorted({s for s in fit.points.get("source") or [] if s})
    flags = _cost_source_flags(annotation_cost_path, law_sources)
    without, with_inf = _optima(pb)
    cost_paths = [*([annotation_cost_path] if annotation_cost_path is not None else []), *source_cost_paths]
    budgets = list(figure_budgets) if figure_budgets else [budget * f for f in (0.1, 0.3, 1, 3, 10)]
    result = BudgetResult(
        budget=budget,
        include_inference=include_inference,
        laws=source.name,
        laws_path=str(source.path) if source.path is not None else None,
        law_set=source.published.name if source.published is not None else None,
        law=_law_record(fit, law),
        costs=costs.to_dict(),
        search=dataclasses.asdict(pb.search),
        fitted_range=fitted_range.to_dict(),
        chance=pb.chance.to_dict(),
        recommendation=with_inf if include_inference else without,
        without_inference=without,
        with_inference=with_inf,
        shapes=_shape_optimum(pb, shapes),
        best_measured_run=_best_run(pb, measured_runs, law_sources),
        sources=_source_comparison(pb, source.laws, usd_per_pair, cost_paths),
        figures=_budget_figures(pb, budgets, out_dir / "figures"),
        figure_budgets=budgets,
        paper_check=_paper_check(source, costs, without, with_inf, budget),
        flags=flags,
        fit_meta={k: source.meta[k] for k in ("results", "n_bootstrap", "seed") if k in source.meta},
        budget_path=str(out_dir / BUDGET_FILE),
    )
    return result.write(out_dir / BUDGET_FILE)  # strict JSON: a non-finite number as null and a flag

def trained_runs(laws_path: str | Path) -> tuple[dict[str, float] | None, list[dict[str, Any]] | None]:
    """(shape -> N, the trained runs) from points.jsonl, which `drscaling fit` writes beside laws.json;
    (None, None) when there is none (run_budget then takes both from the joint law)."""
    points = Path(laws_path).with_name(POINTS_FILE)
    if not points.exists():
        return None, None
    rows = [json.loads(line) for line in points.read_text().splitlines() if line.strip()]
    shapes = {r["shape"]: r["n"] for r in rows if r.get("shape")}
    runs = [{"shape": r.get("shape"), "n": r.get("n"), "d": r.get("d"), "loss": r.get("ce_test_min"),
             "source": r.get("source"), "config_key": r.get("config_key")} for r in rows]
    return shapes, runs
