"""Statistics behind the measured costs: repeated load settings, the machine's load, the cost fit.

A load setting (batch, concurrency, sequence length) is measured `repeats` times. `summarise_repeats`
turns the repeats into one cell: the median of every metric (what the costs use), the spread
(min, max and relative spread) and a flag when the tokens/s of the repeats disagree by more than
SPREAD_LIMIT. A CPU host shares its cores with whatever else runs there, so `machine_state` records
the load average at the start and `load_flags` flags a machine already busier than its cores.

`fit_power` fits cost = a * N**b in log space and, when it can, gives a 95% interval for a and b:
by bootstrap over the repeats (each draw resamples every point's repeats and takes their median,
the same estimator as the point), or, without repeats and with 3+ distinct N, from the
least-squares standard errors. The bootstrap covers measurement noise only, not a misfit of the
power law itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from drscaling.errors import DrscalingError

# A setting whose repeats' tokens/s span more than this share of their median is flagged:
# relative spread = (max - min) / median.
SPREAD_LIMIT = 0.10
SPREAD_METRICS = ("tokens_per_s", "inferences_per_s", "p50_ms", "p95_ms", "p99_ms")
FIT_LEVEL = 0.95
FIT_DRAWS = 1000


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median: 0 for identical repeats; the one definition of spread used here."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise DrscalingError("no values to take a spread of")
    median = float(np.median(arr))
    if median <= 0:
        raise DrscalingError(f"spread needs a positive median (got {median})")
    return float((arr.max() - arr.min()) / median)


def summarise_repeats(cells: Sequence[dict], limit: float = SPREAD_LIMIT, label: str = "") -> dict:
    """One setting's repeated load cells -> one cell of medians, with spread, per-repeat values and flags."""
    if not cells:
        raise DrscalingError("no repeats to summarise")
    setting = {k: cells[0][k] for k in ("batch", "concurrency", "seq_len")}
    if any({k: c[k] for k in setting} != setting for c in cells):
        seen = sorted({(c["batch"], c["concurrency"], c["seq_len"]) for c in cells})
        raise DrscalingError(f"repeats of different settings (batch, concurrency, seq_len) cannot be summarised: {seen}")
    out: dict = setting | {
        "repeats": len(cells),
        "requests": int(np.median([c["requests"] for c in cells])),
        "seconds": float(np.median([c["seconds"] for c in cells])),
    }
    for key in SPREAD_METRICS:
        out[key] = float(np.median([c[key] for c in cells]))
    out["spread"] = {key: {"min": min(c[key] for c in cells), "max": max(c[key] for c in cells),
                           "rel": relative_spread([c[key] for c in cells])} for key in SPREAD_METRICS}
    out["per_repeat"] = {key: [c[key] for c in cells] for key in ("tokens_per_s", "p50_ms", "p99_ms")}
    rel = out["spread"]["tokens_per_s"]["rel"]
    out["flags"] = []
    if len(cells) > 1 and rel > limit:
        where = f"{label} " if label else ""
        out["flags"].append(
            f"{where}batch {setting['batch']} x concurrency {setting['concurrency']}: tokens/s spread "
            f"{rel:.0%} over {len(cells)} repeats (limit {limit:.0%}; min {out['spread']['tokens_per_s']['min']:.0f}, "
            f"max {out['spread']['tokens_per_s']['max']:.0f})"
        )
    return out


def usable_cpus() -> int:
    """Cores this process may run on (the affinity mask, e.g. a container's cpuset), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_state() -> dict:
    """The 1-minute load average and the usable cores, now."""
    try:
        load = float(os.getloadavg()[0])
    except (AttributeError, OSError):  # not on every platform
        load = float("nan")
    return {"loadavg_1m": round(load, 2), "usable_cpus": usable_cpus()}


def load_flags(state: dict) -> list[str]:
    """A flag when the machine was already busier than its cores when measuring started."""
    load, cpus = state["loadavg_1m"], state["usable_cpus"]
    if not load > cpus:  # nan (unknown) does not flag
        return []
    return [f"machine loaded at start: 1-minute load average {load:.2f} above its {cpus} usable cores; "
            "throughput is lower and noisier than on an idle machine"]


# ---------------------------------------------------------------------------------------------
# Power-law fit with an interval
# ---------------------------------------------------------------------------------------------


def _fit_rows(log_n: np.ndarray, log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (log a, b) for each row of log_y (draws x points) against one log_n."""
    x = log_n - log_n.mean()
    b = (log_y - log_y.mean(axis=1, keepdims=True)) @ x / (x @ x)
    return log_y.mean(axis=1) - b * log_n.mean(), b


