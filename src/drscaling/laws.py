"""Fitting the paper's power laws: L(N), L(D) and the joint L(N, D) (eqs. 6-8), with uncertainty.

    L(N)    = (A/N)^alpha + delta
    L(D)    = (B/D)^beta + delta
    L(N, D) = [(A/N)^(alpha/beta) + B/D]^beta + delta

Fitting follows Chinchilla's "approach 3" (Hoffmann et al. 2022) rather than the paper's plain
least squares: minimise the Huber loss of (log prediction - log observed) with L-BFGS-B from a grid of
initialisations and keep the best. Working in log space weights a 0.05 loss as much as a 3.0 loss
(the points span two orders of magnitude), and Huber keeps one bad training run from dragging the
curve. A, B and delta are optimised as logarithms so they stay positive; the log-prediction is built
with logaddexp so nothing overflows when (A/N) is tiny or huge.

Uncertainty: a bootstrap over points; each resample is refitted from the best full-data fit (one
L-BFGS-B run instead of a whole grid: fast, and the resample optimum is near the full one). The
bootstrap samples are kept so the budget model can propagate them.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from drscaling.errors import DrscalingError
from drscaling.files import atomic_open, atomic_path, read_json, read_jsonl, write_json

KINDS = ("N", "D", "ND")
PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "N": ("A", "alpha", "delta"),
    "D": ("B", "beta", "delta"),
    "ND": ("A", "B", "alpha", "beta", "delta"),
}
# Parameters optimised as logarithms (the rest, the exponents, are optimised directly).
LOG_PARAMS = frozenset({"A", "B", "delta"})
HUBER_DELTA = 1e-3
EXPONENT_BOUNDS = (0.01, 4.0)
# ln of A or B: 1e-6 .. 1e26 covers every sane size unit (params, pairs, millions of params).
LOG_SCALE_BOUNDS = (math.log(1e-6), math.log(1e26))
R2_FLAG = 0.9
CI_RATIO_FLAG = 100.0  # a 95% interval whose hi/lo exceeds this spans orders of magnitude
LOSS_FIELD = "ce_test_min"
LAWS_VERSION = 1


class TooFewPointsError(DrscalingError):
    """Not enough (distinct) points for a fit: fit_sweep skips such a fit instead of failing."""


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """One fitted law. `params` holds natural values (A, not log A); `bootstrap` one list per param."""

    kind: str  # "N" | "D" | "ND"
    params: dict[str, float]
    r2: float
    residuals: list[float]  # observed - predicted, on the loss scale, in point order
    ci95: dict[str, list[float]]  # param -> [lo, hi] from the bootstrap (empty if no bootstrap)
    bootstrap: dict[str, list[float]]  # param -> samples (same length for every param)
    n_points: int
    flags: list[str] = field(default_factory=list)
    heldout: dict[str, Any] | None = None
    # The data the law was fitted on, so figures and reports need nothing else.
    points: dict[str, list[Any]] = field(default_factory=dict)
    objective: float = float("nan")  # the summed Huber loss at the optimum

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitResult:
        try:
            kind = d["kind"]
            if kind not in KINDS:
                raise DrscalingError(f"unknown law kind '{kind}' (expected one of {KINDS})")
            missing = [p for p in PARAM_NAMES[kind] if p not in d["params"]]
            if missing:
                raise DrscalingError(f"law of kind {kind} lacks parameter(s) {missing}")
            return cls(
                kind=kind,
                params={k: float(v) for k, v in d["params"].items()},
                r2=float(d.get("r2", float("nan"))),
                residuals=[float(x) for x in d.get("residuals", [])],
                ci95={k: [float(v[0]), float(v[1])] for k, v in d.get("ci95", {}).items()},
                bootstrap={k: [float(x) for x in v] for k, v in d.get("bootstrap", {}).items()},
                n_points=int(d.get("n_points", 0)),
                flags=list(d.get("flags", [])),
                heldout=d.get("heldout"),
                points=dict(d.get("points", {})),
                objective=float(d.get("objective", float("nan"))),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DrscalingError(f"malformed fitted law ({exc!r})") from exc

    def param_vector(self) -> np.ndarray:
        return np.array([self.params[p] for p in PARAM_NAMES[self.kind]], dtype=float)

    def bootstrap_matrix(self) -> np.ndarray:
        """(n_samples, n_params) natural-scale samples; (0, n_params) when there are none."""
        names = PARAM_NAMES[self.kind]
        if not self.bootstrap or any(p not in self.bootstrap for p in names):
            return np.empty((0, len(names)))
        return np.column_stack([np.asarray(self.bootstrap[p], dtype=float) for p in names])

    def predict(self, n: Any = None, d: Any = None) -> np.ndarray:
        return predict(self.kind, self.params, n=n, d=d)

    def predict_bootstrap(self, n: Any = None, d: Any = None) -> np.ndarray:
        """Predictions of every bootstrap sample: shape (n_samples, len(points))."""
        mat = self.bootstrap_matrix()
        names = PARAM_NAMES[self.kind]
        out = [predict(self.kind, dict(zip(names, row, strict=True)), n=n, d=d) for row in mat]
        return np.array(out).reshape(len(mat), -1)

    def formula(self) -> str:
        """The fitted law as a short human-readable string (figure legends, reports)."""
        p = self.params
        if self.kind == "N":
            return f"L(N) = ({p['A']:.3g}/N)^{p['alpha']:.3g} + {p['delta']:.3g}"
        if self.kind == "D":
            return f"L(D) = ({p['B']:.3g}/D)^{p['beta']:.3g} + {p['delta']:.3g}"
        return (
            f"L(N,D) = [({p['A']:.3g}/N)^({p['alpha']:.3g}/{p['beta']:.3g}) + {p['B']:.3g}/D]"
            f"^{p['beta']:.3g} + {p['delta']:.3g}"
        )


# --------------------------------------------------------------------------------------------
# The laws and their log-space objective
# --------------------------------------------------------------------------------------------


def predict(kind: str, params: dict[str, float], n: Any = None, d: Any = None) -> np.ndarray:
    """Evaluate a law at sizes n (and/or d); natural-scale parameters."""
    theta = _to_theta(kind, params)
    logn = None if n is None else np.log(np.asarray(n, dtype=float))
    logd = None if d is None else np.log(np.asarray(d, dtype=float))
    if kind in ("N", "ND") and logn is None:
        raise DrscalingError(f"law {kind} needs N to predict")
    if kind in ("D", "ND") and logd is None:
        raise DrscalingError(f"law {kind} needs D to predict")
    if kind == "ND":
        logn, logd = np.broadcast_arrays(logn, logd)
    return np.exp(_log_pred(kind, theta, logn, logd))


def _to_theta(kind: str, params: dict[str, float]) -> np.ndarray:
    return np.array(
        [math.log(params[p]) if p in LOG_PARAMS else params[p] for p in PARAM_NAMES[kind]],
        dtype=float,
    )


def _from_theta(kind: str, theta: np.ndarray) -> dict[str, float]:
    return {
        p: float(math.exp(t) if p in LOG_PARAMS else t)
        for p, t in zip(PARAM_NAMES[kind], theta, strict=True)
    }


def _theta_matrix_to_natural(kind: str, thetas: np.ndarray) -> np.ndarray:
    out = thetas.copy()
    for j, p in enumerate(PARAM_NAMES[kind]):
        if p in LOG_PARAMS:
            out[:, j] = np.exp(out[:, j])
    return out


def _log_pred(
    kind: str, theta: np.ndarray, logn: np.ndarray | None, logd: np.ndarray | None
) -> np.ndarray:
    """log L at every point, built with logaddexp so (A/N)^alpha never over/underflows."""
    if kind in ("N", "D"):
        log_scale, expo, log_delta = theta
        logx = logn if kind == "N" else logd
        return np.logaddexp(expo * (log_scale - logx), log_delta)
    log_a, log_b, alpha, beta, log_delta = theta
    inner = np.logaddexp((alpha / beta) * (log_a - logn), log_b - logd)
    return np.logaddexp(beta * inner, log_delta)


def _huber_objective(
    theta: np.ndarray,
    kind: str,
    logn: np.ndarray | None,
    logd: np.ndarray | None,
    logy: np.ndarray,
    weights: np.ndarray,
    huber_delta: float,
) -> tuple[float, np.ndarray]:
    """Summed (weighted) Huber loss of log residuals, and its analytic gradient.

    Analytic derivatives make each L-BFGS-B step one evaluation instead of n_params + 1, and the
    hand-reduced form (dot products, no Jacobian matrix) keeps one evaluation at a few microseconds:
    together they are what lets 1,000 bootstrap refits run in seconds.
    Huber: c = clip(r, -h, h) gives huber(r) = c * (r - c/2) and huber'(r) = c.
    """
    if kind in ("N", "D"):
        log_scale, expo, log_delta = theta
        gap = log_scale - (logn if kind == "N" else logd)  # log(A/N)
        u = expo * gap
        lp = np.logaddexp(u, log_delta)
        w = expit(u - log_delta)  # share of the power-law term in L
        r = lp - logy
        c = np.clip(r, -huber_delta, huber_delta)
        g = c * weights
        gw = g * w
        sgw = gw.sum()
        grad = np.array([expo * sgw, gw @ gap, g.sum() - sgw])
    else:
        log_a, log_b, alpha, beta, log_delta = theta
        gap = log_a - logn
        s1 = (alpha / beta) * gap  # log (A/N)^(alpha/beta)
        s2 = log_b - logd  # log B/D
        inner = np.logaddexp(s1, s2)
        u = beta * inner
        lp = np.logaddexp(u, log_delta)
        w = expit(u - log_delta)  # share of the bracket term in L
        q = expit(s1 - s2)  # share of the model-size term inside the bracket
        r = lp - logy
        c = np.clip(r, -huber_delta, huber_delta)
        g = c * weights
        gw = g * w
        gwq = gw * q
        sgw, sgwq = gw.sum(), gwq.sum()
        grad = np.array(
            [
                alpha * sgwq,  # d/dlogA
                beta * (sgw - sgwq),  # d/dlogB
                gwq @ gap,  # d/dalpha
                gw @ inner - gwq @ s1,  # d/dbeta
                g.sum() - sgw,  # d/dlogdelta
            ]
        )
    value = float(g @ (r - 0.5 * c))
    if not math.isfinite(value) or not np.isfinite(grad).all():
        return 1e300, np.zeros_like(theta)
    return value, grad


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _law_label(kind: str) -> str:
    return {"N": "L(N)", "D": "L(D)", "ND": "L(N,D)"}[kind]


def _check_inputs(
    kind: str, n: Sequence[float] | None, d: Sequence[float] | None, y: Sequence[float]
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """Validate and convert; every problem raises DrscalingError naming the law and the point."""
    label = _law_label(kind)
    arrays: dict[str, np.ndarray] = {}
    named = {"N": n, "D": d, "loss": y}
    needed = {"N": ("N", "loss"), "D": ("D", "loss"), "ND": ("N", "D", "loss")}[kind]
    for name in needed:
        values = named[name]
        if values is None:
            raise DrscalingError(f"{label} needs {name} values")
        try:
            arr = np.asarray(values, dtype=float).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise DrscalingError(f"{label}: {name} values are not numbers ({exc})") from exc
        arrays[name] = arr
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k} has {v}" for k, v in lengths.items())
        raise DrscalingError(f"{label}: mismatched array lengths ({desc}); give one value per point")
    for name, arr in arrays.items():
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise DrscalingError(
                f"{label}: non-finite {name} value ({arr[bad[0]]}) at point {bad[0]}; "
                "remove or re-run that point"
            )
        bad = np.flatnonzero(arr <= 0)
        if bad.size:
            what = "losses must be > 0" if name == "loss" else "sizes must be > 0"
            raise DrscalingError(
                f"{label}: non-positive {name} value ({arr[bad[0]]:g}) at point {bad[0]}; {what}"
            )
    n_params = len(PARAM_NAMES[kind])
    m = lengths["loss"]
    if m < n_params + 1:
        raise TooFewPointsError(
            f"{label}: too few points ({m}); fitting {n_params} free parameters needs at least "
            f"{n_params + 1} points"
        )
    if kind == "ND":
        for name in ("N", "D"):
            distinct = len(np.unique(arrays[name]))
            if distinct < 2:
                raise TooFewPointsError(
                    f"{label}: too few distinct {name} values ({distinct}); the joint law needs "
                    f"points at >= 2 values of N and of D"
                )
    else:
        name = kind
        distinct = len(np.unique(arrays[name]))
        if distinct < n_params:
            raise TooFewPointsError(
                f"{label}: too few distinct {name} values ({distinct}); need at least {n_params}"
            )
    return arrays.get("N"), arrays.get("D"), arrays["loss"]


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitConfig:
    """How to fit. The grid offsets are in ln units around the data's (geometric) centre."""

    huber_delta: float = HUBER_DELTA
    n_bootstrap: int = 1000
    seed: int = 0
    exponent_bounds: tuple[float, float] = EXPONENT_BOUNDS
    exponent_grid: tuple[float, ...] = (0.3, 0.7, 1.2, 2.0)
    # Fewer exponent values for the joint grid: with 5 parameters the full product grows fast.
    joint_exponent_grid: tuple[float, ...] = (0.4, 0.9, 1.6)
    # log(A/N_centre) starting points: A from far below the data to a bit above it.
    scale_offsets: tuple[float, ...] = (-12.0, -7.0, -3.0, 0.0, 3.0)
    # delta starting points as fractions of the smallest observed loss.
    delta_fractions: tuple[float, ...] = (0.05, 0.4, 0.8)
    # L-BFGS-B runs from the `max_starts` grid points with the lowest objective (None: all of them).
    # The joint grid has 675 points; screening them by their starting objective (microseconds each)
    # and optimising from the best 40 found the full grid's optimum on every synthetic set tried
    # (noise 1% to 100%), at 1/17 of the cost.
    max_starts: int | None = 40
    maxiter: int = 500


