"""The study's design in the numbers and names several stages share. Imports nothing, so data
preparation, the validation gate, the sweep, the fit and the budget use it without loading torch.

The paper's evaluation protocol (Section 3.5): contrastive entropy scores each query's positive
against K random negatives, so a test pool needs K + 1 passages, and random scores give ln(K + 1)
(the budget's chance level, drscaling.budget.solve.Chance).

The sweeps: model (L(N)), data (L(D)), source (L(D) per annotation source) and joint (L(N, D)); the
sweep stage writes results-<sweep>.jsonl for each, the fit stage reads them.

The files one stage writes and another reads, by name.
"""

EVAL_NEGATIVES = 256  # K: EvalConfig's default (params.yaml train.eval.negatives)
MIN_EVAL_PASSAGES = EVAL_NEGATIVES + 1  # a positive and K negatives
SWEEPS = ("model", "data", "source", "joint")

HUMAN_USD_PER_PAIR = 0.6  # the paper's eq. 12 (human annotation, ref. [3]); params.yaml annotate.human_usd_per_pair
PAPER_BUDGET = 20_000  # dollars: the budget of the paper's Section 5 claims, and the budget stage's default

METRICS_FILE = "metrics.json"  # a finished training or distillation run's result, next to its model/
LAWS_FILE = "laws.json"  # the fit stage's laws (FitResult), beside POINTS_FILE
POINTS_FILE = "points.jsonl"  # the points the laws were fitted on
BUDGET_FILE = "budget.json"  # the budget stage's result
TOWER_BUDGET_FILE = "towers.json"  # the dual-tower deployments' budget (drscaling budget --towers)
