"""Trained encoders as MLflow Models in the registry: logged once, registered per shape, served by alias."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest

from drscaling import registry, tracking
from drscaling.errors import DrscalingError
from drscaling.evaluate import EvalConfig, evaluate_model
from drscaling.model.saved import load_retriever
from drscaling.train.config import Paths, TrainConfig
from drscaling.train.run import train

EVAL = EvalConfig(negatives=32, draws=2, max_query_len=16, max_passage_len=24, batch_size=64, rank_pool=300)
SHAPE = "bert-L2-H128"
NAME = f"drscaling-{SHAPE}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """This module's own registry: the session store holds other tests' versions of the same shape."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _use_store(store, _mlflow_uri_per_test):
    os.environ["MLFLOW_TRACKING_URI"] = store
    mlflow.set_tracking_uri(store)


@pytest.fixture(scope="module")
def trained(store, prepared, annotations, tokenizer_dir, tmp_path_factory) -> dict:
    """Two tiny training runs of one shape (two data sizes: two versions of its registered model)."""
    os.environ["MLFLOW_TRACKING_URI"] = store  # before any test of the module has set it
    mlflow.set_tracking_uri(store)
    out = {}
    for d in (60, 120):
        cfg = TrainConfig(shape=SHAPE, steps=4, batch_size=8, negatives=16, max_query_len=16, max_passage_len=24,
                          lr=1e-3, warmup_steps=1, eval_every=2, checkpoint_every=4, dim=32, train_pairs=d, eval=EVAL)
        folder = tmp_path_factory.mktemp(f"reg-d{d}")
        out[d] = train(cfg, Paths(prepared, annotations, tokenizer_dir, folder)) | {"folder": folder, "cfg": cfg}
    return out


def test_each_run_logs_one_registered_pyfunc_model(trained, annotations, prepared):
    client = mlflow.MlflowClient()
    versions = {v.tags["config_key"]: v for v in client.search_model_versions(f"name = '{NAME}'")}
    for d, r in trained.items():
        v = versions[r["config_key"]]
        assert v.run_id == r["run_id"] and v.tags["d"] == str(d) and v.tags["source"] == "human"
        # the card: N, D, source, CE with its interval, MRR@10
        assert f"| D (training pairs) | {d} |" in v.description and "MRR@10" in v.description
        card = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{r['run_id']}/model_card.json")).read_text())
        lo, hi = card["ce_test_interval"]
        assert lo <= card["ce_test"] <= hi and card["n_non_embedding"] == r["n"]
        info = mlflow.models.get_model_info(f"runs:/{r['run_id']}/model")
        assert "python_function" in info.flavors
        assert info.signature.inputs.input_types() == [mlflow.types.DataType.string]
        assert info.signature.outputs.inputs[0].shape == (-1, 32)
        # stored once: no plain model/ folder among the run's artifacts, and the local folder's files
        # are hard links to the artifact store's copy
        assert "model" not in {a.path for a in client.list_artifacts(r["run_id"])}
        weights = next((r["folder"] / "model" / "backbone").glob("*.safetensors"))
        assert weights.stat().st_nlink == 2
    run = client.get_run(trained[60]["run_id"])
    inputs = {(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in run.inputs.dataset_inputs}
    assert ("annotations/human", tracking.file_version(annotations / "human.jsonl"), "training") in inputs
    assert ("prepared/prepared", tracking.file_version(prepared), "evaluation") in inputs
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_recommended_alias_serves_and_evaluates(trained, prepared):
    best = trained[120]
    picked = registry.recommend({"best_measured_run": {"shape": SHAPE, "config_key": best["config_key"]}})
    assert picked["uri"] == f"models:/{NAME}@recommended"
    version = mlflow.MlflowClient().get_model_version_by_alias(NAME, "recommended")
    assert version.run_id == best["run_id"]

    served = mlflow.pyfunc.load_model(picked["uri"]).predict(["a query", "rsync file copy"])
    local = load_retriever(best["folder"] / "model")
    expected = local.query.encode(["a query", "rsync file copy"], local.query.meta.max_query_len)
    assert served.shape == (2, 32) and served.dtype == np.float32
    np.testing.assert_allclose(served, expected, atol=1e-5)

    by_alias = evaluate_model(picked["uri"], prepared, "test", EVAL)
    by_folder = evaluate_model(best["folder"] / "model", prepared, "test", EVAL)
    assert by_alias["ce"] == pytest.approx(by_folder["ce"], abs=1e-6)
    assert by_alias["mrr@10"] == pytest.approx(by_folder["mrr@10"], abs=1e-6)
    by_run = evaluate_model(f"runs:/{best['run_id']}/model", prepared, "test", EVAL)
    assert by_run["ce"] == pytest.approx(by_folder["ce"], abs=1e-6)

    # without an exact config the budget's best shape gets its version of lowest CE
    low = min(trained.values(), key=lambda r: r["ce_test_at_best_dev"])
    assert registry.recommend({"shapes": {"best": {"shape": SHAPE}}})["version"] == \
        str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "recommended").version)
    assert mlflow.MlflowClient().get_model_version_by_alias(NAME, "recommended").run_id == low["run_id"]


