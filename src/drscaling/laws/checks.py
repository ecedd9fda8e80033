"""What makes a law trustworthy, checked: inputs, point counts, convergence and zero-shot status of
the points, parameters at bounds, interval widths, R^2 and held-out error. Refusals raise; everything
else becomes a flag on the FitResult (laws.json, `drscaling fit`, the report, MLflow)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from drscaling.errors import DrscalingError
from drscaling.laws.forms import LawForm
from drscaling.numbers import finite_or_none
from drscaling.train.convergence import CONVERGENCE_TOLERANCE  # best test CE still improving > 2% late

R2_FLAG = 0.9
CI_RATIO_FLAG = 100.0  # a 95% interval whose hi/lo exceeds this spans orders of magnitude
CI_COLLAPSED = 1e-3  # a 95% interval narrower than this, relative to its estimate, is collapsed
HELDOUT_FLAG = 0.10  # |predicted - observed| / observed above this fails the held-out check
PREDICTION_LEVEL = 95.0  # the held-out check's prediction interval (percent)
TRUST_EXTRA_POINTS = 3  # a law is trusted from p + 3 points on

# Where a sweep preset sets the points of each law (pipelines/<preset>.yaml).
DEFAULT_SETTINGS = {
    "N": "add model sizes to `model.shapes` in the sweep preset (pipelines/<preset>.yaml)",
    "D": "add data sizes to `data.train_pairs` (`source.train_pairs` for a per-source law) in the "
         "sweep preset (pipelines/<preset>.yaml)",
    "N+D": "add sizes to `joint.shapes` and `joint.train_pairs` in the sweep preset "
           "(pipelines/<preset>.yaml)",
}


class TooFewPointsError(DrscalingError):
    """Not enough (distinct) points for a fit: fit_sweep skips such a fit instead of failing."""


class UnconvergedPointsError(DrscalingError):
    """Every point of a law is known to be unconverged: fit_sweep skips the law and says why."""


def check_inputs(
    form: LawForm,
    n: Sequence[float] | None,
    d: Sequence[float] | None,
    y: Sequence[float],
    setting: str | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Validate and convert; every problem raises DrscalingError naming the law and the point."""
    label = form.label
    named = {"N": n, "D": d, "loss": y}
    needed = [a for a in ("N", "D") if a in form.axes] + ["loss"]
    arrays: dict[str, np.ndarray] = {}
    for name in needed:
        if named[name] is None:
            raise DrscalingError(f"{label} needs {name} values")
        try:
            arrays[name] = np.asarray(named[name], dtype=float).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise DrscalingError(f"{label}: {name} values are not numbers ({exc})") from exc
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k} has {v}" for k, v in lengths.items())
        raise DrscalingError(f"{label}: mismatched array lengths ({desc}); give one value per point")
    for name, arr in arrays.items():
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise DrscalingError(f"{label}: non-finite {name} value ({arr[bad[0]]}) at point "
                                 f"{bad[0]}; remove or re-run that point")
        bad = np.flatnonzero(arr <= 0)
        if bad.size:
            what = "losses must be > 0" if name == "loss" else "sizes must be > 0"
            raise DrscalingError(f"{label}: non-positive {name} value ({arr[bad[0]]:g}) at point "
                                 f"{bad[0]}; {what}")
    _check_counts(form, arrays, setting or DEFAULT_SETTINGS[form.axes])
    return arrays.get("N"), arrays.get("D"), arrays["loss"]


def _check_counts(form: LawForm, arrays: dict[str, np.ndarray], setting: str) -> None:
    """Refuse fewer than p + 1 distinct points (and, for a joint law, < 2 values of N or of D)."""
    p, label = form.n_params, form.label
    need = f"fitting {p} free parameters needs at least {p + 1} distinct points " \
           f"({p + TRUST_EXTRA_POINTS} or more to be trusted); {setting}"
    m = len(arrays["loss"])
    if m < p + 1:
        raise TooFewPointsError(f"{label}: too few points ({m}); {need}")
    axes = [a for a in ("N", "D") if a in arrays]
    for name in axes if len(axes) > 1 else []:
        distinct = len(np.unique(arrays[name]))
        if distinct < 2:
            raise TooFewPointsError(
                f"{label}: too few distinct {name} values ({distinct}); the joint law needs points "
                f"at >= 2 values of N and of D; {setting}")
    distinct = len(np.unique(np.column_stack([arrays[a] for a in axes]), axis=0))
    if distinct < p + 1:
        what = f"{axes[0]} values" if len(axes) == 1 else "(N, D) points"
        raise TooFewPointsError(
            f"{label}: too few distinct {what} ({distinct} among {m} points); {need}")


# --------------------------------------------------------------------------------------------
# The points: converged? below their zero-shot CE?
# --------------------------------------------------------------------------------------------


def _where(form: LawForm, points: dict[str, list[Any]], i: int) -> str:
    parts = [f"{a}={points[a.lower()][i]:.3g}" for a in ("N", "D")
             if a in form.axes and a.lower() in points]
    shape = (points.get("shape") or [""] * (i + 1))[i]
    return ", ".join(parts) + (f" ({shape})" if shape else "")


