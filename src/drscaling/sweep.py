"""Sweeps: turn single training runs into the points scaling laws are fitted on.

A preset (pipelines/<name>.yaml) names the training settings and four sweeps:
    model:  shapes at one data size            -> L(N)
    data:   data sizes at one shape            -> L(D)
    source: annotation sources x data sizes    -> L(D) per source (paper Fig. 5)
    joint:  shapes x data sizes                -> L(N, D)
Each point is one training run (an MLflow child run of the sweep's parent run). A point that appears
in several sweeps is trained once; a point already finished with the same parameters and data is
never trained again, so an interrupted sweep picks up where it stopped.

Output: <out>/results.jsonl, one row per (sweep, point) in the format laws.fit_sweep reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from drscaling import params, tracking
from drscaling.checkpoints import Start, init_for, resolve_start
from drscaling.design import SWEEPS
from drscaling.errors import DrscalingError
from drscaling.executors import EXECUTORS, RayConfig, run_local, run_ray, tracking_problem
from drscaling.files import folder_lock, read_json, to_json, write_json, write_jsonl
from drscaling.model.shapes import check_shape, shape_cost
from drscaling.train.config import Paths, TrainConfig

PRESETS = params.REPO / "pipelines"
RESULT_KEYS = ("ce_test_min", "ce_test_at_best_dev", "ce_dev_best", "mrr@10", "ndcg@10", "recall@100", "recall@1000",
               "ce_test_zero_shot", "convergence", "converged", "best_step")


@dataclass
class Preset:
    name: str
    train: dict = field(default_factory=dict)  # TrainConfig overrides shared by every point (init: a template, or one per family)
    model: dict = field(default_factory=dict)  # {shapes: [...], train_pairs: int}
    data: dict = field(default_factory=dict)  # {shape: str, train_pairs: [...]}
    source: dict = field(default_factory=dict)  # {shape: str, sources: [...], train_pairs: [...]}
    joint: dict = field(default_factory=dict)  # {shapes: [...], train_pairs: [...]}
    # {shape: TrainConfig overrides for every point of that shape}, e.g. a learning rate chosen per shape
    shape_train: dict = field(default_factory=dict)


def load_preset(name_or_path: str) -> Preset:
    """A YAML path, or a name in the working directory's pipelines/ (a `dvc exp` workspace has its
    own copy), else the project's."""
    candidates = [Path(name_or_path), Path("pipelines") / f"{name_or_path}.yaml", PRESETS / f"{name_or_path}.yaml"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        names = sorted({p.stem for folder in (Path("pipelines"), PRESETS) for p in folder.glob("*.yaml")})
        raise DrscalingError(f"unknown preset '{name_or_path}'; presets: {', '.join(names)} (or a YAML path)")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("name", path.stem)
    return params.build(Preset, raw)


def merged(*layers: dict) -> dict:
    """Later layers win, key by key; nested sections (eval) merge instead of being replaced."""
    out: dict = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def points(preset: Preset, base: dict, overrides: dict | None = None) -> list[tuple[str, TrainConfig]]:
    """(sweep name, config) for every point, in a cheap-first order; shapes are checked up front.

    Precedence: `base` (params.yaml train) < the preset's train < its shape_train entry for the
    point's shape < `overrides` (params.yaml sweep.train, what `dvc exp run -S '+sweep.train.lr=...'`
    sets). Each point's `init` is the preset's template (or its family's entry), unfilled:
    drscaling.checkpoints resolves it per shape."""
    out: list[tuple[str, TrainConfig]] = []
    for shape, values in preset.shape_train.items():
        if not isinstance(values, dict) or {"shape", "train_pairs", "annotation_source"} & set(values):
            raise DrscalingError(f"preset {preset.name}: shape_train.{shape} must map training parameters other "
                                 f"than shape, train_pairs and annotation_source to values (got {values!r})")

    for sweep, shape, d, source in _grid(preset):
        check_shape(shape)
        if d < 0:
            raise DrscalingError(f"preset {preset.name}: train_pairs must be >= 0 (got {d})")
        common = merged(base, preset.train, preset.shape_train.get(shape) or {}, overrides or {})
        point = {"shape": shape, "init": init_for(common.get("init"), shape), "train_pairs": d, "annotation_source": source}
        out.append((sweep, params.build(TrainConfig, common | point)))
    if not out:
        raise DrscalingError(f"preset {preset.name} defines no points")
    if unused := sorted(set(preset.shape_train) - trained_shapes(preset)):
        raise DrscalingError(f"preset {preset.name}: shape_train names {', '.join(unused)}, which no sweep of it trains")
    return out


def _grid(preset: Preset) -> list[tuple[str, str, int, str]]:
    """(sweep, shape, D, annotation source) of every point, in the cheap-first order of points()."""
    grid = [("model", shape, preset.model.get("train_pairs", 0), "human") for shape in preset.model.get("shapes", [])]
    grid += [("data", preset.data["shape"], d, "human") for d in preset.data.get("train_pairs", [])]
    grid += [("source", preset.source["shape"], d, source) for source in preset.source.get("sources", [])
             for d in preset.source.get("train_pairs", [])]
    grid += [("joint", shape, d, "human") for shape in preset.joint.get("shapes", [])
             for d in preset.joint.get("train_pairs", [])]
    return grid


def trained_shapes(preset: Preset) -> set[str]:
    """The shapes the preset's sweeps train (those with at least one point)."""
    return {shape for _, shape, _, _ in _grid(preset)}


def run_sweep(preset: Preset, paths: Paths, base: dict, out: Path, only: str | None = None,
              overrides: dict | None = None, executor: str = "local", ray: RayConfig | None = None) -> Path:
    """Train every point of one sweep (or all), each distinct config once; write the results file.

    `out`/runs/<config key>/ is a cache shared by all sweeps of the preset: a point finished by one
    sweep is reused by another, and gets a child run here that points at the run that trained it.
    `executor`: local (this process) or ray (a Ray cluster, one tracking server: executors.py).
    """
    if only and only not in SWEEPS:
        raise DrscalingError(f"unknown sweep '{only}'; choose from {', '.join(SWEEPS)}")
    if executor not in EXECUTORS:
        raise DrscalingError(f"unknown executor '{executor}'; choose from {', '.join(EXECUTORS)}")
    todo = [(s, c) for s, c in points(preset, base, overrides) if only in (None, s)]
    if not todo:
        raise DrscalingError(f"preset {preset.name} has no '{only}' sweep")
    unique: dict[str, TrainConfig] = {}
    for _, cfg in todo:
        unique.setdefault(cfg.key(), cfg)
    tracking.configure()
    # Every point's checkpoint exists (downloaded when online) before the first point trains.
    starts = {key: resolve_start(cfg.shape, cfg.init) for key, cfg in unique.items()}
    if executor == "ray" and (problem := tracking_problem()):  # before the parent run: a dead server fails fast
        raise DrscalingError(problem)
    import mlflow

    nested = mlflow.active_run() is not None  # e.g. under `mlflow run`
    if not nested:
        tracking.use_experiment(tracking.experiment("sweeps"))
    label = f"{preset.name}-{only or 'all'}"
    # One process per sweep: its parent run's RUNNING children are then stale once the points are done.
    with folder_lock(out, f"sweep {label}", name=f".sweep-{label}.lock"):
        return _run_points(preset, paths, out, only, todo, unique, starts, label, nested, executor, ray)


def _run_points(preset: Preset, paths: Paths, out: Path, only: str | None, todo, unique: dict[str, TrainConfig],
                starts: dict[str, Start], label: str, nested: bool, executor: str, ray: RayConfig | None) -> Path:
    """The sweep under its MLflow parent run (adopted on a rerun); returns the results file."""
    import mlflow

    state_file = out / f"parent-{label}.json"
    parent_id = read_json(state_file).get("run_id") if state_file.exists() else None
    if parent_id and not _run_exists(parent_id):
        parent_id = None
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else f"sweep-{label}", nested=nested) as parent:
        try:
            write_json(state_file, {"run_id": parent.info.run_id, "preset": preset.name, "sweep": only or "all"})
            mlflow.set_tags({"drscaling.stage": "sweep", "preset": preset.name, "sweep": only or "all"})
            mlflow.log_text(to_json(dataclasses.asdict(preset)), "preset.json")
            ordered = sorted(unique.items(), key=lambda kv: _cost(kv[1]))
            tags = {"preset": preset.name, "sweep": only or "all"}
            if executor == "ray":
                experiment = mlflow.get_experiment(parent.info.experiment_id).name
                results = run_ray(ordered, paths, out, tags, ray or RayConfig(), f"sweep {label}",
                                  parent.info.run_id, experiment, starts)
            else:
                results = run_local(ordered, paths, out, tags, f"sweep {label}")
            children = _children(parent.info.run_id)
            for key, cfg in ordered:
                if results[key].get("cached") and results[key].get("run_id") not in children:
                    _reference_child(cfg, results[key], preset.name, only or "all", starts[key])
            rows = []
            for sweep, cfg in todo:
                r = results[cfg.key()]
                rows.append({"sweep": sweep, "shape": cfg.shape, "n": r["n"], "d": r["d"], "source": cfg.annotation_source,
                             "steps": cfg.steps, "lr": cfg.lr, "config_key": cfg.key(), "model_dir": str(out / "runs" / cfg.key() / "model"),
                             **starts[cfg.key()].record(), **{k: r.get(k) for k in RESULT_KEYS}})
            path = out / (f"results-{only}.jsonl" if only else "results.jsonl")
            write_jsonl(path, rows)
            # MLflow run ids are random: they live beside the results, which DVC tracks and must stay a pure
            # function of the data and the settings (a fresh clone's `make run` leaves dvc.lock unchanged).
            write_json(path.with_name(path.name.replace("results", "runs").replace(".jsonl", ".json")),
                       {key: r["run_id"] for key, r in results.items()})
            if not only:  # every sweep at once: also one file per sweep, what `fit` (merge_results) reads
                for sweep in dict.fromkeys(r["sweep"] for r in rows):
                    write_jsonl(out / f"results-{sweep}.jsonl", [r for r in rows if r["sweep"] == sweep])
            summary = sweep_metrics(rows)
            write_json(out / (f"metrics-{only}.json" if only else "metrics.json"), summary)  # DVC metrics
            mlflow.log_artifact(str(path))
            mlflow.log_metrics(summary)
        except BaseException as exc:  # SIGTERM, Ctrl-C, a failed point: the parent ends with the cause, as a point does
            while (active := mlflow.active_run()) is not None:  # a point's run first, if one is still open
                tracking.end_run_with_cause(mlflow, exc)
                if active.info.run_id == parent.info.run_id:
                    break
            raise
        finally:
            _close_stale_children(parent.info.run_id)
    return path