def _bootstrap_interval(n: np.ndarray, samples: Sequence[Sequence[float]], level: float, draws: int,
                        seed: int) -> dict:
    rng = np.random.default_rng(seed)
    cols = []
    for s in samples:
        s = np.asarray(s, dtype=float)
        cols.append(np.median(s[rng.integers(0, s.size, size=(draws, s.size))], axis=1))
    y = np.stack(cols, axis=1)  # draws x points
    if len(np.unique(n)) < 2:
        a, b = np.mean(y / n, axis=1), None
    else:
        log_a, b = _fit_rows(np.log(n), np.log(y))
        a = np.exp(log_a)
    tail = (1 - level) / 2 * 100
    out = {"a": [float(v) for v in np.percentile(a, [tail, 100 - tail])]}
    if b is not None:
        out["b"] = [float(v) for v in np.percentile(b, [tail, 100 - tail])]
    most = max(len(s) for s in samples)
    return out | {"level": level, "method": f"bootstrap over repeats ({draws} draws, up to {most} per point)"}


def _least_squares_interval(n: np.ndarray, y: np.ndarray, level: float) -> dict:
    from scipy import stats

    log_n, log_y = np.log(n), np.log(y)
    log_a, b = _fit_rows(log_n, log_y[None, :])
    resid = log_y - (log_a[0] + b[0] * log_n)
    dof = len(n) - 2
    s2 = float(resid @ resid) / dof
    sxx = float(((log_n - log_n.mean()) ** 2).sum())
    se_b = np.sqrt(s2 / sxx)
    se_log_a = np.sqrt(s2 * (1 / len(n) + log_n.mean() ** 2 / sxx))
    t = float(stats.t.ppf(0.5 + level / 2, dof))
    return {"a": [float(np.exp(log_a[0] - t * se_log_a)), float(np.exp(log_a[0] + t * se_log_a))],
            "b": [float(b[0] - t * se_b), float(b[0] + t * se_b)], "level": level,
            "method": f"least-squares standard errors ({dof} degrees of freedom; no repeats)"}


def fit_power(n: Sequence[float], y: Sequence[float], samples: Sequence[Sequence[float]] | None = None,
              level: float = FIT_LEVEL, draws: int = FIT_DRAWS, seed: int = 0) -> dict:
    """y = a * n**b by least squares on log y = log a + b log n; one distinct n -> b = 1.

    samples[i]: the repeats behind y[i] (y[i] is their median). With repeats the result carries
    "interval" {"a", "b", "level", "method"} from a bootstrap over them; without, from the
    least-squares standard errors when 3+ distinct n leave residual degrees of freedom; else none."""
    n_arr, y_arr = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    if len(n_arr) == 0:
        raise DrscalingError("no cost points to fit")
    if len(n_arr) != len(y_arr):
        raise DrscalingError(f"cost fit needs one cost per N (got {len(n_arr)} N and {len(y_arr)} costs)")
    if (n_arr <= 0).any() or (y_arr <= 0).any():
        raise DrscalingError("cost fit needs positive N and positive costs")
    if samples is not None and (len(samples) != len(n_arr) or any(len(s) == 0 for s in samples)
                                or min(min(s) for s in samples) <= 0):
        raise DrscalingError("cost fit samples need positive repeats for every point")
    if len(np.unique(n_arr)) < 2:
        # One shape cannot give a slope; proportional to N is the paper's own assumption.
        fit: dict = {"a": float(np.mean(y_arr / n_arr)), "b": 1.0}
    else:
        b, log_a = np.polyfit(np.log(n_arr), np.log(y_arr), 1)
        fit = {"a": float(np.exp(log_a)), "b": float(b)}
    if samples is not None and max(len(s) for s in samples) > 1:
        fit["interval"] = _bootstrap_interval(n_arr, samples, level, draws, seed)
    elif len(np.unique(n_arr)) >= 3:
        fit["interval"] = _least_squares_interval(n_arr, y_arr, level)
    return fit


def format_fit(fit: dict, unit: str) -> str:
    """`$/token = a * N^b`, with the interval when the fit has one."""
    text = f"{unit} = {fit['a']:.3g} * N^{fit['b']:.3f}"
    iv = fit.get("interval")
    if iv is None:
        return text + " (no interval: one shape or too few points, no repeats)"
    b = f"b in [{iv['b'][0]:.3f}, {iv['b'][1]:.3f}], " if "b" in iv else ""
    return text + (f" ({iv['level']:.0%} interval: {b}a in [{iv['a'][0]:.3g}, {iv['a'][1]:.3g}]; "
                   f"{iv['method']})")
