"""ONNX export: real torch, real onnxruntime, a real MLflow store (sqlite in tmp)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_strict_json

from drscaling.errors import DrscalingError
from drscaling.export import (
    PARITY_TEXTS, _check_variant, export_onnx, ort_encode_fn, ort_session, quality_delta,
)
from drscaling.model.retriever import encode
from drscaling.model.saved import load_model
from conftest import CORPUS  # noqa: E402  (shared tiny model and export fixtures live in conftest)

def test_export_parity_and_layout(tiny_model, tiny_onnx):
    record = json.loads((tiny_onnx / "export.json").read_text())
    assert record["opset"] == 17 and record["output"] == "embedding"
    assert record["inputs"] == ["input_ids", "attention_mask"]
    for name in ("model.onnx", "model.opt.onnx", "model.int8.onnx", "drscaling.json"):
        assert (tiny_onnx / name).exists()
    assert (tiny_onnx / "tokenizer" / "tokenizer.json").exists()
    assert record["variants"]["fp32"]["parity"]["max_abs_diff"] <= 1e-4
    assert record["variants"]["opt"]["parity"]["max_abs_diff"] <= 1e-4
    assert record["variants"]["int8"]["parity"]["min_cosine"] > 0.95
    assert_strict_json(tiny_onnx, tiny_model, at_least=4)  # export.json, drscaling.json, tokenizer, model meta

    # Dynamic batch and sequence: other sizes than the export trace, against PyTorch directly.
    encoder, tok, _ = load_model(tiny_model)
    texts = CORPUS[:5] + ["x"]
    ref = encode(encoder, tok, texts, max_len=40)
    for file in ("model.onnx", "model.opt.onnx"):
        got = ort_encode_fn(ort_session(tiny_onnx / file), tok, batch_size=3)(texts, 40)
        assert np.abs(got - ref).max() <= 1e-4


def test_opt_graph_is_fused(tiny_onnx):
    import onnx

    ops = {n.op_type for n in onnx.load(str(tiny_onnx / "model.opt.onnx")).graph.node}
    assert {"SkipLayerNormalization", "Attention", "BiasGelu"} <= ops, ops


def test_parity_gate_refuses_a_mismatch(tiny_onnx):
    from drscaling.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_onnx / "tokenizer")
    good = ort_encode_fn(ort_session(tiny_onnx / "model.onnx"), tok)(PARITY_TEXTS, 64)
    with pytest.raises(DrscalingError, match="differs from PyTorch"):
        _check_variant("fp32", tiny_onnx / "model.onnx", tok, good + 1e-3, 64)


def test_export_bad_input(tmp_path, tiny_model):
    with pytest.raises(DrscalingError, match="model not found"):
        export_onnx(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(DrscalingError, match="unknown ONNX variant"):
        export_onnx(tiny_model, tmp_path / "out", variants=("fp32", "bf8"))
    with pytest.raises(DrscalingError, match="opset"):
        export_onnx(tiny_model, tmp_path / "out", opset=9)
    assert not (tmp_path / "out").exists()


def test_export_from_mlflow_run_logs_parity(tmp_path, tiny_model, mlflow_tmp):
    mlflow = mlflow_tmp
    with mlflow.start_run(tags={"drscaling.stage": "train"}) as train:
        mlflow.log_artifacts(str(tiny_model), artifact_path="model")
    with mlflow.start_run() as run:
        record = export_onnx(f"runs:/{train.info.run_id}/model", tmp_path / "a")
    assert record["variants"]["fp32"]["parity"]["max_abs_diff"] <= 1e-4
    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.metrics["onnx_fp32_max_abs_diff"] <= 1e-4
    assert logged.data.params["onnx_opset"] == "17"
    # A bare run id works too; an unknown one is a clear error.
    export_onnx(train.info.run_id, tmp_path / "b")
    assert (tmp_path / "b" / "model.onnx").exists()
    with pytest.raises(DrscalingError, match="MLflow"):
        export_onnx("0" * 32, tmp_path / "c")


def test_quality_delta_is_contrastive_entropy(tiny_model, tiny_onnx, prepared, tmp_path):
    """Export quality is the contrastive entropy of each variant on the test split (the metric
    `drscaling export` scores with), and PyTorch's value is what the evaluator gives the model."""
    import shutil

    from drscaling.evaluate import EvalConfig, ce_metric, evaluate_model

    onnx_dir = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, onnx_dir)
    cfg = EvalConfig(negatives=32, draws=2, max_query_len=16, max_passage_len=32, rank_pool=0)
    result = quality_delta(onnx_dir, ce_metric(prepared, cfg), model_dir=tiny_model)
    assert result["torch"] == pytest.approx(evaluate_model(tiny_model, prepared, "test", cfg)["ce"], abs=1e-5)
    assert 0 < result["torch"] < 2 * np.log(33)  # a CE in nats (random weights: near ln(33)), not a norm
    assert set(result["variants"]) == {"fp32", "opt", "int8"}
    for name in ("fp32", "opt"):  # the same function as PyTorch: the same CE
        assert abs(result["variants"][name]["delta"]) < 1e-4, name
    assert abs(result["variants"]["int8"]["delta"]) < 0.05  # nats
    for v in result["variants"].values():
        assert v["delta"] == pytest.approx(v["value"] - result["torch"])
    assert json.loads((onnx_dir / "export.json").read_text())["quality"] == result


def test_export_command_takes_repository_settings_from_params(tmp_path, tiny_model, mlflow_tmp, monkeypatch, capsys):
    """`drscaling export --repo` builds the Triton model with params.yaml's `serving` settings;
    a bad one stops it with the setting named and no model written."""
    import yaml

    from drscaling.cli import main

    monkeypatch.chdir(tmp_path)
    serving = {"variants": ["fp32"], "max_batch_size": 16, "instances": 2, "intra_op_threads": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"serving": serving}))
    argv = ["export", "--model", str(tiny_model), "--name", "m", "--no-quality", "--out", "exp", "--repo", "repo"]
    assert main(argv) == 0
    config = (tmp_path / "repo/m/config.pbtxt").read_text()
    assert "max_batch_size: 16" in config and "count: 2" in config and "kind: KIND_CPU" in config

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"serving": serving | {"kind": "KIND_TPU"}}))
    assert main(argv[:4] + ["m2"] + argv[5:]) == 2
    assert "kind must be one of" in capsys.readouterr().err
    assert not (tmp_path / "repo/m2").exists()