def _close_stale_children(parent_id: str) -> None:
    """End KILLED every child run still RUNNING when the sweep stops: each was left by a process killed
    between starting its run and the first checkpoint of a point this sweep no longer has (a changed
    preset), or by a worker that died for good. Points that were adopted and finished are FINISHED."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "error", "left RUNNING by a killed process; closed by its sweep")
        client.set_terminated(run.info.run_id, "KILLED")


def sweep_metrics(rows: list[dict]) -> dict[str, float]:
    """What `dvc exp show` compares across experiments: the sweep's size and its best point."""
    ce = [r["ce_test_min"] for r in rows if r.get("ce_test_min") is not None]
    best = {"ce_test_min_best": min(ce), "ce_test_min_mean": sum(ce) / len(ce)} if ce else {}
    return {"points": len({r["config_key"] for r in rows})} | best


def _children(parent_id: str) -> set[str]:
    import mlflow

    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list")
    return {r.info.run_id for r in runs} | {r.data.tags.get("cached_from") for r in runs}


def _reference_child(cfg: TrainConfig, r: dict, preset: str, sweep: str, start: Start) -> None:
    """A point trained by another sweep: a child run holding its metrics and the original run id."""
    import mlflow

    with mlflow.start_run(run_name=f"{cfg.shape}-D{r['d']}-{cfg.annotation_source} (cached)", nested=True):
        mlflow.set_tags({"drscaling.stage": "train-reference", "cached_from": str(r.get("run_id")),
                         "shape": cfg.shape, "source": cfg.annotation_source, "preset": preset, "sweep": sweep})
        mlflow.log_params({"shape": cfg.shape, "n_non_embedding": r["n"], "d": r["d"],
                           "annotation_source": cfg.annotation_source, "steps": cfg.steps, "config_key": cfg.key(),
                           **start.record()})
        mlflow.log_metrics(tracking.metric_names({k: r[k] for k in RESULT_KEYS if r.get(k) is not None}))