def _bounds(kind: str, logy: np.ndarray, cfg: FitConfig) -> list[tuple[float, float]]:
    # delta is bounded above by the largest loss: an irreducible floor above every observation
    # would make the power-law term negative, which the form cannot express anyway.
    log_delta = (math.log(1e-8), float(np.max(logy)))
    out = []
    for p in PARAM_NAMES[kind]:
        if p in ("A", "B"):
            out.append(LOG_SCALE_BOUNDS)
        elif p == "delta":
            out.append(log_delta)
        else:
            out.append(cfg.exponent_bounds)
    return out


def _init_grid(
    kind: str, logn: np.ndarray | None, logd: np.ndarray | None, logy: np.ndarray, cfg: FitConfig
) -> np.ndarray:
    ymin = float(np.exp(np.min(logy)))
    deltas = [math.log(f * ymin) for f in cfg.delta_fractions]
    scale_n = [] if logn is None else [float(np.mean(logn)) + o for o in cfg.scale_offsets]
    scale_d = [] if logd is None else [float(np.mean(logd)) + o for o in cfg.scale_offsets]
    expo = list(cfg.exponent_grid)
    if kind == "N":
        grid = [(a, e, dl) for a in scale_n for e in expo for dl in deltas]
    elif kind == "D":
        grid = [(b, e, dl) for b in scale_d for e in expo for dl in deltas]
    else:
        expo3 = list(cfg.joint_exponent_grid)
        grid = [
            (a, b, al, be, dl)
            for a in scale_n
            for b in scale_d
            for al in expo3
            for be in expo3
            for dl in deltas
        ]
    lo_hi = _bounds(kind, logy, cfg)
    arr = np.array(grid, dtype=float)
    for j, (lo, hi) in enumerate(lo_hi):
        arr[:, j] = np.clip(arr[:, j], lo, hi)
    return arr


