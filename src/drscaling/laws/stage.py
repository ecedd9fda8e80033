"""The fit stage: sweep results -> laws.json + figures + plot data + metrics (+ MLflow)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from drscaling.design import LAWS_FILE
from drscaling.errors import DrscalingError
from drscaling.files import read_jsonl, write_json
from drscaling.laws.checks import TooFewPointsError, UnconvergedPointsError
from drscaling.laws.figures import (
    LOSS_FIELD,
    RANKING_METRICS,
    SWEEPS,
    make_figures,
    write_plot_data,
)
from drscaling.laws.fit import fit_joint, fit_law
from drscaling.laws.forms import registered_forms
from drscaling.laws.optimize import FitConfig
from drscaling.laws.result import FitResult, load_laws, save_laws
from drscaling.numbers import finite_or_none

# What to raise in the sweep preset (pipelines/<preset>.yaml) when a law has too few points.
SETTINGS = {
    "model": "add model sizes to `model.shapes` in the sweep preset (pipelines/<preset>.yaml)",
    "data": "add data sizes to `data.train_pairs` in the sweep preset (pipelines/<preset>.yaml)",
    "source": "add data sizes to `source.train_pairs` in the sweep preset (pipelines/<preset>.yaml)",
    "joint": "add sizes to `joint.shapes` and `joint.train_pairs` in the sweep preset "
             "(pipelines/<preset>.yaml)",
}
__all__ = ["LOSS_FIELD", "RANKING_METRICS", "SWEEPS", "fit_sweep", "law_metrics", "log_to_mlflow"]


def _num(row: dict[str, Any], key: str, where: str) -> float:
    try:
        value = float(row[key])
    except (TypeError, ValueError) as exc:
        raise DrscalingError(f"{where}: field '{key}' is not a number ({row[key]!r})") from exc
    return value


def read_results(path: Path) -> list[dict[str, Any]]:
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


def converged_state(row: dict[str, Any]) -> bool | None:
    """True / False from training's `converged`; None (unknown) when the row has no measured
    `convergence` (older rows, or a run evaluated too rarely to measure it)."""
    if "converged" not in row or finite_or_none(row.get("convergence")) is None:
        return None
    return bool(row["converged"])


def _extra(rows: list[dict[str, Any]], with_n: bool = False) -> dict[str, list[Any]]:
    """Per-point bookkeeping kept with a fit: shapes, sources, runs (the budget model reads them)
    and the training checks (converged, zero-shot CE) that the fit flags."""
    out: dict[str, list[Any]] = {
        "shape": [str(r.get("shape", "")) for r in rows],
        "source": [str(r.get("source", "")) for r in rows],
        "config_key": [str(r.get("config_key", "")) for r in rows],
        "converged": [converged_state(r) for r in rows],
        "convergence": [finite_or_none(r.get("convergence")) for r in rows],
        "ce_test_zero_shot": [finite_or_none(r.get("ce_test_zero_shot")) for r in rows],
        "lr": [finite_or_none(r.get("lr")) for r in rows],  # a preset may set it per shape (shape_train)
    }
    if with_n:  # a data-size law is fitted at a fixed model: keep its N
        out["n"] = [r["n"] for r in rows]
    return out


def _check_sources(rows: list[dict[str, Any]], sources: Sequence[str] | None, results: Path
                   ) -> list[str]:
    have = sorted({str(r["source"]) for r in _select(rows, "source")})
    if sources is None:
        return have
    missing = [s for s in sources if s not in have]
    if missing:
        raise DrscalingError(
            f"annotation source(s) {', '.join(repr(s) for s in missing)} have no points in "
            f"{results} (rows with sweep == 'source'); sources with points: "
            f"{', '.join(have) or 'none'}. Add the source to `source.sources` in the sweep preset "
            "and re-run the sweep, or leave it out of the sources to fit")
    return list(sources)


def _plans(rows: list[dict[str, Any]], sources: list[str], cfg: FitConfig, holdout_largest: int
           ) -> list[tuple[str, str, list[dict], Callable[[], FitResult]]]:
    """(law name, sweep, rows, fit) for every registered form on its axis's sweep."""

    def single(kind: str, axis: str, subset: list[dict], sweep: str) -> Callable[[], FitResult]:
        return lambda: fit_law(kind, [r[LOSS_FIELD] for r in subset], config=cfg,
                               extra_points=_extra(subset, with_n=axis == "d"),
                               setting=SETTINGS[sweep], **{axis: [r[axis] for r in subset]})

    def joint(kind: str, subset: list[dict]) -> Callable[[], FitResult]:
        return lambda: fit_joint([r["n"] for r in subset], [r["d"] for r in subset],
                                 [r[LOSS_FIELD] for r in subset], config=cfg,
                                 holdout_largest=holdout_largest, extra_points=_extra(subset),
                                 kind=kind, setting=SETTINGS["joint"])

    plans = []
    for form in registered_forms("N"):
        subset = _select(rows, "model")
        plans.append((form.kind, "model", subset, single(form.kind, "n", subset, "model")))
    for form in registered_forms("D"):
        subset = _select(rows, "data")
        plans.append((form.kind, "data", subset, single(form.kind, "d", subset, "data")))
        for source in sources:
            sub = _select(rows, "source", source)
            plans.append((f"{form.kind}@{source}", "source", sub, single(form.kind, "d", sub, "source")))
    for form in registered_forms("N+D"):
        subset = _select(rows, "joint")
        plans.append((form.kind, "joint", subset, joint(form.kind, subset)))
    return plans