def test_bad_model_uris_and_inputs(trained):
    with pytest.raises(DrscalingError, match="cannot download the model models:/drscaling-nope@recommended"):
        with registry.local_model("models:/drscaling-nope@recommended"):
            pass
    with pytest.raises(DrscalingError, match="model not found: nowhere"):
        with registry.local_model("nowhere"):
            pass
    assert registry.recommend({"best_measured_run": {"shape": "bert-L12-H768", "config_key": "x"}}) is None
    assert registry.recommend({}) is None
    model = mlflow.pyfunc.load_model(f"runs:/{trained[60]['run_id']}/model")
    with pytest.raises(Exception, match="side must be one of query, passage"):
        model.predict(["a query"], params={"side": "sideways"})
    passages = model.predict(["a passage about rsync"], params={"side": "passage", "max_len": 8})
    assert passages.shape == (1, 32)


def test_export_by_alias_logs_the_onnx_flavour(trained, tmp_path):
    from drscaling.export import export_onnx

    registry.recommend({"best_measured_run": {"shape": SHAPE, "config_key": trained[60]["config_key"]}})
    tracking.use_experiment("export")
    with mlflow.start_run() as run:
        export_onnx(f"models:/{NAME}@recommended", tmp_path / "onnx")
    info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/onnx")
    assert "onnx" in info.flavors
    assert [s.name for s in info.signature.inputs.inputs] == ["input_ids", "attention_mask"]
    assert registry.model_name(f"models:/{NAME}@recommended") == NAME


def test_share_stored_files_links_only_identical_files(tmp_path):
    local, stored = tmp_path / "local", tmp_path / "stored"
    for folder, text in ((local, "same"), (stored, "same")):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "a.bin").write_text(text)
    (local / "b.txt").write_text("mine")
    (stored / "b.txt").write_text("theirs")
    assert registry.share_stored_files(local, stored) == 1
    assert os.path.samefile(local / "sub" / "a.bin", stored / "sub" / "a.bin")
    assert (local / "b.txt").read_text() == "mine" and (local / "b.txt").stat().st_nlink == 1
    assert registry.share_stored_files(local, None) == 0


def test_a_study_registers_under_its_own_name_and_never_recommends_another_datasets_version(
        trained, prepared, annotations, tokenizer_dir, tmp_path, monkeypatch):
    """CEs on two datasets do not compare: a study's runs are versions of `drscaling-<study>-<shape>`,
    and its budget's @recommended stays among them, leaving the project's registered model alone."""
    client = mlflow.MlflowClient()
    project_versions = {v.version for v in client.search_model_versions(f"name = '{NAME}'")}
    registry.recommend({"best_measured_run": {"shape": SHAPE, "config_key": trained[60]["config_key"]}})
    project_pick = client.get_model_version_by_alias(NAME, "recommended").version

    monkeypatch.setenv("DRSCALING_STUDY", "mydata")
    cfg = trained[60]["cfg"]
    run = train(cfg, Paths(prepared, annotations, tokenizer_dir, tmp_path / "study-run"))
    scoped = f"drscaling-mydata-{SHAPE}"
    assert [v.run_id for v in client.search_model_versions(f"name = '{scoped}'")] == [run["run_id"]]
    assert {v.version for v in client.search_model_versions(f"name = '{NAME}'")} == project_versions

    picked = registry.recommend({"shapes": {"best": {"shape": SHAPE}}})
    assert picked["uri"] == f"models:/{scoped}@recommended"
    assert client.get_model_version_by_alias(scoped, "recommended").run_id == run["run_id"]
    assert client.get_model_version_by_alias(NAME, "recommended").version == project_pick


def _costs(*points: dict) -> dict:
    return {"device": "CPU test", "device_hour_usd": 3.93, "measured_at": "2026-11-27T11:47:15+00:00", "repeats": 3,
            "inference": {"points": list(points), "fit": {"a": 1e-14, "b": 1.0}}}


