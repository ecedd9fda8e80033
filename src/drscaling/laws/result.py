"""FitResult (one fitted law, everything a later stage needs) and laws.json."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drscaling.errors import DrscalingError
from drscaling.files import finite_or_null, read_json, write_json
from drscaling.laws.forms import LawForm, get_form, predict

LAWS_VERSION = 2


@dataclass
class FitResult:
    """One fitted law. `params` holds natural values (A, not log A); `bootstrap` one list per param.

    Checks: `dof` is the residual degrees of freedom (points - parameters); `flags` lists every reason
    not to trust the law; `checks` holds the same facts as numbers (points, unconverged points, ...).

    `heldout` (None when no held-out check ran; see the flags for why) is a dict with:
      axis               "n" (largest N held out: L(N) and the joint laws) or "d" (largest D: L(D))
      cut                the held-out size (joint laws also keep it as `n_cut`)
      holdout_largest    how many of the largest distinct sizes were held out
      points             one dict per held-out point: its n and/or d, observed, predicted, rel_error
                         = (predicted - observed) / observed, plus its bookkeeping (shape, config_key, ...);
                         with a bootstrap also `interval` (the refit's prediction interval: the spread
                         of its bootstrap curves and the residual scatter; laws.fit.prediction_interval)
                         and `inside_interval`
      interval_level, outside_interval   (with a bootstrap) the interval's level (95) and how many
                         held-out points fell outside it (each is flagged)
      mean_abs_rel_error, max_abs_rel_error   over the held-out points; |pred - obs| / obs
      threshold          the relative error above which the check is flagged (0.1)
      refit              "separate": the law uses every point; a refit without the held-out points
                         made the prediction (its parameters in `refit_params`). Older laws.json
                         files may say "main fit" (the joint law itself was fitted without them).
    """

    kind: str
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
    dof: int | None = None  # points - parameters; None for a law without points (published)
    bootstrap_method: str = ""
    checks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dof is None and self.n_points:
            self.dof = self.n_points - len(get_form(self.kind).params)

    @property
    def form(self) -> LawForm:
        return get_form(self.kind)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitResult:
        try:
            form = get_form(d["kind"])
            missing = [p for p in form.params if p not in d["params"]]
            if missing:
                raise DrscalingError(f"law of kind {form.kind} lacks parameter(s) {missing}")
            dof = d.get("dof")
            params = {k: float(v) for k, v in d["params"].items()}
            bad = [f"{k} ({v})" for k, v in params.items() if not math.isfinite(v)]
            if bad:  # a NaN or infinite parameter predicts nothing (and crashes the figures)
                raise DrscalingError(f"law of kind {form.kind} has non-finite parameter(s) {', '.join(bad)};"
                                     " refit it (`drscaling fit`)")
            return cls(
                kind=form.kind,
                params=params,
                r2=_number(d.get("r2")),
                residuals=[_number(x) for x in d.get("residuals", [])],
                ci95={k: [_number(v[0]), _number(v[1])] for k, v in d.get("ci95", {}).items()},
                bootstrap={k: [_number(x) for x in v] for k, v in d.get("bootstrap", {}).items()},
                n_points=int(d.get("n_points", 0)),
                flags=list(d.get("flags", [])),
                heldout=d.get("heldout"),
                points=dict(d.get("points", {})),
                objective=_number(d.get("objective")),
                dof=None if dof is None else int(dof),
                bootstrap_method=str(d.get("bootstrap_method", "")),
                checks=dict(d.get("checks", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DrscalingError(f"malformed fitted law ({exc!r})") from exc

    def param_vector(self) -> np.ndarray:
        return np.array([self.params[p] for p in self.form.params], dtype=float)

    def bootstrap_matrix(self) -> np.ndarray:
        """(n_samples, n_params) natural-scale samples; (0, n_params) when there are none."""
        names = self.form.params
        if not self.bootstrap or any(p not in self.bootstrap for p in names):
            return np.empty((0, len(names)))
        return np.column_stack([np.asarray(self.bootstrap[p], dtype=float) for p in names])

    def predict(self, n: Any = None, d: Any = None) -> np.ndarray:
        return predict(self.kind, self.params, n=n, d=d)

    def predict_bootstrap(self, n: Any = None, d: Any = None) -> np.ndarray:
        """Predictions of every bootstrap sample: shape (n_samples, len(points)), vectorised."""
        form = self.form
        mat = self.bootstrap_matrix()
        logn = None if n is None else np.log(np.asarray(n, dtype=float)).reshape(-1)
        logd = None if d is None else np.log(np.asarray(d, dtype=float)).reshape(-1)
        if form.needs_n and form.needs_d:
            logn, logd = np.broadcast_arrays(logn, logd)
        size = len(logn if logn is not None else logd)
        if not len(mat):
            return np.empty((0, size))
        thetas = np.log(np.where(mat > 0, mat, np.nan))
        for j, p in enumerate(form.params):
            if p not in form.log_params:
                thetas[:, j] = mat[:, j]
        return np.exp(form.log_pred(thetas, logn, logd)).reshape(len(mat), size)

    def band(self, n: Any = None, d: Any = None, level: float = 95.0) -> tuple[np.ndarray, np.ndarray]:
        """The (lo, hi) percentile band of the bootstrap predictions; empty arrays without samples."""
        preds = self.predict_bootstrap(n=n, d=d)
        if not len(preds):
            return np.empty(0), np.empty(0)
        tail = (100.0 - level) / 2
        lo, hi = np.nanpercentile(preds, [tail, 100.0 - tail], axis=0)
        return lo, hi

    def formula(self) -> str:
        """The fitted law as a short human-readable string (figure legends, reports)."""
        return self.form.format(self.params)


def _number(value: Any) -> float:
    """A number of laws.json: null (how a non-finite one is written) reads back as NaN."""
    return float("nan") if value is None else float(value)


def ordered_laws(fits: dict[str, FitResult]) -> list[tuple[str, FitResult]]:
    """Laws in registry order (N, D, D@sources, ND, ND_additive, ...), each form's own law first."""
    from drscaling.laws.forms import KINDS

    kinds = list(KINDS)

    def key(item: tuple[str, FitResult]) -> tuple[int, bool, str]:
        name, fit = item
        return (kinds.index(fit.kind) if fit.kind in kinds else len(kinds), name != fit.kind, name)

    return sorted(fits.items(), key=key)


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
    write_json(path, finite_or_null(doc))  # strict JSON: NaN (no R² for a published law, ...) as null
    return Path(path)


def load_laws(path: str | Path) -> dict[str, FitResult]:
    path = Path(path)
    doc = read_json(path, what="fitted laws",
                    hint="run the fit stage (`drscaling fit` or `dvc repro fit`) first")
    if not isinstance(doc, dict) or not isinstance(doc.get("laws"), dict):
        raise DrscalingError(f"{path}: not a laws file (no 'laws' object); re-run `drscaling fit`")
    fits = {}
    for name, d in doc["laws"].items():
        try:
            fits[name] = FitResult.from_dict(d)
        except DrscalingError as exc:
            raise DrscalingError(f"{path}: law '{name}': {exc}") from None
    return fits


def load_laws_meta(path: str | Path) -> dict[str, Any]:
    doc = read_json(path, what="fitted laws")
    return dict(doc.get("meta", {})) if isinstance(doc, dict) else {}
