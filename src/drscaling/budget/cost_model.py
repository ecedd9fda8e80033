"""The cost model of the budget (the paper's eqs. 11-14): Z(N, D) = Zdata * D + Ztrain(N) + Zinfer(N).

Every cost is a power law of N, cost(N) = a * N**b: the paper's costs are linear (b = 1), measured
costs come from the costs stage's fits (Triton $ per token, training $ per step).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drscaling.costs_file import CostsFile
from drscaling.design import HUMAN_USD_PER_PAIR
from drscaling.errors import DrscalingError
from drscaling.files import read_json

COSTS_MODES = ("paper", "measured")


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


def read_annotation_cost(path: str | Path) -> tuple[str, float]:
    """(source, $ per pair) from an annotation cost JSON written by the annotate stage."""
    path = Path(path)
    doc = read_json(path, what="annotation cost", hint="run `drscaling annotate` first (or give a $/pair)")
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
    doc = CostsFile.read(path)
    if doc.training is None:
        raise DrscalingError(
            f"{path}: no 'training' section; run the training runs (the sweep stage) first so the "
            "costs stage can record $ per training step, then `drscaling measure`"
        )
    ta, tb = doc.training.fit.usable("training", path, "re-run the training runs and `drscaling measure`")
    ia = ib = None
    hourly = float("nan") if doc.device_hour_usd is None else doc.device_hour_usd
    notes = [f"device: {doc.device or 'unknown'} at ${hourly}/h"]
    if doc.inference is not None:
        ia, ib = doc.inference.fit.usable("inference", path, "re-run `drscaling measure`")
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

