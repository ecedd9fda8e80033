"""Costs: a short real load sweep on the shared Triton server, real MLflow (sqlite in tmp)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_serving import MODEL, triton  # noqa: F401

from drscaling.costs import (
    LoadConfig, combine, fit_power, measure, measure_costs, run_load, served_models, training_costs,
    usd_per_million_tokens,
)
from drscaling.errors import DrscalingError

SHORT = {"batch_sizes": (1, 4), "concurrency": (1, 2), "duration_s": 0.5, "warmup_s": 0.1,
         "seq_len": 16}


def test_fit_power():
    n = np.array([1e5, 1e6, 1e7])
    fit = fit_power(n, 3e-12 * n**0.8)
    assert fit["a"] == pytest.approx(3e-12, rel=1e-6) and fit["b"] == pytest.approx(0.8)
    one = fit_power([4e5], [2e-7])
    assert one == {"a": pytest.approx(0.5e-12), "b": 1.0}
    with pytest.raises(DrscalingError):
        fit_power([], [])
    # 1M tokens per hour at $3.6 per hour: $3.6 per million tokens.
    assert usd_per_million_tokens(1e6 / 3600, 3.6) == pytest.approx(3.6)


def served_inferences(server, model: str) -> int:
    """Triton's own count of the inferences `model` has run (its statistics endpoint)."""
    import urllib.request

    url = f"http://{server.http_url}/v2/models/{model}/stats"
    with urllib.request.urlopen(url, timeout=10) as reply:
        stats = json.loads(reply.read())
    return sum(int(s["inference_count"]) for s in stats["model_stats"])


def _log_train_runs(mlflow, experiment: str) -> None:
    # By id, not set_experiment: the fluent API's active experiment would outlive this store.
    exp_id = mlflow.create_experiment(experiment)
    for shape, n, step_s in [("bert-L2-H128", 400_000, 0.2), ("bert-L2-H128", 400_000, 0.4),
                             ("bert-L4-H256", 3_200_000, 1.2)]:
        with mlflow.start_run(experiment_id=exp_id, tags={"drscaling.stage": "train"}):
            mlflow.log_params({"shape": shape, "n_non_embedding": n})
            mlflow.log_metrics({"train_step_seconds": step_s, "train_tokens_per_step": 5120})
    with mlflow.start_run(experiment_id=exp_id, tags={"drscaling.stage": "evaluate"}):  # not a training run: ignored
        mlflow.log_params({"shape": "bert-L12-H768", "n_non_embedding": 85_000_000})
        mlflow.log_metrics({"train_step_seconds": 99.0, "train_tokens_per_step": 5120})


def test_training_costs(mlflow_tmp):  # noqa: F811
    with pytest.raises(DrscalingError, match="train first"):
        training_costs("exp", device_hour_usd=3.6)
    _log_train_runs(mlflow_tmp, "exp")
    tc = training_costs("exp", device_hour_usd=3.6)
    assert [p["shape"] for p in tc["points"]] == ["bert-L2-H128", "bert-L4-H256"]
    small = tc["points"][0]
    assert small["step_s"] == pytest.approx(0.3)  # median of the two runs of that shape
    assert small["usd_per_step"] == pytest.approx(0.0003)  # 0.3 s at $3.6 per hour = $0.001 per second
    # 8x the parameters, 4x the step time (0.3 s -> 1.2 s): cost grows as N^(2/3)
    assert tc["fit"]["b"] == pytest.approx(2 / 3)
    assert tc["fit"]["a"] * 400_000 ** (2 / 3) == pytest.approx(0.0003)


