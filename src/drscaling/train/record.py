"""A training run in MLflow (its run opened, or an unfinished one taken over; params logged once) and
its result: metrics.json (whose presence marks the run finished) and the registered model."""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import torch

from drscaling import registry, tracking
from drscaling.checkpoints import Start
from drscaling.data import load_split
from drscaling.design import METRICS_FILE
from drscaling.errors import DrscalingError
from drscaling.evaluate import rank_split
from drscaling.files import finite_or_null, read_json, to_json, write_json
from drscaling.model.encoder import ModelMeta
from drscaling.model.saved import load_retriever
from drscaling.train.config import TrainConfig
from drscaling.train.convergence import CONVERGENCE_TOLERANCE, convergence
from drscaling.train.resume import CHECKPOINT_DIR
from drscaling.train.step import default_device

RUN_FILE = "run.json"  # the MLflow run of the training in this folder, written as soon as it starts


def open_mlflow_run(cfg: TrainConfig, meta: ModelMeta, d: int, state: dict, tags, rank: int, out: Path, start: Start):
    if rank != 0:
        return None
    tracking.configure()
    import mlflow

    nested = mlflow.active_run() is not None  # inside a sweep: a child of its parent run
    if not nested:
        tracking.use_experiment(tracking.experiment("train"))
    run_id = state.get("run_id") or _unfinished_run(out, cfg, state["data_key"])
    # config_key + data_key: how a sweep on another machine finds this run once it is FINISHED (executors.py).
    # Set when the run is created (one request), so a kill at any moment leaves a run its sweep can find.
    run_tags = {"drscaling.stage": "train", "shape": cfg.shape, "source": cfg.annotation_source, "towers": cfg.towers,
                "init_checkpoint": start.checkpoint, "n": str(meta.n_non_embedding), "d": str(d),
                "config_key": cfg.key(), "data_key": state["data_key"], "torch_threads": str(torch.get_num_threads()),
                **(tags or {})}
    if run_id:  # resume (or adopt the run of a process killed before its first checkpoint)
        run = mlflow.start_run(run_id=run_id, log_system_metrics=True, nested=nested)
        mlflow.set_tags(run_tags)  # an adopted run may have died before it had them; a retry's node is recorded
        _keep_cause_as_history(mlflow.MlflowClient(), run_id)
    else:
        run = mlflow.start_run(run_name=f"{cfg.shape}-D{d}-{cfg.annotation_source}", log_system_metrics=True,
                               nested=nested, tags=run_tags)
        write_json(out / RUN_FILE, {"run_id": run.info.run_id, "config_key": cfg.key()})
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "eval"}
    params |= {f"eval_{k}": v for k, v in dataclasses.asdict(cfg.eval).items()}
    params |= {"n_non_embedding": meta.n_non_embedding, "d": d, "config_key": cfg.key(),
               "n_non_embedding_total": meta.n_non_embedding * (2 if cfg.towers == "dual" else 1),
               "git_commit": tracking.git_commit(), "data_version": tracking.data_version(),
               "device": default_device(), "projection_init": meta.projection, **start.record()}
    logged = mlflow.get_run(run.info.run_id).data.params if run_id else {}
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})  # params are write-once in MLflow
    return mlflow


def _keep_cause_as_history(client, run_id: str) -> None:
    """A resumed run is no longer failed: the `error` tag of the kill it recovers from would mark a FINISHED
    run as broken, so the cause moves to `resumed_after`."""
    error = client.get_run(run_id).data.tags.get("error")
    if error is not None:
        client.set_tag(run_id, "resumed_after", error)
        client.delete_tag(run_id, "error")


def _unfinished_run(out: Path, cfg: TrainConfig, data_key: str) -> str | None:
    """The MLflow run a killed process left for this folder and config, if it is not FINISHED: a rerun
    takes it over, so a kill before the first checkpoint leaves no run stuck in RUNNING. A run on other
    data is closed instead (FAILED, tagged `superseded`): adopting it would mix two data versions'
    metrics and dataset inputs in one run."""
    import mlflow

    file = out / RUN_FILE
    if not file.exists():
        return None
    info = read_json(file)
    if info.get("config_key") != cfg.key():
        return None
    try:
        run = mlflow.get_run(info["run_id"])
    except Exception:  # noqa: BLE001 - another tracking store, or a deleted run: start a new one
        return None
    if run.info.status == "FINISHED":
        return None
    if run.data.tags.get("data_key", data_key) != data_key:
        client = mlflow.MlflowClient()
        client.set_tag(run.info.run_id, "superseded", "trained on other data; a new run in the same folder"
                       " starts afresh on the current data")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
        return None
    return run.info.run_id


def record_result(cfg, paths, state, meta: ModelMeta, start: Start, device: str, d, mlflow, best_test: dict,
                  versions: dict[str, str]) -> dict:
    """The finished run's result: ranking metrics of the best-dev model, metrics.json, its MLflow record."""
    if not math.isfinite(state["best_dev"]):  # no best model was ever saved: nothing to rank or record
        raise DrscalingError(
            f"training {cfg.shape} diverged: none of its {len(state['history'])} evaluation(s) gave a finite dev"
            f" contrastive entropy (the loss became NaN or infinite); lower the learning rate (--lr {cfg.lr:g})")
    # A resumed run may not hold the best model's test embeddings: then the ranking encodes them.
    best = load_retriever(paths.out / "model").to(device)
    test = load_split(paths.prepared, "test", relevance=True)
    ranks = rank_split(best, paths.prepared, test, cfg.eval, device, known=best_test.get("embedded")) if cfg.eval.rank_pool else {}
    secs = state["step_seconds"]
    zero = state.get("zero_shot") or {}
    conv = convergence(state["history"], cfg.steps)
    metrics = {
        "ce_dev_best": state["best_dev"], "ce_test_at_best_dev": state["test_at_best_dev"],
        "ce_test_min": state["test_min"], "best_step": state["best_step"], **ranks,
        "ce_test_zero_shot": zero.get("ce_test", float("nan")), "ce_dev_zero_shot": zero.get("ce_dev", float("nan")),
        "convergence": conv if np.isfinite(conv) else None, "converged": bool(conv <= CONVERGENCE_TOLERANCE),
        "train_step_seconds": statistics.median(secs) if secs else float("nan"),
        "train_tokens_per_step": float(np.mean(state["tokens"])) if state["tokens"] else 0.0,
    }
    # Strict JSON: a CE that never became finite (a diverged run: the best-so-far sentinels stay inf, the
    # evaluations NaN) is null, "no finite value"; the checkpoint keeps inf, which torch.save stores.
    result = finite_or_null(copy.deepcopy({
        "shape": cfg.shape, "n": meta.n_non_embedding, "d": d, "source": cfg.annotation_source, "steps": cfg.steps,
        "config_key": cfg.key(), "data_key": state["data_key"], "run_id": state["run_id"], **start.record(),
        "history": state["history"], **metrics}))
    if mlflow:
        mlflow.log_metrics(tracking.metric_names(metrics))
        # once, as an MLflow Model registered under its shape, with its model card (registry.py)
        registry.log_trained(paths.out / "model", result, meta, cfg.towers, versions, best_test.get("embedded"))
        mlflow.log_text(to_json(result["history"]), "history.json")
        mlflow.log_text(to_json(result), METRICS_FILE)  # the run's result as metrics.json holds it, for other machines
    write_json(paths.out / METRICS_FILE, result)  # last: its presence marks the run finished
    shutil.rmtree(paths.out / CHECKPOINT_DIR, ignore_errors=True)  # finished: metrics.json is the record
    return result
