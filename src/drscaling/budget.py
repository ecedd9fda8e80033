"""Budget allocation with the joint law (the paper's Section 5, eqs. 11-14), made operational.

    Z(N, D) = Zdata * D + Ztrain(N) + Zinfer(N)

Every cost is a power law of N, cost(N) = a * N**b: the paper's costs are linear (b = 1), measured
costs come from the costs stage's fits. For a budget, all money not spent on training and serving
the model buys data, D(N) = (budget - Ztrain(N) - Zinfer(N)) / Zdata, so the choice is one number,
N: minimise L(N, D(N)) over log N (continuous), or over the shapes one can actually train. The
joint law's bootstrap samples are pushed through the same optimisation to give 95% intervals.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path, read_json, write_json
from drscaling.laws import FitResult, load_laws, load_laws_meta

COSTS_MODES = ("paper", "measured")
HUMAN_USD_PER_PAIR = 0.6  # the paper's eq. 12 (human annotation, ref. [3])
N_MIN = 1e4
N_MAX = 1e12
GRID_POINTS = 2001  # over log N: 0.005 decades apart on the default range


# --------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperCosts:
    """The parts of the paper's eqs. 12-14. Defaults reproduce Zdata 0.6, Ztrain 3.22e-8, Zinfer 0.43."""

    usd_per_gpu_hour: float = 3.93  # A100 80G on-demand price the paper cites
    peak_flops: float = 312e12  # A100 peak (bf16 tensor) FLOP/s
    utilisation: float = 0.25
    steps: int = 10_000
    batch: int = 256
    query_tokens: int = 30
    passage_tokens: int = 60
    passages_per_query: int = 2  # one positive and one negative passage per query
    train_flops_per_param_token: float = 6.0  # forward + backward
    corpus_pages: float = 30e12  # Google's index, 2012
    tokens_per_page: float = 512
    infer_flops_per_param_token: float = 2.0  # forward only
    usd_per_pair: float = HUMAN_USD_PER_PAIR

    @property
    def usd_per_flop(self) -> float:
        return self.usd_per_gpu_hour / (self.peak_flops * 3600.0 * self.utilisation)

    @property
    def train_tokens(self) -> float:
        return self.steps * self.batch * (self.query_tokens + self.passages_per_query * self.passage_tokens)

    @property
    def z_train(self) -> float:
        """$ per parameter to train (eq. 13)."""
        return self.train_tokens * self.train_flops_per_param_token * self.usd_per_flop

    @property
    def z_infer(self) -> float:
        """$ per parameter to encode the corpus once (eq. 14)."""
        return self.corpus_pages * self.tokens_per_page * self.infer_flops_per_param_token * self.usd_per_flop

    def derivation(self) -> list[str]:
        """The arithmetic of eqs. 12-14 as printable lines."""
        denom = f"{self.peak_flops:.3g} FLOP/s x 3600 s/h x {self.utilisation:g}"
        return [
            f"Zdata  = {self.usd_per_pair:g} $/pair (annotation)",
            f"Ztrain = steps x batch x (query + {self.passages_per_query} x passage tokens) x "
            f"{self.train_flops_per_param_token:g} FLOP/param/token x price / (peak x 3600 x util)",
            f"       = {self.steps:,} x {self.batch} x ({self.query_tokens} + "
            f"{self.passages_per_query} x {self.passage_tokens}) x "
            f"{self.train_flops_per_param_token:g} x ${self.usd_per_gpu_hour:g}/h / ({denom})",
            f"       = {self.z_train:.3g} $ per parameter",
            f"Zinfer = pages x tokens/page x {self.infer_flops_per_param_token:g} FLOP/param/token "
            "x price / (peak x 3600 x util)",
            f"       = {self.corpus_pages:.3g} x {self.tokens_per_page:g} x "
            f"{self.infer_flops_per_param_token:g} x ${self.usd_per_gpu_hour:g}/h / ({denom})",
            f"       = {self.z_infer:.3g} $ per parameter",
        ]

    def cost_model(self) -> CostModel:
        return CostModel(
            mode="paper",
            usd_per_pair=self.usd_per_pair,
            train_a=self.z_train,
            train_b=1.0,
            infer_a=self.z_infer,
            infer_b=1.0,
            derivation=self.derivation(),
        )


def paper_derivation(costs: PaperCosts | None = None) -> list[str]:
    """Eqs. 12-14 from their parts, as lines for the CLI to print."""
    return (costs or PaperCosts()).derivation()


