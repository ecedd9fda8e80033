"""Plot data (DVC plots) and figures in the paper's style (Figs 1/3, 2, 4, 5, 6).

Every fitted curve has its 95% bootstrap band (2.5-97.5% of the bootstrap predictions). L(N) and L(D)
are drawn on log-log axes like the paper's Figs 1-5. Held-out points show what was observed and what
was predicted as separate, labelled markers. Log-axis ticks are chosen so that labels never collide:
at most ~7 per axis, in compact units (2M, 500k, 0.12).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from drscaling.design import SWEEPS
from drscaling.files import atomic_open, atomic_path
from drscaling.laws.forms import registered_forms
from drscaling.laws.result import FitResult

RANKING_METRICS = ("mrr@10", "ndcg@10", "recall@1000")
LOSS_FIELD = "ce_test_min"  # what the laws are fitted on: the best test CE seen in training
LOSS_LABEL = "contrastive entropy (test)"
BAND_LABEL = "95% bootstrap band"


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with atomic_open(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
    return path


def _single_table(fit: FitResult, axis: str) -> list[tuple[Any, ...]]:
    x = fit.points[axis]
    fitted = fit.predict(**{axis: x})
    lo, hi = fit.band(**{axis: x})
    if not len(lo):
        lo = hi = np.full(len(x), np.nan)
    return list(zip(x, fit.points["loss"], fitted, lo, hi, strict=True))


def write_plot_data(
    rows: list[dict[str, Any]], fits: dict[str, FitResult], plots_dir: Path
) -> list[Path]:
    """One CSV per figure: observed and fitted values (and the 95% band) side by side."""
    out = []
    for name, axis, file in (("N", "n", "ce_vs_n.csv"), ("D", "d", "ce_vs_d.csv")):
        if name in fits:
            out.append(_write_csv(plots_dir / file, [axis, LOSS_FIELD, "fitted", "band_lo", "band_hi"],
                                  _single_table(fits[name], axis)))
    src = [(name.split("@", 1)[1], fit) for name, fit in sorted(fits.items()) if name.startswith("D@")]
    if src:
        table = [(source, *row) for source, fit in src for row in _single_table(fit, "d")]
        out.append(_write_csv(plots_dir / "ce_vs_d_by_source.csv",
                              ["source", "d", LOSS_FIELD, "fitted", "band_lo", "band_hi"], table))
    if "ND" in fits:
        fit = fits["ND"]
        fitted = fit.predict(n=fit.points["n"], d=fit.points["d"])
        table = [(nn, dd, yy, ff, 0) for nn, dd, yy, ff in zip(
            fit.points["n"], fit.points["d"], fit.points["loss"], fitted, strict=True)]
        table += [(p["n"], p["d"], p["observed"], p["predicted"], 1)
                  for p in (fit.heldout or {}).get("points", [])]
        out.append(_write_csv(plots_dir / "joint.csv", ["n", "d", LOSS_FIELD, "fitted", "heldout"],
                              table))
    metric_rows = [r for r in rows if all(isinstance(r.get(m), int | float) for m in RANKING_METRICS)]
    if metric_rows:
        out.append(_write_csv(
            plots_dir / "metrics_vs_ce.csv", ["sweep", LOSS_FIELD, *RANKING_METRICS],
            ([r["sweep"], r[LOSS_FIELD], *(r[m] for m in RANKING_METRICS)] for r in metric_rows),
        ))
    return out


# --------------------------------------------------------------------------------------------
# Axes
# --------------------------------------------------------------------------------------------


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


def _grid(values: Iterable[float], pad: float = 1.5, num: int = 200) -> np.ndarray:
    vals = list(values)
    return np.geomspace(min(vals) / pad, max(vals) * pad, num)


def size_label(x: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


# Multipliers within a decade, densest first; the densest that gives at most MAX_TICKS is used.
_SUBS = ((1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9), (1, 1.5, 2, 3, 5, 7), (1, 2, 5), (1,))
MAX_TICKS = 7


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick positions on a log axis from lo to hi: at most MAX_TICKS (plus every 10^k decade when
    the range spans more decades than that, thinned to every other/third decade)."""
    k0, k1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    for subs in _SUBS:
        ticks = [s * 10.0**k for k in range(k0, k1) for s in subs if lo <= s * 10.0**k <= hi]
        if 2 <= len(ticks) <= MAX_TICKS or (subs == (1,) and len(ticks) <= MAX_TICKS):
            return ticks
    decades = [10.0**k for k in range(k0, k1) if lo <= 10.0**k <= hi]
    step = math.ceil(len(decades) / MAX_TICKS)
    return decades[::step]


