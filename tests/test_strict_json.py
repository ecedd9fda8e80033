"""Strict JSON in every output: NaN and Infinity are not JSON (Python writes and reads them, most other
parsers refuse them). The writer refuses them, naming where they are; numbers that may legitimately be
non-finite are written as null by their producer and read back as such. (Every stage's real outputs are
parsed strictly in test_study.py and test_pipeline.py; the serving and export files in their tests.)"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from conftest import assert_strict_json, mlflow_artifact_folders, strict_load

from drscaling.files import finite_or_null, write_json, write_jsonl
from drscaling.laws import FitResult, load_laws, save_laws


def test_the_writer_refuses_non_finite_numbers_naming_where_and_writes_nothing(tmp_path):
    for write, obj, where in ((write_json, {"a": {"b": [1.0, float("nan")]}}, r"a\.b\[1\]"),
                              (write_jsonl, [{"ok": 1.0}, {"loss": float("-inf")}], r"loss")):
        path = tmp_path / "out.json"
        with pytest.raises(ValueError, match=rf"non-finite number\(s\) at {where}: JSON has no NaN or Infinity"):
            write(path, obj)
        assert not path.exists() and not list(tmp_path.glob(".*.tmp"))


def test_finite_or_null_turns_numpy_and_non_finite_values_into_json():
    import numpy as np

    replaced: list[str] = []
    clean = finite_or_null({"a": np.float32(0.5), "b": np.array([1.0, np.inf]), "c": (np.int64(2), float("nan")),
                            "d": np.bool_(True), "p": Path("x")}, replaced=replaced)
    assert clean == {"a": 0.5, "b": [1.0, None], "c": [2, None], "d": True, "p": "x"}
    assert replaced == ["b[1]", "c[1]"]


def test_a_law_without_r2_or_objective_is_written_as_null_and_read_back_as_nan(tmp_path):
    """A published law has no R² and no fit objective (NaN in memory): laws.json holds null, strict JSON,
    and loading it gives NaN again, not an error."""
    law = FitResult(kind="N", params={"A": 5.0, "alpha": 0.3, "delta": 0.5}, r2=float("nan"), residuals=[],
                    ci95={}, bootstrap={}, n_points=0)
    assert math.isnan(law.objective)
    path = save_laws(tmp_path / "laws.json", {"N": law})
    doc = strict_load(path.read_text())
    assert doc["laws"]["N"]["r2"] is None and doc["laws"]["N"]["objective"] is None
    loaded = load_laws(path)["N"]
    assert math.isnan(loaded.r2) and math.isnan(loaded.objective) and loaded.params == law.params
    assert dataclasses.replace(loaded, r2=0.0, objective=0.0) == dataclasses.replace(law, r2=0.0, objective=0.0)


def test_a_diverged_training_run_fails_clearly_and_writes_no_infinity(prepared, annotations, tokenizer_dir, tmp_path,
                                                                     monkeypatch):
    """A real run whose loss becomes NaN (a learning rate far too large) never has a finite dev CE: its
    best-so-far stays at the sentinel inf (in the checkpoint, which is not JSON). It ends with a clear
    error and its MLflow run FAILED with the cause, and every JSON file it left (run.json, the MLflow
    artifacts) is strict: no Infinity where "no best yet" was meant."""
    import mlflow

    from drscaling.errors import DrscalingError
    from drscaling.evaluate import EvalConfig
    from drscaling.train.config import Paths, TrainConfig
    from drscaling.train.resume import read_checkpoint
    from drscaling.train.run import train

    cfg = TrainConfig(shape="bert-L2-H128", steps=4, batch_size=8, negatives=16, max_query_len=16, max_passage_len=32,
                      lr=1e6, warmup_steps=0, eval_every=2, checkpoint_every=1000, dim=64,
                      eval=EvalConfig(negatives=32, draws=2, max_query_len=16, max_passage_len=32, batch_size=64,
                                      rank_pool=0))
    out = tmp_path / "run"
    monkeypatch.setenv("DRSCALING_EXPERIMENT", "strict-json-diverged")
    with pytest.raises(DrscalingError, match=r"diverged: none of its 2 evaluation\(s\) gave a finite dev.*lower the learning rate"):
        train(cfg, Paths(prepared, annotations, tokenizer_dir, out))
    assert not (out / "metrics.json").exists()
    assert math.isinf(read_checkpoint(out / "checkpoint", cfg)["state"]["best_dev"])  # the sentinel, kept as is
    [run] = mlflow.search_runs(experiment_names=["strict-json-diverged"], output_format="list")
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["error"]
    assert_strict_json(out, *mlflow_artifact_folders("strict-json-diverged"), at_least=1)