def _minimise(
    theta0: np.ndarray,
    kind: str,
    logn: np.ndarray | None,
    logd: np.ndarray | None,
    logy: np.ndarray,
    weights: np.ndarray,
    bounds: list[tuple[float, float]],
    cfg: FitConfig,
) -> tuple[np.ndarray, float, bool]:
    res = minimize(
        _huber_objective,
        theta0,
        args=(kind, logn, logd, logy, weights, cfg.huber_delta),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": cfg.maxiter},
    )
    return np.asarray(res.x, dtype=float), float(res.fun), bool(res.success)


def _best_of_grid(
    kind: str,
    logn: np.ndarray | None,
    logd: np.ndarray | None,
    logy: np.ndarray,
    cfg: FitConfig,
) -> tuple[np.ndarray, float, bool]:
    bounds = _bounds(kind, logy, cfg)
    weights = np.ones_like(logy)
    grid = _init_grid(kind, logn, logd, logy, cfg)
    if cfg.max_starts is not None and len(grid) > cfg.max_starts:
        start_values = np.array(
            [_huber_objective(t, kind, logn, logd, logy, weights, cfg.huber_delta)[0] for t in grid]
        )
        grid = grid[np.argsort(start_values, kind="stable")[: cfg.max_starts]]
    best: tuple[np.ndarray, float, bool] | None = None
    for theta0 in grid:
        theta, fun, ok = _minimise(theta0, kind, logn, logd, logy, weights, bounds, cfg)
        if np.isfinite(fun) and (best is None or fun < best[1]):
            best = (theta, fun, ok)
    if best is None:
        raise DrscalingError(f"{_law_label(kind)}: the optimiser failed from every starting point")
    return best