def run_ids(folder: Path) -> list[str]:
    """The MLflow run ids behind a preset's results (written beside them by run_sweep)."""
    return sorted({i for f in folder.glob("runs*.json") for i in read_json(f).values()})


def merge_results(folder: Path) -> list[dict]:
    """All rows of a preset's per-sweep results files."""
    rows = []
    for f in sorted(folder.glob("results-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if not rows:
        raise DrscalingError(f"no sweep results in {folder} (run `drscaling sweep` first)")
    return rows


def _cost(cfg: TrainConfig) -> float:
    return shape_cost(cfg.shape) * cfg.steps


def _run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - a missing or foreign run id just means: start a new parent
        return False


def format_results(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [f"{'sweep':7} {'shape':14} {'N':>10} {'D':>7} {'source':10} {'CE 0-shot':>9} {'CE min':>7} "
             f"{'MRR@10':>7} converged"]
    for r in rows:
        zero = r.get("ce_test_zero_shot")
        conv = r.get("convergence")
        state = "unknown" if conv is None or conv != conv else f"{'yes' if r.get('converged') else 'NO'} ({conv:+.1%})"
        lines.append(f"{r['sweep']:7} {r['shape']:14} {r['n']:>10} {r['d']:>7} {r['source']:10} "
                     f"{zero if zero is not None else float('nan'):>9.3f} {r['ce_test_min']:>7.3f} "
                     f"{r.get('mrr@10') or 0:>7.3f} {state}")
    return "\n".join(lines)