def fit_sweep(
    results: str | Path,
    out_dir: str | Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
    holdout_largest: int = 1,
    sources: Sequence[str] | None = None,
    workers: int | None = None,
    bootstrap_method: str = "parametric",
) -> dict[str, Any]:
    """Fit every law the sweep results allow; write laws.json, figures and plot data to out_dir.

    Every registered form is fitted on its axis's sweep: "N" (sweep=model), "D" (sweep=data),
    "D@<source>" (sweep=source, one per source: `sources`, default every source with points) and
    "ND" and "ND_additive" (sweep=joint, with the held-out check). A law with no rows, too few points
    or only unconverged points is skipped and noted (why, and what to raise in the preset); having no
    law at all is an error, and so is asking for a source without points.
    """
    results, out_dir = Path(results), Path(out_dir)
    rows = read_results(results)
    chosen = _check_sources(rows, sources, results)
    cfg = FitConfig(n_bootstrap=n_bootstrap, seed=seed, workers=workers,
                    bootstrap_method=bootstrap_method)
    fits: dict[str, FitResult] = {}
    skipped: dict[str, str] = {}
    if not chosen:
        skipped["D@<source>"] = f"no rows with sweep == 'source' in {results.name}"
    for name, sweep, subset, build in _plans(rows, chosen, cfg, holdout_largest):
        if not subset:
            skipped[name] = f"no rows with sweep == '{sweep}' in {results.name}"
            continue
        try:
            fits[name] = build()
        except (TooFewPointsError, UnconvergedPointsError) as exc:
            skipped[name] = str(exc)
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
        "results": str(results), "loss": LOSS_FIELD, "n_bootstrap": n_bootstrap, "seed": seed,
        "bootstrap_method": bootstrap_method, "interval": "percentile 2.5-97.5 of the refits",
        "holdout_largest": holdout_largest, "huber_delta": cfg.huber_delta, "skipped": skipped,
    }
    laws_path = save_laws(out_dir / LAWS_FILE, fits, meta=meta)
    return {
        "laws_path": str(laws_path), "metrics_path": str(metrics_path),
        "figures": [str(p) for p in figures], "plots": [str(p) for p in plots],
        "fits": {name: _fit_summary(fit) for name, fit in fits.items()},
        "skipped": skipped, "n_rows": len(rows),
    }


