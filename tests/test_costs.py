"""Costs: a short real load sweep on the shared Triton server, real MLflow (sqlite in tmp)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import MODEL

from drscaling.cost_stats import (
    SPREAD_LIMIT, format_fit, load_flags, machine_state, relative_spread, summarise_repeats,
)
from drscaling.costs import (
    combine, fit_power, measure, measure_costs, served_models, training_costs, usd_per_million_tokens,
)
from drscaling.costs_file import CostsFile
from drscaling.errors import DrscalingError
from drscaling.loadgen import LoadConfig, run_load

# One repeat: these tests are about the sweep and its files; repeats have their own tests below.
SHORT = {"batch_sizes": (1, 4), "concurrency": (1, 2), "duration_s": 0.5, "warmup_s": 0.1,
         "seq_len": 16, "repeats": 1}


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
    described = {"device_hour_usd", "device", "measured_at", "machine", "repeats", "duration_s", "flags"}
    assert set(costs) == described | {"inference"}
    assert costs["measured_at"][:4].isdigit() and costs["machine"]["usable_cpus"] >= 1
    assert json.loads(out.read_text()) == costs
    # With training runs: the exact contract the budget module reads.
    _log_train_runs(mlflow_tmp, "exp")
    costs = combine(json.loads(out.read_text()) | {"inference": costs["inference"]},
                    training_costs("exp", device_hour_usd=1.5)).to_dict()
    assert set(costs) == described | {"inference", "training"}
    assert set(costs["inference"]) == {"points", "fit"} == set(costs["training"])
    assert set(costs["inference"]["points"][0]) == {"shape", "n", "tokens_per_s", "usd_per_million_tokens",
                                                    "tokens_per_s_repeats", "tokens_per_s_spread"}
    assert set(costs["training"]["points"][0]) == {"shape", "n", "step_s", "tokens_per_step",
                                                   "usd_per_step", "runs"}
    # two runs of the smaller shape are its repeats: the training fit has an interval around b
    fit = costs["training"]["fit"]
    assert set(fit) == {"a", "b", "interval"} and fit["interval"]["b"][0] <= fit["b"] <= fit["interval"]["b"][1]
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


# ---------------------------------------------------------------------------------------------
# Repeats: medians, spread, flags; the fit's interval
# ---------------------------------------------------------------------------------------------


def _cell(tokens_per_s: float, p50: float, batch: int = 4, concurrency: int = 1) -> dict:
    """A load cell as run_load returns it (seq_len 16), built from chosen numbers."""
    return {"batch": batch, "concurrency": concurrency, "seq_len": 16, "requests": 100, "seconds": 0.5,
            "inferences_per_s": tokens_per_s / 16, "tokens_per_s": tokens_per_s,
            "p50_ms": p50, "p95_ms": p50 * 1.5, "p99_ms": p50 * 2}


def test_repeats_give_median_spread_and_flag_a_large_spread():
    noisy = summarise_repeats([_cell(900, 3.0), _cell(1200, 2.0), _cell(1000, 2.5)], label="m")
    assert noisy["repeats"] == 3 and noisy["tokens_per_s"] == 1000 and noisy["p50_ms"] == 2.5
    assert noisy["inferences_per_s"] == pytest.approx(1000 / 16)
    assert noisy["spread"]["tokens_per_s"] == {"min": 900, "max": 1200, "rel": pytest.approx(0.3)}
    assert noisy["spread"]["p50_ms"]["rel"] == pytest.approx(0.4)
    assert noisy["per_repeat"]["tokens_per_s"] == [900, 1200, 1000]
    assert len(noisy["flags"]) == 1 and "m batch 4 x concurrency 1: tokens/s spread 30%" in noisy["flags"][0]
    steady = summarise_repeats([_cell(990, 3.0), _cell(1010, 2.0), _cell(1000, 2.5)])
    assert steady["spread"]["tokens_per_s"]["rel"] == pytest.approx(0.02) and steady["flags"] == []
    # the limit is one number: just above the spread flags, the default 10% does not
    assert SPREAD_LIMIT == 0.10 and summarise_repeats([_cell(990, 3), _cell(1010, 3)], limit=0.019)["flags"]
    assert summarise_repeats([_cell(500, 1.0)])["flags"] == []  # one repeat: no spread to judge
    assert relative_spread([2.0, 2.0]) == 0.0
    with pytest.raises(DrscalingError, match="repeats of different settings"):
        summarise_repeats([_cell(900, 3.0), _cell(900, 3.0, batch=8)])
    with pytest.raises(DrscalingError, match="no repeats"):
        summarise_repeats([])


def test_a_loaded_machine_is_flagged():
    assert load_flags({"loadavg_1m": 2.5, "usable_cpus": 2})[0].startswith("machine loaded at start: 1-minute "
                                                                           "load average 2.50 above its 2")
    assert load_flags({"loadavg_1m": 1.9, "usable_cpus": 2}) == []
    assert load_flags({"loadavg_1m": float("nan"), "usable_cpus": 2}) == []
    state = machine_state()
    assert state["usable_cpus"] == len(os.sched_getaffinity(0))
    assert state["loadavg_1m"] == pytest.approx(os.getloadavg()[0], abs=2.0)


def _noisy(y: np.ndarray, sigma: float, repeats: int = 5) -> list[list[float]]:
    z = np.random.default_rng(7).standard_normal((len(y), repeats))  # the same draws at every sigma
    return [list(v * np.exp(sigma * zi)) for v, zi in zip(y, z, strict=True)]


def test_fit_interval_contains_the_estimate_and_widens_with_noise():
    n = np.array([4e5, 1.6e6, 6.4e6, 2.5e7])
    y = 3e-12 * n**0.8
    widths = []
    for sigma in (0.02, 0.2):
        samples = _noisy(y, sigma)
        fit = fit_power(n, [np.median(s) for s in samples], samples=samples)
        iv = fit["interval"]
        assert iv["b"][0] <= fit["b"] <= iv["b"][1] and iv["a"][0] <= fit["a"] <= iv["a"][1]
        assert iv["level"] == 0.95 and "bootstrap over repeats" in iv["method"]
        widths.append(iv["b"][1] - iv["b"][0])
    assert widths[1] > 3 * widths[0] > 0
    assert "b in [" in format_fit(fit, "$/token")
    # without repeats: least-squares standard errors, also wider with a worse fit
    ls = [fit_power(n, y * np.exp(k * np.array([0.1, -0.1, -0.1, 0.1])))["interval"] for k in (0.1, 1.0)]
    assert "least-squares" in ls[0]["method"] and ls[1]["b"][1] - ls[1]["b"][0] > 5 * (ls[0]["b"][1] - ls[0]["b"][0])
    # two shapes, no repeats: no residual to judge the fit by, so no interval (and the printout says so)
    two = fit_power(n[:2], y[:2])
    assert "interval" not in two and "no interval" in format_fit(two, "$/token")
    with pytest.raises(DrscalingError, match="positive repeats"):
        fit_power(n, y, samples=[[1.0]] * 3)
    with pytest.raises(DrscalingError, match="positive repeats"):
        fit_power(n, y, samples=[[1.0], [0.0], [1.0], [1.0]])


def test_measure_repeats_each_setting_on_a_real_server(triton, tmp_path):  # noqa: F811
    out = tmp_path / "load.json"
    # A spread limit so small that any difference between the two repeats is flagged.
    measure(triton, [(MODEL, "bert-L2-H128", 405_000)], out_path=out, log_mlflow=False,
            device_hour_usd=2.0, **(SHORT | {"repeats": 2, "duration_s": 0.2, "max_spread": 1e-9}))
    saved = json.loads(out.read_text())
    assert saved["load"]["repeats"] == 2
    for c in saved["sweep"][MODEL]:
        reps = c["per_repeat"]["tokens_per_s"]
        assert c["repeats"] == 2 and len(reps) == 2
        assert c["tokens_per_s"] == pytest.approx(np.mean(reps))  # the median of two
        assert c["spread"]["tokens_per_s"]["rel"] == pytest.approx((max(reps) - min(reps)) / np.mean(reps))
        # tokens/s counts whole requests: two short windows can finish the same number (spread 0, no flag)
        spread = c["spread"]["tokens_per_s"]["rel"]
        assert len(c["flags"]) == (1 if spread > 1e-9 else 0) and all(f in saved["flags"] for f in c["flags"])
    point = saved["inference"]["points"][0]
    best = max(saved["sweep"][MODEL], key=lambda c: c["tokens_per_s"])
    assert point["tokens_per_s_repeats"] == best["per_repeat"]["tokens_per_s"]
    # one shape: b stays 1, the interval of a comes from the repeats and holds the estimate
    fit = saved["inference"]["fit"]
    assert fit["b"] == 1.0 and fit["interval"]["a"][0] <= fit["a"] <= fit["interval"]["a"][1]
    loaded = saved["machine"]["loadavg_1m_start"] > saved["machine"]["usable_cpus"]
    assert any(f.startswith("machine loaded") for f in saved["flags"]) == loaded
    assert saved["measured_at"] and "loadavg_1m_end" in saved["machine"]
    with pytest.raises(DrscalingError, match="repeats must lie in 1..50"):
        measure(triton, [(MODEL, "bert-L2-H128", 1)], log_mlflow=False, **(SHORT | {"repeats": 0}))


def test_measure_command_writes_the_costs_folder(triton, tiny_model, mlflow_tmp, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`drscaling measure --url ... --repeats 2` with a small grid from the working directory's params.yaml;
    the served shape's registered version gets the measured throughput on its model card."""
    from drscaling import registry
    from drscaling.cli import main

    meta = json.loads((tiny_model / "drscaling.json").read_text())
    with mlflow_tmp.start_run():
        registry.log_encoder(tiny_model, {"shape": "bert-L2-H128", "dim": 32, "n_non_embedding": meta["n_non_embedding"]})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "measure": {"batch_sizes": [2], "concurrency": [1, 2], "duration_s": 0.2, "seq_len": 16, "repeats": 3},
        "budget": {"costs_path": "costs/costs.json"}}))
    assert main(["measure", "--url", triton.grpc_url, "--repeats", "2", "--train-experiment", "none"]) == 0
    printed = capsys.readouterr().out
    costs = json.loads((tmp_path / "costs/costs.json").read_text())  # budget.costs_path: the default --out
    assert costs["repeats"] == 2 and costs["duration_s"] == 0.2 and costs["machine"]["device"] == costs["device"]
    assert len(costs["inference"]["points"][0]["tokens_per_s_repeats"]) == 2
    load = json.loads((tmp_path / "costs/load.json").read_text())
    assert [c["repeats"] for c in load["sweep"][MODEL]] == [2, 2]
    assert (tmp_path / "costs/cost_vs_n.png").stat().st_size > 0
    assert "2 repeats per setting" in printed and "inference cost fit: $/token" in printed
    assert "95% interval: a in [" in printed
    assert not (tmp_path / "costs/triton.log").exists()
    version = mlflow_tmp.MlflowClient().get_model_version("drscaling-bert-L2-H128", "1")
    assert float(version.tags["tokens_per_s"]) == pytest.approx(costs["inference"]["points"][0]["tokens_per_s"])
    assert "costs/costs.json" in version.tags["costs_source"] and "Triton throughput" in version.description
    # The budget stage on measured costs does the same from the costs file it reads (versions
    # registered after `make measure` get the numbers too).
    from drscaling.budget import log_budget

    costs["inference"]["points"][0]["tokens_per_s"] = 4321.0
    (tmp_path / "later.json").write_text(json.dumps(costs))
    (tmp_path / "budget").mkdir()
    log_budget({"budget": 1.0, "laws": "laws.json"}, tmp_path / "budget", "measured", False, tmp_path / "later.json")
    version = mlflow_tmp.MlflowClient().get_model_version("drscaling-bert-L2-H128", "1")
    assert version.tags["tokens_per_s"] == "4321.0" and "later.json" in version.tags["costs_source"]


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of drawn tick labels (major and minor) whose boxes overlap, per axis."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            out += [(labels[i].get_text(), labels[j].get_text()) for i in range(len(boxes))
                    for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    return out


