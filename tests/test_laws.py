"""Fitting the paper's laws with real scipy: recovery of known coefficients, errors, flags, the stage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from drscaling.errors import DrscalingError
from drscaling.laws import (
    KINDS,
    PARAM_NAMES,
    FitConfig,
    FitResult,
    TooFewPointsError,
    UnconvergedPointsError,
    fit_d,
    fit_joint,
    fit_law,
    fit_n,
    fit_sweep,
    format_fits,
    get_form,
    load_laws,
    predict,
    save_laws,
)
from drscaling.laws import figures as law_figures
from drscaling.laws import forms as law_forms
from drscaling.laws.bootstrap import bootstrap
from drscaling.laws.fit import prediction_interval
from drscaling.laws.optimize import Points

# The paper's MS MARCO coefficients (Tables 1 and 2, eqs. 9-10).
PAPER_N = {"A": 3.22e4, "alpha": 0.53, "delta": 0.04}
PAPER_D = {"B": 3.49e3, "beta": 1.05, "delta": 0.05}
PAPER_ND = {"A": 3.6e4, "B": 7.1e3, "alpha": 0.56, "beta": 1.31, "delta": 0.03}
ADDITIVE = {"E": 0.05, "A": 300.0, "B": 40.0, "a": 0.4, "b": 0.5}  # Chinchilla's form, LLM-like values
# The default experiment: all-MiniLM-L6-v2 cut to 1..6 layers with a 384->768 head
# (drscaling.model.encoder.non_embedding_params), and six data sizes 1.5 decades apart.
MINILM_N = np.array([2070912, 3845376, 5619840, 7394304, 9168768, 10943232], dtype=float)
D_SMALL = np.array([100, 200, 400, 800, 1600, 3200], dtype=float)
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
    # Noiseless data: the fit must land on the truth within a few percent (it was 30% on A).
    y = predict("N", PAPER_N, n=N_GRID)
    fit = fit_law("N", y, n=N_GRID, config=FAST)
    for p, truth in PAPER_N.items():
        assert rel(fit.params[p], truth) < 0.02, (p, fit.params[p])
    assert fit.r2 > 0.999


def test_model_size_law_with_noise_has_honest_intervals() -> None:
    y = noisy(predict("N", PAPER_N, n=N_GRID), seed=1)
    fit = fit_law("N", y, n=N_GRID, config=FAST)
    assert rel(fit.params["alpha"], 0.53) < 0.05
    assert rel(fit.params["delta"], 0.04) < 0.1
    assert rel(fit.params["A"], 3.22e4) < 0.1
    assert fit.r2 > 0.99
    assert fit.flags == []
    lo, hi = fit.ci95["alpha"]
    assert lo <= fit.params["alpha"] <= hi and hi - lo < 0.1
    for p, truth in PAPER_N.items():
        assert fit.ci95[p][0] <= truth <= fit.ci95[p][1], (p, fit.ci95[p])
    assert len(fit.bootstrap["alpha"]) == 50
    assert len(fit.residuals) == fit.n_points == len(N_GRID)
    assert fit.dof == len(N_GRID) - 3 and fit.bootstrap_method == "parametric"


def test_recovers_data_size_law() -> None:
    y = noisy(predict("D", PAPER_D, d=D_GRID), seed=2)
    fit = fit_law("D", y, d=D_GRID, config=FAST)
    assert rel(fit.params["beta"], 1.05) < 0.05
    assert rel(fit.params["delta"], 0.05) < 0.1
    assert rel(fit.params["B"], 3.49e3) < 0.1
    assert fit.r2 > 0.99 and fit.flags == []


@pytest.mark.parametrize(("kind", "truth"), [("D", PAPER_D), ("ND", PAPER_ND), ("ND_additive", ADDITIVE)])
def test_noiseless_recovery_within_a_few_percent(kind: str, truth: dict) -> None:
    if kind == "D":
        sizes = {"d": D_GRID}
    else:
        n, d = joint_grid()
        sizes = {"n": n, "d": d}
    fit = fit_law(kind, predict(kind, truth, **sizes), config=FitConfig(n_bootstrap=0), **sizes)
    for p, value in truth.items():
        assert rel(fit.params[p], value) < 0.02, (kind, p, fit.params[p])
    assert fit.r2 > 0.999


def test_recovers_joint_law_and_predicts_held_out_points() -> None:
    n, d = joint_grid()
    y = noisy(predict("ND", PAPER_ND, n=n, d=d), seed=3)
    fit = fit_joint(n, d, y, config=FAST, holdout_largest=1)
    assert rel(fit.params["alpha"], 0.56) < 0.05
    assert rel(fit.params["beta"], 1.31) < 0.05
    assert rel(fit.params["delta"], 0.03) < 0.15
    assert fit.r2 > 0.99
    # 6 N values x 4 D values: every point fitted; the check refits without the largest N (4 points).
    assert fit.n_points == 24
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
        ({"kind": "N", "loss": [0.3, 0.25, 0.2, 0.15, 0.1], "n": [1e6, 1e6, 2e6, 2e6, 4e6]},
         "too few distinct N values (3 among 5 points)"),
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
    assert set(laws) == {"N", "D", "D@human", "D@llm", "ND", "ND_additive"}
    assert summary["skipped"] == {}
    assert rel(laws["N"].params["alpha"], 0.53) < 0.05
    assert rel(laws["D"].params["beta"], 1.05) < 0.05
    assert laws["ND"].heldout is not None
    assert laws["ND"].points["shape"][0].startswith("bert-")
    names = {Path(p).name for p in summary["figures"]}
    assert names == {
        "fig3_ce_vs_n.png", "fig2_metrics_vs_ce.png", "fig4_ce_vs_d.png",
        "fig5_ce_vs_d_by_source.png", "fig6_joint.png", "fig6_joint_ND_additive.png",
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


# ---------------------------------------------------------------------------------------------
# The law-form registry
# ---------------------------------------------------------------------------------------------


def test_registry_declares_each_form_once_and_drives_predict_and_formula() -> None:
    assert list(KINDS) == ["N", "D", "ND", "ND_additive"]
    assert PARAM_NAMES["ND_additive"] == ("E", "A", "B", "a", "b")
    form = get_form("ND_additive")
    assert form.axes == "N+D" and form.log_params == {"E", "A", "B"}
    assert form.formula_text == "L(N,D) = E + A/N^a + B/D^b"
    # The additive form is what it says: E + A/N^a + B/D^b.
    n, d = np.array([1e6, 3e7]), np.array([1e3, 2e5])
    expected = 0.05 + 300.0 / n**0.4 + 40.0 / d**0.5
    np.testing.assert_allclose(predict("ND_additive", ADDITIVE, n=n, d=d), expected, rtol=1e-12)
    fit = FitResult(kind="ND_additive", params=dict(ADDITIVE), r2=1.0, residuals=[], ci95={},
                    bootstrap={}, n_points=0)
    assert fit.formula() == "L(N,D) = 0.05 + 300/N^0.4 + 40/D^0.5"
    with pytest.raises(DrscalingError, match="unknown law kind 'Q'.*ND_additive"):
        get_form("Q")


def test_a_registered_form_is_fitted_by_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pluggability: one LawForm + one registration and fit_sweep fits it on its axis's sweep.
    base = get_form("N")
    pure = law_forms.LawForm(
        kind="N_pure", axes="N", params=base.params, log_params=base.log_params, label="L(N) pure",
        formula_text=base.formula_text, title="pure", headings=base.headings,
        log_pred=base.log_pred, jacobian=base.jacobian, bounds=base.bounds,
        init_grid=base.init_grid, format=base.format, floor="delta")
    monkeypatch.setitem(law_forms._REGISTRY, "N_pure", pure)
    assert "N_pure" in KINDS and PARAM_NAMES["N_pure"] == ("A", "alpha", "delta")
    results = write_synthetic_sweep(tmp_path / "results.jsonl", sweeps=("model",))
    summary = fit_sweep(results, tmp_path / "fit", n_bootstrap=5)
    assert {"N", "N_pure"} <= set(summary["fits"])
    assert load_laws(tmp_path / "fit" / "laws.json")["N_pure"].params == pytest.approx(
        load_laws(tmp_path / "fit" / "laws.json")["N"].params)


# ---------------------------------------------------------------------------------------------
# Honest bootstrap
# ---------------------------------------------------------------------------------------------


def test_bootstrap_refits_are_not_anchored_to_the_point_estimate() -> None:
    # Resampled points refitted from the grid: the samples cannot depend on the estimate passed in.
    # (The old refits started from it; this test fails if they do again.)
    y = noisy(predict("N", PAPER_N, n=MINILM_N), seed=7, sd=0.03)
    logn, logy = np.log(MINILM_N), np.log(y)
    form = get_form("N")
    cfg = FitConfig(n_bootstrap=40, seed=3, bootstrap_method="pairs")
    theta = form.to_theta(PAPER_N)
    far = theta + np.array([2.0, 0.4, -1.0])
    a, _ = bootstrap(form, theta, Points(logn, None, logy), cfg)
    b, _ = bootstrap(form, far, Points(logn, None, logy), cfg)
    np.testing.assert_array_equal(a, b)


def test_bootstrap_does_not_depend_on_the_number_of_workers() -> None:
    y = noisy(predict("N", PAPER_N, n=MINILM_N), seed=8, sd=0.03)
    one = fit_law("N", y, n=MINILM_N, config=FitConfig(n_bootstrap=120, chunk_size=20, workers=1,
                                                        heldout=False))
    two = fit_law("N", y, n=MINILM_N, config=FitConfig(n_bootstrap=120, chunk_size=20, workers=2,
                                                        parallel_min=0, heldout=False))
    assert one.bootstrap == two.bootstrap and one.ci95 == two.ci95


def test_noisy_minilm_points_get_intervals_that_contain_the_truth() -> None:
    # The case: the paper's L(N) at the MiniLM N values. The anchored bootstrap gave
    # alpha 0.435 with "95% CI" [0.434, 0.435] while the truth is 0.53.
    y = noisy(predict("N", PAPER_N, n=MINILM_N), seed=2, sd=0.02)
    fit = fit_law("N", y, n=MINILM_N, config=FitConfig(n_bootstrap=200, seed=0))
    for p, truth in PAPER_N.items():
        lo, hi = fit.ci95[p]
        assert lo <= truth <= hi, (p, fit.ci95[p])
        assert (hi - lo) / fit.params[p] > 0.05, (p, fit.ci95[p])  # not collapsed: 2% noise, 3 dof
    assert not any(f.startswith("collapsed interval") for f in fit.flags)


def test_small_coverage_check_of_the_intervals() -> None:
    """A fast version of benchmarks/coverage.py: 12 noisy sets of the paper's L(N) at the MiniLM
    sizes (6 points, 3 parameters, 5% multiplicative noise), 100 refits each. Nominal coverage is
    95%; at least 10 of 12 must cover each parameter, and no interval may collapse."""
    sets, hits = 12, dict.fromkeys(PAPER_N, 0)
    for s in range(sets):
        rng = np.random.default_rng(500 + s)
        y = predict("N", PAPER_N, n=MINILM_N) * np.exp(0.05 * rng.standard_normal(6))
        fit = fit_law("N", y, n=MINILM_N, config=FitConfig(n_bootstrap=100, seed=s, heldout=False,
                                                          workers=1))
        for p, truth in PAPER_N.items():
            lo, hi = fit.ci95[p]
            hits[p] += lo <= truth <= hi
            assert hi - lo > 1e-3 * abs(fit.params[p]), (s, p, fit.ci95[p])
    assert all(h >= 10 for h in hits.values()), hits


def test_noiseless_data_gets_collapsed_intervals_flagged() -> None:
    fit = fit_law("N", predict("N", PAPER_N, n=N_GRID), n=N_GRID, config=FAST)
    assert sum(f.startswith("collapsed interval") for f in fit.flags) == 3, fit.flags


# ---------------------------------------------------------------------------------------------
# Checks and flags
# ---------------------------------------------------------------------------------------------


def test_refuses_fewer_than_p_plus_one_points_and_says_what_to_raise() -> None:
    n = MINILM_N[:3]
    with pytest.raises(TooFewPointsError) as err:
        fit_n(n, predict("N", PAPER_N, n=n), config=FAST)
    msg = str(err.value)
    assert "L(N): too few points (3)" in msg and "at least 4 distinct points" in msg
    assert "model.shapes" in msg and "pipelines/<preset>.yaml" in msg
    with pytest.raises(TooFewPointsError, match="data.train_pairs"):
        fit_d(D_SMALL[:2], predict("D", PAPER_D, d=D_SMALL[:2]), config=FAST)


def test_p_plus_two_points_are_flagged_with_their_dof() -> None:
    n = MINILM_N[:5]
    fit = fit_law("N", noisy(predict("N", PAPER_N, n=n), seed=3), n=n, config=FAST)
    assert fit.dof == 2
    assert any(f.startswith("few points: 5 points for 3 parameters (dof 2)") for f in fit.flags)
    six = fit_law("N", noisy(predict("N", PAPER_N, n=MINILM_N), seed=3), n=MINILM_N, config=FAST)
    assert six.dof == 3 and not any(f.startswith("few points") for f in six.flags)


def test_parameters_and_intervals_at_their_bounds_are_flagged() -> None:
    # Flat losses: no power-law decrease to fit, so A and the interval of alpha hit their bounds.
    y = 0.5 * np.exp(0.01 * np.random.default_rng(0).standard_normal(6))
    fit = fit_law("N", y, n=MINILM_N, config=FitConfig(n_bootstrap=100))
    flags = "\n".join(fit.flags)
    assert "A at its bound" in flags and "poor fit: R^2" in flags
    assert "95% interval of alpha [" in flags and "reaches the bound of alpha [0.01, 4]" in flags


def test_unconverged_and_not_below_zero_shot_points_are_flagged() -> None:
    y = noisy(predict("N", PAPER_N, n=MINILM_N), seed=4)
    extra = {
        "converged": [True, False, True, None, True, True],
        "ce_test_zero_shot": [0.5, 0.5, y[2] * 0.99, None, 0.5, float("nan")],
        "shape": [f"minilm-L{k}" for k in range(1, 7)],
    }
    fit = fit_law("N", y, n=MINILM_N, config=FAST, extra_points=extra)
    flags = "\n".join(fit.flags)
    assert "unconverged: 1 of 6 points" in flags and "minilm-L2" in flags
    assert "convergence unknown for 1 of 6 points" in flags
    assert "not below zero-shot: 1 of 6 points" in flags and "minilm-L3" in flags
    assert "zero-shot CE unknown for 2 of 6 points" in flags
    assert fit.checks["unconverged"] == [1] and fit.checks["not_below_zero_shot"] == [2]
    clean = fit_law("N", y, n=MINILM_N, config=FAST,
                    extra_points={"converged": [True] * 6, "ce_test_zero_shot": [1.0] * 6})
    assert not any(f.startswith(("unconverged", "not below", "convergence unknown")) for f in clean.flags)


def test_all_unconverged_points_are_refused_with_what_to_raise(tmp_path: Path) -> None:
    y = predict("N", PAPER_N, n=MINILM_N)
    with pytest.raises(UnconvergedPointsError, match=r"all 6 points are unconverged.*train\.steps"):
        fit_law("N", y, n=MINILM_N, config=FAST, extra_points={"converged": [False] * 6})
    # The stage skips that law with the same reason and fits the others.
    rows = [_row("model", n, 5e5, ce, i=i) | {"converged": False, "convergence": 0.3}
            for i, (n, ce) in enumerate(zip(MINILM_N, y))]
    rows += [_row("data", 85e6, d, ce, i=i) | {"converged": True, "convergence": 0.0}
             for i, (d, ce) in enumerate(zip(D_GRID, predict("D", PAPER_D, d=D_GRID)))]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = fit_sweep(path, tmp_path / "fit", n_bootstrap=5)
    assert "train.steps" in summary["skipped"]["N"] and "D" in summary["fits"]


def test_a_source_without_points_is_an_error_naming_the_sources_with_points(tmp_path: Path) -> None:
    results = write_synthetic_sweep(tmp_path / "results.jsonl", sweeps=("source",))
    with pytest.raises(DrscalingError) as err:
        fit_sweep(results, tmp_path / "fit", n_bootstrap=5, sources=["human", "supervised"])
    msg = str(err.value)
    assert "'supervised' have no points" in msg and "sources with points: human, llm" in msg
    summary = fit_sweep(results, tmp_path / "fit", n_bootstrap=5, sources=["llm"])
    assert set(summary["fits"]) == {"D@llm"}


def test_old_rows_without_training_checks_are_flagged_unknown(tmp_path: Path) -> None:
    results = write_synthetic_sweep(tmp_path / "results.jsonl", sweeps=("model",))
    fit_sweep(results, tmp_path / "fit", n_bootstrap=5)
    fit = load_laws(tmp_path / "fit" / "laws.json")["N"]
    assert any(f.startswith("convergence unknown for 12 of 12") for f in fit.flags)
    assert any(f.startswith("zero-shot CE unknown for 12 of 12") for f in fit.flags)
    assert fit.points["converged"] == [None] * 12


# ---------------------------------------------------------------------------------------------
# Held-out checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "axis", "truth", "sizes"),
                         [("N", "n", PAPER_N, MINILM_N), ("D", "d", PAPER_D, D_SMALL)])
def test_heldout_largest_size_for_single_laws(kind: str, axis: str, truth: dict, sizes: np.ndarray) -> None:
    y = noisy(predict(kind, truth, **{axis: sizes}), seed=6)
    fit = fit_law(kind, y, config=FAST, **{axis: sizes})
    h = fit.heldout
    assert h is not None and h["axis"] == axis and h["cut"] == pytest.approx(sizes.max())
    assert h["refit"] == "separate" and set(h["refit_params"]) == set(truth)
    (point,) = h["points"]
    assert point[axis] == pytest.approx(sizes.max()) and point["observed"] == pytest.approx(y[-1])
    refit = fit_law(kind, y[:-1], config=FitConfig(n_bootstrap=0, heldout=False), **{axis: sizes[:-1]})
    assert point["predicted"] == pytest.approx(float(refit.predict(**{axis: sizes[-1:]})[0]))
    assert point["rel_error"] == pytest.approx((point["predicted"] - y[-1]) / y[-1])
    assert h["max_abs_rel_error"] == pytest.approx(abs(point["rel_error"])) and h["threshold"] == 0.1
    assert not any(f.startswith("held-out error") for f in fit.flags)
    # The refit's prediction interval holds the prediction, and this on-trend observation.
    lo, hi = point["interval"]
    assert lo < point["predicted"] < hi and point["inside_interval"] and h["outside_interval"] == 0
    assert not any(f.startswith("held-out point outside") for f in fit.flags)
    # The main law still uses every point.
    assert fit.n_points == len(sizes)
    # A largest point 40% above the trend fails the check and lies outside the interval.
    off = y.copy()
    off[-1] *= 1.4
    # (300 refits: 50 leave the interval's 2.5% tails to a refit or two.)
    bad = fit_law(kind, off, config=FitConfig(n_bootstrap=300, seed=0), **{axis: sizes})
    assert bad.heldout["max_abs_rel_error"] > 0.1
    assert any(f.startswith(f"held-out error: predicting the largest {axis.upper()}") for f in bad.flags)
    assert bad.heldout["points"][0]["inside_interval"] is False and bad.heldout["outside_interval"] == 1
    assert any(f.startswith("held-out point outside the refit's 95% prediction interval") for f in bad.flags)


def test_heldout_without_bootstrap_has_no_interval() -> None:
    y = noisy(predict("N", PAPER_N, n=MINILM_N), seed=6)
    fit = fit_law("N", y, n=MINILM_N, config=FitConfig(n_bootstrap=0))
    assert "interval" not in fit.heldout["points"][0] and "outside_interval" not in fit.heldout
    assert not any(f.startswith("held-out point outside") for f in fit.flags)


def test_prediction_interval_needs_finite_bootstrap_predictions() -> None:
    import dataclasses

    y = noisy(predict("N", PAPER_N, n=MINILM_N), seed=6)
    refit = fit_law("N", y, n=MINILM_N, config=FitConfig(n_bootstrap=20, heldout=False))
    lo, hi = prediction_interval(refit, n=[2e7])
    assert 0 < lo[0] < refit.predict(n=[2e7])[0] < hi[0]
    broken = dataclasses.replace(refit, bootstrap={**refit.bootstrap, "A": [-1.0] * 20})  # no finite curve
    assert prediction_interval(broken, n=[2e7]) is None


def test_small_coverage_check_of_the_heldout_prediction_interval() -> None:
    """A fast version of benchmarks/coverage.py's held-out rows: 20 noisy sets of the paper's L(N) at the
    MiniLM sizes (5% multiplicative noise); each refit on the five smaller sizes gives a 95% prediction
    interval for the largest. Nominal coverage is 95%: at least 17 of 20 must contain the observation."""
    hits = 0
    for s in range(20):
        rng = np.random.default_rng(700 + s)
        y = predict("N", PAPER_N, n=MINILM_N) * np.exp(0.05 * rng.standard_normal(6))
        refit = fit_law("N", y[:-1], n=MINILM_N[:-1], config=FitConfig(n_bootstrap=100, seed=s, heldout=False,
                                                                     workers=1))
        lo, hi = prediction_interval(refit, n=MINILM_N[-1:])
        hits += bool(lo[0] <= y[-1] <= hi[0])
        # Both parts count (in log space): the curves' 95% band there and t(dof) x the points' scatter.
        band_lo, band_hi = refit.band(n=MINILM_N[-1:])
        scatter = stats.t.ppf(0.975, refit.dof) * refit.checks["residual_sd_log"]
        half = np.log(hi[0] / lo[0]) / 2
        assert half == pytest.approx(np.hypot(np.log(band_hi[0] / band_lo[0]) / 2, scatter), rel=0.02), s
    assert hits >= 17, hits


def test_heldout_is_skipped_with_a_flag_when_too_few_points_remain() -> None:
    n = MINILM_N[:4]
    fit = fit_law("N", predict("N", PAPER_N, n=n), n=n, config=FAST)
    assert fit.heldout is None
    assert any(f.startswith("held-out check skipped: without the largest N") for f in fit.flags)


def test_joint_heldout_keeps_its_keys_and_flags_large_errors() -> None:
    n, d = joint_grid()
    y = predict("ND", PAPER_ND, n=n, d=d)
    y[n == n.max()] *= 1.5
    fit = fit_joint(n, d, y, config=FAST)
    assert {"n_cut", "cut", "axis", "points", "mean_abs_rel_error", "max_abs_rel_error",
            "threshold", "refit"} <= set(fit.heldout)
    assert fit.heldout["refit"] == "separate" and fit.heldout["axis"] == "n"
    assert any(f.startswith("held-out error: predicting the largest N") for f in fit.flags)
    assert all("interval" in p for p in fit.heldout["points"]) and fit.heldout["interval_level"] == 95.0


# ---------------------------------------------------------------------------------------------
# Figures and the printout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lo", "hi"), [(1.4e6, 1.6e7), (67, 4800), (0.08, 0.17), (0.02, 50.0),
                                        (1e-3, 1e12), (0.5e6, 85e6)])
def test_log_ticks_never_crowd(lo: float, hi: float) -> None:
    ticks = law_figures.log_ticks(lo, hi)
    assert 2 <= len(ticks) <= law_figures.MAX_TICKS, ticks
    assert all(lo <= t <= hi for t in ticks)
    labels = [law_figures.size_label(t) for t in ticks]
    assert len(set(labels)) == len(labels)


def test_figures_have_bands_log_axes_and_labelled_heldout_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = {}

    def keep(fig, path):
        captured[Path(path).name] = fig
        return path

    monkeypatch.setattr(law_figures, "_save", keep)
    n, d = joint_grid()
    fits = {
        "N": fit_law("N", noisy(predict("N", PAPER_N, n=MINILM_N), 1), n=MINILM_N, config=FAST),
        "ND": fit_joint(n, d, noisy(predict("ND", PAPER_ND, n=n, d=d), 2), config=FAST),
    }
    law_figures.make_figures([], fits, tmp_path)
    ax = captured["fig3_ce_vs_n.png"].axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "95% bootstrap band" in labels and "observed (used in the fit)" in labels
    assert "the refit's 95% prediction interval" in labels  # the held-out point's error bar
    joint = captured["fig6_joint.png"].axes[0]
    labels = [t.get_text() for t in joint.get_legend().get_texts()]
    assert "held out of the check's refit (observed)" in labels
    assert "the refit's 95% prediction interval" in labels
    assert any(lab.startswith("predicted by the refit without them (") for lab in labels)
    assert any(lab.endswith("(held out of the check)") for lab in labels)  # the held-out N's curve
    assert len(joint.collections) >= 6  # a band per N curve
    assert len(joint.get_xticks()) <= law_figures.MAX_TICKS


def test_printout_lists_points_dof_intervals_heldout_and_flags() -> None:
    extra = {"converged": [True, True, False, True, None, True],
             "convergence": [0.0, 0.01, 0.2, 0.0, None, 0.0],
             "ce_test_zero_shot": [0.5] * 6}
    fit = fit_law("N", noisy(predict("N", PAPER_N, n=MINILM_N), 5), n=MINILM_N, config=FAST,
                  extra_points=extra)
    text = format_fits({"N": fit}, {"ND": "no rows"})
    assert "R^2 =" in text and "6 points, 3 parameters, dof = 3" in text
    assert "zero-shot" in text and "NO (+20.0%)" in text and "unknown" in text
    assert "95% CI [" in text and "held-out largest N" in text and "FLAGS:" in text
    assert "skipped ND: no rows" in text


# ---------------------------------------------------------------------------------------------
# Properties: for any parameters inside the fit bounds, every registered law falls (or stays flat)
# as N or D grows, and never goes below its irreducible floor.
# ---------------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FLOOR_MAX = 10.0  # the fit bounds the floor by the largest observed loss: CE up to ln(2^14) or so
SIZES = np.geomspace(1.0, 1e13, 60)  # one parameter .. far past any model; one pair .. any corpus


@st.composite
def params_in_bounds(draw, kind: str) -> dict[str, float]:
    """Natural-scale parameters drawn uniformly (in the optimiser's space) inside the bounds the fit
    itself uses for this form."""
    form = get_form(kind)
    logx = np.log(SIZES)
    bounds = form.bounds(logx, logx, np.log([FLOOR_MAX]), FitConfig())
    theta = [draw(st.floats(lo, hi, allow_nan=False)) for lo, hi in bounds]
    return form.from_theta(np.array(theta))


def _check_monotone_above_floor(kind: str, params: dict[str, float], y: np.ndarray) -> None:
    floor = params[get_form(kind).floor]
    assert np.all(np.isfinite(y)), (kind, params)
    # the prediction goes through logs (logaddexp): at the floor it may round one ulp below it
    assert np.all(y >= floor * (1 - 1e-12)), (kind, params, float(y.min()), floor)
    steps = np.diff(y, axis=-1)
    assert np.all(steps <= 1e-12 * np.abs(y[..., 1:])), (kind, params, float(steps.max()))


@settings(max_examples=80, deadline=None, database=None)
@given(data=st.data(), kind=st.sampled_from(["N", "D"]))
def test_property_single_laws_fall_with_size_and_stay_above_delta(data, kind):
    params = data.draw(params_in_bounds(kind))
    y = predict(kind, params, **{kind.lower(): SIZES})
    _check_monotone_above_floor(kind, params, y)


@settings(max_examples=80, deadline=None, database=None)
@given(data=st.data(), kind=st.sampled_from(["ND", "ND_additive"]))
def test_property_joint_laws_fall_in_n_and_in_d_and_stay_above_delta(data, kind):
    params = data.draw(params_in_bounds(kind))
    grid_n, grid_d = np.meshgrid(SIZES[::4], SIZES[::4], indexing="ij")  # [n, d]
    y = predict(kind, params, n=grid_n, d=grid_d)
    _check_monotone_above_floor(kind, params, y)  # along D, each N
    _check_monotone_above_floor(kind, params, y.T)  # along N, each D


def test_dvc_plots_show_renders_the_fitted_figures_offline(tmp_path: Path) -> None:
    """`dvc plots show` (real DVC) on the project's plots section: the fit's PNG figures (observed
    points, fitted curve, band) as images copied next to the page, and no chart library fetched from
    the web, so the page renders offline."""
    import subprocess
    import sys

    import yaml

    repo_root = Path(__file__).resolve().parents[1]
    declared = yaml.safe_load((repo_root / "dvc.yaml").read_text())["plots"]
    summary = fit_sweep(write_synthetic_sweep(tmp_path / "results.jsonl"), tmp_path / "fit", n_bootstrap=20, seed=0,
                        holdout_largest=1)
    written = {Path(p).name: Path(p) for p in summary["figures"]}
    assert declared and all(Path(p).name in written for p in declared)  # every declared plot is a figure fit writes
    repo = tmp_path / "repo"
    for p in declared:
        (repo / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(written[Path(p).name], repo / p)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": declared}))
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "plots", "show", "-o", "html"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True, env=os.environ | {"DVC_NO_ANALYTICS": "1"})
    page = (repo / "html" / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = sorted((repo / "html" / "static").iterdir())
    assert len(images) == len(declared) and all(f'src="static/{p.name}"' in page for p in images)
    assert {p.read_bytes() for p in images} == {written[Path(p).name].read_bytes() for p in declared}