def _fit_summary(fit: FitResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": fit.kind, "formula": fit.formula(), "params": fit.params, "r2": fit.r2,
        "ci95": fit.ci95, "n_points": fit.n_points, "dof": fit.dof, "flags": fit.flags,
    }
    if fit.heldout:
        out["heldout_mean_abs_rel_error"] = fit.heldout["mean_abs_rel_error"]
        out["heldout_max_abs_rel_error"] = fit.heldout["max_abs_rel_error"]
        if "outside_interval" in fit.heldout:
            out["heldout_outside_interval"] = fit.heldout["outside_interval"]
    return out


def _metric_key(name: str) -> str:
    # MLflow metric names allow [A-Za-z0-9_-. /]; "D@human" becomes "D_human".
    return name.replace("@", "_")


def law_metrics(fits: dict[str, FitResult]) -> dict[str, float]:
    """Flat numeric summary (DVC metrics file, MLflow metrics): params and intervals, R^2, dof,
    number of flags, held-out error and how many held-out points fell outside the prediction interval."""
    out: dict[str, float] = {}
    for name, fit in fits.items():
        key = _metric_key(name)
        for p, v in fit.params.items():
            out[f"{key}.{p}"] = float(v)
            if p in fit.ci95:
                out[f"{key}.{p}.ci95_lo"], out[f"{key}.{p}.ci95_hi"] = map(float, fit.ci95[p])
        out[f"{key}.r2"] = float(fit.r2)
        out[f"{key}.n_points"] = float(fit.n_points)
        out[f"{key}.dof"] = float(fit.dof if fit.dof is not None else math.nan)
        out[f"{key}.n_flags"] = float(len(fit.flags))
        if fit.heldout:
            out[f"{key}.heldout_mean_abs_rel_error"] = float(fit.heldout["mean_abs_rel_error"])
            out[f"{key}.heldout_max_abs_rel_error"] = float(fit.heldout["max_abs_rel_error"])
            if "outside_interval" in fit.heldout:  # held-out points outside the refit's prediction interval
                out[f"{key}.heldout_outside_interval"] = float(fit.heldout["outside_interval"])
    return out


def log_to_mlflow(summary: dict[str, Any]) -> str:
    """Log laws.json, figures, plot data, the law metrics and each law's flags to the active run.

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
        tags = {f"law.{_metric_key(name)}": fit.formula() for name, fit in fits.items()}
        tags.update({f"flags.{_metric_key(name)}": ("; ".join(fit.flags) or "none")[:5000]
                     for name, fit in fits.items()})
        mlflow.set_tags(tags)
        if summary.get("skipped"):
            mlflow.set_tag("laws.skipped", "; ".join(sorted(summary["skipped"])))
    finally:
        if active is None:
            mlflow.end_run()
    return run.info.run_id


# Which figures belong to which sweep (by file-name prefix): a sweep's parent run shows its law's figure.
FIGURE_OF_SWEEP = {"model": ("fig3", "fig2"), "data": ("fig4",), "source": ("fig5",), "joint": ("fig6",)}


def figures_to_sweep_parents(sweeps: Path, figures: dict[str, str] | Sequence[str]) -> None:
    """Each sweep's parent run also gets the figure of its law, so the UI shows it where the points are."""
    import json

    import mlflow

    paths = list(figures.values()) if isinstance(figures, dict) else list(figures)
    client = mlflow.MlflowClient()
    for sweep, prefixes in FIGURE_OF_SWEEP.items():
        state = sweeps / f"parent-{sweeps.name}-{sweep}.json"
        if not state.exists():
            continue
        run_id = json.loads(state.read_text())["run_id"]
        for fig in paths:
            if Path(fig).name.startswith(prefixes):
                client.log_artifact(run_id, str(fig), artifact_path="figures")
