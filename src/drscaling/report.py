"""The Markdown report: coefficient tables like the paper's Tables 1 and 2, the held-out check,
the figures, and the budget recommendation when one was computed."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from drscaling.budget.result import BudgetResult, TowerBudgetResult
from drscaling.design import BUDGET_FILE, LAWS_FILE, METRICS_FILE, TOWER_BUDGET_FILE
from drscaling.errors import DrscalingError
from drscaling.files import read_json, write_text
from drscaling.laws import (
    FitResult,
    LawForm,
    load_laws,
    load_laws_meta,
    ordered_laws,
    registered_forms,
)
from drscaling.numbers import money as _money

# The paper's MS MARCO values (Tables 1 and 2, eqs. 9-10), printed beside ours for comparison:
# declared with each law form in the registry.
PAPER_ROWS = {f.kind: dict(f.reference) for f in registered_forms() if f.reference}


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    ax = abs(x)
    if ax != 0 and (ax >= 1e3 or ax < 1e-3):
        mant, exp = f"{x:.3e}".split("e")
        return f"{float(mant):.3g}×10^{int(exp)}"
    return f"{x:.3g}"


def _with_ci(fit: FitResult, p: str) -> str:
    value = _num(fit.params[p])
    ci = fit.ci95.get(p)
    return f"{value} [{_num(ci[0])}, {_num(ci[1])}]" if ci else value


def _flag_count(fit: FitResult) -> str:
    return f"{len(fit.flags)} (see below)" if fit.flags else "–"


def _table(form: LawForm, rows: list[tuple[str, FitResult]], paper: dict[str, float] | None
           ) -> list[str]:
    """One coefficient table per law form (the registry gives its parameters and headings)."""
    heads = [form.headings.get(p, p) for p in form.params]
    lines = [f"### {form.title} {form.formula_text}", "",
             "| Law | " + " | ".join(heads) + " | R² | points | flags |",
             "|---" * (len(heads) + 4) + "|"]
    for name, fit in rows:
        cells = [_with_ci(fit, p) for p in form.params]
        points = f"{fit.n_points} (dof {fit.dof})" if fit.dof is not None else str(fit.n_points)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fit.r2:.3f} | {points} | "
                     f"{_flag_count(fit)} |")
    if paper:
        cells = [_num(paper.get(p)) for p in form.params]
        lines.append("| paper (MS MARCO) | " + " | ".join(cells) + f" | {_num(paper.get('r2'))} | – | – |")
    lines += ["", "Values are point estimates with bootstrap 95% intervals in brackets; dof = points − "
              "parameters.", ""]
    for name, fit in rows:
        if fit.flags:
            lines += [f"Flags of {name}:", ""] + [f"- ⚠ {f}" for f in fit.flags] + [""]
    return lines


def _heldout(laws: dict[str, FitResult]) -> list[str]:
    """Every held-out check (paper Fig. 6): each law refit without its largest size (N for L(N) and the
    joint laws, D for L(D)) and made to predict it."""
    rows = []
    for name, fit in ordered_laws(laws):
        h = fit.heldout
        if not h:
            skipped = [f for f in fit.flags if f.startswith("held-out check skipped")]
            if skipped:
                rows.append(f"| {name} | – | – | – | – | – | – | {skipped[0].replace('|', '/')} |")
            continue
        axis = str(h.get("axis", "n")).upper()
        how = "law fitted without it" if h.get("refit") == "main fit" else "refit without it"
        limit = h.get("threshold", 0.1)
        for p in h["points"]:  # each point's own error: the law's flag is on the largest of them
            verdict = f"**over {limit:.0%}**" if abs(p["rel_error"]) > limit else "ok"
            sizes = ", ".join(f"{k.upper()} {_num(p[k])}" for k in ("n", "d") if k in p)
            interval = (f"[{p['interval'][0]:.4f}, {p['interval'][1]:.4f}]"
                        + ("" if p["inside_interval"] else " **outside**")) if "interval" in p else "–"
            rows.append(f"| {name} | largest {axis} {_num(h['cut'])} ({how}) | {sizes} | "
                        f"{p['observed']:.4f} | {p['predicted']:.4f} | {interval} | {abs(p['rel_error']):.1%} | "
                        f"{verdict} |")
    if not rows:
        return []
    return ["### Held-out predictions (Fig 6 check)", "",
            "Each law predicts points it was not fitted on; |predicted − observed| / observed above "
            "10% is flagged. The interval is the refit's 95% prediction interval (centred on its "
            "prediction: the spread of its bootstrap curves and the points' residual scatter): an "
            "observation outside it departs from the law the other points follow by more than their "
            "scatter explains.", "",
            "| Law | held out | point | observed | predicted | 95% prediction interval | error | check |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]


def _conv(state: Any) -> str:
    return "unknown" if state is None else ("yes" if state else "**no**")


def _points(laws: dict[str, FitResult]) -> list[str]:
    """Each law's points with their learning rate and training checks (converged, zero-shot CE)."""
    lines = ["### Points and their checks", "",
             "| Law | N | D | lr | CE (test, min) | zero-shot CE | converged |", "|---|---|---|---|---|---|---|"]
    for name, fit in ordered_laws(laws):
        pts = fit.points
        m = len(pts.get("loss", []))
        none = [None] * m
        for i in range(m):
            zero = (pts.get("ce_test_zero_shot") or none)[i]
            zs = f"{zero:.4f}" if isinstance(zero, int | float) and math.isfinite(zero) else "unknown"
            lr = (pts.get("lr") or none)[i]
            lines.append(f"| {name} | {_num((pts.get('n') or none)[i])} | "
                         f"{_num((pts.get('d') or none)[i])} | {f'{lr:g}' if lr is not None else 'unknown'} | "
                         f"{pts['loss'][i]:.4f} | {zs} | "
                         f"{_conv((pts.get('converged') or none)[i])} |")
    return [*lines, ""]


