"""Evaluation during training: dev and test contrastive entropy at every eval step (the best-dev model
is the run's artifact), the untouched model's zero-shot point (whether the run converged: convergence.py)."""

from __future__ import annotations

import dataclasses
import json

from drscaling.evaluate import embed_evalset, encode_fns
from drscaling.model.retriever import Retriever
from drscaling.model.saved import save_retriever
from drscaling.train.config import TrainConfig


def evaluate_step(retriever: Retriever, dev, test, cfg, state, paths, device, mlflow, best_test: dict) -> None:
    fns = encode_fns(retriever, cfg.eval, device)
    ce_dev = embed_evalset(*fns, dev, cfg.eval).ce()
    embedded_test = embed_evalset(*fns, test, cfg.eval)
    ce_test = embedded_test.ce()
    step = state["step"]
    state["history"].append({"step": step, "ce_dev": ce_dev, "ce_test": ce_test})
    state["test_min"] = min(state["test_min"], ce_test)
    if ce_dev < state["best_dev"]:
        state.update(best_dev=ce_dev, test_at_best_dev=ce_test, best_step=step)
        save_retriever(retriever, paths.out / "model")  # the best-dev model is the artifact
        best_test["embedded"] = embedded_test
    if mlflow:
        mlflow.log_metrics({"ce_dev": ce_dev, "ce_test": ce_test}, step=step)


_ZERO_SHOT: dict[str, dict[str, float]] = {}


def zero_shot(retriever: Retriever, dev, test, cfg: TrainConfig, device: str, mlflow, data_key: str = "") -> dict[str, float]:
    """Dev and test CE before the first step (logged at step 0): every run must end below it. The
    untouched model does not depend on D or the annotation source, so a sweep evaluates each
    starting point once per process (keyed by everything the initial model and the evaluation use)."""
    start = {k: v for k, v in dataclasses.asdict(cfg).items()
             if k in ("shape", "init", "towers", "dim", "scale", "pooling", "seed", "projection", "eval")}
    key = json.dumps([start, data_key], sort_keys=True)
    if key not in _ZERO_SHOT:
        fns = encode_fns(retriever, cfg.eval, device)
        _ZERO_SHOT[key] = {"ce_dev": embed_evalset(*fns, dev, cfg.eval).ce(), "ce_test": embed_evalset(*fns, test, cfg.eval).ce()}
    out = dict(_ZERO_SHOT[key])
    if mlflow:
        mlflow.log_metrics(out, step=0)
    return out