def test_measured_costs_go_on_the_cards_of_measured_shapes_only(trained, tmp_path):
    """Triton tokens/s and $ per million tokens on the card of every version of a measured shape (its
    description, tags and the run's model_card.json), naming the costs file; nothing for a shape the
    costs file did not measure, nor for a measured model of another N."""
    client = mlflow.MlflowClient()
    n = trained[60]["n"]
    path = tmp_path / "costs.json"
    other = {"shape": "bert-L4-H256", "n": 3_000_000, "tokens_per_s": 900.0, "usd_per_million_tokens": 1.2}
    not_ours = {"shape": SHAPE, "n": n + 1, "tokens_per_s": 1.0, "usd_per_million_tokens": 1.0}
    for costs in (_costs(other), _costs(not_ours)):
        path.write_text(json.dumps(costs))
        assert registry.add_costs(costs, path) == []
    for r in trained.values():
        v = {v.tags["config_key"]: v for v in client.search_model_versions(f"name = '{NAME}'")}[r["config_key"]]
        assert "tokens_per_s" not in v.tags and "Triton throughput" not in v.description
        card = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{r['run_id']}/model_card.json")).read_text())
        assert "tokens_per_s" not in card

    ours = {"shape": SHAPE, "n": n, "tokens_per_s": 12345.6, "usd_per_million_tokens": 0.0884}
    costs = _costs(other, ours)
    path.write_text(json.dumps(costs))
    updated = registry.add_costs(costs, path)
    assert sorted(u["version"] for u in updated) == sorted(
        str(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))
    for r in trained.values():
        v = {v.tags["config_key"]: v for v in client.search_model_versions(f"name = '{NAME}'")}[r["config_key"]]
        assert v.tags["tokens_per_s"] == "12345.6" and v.tags["usd_per_million_tokens"] == "0.0884"
        assert str(path) in v.tags["costs_source"] and "2026-11-27T11:47:15" in v.tags["costs_source"]
        assert "| Triton throughput (tokens/s) | 1.235e+04 |" in v.description
        assert "| $ per million tokens | 0.0884 |" in v.description and str(path) in v.description
        assert f"| D (training pairs) | {r['d']} |" in v.description  # the rest of the card kept
        card = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{r['run_id']}/model_card.json")).read_text())
        assert card["tokens_per_s"] == 12345.6 and card["usd_per_million_tokens"] == 0.0884
        assert card["ce_test"] == r["ce_test_at_best_dev"]
    assert registry.add_costs(costs, path) == []  # the same costs again: nothing to rewrite


def _log_new_datasets_at_once(uri: str, experiment_id: str, path: str, digests: list[str], barrier, results) -> None:
    """One worker: a run of its own, then each dataset logged the moment every worker is ready."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        failures = []
        for digest in digests:
            barrier.wait()
            try:
                registry.log_dataset(path, digest, "training", name="concurrent")
            except Exception as exc:  # reported to the test, which names it
                failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        results.put((run.info.run_id, failures))


def _use_new_experiments_at_once(uri: str, names: list[str], barrier, results) -> None:
    """One worker: each experiment made active (created and tagged) the moment every worker is ready."""
    mlflow.set_tracking_uri(uri)
    failures = []
    for name in names:
        barrier.wait()
        try:
            tracking.use_experiment(name)
        except Exception as exc:  # reported to the test, which names it
            failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    results.put((None, failures))


def _at_once(target, *args, workers: int = 4) -> list:
    """`target(*args, barrier, results)` in `workers` spawned processes; what each put on `results`."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return outcomes


def test_runs_logging_one_new_dataset_at_once_all_link_to_it(tmp_path):
    """Ray workers (or sweeps run side by side) log the same new dataset at the same moment. The store checks, then
    inserts, so all but one insert fail on the dataset's key (seen in the Ray grid test); every run
    must still end up linked to the one dataset entry. Without the retry, most rounds fail."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("concurrent-datasets")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "q", "passage": "p"}\n')
    digests = [f"{i:04d}" + "0" * 32 for i in range(12)]
    outcomes = _at_once(_log_new_datasets_at_once, uri, experiment_id, str(data), digests)
    assert [f for _, f in outcomes if f] == []
    client = mlflow.MlflowClient(uri)
    for run_id, _ in outcomes:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert sorted(i.dataset.digest for i in inputs) == sorted(digests)
    runs = client.search_runs([experiment_id])
    entries = {(i.dataset.name, i.dataset.digest) for r in runs for i in r.inputs.dataset_inputs}
    assert len(entries) == len(digests)  # one dataset entry per digest, shared by all runs


def test_processes_starting_one_new_experiment_at_once_all_use_it(tmp_path):
    """Sweeps started side by side create and tag the same experiment at once; the tag's insert races
    like a dataset's (without the retry 1-2 of 12 rounds failed per worker). Each ends with one
    experiment per name, tagged for the UI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = [f"concurrent-{i}" for i in range(12)]
    mlflow.MlflowClient(uri).search_experiments()  # the store's schema, made once (as any earlier run has)
    outcomes = _at_once(_use_new_experiments_at_once, uri, names)
    assert [f for _, f in outcomes if f] == []
    experiments = mlflow.MlflowClient(uri).search_experiments(filter_string="name LIKE 'concurrent-%'")
    assert sorted(e.name for e in experiments) == sorted(names)
    key, value = tracking.EXPERIMENT_KIND
    assert all(e.tags.get(key) == value for e in experiments)