def _bootstrap(
    kind: str,
    theta_best: np.ndarray,
    logn: np.ndarray | None,
    logd: np.ndarray | None,
    logy: np.ndarray,
    cfg: FitConfig,
) -> tuple[np.ndarray, int]:
    """Refit on resampled points (as multiplicity weights: same optimum, no array copies)."""
    m = len(logy)
    rng = np.random.default_rng(cfg.seed)
    bounds = _bounds(kind, logy, cfg)
    samples = []
    failed = 0
    for _ in range(cfg.n_bootstrap):
        weights = np.bincount(rng.integers(0, m, m), minlength=m).astype(float)
        theta, fun, _ok = _minimise(theta_best, kind, logn, logd, logy, weights, bounds, cfg)
        if np.isfinite(fun) and np.all(np.isfinite(theta)):
            samples.append(theta)
        else:
            failed += 1
    mat = np.array(samples).reshape(-1, len(theta_best))
    return _theta_matrix_to_natural(kind, mat), failed


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def _flags(
    kind: str,
    theta: np.ndarray,
    r2: float,
    ci95: dict[str, list[float]],
    converged: bool,
    failed: int,
    n_boot: int,
    bounds: list[tuple[float, float]],
) -> list[str]:
    out = []
    if not (r2 >= R2_FLAG):
        out.append(f"poor fit: R^2 = {r2:.3f} < {R2_FLAG}")
    for p, t, (lo, hi) in zip(PARAM_NAMES[kind], theta, bounds, strict=True):
        tol = 1e-6 * max(1.0, abs(hi - lo))
        if p in ("alpha", "beta") and (t <= lo + tol or t >= hi - tol):
            out.append(f"{p} at its bound ({t:.3g}): the fit is degenerate")
        elif p in ("A", "B") and (t <= lo + tol or t >= hi - tol):
            out.append(f"{p} at its bound ({math.exp(t):.3g}): the fit is degenerate")
        elif p == "delta" and t <= lo + tol:
            out.append("delta at its lower bound: the data show no irreducible loss")
        elif p == "delta" and t >= hi - tol:
            out.append("delta at its upper bound: the data show no power-law decrease")
    for p, (lo, hi) in ci95.items():
        if lo > 0 and hi / lo > CI_RATIO_FLAG:
            out.append(f"95% interval of {p} spans orders of magnitude [{lo:.3g}, {hi:.3g}]")
    if not converged:
        out.append("optimiser did not report convergence for the best start")
    if n_boot and failed > 0.05 * n_boot:
        out.append(f"{failed} of {n_boot} bootstrap refits failed")
    return out


