"""The budget result as text: measured shapes first, then the continuous optimum with its label.

Reads the result run_budget returns (or a budget.json, older ones included: missing keys are skipped)
through BudgetResult.
"""

from __future__ import annotations

from typing import Any

from drscaling.budget.result import BudgetResult
from drscaling.numbers import money


def interval(ci: list[float] | None, fmt: str) -> str:
    return f" (95% CI {format(ci[0], fmt)} .. {format(ci[1], fmt)})" if ci else ""


def count(n: float) -> str:
    """6.77e9 -> '6.77 billion'."""
    for scale, word in ((1e12, "trillion"), (1e9, "billion"), (1e6, "million"), (1e3, "thousand")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {word}"
    return f"{n:.3g}"


def bounds(b: list[float | None] | None) -> str:
    lo, hi = b or (None, None)
    return f"{'?' if lo is None else f'{lo:.3g}'}..{'?' if hi is None else f'{hi:.3g}'}"


def label_text(opt: dict[str, Any]) -> str:
    """'interpolation', 'EXTRAPOLATION (not measured)' or 'unchecked range', plus chance."""
    label = opt.get("label")
    parts = []
    if label == "extrapolation":
        parts.append("EXTRAPOLATION (not measured)")
    elif label == "interpolation":
        parts.append("interpolation")
    elif label:
        parts.append(f"{label} (fitted range unknown)")
    if opt.get("above_chance"):
        parts.append("MEANINGLESS: predicted CE at or above chance")
    return ", ".join(parts)


def _optimum(title: str, opt: dict[str, Any]) -> list[str]:
    if "error" in opt:
        return [f"{title}: not feasible — {opt['error']}"]
    label = label_text(opt)
    c = opt["cost"]
    lines = [
        f"{title}{' — ' + label if label else ''}:",
        f"  N = {opt['n']:.3g} non-embedding parameters ({count(opt['n'])}){interval(opt.get('n_ci95'), '.3g')}",
        f"  D = {opt['d']:,.0f} annotated pairs",
        f"  predicted contrastive entropy = {opt['loss']:.4f}{interval(opt.get('loss_ci95'), '.4f')}",
        f"  cost: data {money(c['data'])} + training {money(c['train'])} + inference "
        f"{money(c['infer'])} = {money(c['total'])}",
    ]
    return lines + [f"  ! {f}" for f in opt.get("flags", [])]


def _recommended(result: BudgetResult) -> str:
    """One line: a trained shape when one fits the budget, else what the continuous optimum is."""
    shapes = result.shapes or {}
    rec = result.recommendation or {}
    if "best" in shapes:
        b = shapes["best"]
        label = label_text(b)
        return (f"Recommended: {b['shape']} (a trained shape, N = {b['n']:.3g}) with D = {b['d']:,.0f} "
                f"annotated pairs, predicted CE {b['loss']:.4f}" + (f" [{label}]" if label else ""))
    why = "no trained shape fits the budget" if shapes else "no trained shapes"
    if "error" in rec or "n" not in rec:
        return f"Recommended: nothing: {why}, and the continuous optimum is not feasible"
    kind = rec.get("label") or "prediction"
    return (f"Recommended: {why}; the continuous optimum below (N = {rec['n']:.3g}) is "
            f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} of the law, not a measurement")


def _measured(result: BudgetResult) -> list[str]:
    shapes = result.shapes
    lines = []
    if result.law_set and not shapes:
        rng = result.fitted_range or {}
        lines.append(f"Measured shapes: none here (a published law set; its fitted range: N "
                     f"{bounds(rng.get('n'))}, D {bounds(rng.get('d'))})")
    elif not shapes:
        lines.append("Measured shapes: none given (train shapes and fit the laws, or pass shapes)")
    elif "error" in shapes:
        lines.append(f"Best measured shape within the budget: {shapes['error']}")
    else:
        b = shapes["best"]
        label = label_text(b)
        lines += [
            f"Best measured shape within the budget: {b['shape']} (N = {b['n']:.3g}, trained)",
            f"  D = {b['d']:,.0f} pairs the budget leaves it -> predicted CE {b['loss']:.4f}"
            f"{interval(b.get('loss_ci95'), '.4f')}{'  [' + label + ']' if label else ''}",
        ]
        lines += [f"  ! {f}" for f in b.get("flags", [])]
        others = [s for s in shapes["shapes"] if s is not b and s["shape"] != b["shape"]]
        for s in others:
            if s.get("feasible"):
                lines.append(f"  {s['shape']}: N = {s['n']:.3g}, D = {s['d']:,.0f} -> predicted CE "
                             f"{s['loss']:.4f}" + (f"  [{label_text(s)}]" if label_text(s) else ""))
            else:
                lines.append(f"  {s['shape']}: N = {s['n']:.3g}, over budget")
    run = result.best_measured_run
    if run:
        lines.append(
            f"Best measured run within the budget: {run.get('shape') or '?'} (N = {run['n']:.3g}) at "
            f"D = {run['d']:,.0f}: measured CE {run['loss']:.4f} (a measurement; it cost "
            f"{money(run['cost']['total'])})")
    elif shapes is not None or result.law_set is None:
        lines.append("Best measured run within the budget: none of the trained runs fits the budget")
    return lines


def _paper_check(check: dict[str, Any]) -> list[str]:
    claims = check.get("claims") or {}
    at = f"at {money(check['paper_budget'])}" if check.get("at_paper_budget") else "at this budget"
    lines = [f"Paper check (Section 5, {check.get('dataset')}, published coefficients, no fit"
             f"{'' if check.get('paper_costs') else '; NOT the paper costs'}):"]
    for key, title in (("without_inference", "without inference"), ("with_inference", "with inference")):
        n = check.get(f"{key}_n")
        if n is not None:
            lines.append(f"  {title:17} N = {n:.3g} ({count(n)}) {at}; the paper: {claims.get(key, '?')}")
    if not check.get("at_paper_budget"):
        lines.append(f"  (the paper's numbers are for {money(check['paper_budget'])}; run --budget "
                     f"{check['paper_budget']:.0f} to compare)")
    return lines + [f"  note: {n}" for n in check.get("notes", [])]


def format_recommendation(given: BudgetResult | dict[str, Any]) -> str:
    """A printable summary of run_budget's result (or of a budget.json's object)."""
    result = BudgetResult.from_dict(given)
    incl = "including" if result.include_inference else "excluding"
    lines = [
        f"Budget {money(result.budget)} ({result.costs['mode']} costs, {incl} inference)"
        + (f"; laws: {result.laws}" if result.laws else ""),
        f"Law: {result.law['formula']}",
    ]
    rng, chance = result.fitted_range, result.chance
    if rng:
        lines.append(f"Fitted range: N {bounds(rng['n'])}, D {bounds(rng['d'])} ({rng['source']}); "
                     f"more than {rng['factor']:g}x outside it is extrapolation")
    if chance:
        lines.append(f"Chance: a predicted CE >= ln({chance['negatives'] + 1}) = {chance['loss']:.4f} is "
                     f"meaningless ({chance['negatives']} negatives, from {chance['source']})")
    lines.append(_recommended(result))
    lines += _measured(result)
    lines += _optimum(f"Continuous optimum, {incl} inference", result.recommendation)
    other = result.with_inference if not result.include_inference else result.without_inference
    if other:
        which = "including" if not result.include_inference else "excluding"
        lines += _optimum(f"Continuous optimum, {which} inference (for comparison)", other)
    for s in result.sources:
        if "loss" in s:
            d = "unlimited" if s.get("d") is None else f"{s['d']:,.0f}"
            lines.append(
                f"Source {s['source']}: ${s['usd_per_pair']:g}/pair -> D = {d}, "
                f"predicted CE {s['loss']:.4f}{interval(s.get('loss_ci95'), '.4f')}"
                + (f"  [{s['note']}]" if s.get("note") else "")
            )
        else:
            lines.append(f"Source {s['source']}: {s.get('note', 'not compared')}")
    if result.paper_check:
        lines += _paper_check(result.paper_check)
    lines += [f"! {f}" for f in result.flags]
    if result.figures:
        lines.append("Figures: " + ", ".join(result.figures))
    return "\n".join(lines)