def test_cost_figure_is_log_log_with_tick_labels_that_never_overlap():
    """cost_vs_n.png from the committed costs: log axes, and no two tick labels overlap on either axis
    (matplotlib's default labelled 3x10^6 over 4x10^6 on this one-decade range)."""

    from drscaling.measure_stage import draw_cost_figure

    costs = json.loads((Path(__file__).resolve().parents[1] / "costs/costs.json").read_text())
    fig = draw_cost_figure(costs)
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in fig.axes)
    assert all(len(ax.xaxis.get_ticklabels()) >= 2 for ax in fig.axes)
    assert overlapping_tick_labels(fig) == []


def test_costs_file_round_trip_is_byte_identical(tmp_path):
    # The versioned costs file read into CostsFile and written again: the same bytes, so the
    # typed reader and writer keep exactly the contract (and its ints, nulls and key set).
    versioned = Path(__file__).resolve().parents[1] / "costs" / "costs.json"
    costs = CostsFile.read(versioned)
    assert costs.training is not None and costs.inference is not None
    assert costs.inference.fit.a > 0 and costs.inference.fit.interval["level"] == 0.95
    assert costs.write(tmp_path / "costs.json").read_bytes() == versioned.read_bytes()
    # A degenerate fit (NaN) is written as null and reads back as NaN.
    costs.training.fit.b = float("nan")
    again = CostsFile.read(costs.write(tmp_path / "nan.json"))
    assert json.loads((tmp_path / "nan.json").read_text())["training"]["fit"]["b"] is None
    assert np.isnan(again.training.fit.b)
    # An older, smaller file (no machine, no towers, no training) reads; what it lacks is None.
    older = {"device_hour_usd": 2, "device": "test", "inference": {"points": [], "fit": {"a": 1e-15, "b": 1.0}}}
    read = CostsFile.from_dict(older)
    assert read.training is None and read.machine is None and read.towers == []
    assert read.to_dict() == older | dict.fromkeys(("measured_at", "machine", "repeats", "duration_s", "flags"))


@pytest.mark.parametrize("field, value", [("inference", {"points": []}), ("training", {"fit": {"a": "x", "b": 1}}),
                                          ("repeats", "three"), ("towers", {"query": 1}), ("machine", [1])])
def test_a_malformed_costs_file_names_the_file_and_the_field(tmp_path, field, value):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"device_hour_usd": 2.0, "inference": {"points": [], "fit": {"a": 1, "b": 1}},
                                field: value}))
    with pytest.raises(DrscalingError, match=rf"{path}: malformed '{field}'"):
        CostsFile.read(path)
    path.write_text("[1, 2]")
    with pytest.raises(DrscalingError, match="not a costs file"):
        CostsFile.read(path)
