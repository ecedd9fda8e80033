"""Fitting one law: point estimate, bootstrap intervals, checks and the held-out prediction."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from drscaling.errors import DrscalingError
from drscaling.laws.bootstrap import bootstrap
from drscaling.laws.checks import (
    HELDOUT_FLAG,
    PREDICTION_LEVEL,
    TooFewPointsError,
    check_inputs,
    fit_flags,
    heldout_flags,
    point_checks,
    r_squared,
)
from drscaling.laws.forms import LawForm, get_form
from drscaling.laws.optimize import FitConfig, Points, best_of_grid, single_threaded_blas
from drscaling.laws.result import FitResult


def fit_law(
    kind: str,
    loss: Sequence[float],
    n: Sequence[float] | None = None,
    d: Sequence[float] | None = None,
    config: FitConfig | None = None,
    extra_points: dict[str, list[Any]] | None = None,
    setting: str | None = None,
) -> FitResult:
    """Fit one registered law form to observed losses.

    extra_points: per-point bookkeeping kept with the fit (shape, source, config_key, ...); its
    "converged" (True/False/None) and "ce_test_zero_shot" lists are checked and flagged.
    setting: what to raise in the sweep preset when there are too few points (error messages).
    For L(N) and L(D) (config.heldout) a refit without the largest size predicts it (FitResult.heldout).
    """
    form = get_form(kind)
    cfg = config or FitConfig()
    if cfg.n_bootstrap < 0:
        raise DrscalingError(f"n_bootstrap must be >= 0 (got {cfg.n_bootstrap})")
    n_arr, d_arr, y = check_inputs(form, n, d, loss, setting)
    points: dict[str, list[Any]] = {"loss": y.tolist()}
    if n_arr is not None:
        points["n"] = n_arr.tolist()
    if d_arr is not None:
        points["d"] = d_arr.tolist()
    for key, values in (extra_points or {}).items():
        points.setdefault(key, list(values))
    checks, flags = point_checks(form, points)
    pts = Points(None if n_arr is None else np.log(n_arr), None if d_arr is None else np.log(d_arr), np.log(y))

    with single_threaded_blas():
        theta, fun, converged = best_of_grid(form, pts, cfg)
    samples, failed = bootstrap(form, theta, pts, cfg)
    pred = np.exp(pts.log_pred(form, theta))
    r2 = r_squared(y, pred)
    ci95: dict[str, list[float]] = {}
    if len(samples):
        lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
        ci95 = {p: [float(a), float(b)] for p, a, b in zip(form.params, lo, hi, strict=True)}
    bounds = pts.bounds(form, cfg)
    flags += fit_flags(form, theta, bounds, r2, ci95, len(y), converged, failed, cfg.n_bootstrap)
    checks.update(points=len(y), params=form.n_params, dof=len(y) - form.n_params,
                  residual_sd_log=float(np.sqrt(np.sum((pts.logy - np.log(pred)) ** 2)
                                                / (len(y) - form.n_params))),
                  bootstrap_failed=failed)
    fit = FitResult(
        kind=form.kind,
        params=form.from_theta(theta),
        r2=r2,
        residuals=(y - pred).tolist(),
        ci95=ci95,
        bootstrap={p: samples[:, j].tolist() for j, p in enumerate(form.params)},
        n_points=len(y),
        flags=flags,
        points=points,
        objective=fun,
        dof=len(y) - form.n_params,
        bootstrap_method=cfg.bootstrap_method if cfg.n_bootstrap else "",
        checks=checks,
    )
    if cfg.heldout and form.axes in ("N", "D"):
        _heldout_single(fit, form, cfg, setting)
    return fit


def _split_extra(points: dict[str, list[Any]], keep: np.ndarray, skip: tuple[str, ...]
                 ) -> dict[str, list[Any]]:
    return {k: [v for v, t in zip(vals, keep, strict=True) if t]
            for k, vals in points.items() if k not in skip and len(vals) == len(keep)}


def prediction_interval(refit: FitResult, level: float = PREDICTION_LEVEL, n: Any = None, d: Any = None
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """Where a new observation at (n, d) falls if it follows the refit's law, in log space and centred
    on the refit's prediction: the bootstrap curves' half-width there and t(dof) x the residual sd
    (the points' scatter) combined in quadrature. (Percentiles of the curves with t noise added
    under-covered an extrapolated L(D), down to 87% of synthetic sets; this covers 93-98%, BENCHMARKS.md.)
    None without bootstrap samples, or where they give no finite prediction."""
    preds = refit.predict_bootstrap(n=n, d=d)
    finite = np.isfinite(preds) & (preds > 0)
    if not len(preds) or refit.dof < 1 or not finite.any(axis=0).all():
        return None
    tail = (100.0 - level) / 2
    lo, hi = np.nanpercentile(np.log(np.where(finite, preds, np.nan)), [tail, 100.0 - tail], axis=0)
    noise = stats.t.ppf(1.0 - tail / 100.0, refit.dof) * refit.checks.get("residual_sd_log", 0.0)
    half = np.hypot((hi - lo) / 2, noise)
    center = np.log(refit.predict(n=n, d=d))
    return np.exp(center - half), np.exp(center + half)


def _heldout_points(
    fit: FitResult, test: np.ndarray, pred: np.ndarray, points: dict[str, list[Any]],
    interval: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """One dict per held-out point: sizes, observed, predicted, rel_error, the refit's prediction
    interval and whether the observation lies inside it, and the point's bookkeeping."""
    y = np.asarray(points["loss"])[test]
    rows = []
    idx = np.flatnonzero(test)
    for j, i in enumerate(idx):
        row: dict[str, Any] = {k: points[k][i] for k in ("n", "d") if k in points}
        row.update(observed=float(y[j]), predicted=float(pred[j]),
                   rel_error=float((pred[j] - y[j]) / y[j]))
        if interval is not None:
            lo, hi = float(interval[0][j]), float(interval[1][j])
            row.update(interval=[lo, hi], inside_interval=bool(lo <= y[j] <= hi))
        for k, vals in points.items():
            if k not in ("loss", "n", "d", *row) and len(vals) == len(test):
                row[k] = vals[i]
        rows.append(row)
    return rows


