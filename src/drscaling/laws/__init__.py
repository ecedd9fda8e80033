"""Fitting the paper's scaling laws L(N), L(D) and L(N, D) (eqs. 6-8), and any registered law form,
with honest uncertainty and checks.

    forms.py      the law-form registry (parameters, log-space, bounds, grid, formula, axis kind)
    optimize.py   log-space Huber objective, vectorised grid screening, multi-start L-BFGS-B
    bootstrap.py  intervals from refits that start from the grid (parametric t-calibrated default)
    checks.py     refusals (too few points, all unconverged) and flags
    fit.py        fit_law / fit_n / fit_d / fit_joint and the held-out checks
    result.py     FitResult and laws.json
    figures.py    plot data and figures (bands, log-log, held-out markers)
    stage.py      the fit stage: sweep results -> laws.json, figures, metrics, MLflow
    text.py       the printout of `drscaling fit`
"""

from drscaling.laws.checks import (
    CI_COLLAPSED,
    CI_RATIO_FLAG,
    HELDOUT_FLAG,
    R2_FLAG,
    TooFewPointsError,
    UnconvergedPointsError,
)
from drscaling.laws.figures import RANKING_METRICS, SWEEPS, make_figures, write_plot_data
from drscaling.laws.fit import fit_d, fit_joint, fit_law, fit_n
from drscaling.laws.forms import (
    KINDS,
    PARAM_NAMES,
    LawForm,
    get_form,
    predict,
    register,
    registered_forms,
)
from drscaling.laws.optimize import BOOTSTRAP_METHODS, HUBER_DELTA, FitConfig
from drscaling.laws.result import (
    LAWS_VERSION,
    FitResult,
    load_laws,
    load_laws_meta,
    ordered_laws,
    save_laws,
)
from drscaling.laws.stage import LOSS_FIELD, figures_to_sweep_parents, fit_sweep, law_metrics, log_to_mlflow
from drscaling.laws.text import format_fits

__all__ = [
    "BOOTSTRAP_METHODS", "CI_COLLAPSED", "CI_RATIO_FLAG", "HELDOUT_FLAG", "HUBER_DELTA", "KINDS",
    "LAWS_VERSION", "LOSS_FIELD", "PARAM_NAMES", "R2_FLAG", "RANKING_METRICS", "SWEEPS",
    "FitConfig", "FitResult", "LawForm", "TooFewPointsError", "UnconvergedPointsError", "fit_d",
    "figures_to_sweep_parents", "fit_joint", "fit_law", "fit_n", "fit_sweep", "format_fits", "get_form", "law_metrics",
    "load_laws", "load_laws_meta", "log_to_mlflow", "make_figures", "ordered_laws", "predict",
    "register", "registered_forms", "save_laws", "write_plot_data",
]
