"""Budget allocation with the joint law (the paper's Section 5, eqs. 11-14), made operational.

    Z(N, D) = Zdata * D + Ztrain(N) + Zinfer(N)

Modules: cost_model (eqs. 12-14, measured costs), law_sets (fitted laws.json or the paper's published
laws), solve (the optimum over N, trained shapes, annotation sources; range and chance checks),
stage (run_budget: budget.json, Figs 7/8), result (BudgetResult and TowerBudgetResult: budget.json and towers.json read and written), record (its MLflow run), text (the printout), towers (dual-tower deployments).
"""

from drscaling.budget.cost_model import (
    COSTS_MODES, HUMAN_USD_PER_PAIR, CostModel, PaperCosts, build_cost_model, measured_cost_model,
    paper_derivation, read_annotation_cost,
)
from drscaling.budget.law_sets import (
    DEFAULT_NEGATIVES, LAW_SETS, LawSource, PaperLawSet, known_law_sets, paper_laws, resolve_laws,
)
from drscaling.budget.solve import (
    EXTRAPOLATION_FACTOR, GRID_POINTS, N_MAX, N_MIN, Chance, FittedRange, SearchRange, best_measured_run,
    compare_sources, law_loss, law_loss_samples, minimum_cost, solve, solve_shapes,
)
from drscaling.budget.record import log_budget, log_towers, mlflow_fields
from drscaling.budget.result import BudgetResult, TowerBudgetResult
from drscaling.budget.stage import budget_figure, formula, run_budget, trained_runs
from drscaling.budget.text import format_recommendation
from drscaling.budget.towers import (
    DEPLOYMENTS, TOWER_ENTRY_KEYS, TokenCost, TowerCostTable, TowerWorkload, compare_towers, deployment_cost,
    format_tower_comparison, read_tower_metrics, run_tower_budget, workload_from,
)

__all__ = [
    "COSTS_MODES", "DEFAULT_NEGATIVES", "DEPLOYMENTS", "EXTRAPOLATION_FACTOR", "GRID_POINTS",
    "HUMAN_USD_PER_PAIR", "LAW_SETS", "N_MAX", "N_MIN", "TOWER_ENTRY_KEYS", "BudgetResult", "Chance", "CostModel",
    "FittedRange", "LawSource", "PaperCosts", "PaperLawSet", "SearchRange", "TokenCost", "TowerCostTable",
    "TowerBudgetResult", "TowerWorkload", "best_measured_run", "budget_figure", "build_cost_model", "compare_sources",
    "compare_towers", "deployment_cost", "format_recommendation", "format_tower_comparison", "formula",
    "known_law_sets", "law_loss", "law_loss_samples", "log_budget", "log_towers", "measured_cost_model", "minimum_cost", "mlflow_fields",
    "paper_derivation", "paper_laws", "read_annotation_cost", "read_tower_metrics", "resolve_laws",
    "run_budget", "run_tower_budget", "solve", "solve_shapes", "trained_runs", "workload_from",
]