def set_log_axis(ax: Any, which: str, lo: float, hi: float, sizes: bool) -> None:
    """Log scale on ax.xaxis / ax.yaxis with non-colliding, compact tick labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    (ax.set_xlim if which == "x" else ax.set_ylim)(lo, hi)
    axis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
    axis.set_major_formatter(FuncFormatter(lambda x, _: size_label(x) if sizes else f"{x:.3g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _loss_limits(*arrays: Iterable[float]) -> tuple[float, float]:
    vals = np.concatenate([np.asarray(list(a), dtype=float).reshape(-1) for a in arrays])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    return float(vals.min()) / 1.15, float(vals.max()) * 1.15


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _curve(ax: Any, fit: FitResult, xs: np.ndarray, sizes: dict[str, np.ndarray], color: str,
           label: str, band_label: str | None = BAND_LABEL) -> list[np.ndarray]:
    """The fitted curve at `sizes` (drawn against xs) and its bootstrap band; returns the arrays
    drawn (for the y limits)."""
    ys = fit.predict(**sizes)
    ax.plot(xs, ys, "--", color=color, label=label)
    lo, hi = fit.band(**sizes)
    if len(lo):
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0, label=band_label)
        return [ys, lo, hi]
    return [ys]


def _interval_bars(ax, held: list[dict], axis: str, color: str = "tab:orange") -> list[np.ndarray]:
    """The held-out refit's 95% prediction interval at each held-out point, as an error bar."""
    held = [p for p in held if "interval" in p]
    if not held:
        return []
    lo, hi = (np.array([p["interval"][k] for p in held]) for k in (0, 1))
    pred = np.array([p["predicted"] for p in held])
    ax.errorbar([p[axis] for p in held], pred, yerr=[pred - lo, hi - pred], fmt="none", ecolor=color,
                capsize=4, zorder=4, label="the refit's 95% prediction interval")
    return [lo, hi]


