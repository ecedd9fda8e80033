"""Bootstrap intervals whose refits are not anchored to the point estimate.

Every refit screens the whole initialisation grid on its own resampled data (one array operation),
refines its best starts by vectorised Gauss-Newton steps and runs L-BFGS-B from the best few, as the
point estimate does (optimize.py); it never starts from the point estimate. (Starting from it, as this module once did, made each refit one short local run
that barely moved: on synthetic data from the paper's law at the MiniLM N values the "95% interval"
of alpha came out [0.434, 0.435] around a fit of 0.435 while the truth was 0.53.)

Methods (FitConfig.bootstrap_method):

- "parametric" (default): a residual bootstrap in log space with the noise scale drawn from its own
  sampling distribution. With fitted log-predictions f, log residuals r and dof = m - p residual
  degrees of freedom, each replicate is  log y* = f + sigma* z,  z ~ N(0, I),
  sigma*^2 = (sum r^2 / dof) * dof / chi2_dof.  Drawing sigma* instead of plugging in the estimate is
  what makes the percentile interval honest at 6 points and 3 parameters (dof = 3): for a linear
  model it reproduces the exact Student-t interval (t_3 quantile 3.18, not 1.96); plugging sigma in
  gives the z interval, which covers ~85% at dof = 3. benchmarks/coverage.py measures the coverage.
- "pairs": resample the points with replacement (as multiplicity weights), redrawing a resample with
  fewer than p + 1 distinct points (it cannot determine the law). Kept for comparison: with few
  points its intervals are far wider than the parametric ones and its coverage no better.

Replicates are drawn in the parent from the seed and cut into fixed-size chunks; chunks are refitted
by a pool of processes (2 by default) and reassembled in order, so the samples do not depend on the
number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from drscaling.errors import DrscalingError
from drscaling.laws.forms import LawForm, get_form
from drscaling.laws.optimize import (
    BOOTSTRAP_METHODS,
    Bounds,
    FitConfig,
    Points,
    best_of_starts,
    ranked_starts,
    single_threaded_blas,
)


def replicates(form: LawForm, theta: np.ndarray, pts: Points, cfg: FitConfig) -> Points:
    """The n_bootstrap replicates of the data: log y* and weights, each (n_bootstrap, m), drawn from
    cfg.seed, at the same sizes."""
    logy = pts.logy
    m, p, b = len(logy), form.n_params, cfg.n_bootstrap
    rng = np.random.default_rng(cfg.seed)
    if cfg.bootstrap_method == "parametric":
        fitted = pts.log_pred(form, theta)
        dof = m - p
        s2 = float(np.sum((logy - fitted) ** 2)) / dof
        sigma = np.sqrt(s2 * dof / rng.chisquare(dof, size=b))
        ys = fitted[None, :] + sigma[:, None] * rng.standard_normal((b, m))
        return pts.replace(ys, np.ones((b, m)))
    if cfg.bootstrap_method == "pairs":
        weights = np.empty((b, m))
        i = 0
        for _ in range(200 * b):
            counts = np.bincount(rng.integers(0, m, m), minlength=m)
            if np.count_nonzero(counts) >= p + 1:
                weights[i] = counts
                i += 1
                if i == b:
                    break
        if i < b:
            raise DrscalingError(f"{form.label}: pairs bootstrap could not draw usable resamples")
        return pts.replace(np.broadcast_to(logy, (b, m)).copy(), weights)
    raise DrscalingError(
        f"unknown bootstrap method '{cfg.bootstrap_method}'; expected one of {BOOTSTRAP_METHODS}"
    )


def refit_chunk(kind: str, reps: Points, grid: np.ndarray, bounds: Bounds, cfg: FitConfig) -> np.ndarray:
    """Refit each replicate (row of reps) from its best grid starts; rows of NaN where every start
    failed."""
    form = get_form(kind)
    with single_threaded_blas():
        starts = ranked_starts(form, grid, reps, bounds, cfg, cfg.bootstrap_starts)
        out = np.full((len(reps.logy), form.n_params), np.nan)
        for i in range(len(reps.logy)):
            best = best_of_starts(starts[i], form, reps.take(i), bounds, cfg)
            if best is not None and np.all(np.isfinite(best[0])):
                out[i] = best[0]
    return out


def _pool_context() -> mp.context.BaseContext:
    """fork when this process has one thread (cheap, and forms registered at run time are inherited);
    forkserver when other threads run (forking them could copy a held lock; the main module must
    then be import-safe, i.e. guarded by `if __name__ == "__main__"`); spawn elsewhere."""
    methods = mp.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return mp.get_context("fork")
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["drscaling.laws.bootstrap"])  # workers fork with scipy loaded
        return ctx
    return mp.get_context("spawn")


def workers_for(cfg: FitConfig) -> int:
    if cfg.workers is not None:
        return max(1, int(cfg.workers))
    return max(1, min(2, os.cpu_count() or 1))


def bootstrap(form: LawForm, theta: np.ndarray, pts: Points, cfg: FitConfig) -> tuple[np.ndarray, int]:
    """Natural-scale bootstrap samples (n_ok, p) and the number of failed refits."""
    if cfg.n_bootstrap == 0:
        return np.empty((0, form.n_params)), 0
    reps = replicates(form, theta, pts, cfg)
    grid = pts.init_grid(form, cfg)
    bounds = pts.bounds(form, cfg)
    size = max(1, cfg.chunk_size)
    tasks = [(form.kind, reps.take(slice(i, i + size)), grid, bounds, cfg) for i in range(0, len(reps.logy), size)]
    workers = min(workers_for(cfg), len(tasks))
    parts = None
    if workers > 1 and cfg.n_bootstrap >= cfg.parallel_min:
        try:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
                parts = list(pool.map(refit_chunk, *zip(*tasks, strict=True)))
        except (BrokenProcessPool, OSError, pickle.PicklingError, AttributeError, DrscalingError):
            parts = None  # e.g. a form registered at run time is unknown to a fresh worker
    if parts is None:
        parts = [refit_chunk(*t) for t in tasks]
    thetas = np.vstack(parts)
    ok = np.all(np.isfinite(thetas), axis=1)
    return form.natural(thetas[ok]), int(np.count_nonzero(~ok))
