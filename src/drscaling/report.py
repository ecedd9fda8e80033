"""The Markdown report: coefficient tables like the paper's Tables 1 and 2, the held-out check,
the figures, and the budget recommendation when one was computed."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from drscaling.errors import DrscalingError
from drscaling.files import read_json, write_text
from drscaling.laws import FitResult, load_laws, load_laws_meta

# The paper's MS MARCO values (Tables 1 and 2, eqs. 9-10), printed beside ours for comparison.
PAPER_ROWS = {
    "N": {"A": 3.22e4, "alpha": 0.53, "delta": 0.04, "r2": 0.991},
    "D": {"B": 3.49e3, "beta": 1.05, "delta": 0.05, "r2": 0.954},
    "ND": {"A": 3.6e4, "B": 7.1e3, "alpha": 0.56, "beta": 1.31, "delta": 0.03},
}


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


def _flags(fit: FitResult) -> str:
    return "; ".join(fit.flags).replace("|", "/") if fit.flags else "–"


def _table(
    title: str, params: tuple[str, ...], heads: tuple[str, ...], rows: list[tuple[str, FitResult]],
    paper: dict[str, float] | None,
) -> list[str]:
    lines = [f"### {title}", "", "| Law | " + " | ".join(heads) + " | R² | points | flags |",
             "|---" * (len(heads) + 4) + "|"]
    for name, fit in rows:
        cells = [_with_ci(fit, p) for p in params]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fit.r2:.3f} | {fit.n_points} | "
                     f"{_flags(fit)} |")
    if paper:
        cells = [_num(paper.get(p)) for p in params]
        lines.append("| paper (MS MARCO) | " + " | ".join(cells) + f" | {_num(paper.get('r2'))} | – | – |")
    lines += ["", "Values are point estimates with bootstrap 95% intervals in brackets.", ""]
    return lines


def _heldout(fit: FitResult) -> list[str]:
    h = fit.heldout
    if not h:
        return []
    lines = [
        "### Held-out prediction (Fig 6 check)",
        "",
        f"The joint law was fitted on points with N < {_num(h['n_cut'])} and predicts the rest: "
        f"mean |relative error| {h['mean_abs_rel_error']:.1%}, max {h['max_abs_rel_error']:.1%}.",
        "",
        "| N | D | observed | predicted | relative error |",
        "|---|---|---|---|---|",
    ]
    for p in h["points"]:
        lines.append(f"| {_num(p['n'])} | {_num(p['d'])} | {p['observed']:.4f} | "
                     f"{p['predicted']:.4f} | {p['rel_error']:+.1%} |")
    return [*lines, ""]


def _figures(paths: list[Path], base: Path, title: str) -> list[str]:
    if not paths:
        return []
    lines = [f"### {title}", ""]
    for p in paths:
        rel = Path(os.path.relpath(p.absolute(), base)).as_posix()
        lines += [f"![{p.stem}]({rel})", ""]
    return lines


def _money(x: float) -> str:
    return f"${x:,.0f}" if abs(x) >= 100 else f"${x:,.2f}"


def _ci_text(ci: list[float] | None, fmt: str | None = None) -> str:
    if not ci:
        return ""
    lo, hi = (format(v, fmt) if fmt else _num(v) for v in ci)
    return f" [{lo}, {hi}]"


def _optimum_rows(label: str, opt: dict[str, Any] | None) -> list[str]:
    if not opt:
        return []
    if "error" in opt:
        return [f"| {label} | not feasible: {opt['error']} | | | | | |"]
    c = opt["cost"]
    return [
        f"| {label} | {_num(opt['n'])}{_ci_text(opt.get('n_ci95'))} | {opt['d']:,.0f} | "
        f"{opt['loss']:.4f}{_ci_text(opt.get('loss_ci95'), '.4f')} | {_money(c['data'])} | "
        f"{_money(c['train'])} | {_money(c['infer'])} |"
    ]


def _budget_section(budget_path: Path, base: Path) -> list[str]:
    res = read_json(budget_path, what="budget result")
    costs = res.get("costs", {})
    lines = [
        "## Budget allocation (Section 5)",
        "",
        f"Budget {_money(res['budget'])}, {costs.get('mode', '?')} costs, recommendation "
        f"{'including' if res.get('include_inference') else 'excluding'} inference. "
        f"Law: `{res['law']['formula']}`.",
        "",
        "Cost model:",
        "",
        "```",
        *costs.get("derivation", []),
        "```",
        "",
        "| Case | N [95% CI] | D | predicted CE [95% CI] | data | training | inference |",
        "|---|---|---|---|---|---|---|",
        *_optimum_rows("without inference", res.get("without_inference")),
        *_optimum_rows("with inference", res.get("with_inference")),
        "",
    ]
    for flag in (res.get("recommendation") or {}).get("flags", []) + res.get("flags", []):
        lines.append(f"- ⚠ {flag}")
    shapes = res.get("shapes")
    if shapes and "best" in shapes:
        lines += ["", "Among trainable shapes:", "", "| shape | N | D | predicted CE |",
                  "|---|---|---|---|"]
        for s in shapes["shapes"]:
            if s["feasible"]:
                mark = " **(best)**" if s["shape"] == shapes["best"]["shape"] else ""
                lines.append(f"| {s['shape']}{mark} | {_num(s['n'])} | {s['d']:,.0f} | "
                             f"{s['loss']:.4f}{_ci_text(s.get('loss_ci95'), '.4f')} |")
            else:
                lines.append(f"| {s['shape']} | {_num(s['n'])} | – | over budget |")
    elif shapes and "error" in shapes:
        lines += ["", f"Among trainable shapes: {shapes['error']}"]
    sources = res.get("sources") or []
    if sources:
        lines += ["", "Annotation sources at a fixed model:", "",
                  "| source | $/pair | D | predicted CE | note |", "|---|---|---|---|---|"]
        for s in sources:
            if "loss" in s:
                d = "∞" if s["d"] == float("inf") else f"{s['d']:,.0f}"
                lines.append(f"| {s['source']} | {s['usd_per_pair']:g} | {d} | "
                             f"{s['loss']:.4f}{_ci_text(s.get('loss_ci95'), '.4f')} | "
                             f"{s.get('note', '')} |")
            else:
                lines.append(f"| {s['source']} | – | – | – | {s.get('note', '')} |")
    lines.append("")
    # Figures live next to budget.json; look there first so the report works from any directory.
    figs = []
    for f in res.get("figures", []):
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
    laws_path: str | Path, out_path: str | Path, budget_path: str | Path | None = None
) -> Path:
    """Write the Markdown report; figures are linked relative to the report's folder."""
    laws_path = Path(laws_path)
    out_path = Path(out_path)
    laws = load_laws(laws_path)
    meta = load_laws_meta(laws_path)
    base = out_path.parent.absolute()
    lines = ["# Scaling laws for dense retrieval — report", ""]
    if meta.get("results"):
        lines += [f"Fitted from `{meta['results']}` (loss: `{meta.get('loss', 'ce_test_min')}`, "
                  f"{meta.get('n_bootstrap', '?')} bootstrap resamples).", ""]
    lines += ["## Fitted laws", ""]
    n_rows = [(k, v) for k, v in laws.items() if v.kind == "N"]
    d_rows = sorted(((k, v) for k, v in laws.items() if v.kind == "D"), key=lambda kv: kv[0])
    nd_rows = [(k, v) for k, v in laws.items() if v.kind == "ND"]
    if n_rows:
        lines += _table("Table 1: model-size scaling L(N) = (A/N)^α + δ", ("A", "alpha", "delta"),
                        ("A", "α", "δ_N"), n_rows, PAPER_ROWS["N"])
    if d_rows:
        lines += _table("Table 2: data-size scaling L(D) = (B/D)^β + δ", ("B", "beta", "delta"),
                        ("B", "β", "δ_D"), d_rows, PAPER_ROWS["D"])
    if nd_rows:
        lines += _table("Joint law L(N,D) = [(A/N)^(α/β) + B/D]^β + δ",
                        ("A", "B", "alpha", "beta", "delta"), ("A", "B", "α", "β", "δ"), nd_rows,
                        PAPER_ROWS["ND"])
        for _, fit in nd_rows:
            lines += _heldout(fit)
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
            res = read_json(budget_path, what="budget result")
            for fig in res.get("figures", []):
                if Path(fig).exists():
                    mlflow.log_artifact(fig, artifact_path="report/figures")
            rec = res.get("recommendation") or {}
            if "n" in rec:
                mlflow.log_metrics({"budget.n_opt": rec["n"], "budget.d_opt": rec["d"],
                                    "budget.loss": rec["loss"]})
    finally:
        if active is None:
            mlflow.end_run()
    return run.info.run_id
