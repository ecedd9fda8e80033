"""The law-form registry: every scaling-law form is declared once, here, and everything else (fitting,
bootstrap, predict, FitResult.formula, figures, the report) reads it from the registry.

A form declares its parameter names, which of them are optimised as logarithms (so they stay
positive), their bounds, its initialisation grid, its log-prediction (vectorised over parameter
vectors) with the Jacobian the optimiser needs, its formula text and its axis kind: "N" (model
size), "D" (data size) or "N+D" (both). Registered:

    N            L(N)    = (A/N)^alpha + delta                       paper eq. 6, Table 1
    D            L(D)    = (B/D)^beta + delta                        paper eq. 7, Table 2
    ND           L(N, D) = [(A/N)^(alpha/beta) + B/D]^beta + delta   paper eq. 8
    ND_additive  L(N, D) = E + A/N^a + B/D^b                         Chinchilla (Hoffmann et al. 2022)

Adding a form is one `LawForm(...)` plus `register(...)`; `fit_sweep` fits every registered form of
an axis on that axis's sweep. A form's "primary" flag marks the paper's form of its axis: its law is
named by the axis ("N", "D", "ND"), the others by their kind ("ND_additive").

Log-predictions are built with logaddexp / logsumexp, so no power overflows when A/N is tiny or huge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit

from drscaling.errors import DrscalingError
from drscaling.laws.published import MSMARCO_LAWS

AXES = ("N", "D", "N+D")
EXPONENT_BOUNDS = (0.01, 4.0)
# ln of A or B of the paper's forms: 1e-6 .. 1e26 covers every sane size unit (params, pairs, millions).
LOG_SCALE_BOUNDS = (math.log(1e-6), math.log(1e26))
# ln of the additive form's coefficients, in loss units times size^exponent: far wider.
LOG_COEF_BOUNDS = (math.log(1e-12), math.log(1e40))
LOG_FLOOR_MIN = math.log(1e-8)  # an irreducible loss of 1e-8 nats is "none"

Arr = np.ndarray
LogPred = Callable[[Arr, Any, Any], Arr]
Jacobian = Callable[[Arr, Arr | None, Arr | None], tuple[Arr, Arr]]


def _cols(theta: Arr) -> tuple[Any, ...]:
    """Parameter columns: floats for one vector (p,), (k, 1) arrays for a stack (k, p) so that a
    log-prediction broadcasts to (k, points)."""
    theta = np.asarray(theta, dtype=float)
    if theta.ndim == 1:
        return tuple(float(t) for t in theta)
    return tuple(theta.T[..., None])


@dataclass(frozen=True)
class LawForm:
    """One scaling-law form; see the module docstring."""

    kind: str
    axes: str  # "N", "D" or "N+D"
    params: tuple[str, ...]
    log_params: frozenset[str]
    label: str  # "L(N)": errors, printouts
    formula_text: str  # the symbolic law
    title: str  # report table title
    log_pred: LogPred  # (theta (p,) or (k, p), logn, logd) -> log L
    # (theta (p,) or (k, p), logn, logd) -> (log L (m,) or (k, m), d log L / d theta (p, m) or (p, k, m))
    jacobian: Jacobian
    bounds: Callable[[Arr | None, Arr | None, Arr, Any], list[tuple[float, float]]]
    init_grid: Callable[[Arr | None, Arr | None, Arr, Any], Arr]
    format: Callable[[Mapping[str, float]], str]  # formula with fitted numbers
    headings: Mapping[str, str] = field(default_factory=dict)  # param -> report column heading (default: its name)
    primary: bool = False
    floor: str | None = None  # the irreducible-loss parameter, if the form has one
    reference: Mapping[str, float] = field(default_factory=dict)  # published values (report)

    @property
    def n_params(self) -> int:
        return len(self.params)

    @property
    def needs_n(self) -> bool:
        return "N" in self.axes

    @property
    def needs_d(self) -> bool:
        return "D" in self.axes

    def to_theta(self, params: Mapping[str, float]) -> Arr:
        try:
            return np.array(
                [math.log(params[p]) if p in self.log_params else float(params[p])
                 for p in self.params], dtype=float)
        except KeyError as exc:
            raise DrscalingError(f"{self.label} lacks parameter {exc}") from exc
        except ValueError as exc:  # log of a non-positive value
            raise DrscalingError(f"{self.label}: {sorted(self.log_params)} must be > 0 ({exc})") from exc

    def from_theta(self, theta: Arr) -> dict[str, float]:
        return {p: float(math.exp(t) if p in self.log_params else t)
                for p, t in zip(self.params, theta, strict=True)}

    def natural(self, thetas: Arr) -> Arr:
        """(k, p) optimiser-space rows -> natural values."""
        out = np.array(thetas, dtype=float, copy=True).reshape(-1, self.n_params)
        for j, p in enumerate(self.params):
            if p in self.log_params:
                out[:, j] = np.exp(out[:, j])
        return out


# --------------------------------------------------------------------------------------------
# The registry (live views: a form registered later shows up in KINDS and PARAM_NAMES too)
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, LawForm] = {}


def register(form: LawForm, replace: bool = False) -> LawForm:
    if form.axes not in AXES:
        raise DrscalingError(f"law form '{form.kind}': axes must be one of {AXES} (got '{form.axes}')")
    if form.kind in _REGISTRY and not replace:
        raise DrscalingError(f"law form '{form.kind}' is already registered")
    if not set(form.log_params) <= set(form.params):
        raise DrscalingError(f"law form '{form.kind}': log_params must be among its params")
    _REGISTRY[form.kind] = form
    return form


def get_form(kind: str) -> LawForm:
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise DrscalingError(
            f"unknown law kind '{kind}'; expected one of {', '.join(_REGISTRY)}"
        ) from None


def registered_forms(axes: str | None = None) -> list[LawForm]:
    """Registered forms (of one axis kind), primary first."""
    out = [f for f in _REGISTRY.values() if axes is None or f.axes == axes]
    return sorted(out, key=lambda f: not f.primary)


class _Kinds(Sequence[str]):
    def __getitem__(self, i):  # type: ignore[override]
        return tuple(_REGISTRY)[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, kind: object) -> bool:
        return kind in _REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


class _ParamNames(Mapping[str, tuple[str, ...]]):
    def __getitem__(self, kind: str) -> tuple[str, ...]:
        return get_form(kind).params

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr({k: f.params for k, f in _REGISTRY.items()})


KINDS: Sequence[str] = _Kinds()
PARAM_NAMES: Mapping[str, tuple[str, ...]] = _ParamNames()


def predict(kind: str, params: Mapping[str, float], n: Any = None, d: Any = None) -> np.ndarray:
    """Evaluate a law at sizes n (and/or d); natural-scale parameters."""
    form = get_form(kind)
    theta = form.to_theta(params)
    logn = None if n is None else np.log(np.asarray(n, dtype=float))
    logd = None if d is None else np.log(np.asarray(d, dtype=float))
    if form.needs_n and logn is None:
        raise DrscalingError(f"law {kind} needs N to predict")
    if form.needs_d and logd is None:
        raise DrscalingError(f"law {kind} needs D to predict")
    if form.needs_n and form.needs_d:
        logn, logd = np.broadcast_arrays(logn, logd)
    return np.exp(form.log_pred(theta, logn, logd))


# --------------------------------------------------------------------------------------------
# Shared pieces of the built-in forms
# --------------------------------------------------------------------------------------------


def _floor_bounds(logy: Arr) -> tuple[float, float]:
    # An irreducible floor above every observation would make the power-law term negative, which
    # none of the forms can express: bound it by the largest observed loss.
    return (LOG_FLOOR_MIN, float(np.max(logy)))


def _clip_grid(grid: list[tuple[float, ...]], bounds: list[tuple[float, float]]) -> Arr:
    arr = np.array(grid, dtype=float)
    for j, (lo, hi) in enumerate(bounds):
        arr[:, j] = np.clip(arr[:, j], lo, hi)
    return arr


def _floor_starts(logy: Arr, cfg: Any) -> list[float]:
    ymin = float(np.exp(np.min(logy)))
    return [math.log(f * ymin) for f in cfg.delta_fractions]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ----- L(N), L(D): (S/x)^e + delta, theta = (ln S, e, ln delta) --------------------------------


def _single_log_pred(axis: str) -> LogPred:
    def log_pred(theta: Arr, logn: Any, logd: Any) -> Arr:
        log_s, expo, log_delta = _cols(theta)
        logx = logn if axis == "N" else logd
        return np.logaddexp(expo * (log_s - logx), log_delta)

    return log_pred


def _single_jacobian(axis: str) -> Jacobian:
    def jacobian(theta: Arr, logn: Arr | None, logd: Arr | None) -> tuple[Arr, Arr]:
        log_s, expo, log_delta = _cols(theta)
        gap = log_s - (logn if axis == "N" else logd)  # ln(S/x)
        u = expo * gap
        w = expit(u - log_delta)  # share of the power-law term in L
        return np.logaddexp(u, log_delta), np.stack([expo * w, gap * w, 1.0 - w])

    return jacobian


def _single_bounds(logn: Arr | None, logd: Arr | None, logy: Arr, cfg: Any) -> list[tuple[float, float]]:
    return [LOG_SCALE_BOUNDS, tuple(cfg.exponent_bounds), _floor_bounds(logy)]


def _single_grid(axis: str) -> Callable[..., Arr]:
    def init_grid(logn: Arr | None, logd: Arr | None, logy: Arr, cfg: Any) -> Arr:
        logx = logn if axis == "N" else logd
        scales = [float(np.mean(logx)) + o for o in cfg.scale_offsets]
        grid = [(s, e, f) for s in scales for e in cfg.exponent_grid for f in _floor_starts(logy, cfg)]
        return _clip_grid(grid, _single_bounds(logn, logd, logy, cfg))

    return init_grid


def _single_format(scale: str, expo: str, x: str) -> Callable[[Mapping[str, float]], str]:
    def fmt(p: Mapping[str, float]) -> str:
        return f"L({x}) = ({_fmt(p[scale])}/{x})^{_fmt(p[expo])} + {_fmt(p['delta'])}"

    return fmt


# ----- the paper's joint law, theta = (ln A, ln B, alpha, beta, ln delta) ------------------------


def _nd_log_pred(theta: Arr, logn: Any, logd: Any) -> Arr:
    log_a, log_b, alpha, beta, log_delta = _cols(theta)
    inner = np.logaddexp((alpha / beta) * (log_a - logn), log_b - logd)
    return np.logaddexp(beta * inner, log_delta)


def _nd_jacobian(theta: Arr, logn: Arr | None, logd: Arr | None) -> tuple[Arr, Arr]:
    log_a, log_b, alpha, beta, log_delta = _cols(theta)
    gap = log_a - logn
    s1 = (alpha / beta) * gap  # ln (A/N)^(alpha/beta)
    s2 = log_b - logd  # ln B/D
    inner = np.logaddexp(s1, s2)
    u = beta * inner
    w = expit(u - log_delta)  # share of the bracket term in L
    q = expit(s1 - s2)  # share of the model-size term inside the bracket
    wq = w * q
    jac = np.stack([alpha * wq, beta * (w - wq), wq * gap, w * inner - wq * s1, 1.0 - w])
    return np.logaddexp(u, log_delta), jac


def _nd_bounds(logn: Arr | None, logd: Arr | None, logy: Arr, cfg: Any) -> list[tuple[float, float]]:
    e = tuple(cfg.exponent_bounds)
    return [LOG_SCALE_BOUNDS, LOG_SCALE_BOUNDS, e, e, _floor_bounds(logy)]


def _nd_grid(logn: Arr | None, logd: Arr | None, logy: Arr, cfg: Any) -> Arr:
    scale_n = [float(np.mean(logn)) + o for o in cfg.scale_offsets]
    scale_d = [float(np.mean(logd)) + o for o in cfg.scale_offsets]
    expo = list(cfg.joint_exponent_grid)
    floors = _floor_starts(logy, cfg)
    grid = [(a, b, al, be, f) for a in scale_n for b in scale_d for al in expo for be in expo
            for f in floors]
    return _clip_grid(grid, _nd_bounds(logn, logd, logy, cfg))


def _nd_format(p: Mapping[str, float]) -> str:
    return (f"L(N,D) = [({_fmt(p['A'])}/N)^({_fmt(p['alpha'])}/{_fmt(p['beta'])}) + "
            f"{_fmt(p['B'])}/D]^{_fmt(p['beta'])} + {_fmt(p['delta'])}")


# ----- Chinchilla's additive form, theta = (ln E, ln A, ln B, a, b) -------------------------------


def _add_log_pred(theta: Arr, logn: Any, logd: Any) -> Arr:
    log_e, log_a, log_b, a, b = _cols(theta)
    return np.logaddexp(np.logaddexp(log_a - a * logn, log_b - b * logd), log_e)


def _add_jacobian(theta: Arr, logn: Arr | None, logd: Arr | None) -> tuple[Arr, Arr]:
    log_e, log_a, log_b, a, b = _cols(theta)
    t1, t2 = log_a - a * logn, log_b - b * logd
    lp = np.logaddexp(np.logaddexp(t1, t2), log_e)
    w1, w2 = np.exp(t1 - lp), np.exp(t2 - lp)  # shares of the two terms in L
    return lp, np.stack([1.0 - w1 - w2, w1, w2, -w1 * logn, -w2 * logd])


def _add_bounds(logn: Arr | None, logd: Arr | None, logy: Arr, cfg: Any) -> list[tuple[float, float]]:
    e = tuple(cfg.exponent_bounds)
    return [_floor_bounds(logy), LOG_COEF_BOUNDS, LOG_COEF_BOUNDS, e, e]


def _add_grid(logn: Arr | None, logd: Arr | None, logy: Arr, cfg: Any) -> Arr:
    # A and B start where their term is a given share of the mid loss at the data's centre.
    ymid = float(np.exp(np.median(logy)))
    shares = (0.1, 0.5, 1.0)
    expo = list(cfg.joint_exponent_grid)
    mn, md = float(np.mean(logn)), float(np.mean(logd))
    grid = [
        (f, math.log(sa * ymid) + a * mn, math.log(sb * ymid) + b * md, a, b)
        for f in _floor_starts(logy, cfg) for sa in shares for sb in shares for a in expo for b in expo
    ]
    return _clip_grid(grid, _add_bounds(logn, logd, logy, cfg))


def _add_format(p: Mapping[str, float]) -> str:
    return (f"L(N,D) = {_fmt(p['E'])} + {_fmt(p['A'])}/N^{_fmt(p['a'])} + "
            f"{_fmt(p['B'])}/D^{_fmt(p['b'])}")


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def _single_form(axis: str, scale: str, expo: str, symbol: str, title: str) -> LawForm:
    """L(N) or L(D): (S/x)^e + delta, the paper's eq. 6 or 7."""
    return LawForm(
        kind=axis, axes=axis, params=(scale, expo, "delta"), log_params=frozenset({scale, "delta"}),
        label=f"L({axis})", formula_text=f"L({axis}) = ({scale}/{axis})^{symbol} + δ", title=title,
        headings={scale: scale, expo: symbol, "delta": f"δ_{axis}"},
        log_pred=_single_log_pred(axis), jacobian=_single_jacobian(axis), bounds=_single_bounds,
        init_grid=_single_grid(axis), format=_single_format(scale, expo, axis), primary=True,
        floor="delta", reference=MSMARCO_LAWS[axis].reference,
    )


