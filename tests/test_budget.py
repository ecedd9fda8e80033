"""The paper's Section 5 made operational: eqs. 12-14, the optimum under a budget, measured costs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drscaling.budget import (
    PaperCosts,
    SearchRange,
    build_cost_model,
    compare_sources,
    format_recommendation,
    paper_derivation,
    run_budget,
    solve,
    solve_shapes,
)
from drscaling.errors import DrscalingError
from drscaling.laws import PARAM_NAMES, FitResult, save_laws

PAPER_ND = {"A": 3.6e4, "B": 7.1e3, "alpha": 0.56, "beta": 1.31, "delta": 0.03}


def law(kind: str, params: dict[str, float], n_samples: int = 0, spread: float = 0.02,
        points: dict | None = None) -> FitResult:
    """A FitResult with the given coefficients; bootstrap samples scattered multiplicatively."""
    rng = np.random.default_rng(0)
    boot = {
        p: (params[p] * np.exp(spread * rng.standard_normal(n_samples))).tolist()
        for p in PARAM_NAMES[kind]
    } if n_samples else {}
    return FitResult(kind=kind, params=dict(params), r2=1.0, residuals=[], ci95={}, bootstrap=boot,
                     n_points=0, points=points or {})


PAPER = PaperCosts().cost_model()


def test_paper_equations_13_and_14_from_their_parts() -> None:
    costs = PaperCosts()
    assert f"{costs.z_train:.3g}" == "3.22e-08"  # eq. 13
    assert f"{costs.z_infer:.2g}" == "0.43"  # eq. 14
    assert costs.usd_per_pair == 0.6  # eq. 12
    assert costs.train_tokens == 10_000 * 256 * (30 + 2 * 60)
    text = "\n".join(paper_derivation())
    assert "3.22e-08 $ per parameter" in text and "0.43 $ per parameter" in text
    assert "10,000 x 256 x (30 + 2 x 60) x 6" in text


def test_paper_claim_billions_without_inference_millions_with() -> None:
    fit = law("ND", PAPER_ND)
    no_inf = solve(fit, PAPER, 20_000, include_inference=False)
    assert no_inf["n"] >= 1e9  # the paper: ~13B for $20,000
    assert no_inf["cost"]["total"] == pytest.approx(20_000)
    assert no_inf["d"] == pytest.approx((20_000 - PaperCosts().z_train * no_inf["n"]) / 0.6)
    with_inf = solve(fit, PAPER, 20_000, include_inference=True)
    assert with_inf["n"] < 1e8
    assert with_inf["cost"]["infer"] > with_inf["cost"]["train"]
    # "even under a larger budget" the optimum stays at million scale
    big = solve(fit, PAPER, 1e6, include_inference=True)
    assert 1e6 <= big["n"] < 1e8


def test_optimum_is_the_minimum_of_the_curve() -> None:
    fit = law("ND", PAPER_ND)
    opt = solve(fit, PAPER, 1e6, include_inference=True)
    for factor in (0.8, 1.25):
        n = opt["n"] * factor
        d = (1e6 - 0.43 * n - PaperCosts().z_train * n) / 0.6
        assert fit.predict(n=[n], d=[d])[0] > opt["loss"]


def test_bootstrap_samples_become_intervals() -> None:
    fit = law("ND", PAPER_ND, n_samples=200)
    opt = solve(fit, PAPER, 1e6, include_inference=True)
    assert opt["n_bootstrap"] == 200
    lo, hi = opt["n_ci95"]
    assert lo < opt["n"] < hi
    lo, hi = opt["loss_ci95"]
    assert lo < opt["loss"] < hi
    no_boot = solve(law("ND", PAPER_ND), PAPER, 1e6, include_inference=True)
    assert no_boot["n_ci95"] is None and no_boot["loss_ci95"] is None


@pytest.mark.parametrize(
    ("budget", "inference", "message"),
    [
        (0, False, "budget must be a positive number of dollars (got 0)"),
        (-5, False, "budget must be a positive number"),
        (float("nan"), False, "budget must be a positive number"),
        (1_000, True, "below the cheapest feasible point: N=1e+04 parameters with one annotated "
                      "pair costs $4,300.09"),
    ],
)
def test_budget_errors(budget: float, inference: bool, message: str) -> None:
    with pytest.raises(DrscalingError) as err:
        solve(law("ND", PAPER_ND), PAPER, budget, include_inference=inference)
    assert message in str(err.value)


def test_search_bound_is_flagged() -> None:
    opt = solve(law("ND", PAPER_ND), PAPER, 1e8, False, SearchRange(n_min=1e4, n_max=1e9))
    assert any("upper search bound" in f for f in opt["flags"])


def test_restricted_to_available_shapes() -> None:
    fit = law("ND", PAPER_ND, n_samples=50)
    shapes = {"tiny": 2e5, "mini": 1.5e6, "base": 85e6, "huge": 5e9}
    res = solve_shapes(fit, PAPER, 1e6, True, shapes)
    by_name = {r["shape"]: r for r in res["shapes"]}
    assert not by_name["huge"]["feasible"] and not by_name["base"]["feasible"]  # N x 0.43 $ > budget
    assert res["best"]["shape"] == "mini"  # nearest to the continuous optimum (~1.8e6)
    assert res["best"]["loss_ci95"] is not None
    with pytest.raises(DrscalingError, match="buys none of the shapes: the cheapest, tiny"):
        solve_shapes(fit, PAPER, 1e5, True, {"tiny": 5e5})


def _costs_json(path: Path, sections: tuple[str, ...] = ("training", "inference")) -> Path:
    doc: dict = {"device_hour_usd": 2.0, "device": "test GPU"}
    if "inference" in sections:
        doc["inference"] = {"points": [], "fit": {"a": 1e-15, "b": 1.0}}
    if "training" in sections:
        doc["training"] = {"points": [], "fit": {"a": 2e-12, "b": 0.9}}
    path.write_text(json.dumps(doc))
    return path


def test_measured_costs(tmp_path: Path) -> None:
    path = _costs_json(tmp_path / "costs.json")
    costs = build_cost_model("measured", path, need_inference=True, corpus_pages=1e6,
                             tokens_per_page=100, steps=1000)
    assert float(costs.z_train(1e6)) == pytest.approx(2e-12 * 1e6**0.9 * 1000)
    assert float(costs.z_infer(1e6)) == pytest.approx(1e-15 * 1e6 * 1e6 * 100)
    assert costs.usd_per_pair == 0.6
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"source": "llm", "usd_per_pair": 0.002, "pairs": 10}))
    cheap = build_cost_model("paper", annotation_cost_path=ann)
    assert cheap.usd_per_pair == 0.002 and cheap.train_a == PAPER.train_a


def test_measured_cost_errors_name_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DrscalingError, match="run `drscaling measure` first"):
        build_cost_model("measured", tmp_path / "none.json")
    with pytest.raises(DrscalingError, match="no 'inference' section; run `drscaling measure`"):
        build_cost_model("measured", _costs_json(tmp_path / "c1.json", ("training",)),
                         need_inference=True)
    # without inference the training section alone is enough
    assert not build_cost_model("measured", tmp_path / "c1.json").has_inference
    with pytest.raises(DrscalingError, match="no 'training' section; run the training runs"):
        build_cost_model("measured", _costs_json(tmp_path / "c2.json", ("inference",)))
    with pytest.raises(DrscalingError, match="run `drscaling annotate` first"):
        build_cost_model("paper", annotation_cost_path=tmp_path / "missing_ann.json")
    with pytest.raises(DrscalingError, match="unknown costs mode 'cloud'"):
        build_cost_model("cloud")


def test_compare_sources_uses_each_law_and_price() -> None:
    laws = {
        "D@human": law("D", {"B": 3.49e3, "beta": 1.05, "delta": 0.05}, n_samples=30,
                       points={"d": [1e3, 1e5], "n": [85e6, 85e6]}),
        "D@llm": law("D", {"B": 9e3, "beta": 1.05, "delta": 0.05},
                     points={"d": [1e3, 1e5], "n": [85e6, 85e6]}),
        "D@ict": law("D", {"B": 5e4, "beta": 0.5, "delta": 0.1}),
    }
    rows = compare_sources(laws, PAPER, 10_000, {"human": 0.6, "llm": 0.01})
    by = {r["source"]: r for r in rows}
    model_cost = PaperCosts().z_train * 85e6
    assert by["human"]["d"] == pytest.approx((10_000 - model_cost) / 0.6)
    assert by["llm"]["d"] == pytest.approx((10_000 - model_cost) / 0.01)
    assert by["llm"]["rank"] == 1 and by["human"]["rank"] == 2  # cheap pairs win here
    assert by["human"]["loss_ci95"] is not None
    assert "no $/pair for source 'ict'" in by["ict"]["note"]
    free = {r["source"]: r for r in compare_sources(laws, PAPER, 10_000, {"ict": 0.0})}
    assert free["ict"]["loss"] == 0.1 and "free annotation" in free["ict"]["note"]
    with pytest.raises(DrscalingError, match="must be > 0 for the budget trade-off"):
        build_cost_model("paper", usd_per_pair=0.0)


def _laws_file(tmp_path: Path) -> Path:
    fits = {
        "ND": law("ND", PAPER_ND, n_samples=100, points={
            "n": [5e5, 4e6, 11e6], "d": [1e3, 1e4, 1e5], "loss": [1, 1, 1],
            "shape": ["bert-L2-H128", "bert-L4-H256", "bert-L4-H512"],
            "source": ["human"] * 3}),
        "D@human": law("D", {"B": 3.49e3, "beta": 1.05, "delta": 0.05},
                       points={"d": [1e3, 1e5], "n": [11e6, 11e6]}),
    }
    return save_laws(tmp_path / "fit" / "laws.json", fits, meta={"results": "r.jsonl"})


def test_run_budget_writes_result_and_figures(tmp_path: Path) -> None:
    laws_path = _laws_file(tmp_path)
    out = tmp_path / "budget"
    res = run_budget(laws_path, 1e6, include_inference=True, costs_mode="paper", out_dir=out)
    saved = json.loads((out / "budget.json").read_text())
    assert saved["recommendation"]["n"] == pytest.approx(res["with_inference"]["n"])
    assert res["recommendation"] is res["with_inference"]
    assert res["without_inference"]["n"] > res["with_inference"]["n"]
    assert res["shapes"]["best"]["shape"] in {"bert-L2-H128", "bert-L4-H256", "bert-L4-H512"}
    assert {Path(f).name for f in res["figures"]} == {
        "fig7_budget_no_inference.png", "fig8_budget_with_inference.png"}
    for f in res["figures"]:
        assert Path(f).read_bytes()[:4] == b"\x89PNG"
    assert res["sources"][0]["source"] == "human"
    text = format_recommendation(res)
    assert "Recommended (continuous N)" in text and "predicted contrastive entropy" in text
    assert "95% CI" in text and "Best trainable shape" in text


def test_run_budget_errors(tmp_path: Path) -> None:
    with pytest.raises(DrscalingError, match="run the fit stage .*drscaling fit"):
        run_budget(tmp_path / "no" / "laws.json", 1e4, out_dir=tmp_path / "b")
    only_d = save_laws(tmp_path / "laws.json", {"D": law("D", {"B": 1e3, "beta": 1.0, "delta": 0.1})})
    with pytest.raises(DrscalingError, match="has no 'ND' law.*drscaling fit"):
        run_budget(only_d, 1e4, out_dir=tmp_path / "b")
    laws_path = _laws_file(tmp_path)
    with pytest.raises(DrscalingError, match="cheapest feasible point"):
        run_budget(laws_path, 100, include_inference=True, out_dir=tmp_path / "b")
    with pytest.raises(DrscalingError, match="drscaling measure"):
        run_budget(laws_path, 1e4, costs_mode="measured", costs_path=tmp_path / "nope.json",
                   out_dir=tmp_path / "b")
    assert not (tmp_path / "b" / "budget.json").exists()