@pytest.mark.parametrize("protocol", ["grpc", "http"])  # asynchronous driver / one thread per client
def test_measure_sweep_json_and_mlflow(triton, mlflow_tmp, tmp_path, protocol):  # noqa: F811
    assert [(m.name, m.n > 0) for m in served_models(triton)] == [(MODEL, True)]
    out = tmp_path / "sweep.json"
    served_before = served_inferences(triton, MODEL)
    result = measure(triton, [(MODEL, "bert-L2-H128", 405_000)], out_path=out,
                     device_hour_usd=2.0, **(SHORT | {"protocol": protocol}))
    saved = json.loads(out.read_text())
    cells = saved["sweep"][MODEL]
    assert [(c["batch"], c["concurrency"]) for c in cells] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    for c in cells:
        assert c["requests"] > 0 and 0 < c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"]
        # what the client counted happened within the window it reports, at the sequence length sent
        assert c["tokens_per_s"] * c["seconds"] == pytest.approx(c["requests"] * c["batch"] * 16, rel=1e-3)
    # Triton's own count: the server ran at least every counted inference (plus warm-up and
    # connection set-up requests, which are not counted)
    counted = sum(c["requests"] * c["batch"] for c in cells)
    assert counted <= served_inferences(triton, MODEL) - served_before
    point = result["inference"]["points"][0]
    assert point["tokens_per_s"] == max(c["tokens_per_s"] for c in cells)
    assert result["inference"]["fit"]["b"] == 1.0  # one shape: proportional
    # priced at the device hour: an hour of the measured throughput costs exactly $2.00
    assert point["usd_per_million_tokens"] / 1e6 * point["tokens_per_s"] * 3600 == pytest.approx(2.0)
    assert result["inference"]["fit"]["a"] * 405_000 * point["tokens_per_s"] * 3600 == pytest.approx(2.0)
    runs = mlflow_tmp.search_runs(search_all_experiments=True, output_format="list")
    child = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(child) == 1 and child[0].data.params["shape"] == "bert-L2-H128"
    history = mlflow_tmp.MlflowClient().get_metric_history(child[0].info.run_id, "p99_ms")
    assert len(history) == 4


def test_measure_costs_contract(triton, mlflow_tmp, tmp_path):  # noqa: F811
    # No training runs yet: inference only, "training" absent.
    out = tmp_path / "costs.json"
    costs = measure_costs(triton, out, models=[(MODEL, "bert-L2-H128", 405_000)],
                          experiment_name="exp", device_hour_usd=1.5, **SHORT)
    assert set(costs) == {"device_hour_usd", "device", "inference"}
    assert json.loads(out.read_text()) == costs
    # With training runs: the exact contract the budget module reads.
    _log_train_runs(mlflow_tmp, "exp")
    costs = combine(json.loads(out.read_text()) | {"inference": costs["inference"]},
                    training_costs("exp", device_hour_usd=1.5))
    assert set(costs) == {"device_hour_usd", "device", "inference", "training"}
    assert set(costs["inference"]) == {"points", "fit"} == set(costs["training"])
    assert set(costs["inference"]["points"][0]) == {"shape", "n", "tokens_per_s",
                                                    "usd_per_million_tokens"}
    assert set(costs["training"]["points"][0]) == {"shape", "n", "step_s", "tokens_per_step",
                                                   "usd_per_step"}
    assert set(costs["training"]["fit"]) == {"a", "b"}
    assert isinstance(costs["device"], str) and costs["device_hour_usd"] == 1.5


def test_measure_bad_input(triton, mlflow_tmp):  # noqa: F811
    with pytest.raises(DrscalingError, match="not ready"):
        measure(triton, [("nope", "bert-L2-H128", 1)], log_mlflow=False, **SHORT)
    with pytest.raises(DrscalingError, match="exceeds the 128 positions"):
        measure(triton, [(MODEL, "bert-L2-H128", 1)], log_mlflow=False,
                **(SHORT | {"seq_len": 512}))
    with pytest.raises(DrscalingError, match="concurrency"):
        measure(triton, [(MODEL, "bert-L2-H128", 1)], log_mlflow=False,
                **(SHORT | {"concurrency": (0,)}))
    with pytest.raises(DrscalingError, match="not reachable"):
        measure("127.0.0.1:1", [(MODEL, "bert-L2-H128", 1)], log_mlflow=False, **SHORT)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_load_generator_reports_refused_requests(triton, protocol):  # noqa: F811
    """Requests the server refuses end the load test with the server's reason; the server goes on."""
    cfg = LoadConfig(duration_s=0.3, warmup_s=0.0, protocol=protocol)
    with pytest.raises(DrscalingError, match=f"load test on '{MODEL}' failed: .*exceeds the model's maximum"):
        run_load(triton, MODEL, 1, 4, cfg, seq_len=400)
    cell = run_load(triton, MODEL, 2, 4, cfg, seq_len=8)
    assert cell["requests"] > 0 and cell["concurrency"] == 4
    with pytest.raises(DrscalingError, match="protocol must be 'http' or 'grpc'"):
        measure(triton, [(MODEL, "bert-L2-H128", 1)], log_mlflow=False, **(SHORT | {"protocol": "udp"}))