@dataclass(frozen=True)
class CostModel:
    """Ztrain(N) = train_a * N**train_b; Zinfer(N) = infer_a * N**infer_b (None: not known)."""

    mode: str
    usd_per_pair: float
    train_a: float
    train_b: float
    infer_a: float | None = None
    infer_b: float | None = None
    derivation: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def has_inference(self) -> bool:
        return self.infer_a is not None and self.infer_b is not None

    def z_train(self, n: Any) -> np.ndarray:
        return self.train_a * np.power(np.asarray(n, dtype=float), self.train_b)

    def z_infer(self, n: Any) -> np.ndarray:
        if not self.has_inference:
            raise DrscalingError(
                "no inference cost is known: run `drscaling measure` (Triton throughput per shape) "
                "first, or use the paper's costs"
            )
        return self.infer_a * np.power(np.asarray(n, dtype=float), self.infer_b)  # type: ignore[operator]

    def model_cost(self, n: Any, include_inference: bool) -> np.ndarray:
        cost = self.z_train(n)
        return cost + self.z_infer(n) if include_inference else cost

    def data_pairs(self, n: Any, budget: float, include_inference: bool) -> np.ndarray:
        """D(N): what the budget left after the model buys in annotated pairs."""
        return (budget - self.model_cost(n, include_inference)) / self.usd_per_pair

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fit_ab(section: dict[str, Any], name: str, path: Path, hint: str) -> tuple[float, float]:
    fit = section.get("fit") if isinstance(section, dict) else None
    try:
        a, b = float(fit["a"]), float(fit["b"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as exc:
        raise DrscalingError(f"{path}: '{name}' has no usable fit {{a, b}}; {hint}") from exc
    if not (math.isfinite(a) and math.isfinite(b) and a > 0):
        raise DrscalingError(f"{path}: '{name}' fit has a={a}, b={b} (need a finite a > 0); {hint}")
    return a, b


def read_annotation_cost(path: str | Path) -> tuple[str, float]:
    """(source, $ per pair) from an annotation cost JSON written by the annotate stage."""
    path = Path(path)
    if not path.exists():
        raise DrscalingError(
            f"annotation cost not found: {path}; run `drscaling annotate` first (or give a $/pair)"
        )
    doc = read_json(path, what="annotation cost")
    try:
        usd = float(doc["usd_per_pair"])
        source = str(doc.get("source", path.stem))
    except (TypeError, KeyError, ValueError) as exc:
        raise DrscalingError(f"{path}: no numeric 'usd_per_pair'; re-run `drscaling annotate`") from exc
    if not (math.isfinite(usd) and usd >= 0):
        raise DrscalingError(f"{path}: usd_per_pair must be a finite number >= 0 (got {usd})")
    return source, usd


def measured_cost_model(
    costs_path: str | Path | None,
    *,
    need_inference: bool,
    usd_per_pair: float = HUMAN_USD_PER_PAIR,
    steps: int = 10_000,
    corpus_pages: float = 30e12,
    tokens_per_page: float = 512,
) -> CostModel:
    """Costs from the costs stage's JSON: $/step and $/token as power laws of N."""
    if costs_path is None:
        raise DrscalingError(
            "measured costs need a costs file: run `drscaling measure` first and pass its costs JSON"
        )
    path = Path(costs_path)
    if not path.exists():
        raise DrscalingError(
            f"costs file not found: {path}; run `drscaling measure` first (inference $/token on "
            "Triton; training $/step comes from the training runs)"
        )
    doc = read_json(path, what="costs file")
    if not isinstance(doc, dict):
        raise DrscalingError(f"{path}: not a costs file (expected a JSON object)")
    if "training" not in doc:
        raise DrscalingError(
            f"{path}: no 'training' section; run the training runs (the sweep stage) first so the "
            "costs stage can record $ per training step, then `drscaling measure`"
        )
    ta, tb = _fit_ab(doc["training"], "training", path, "re-run the training runs and `drscaling measure`")
    ia = ib = None
    notes = [f"device: {doc.get('device', 'unknown')} at ${doc.get('device_hour_usd', float('nan'))}/h"]
    if "inference" in doc:
        ia, ib = _fit_ab(doc["inference"], "inference", path, "re-run `drscaling measure`")
    elif need_inference:
        raise DrscalingError(
            f"{path}: no 'inference' section; run `drscaling measure` (Triton throughput) first"
        )
    derivation = [
        f"Zdata     = {usd_per_pair:g} $/pair",
        f"Ztrain(N) = usd_per_step(N) x steps = {ta:.3g} x N^{tb:.3g} x {steps:,}",
    ]
    if ia is not None:
        derivation.append(
            f"Zinfer(N) = usd_per_token(N) x pages x tokens/page = {ia:.3g} x N^{ib:.3g} x "
            f"{corpus_pages:.3g} x {tokens_per_page:g}"
        )
    return CostModel(
        mode="measured",
        usd_per_pair=usd_per_pair,
        train_a=ta * steps,
        train_b=tb,
        infer_a=None if ia is None else ia * corpus_pages * tokens_per_page,
        infer_b=ib,
        derivation=derivation,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# The joint law over many parameter samples at once
# --------------------------------------------------------------------------------------------


def _joint_loss(params: np.ndarray, logn: np.ndarray, logd: np.ndarray) -> np.ndarray:
    """L(N, D) for parameter rows (S, 5: A, B, alpha, beta, delta) at points (G,): shape (S, G).

    logaddexp form, as in the fit: no overflow for extreme N or D.
    """
    p = np.atleast_2d(params)
    log_a, log_b = np.log(p[:, 0:1]), np.log(p[:, 1:2])
    alpha, beta, log_delta = p[:, 2:3], p[:, 3:4], np.log(p[:, 4:5])
    inner = np.logaddexp((alpha / beta) * (log_a - logn[None, :]), log_b - logd[None, :])
    return np.exp(np.logaddexp(beta * inner, log_delta))


def _joint_fit(laws: dict[str, FitResult], law: str, laws_path: Path | str) -> FitResult:
    if law not in laws:
        raise DrscalingError(
            f"{laws_path} has no '{law}' law (it has: {', '.join(sorted(laws)) or 'none'}); run a "
            "joint sweep and `drscaling fit` first"
        )
    fit = laws[law]
    if fit.kind != "ND":
        raise DrscalingError(f"law '{law}' is a {fit.kind} law; the budget needs the joint L(N,D)")
    return fit


def _ci(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------------------------
# Solving
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRange:
    """Where the continuous optimum is searched: N in [n_min, n_max], log-spaced."""

    n_min: float = N_MIN
    n_max: float = N_MAX
    grid_points: int = GRID_POINTS

    def grid(self) -> np.ndarray:
        if not (0 < self.n_min < self.n_max):
            raise DrscalingError(f"need 0 < n_min < n_max (got {self.n_min:g}, {self.n_max:g})")
        return np.geomspace(self.n_min, self.n_max, self.grid_points)


def _check_budget(budget: float) -> float:
    try:
        budget = float(budget)
    except (TypeError, ValueError) as exc:
        raise DrscalingError(f"budget must be a number of dollars (got {budget!r})") from exc
    if not math.isfinite(budget) or budget <= 0:
        raise DrscalingError(f"budget must be a positive number of dollars (got {budget:g})")
    return budget


def _cost_split(costs: CostModel, n: float, d: float, include_inference: bool) -> dict[str, float]:
    train = float(costs.z_train(n))
    infer = float(costs.z_infer(n)) if include_inference else 0.0
    data = float(costs.usd_per_pair * d)
    return {"data": data, "train": train, "infer": infer, "total": data + train + infer}


def minimum_cost(costs: CostModel, n_min: float, include_inference: bool) -> float:
    """The cheapest feasible point: the smallest model and one annotated pair."""
    return float(costs.model_cost(n_min, include_inference)) + costs.usd_per_pair


def solve(
    fit: FitResult,
    costs: CostModel,
    budget: float,
    include_inference: bool,
    search: SearchRange | None = None,
) -> dict[str, Any]:
    """The continuous optimum N (and D = leftover budget / Zdata) minimising the joint law."""
    budget = _check_budget(budget)
    search = search or SearchRange()
    if costs.usd_per_pair <= 0:
        raise DrscalingError("the $ per annotated pair must be > 0 to trade data against model size")
    cheapest = minimum_cost(costs, search.n_min, include_inference)
    if budget <= cheapest:
        raise DrscalingError(
            f"budget ${budget:,.2f} is below the cheapest feasible point: N={search.n_min:.3g} "
            f"parameters with one annotated pair costs ${cheapest:,.2f}"
            + (" (inference included)" if include_inference else "")
            + "; raise the budget or lower n_min"
        )
    theta = fit.param_vector()
    ns = search.grid()
    ds = costs.data_pairs(ns, budget, include_inference)
    feasible = ds >= 1.0
    logn = np.log(ns)
    logd = np.log(np.where(feasible, ds, 1.0))
    losses = np.where(feasible, _joint_loss(theta, logn, logd)[0], np.inf)
    i = int(np.argmin(losses))
    n_opt = _refine(theta, costs, budget, include_inference, logn, feasible, i)
    d_opt = float(costs.data_pairs(n_opt, budget, include_inference))
    loss = float(_joint_loss(theta, np.log([n_opt]), np.log([d_opt]))[0, 0])
    flags = []
    if i == 0:
        flags.append(f"optimum at the lower search bound n_min={search.n_min:.3g}: smaller models may be better")
    last_feasible = int(np.flatnonzero(feasible)[-1])
    if i == len(ns) - 1 and last_feasible == len(ns) - 1:
        flags.append(f"optimum at the upper search bound n_max={search.n_max:.3g}")
    held = (fit.heldout or {}).get("points", [])
    n_fit = list(fit.points.get("n") or []) + [p["n"] for p in held]
    if n_fit and n_opt > 10 * max(n_fit):
        flags.append(
            f"extrapolation: optimum N={n_opt:.3g} is more than 10x the largest N fitted "
            f"({max(n_fit):.3g})"
        )
    d_fit = list(fit.points.get("d") or []) + [p["d"] for p in held]
    if d_fit and d_opt > 10 * max(d_fit):
        flags.append(
            f"extrapolation: optimum D={d_opt:.3g} is more than 10x the largest D fitted "
            f"({max(d_fit):.3g})"
        )
    out = {
        "budget": budget,
        "include_inference": include_inference,
        "n": n_opt,
        "d": d_opt,
        "loss": loss,
        "cost": _cost_split(costs, n_opt, d_opt, include_inference),
        "n_ci95": None,
        "loss_ci95": None,
        "optimal_loss_ci95": None,
        "n_bootstrap": 0,
        "flags": flags,
    }
    out.update(_propagate(fit, logn, logd, feasible, n_opt, d_opt))
    return out


def _refine(
    theta: np.ndarray,
    costs: CostModel,
    budget: float,
    include_inference: bool,
    logn: np.ndarray,
    feasible: np.ndarray,
    i: int,
) -> float:
    """Polish the grid optimum with a bounded scalar search between its feasible neighbours."""
    lo = logn[max(i - 1, 0)]
    hi_idx = min(i + 1, len(logn) - 1)
    while hi_idx > i and not feasible[hi_idx]:
        hi_idx -= 1
    hi = logn[hi_idx]
    if hi <= lo:
        return float(np.exp(logn[i]))

    def objective(x: float) -> float:
        d = float(costs.data_pairs(math.exp(x), budget, include_inference))
        if d < 1.0:
            return math.inf
        return float(_joint_loss(theta, np.array([x]), np.array([math.log(d)]))[0, 0])

    res = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    best_x = res.x if res.fun <= objective(logn[i]) else logn[i]
    return float(math.exp(best_x))


def _propagate(
    fit: FitResult,
    logn: np.ndarray,
    logd: np.ndarray,
    feasible: np.ndarray,
    n_opt: float,
    d_opt: float,
) -> dict[str, Any]:
    """Bootstrap samples of the joint law -> 95% intervals of the optimal N and of the loss."""
    samples = fit.bootstrap_matrix()
    if samples.shape[0] == 0:
        return {}
    losses = _joint_loss(samples, logn, logd)
    losses[:, ~feasible] = np.inf
    best = np.argmin(losses, axis=1)
    n_samples = np.exp(logn[best])
    optimal_losses = losses[np.arange(len(samples)), best]
    at_choice = _joint_loss(samples, np.log([n_opt]), np.log([d_opt]))[:, 0]
    return {
        "n_ci95": _ci(n_samples),
        "loss_ci95": _ci(at_choice),  # the loss of the recommended (N, D) under each sample
        "optimal_loss_ci95": _ci(optimal_losses),  # each sample's own optimum
        "n_bootstrap": int(len(samples)),
    }


def solve_shapes(
    fit: FitResult,
    costs: CostModel,
    budget: float,
    include_inference: bool,
    shapes: dict[str, float],
) -> dict[str, Any]:
    """The best of the shapes one can train: each shape's N, the data the rest of the budget buys."""
    budget = _check_budget(budget)
    if not shapes:
        raise DrscalingError("no shapes given to choose from")
    theta = fit.param_vector()
    samples = fit.bootstrap_matrix()
    rows = []
    for name, n in sorted(shapes.items(), key=lambda kv: kv[1]):
        n = float(n)
        if not (math.isfinite(n) and n > 0):
            raise DrscalingError(f"shape '{name}' has a non-positive parameter count ({n})")
        d = float(costs.data_pairs(n, budget, include_inference))
        row: dict[str, Any] = {"shape": name, "n": n, "feasible": d >= 1.0}
        if d >= 1.0:
            row["d"] = d
            row["loss"] = float(_joint_loss(theta, np.log([n]), np.log([d]))[0, 0])
            row["cost"] = _cost_split(costs, n, d, include_inference)
            if samples.shape[0]:
                row["loss_ci95"] = _ci(_joint_loss(samples, np.log([n]), np.log([d]))[:, 0])
        else:
            row["model_cost"] = float(costs.model_cost(n, include_inference))
        rows.append(row)
    feasible = [r for r in rows if r["feasible"]]
    if not feasible:
        cheapest = min(rows, key=lambda r: r["model_cost"])
        raise DrscalingError(
            f"budget ${budget:,.2f} buys none of the shapes: the cheapest, {cheapest['shape']} "
            f"(N={cheapest['n']:.3g}), costs ${cheapest['model_cost'] + costs.usd_per_pair:,.2f} "
            "with one annotated pair"
        )
    best = min(feasible, key=lambda r: r["loss"])
    return {"best": best, "shapes": rows}


def compare_sources(
    laws: dict[str, FitResult],
    costs: CostModel,
    budget: float,
    source_usd_per_pair: dict[str, float],
    include_inference: bool = False,
    model_n: float | None = None,
) -> list[dict[str, Any]]:
    """For a fixed model, the best loss each annotation source reaches with the budget.

    Each source uses its own data law "D@<source>" (fitted at one model size) and its own $/pair;
    the model's training (and serving) cost comes off the budget first.
    """
    budget = _check_budget(budget)
    out = []
    for name in sorted(k for k in laws if k.startswith("D@")):
        source = name.split("@", 1)[1]
        fit = laws[name]
        n = model_n if model_n is not None else _law_model_n(fit)
        row: dict[str, Any] = {"source": source, "law": name, "model_n": n}
        usd = source_usd_per_pair.get(source)
        if usd is None:
            row["note"] = (
                f"no $/pair for source '{source}': run `drscaling annotate` for it or give its cost"
            )
            out.append(row)
            continue
        row["usd_per_pair"] = usd
        left = budget - (float(costs.model_cost(n, include_inference)) if n else 0.0)
        if left <= 0:
            row["note"] = f"the model (N={n:.3g}) alone costs more than the budget"
            out.append(row)
            continue
        if usd == 0:
            # Free pairs: the budget does not limit D, the corpus does; report the law's floor.
            row.update(d=math.inf, loss=fit.params["delta"],
                       note="free annotation: D is limited by the corpus, not the budget; loss -> delta")
            out.append(row)
            continue
        d = left / usd
        row["d"] = d
        row["loss"] = float(fit.predict(d=[d])[0])
        if fit.bootstrap_matrix().shape[0]:
            row["loss_ci95"] = _ci(fit.predict_bootstrap(d=[d])[:, 0])
        d_fit = fit.points.get("d") or []
        if d_fit and d > 10 * max(d_fit):
            row["note"] = f"extrapolation: D={d:.3g} is more than 10x the largest D fitted"
        out.append(row)
    ranked = sorted((r for r in out if "loss" in r), key=lambda r: r["loss"])
    for rank, r in enumerate(ranked, start=1):
        r["rank"] = rank
    return out


def _law_model_n(fit: FitResult) -> float | None:
    n = fit.points.get("n") or []
    return float(np.median(n)) if n else None


# --------------------------------------------------------------------------------------------
# Figures 7 and 8
# --------------------------------------------------------------------------------------------


def budget_figure(
    fit: FitResult,
    costs: CostModel,
    budgets: Sequence[float],
    include_inference: bool,
    search: SearchRange,
    path: Path,
) -> Path | None:
    """Predicted loss vs N for several budgets; a dot marks each budget's optimum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    theta = fit.param_vector()
    ns = search.grid()
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    drawn = False
    optima = []
    for i, budget in enumerate(sorted(budgets)):
        ds = costs.data_pairs(ns, budget, include_inference)
        ok = ds >= 1.0
        if not ok.any():
            continue
        ls = _joint_loss(theta, np.log(ns[ok]), np.log(ds[ok]))[0]
        color = f"C{i % 10}"
        ax.plot(ns[ok], ls, color=color, label=f"${budget:,.0f}")
        j = int(np.argmin(ls))
        ax.scatter([ns[ok][j]], [ls[j]], color=color, zorder=3)
        optima.append(float(ls[j]))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_yscale("log")
    # The curves shoot up where the model leaves no money for data; keep the optima readable.
    ax.set_ylim(top=30 * max(optima))
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("predicted contrastive entropy")
    which = "including" if include_inference else "excluding"
    fig_no = 8 if include_inference else 7
    ax.set_title(f"Fig {fig_no}: predicted loss vs model size, {which} inference ({costs.mode} costs)",
                 fontsize=9)
    ax.legend(title="budget", fontsize=7)
    ax.grid(alpha=0.3, which="both")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The budget stage
# --------------------------------------------------------------------------------------------


def build_cost_model(
    costs_mode: str,
    costs_path: str | Path | None = None,
    *,
    need_inference: bool = False,
    usd_per_pair: float | None = None,
    annotation_cost_path: str | Path | None = None,
    steps: int | None = None,
    corpus_pages: float | None = None,
    tokens_per_page: float | None = None,
    paper: PaperCosts | None = None,
) -> CostModel:
    """Paper or measured costs; Zdata from an annotation cost file, a given $/pair, or 0.6."""
    if costs_mode not in COSTS_MODES:
        raise DrscalingError(f"unknown costs mode '{costs_mode}'; expected one of {COSTS_MODES}")
    notes = []
    pair_cost = usd_per_pair
    if annotation_cost_path is not None:
        source, pair_cost = read_annotation_cost(annotation_cost_path)
        notes.append(f"Zdata from {annotation_cost_path} (source '{source}')")
    if pair_cost is not None and not (math.isfinite(pair_cost) and pair_cost > 0):
        raise DrscalingError(
            f"$ per annotated pair must be > 0 for the budget trade-off (got {pair_cost}); free "
            "annotation (e.g. ICT) is not limited by the budget: compare it with source_cost_paths"
        )
    base = paper or PaperCosts()
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["steps"] = int(steps)
    if corpus_pages is not None:
        overrides["corpus_pages"] = float(corpus_pages)
    if tokens_per_page is not None:
        overrides["tokens_per_page"] = float(tokens_per_page)
    if pair_cost is not None:
        overrides["usd_per_pair"] = float(pair_cost)
    base = dataclasses.replace(base, **overrides)
    if costs_mode == "paper":
        model = base.cost_model()
    else:
        model = measured_cost_model(
            costs_path,
            need_inference=need_inference,
            usd_per_pair=base.usd_per_pair,
            steps=base.steps,
            corpus_pages=base.corpus_pages,
            tokens_per_page=base.tokens_per_page,
        )
    return dataclasses.replace(model, notes=[*model.notes, *notes])


def _default_shapes(fit: FitResult) -> dict[str, float]:
    names = fit.points.get("shape") or []
    ns = fit.points.get("n") or []
    shapes = {str(s): float(n) for s, n in zip(names, ns, strict=False) if s}
    for p in (fit.heldout or {}).get("points", []):
        if p.get("shape"):
            shapes[str(p["shape"])] = float(p["n"])
    return shapes


def run_budget(
    laws_path: str | Path,
    budget: float,
    include_inference: bool = False,
    costs_mode: str = "paper",
    costs_path: str | Path | None = None,
    out_dir: str | Path = "reports/budget",
    *,
    usd_per_pair: float | None = None,
    annotation_cost_path: str | Path | None = None,
    source_cost_paths: Sequence[str | Path] = (),
    steps: int | None = None,
    corpus_pages: float | None = None,
    tokens_per_page: float | None = None,
    shapes: dict[str, float] | None = None,
    n_min: float = N_MIN,
    n_max: float = N_MAX,
    figure_budgets: Sequence[float] | None = None,
    law: str = "ND",
) -> dict[str, Any]:
    """Recommend (N, D) for a budget; write out_dir/budget.json and Figs 7/8; return the result.

    The recommendation follows `include_inference`; the other case is reported alongside when its
    costs are known. `shapes` (name -> N) restricts the choice to trainable models; by default the
    shapes of the joint sweep. Sources with a "D@<source>" law are compared when their $/pair is
    known (annotation cost files; human defaults to the configured $/pair).
    """
    budget = _check_budget(budget)
    laws_path = Path(laws_path)
    out_dir = Path(out_dir)
    laws = load_laws(laws_path)
    fit = _joint_fit(laws, law, laws_path)
    costs = build_cost_model(
        costs_mode, costs_path, need_inference=include_inference, usd_per_pair=usd_per_pair,
        annotation_cost_path=annotation_cost_path, steps=steps, corpus_pages=corpus_pages,
        tokens_per_page=tokens_per_page,
    )
    search = SearchRange(n_min=n_min, n_max=n_max)
    flags: list[str] = []
    law_sources = sorted({s for s in fit.points.get("source", []) if s})
    if annotation_cost_path is not None and law_sources:
        cost_source = read_annotation_cost(annotation_cost_path)[0]
        if cost_source not in law_sources:
            flags.append(
                f"the annotation cost is for source '{cost_source}' but the joint law was fitted "
                f"on {law_sources}"
            )

    without = solve(fit, costs, budget, False, search)
    with_inf = None
    if costs.has_inference:
        try:
            with_inf = solve(fit, costs, budget, True, search)
        except DrscalingError as exc:
            if include_inference:
                raise
            with_inf = {"error": str(exc)}
    recommendation = with_inf if include_inference else without

    shape_map = shapes if shapes is not None else _default_shapes(fit)
    shape_result: dict[str, Any] | None = None
    if shape_map:
        try:
            shape_result = solve_shapes(fit, costs, budget, include_inference, shape_map)
        except DrscalingError as exc:
            shape_result = {"error": str(exc)}

    # Each source at its own price: human at the configured $/pair (the paper's 0.6 by default),
    # the others from their annotation cost files.
    source_costs = {"human": usd_per_pair if usd_per_pair is not None else HUMAN_USD_PER_PAIR}
    for p in [*([annotation_cost_path] if annotation_cost_path is not None else []), *source_cost_paths]:
        source, usd = read_annotation_cost(p)
        source_costs[source] = usd
    sources = compare_sources(laws, costs, budget, source_costs, include_inference=include_inference
                              and costs.has_inference)

    budgets = list(figure_budgets) if figure_budgets else [budget * f for f in (0.1, 0.3, 1, 3, 10)]
    fig_dir = out_dir / "figures"
    figures = [budget_figure(fit, costs, budgets, False, search, fig_dir / "fig7_budget_no_inference.png")]
    if costs.has_inference:
        figures.append(
            budget_figure(fit, costs, budgets, True, search, fig_dir / "fig8_budget_with_inference.png")
        )
    result = {
        "budget": budget,
        "include_inference": include_inference,
        "laws_path": str(laws_path),
        "law": {"name": law, "formula": fit.formula(), "params": fit.params, "r2": fit.r2,
                "flags": fit.flags},
        "costs": costs.to_dict(),
        "search": dataclasses.asdict(search),
        "recommendation": recommendation,
        "without_inference": without,
        "with_inference": with_inf,
        "shapes": shape_result,
        "sources": sources,
        "figures": [str(f) for f in figures if f is not None],
        "figure_budgets": budgets,
        "flags": flags,
        "fit_meta": _safe_meta(laws_path),
    }
    result["budget_path"] = str(out_dir / "budget.json")
    write_json(out_dir / "budget.json", result)
    return result


def _safe_meta(laws_path: Path) -> dict[str, Any]:
    meta = load_laws_meta(laws_path)
    return {k: meta[k] for k in ("results", "n_bootstrap", "seed") if k in meta}


def _money(x: float) -> str:
    return f"${x:,.0f}" if abs(x) >= 100 else f"${x:,.2f}"


def _interval(ci: list[float] | None, fmt: str) -> str:
    return f" (95% CI {format(ci[0], fmt)} .. {format(ci[1], fmt)})" if ci else ""


def _format_optimum(title: str, opt: dict[str, Any]) -> list[str]:
    if "error" in opt:
        return [f"{title}: not feasible — {opt['error']}"]
    c = opt["cost"]
    lines = [
        f"{title}:",
        f"  N = {opt['n']:.3g} non-embedding parameters{_interval(opt.get('n_ci95'), '.3g')}",
        f"  D = {opt['d']:,.0f} annotated pairs",
        f"  predicted contrastive entropy = {opt['loss']:.4f}{_interval(opt.get('loss_ci95'), '.4f')}",
        f"  cost: data {_money(c['data'])} + training {_money(c['train'])} + inference "
        f"{_money(c['infer'])} = {_money(c['total'])}",
    ]
    lines += [f"  ! {f}" for f in opt.get("flags", [])]
    return lines


def format_recommendation(result: dict[str, Any]) -> str:
    """A printable summary of run_budget's result."""
    lines = [
        f"Budget {_money(result['budget'])} ({result['costs']['mode']} costs, "
        f"{'including' if result['include_inference'] else 'excluding'} inference)",
        f"Law: {result['law']['formula']}",
    ]
    rec = result["recommendation"]
    lines += _format_optimum("Recommended (continuous N)", rec)
    other = result["with_inference"] if not result["include_inference"] else result["without_inference"]
    if other:
        label = "With inference" if not result["include_inference"] else "Without inference"
        lines += _format_optimum(f"{label} (for comparison)", other)
    shapes = result.get("shapes")
    if shapes:
        if "error" in shapes:
            lines.append(f"Among the trainable shapes: {shapes['error']}")
        else:
            b = shapes["best"]
            lines.append(
                f"Best trainable shape: {b['shape']} (N={b['n']:.3g}), D = {b['d']:,.0f} pairs, "
                f"predicted CE {b['loss']:.4f}{_interval(b.get('loss_ci95'), '.4f')}"
            )
    for s in result.get("sources", []):
        if "loss" in s:
            lines.append(
                f"Source {s['source']}: ${s['usd_per_pair']:g}/pair -> D = {s['d']:,.0f}, "
                f"predicted CE {s['loss']:.4f}{_interval(s.get('loss_ci95'), '.4f')}"
                + (f"  [{s['note']}]" if s.get("note") else "")
            )
        else:
            lines.append(f"Source {s['source']}: {s.get('note', 'not compared')}")
    lines += [f"! {f}" for f in result.get("flags", [])]
    if result.get("figures"):
        lines.append("Figures: " + ", ".join(result["figures"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Dual towers (ScalingNote): which deployment for a budget
# --------------------------------------------------------------------------------------------
#
# With separate towers the two halves of the inference cost part ways: the corpus is encoded once
# by the passage tower (its N x pages x tokens per page), queries are encoded forever by the query
# tower (its N x query volume x tokens per query). A large passage tower with a distilled small
# query tower keeps most of the large model's quality at a small model's query cost.

# (name, entry of the distillation metrics.json, description)
DEPLOYMENTS = (
    ("large", "teacher", "large query + large passage tower (one large model for both sides)"),
    ("distilled", "distilled", "large passage tower + distilled small query tower"),
    ("small", "end_to_end", "one small tower trained end to end"),
)
TOWER_ENTRY_KEYS = ("model", "query_shape", "passage_shape", "query_n", "passage_n", "ce")


@dataclass(frozen=True)
class TowerWorkload:
    """What the deployment serves: a corpus encoded once, and a volume of queries."""

    corpus_pages: float = 8.8e6
    tokens_per_page: float = 128
    query_volume: float = 1e8
    tokens_per_query: float = 32
    usd_per_pair: float = HUMAN_USD_PER_PAIR  # prices an entry's "pairs" when it has no "annotation_usd"

    def validate(self) -> None:
        for name in ("corpus_pages", "tokens_per_page", "query_volume", "tokens_per_query", "usd_per_pair"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise DrscalingError(f"{name} must be a finite number >= 0 (got {value!r})")


@dataclass(frozen=True)
class TokenCost:
    usd_per_token: float
    source: str  # where the number comes from, printed next to it


class TowerCostTable:
    """$ per token of a tower in a role. Measured: the tower of that shape measured in that role
    (`drscaling measure` on the towers), else that shape measured as a shared model, else in the
    other role, else the fit a * N**b. Paper: 2 FLOPs per parameter per token at the paper's $ per FLOP."""

    def __init__(self, mode: str, doc: dict[str, Any] | None = None, paper: PaperCosts | None = None):
        if mode not in COSTS_MODES:
            raise DrscalingError(f"unknown costs mode '{mode}'; expected one of {COSTS_MODES}")
        self.mode = mode
        self.doc = doc or {}
        self.paper = paper or PaperCosts()

    @classmethod
    def read(cls, mode: str, costs_path: str | Path | None) -> TowerCostTable:
        if mode == "paper":
            return cls(mode)
        path = Path(costs_path) if costs_path is not None else None
        if path is None or not path.exists():
            raise DrscalingError(
                f"costs file not found: {path}; run `drscaling measure` on a repository holding the "
                "towers first (`drscaling export --model <dual model> --repo ...`), or use --costs paper"
            )
        doc = read_json(path, what="costs file")
        if not isinstance(doc, dict) or "inference" not in doc:
            raise DrscalingError(f"{path}: no 'inference' section; re-run `drscaling measure`")
        _fit_ab(doc["inference"], "inference", path, "re-run `drscaling measure`")
        return cls(mode, doc)

    @property
    def device_hour_usd(self) -> float:
        return float(self.doc.get("device_hour_usd", self.paper.usd_per_gpu_hour))

    def per_token(self, role: str, shape: str, n: float) -> TokenCost:
        if self.mode == "paper":
            usd = self.paper.infer_flops_per_param_token * n * self.paper.usd_per_flop
            return TokenCost(usd, f"paper: {self.paper.infer_flops_per_param_token:g} FLOPs x N")
        towers = self.doc.get("towers") or []
        same_role = [t for t in towers if t["shape"] == shape and t["tower"] == role]
        shared = [p for p in self.doc["inference"].get("points", []) if p["shape"] == shape]
        other_role = [t for t in towers if t["shape"] == shape]
        # A shared model's batch-32 throughput says more about a role than the other role's operating point.
        if same_role:
            t = same_role[0]
            return TokenCost(t["usd_per_million_tokens"] / 1e6, f"measured: {t['tower']} tower {t['model']}")
        if shared:
            return TokenCost(shared[0]["usd_per_million_tokens"] / 1e6, f"measured: {shape}")
        if other_role:
            t = other_role[0]
            return TokenCost(t["usd_per_million_tokens"] / 1e6, f"measured: {t['tower']} tower {t['model']}")
        fit = self.doc["inference"]["fit"]
        return TokenCost(float(fit["a"]) * n ** float(fit["b"]), f"fit {fit['a']:.3g} x N^{fit['b']:.3g}")


def read_tower_metrics(path: str | Path) -> dict[str, dict[str, Any]]:
    """The distillation metrics (teacher, distilled, end_to_end entries), checked.

    Each entry: model, query_shape, passage_shape, query_n, passage_n, ce (and mrr@10); optionally
    its cost to produce: "train_usd" or "train_seconds" (at the costs file's $ per device-hour), and
    "annotation_usd" or "pairs" (at TowerWorkload.usd_per_pair)."""
    path = Path(path)
    if not path.exists():
        raise DrscalingError(
            f"distillation metrics not found: {path}; run `drscaling distill` first (it writes "
            "<out>/metrics.json with the teacher, the distilled towers and the end-to-end baseline)"
        )
    doc = read_json(path, what="distillation metrics")
    if not isinstance(doc, dict):
        raise DrscalingError(f"{path}: expected a JSON object with teacher / distilled / end_to_end")
    for key in ("teacher", "distilled"):
        if not isinstance(doc.get(key), dict):
            raise DrscalingError(f"{path}: no '{key}' entry; re-run `drscaling distill`")
    for key, entry in doc.items():
        if key not in {k for _, k, _ in DEPLOYMENTS} or not isinstance(entry, dict):
            continue
        missing = [k for k in TOWER_ENTRY_KEYS if k not in entry]
        if missing:
            raise DrscalingError(f"{path}: entry '{key}' lacks {', '.join(missing)}; re-run `drscaling distill`")
        for k in ("query_n", "passage_n", "ce"):
            if not (isinstance(entry[k], (int, float)) and math.isfinite(entry[k]) and entry[k] > 0):
                raise DrscalingError(f"{path}: entry '{key}' has {k}={entry[k]!r} (need a number > 0)")
    # The distillation's own run time (its "distill" record: steps x median step time) is the
    # distilled entry's training time when the entry does not give one.
    run = doc.get("distill") or {}
    distilled = doc["distilled"]
    if distilled.get("train_usd") is None and distilled.get("train_seconds") is None \
            and run.get("steps") is not None and run.get("step_seconds") is not None:
        distilled["train_seconds"] = float(run["steps"]) * float(run["step_seconds"])
    return doc


def _known_cost(entry: dict[str, Any], usd_key: str, alt_key: str, alt_price: float) -> float | None:
    """`usd_key` as given, else `alt_key` x `alt_price` (seconds x $/s, pairs x $/pair), else unknown."""
    if entry.get(usd_key) is not None:
        return float(entry[usd_key])
    if entry.get(alt_key) is not None:
        return float(entry[alt_key]) * alt_price
    return None


def deployment_cost(
    entry: dict[str, Any], table: TowerCostTable, workload: TowerWorkload,
    prerequisite: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Cost split of one deployment. Corpus: passage tower $/token x pages x tokens per page;
    queries: query tower $/token x volume x tokens per query; training and annotation when the
    entry records them ("train_usd" or "train_seconds"; "annotation_usd" or "pairs"), plus those of
    `prerequisite` (a distilled model needs its teacher trained first)."""
    q = table.per_token("query", entry["query_shape"], float(entry["query_n"]))
    p = table.per_token("passage", entry["passage_shape"], float(entry["passage_n"]))
    corpus = p.usd_per_token * workload.corpus_pages * workload.tokens_per_page
    queries = q.usd_per_token * workload.query_volume * workload.tokens_per_query
    parts = [entry, *([prerequisite] if prerequisite else [])]
    train = [_known_cost(e, "train_usd", "train_seconds", table.device_hour_usd / 3600.0) for e in parts]
    annotation = [_known_cost(e, "annotation_usd", "pairs", workload.usd_per_pair) for e in parts]
    training = None if None in train else sum(train)
    annot = None if None in annotation else sum(annotation)
    known = [x for x in (annot, training, corpus, queries) if x is not None]
    return {
        "annotation": annot, "training": training, "corpus": corpus, "queries": queries,
        "total": sum(known), "complete": annot is not None and training is not None,
        "per_token": {"query": dataclasses.asdict(q), "passage": dataclasses.asdict(p)},
    }


def compare_towers(
    metrics: dict[str, dict[str, Any]], table: TowerCostTable, budget: float, workload: TowerWorkload,
) -> dict[str, Any]:
    """Each deployment's cost split and measured CE; which fit the budget; the best (lowest CE) that does."""
    budget = _check_budget(budget)
    workload.validate()
    rows = []
    for name, key, label in DEPLOYMENTS:
        entry = metrics.get(key)
        if entry is None:
            rows.append({"name": name, "label": label, "entry": key,
                         "note": f"no '{key}' entry in the distillation metrics (not trained)"})
            continue
        cost = deployment_cost(entry, table, workload, metrics["teacher"] if key == "distilled" else None)
        rows.append({
            "name": name, "label": label, "entry": key, "model": entry["model"],
            "query_shape": entry["query_shape"], "query_n": entry["query_n"],
            "passage_shape": entry["passage_shape"], "passage_n": entry["passage_n"],
            "ce": float(entry["ce"]), "mrr@10": entry.get("mrr@10"),
            "cost": {k: v for k, v in cost.items() if k != "per_token"}, "per_token": cost["per_token"],
            "fits": cost["total"] <= budget,
        })
    costed = [r for r in rows if "cost" in r]
    fitting = sorted((r for r in costed if r["fits"]), key=lambda r: r["ce"])
    flags = []
    if any(not r["cost"]["complete"] for r in costed):
        flags.append("training or annotation cost unknown for some deployments (not in the metrics): "
                     "totals hold what is known")
    return {
        "budget": budget, "workload": dataclasses.asdict(workload), "costs_mode": table.mode,
        "device_hour_usd": table.device_hour_usd, "deployments": rows,
        "ranking": [r["name"] for r in fitting], "best": fitting[0]["name"] if fitting else None,
        "cheapest": min(costed, key=lambda r: r["cost"]["total"])["name"] if costed else None,
        "flags": flags,
    }


def run_tower_budget(
    metrics_path: str | Path, budget: float, costs_mode: str = "measured",
    costs_path: str | Path | None = None, out_dir: str | Path = "artifacts/budget-towers",
    workload: TowerWorkload | None = None,
) -> dict[str, Any]:
    """compare_towers from files; writes out_dir/towers.json (atomic) and returns the result."""
    metrics = read_tower_metrics(metrics_path)
    table = TowerCostTable.read(costs_mode, costs_path)
    result = compare_towers(metrics, table, budget, workload or TowerWorkload())
    result["metrics_path"] = str(metrics_path)
    result["costs_path"] = str(costs_path) if costs_mode == "measured" else None
    write_json(Path(out_dir) / "towers.json", result)
    return result


def format_tower_comparison(result: dict[str, Any]) -> str:
    """The comparison as a table: cost split, CE, whether it fits, the best."""
    w = result["workload"]
    lines = [
        f"Deployments for a budget of {_money(result['budget'])} ({result['costs_mode']} costs): corpus "
        f"{w['corpus_pages']:.3g} pages x {w['tokens_per_page']:g} tokens, {w['query_volume']:.3g} "
        f"queries x {w['tokens_per_query']:g} tokens",
        f"  {'deployment':10} {'query tower':>14} {'passage tower':>14} {'annotation':>11} {'training':>10} "
        f"{'corpus':>10} {'queries':>10} {'total':>10} {'CE':>7}  fits",
    ]

    def money(x: float | None) -> str:
        return "?" if x is None else _money(x)

    for r in result["deployments"]:
        if "cost" not in r:
            lines.append(f"  {r['name']:10} {r['note']}")
            continue
        c = r["cost"]
        lines.append(
            f"  {r['name']:10} {r['query_shape']:>14} {r['passage_shape']:>14} {money(c['annotation']):>11} "
            f"{money(c['training']):>10} {money(c['corpus']):>10} {money(c['queries']):>10} "
            f"{money(c['total']):>10} {r['ce']:7.4f}  {'yes' if r['fits'] else 'no'}"
        )
    for r in result["deployments"]:
        if "per_token" in r:
            pt = r["per_token"]
            lines.append(f"  {r['name']}: query ${pt['query']['usd_per_token'] * 1e6:.4g}/1M tokens "
                         f"({pt['query']['source']}); passage ${pt['passage']['usd_per_token'] * 1e6:.4g}/1M "
                         f"tokens ({pt['passage']['source']})")
    best = result["best"]
    if best:
        label = next(r["label"] for r in result["deployments"] if r["name"] == best)
        lines.append(f"Best within the budget: {best} ({label})")
    else:
        lines.append(f"No deployment fits the budget; the cheapest is {result['cheapest']}")
    lines += [f"! {f}" for f in result.get("flags", [])]
    return "\n".join(lines)
