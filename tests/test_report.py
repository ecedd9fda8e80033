"""The Markdown report (tables like the paper's Tables 1-2, held-out check, budget) and MLflow logging."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from drscaling.budget import run_budget
from drscaling.errors import DrscalingError
from drscaling.laws import fit_sweep, log_to_mlflow, predict
from drscaling.report import log_report, write_report

PAPER_N = {"A": 3.22e4, "alpha": 0.53, "delta": 0.04}
PAPER_ND = {"A": 3.6e4, "B": 7.1e3, "alpha": 0.56, "beta": 1.31, "delta": 0.03}


def _sweep(path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    ns = np.geomspace(0.5e6, 85e6, 8)
    for i, (n, ce) in enumerate(zip(ns, predict("N", PAPER_N, n=ns), strict=True)):
        rows.append({"sweep": "model", "shape": f"s{i}", "n": int(n), "d": 500_000, "source": "human",
                     "ce_test_min": float(ce * (1 + 0.01 * rng.standard_normal())),
                     "mrr@10": 0.3, "ndcg@10": 0.35, "recall@1000": 0.9, "run_id": f"r{i}"})
    nn, dd = (a.ravel() for a in np.meshgrid(np.geomspace(0.5e6, 85e6, 5), np.geomspace(1e3, 5e5, 4)))
    for i, (n, d, ce) in enumerate(zip(nn, dd, predict("ND", PAPER_ND, n=nn, d=dd), strict=True)):
        rows.append({"sweep": "joint", "shape": f"j{i % 5}", "n": int(n), "d": int(d),
                     "source": "human", "ce_test_min": float(ce * (1 + 0.01 * rng.standard_normal())),
                     "run_id": f"j{i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("report")
    summary = fit_sweep(_sweep(root / "results.jsonl"), root / "fit", n_bootstrap=20)
    return root, summary


def test_report_has_tables_heldout_figures_and_budget(fitted: tuple[Path, dict]) -> None:
    root, summary = fitted
    budget = run_budget(summary["laws_path"], 1e6, include_inference=True, out_dir=root / "budget")
    out = write_report(summary["laws_path"], root / "report" / "report.md", budget["budget_path"])
    text = out.read_text()
    assert "### Table 1: model-size scaling" in text
    assert "| Law | A | α | δ_N | R² | points | flags |" in text
    assert re.search(r"^\| N \| 3\.\d+×10\^4 \[", text, re.M)  # A with its interval
    assert "| paper (MS MARCO) | 3.22×10^4 | 0.53 | 0.04 | 0.991 |" in text
    assert "Joint law L(N,D)" in text and "Held-out prediction" in text
    assert "Laws not fitted:" in text and "- D:" in text  # no data sweep in this synthetic set
    assert "## Budget allocation (Section 5)" in text and "3.22e-08 $ per parameter" in text
    assert "| with inference |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "../fit/figures/fig3_ce_vs_n.png" in links
    assert "../budget/figures/fig8_budget_with_inference.png" in links
    for link in links:
        assert (out.parent / link).exists(), link


def test_report_without_budget_and_missing_budget(fitted: tuple[Path, dict], tmp_path: Path) -> None:
    _, summary = fitted
    out = write_report(summary["laws_path"], tmp_path / "r.md")
    assert "Budget allocation" not in out.read_text()
    with pytest.raises(DrscalingError, match="run `drscaling budget` first"):
        write_report(summary["laws_path"], tmp_path / "r2.md", tmp_path / "none" / "budget.json")
    assert not (tmp_path / "r2.md").exists()
    with pytest.raises(DrscalingError, match="drscaling fit"):
        write_report(tmp_path / "nope.json", tmp_path / "r3.md")


def test_logging_to_a_real_mlflow_store(
    fitted: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, summary = fitted
    # The session store of conftest.py when there is one, else a store of our own; never the repo's.
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow
    from mlflow.tracking import MlflowClient

    from drscaling.tracking import configure

    configure()
    name = f"test-report-{uuid.uuid4().hex[:8]}"
    mlflow.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)  # artifacts land in tmp_path

    run_id = log_to_mlflow(summary)  # no active run: starts and ends its own
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["N.alpha"] == pytest.approx(summary["fits"]["N"]["params"]["alpha"])
    assert "ND.heldout_mean_abs_rel_error" in run.data.metrics
    assert run.data.tags["law.N"].startswith("L(N) = ")
    assert [a.path for a in client.list_artifacts(run_id, "laws")] == ["laws/laws.json"]
    figs = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert "figures/fig6_joint.png" in figs

    report = write_report(summary["laws_path"], root / "r.md")
    with mlflow.start_run(run_name="outer") as outer:
        assert log_report(report, summary["laws_path"]) == outer.info.run_id
        assert mlflow.active_run() is not None  # the caller's run is left open
    names = {a.path for a in client.list_artifacts(outer.info.run_id, "report")}
    assert {"report/r.md", "report/laws.json", "report/figures"} <= names


def test_heldout_rows_are_judged_each_on_its_own_error(fitted: tuple[Path, dict]) -> None:
    """A joint law's check predicts several points: a point within the threshold reads `ok` even when
    another point of the same law is over it (the law's flag is on the largest error)."""
    import dataclasses

    from drscaling.laws.result import load_laws
    from drscaling.report import _heldout

    _, summary = fitted
    fit = load_laws(summary["laws_path"])["ND"]
    points = [{"n": 7e6, "d": d, "observed": 1.0, "predicted": pred, "rel_error": pred - 1.0}
              for d, pred in ((200, 1.144), (1600, 1.01))]
    heldout = fit.heldout | {"points": points, "max_abs_rel_error": 0.144, "threshold": 0.1}
    rows = [r for r in _heldout({"ND": dataclasses.replace(fit, heldout=heldout)}) if r.startswith("| ND |")]
    assert [r.rsplit("|", 2)[1].strip() for r in rows] == ["**over 10%**", "ok"]
