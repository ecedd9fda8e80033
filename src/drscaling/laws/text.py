"""The plain-text account of fitted laws that `drscaling fit` prints: each law with its points (N or
D, CE, zero-shot CE, converged), degrees of freedom, parameters with intervals, held-out errors and
flags."""

from __future__ import annotations

import math
from typing import Any

from drscaling.laws.checks import PREDICTION_LEVEL
from drscaling.laws.result import FitResult, ordered_laws


def _conv(state: Any, value: Any) -> str:
    if state is None:
        return "unknown"
    text = "yes" if state else "NO"
    return f"{text} ({value:+.1%})" if isinstance(value, int | float) and math.isfinite(value) else text


def _opt(x: Any, fmt: str = ".4f") -> str:
    return format(x, fmt) if isinstance(x, int | float) and math.isfinite(x) else "–"


def point_lines(fit: FitResult) -> list[str]:
    pts = fit.points
    axes = [a for a in ("n", "d") if a.upper() in fit.form.axes]
    m = len(pts.get("loss", []))
    conv = pts.get("converged") or [None] * m
    convergence = pts.get("convergence") or [None] * m
    zero = pts.get("ce_test_zero_shot") or [None] * m
    head = "".join(f"{a.upper():>12}" for a in axes)
    lines = [f"    {head}{'CE':>10}{'zero-shot':>11}  converged"]
    for i in range(m):
        sizes = "".join(f"{pts[a][i]:>12.4g}" for a in axes)
        lines.append(f"    {sizes}{pts['loss'][i]:>10.4f}{_opt(zero[i]):>11}  "
                     f"{_conv(conv[i], convergence[i])}")
    return lines


def _interval(point: dict, heldout: dict) -> str:
    if "interval" not in point:
        return ""
    lo, hi = point["interval"]
    where = "inside" if point["inside_interval"] else "OUTSIDE"
    return (f", {where} the refit's {heldout.get('interval_level', PREDICTION_LEVEL):g}% prediction interval "
            f"[{lo:.4f}, {hi:.4f}]")


def heldout_line(fit: FitResult) -> str:
    h = fit.heldout
    if not h:
        skipped = [f for f in fit.flags if f.startswith("held-out check skipped")]
        return f"  held-out: {skipped[0] if skipped else 'not run'}"
    axis = h.get("axis", "n").upper()
    how = "the law was fitted without it" if h.get("refit") == "main fit" else "refit without it"
    parts = [f"{p['predicted']:.4f} predicted vs {p['observed']:.4f} observed "
             f"({abs(p['rel_error']):.1%}){_interval(p, h)}" for p in h["points"][:4]]
    more = f" ... ({len(h['points'])} points)" if len(h["points"]) > 4 else ""
    verdict = "FLAGGED" if h["max_abs_rel_error"] > h.get("threshold", 0.1) else "ok"
    return (f"  held-out largest {axis} = {h['cut']:.4g} ({how}): " + "; ".join(parts) + more
            + f"; max error {h['max_abs_rel_error']:.1%} [{verdict}, threshold "
              f"{h.get('threshold', 0.1):.0%}]")


def format_fit(name: str, fit: FitResult) -> list[str]:
    form = fit.form
    method = f", bootstrap {fit.bootstrap_method} x{len(next(iter(fit.bootstrap.values()), []))}" \
        if fit.bootstrap else ""
    lines = [f"{name}: {form.formula_text}  ->  {fit.formula()}",
             f"  R^2 = {fit.r2:.3f}, {fit.n_points} points, {form.n_params} parameters, "
             f"dof = {fit.dof}{method}"]
    lines += point_lines(fit)
    for p in form.params:
        ci = fit.ci95.get(p)
        interval = f"  95% CI [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
        lines.append(f"  {p:>6} = {fit.params[p]:.4g}{interval}")
    lines.append(heldout_line(fit))
    if fit.flags:
        lines.append("  FLAGS:")
        lines += [f"    - {f}" for f in fit.flags]
    else:
        lines.append("  flags: none")
    return lines


def format_fits(fits: dict[str, FitResult], skipped: dict[str, str] | None = None) -> str:
    lines = ["fitted scaling laws (contrastive entropy):"]
    for name, fit in ordered_laws(fits):
        lines += [""] + format_fit(name, fit)
    for name, why in (skipped or {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)