def _summary(rows: list[dict[str, Any]], axis: str, cut: float, how_many: int) -> dict[str, Any]:
    rel = np.abs([r["rel_error"] for r in rows])
    out = {
        "axis": axis, "cut": cut, "holdout_largest": how_many, "points": rows,
        "mean_abs_rel_error": float(np.mean(rel)), "max_abs_rel_error": float(np.max(rel)),
        "threshold": HELDOUT_FLAG,
    }
    if rows and all("interval" in r for r in rows):
        out.update(interval_level=PREDICTION_LEVEL, outside_interval=sum(not r["inside_interval"] for r in rows))
    return out


def _heldout_single(fit: FitResult, form: LawForm, cfg: FitConfig, setting: str | None) -> None:
    """L(N) / L(D): refit without the largest size and predict it (paper Fig. 6), with the refit's
    prediction interval (its bootstrap, as configured)."""
    axis = form.axes.lower()
    x = np.asarray(fit.points[axis], dtype=float)
    y = np.asarray(fit.points["loss"], dtype=float)
    cut = float(np.max(x))
    train = x < cut
    try:
        check_inputs(form, x[train] if axis == "n" else None, x[train] if axis == "d" else None,
                     y[train], setting)
    except TooFewPointsError as exc:
        fit.flags.append(f"held-out check skipped: without the largest {form.axes} ({cut:.3g}) "
                         f"the rest are too few ({exc})")
        return
    refit = fit_law(form.kind, y[train], config=dataclasses.replace(cfg, heldout=False), **{axis: x[train]})
    test = ~train
    pred = refit.predict(**{axis: x[test]})
    interval = prediction_interval(refit, **{axis: x[test]})
    fit.heldout = _summary(_heldout_points(fit, test, pred, fit.points, interval), axis, cut, 1)
    fit.heldout.update(refit="separate", refit_params=refit.params)
    fit.flags += heldout_flags(fit.heldout)


def fit_n(n: Sequence[float], loss: Sequence[float], config: FitConfig | None = None) -> FitResult:
    return fit_law("N", loss, n=n, config=config)


def fit_d(d: Sequence[float], loss: Sequence[float], config: FitConfig | None = None) -> FitResult:
    return fit_law("D", loss, d=d, config=config)


def fit_joint(
    n: Sequence[float],
    d: Sequence[float],
    loss: Sequence[float],
    config: FitConfig | None = None,
    holdout_largest: int = 1,
    extra_points: dict[str, list[Any]] | None = None,
    kind: str = "ND",
    setting: str | None = None,
) -> FitResult:
    """Fit a joint law on every point, and check it the paper's way (Fig. 6): refit without the
    largest N values and predict them.

    `holdout_largest` distinct N values (the largest) are held out of the check's refit (no bootstrap);
    0 skips the check. When holding out would leave too few points, a flag says the check was skipped.
    The law itself keeps every point, as L(N) and L(D) do, so none of the measured runs is wasted.
    """
    if holdout_largest < 0:
        raise DrscalingError(f"holdout_largest must be >= 0 (got {holdout_largest})")
    form = get_form(kind)
    if form.axes != "N+D":
        raise DrscalingError(f"fit_joint fits a joint (N+D) law; '{kind}' is an {form.axes} law")
    n_arr, d_arr, y = check_inputs(form, n, d, loss, setting)
    extra = {k: list(v) for k, v in (extra_points or {}).items()}
    fit = fit_law(kind=kind, loss=y, n=n_arr, d=d_arr, config=config, extra_points=extra, setting=setting)
    if holdout_largest == 0:
        return fit
    distinct = np.unique(n_arr)
    if len(distinct) <= holdout_largest:
        fit.flags.append(f"held-out check skipped: only {len(distinct)} distinct N value(s), "
                         f"cannot hold out {holdout_largest}")
        return fit
    cut = float(distinct[-holdout_largest])
    train = n_arr < cut
    try:
        check_inputs(form, n_arr[train], d_arr[train], y[train], setting)
    except TooFewPointsError as exc:
        fit.flags.append(f"held-out check skipped: the points below N={cut:g} are too few ({exc})")
        return fit
    check = dataclasses.replace(config or FitConfig(), heldout=False)
    refit = fit_law(kind, y[train], n=n_arr[train], d=d_arr[train], config=check, setting=setting)
    test = ~train
    pred = refit.predict(n=n_arr[test], d=d_arr[test])
    interval = prediction_interval(refit, n=n_arr[test], d=d_arr[test])
    everything = {"loss": y.tolist(), "n": n_arr.tolist(), "d": d_arr.tolist(), **extra}
    fit.heldout = _summary(_heldout_points(fit, test, pred, everything, interval), "n", cut, holdout_largest)
    fit.heldout.update(n_cut=cut, refit="separate", refit_params=refit.params)
    fit.flags += heldout_flags(fit.heldout)
    return fit