def _single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    """L-BFGS-B calls BLAS on 3-5 element vectors thousands of times; a multi-threaded BLAS
    spends far more on waking its threads than on the work (13x slower on a loaded 2-core box).
    threadpoolctl ships with the scientific stack; without it, fitting is just slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional speed-up
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_law(
    kind: str,
    loss: Sequence[float],
    n: Sequence[float] | None = None,
    d: Sequence[float] | None = None,
    config: FitConfig | None = None,
    extra_points: dict[str, list[Any]] | None = None,
) -> FitResult:
    """Fit one law ("N", "D" or "ND") to observed losses; see the module docstring for the method."""
    if kind not in KINDS:
        raise DrscalingError(f"unknown law kind '{kind}'; expected one of {', '.join(KINDS)}")
    cfg = config or FitConfig()
    if cfg.n_bootstrap < 0:
        raise DrscalingError(f"n_bootstrap must be >= 0 (got {cfg.n_bootstrap})")
    n_arr, d_arr, y = _check_inputs(kind, n, d, loss)
    logn = None if n_arr is None else np.log(n_arr)
    logd = None if d_arr is None else np.log(d_arr)
    logy = np.log(y)

    with _single_threaded_blas():
        theta, fun, converged = _best_of_grid(kind, logn, logd, logy, cfg)
        samples, failed = _bootstrap(kind, theta, logn, logd, logy, cfg)
    pred = np.exp(_log_pred(kind, theta, logn, logd))
    r2 = _r2(y, pred)
    names = PARAM_NAMES[kind]
    ci95: dict[str, list[float]] = {}
    if len(samples):
        lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
        ci95 = {p: [float(a), float(b)] for p, a, b in zip(names, lo, hi, strict=True)}
    points: dict[str, list[Any]] = {"loss": y.tolist()}
    if n_arr is not None:
        points["n"] = n_arr.tolist()
    if d_arr is not None:
        points["d"] = d_arr.tolist()
    points.update(extra_points or {})
    return FitResult(
        kind=kind,
        params=_from_theta(kind, theta),
        r2=r2,
        residuals=(y - pred).tolist(),
        ci95=ci95,
        bootstrap={p: samples[:, j].tolist() for j, p in enumerate(names)},
        n_points=len(y),
        flags=_flags(
            kind, theta, r2, ci95, converged, failed, cfg.n_bootstrap, _bounds(kind, logy, cfg)
        ),
        points=points,
        objective=fun,
    )


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
) -> FitResult:
    """Fit L(N, D) on the points below an N cut and predict the rest (the paper's Fig. 6 check).

    `holdout_largest` distinct N values (the largest) are held out; 0 fits every point. When holding
    out would leave too few points, every point is fitted and a flag says the check was skipped.
    """
    if holdout_largest < 0:
        raise DrscalingError(f"holdout_largest must be >= 0 (got {holdout_largest})")
    n_arr, d_arr, y = _check_inputs("ND", n, d, loss)
    extra = {k: list(v) for k, v in (extra_points or {}).items()}
    if holdout_largest == 0:
        return fit_law("ND", y, n=n_arr, d=d_arr, config=config, extra_points=extra)
    distinct = np.unique(n_arr)
    if len(distinct) <= holdout_largest:
        fit = fit_law("ND", y, n=n_arr, d=d_arr, config=config, extra_points=extra)
        fit.flags.append(
            f"held-out check skipped: only {len(distinct)} distinct N value(s), "
            f"cannot hold out {holdout_largest}"
        )
        return fit
    cut = float(distinct[-holdout_largest])
    train = n_arr < cut
    try:
        _check_inputs("ND", n_arr[train], d_arr[train], y[train])
    except TooFewPointsError as exc:
        fit = fit_law("ND", y, n=n_arr, d=d_arr, config=config, extra_points=extra)
        fit.flags.append(f"held-out check skipped: the points below N={cut:g} are too few ({exc})")
        return fit
    extra_train = {k: [v for v, t in zip(vals, train, strict=True) if t] for k, vals in extra.items()}
    fit = fit_law(
        "ND", y[train], n=n_arr[train], d=d_arr[train], config=config, extra_points=extra_train
    )
    test = ~train
    pred = fit.predict(n=n_arr[test], d=d_arr[test])
    rel = (pred - y[test]) / y[test]
    heldout_points = [
        {"n": float(a), "d": float(b), "observed": float(o), "predicted": float(p),
         "rel_error": float(r)}
        for a, b, o, p, r in zip(n_arr[test], d_arr[test], y[test], pred, rel, strict=True)
    ]
    for k, vals in extra.items():
        held_vals = [v for v, t in zip(vals, test, strict=True) if t]
        for row, v in zip(heldout_points, held_vals, strict=True):
            row[k] = v
    fit.heldout = {
        "n_cut": cut,
        "holdout_largest": holdout_largest,
        "points": heldout_points,
        "mean_abs_rel_error": float(np.mean(np.abs(rel))),
        "max_abs_rel_error": float(np.max(np.abs(rel))),
    }
    return fit


# --------------------------------------------------------------------------------------------
# laws.json
# --------------------------------------------------------------------------------------------


def save_laws(
    path: str | Path, fits: dict[str, FitResult], meta: dict[str, Any] | None = None
) -> Path:
    """Write every fitted law to one JSON file (atomically)."""
    doc = {
        "version": LAWS_VERSION,
        "laws": {name: fit.to_dict() for name, fit in fits.items()},
        "meta": meta or {},
    }
    write_json(path, doc)
    return Path(path)


def load_laws(path: str | Path) -> dict[str, FitResult]:
    path = Path(path)
    if not path.exists():
        raise DrscalingError(
            f"fitted laws not found: {path}; run the fit stage (`drscaling fit` or `dvc repro fit`) "
            "first"
        )
    doc = read_json(path, what="fitted laws")
    if not isinstance(doc, dict) or not isinstance(doc.get("laws"), dict):
        raise DrscalingError(f"{path}: not a laws file (no 'laws' object); re-run `drscaling fit`")
    return {name: FitResult.from_dict(d) for name, d in doc["laws"].items()}


def load_laws_meta(path: str | Path) -> dict[str, Any]:
    doc = read_json(path, what="fitted laws")
    return dict(doc.get("meta", {})) if isinstance(doc, dict) else {}


# --------------------------------------------------------------------------------------------
# The fit stage: sweep results -> laws.json + figures + plot data
# --------------------------------------------------------------------------------------------

SWEEPS = ("model", "data", "source", "joint")
RANKING_METRICS = ("mrr@10", "ndcg@10", "recall@1000")


def _num(row: dict[str, Any], key: str, where: str) -> float:
    try:
        value = float(row[key])
    except (TypeError, ValueError) as exc:
        raise DrscalingError(f"{where}: field '{key}' is not a number ({row[key]!r})") from exc
    return value


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise DrscalingError(
            f"sweep results not found: {path}; run the sweep (training + evaluation) stage first"
        )
    rows = read_jsonl(path, required=("sweep", "n", "d", LOSS_FIELD))
    for i, row in enumerate(rows, start=1):
        where = f"{path}: row {i}"
        if row["sweep"] not in SWEEPS:
            raise DrscalingError(f"{where}: unknown sweep '{row['sweep']}' (expected {SWEEPS})")
        for key in ("n", "d", LOSS_FIELD):
            row[key] = _num(row, key, where)
        if row["sweep"] == "source" and not row.get("source"):
            raise DrscalingError(f"{where}: a 'source' sweep row needs a 'source' field")
    return rows


def _select(rows: list[dict[str, Any]], sweep: str, source: str | None = None) -> list[dict]:
    return [
        r for r in rows if r["sweep"] == sweep and (source is None or r.get("source") == source)
    ]


def _extra(rows: list[dict[str, Any]], with_n: bool = False) -> dict[str, list[Any]]:
    """Per-point bookkeeping kept with a fit: shapes and sources (the budget model reads them)."""
    out: dict[str, list[Any]] = {
        "shape": [str(r.get("shape", "")) for r in rows],
        "source": [str(r.get("source", "")) for r in rows],
        "run_id": [str(r.get("run_id", "")) for r in rows],
    }
    if with_n:  # a data-size law is fitted at a fixed model: keep its N
        out["n"] = [r["n"] for r in rows]
    return out


def fit_sweep(
    results: str | Path,
    out_dir: str | Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
    holdout_largest: int = 1,
) -> dict[str, Any]:
    """Fit every law the sweep results allow; write laws.json, figures and plot data to out_dir.

    Fits: "N" (sweep=model), "D" (sweep=data), "D@<source>" (sweep=source, one per source) and
    "ND" (sweep=joint, with the held-out check). A fit with no rows, or too few, is skipped and
    noted; having no fit at all is an error.
    """
    results = Path(results)
    out_dir = Path(out_dir)
    rows = _read_results(results)
    cfg = FitConfig(n_bootstrap=n_bootstrap, seed=seed)
    fits: dict[str, FitResult] = {}
    skipped: dict[str, str] = {}

    def attempt(name: str, subset: list[dict], build: Callable[[], FitResult], sweep: str) -> None:
        if not subset:
            skipped[name] = f"no rows with sweep == '{sweep}' in {results.name}"
            return
        try:
            fits[name] = build()
        except TooFewPointsError as exc:
            skipped[name] = str(exc)

    model_rows = _select(rows, "model")
    attempt(
        "N",
        model_rows,
        lambda: fit_law(
            "N", [r[LOSS_FIELD] for r in model_rows], n=[r["n"] for r in model_rows], config=cfg,
            extra_points=_extra(model_rows),
        ),
        "model",
    )
    data_rows = _select(rows, "data")
    attempt(
        "D",
        data_rows,
        lambda: fit_law(
            "D", [r[LOSS_FIELD] for r in data_rows], d=[r["d"] for r in data_rows], config=cfg,
            extra_points=_extra(data_rows, with_n=True),
        ),
        "data",
    )
    sources = sorted({str(r["source"]) for r in _select(rows, "source")})
    if not sources:
        skipped["D@<source>"] = f"no rows with sweep == 'source' in {results.name}"
    for source in sources:
        src_rows = _select(rows, "source", source)
        attempt(
            f"D@{source}",
            src_rows,
            lambda src_rows=src_rows: fit_law(
                "D", [r[LOSS_FIELD] for r in src_rows], d=[r["d"] for r in src_rows], config=cfg,
                extra_points=_extra(src_rows, with_n=True),
            ),
            "source",
        )
    joint_rows = _select(rows, "joint")
    attempt(
        "ND",
        joint_rows,
        lambda: fit_joint(
            [r["n"] for r in joint_rows], [r["d"] for r in joint_rows],
            [r[LOSS_FIELD] for r in joint_rows], config=cfg, holdout_largest=holdout_largest,
            extra_points=_extra(joint_rows),
        ),
        "joint",
    )
    if not fits:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise DrscalingError(f"no law could be fitted from {results} ({reasons})")

    # Figures and plot data first, laws.json last: a later stage that finds laws.json can trust that
    # everything it lists is complete.
    plots = write_plot_data(rows, fits, out_dir / "plots")
    metrics_path = out_dir / "metrics.json"
    write_json(metrics_path, law_metrics(fits))
    figures = make_figures(rows, fits, out_dir / "figures")
    meta = {
        "figures": [p.relative_to(out_dir).as_posix() for p in figures],
        "results": str(results),
        "loss": LOSS_FIELD,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "holdout_largest": holdout_largest,
        "huber_delta": cfg.huber_delta,
        "skipped": skipped,
    }
    laws_path = save_laws(out_dir / "laws.json", fits, meta=meta)
    return {
        "laws_path": str(laws_path),
        "metrics_path": str(metrics_path),
        "figures": [str(p) for p in figures],
        "plots": [str(p) for p in plots],
        "fits": {name: _fit_summary(fit) for name, fit in fits.items()},
        "skipped": skipped,
        "n_rows": len(rows),
    }


def _fit_summary(fit: FitResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": fit.kind,
        "formula": fit.formula(),
        "params": fit.params,
        "r2": fit.r2,
        "ci95": fit.ci95,
        "n_points": fit.n_points,
        "flags": fit.flags,
    }
    if fit.heldout:
        out["heldout_mean_abs_rel_error"] = fit.heldout["mean_abs_rel_error"]
        out["heldout_max_abs_rel_error"] = fit.heldout["max_abs_rel_error"]
    return out


def _metric_key(name: str) -> str:
    # MLflow metric names allow [A-Za-z0-9_-. /]; "D@human" becomes "D_human".
    return name.replace("@", "_")


def law_metrics(fits: dict[str, FitResult]) -> dict[str, float]:
    """Flat numeric summary (DVC metrics file, MLflow metrics): params, R^2, held-out error."""
    out: dict[str, float] = {}
    for name, fit in fits.items():
        key = _metric_key(name)
        for p, v in fit.params.items():
            out[f"{key}.{p}"] = float(v)
        out[f"{key}.r2"] = float(fit.r2)
        out[f"{key}.n_points"] = float(fit.n_points)
        out[f"{key}.n_flags"] = float(len(fit.flags))
        if fit.heldout:
            out[f"{key}.heldout_mean_abs_rel_error"] = float(fit.heldout["mean_abs_rel_error"])
    return out


# --------------------------------------------------------------------------------------------
# Plot data (DVC plots) and figures (matplotlib, the paper's style)
# --------------------------------------------------------------------------------------------


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with atomic_open(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
    return path


def write_plot_data(
    rows: list[dict[str, Any]], fits: dict[str, FitResult], plots_dir: Path
) -> list[Path]:
    """One CSV per figure: observed and fitted values side by side (for `dvc plots`)."""
    out = []
    if "N" in fits:
        fit = fits["N"]
        fitted = fit.predict(n=fit.points["n"])
        out.append(_write_csv(
            plots_dir / "ce_vs_n.csv", ["n", LOSS_FIELD, "fitted"],
            zip(fit.points["n"], fit.points["loss"], fitted, strict=True),
        ))
    if "D" in fits:
        fit = fits["D"]
        fitted = fit.predict(d=fit.points["d"])
        out.append(_write_csv(
            plots_dir / "ce_vs_d.csv", ["d", LOSS_FIELD, "fitted"],
            zip(fit.points["d"], fit.points["loss"], fitted, strict=True),
        ))
    src = [(name.split("@", 1)[1], fit) for name, fit in sorted(fits.items()) if "@" in name]
    if src:
        table = []
        for source, fit in src:
            fitted = fit.predict(d=fit.points["d"])
            table += [
                (source, dd, yy, ff)
                for dd, yy, ff in zip(fit.points["d"], fit.points["loss"], fitted, strict=True)
            ]
        out.append(_write_csv(
            plots_dir / "ce_vs_d_by_source.csv", ["source", "d", LOSS_FIELD, "fitted"], table
        ))
    if "ND" in fits:
        fit = fits["ND"]
        fitted = fit.predict(n=fit.points["n"], d=fit.points["d"])
        table = [
            (nn, dd, yy, ff, 0)
            for nn, dd, yy, ff in zip(
                fit.points["n"], fit.points["d"], fit.points["loss"], fitted, strict=True
            )
        ]
        for p in (fit.heldout or {}).get("points", []):
            table.append((p["n"], p["d"], p["observed"], p["predicted"], 1))
        out.append(_write_csv(
            plots_dir / "joint.csv", ["n", "d", LOSS_FIELD, "fitted", "heldout"], table
        ))
    metric_rows = [r for r in rows if all(isinstance(r.get(m), int | float) for m in RANKING_METRICS)]
    if metric_rows:
        out.append(_write_csv(
            plots_dir / "metrics_vs_ce.csv", ["sweep", LOSS_FIELD, *RANKING_METRICS],
            ([r["sweep"], r[LOSS_FIELD], *(r[m] for m in RANKING_METRICS)] for r in metric_rows),
        ))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)
    return path


def _grid(values: Sequence[float], pad: float = 1.5, num: int = 200) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    return np.geomspace(lo / pad, hi * pad, num)


def _fig_single(fit: FitResult, axis: str, title: str, xlabel: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    x = fit.points[axis]
    ax.scatter(x, fit.points["loss"], color="tab:blue", zorder=3, label="observed")
    xs = _grid(x)
    ys = fit.predict(**{axis: xs})
    ax.plot(xs, ys, "--", color="tab:red", label=f"{fit.formula()}\n$R^2$ = {fit.r2:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("contrastive entropy (test)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _fig_metrics(rows: list[dict[str, Any]], path: Path) -> Path | None:
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(RANKING_METRICS), figsize=(4 * len(RANKING_METRICS), 3.5), layout="constrained"
    )
    drawn = False
    for ax, metric in zip(axes, RANKING_METRICS, strict=True):
        for sweep in SWEEPS:
            pts = [
                (r[LOSS_FIELD], r[metric])
                for r in rows
                if r["sweep"] == sweep and isinstance(r.get(metric), int | float)
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, s=14, label=sweep)
                drawn = True
        ax.set_xlabel("contrastive entropy (test)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7)
    fig.suptitle("Ranking metrics vs contrastive entropy")
    return _save(fig, path)


def _fig_sources(fits: dict[str, FitResult], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    for i, (name, fit) in enumerate(sorted((k, v) for k, v in fits.items() if "@" in k)):
        color = f"C{i}"
        source = name.split("@", 1)[1]
        ax.scatter(fit.points["d"], fit.points["loss"], color=color, s=16, zorder=3)
        xs = _grid(fit.points["d"])
        p = fit.params
        ax.plot(
            xs, fit.predict(d=xs), "--", color=color,
            label=f"{source}: B={p['B']:.3g}, β={p['beta']:.3g}, δ={p['delta']:.3g}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("annotated query-passage pairs D")
    ax.set_ylabel("contrastive entropy (test)")
    ax.set_title("Data-size scaling per annotation source")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _fig_joint(fit: FitResult, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    held = (fit.heldout or {}).get("points", [])
    all_n = sorted(set(fit.points["n"]) | {p["n"] for p in held})
    all_d = list(fit.points["d"]) + [p["d"] for p in held]
    xs = _grid(all_d)
    for i, n_val in enumerate(all_n):
        color = f"C{i % 10}"
        pts = [(dd, yy) for nn, dd, yy in zip(
            fit.points["n"], fit.points["d"], fit.points["loss"], strict=True) if nn == n_val]
        if pts:
            ds, ys = zip(*pts, strict=True)
            ax.scatter(ds, ys, color=color, s=16, zorder=3)
        hp = [(p["d"], p["observed"]) for p in held if p["n"] == n_val]
        if hp:
            ds, ys = zip(*hp, strict=True)
            ax.scatter(ds, ys, color="red", marker="*", s=90, zorder=4)
        ax.plot(xs, fit.predict(n=np.full_like(xs, n_val), d=xs), "--", color=color,
                label=f"N = {n_val:.3g}")
    if held:
        ax.scatter([], [], color="red", marker="*", s=90, label="held out (predicted)")
    ax.set_xscale("log")
    ax.set_yscale("log")  # the loss spans orders of magnitude over D; curves per N separate here
    ax.set_xlabel("annotated query-passage pairs D")
    ax.set_ylabel("contrastive entropy (test)")
    ax.set_title(fit.formula(), fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def make_figures(
    rows: list[dict[str, Any]], fits: dict[str, FitResult], fig_dir: Path
) -> list[Path]:
    """The paper's Figs 1/3, 2, 4, 5 and 6 for whatever was fitted."""
    out: list[Path] = []
    if "N" in fits:
        out.append(_fig_single(fits["N"], "n", "Model-size scaling (Figs 1/3)",
                               "non-embedding parameters N", fig_dir / "fig3_ce_vs_n.png"))
    metrics = _fig_metrics(rows, fig_dir / "fig2_metrics_vs_ce.png")
    if metrics:
        out.append(metrics)
    if "D" in fits:
        out.append(_fig_single(fits["D"], "d", "Data-size scaling (Fig 4)",
                               "annotated query-passage pairs D", fig_dir / "fig4_ce_vs_d.png"))
    if any("@" in k for k in fits):
        out.append(_fig_sources(fits, fig_dir / "fig5_ce_vs_d_by_source.png"))
    if "ND" in fits:
        out.append(_fig_joint(fits["ND"], fig_dir / "fig6_joint.png"))
    return out


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------


def log_to_mlflow(summary: dict[str, Any]) -> str:
    """Log laws.json, figures, plot data and the law metrics to the active MLflow run.

    With no active run, one named "fit" is started and ended here. Returns the run id.
    """
    from drscaling.tracking import configure

    configure()
    import mlflow

    laws_path = Path(summary["laws_path"])
    fits = load_laws(laws_path)
    active = mlflow.active_run()
    run = active or mlflow.start_run(run_name="fit")
    try:
        mlflow.log_artifact(str(laws_path), artifact_path="laws")
        for fig in summary.get("figures", []):
            mlflow.log_artifact(fig, artifact_path="figures")
        for plot in summary.get("plots", []):
            mlflow.log_artifact(plot, artifact_path="plots")
        mlflow.log_metrics(law_metrics(fits))
        mlflow.set_tags({
            f"law.{_metric_key(name)}": fit.formula() for name, fit in fits.items()
        })
        if summary.get("skipped"):
            mlflow.set_tag("laws.skipped", "; ".join(sorted(summary["skipped"])))
    finally:
        if active is None:
            mlflow.end_run()
    return run.info.run_id