def point_checks(form: LawForm, points: dict[str, list[Any]]) -> tuple[dict[str, Any], list[str]]:
    """Convergence and zero-shot status of the points (when the caller gave them).

    `points["converged"]`: True / False / None (unknown); `points["ce_test_zero_shot"]`: the CE
    before training (None or NaN: unknown). Raises UnconvergedPointsError when every point is known
    to be unconverged.
    """
    loss = points["loss"]
    m = len(loss)
    checks: dict[str, Any] = {}
    flags: list[str] = []
    if "converged" in points:
        state = list(points["converged"])
        bad = [i for i, s in enumerate(state) if s is False]
        unknown = [i for i, s in enumerate(state) if s is None]
        checks.update(unconverged=bad, convergence_unknown=unknown)
        if m and len(bad) == m:
            raise UnconvergedPointsError(
                f"{form.label}: all {m} points are unconverged (best test CE still improving by "
                f"more than {CONVERGENCE_TOLERANCE:.0%} over the last quarter of training); raise "
                "`train.steps` in the sweep preset (pipelines/<preset>.yaml) and re-run the sweep")
        if bad:
            flags.append(f"unconverged: {len(bad)} of {m} points had not reached a plateau "
                         f"(convergence > {CONVERGENCE_TOLERANCE:.0%}): "
                         + "; ".join(_where(form, points, i) for i in bad))
        if unknown:
            flags.append(f"convergence unknown for {len(unknown)} of {m} points (no measured "
                         "`convergence` in their rows: older results, or too few evaluations)")
    if "ce_test_zero_shot" in points:
        zs = [finite_or_none(v) for v in points["ce_test_zero_shot"]]
        above = [i for i, z in enumerate(zs) if z is not None and loss[i] >= z]
        unknown = [i for i, z in enumerate(zs) if z is None]
        checks.update(not_below_zero_shot=above, zero_shot_unknown=unknown)
        if above:
            flags.append(f"not below zero-shot: {len(above)} of {m} points ended at or above their "
                         "zero-shot CE: " + "; ".join(
                             f"{_where(form, points, i)} {loss[i]:.4g} >= {zs[i]:.4g}" for i in above))
        if unknown:
            flags.append(f"zero-shot CE unknown for {len(unknown)} of {m} points (no "
                         "`ce_test_zero_shot` in their rows)")
    return checks, flags


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------


def fit_flags(
    form: LawForm,
    theta: np.ndarray,
    bounds: list[tuple[float, float]],
    r2: float,
    ci95: dict[str, list[float]],
    n_points: int,
    converged: bool,
    failed: int,
    n_boot: int,
) -> list[str]:
    """Flags of the fit itself (the points' flags come from point_checks, held-out from heldout)."""
    p = form.n_params
    out = []
    if n_points < p + TRUST_EXTRA_POINTS:
        out.append(f"few points: {n_points} points for {p} parameters (dof {n_points - p}); a "
                   f"trustworthy law needs at least {p + TRUST_EXTRA_POINTS}")
    if not (r2 >= R2_FLAG):
        out.append(f"poor fit: R^2 = {r2:.3f} < {R2_FLAG}")
    for name, t, (lo, hi) in zip(form.params, theta, bounds, strict=True):
        tol = 1e-6 * max(1.0, abs(hi - lo))
        value = math.exp(t) if name in form.log_params else t
        if name == form.floor and t <= lo + tol:
            out.append(f"{name} at its lower bound: the data show no irreducible loss")
        elif name == form.floor and t >= hi - tol:
            out.append(f"{name} at its upper bound: the data show no power-law decrease")
        elif t <= lo + tol or t >= hi - tol:
            out.append(f"{name} at its bound ({value:.3g}): the fit is degenerate")
    for name, (lo, hi) in ci95.items():
        j = form.params.index(name)
        nat = (lambda v: math.exp(v)) if name in form.log_params else (lambda v: v)  # noqa: E731
        est, (b_lo, b_hi) = abs(nat(theta[j])), (nat(bounds[j][0]), nat(bounds[j][1]))
        if lo > 0 and hi / lo > CI_RATIO_FLAG:
            out.append(f"95% interval of {name} spans orders of magnitude [{lo:.3g}, {hi:.3g}]")
        elif (hi - lo) < CI_COLLAPSED * max(est, 1e-300):
            out.append(f"collapsed interval: 95% interval of {name} [{lo:.6g}, {hi:.6g}] is narrower "
                       f"than {CI_COLLAPSED:g} of the estimate (noiseless data, or stuck refits)")
        elif lo <= b_lo * (1 + 1e-6) or hi >= b_hi * (1 - 1e-6):
            out.append(f"95% interval of {name} [{lo:.3g}, {hi:.3g}] reaches the bound of {name} "
                       f"[{b_lo:.3g}, {b_hi:.3g}]: the data do not determine it")
    if not converged:
        out.append("optimiser did not report convergence for the best start")
    if n_boot and failed > 0.05 * n_boot:
        out.append(f"{failed} of {n_boot} bootstrap refits failed")
    return out


def heldout_flags(heldout: dict[str, Any] | None) -> list[str]:
    if not heldout:
        return []
    worst = heldout["max_abs_rel_error"]
    axis = heldout.get("axis", "n").upper()
    out: list[str] = []
    if worst > heldout.get("threshold", HELDOUT_FLAG):
        out = [f"held-out error: predicting the largest {axis} ({heldout['cut']:.3g}) is off by "
               f"{worst:.1%} > {heldout.get('threshold', HELDOUT_FLAG):.0%}"]
    outside = [p for p in heldout["points"] if p.get("inside_interval") is False]
    if outside:
        p = outside[0]
        more = f" (and {len(outside) - 1} more held-out point(s))" if len(outside) > 1 else ""
        out.append(f"held-out point outside the refit's {heldout.get('interval_level', PREDICTION_LEVEL):g}% "
                   f"prediction interval: observed {p['observed']:.4g} vs [{p['interval'][0]:.4g}, "
                   f"{p['interval'][1]:.4g}]{more}: the largest {axis} departs from the law the smaller ones "
                   f"follow by more than their scatter explains")
    return out


def r_squared(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
