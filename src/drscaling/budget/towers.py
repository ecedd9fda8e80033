"""Dual towers (ScalingNote): which deployment for a budget.

With separate towers the two halves of the inference cost part ways: the corpus is encoded once
by the passage tower (its N x pages x tokens per page), queries are encoded forever by the query
tower (its N x query volume x tokens per query). A large passage tower with a distilled small
query tower keeps most of the large model's quality at a small model's query cost.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drscaling.budget.cost_model import COSTS_MODES, PaperCosts
from drscaling.budget.result import TowerBudgetResult
from drscaling.costs_file import CostsFile
from drscaling.design import HUMAN_USD_PER_PAIR
from drscaling.budget.solve import check_budget
from drscaling.design import TOWER_BUDGET_FILE
from drscaling.errors import DrscalingError
from drscaling.files import read_json
from drscaling.numbers import money as _money

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


def workload_from(*layers: dict[str, Any]) -> TowerWorkload:
    """Each workload number from the first layer that sets it (e.g. the flags, params budget.towers,
    params budget.measured), else TowerWorkload's default."""
    def value(name: str, default: float) -> float:
        return float(next((d[name] for d in layers if d.get(name) is not None), default))

    return TowerWorkload(**{f.name: value(f.name, f.default) for f in dataclasses.fields(TowerWorkload)})


@dataclass(frozen=True)
class TokenCost:
    usd_per_token: float
    source: str  # where the number comes from, printed next to it


class TowerCostTable:
    """$ per token of a tower in a role. Measured: the tower of that shape measured in that role
    (`drscaling measure` on the towers), else that shape measured as a shared model, else in the
    other role, else the fit a * N**b. Paper: 2 FLOPs per parameter per token at the paper's $ per FLOP."""

    def __init__(self, mode: str, doc: CostsFile | dict[str, Any] | None = None, paper: PaperCosts | None = None):
        if mode not in COSTS_MODES:
            raise DrscalingError(f"unknown costs mode '{mode}'; expected one of {COSTS_MODES}")
        self.mode = mode
        self.doc = doc if isinstance(doc, CostsFile) else CostsFile.from_dict(doc or {})
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
        doc = CostsFile.read(path)
        if doc.inference is None:
            raise DrscalingError(f"{path}: no 'inference' section; re-run `drscaling measure`")
        doc.inference.fit.usable("inference", path, "re-run `drscaling measure`")
        return cls(mode, doc)

    @property
    def device_hour_usd(self) -> float:
        hourly = self.doc.device_hour_usd
        return float(self.paper.usd_per_gpu_hour if hourly is None else hourly)

    def per_token(self, role: str, shape: str, n: float) -> TokenCost:
        if self.mode == "paper":
            usd = self.paper.infer_flops_per_param_token * n * self.paper.usd_per_flop
            return TokenCost(usd, f"paper: {self.paper.infer_flops_per_param_token:g} FLOPs x N")
        towers = self.doc.towers
        same_role = [t for t in towers if t["shape"] == shape and t["tower"] == role]
        inference = self.doc.inference
        if inference is None:
            raise DrscalingError("measured tower costs need the costs file's 'inference' section")
        shared = [p for p in inference.points if p["shape"] == shape]
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
        fit = inference.fit
        return TokenCost(fit.a * n ** fit.b, f"fit {fit.a:.3g} x N^{fit.b:.3g}")


def read_tower_metrics(path: str | Path) -> dict[str, dict[str, Any]]:
    """The distillation metrics (teacher, distilled, end_to_end entries), checked.

    Each entry: model, query_shape, passage_shape, query_n, passage_n, ce (and mrr@10); optionally
    its cost to produce: "train_usd" or "train_seconds" (at the costs file's $ per device-hour), and
    "annotation_usd" or "pairs" (at TowerWorkload.usd_per_pair)."""
    path = Path(path)
    doc = read_json(path, what="distillation metrics", hint="run `drscaling distill` first (it writes "
                    "<out>/metrics.json with the teacher, the distilled towers and the end-to-end baseline)")
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
    budget = check_budget(budget)
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
    result = TowerBudgetResult(**compare_towers(metrics, table, budget, workload or TowerWorkload()),
                               metrics_path=str(metrics_path),
                               costs_path=str(costs_path) if costs_mode == "measured" else None)
    return result.write(Path(out_dir) / TOWER_BUDGET_FILE)


def format_tower_comparison(given: TowerBudgetResult | dict[str, Any]) -> str:
    """The comparison (compare_towers's result or a towers.json's) as a table: cost split, CE, whether
    it fits, the best."""
    result = TowerBudgetResult.from_dict(given)
    w = result.workload
    lines = [
        f"Deployments for a budget of {_money(result.budget)} ({result.costs_mode} costs): corpus "
        f"{w['corpus_pages']:.3g} pages x {w['tokens_per_page']:g} tokens, {w['query_volume']:.3g} "
        f"queries x {w['tokens_per_query']:g} tokens",
        f"  {'deployment':10} {'query tower':>14} {'passage tower':>14} {'annotation':>11} {'training':>10} "
        f"{'corpus':>10} {'queries':>10} {'total':>10} {'CE':>7}  fits",
    ]

    def money(x: float | None) -> str:
        return "?" if x is None else _money(x)

    for r in result.deployments:
        if "cost" not in r:
            lines.append(f"  {r['name']:10} {r['note']}")
            continue
        c = r["cost"]
        lines.append(
            f"  {r['name']:10} {r['query_shape']:>14} {r['passage_shape']:>14} {money(c['annotation']):>11} "
            f"{money(c['training']):>10} {money(c['corpus']):>10} {money(c['queries']):>10} "
            f"{money(c['total']):>10} {r['ce']:7.4f}  {'yes' if r['fits'] else 'no'}"
        )
    for r in result.deployments:
        if "per_token" in r:
            pt = r["per_token"]
            lines.append(f"  {r['name']}: query ${pt['query']['usd_per_token'] * 1e6:.4g}/1M tokens "
                         f"({pt['query']['source']}); passage ${pt['passage']['usd_per_token'] * 1e6:.4g}/1M "
                         f"tokens ({pt['passage']['source']})")
    best = result.best
    if best:
        label = next(r["label"] for r in result.deployments if r["name"] == best)
        lines.append(f"Best within the budget: {best} ({label})")
    else:
        lines.append(f"No deployment fits the budget; the cheapest is {result.cheapest}")
    lines += [f"! {f}" for f in result.flags]
    return "\n".join(lines)

