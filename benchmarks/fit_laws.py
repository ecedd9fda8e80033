"""Benchmark: one joint-law fit (initialisation grid + 1,000 bootstrap refits) on ~24 synthetic points.

Every bootstrap refit screens the whole initialisation grid on its own data, refines its best starts
by vectorised Gauss-Newton steps and runs L-BFGS-B from the best `--starts` (never from the point
estimate), in a pool of `--workers` processes.
Target: <= 30 s on 2 cores. Prints every run and the median.

    .venv/bin/python benchmarks/fit_laws.py                 # 3 runs, 1,000 refits, 24 points, 2 workers
    .venv/bin/python benchmarks/fit_laws.py --workers 1     # one process
    .venv/bin/python benchmarks/fit_laws.py --kind ND_additive
    .venv/bin/python benchmarks/fit_laws.py --all-starts    # point estimate from every grid point
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import numpy as np

from drscaling.laws import FitConfig, fit_joint, fit_law, get_form, predict

PAPER_ND = {"A": 3.6e4, "B": 7.1e3, "alpha": 0.56, "beta": 1.31, "delta": 0.03}


def synthetic(n_values: int, d_values: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's joint law on a grid like its experiments, with 1% multiplicative noise."""
    nn, dd = np.meshgrid(np.geomspace(0.5e6, 85e6, n_values), np.geomspace(1e3, 5e5, d_values))
    n, d = nn.ravel(), dd.ravel()
    y = predict("ND", PAPER_ND, n=n, d=d)
    y = y * (1 + 0.01 * np.random.default_rng(seed).standard_normal(len(y)))
    return n, d, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--n-values", type=int, default=6, help="distinct N (default 6)")
    ap.add_argument("--d-values", type=int, default=4, help="distinct D (default 4; 6x4 = 24 points)")
    ap.add_argument("--kind", default="ND", help="joint law form (ND or ND_additive)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--starts", type=int, default=FitConfig.bootstrap_starts,
                    help="L-BFGS-B starts per bootstrap refit (the best of the screened grid)")
    ap.add_argument("--method", default="parametric", choices=["parametric", "pairs"])
    ap.add_argument("--all-starts", action="store_true",
                    help="point estimate: L-BFGS-B from every refined grid point, not the best 40")
    args = ap.parse_args()

    n, d, y = synthetic(args.n_values, args.d_values, seed=0)
    base = FitConfig(n_bootstrap=args.bootstrap, seed=0, workers=args.workers,
                     bootstrap_starts=args.starts, bootstrap_method=args.method)
    if args.all_starts:
        base = dataclasses.replace(base, max_starts=None)
    grid = get_form(args.kind).init_grid(np.log(n), np.log(d), np.log(y), base)
    starts = len(grid) if base.max_starts is None else min(len(grid), base.max_starts)
    refined = len(grid) if base.refine_top is None else min(len(grid), base.refine_top)
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"{args.kind}: {len(y)} points; point estimate: grid of {len(grid)} starts refined, "
          f"L-BFGS-B from the best {starts}; {args.bootstrap} {args.method} bootstrap refits, each "
          f"screening the grid, refining its best {refined} and running L-BFGS-B from the best "
          f"{args.starts}; {args.workers} worker(s)")

    totals, grids, checked = [], [], []
    for run in range(args.runs):
        t0 = time.perf_counter()
        fit_law(args.kind, y, n=n, d=d, config=dataclasses.replace(base, n_bootstrap=0))
        t1 = time.perf_counter()
        fit = fit_law(args.kind, y, n=n, d=d, config=base)
        t2 = time.perf_counter()
        # What the fit stage runs: the law, then the held-out check's refit with its own bootstrap.
        fit_joint(n, d, y, config=base, kind=args.kind)
        t3 = time.perf_counter()
        grids.append(t1 - t0)
        totals.append(t2 - t1)
        checked.append(t3 - t2)
        ci = ", ".join(f"{p} {v:.3g} [{fit.ci95[p][0]:.3g}, {fit.ci95[p][1]:.3g}]"
                       for p, v in fit.params.items())
        print(f"run {run + 1}: grid fit {t1 - t0:.2f} s; grid fit + {args.bootstrap} bootstrap "
              f"{t2 - t1:.2f} s; with the held-out check {t3 - t2:.2f} s "
              f"(load {os.getloadavg()[0]:.2f}; R2={fit.r2:.4f}; {ci})")
    print(f"median: grid fit {statistics.median(grids):.2f} s; full fit with bootstrap "
          f"{statistics.median(totals):.2f} s (target <= 30 s); with the held-out check (its refit "
          f"bootstrapped too, for the prediction interval) {statistics.median(checked):.2f} s")


if __name__ == "__main__":
    main()