def _law_sections(laws: dict[str, FitResult]) -> list[str]:
    lines: list[str] = []
    for form in registered_forms():
        rows = sorted(((k, v) for k, v in laws.items() if v.kind == form.kind), key=lambda kv: kv[0])
        if rows:
            lines += _table(form, rows, PAPER_ROWS.get(form.kind))
    return lines + _heldout(laws) + _points(laws)


def _figures(paths: list[Path], base: Path, title: str) -> list[str]:
    if not paths:
        return []
    lines = [f"### {title}", ""]
    for p in paths:
        rel = Path(os.path.relpath(p.absolute(), base)).as_posix()
        lines += [f"![{p.stem}]({rel})", ""]
    return lines



def _ci_text(ci: list[float] | None, fmt: str | None = None) -> str:
    if not ci:
        return ""
    lo, hi = (format(v, fmt) if fmt else _num(v) for v in ci)
    return f" [{lo}, {hi}]"


def _label(opt: dict[str, Any]) -> str:
    """interpolation / **extrapolation** / unchecked, and **meaningless** at or above chance."""
    label = opt.get("label") or "–"
    parts = [f"**{label}**" if label == "extrapolation" else label]
    if opt.get("above_chance"):
        parts.append("**meaningless** (CE ≥ chance)")
    return ", ".join(parts)


def _flag_cell(opt: dict[str, Any]) -> str:
    return "; ".join(opt.get("flags") or []).replace("|", "/") or "–"


def _optimum_rows(label: str, opt: dict[str, Any] | None) -> list[str]:
    if not opt:
        return []
    if "error" in opt:
        return [f"| {label} | not feasible: {opt['error']} | | | | | | | |"]
    c = opt["cost"]
    return [
        f"| {label} | {_label(opt)} | {_num(opt['n'])}{_ci_text(opt.get('n_ci95'))} | {opt['d']:,.0f} | "
        f"{opt['loss']:.4f}{_ci_text(opt.get('loss_ci95'), '.4f')} | {_money(c['data'])} | "
        f"{_money(c['train'])} | {_money(c['infer'])} | {_flag_cell(opt)} |"
    ]


def _range_text(b: list[float | None] | None) -> str:
    lo, hi = b or (None, None)
    return f"{'?' if lo is None else _num(lo)} .. {'?' if hi is None else _num(hi)}"


def _measured_rows(res: BudgetResult) -> list[str]:
    """The trained shapes at the D the budget leaves them, best first in bold; the best trained run."""
    shapes = res.shapes
    lines = []
    if shapes and "best" in shapes:
        best = shapes["best"]
        lines += [f"**Best measured shape within the budget: {best['shape']}** (N {_num(best['n'])}, "
                  f"trained): predicted CE {best['loss']:.4f}{_ci_text(best.get('loss_ci95'), '.4f')} at "
                  f"the D = {best['d']:,.0f} pairs the budget leaves it ({_label(best)}).", "",
                  "| shape | N | D the budget leaves | predicted CE [95% CI] | range | flags |",
                  "|---|---|---|---|---|---|"]
        for s in shapes["shapes"]:
            if s["feasible"]:
                mark = " **(best)**" if s["shape"] == best["shape"] else ""
                lines.append(f"| {s['shape']}{mark} | {_num(s['n'])} | {s['d']:,.0f} | "
                             f"{s['loss']:.4f}{_ci_text(s.get('loss_ci95'), '.4f')} | {_label(s)} | "
                             f"{_flag_cell(s)} |")
            else:
                lines.append(f"| {s['shape']} | {_num(s['n'])} | – | over budget | – | – |")
        lines.append("")
    elif shapes and "error" in shapes:
        lines += [f"Among trained shapes: {shapes['error']}", ""]
    elif res.law_set:
        lines += [f"No measured shapes: `{res.law_set}` is a published law set.", ""]
    run = res.best_measured_run
    if run:
        lines += [f"Best trained run that fits the budget (a measurement, no law): {run.get('shape') or '?'} "
                  f"at N {_num(run['n'])}, D {run['d']:,.0f}: CE {run['loss']:.4f}, cost "
                  f"{_money(run['cost']['total'])}.", ""]
    return lines