def _fig_single(fit: FitResult, axis: str, title: str, xlabel: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), layout="constrained")
    x, y = fit.points[axis], fit.points["loss"]
    ax.scatter(x, y, color="tab:blue", zorder=3, label="observed (used in the fit)")
    xs = _grid(x)
    drawn = _curve(ax, fit, xs, {axis: xs}, "tab:red", f"fit: {fit.formula()}\n$R^2$ = {fit.r2:.3f}")
    held = (fit.heldout or {}).get("points", [])
    if held:
        hx = [p[axis] for p in held]
        ax.scatter(hx, [p["observed"] for p in held], marker="*", s=140, facecolor="none",
                   edgecolor="black", zorder=4, label=f"held out in the check (observed, largest {axis.upper()})")
        ax.scatter(hx, [p["predicted"] for p in held], marker="X", s=60, color="tab:orange", zorder=5,
                   label=f"predicted by a refit without it ({fit.heldout['max_abs_rel_error']:.1%} off)")
        drawn.append(np.array([p["predicted"] for p in held]))
        drawn += _interval_bars(ax, held, axis)
    set_log_axis(ax, "x", xs[0], xs[-1], sizes=True)
    set_log_axis(ax, "y", *_loss_limits(y, *drawn), sizes=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(LOSS_LABEL)
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
            pts = [(r[LOSS_FIELD], r[metric]) for r in rows
                   if r["sweep"] == sweep and isinstance(r.get(metric), int | float)]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, s=14, label=f"{sweep} sweep (observed)")
                drawn = True
        ax.set_xlabel(LOSS_LABEL)
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
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    src = sorted((k, v) for k, v in fits.items() if k.startswith("D@"))
    all_d = [dd for _, fit in src for dd in fit.points["d"]]
    xs = _grid(all_d)
    drawn: list[Any] = []
    for i, (name, fit) in enumerate(src):
        color = f"C{i}"
        source = name.split("@", 1)[1]
        ax.scatter(fit.points["d"], fit.points["loss"], color=color, s=16, zorder=3)
        drawn.append(fit.points["loss"])
        p = fit.params
        drawn += _curve(ax, fit, xs, {"d": xs}, color,
                        f"{source}: B={p['B']:.3g}, β={p['beta']:.3g}, δ={p['delta']:.3g}",
                        band_label=BAND_LABEL if i == 0 else None)
    ax.scatter([], [], color="gray", s=16, label="observed (dots), fit (dashed)")
    set_log_axis(ax, "x", xs[0], xs[-1], sizes=True)
    set_log_axis(ax, "y", *_loss_limits(*drawn), sizes=False)
    ax.set_xlabel("annotated query-passage pairs D")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Data-size scaling per annotation source (Fig 5)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _fig_joint(fit: FitResult, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.8), layout="constrained")
    held = (fit.heldout or {}).get("points", [])
    all_n = sorted(set(fit.points["n"]) | {p["n"] for p in held})
    xs = _grid(list(fit.points["d"]) + [p["d"] for p in held])
    drawn: list[Any] = [fit.points["loss"]]
    held_n = {p["n"] for p in held}
    for i, n_val in enumerate(all_n):
        color = f"C{i % 10}"
        pts = [(dd, yy) for nn, dd, yy in zip(
            fit.points["n"], fit.points["d"], fit.points["loss"], strict=True) if nn == n_val]
        if pts:
            ds, ys = zip(*pts, strict=True)
            ax.scatter(ds, ys, color=color, s=16, zorder=3)
        drawn += _curve(ax, fit, xs, {"n": np.full_like(xs, n_val), "d": xs}, color,
                        f"fit: N = {size_label(n_val)}" + (" (held out of the check)" if n_val in held_n else ""),
                        band_label=BAND_LABEL if i == 0 else None)
    ax.scatter([], [], color="gray", s=16, label="observed (used in the fit)")
    if held:
        ax.scatter([p["d"] for p in held], [p["observed"] for p in held], color="red", marker="*",
                   s=110, zorder=4, label="held out of the check's refit (observed)")
        ax.scatter([p["d"] for p in held], [p["predicted"] for p in held], facecolor="none",
                   edgecolor="black", marker="o", s=60, zorder=5,
                   label=f"predicted by the refit without them ({fit.heldout['mean_abs_rel_error']:.1%} mean error)")
        drawn.append([p["observed"] for p in held])
        drawn += _interval_bars(ax, held, "d", color="black")  # the curves take the colour cycle
    set_log_axis(ax, "x", xs[0], xs[-1], sizes=True)
    set_log_axis(ax, "y", *_loss_limits(*drawn), sizes=False)
    ax.set_xlabel("annotated query-passage pairs D")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(f"Joint law (Fig 6): {fit.formula()}", fontsize=8)
    ax.legend(fontsize=7, ncols=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def make_figures(
    rows: list[dict[str, Any]], fits: dict[str, FitResult], fig_dir: Path
) -> list[Path]:
    """The paper's Figs 1/3, 2, 4, 5 and 6 for whatever was fitted (Fig 6 once per joint form)."""
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
    if any(k.startswith("D@") for k in fits):
        out.append(_fig_sources(fits, fig_dir / "fig5_ce_vs_d_by_source.png"))
    for form in registered_forms("N+D"):
        if form.kind in fits:
            name = "fig6_joint.png" if form.primary else f"fig6_joint_{form.kind}.png"
            out.append(_fig_joint(fits[form.kind], fig_dir / name))
    return out
