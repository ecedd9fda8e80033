"""Fitting the paper's laws with real scipy: recovery of known coefficients, errors, flags, the stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drscaling.errors import DrscalingError
from drscaling.laws import (
    FitConfig,
    FitResult,
    fit_joint,
    fit_law,
    fit_sweep,
    load_laws,
    predict,
    save_laws,
)

# The paper's MS MARCO coefficients (Tables 1 and 2, eqs. 9-10).
PAPER_N = {"A": 3.22e4, "alpha": 0.53, "delta": 0.04}
PAPER_D = {"B": 3.49e3, "beta": 1.05, "delta": 0.05}
PAPER_ND = {"A": 3.6e4, "B": 7.1e3, "alpha": 0.56, "beta": 1.31, "delta": 0.03}
N_GRID = np.geomspace(0.5e6, 85e6, 12)  # the paper's BERT sizes span ~0.5M..85M
D_GRID = np.geomspace(1e3, 5e5, 12)
FAST = FitConfig(n_bootstrap=50, seed=0)


def noisy(y: np.ndarray, seed: int, sd: float = 0.01) -> np.ndarray:
    return y * (1.0 + sd * np.random.default_rng(seed).standard_normal(len(y)))


def joint_grid() -> tuple[np.ndarray, np.ndarray]:
    n = np.geomspace(0.5e6, 85e6, 6)
    d = np.geomspace(1e3, 5e5, 4)
    nn, dd = np.meshgrid(n, d)
    return nn.ravel(), dd.ravel()


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_recovers_model_size_law() -> None:
    y = noisy(predict("N", PAPER_N, n=N_GRID), seed=1)
    fit = fit_law("N", y, n=N_GRID, config=FAST)
    assert rel(fit.params["alpha"], 0.53) < 0.05
    assert rel(fit.params["delta"], 0.04) < 0.1
    assert rel(fit.params["A"], 3.22e4) < 0.3
    assert fit.r2 > 0.99
    assert fit.flags == []
    lo, hi = fit.ci95["alpha"]
    assert lo <= fit.params["alpha"] <= hi and hi - lo < 0.1
    assert len(fit.bootstrap["alpha"]) == 50
    assert len(fit.residuals) == fit.n_points == len(N_GRID)


def test_recovers_data_size_law() -> None:
    y = noisy(predict("D", PAPER_D, d=D_GRID), seed=2)
    fit = fit_law("D", y, d=D_GRID, config=FAST)
    assert rel(fit.params["beta"], 1.05) < 0.05
    assert rel(fit.params["delta"], 0.05) < 0.1
    assert rel(fit.params["B"], 3.49e3) < 0.1
    assert fit.r2 > 0.99 and fit.flags == []


def test_recovers_joint_law_and_predicts_held_out_points() -> None:
    n, d = joint_grid()
    y = noisy(predict("ND", PAPER_ND, n=n, d=d), seed=3)
    fit = fit_joint(n, d, y, config=FAST, holdout_largest=1)
    assert rel(fit.params["alpha"], 0.56) < 0.05
    assert rel(fit.params["beta"], 1.31) < 0.05
    assert rel(fit.params["delta"], 0.03) < 0.15
    assert fit.r2 > 0.99
    # 6 N values x 4 D values: the largest N (4 points) is held out, 20 points fitted.
    assert fit.n_points == 20
    assert fit.heldout is not None and len(fit.heldout["points"]) == 4
    assert fit.heldout["n_cut"] == pytest.approx(85e6)
    assert fit.heldout["mean_abs_rel_error"] < 0.05
    for p in fit.heldout["points"]:
        assert p["rel_error"] == pytest.approx((p["predicted"] - p["observed"]) / p["observed"])


def test_joint_fit_is_stable_for_extreme_sizes() -> None:
    # logaddexp numerics: sizes far outside the usual range must not overflow to nan/inf.
    out = predict("ND", PAPER_ND, n=[1.0, 1e15], d=[1.0, 1e15])
    assert np.all(np.isfinite(out)) and out[1] == pytest.approx(0.03, rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "N", "loss": [0.3, 0.2, 0.1], "n": [1e6, 2e6, 4e6]}, "too few points (3)"),
        ({"kind": "N", "loss": [0.3, 0.2, 0.0, 0.1], "n": [1e6, 2e6, 4e6, 8e6]},
         "non-positive loss value (0) at point 2"),
        ({"kind": "N", "loss": [0.3, -0.2, 0.1, 0.1], "n": [1e6, 2e6, 4e6, 8e6]},
         "losses must be > 0"),
        ({"kind": "N", "loss": [0.3, 0.2, 0.1, 0.1], "n": [1e6, 0, 4e6, 8e6]},
         "non-positive N value"),
        ({"kind": "D", "loss": [0.3, float("nan"), 0.1, 0.1], "d": [1e3, 2e3, 4e3, 8e3]},
         "non-finite loss value (nan) at point 1"),
        ({"kind": "D", "loss": [0.3, 0.2, 0.1, 0.1], "d": [1e3, 2e3, float("inf"), 8e3]},
         "non-finite D value"),
        ({"kind": "N", "loss": [0.3, 0.2, 0.1, 0.1], "n": [1e6, 2e6, 4e6]},
         "mismatched array lengths (N has 3, loss has 4)"),
        ({"kind": "ND", "loss": [0.3] * 8, "n": [1e6] * 8, "d": np.geomspace(1e3, 1e5, 8)},
         "too few distinct N values (1)"),
        ({"kind": "X", "loss": [0.3] * 8}, "unknown law kind 'X'"),
    ],
)
def test_bad_inputs_give_clear_errors(kwargs: dict, message: str) -> None:
    kind = kwargs.pop("kind")
    loss = kwargs.pop("loss")
    with pytest.raises(DrscalingError) as err:
        fit_law(kind, loss, config=FAST, **kwargs)
    assert message in str(err.value)


def test_poor_fit_is_flagged_not_hidden() -> None:
    y = np.random.default_rng(4).uniform(0.5, 1.5, len(N_GRID))
    fit = fit_law("N", y, n=N_GRID, config=FAST)
    assert any(f.startswith("poor fit: R^2") for f in fit.flags), fit.flags


def test_fit_result_round_trip_and_laws_file(tmp_path: Path) -> None:
    y = noisy(predict("N", PAPER_N, n=N_GRID), seed=5)
    fit = fit_law("N", y, n=N_GRID, config=FitConfig(n_bootstrap=10))
    again = FitResult.from_dict(json.loads(json.dumps(fit.to_dict())))
    assert again == fit
    path = save_laws(tmp_path / "out" / "laws.json", {"N": fit})
    loaded = load_laws(path)
    assert loaded["N"].params == fit.params
    assert loaded["N"].bootstrap_matrix().shape == (10, 3)
    np.testing.assert_allclose(loaded["N"].predict(n=[1e7]), fit.predict(n=[1e7]))
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temporary behind


def test_missing_laws_file_names_the_fit_stage(tmp_path: Path) -> None:
    with pytest.raises(DrscalingError, match="drscaling fit"):
        load_laws(tmp_path / "nope" / "laws.json")


# ---------------------------------------------------------------------------------------------
# The fit stage on a synthetic sweep
# ---------------------------------------------------------------------------------------------


def _row(sweep: str, n: float, d: float, ce: float, source: str = "human", i: int = 0) -> dict:
    return {
        "sweep": sweep, "shape": f"bert-L{2 + i % 5 * 2}-H128", "n": int(n), "d": int(d),
        "source": source, "steps": 1000, "ce_test_min": float(ce),
        "ce_test_at_best_dev": float(ce) * 1.01, "ce_dev_best": float(ce),
        "mrr@10": float(0.4 / (1 + ce)), "ndcg@10": float(0.45 / (1 + ce)),
        "recall@100": 0.8, "recall@1000": float(0.95 / (1 + ce / 10)), "run_id": f"run{i}",
    }


def write_synthetic_sweep(path: Path, sweeps: tuple[str, ...] = ("model", "data", "source", "joint")) -> Path:
    rows = []
    if "model" in sweeps:
        y = noisy(predict("N", PAPER_N, n=N_GRID), seed=10)
        rows += [_row("model", n, 5e5, ce, i=i) for i, (n, ce) in enumerate(zip(N_GRID, y))]
    if "data" in sweeps:
        y = noisy(predict("D", PAPER_D, d=D_GRID), seed=11)
        rows += [_row("data", 85e6, d, ce, i=i) for i, (d, ce) in enumerate(zip(D_GRID, y))]
    if "source" in sweeps:
        for k, (source, b) in enumerate((("human", 3.49e3), ("llm", 9e3))):
            y = noisy(predict("D", {**PAPER_D, "B": b}, d=D_GRID[::2]), seed=12 + k)
            rows += [_row("source", 85e6, d, ce, source=source, i=i)
                     for i, (d, ce) in enumerate(zip(D_GRID[::2], y))]
    if "joint" in sweeps:
        n, d = joint_grid()
        y = noisy(predict("ND", PAPER_ND, n=n, d=d), seed=14)
        rows += [_row("joint", a, b, ce, i=i) for i, (a, b, ce) in enumerate(zip(n, d, y))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fit_sweep_writes_laws_figures_and_plot_data(tmp_path: Path) -> None:
    results = write_synthetic_sweep(tmp_path / "results.jsonl")
    out = tmp_path / "fit"
    summary = fit_sweep(results, out, n_bootstrap=20, seed=0, holdout_largest=1)
    laws = load_laws(out / "laws.json")
    assert set(laws) == {"N", "D", "D@human", "D@llm", "ND"}
    assert summary["skipped"] == {}
    assert rel(laws["N"].params["alpha"], 0.53) < 0.05
    assert rel(laws["D"].params["beta"], 1.05) < 0.05
    assert laws["ND"].heldout is not None
    assert laws["ND"].points["shape"][0].startswith("bert-")
    names = {Path(p).name for p in summary["figures"]}
    assert names == {
        "fig3_ce_vs_n.png", "fig2_metrics_vs_ce.png", "fig4_ce_vs_d.png",
        "fig5_ce_vs_d_by_source.png", "fig6_joint.png",
    }
    for p in summary["figures"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots = {Path(p).name for p in summary["plots"]}
    assert {"ce_vs_n.csv", "ce_vs_d.csv", "ce_vs_d_by_source.csv", "joint.csv",
            "metrics_vs_ce.csv"} <= plots
    header = (out / "plots" / "joint.csv").read_text().splitlines()[0]
    assert header == "n,d,ce_test_min,fitted,heldout"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["N.alpha"] == pytest.approx(laws["N"].params["alpha"])
    assert "D_human.beta" in metrics


def test_fit_sweep_skips_absent_sweeps_and_fails_when_nothing_fits(tmp_path: Path) -> None:
    results = write_synthetic_sweep(tmp_path / "results.jsonl", sweeps=("model",))
    summary = fit_sweep(results, tmp_path / "fit", n_bootstrap=5)
    assert set(summary["fits"]) == {"N"}
    assert "no rows with sweep == 'joint'" in summary["skipped"]["ND"]
    assert "D" in summary["skipped"] and "D@<source>" in summary["skipped"]

    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(_row("model", n, 1e5, 0.2)) + "\n" for n in (1e6, 2e6)))
    with pytest.raises(DrscalingError, match="no law could be fitted.*too few points"):
        fit_sweep(few, tmp_path / "fit2", n_bootstrap=5)
    assert not (tmp_path / "fit2" / "laws.json").exists()


def test_fit_sweep_rejects_bad_rows(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sweep": "model", "n": 1e6, "d": 10, "ce_test_min": "x"}) + "\n")
    with pytest.raises(DrscalingError, match="row 1: field 'ce_test_min' is not a number"):
        fit_sweep(bad, tmp_path / "fit", n_bootstrap=5)
    bad.write_text(json.dumps({"sweep": "model", "n": 1e6, "d": 10}) + "\n")
    with pytest.raises(DrscalingError, match="lacks the field"):
        fit_sweep(bad, tmp_path / "fit", n_bootstrap=5)
    with pytest.raises(DrscalingError, match="sweep results not found"):
        fit_sweep(tmp_path / "missing.jsonl", tmp_path / "fit")