def _paper_check_rows(check: dict[str, Any] | None) -> list[str]:
    if not check:
        return []
    claims = check.get("claims") or {}
    lines = [f"Paper check ({check.get('dataset')}, published coefficients, no fit; "
             f"{'at' if check.get('at_paper_budget') else 'not at'} the paper's "
             f"{_money(check['paper_budget'])}):", ""]
    for key, title in (("without_inference", "without inference"), ("with_inference", "with inference")):
        if check.get(f"{key}_n") is not None:
            lines.append(f"- {title}: N {_num(check[f'{key}_n'])}; the paper: {claims.get(key, '?')}")
    return lines + [f"- note: {n}" for n in check.get("notes", [])] + [""]


def _budget_section(budget_path: Path, base: Path) -> list[str]:
    res = BudgetResult.read(budget_path)
    costs = res.costs
    rng, chance = res.fitted_range, res.chance
    lines = [
        "## Budget allocation (Section 5)",
        "",
        f"Budget {_money(res.budget)}, {costs.get('mode', '?')} costs, recommendation "
        f"{'including' if res.include_inference else 'excluding'} inference. "
        f"Law: `{res.law['formula']}`" + (f" from `{res.laws}`" if res.laws else "") + ".",
        "",
    ]
    if rng:
        lines += [f"Fitted range: N {_range_text(rng.get('n'))}, D {_range_text(rng.get('d'))} "
                  f"({rng.get('source')}); an optimum more than {rng.get('factor', 2):g}× outside it is "
                  "an extrapolation.", ""]
    if chance:
        lines += [f"Chance: a predicted CE ≥ ln({chance['negatives'] + 1}) = {chance['loss']:.3f} "
                  f"({chance['negatives']} negatives) is meaningless.", ""]
    lines += [
        "Cost model:",
        "",
        "```",
        *costs.get("derivation", []),
        "```",
        "",
        *_measured_rows(res),
        "Continuous optimum (a prediction of the law, never a measurement):",
        "",
        "| Case | range | N [95% CI] | D | predicted CE [95% CI] | data | training | inference | flags |",
        "|---|---|---|---|---|---|---|---|---|",
        *_optimum_rows("without inference", res.without_inference),
        *_optimum_rows("with inference", res.with_inference),
        "",
    ]
    for flag in res.recommendation.get("flags", []) + res.flags:
        lines.append(f"- ⚠ {flag}")
    lines += ["", *_paper_check_rows(res.paper_check)]
    sources = res.sources
    if sources:
        lines += ["", "Annotation sources at a fixed model:", "",
                  "| source | $/pair | D | predicted CE | note |", "|---|---|---|---|---|"]
        for s in sources:
            if "loss" in s:
                d = "unlimited" if s.get("d") is None or s["d"] == float("inf") else f"{s['d']:,.0f}"
                lines.append(f"| {s['source']} | {s['usd_per_pair']:g} | {d} | "
                             f"{s['loss']:.4f}{_ci_text(s.get('loss_ci95'), '.4f')} | "
                             f"{s.get('note', '')} |")
            else:
                lines.append(f"| {s['source']} | – | – | – | {s.get('note', '')} |")
    lines.append("")
    # Figures live next to budget.json; look there first so the report works from any directory.
    figs = []
    for f in res.figures:
        near = budget_path.parent / "figures" / Path(f).name
        if near.exists():
            figs.append(near)
        elif Path(f).exists():
            figs.append(Path(f))
    lines += _figures(figs, base, "Figures 7 and 8")
    return lines


def _law_figures(laws_path: Path) -> list[Path]:
    """The figures the fit stage made with this laws.json (listed in its meta, so stale PNGs from an
    earlier run in the same folder are not shown)."""
    listed = load_laws_meta(laws_path).get("figures")
    if listed is not None:
        return [laws_path.parent / f for f in listed if (laws_path.parent / f).exists()]
    fig_dir = laws_path.parent / "figures"
    return sorted(fig_dir.glob("*.png")) if fig_dir.is_dir() else []


