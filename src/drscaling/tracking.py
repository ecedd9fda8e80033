"""MLflow set-up shared by every stage: where runs go, and what every run records about its inputs."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from drscaling import params
from drscaling.params import REPO


def configure() -> str:
    """Default to a SQLite store at the repository root (the MLflow 3 default file layout), telemetry off."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


# MLflow 3 opens an experiment on its GenAI overview unless it carries this tag; ours hold runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def use_experiment(name: str) -> None:
    """Make `name` the active experiment (created when missing), tagged so the UI opens on its runs."""
    import mlflow

    tag_experiment(retry_lost_insert(lambda: mlflow.set_experiment(name)).experiment_id)


def tag_experiment(experiment_id: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    key, value = EXPERIMENT_KIND
    if client.get_experiment(experiment_id).tags.get(key) != value:
        retry_lost_insert(lambda: client.set_experiment_tag(experiment_id, key, value))


# MLflow's SQL stores check for an entry, then insert it. Processes creating the same entry at once
# (sweeps side by side, Ray workers: an experiment's tag, a dataset) all insert, and every one but the
# first fails on the entry's key, its transaction rolled back whole. The entry exists then, so doing
# the same call again finds it. The stores' duplicate-key wording: SQLite, PostgreSQL, MySQL.
LOST_INSERT_ATTEMPTS = 3
_DUPLICATE_KEY = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")
T = TypeVar("T")


def retry_lost_insert(call: Callable[[], T]) -> T:
    """call(), again when it lost a concurrent insert of the same entry; any other error is raised."""
    import mlflow

    for _ in range(LOST_INSERT_ATTEMPTS - 1):
        try:
            return call()
        except mlflow.MlflowException as exc:
            if not any(marker in str(exc) for marker in _DUPLICATE_KEY):
                raise
    return call()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def data_version() -> str:
    """The md5 that data.dvc records for data/: the DVC version of the inputs a run used."""
    dvc_file = REPO / "data.dvc"
    if not dvc_file.exists():
        return "untracked"
    for line in dvc_file.read_text().splitlines():
        line = line.strip().lstrip("- ")
        if line.startswith("md5:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def file_version(path: str | Path, suffixes: tuple[str, ...] = ()) -> str:
    """Content hash of a file or folder (what a stage read), so runs on different inputs never match.
    `suffixes`: hash only a folder's files ending so (e.g. a checkpoint's weights)."""
    import hashlib

    path = Path(path)
    h = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if suffixes and path.is_dir():
        files = [f for f in files if f.name.endswith(suffixes)]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def experiment(default: str) -> str:
    """The MLflow experiment a stage logs to: $DRSCALING_EXPERIMENT, else the working directory's
    params.yaml `study.experiment` (a study folder puts every stage of a study in one experiment),
    else the stage's own `default`."""
    name = os.environ.get("DRSCALING_EXPERIMENT")
    if name:
        return name
    return str(params.section("study").get("experiment") or default)


def study_name() -> str | None:
    """The study a stage works for: $DRSCALING_STUDY, else the working directory's params.yaml
    `study.name` (a study folder's); None for the project's own pipeline."""
    name = os.environ.get("DRSCALING_STUDY")
    if name:
        return name
    return params.section("study").get("name") or None


def metric_names(metrics: dict) -> dict[str, float]:
    """MLflow forbids '@' in names: mrr@10 is logged as mrr_at_10 (files keep the usual spelling)."""
    return {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if v is not None}


def attach_project_run() -> None:
    """Under `mlflow run`, make the project's run (MLFLOW_RUN_ID) the active parent: every stage's
    own run then becomes its child instead of clashing with it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    configure()
    import mlflow

    if mlflow.active_run() is None:
        tag_experiment(mlflow.start_run(run_id=run_id).info.experiment_id)
    # start_run() without a run id resumes MLFLOW_RUN_ID when it is set: every stage's own run (train's
    # params) would land in the project run itself ("Changing param values is not allowed").
    os.environ.pop("MLFLOW_RUN_ID", None)


def end_run_with_cause(mlflow, exc: BaseException) -> None:
    """End the active MLflow run for `exc`: KILLED for Ctrl-C and SIGTERM (a KeyboardInterrupt), FAILED
    otherwise, with the cause as its `error` tag, so no run is left RUNNING or failed without a reason."""
    mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
    mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")


@contextlib.contextmanager
def stage_run(default_experiment: str, run_name: str, tags: dict[str, str]) -> Iterator:
    """A stage's MLflow run: a child when a run is already active (a sweep, `mlflow run`), else a
    top-level run in experiment(default_experiment). An exception (SIGTERM included) ends it with its
    cause (end_run_with_cause)."""
    configure()
    import mlflow

    nested = mlflow.active_run() is not None
    if not nested:
        use_experiment(experiment(default_experiment))
    run = mlflow.start_run(run_name=run_name, nested=nested)
    try:
        mlflow.set_tags(tags)
        yield run
    except BaseException as exc:
        end_run_with_cause(mlflow, exc)
        raise
    mlflow.end_run()