register(_single_form("N", "A", "alpha", "α", "Table 1: model-size scaling"))
register(_single_form("D", "B", "beta", "β", "Table 2: data-size scaling"))
register(LawForm(
    kind="ND", axes="N+D", params=("A", "B", "alpha", "beta", "delta"),
    log_params=frozenset({"A", "B", "delta"}), label="L(N,D)",
    formula_text="L(N,D) = [(A/N)^(α/β) + B/D]^β + δ", title="Joint law",
    headings={"A": "A", "B": "B", "alpha": "α", "beta": "β", "delta": "δ"},
    log_pred=_nd_log_pred, jacobian=_nd_jacobian, bounds=_nd_bounds, init_grid=_nd_grid,
    format=_nd_format, primary=True, floor="delta",
    reference=MSMARCO_LAWS["ND"].reference,
))
register(LawForm(
    kind="ND_additive", axes="N+D", params=("E", "A", "B", "a", "b"),
    log_params=frozenset({"E", "A", "B"}), label="L(N,D) additive",
    formula_text="L(N,D) = E + A/N^a + B/D^b", title="Joint law, Chinchilla's additive form",
    log_pred=_add_log_pred, jacobian=_add_jacobian, bounds=_add_bounds, init_grid=_add_grid,
    format=_add_format, floor="E",
))