def write_report(
    laws_path: str | Path, out_path: str | Path, budget_path: str | Path | None = None,
    header: list[str] | None = None,
) -> Path:
    """Write the Markdown report; figures are linked relative to the report's folder. `header`: lines
    that say which data every number came from (a study's data and its version)."""
    laws_path = Path(laws_path)
    out_path = Path(out_path)
    laws = load_laws(laws_path)
    meta = load_laws_meta(laws_path)
    base = out_path.parent.absolute()
    lines = ["# Scaling laws for dense retrieval — report", "", *(header or [])]
    if meta.get("results"):
        method = meta.get("bootstrap_method", "pairs")
        lines += [f"Fitted from `{meta['results']}` (loss: `{meta.get('loss', 'ce_test_min')}`, "
                  f"{meta.get('n_bootstrap', '?')} {method} bootstrap refits, each from the "
                  "initialisation grid; 95% percentile intervals).", ""]
    lines += ["## Fitted laws", ""]
    lines += _law_sections(laws)
    skipped = meta.get("skipped") or {}
    if skipped:
        lines += ["Laws not fitted:", ""] + [f"- {k}: {v}" for k, v in sorted(skipped.items())] + [""]
    lines += _figures(_law_figures(laws_path), base, "Figures")
    if budget_path is not None:
        budget_path = Path(budget_path)
        if not budget_path.exists():
            raise DrscalingError(
                f"budget result not found: {budget_path}; run `drscaling budget` first or leave it out"
            )
        lines += _budget_section(budget_path, base)
    write_text(out_path, "\n".join(lines).rstrip() + "\n")
    return out_path


def log_report(
    report_path: str | Path, laws_path: str | Path | None = None,
    budget_path: str | Path | None = None,
) -> str:
    """Log the report (and the figures it links, laws.json, budget.json) to the active MLflow run.

    With no active run, one named "report" is started and ended here. Returns the run id.
    """
    from drscaling.tracking import configure

    configure()
    import mlflow

    report_path = Path(report_path)
    if not report_path.exists():
        raise DrscalingError(f"report not found: {report_path}; run `drscaling report` first")
    active = mlflow.active_run()
    run = active or mlflow.start_run(run_name="report")
    try:
        mlflow.log_artifact(str(report_path), artifact_path="report")
        if laws_path is not None:
            laws_path = Path(laws_path)
            mlflow.log_artifact(str(laws_path), artifact_path="report")
            for fig in _law_figures(laws_path):
                mlflow.log_artifact(str(fig), artifact_path="report/figures")
        if budget_path is not None and Path(budget_path).exists():
            mlflow.log_artifact(str(budget_path), artifact_path="report")
            res = BudgetResult.read(budget_path)
            for fig in res.figures:
                if Path(fig).exists():
                    mlflow.log_artifact(fig, artifact_path="report/figures")
            rec = res.recommendation
            if "n" in rec:
                mlflow.log_metrics({"budget.n_opt": rec["n"], "budget.d_opt": rec["d"],
                                    "budget.loss": rec["loss"]})
    finally:
        if active is None:
            mlflow.end_run()
    return run.info.run_id


def pipeline_summary(artifacts: str | Path = "artifacts") -> str:
    """What the default pipeline produced, from its files (also when `dvc repro` had nothing to do):
    each law with its points, dof, intervals, held-out errors and flags; the budget's answer; the
    ScalingNote towers' comparison when that pipeline has run."""
    from drscaling.budget import format_recommendation, format_tower_comparison
    from drscaling.laws.text import format_fits

    root = Path(artifacts)
    laws_path = root / "laws" / LAWS_FILE
    if not laws_path.exists():
        raise DrscalingError(f"{laws_path} not found: run `dvc repro` (or `drscaling fit`) first")
    parts = [format_fits(load_laws(laws_path))]
    budget = root / "budget" / BUDGET_FILE
    if budget.exists():
        parts.append(format_recommendation(BudgetResult.read(budget)))
    towers = root / "towers" / "budget" / TOWER_BUDGET_FILE
    if towers.exists():
        from drscaling.distill import format_comparison

        parts += [format_comparison(read_json(root / "towers" / "distilled" / METRICS_FILE)),
                  format_tower_comparison(TowerBudgetResult.read(towers))]
    parts.append("MLflow UI: mlflow ui --backend-store-uri sqlite:///mlflow.db  (then open http://127.0.0.1:5000)")
    return "\n".join(parts)
