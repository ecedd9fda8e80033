"""The budget stage's MLflow record: the result's numbers and flags, the folder as artifacts, and the
@recommended alias on the registered model the recommendation picks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from drscaling.budget.result import TowerBudgetResult
from drscaling.design import TOWER_BUDGET_FILE


def mlflow_fields(result: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of a budget result for MLflow: each optimum's numbers and 0/1 flags, and the
    labels and flag texts as tags."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}

    def numbers(prefix: str, opt: dict[str, Any] | None) -> None:
        if not opt or "error" in opt:
            return
        for k, v in opt.items():
            if isinstance(v, (bool, int, float)) and v is not None and math.isfinite(float(v)):
                metrics[f"{prefix}_{k}"] = float(v)
        if "label" in opt:
            tags[f"budget.{prefix}.label"] = str(opt["label"])
        if opt.get("flags"):
            tags[f"budget.{prefix}.flags"] = "; ".join(opt["flags"])[:4900]

    numbers("optimum", result.get("recommendation"))
    numbers("without_inference", result.get("without_inference"))
    numbers("with_inference", result.get("with_inference"))
    shapes = result.get("shapes") or {}
    if "best" in shapes:
        numbers("best_shape", shapes["best"])
        tags["budget.best_shape"] = str(shapes["best"]["shape"])
    run = result.get("best_measured_run")
    if run:
        metrics.update({"best_run_loss": float(run["loss"]), "best_run_n": float(run["n"]),
                        "best_run_d": float(run["d"])})
    chance = result.get("chance") or {}
    if chance.get("loss") is not None:
        metrics["chance_loss"] = float(chance["loss"])
    tags["budget.laws"] = str(result.get("laws"))
    if result.get("flags"):
        tags["budget.flags"] = "; ".join(result["flags"])[:4900]
    return metrics, tags


def log_budget(result: dict[str, Any], out: Path, mode: str, published: bool,
               costs_path: str | Path | None = None) -> dict[str, Any] | None:
    """Log a budget result to its MLflow run; for fitted laws, set @recommended on the picked run's
    registered version and return it (None: no registered version, or a published law set). On
    measured costs, the registered versions of each shape the costs file measured get its Triton
    throughput and $ per million tokens on their cards (versions registered since `make measure`)."""
    import mlflow

    from drscaling import registry, tracking

    name = f"budget-{mode}-{result['budget']:g}" + (f"-{result['law_set']}" if published else "")
    tags = {"drscaling.stage": "budget", "costs": mode, "laws": str(result["laws"])}
    with tracking.stage_run("budget", name, tags):
        mlflow.log_artifacts(str(out), artifact_path="budget")
        metrics, flag_tags = mlflow_fields(result)
        mlflow.log_metrics(metrics)
        mlflow.set_tags(flag_tags)
        picked = None if published else registry.recommend(result)  # @recommended on the picked version
        if picked:
            mlflow.set_tag("budget.recommended_model", f"{picked['name']}/{picked['version']}")
        if mode == "measured" and not published and costs_path is not None:
            from drscaling.costs_file import CostsFile

            registry.add_costs(CostsFile.read(costs_path).to_dict(), costs_path)
    return picked


def log_towers(given: TowerBudgetResult | dict[str, Any], out: Path, mode: str, towers: str) -> None:
    """Log a dual-tower comparison: the workload, each deployment's cost and CE, the best one."""
    import mlflow

    from drscaling import tracking

    result = TowerBudgetResult.from_dict(given)
    with tracking.stage_run("budget", f"budget-towers-{mode}-{result.budget:g}",
                            {"drscaling.stage": "budget", "costs": mode, "drscaling.towers": "true"}):
        mlflow.log_params({"budget": result.budget, "costs": mode, "towers": towers}
                          | {f"workload_{k}": v for k, v in result.workload.items()})
        for r in result.deployments:
            if "cost" in r:
                mlflow.log_metrics({f"{r['name']}_{k}_usd": v for k, v in r["cost"].items()
                                    if isinstance(v, float)} | {f"{r['name']}_ce": r["ce"],
                                                                f"{r['name']}_fits": float(r["fits"])})
        mlflow.set_tag("best_deployment", result.best or "none")
        mlflow.log_artifact(str(out / TOWER_BUDGET_FILE), artifact_path="budget")
