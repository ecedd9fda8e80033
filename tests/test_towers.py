"""Dual towers in deployment: ONNX export of both towers, two Triton models, role-aware clients,
per-tower latency/throughput, and the budget's deployment comparison. Real torch, onnxruntime,
tritonserver and MLflow (sqlite in tmp); tiny random-weight towers of two different shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS

from drscaling import vector_index
from drscaling.budget import (
    TowerCostTable, TowerWorkload, compare_towers, format_tower_comparison, read_tower_metrics,
    run_tower_budget,
)
from drscaling.budget.result import TowerBudgetResult
from drscaling.costs import combine, measure
from drscaling.errors import DrscalingError
from drscaling.export import export_onnx, ort_encode_fn, ort_session, quality_delta
from drscaling.model.retriever import Retriever, Tower, encode
from drscaling.model.saved import load_retriever
from drscaling.model.tokenizer import load_tokenizer
from drscaling.serving import (
    TritonServer, build_index, build_model_repository, build_tower_repository, encode_texts,
    resolve_tower, search, Client,
)

QUERY_SHAPE, PASSAGE_SHAPE, DIM = "bert-L2-H128", "bert-L4-H128", 16
SHORT = {"duration_s": 0.4, "warmup_s": 0.1, "query_seq_len": 8, "query_concurrency": (1, 2),
         "passage_batch": 8, "passage_seq_len": 16, "passage_concurrency": (1,), "repeats": 1}


def make_towers(dest: Path, query_dim: int = DIM, passage_dim: int = DIM) -> Path:
    from drscaling.model.build import build_model
    from drscaling.model.saved import save_retriever
    from drscaling.model.tokenizer import train_tokenizer

    tok = train_tokenizer(CORPUS, 200, dest.parent / f"tok-{dest.name}")
    q, q_meta = build_model(QUERY_SHAPE, tok, dim=query_dim, max_positions=64, seed=1)
    p, p_meta = build_model(PASSAGE_SHAPE, tok, dim=passage_dim, max_positions=64, seed=2)
    save_retriever(Retriever(Tower(q, tok, q_meta), Tower(p, tok, p_meta)), dest)
    return dest


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> Path:
    return make_towers(tmp_path_factory.mktemp("towers") / "model")


@pytest.fixture(scope="module")
def towers_onnx(towers) -> Path:
    out = towers.parent / "onnx"
    export_onnx(towers, out, variants=("fp32",))
    return out


@pytest.fixture(scope="module")
def towers_server(towers_onnx):
    repo = towers_onnx.parent / "repo"
    build_tower_repository(towers_onnx, repo, "pair", max_batch_size=16)
    server = TritonServer(repo).start()
    yield server
    server.stop()


def test_export_dual_towers(towers, towers_onnx, mlflow_tmp):
    record = json.loads((towers_onnx / "towers.json").read_text())
    assert record["dim"] == DIM and set(record["towers"]) == {"query", "passage"}
    assert record["towers"]["query"]["shape"] == QUERY_SHAPE
    assert record["towers"]["passage"]["shape"] == PASSAGE_SHAPE
    retriever = load_retriever(towers)
    texts = CORPUS[:5] + ["x"]
    for side in ("query", "passage"):
        folder = towers_onnx / side
        assert (folder / "model.onnx").exists() and (folder / "tokenizer" / "tokenizer.json").exists()
        assert record["towers"][side]["variants"]["fp32"]["parity"]["max_abs_diff"] <= 1e-4
        tower = getattr(retriever, side)
        ref = encode(tower.encoder, tower.tokenizer, texts, max_len=40)
        got = ort_encode_fn(ort_session(folder / "model.onnx"), tower.tokenizer, batch_size=4)(texts, 40)
        assert np.abs(got - ref).max() <= 1e-4
    # The towers really are different encoders.
    q = ort_encode_fn(ort_session(towers_onnx / "query" / "model.onnx"), retriever.query.tokenizer)(texts, 40)
    p = ort_encode_fn(ort_session(towers_onnx / "passage" / "model.onnx"), retriever.passage.tokenizer)(texts, 40)
    assert np.abs(q - p).max() > 1e-3

    # Quality of a dual export: the metric gets the query and the passage encode function.
    copy = towers_onnx.parent / "onnx-quality"
    shutil.copytree(towers_onnx, copy)

    def mean_score(query_fn, passage_fn) -> float:
        return float((query_fn(CORPUS[:6], 16) * passage_fn(CORPUS[:6], 32)).sum(1).mean())

    with mlflow_tmp.start_run() as run:
        export_onnx(towers, towers_onnx.parent / "onnx-logged")
        result = quality_delta(copy, mean_score, model_dir=towers)
    assert abs(result["variants"]["fp32"]["delta"]) < 1e-4
    assert json.loads((copy / "towers.json").read_text())["quality"] == result
    metrics = mlflow_tmp.get_run(run.info.run_id).data.metrics
    assert metrics["query_onnx_fp32_max_abs_diff"] <= 1e-4
    assert metrics["passage_onnx_fp32_max_abs_diff"] <= 1e-4


def test_mismatched_dims_and_wrong_folders(tmp_path, towers_onnx):
    bad = make_towers(tmp_path / "bad", query_dim=16, passage_dim=24)
    with pytest.raises(DrscalingError, match="query tower embeds in 16 dimensions but the passage tower in 24"):
        export_onnx(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # An export folder whose towers disagree (edited by hand): the repository refuses it whole.
    edited = tmp_path / "edited"
    shutil.copytree(towers_onnx, edited)
    meta = json.loads((edited / "passage" / "drscaling.json").read_text())
    (edited / "passage" / "drscaling.json").write_text(json.dumps(meta | {"dim": 8}))
    with pytest.raises(DrscalingError, match="16 dimensions but the passage tower in 8"):
        build_tower_repository(edited, tmp_path / "repo", "x")
    assert not (tmp_path / "repo").exists()
    with pytest.raises(DrscalingError, match="not a dual-tower export"):
        build_tower_repository(towers_onnx / "query", tmp_path / "repo", "x")
    with pytest.raises(DrscalingError, match="build it with build_tower_repository"):
        build_model_repository(towers_onnx, tmp_path / "repo", "x")
    shutil.rmtree(edited / "passage" / "tokenizer")
    (edited / "passage" / "drscaling.json").write_text(json.dumps(meta))
    with pytest.raises(DrscalingError, match="not an export folder"):
        build_tower_repository(edited, tmp_path / "repo", "x")
    assert not (tmp_path / "repo").exists()  # the query tower was not written either


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_towers_by_role(towers_server, towers_onnx, protocol):
    repo = towers_server.repo_dir
    for side in ("query", "passage"):
        cfg = (repo / f"pair-{side}" / "config.pbtxt").read_text()
        assert f'string_value: "{side}"' in cfg and 'string_value: "pair"' in cfg
    texts = CORPUS[:4]
    for side in ("query", "passage"):
        tok = load_tokenizer(towers_onnx / side / "tokenizer")
        max_len = 32 if side == "query" else 64  # the towers' query length; passage length capped at 64 positions
        ref = ort_encode_fn(ort_session(towers_onnx / side / "model.onnx"), tok)(texts, max_len)
        by_pair = encode_texts(towers_server, "pair", texts, protocol=protocol, role=side)
        by_name = encode_texts(towers_server, f"pair-{side}", texts, protocol=protocol, role=side)
        assert np.abs(by_pair - ref).max() <= 1e-5 and np.abs(by_name - ref).max() <= 1e-5
        # A plain URL (the CLI): each tower's tokenizer comes from the repository the server runs on.
        by_url = encode_texts(towers_server.url(protocol), "pair", texts, protocol=protocol, role=side, repo=repo)
        assert np.abs(by_url - ref).max() <= 1e-5
        # Triton tokenising: the tower's own text ensemble (pair-<side>-text), the same embeddings
        by_text = encode_texts(towers_server.url(protocol), "pair", texts, protocol=protocol, role=side,
                               server_tokenize=True)
        np.testing.assert_array_equal(by_text, by_url)
    with pytest.raises(DrscalingError, match="no tokenizer for model 'pair-query'.*--repo"):
        encode_texts(towers_server.url(protocol), "pair", texts, protocol=protocol, role="query")
    with Client(towers_server, protocol) as client:
        assert resolve_tower(client, "pair", "query") == "pair-query"
        with pytest.raises(DrscalingError, match="'pair-passage' is the passage tower of 'pair'.*'pair-query'"):
            resolve_tower(client, "pair-passage", "query")
        with pytest.raises(DrscalingError, match="not ready"):
            resolve_tower(client, "nope", "query")


def test_index_and_search_with_towers(towers_server, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    passages = sorted(set(CORPUS))
    corpus.write_text("".join(json.dumps({"pid": f"p{i}", "text": t}) + "\n" for i, t in enumerate(passages)))
    meta = build_index(towers_server, "pair", corpus, tmp_path / "index", protocol="grpc")
    assert (meta["model"], meta["query_model"], meta["tower"]) == ("pair-passage", "pair-query", "passage")
    emb = np.load(tmp_path / "index" / "embeddings.npy")
    q = encode_texts(towers_server, "pair-query", [passages[1]], role="query")[0]
    expected = [f"p{i}" for i in np.argsort(-(emb @ q))[:3]]
    for model in ("pair", "pair-query"):  # the pair's name or its query tower
        hits = search(towers_server, model, tmp_path / "index", passages[1], k=3)
        assert [h[0] for h in hits] == expected
    with pytest.raises(DrscalingError, match="passage tower of 'pair': query it with 'pair-query'"):
        search(towers_server, "pair-passage", tmp_path / "index", "q")
    # An index of another dimension than the query tower: a clear error, not a numpy one.
    vector_index.save(vector_index.build(np.ones((len(passages), 8), np.float32)), tmp_path / "index" / "faiss.index")
    with pytest.raises(DrscalingError, match="embeds in 16 dimensions but the index"):
        search(towers_server, "pair", tmp_path / "index", "q")


def test_measure_towers(towers_server, mlflow_tmp, tmp_path):
    out = tmp_path / "load.json"
    result = measure(towers_server, out_path=out, device_hour_usd=3.6, **SHORT)
    saved = json.loads(out.read_text())
    by_role = {t["tower"]: t for t in saved["towers"]}
    q, p = by_role["query"], by_role["passage"]
    assert (q["model"], q["shape"], q["batch"], q["seq_len"]) == ("pair-query", QUERY_SHAPE, 1, 8)
    assert [x["concurrency"] for x in q["latency"]] == [1, 2]
    for x in q["latency"]:
        assert 0 < x["p50_ms"] <= x["p99_ms"] and x["queries_per_s"] > 0
    assert [(c["batch"], c["concurrency"]) for c in saved["sweep"]["pair-query"]] == [(1, 1), (1, 2)]
    assert (p["model"], p["shape"], p["batch"], p["seq_len"]) == ("pair-passage", PASSAGE_SHAPE, 8, 16)
    assert p["tokens_per_s"] == pytest.approx(p["passages_per_s"] * 16)
    assert p["usd_per_million_tokens"] == pytest.approx(3.6 / 3600 / p["tokens_per_s"] * 1e6)
    # The throughput fit holds the passage tower only (queries are a latency operating point).
    assert [pt["shape"] for pt in result["inference"]["points"]] == [PASSAGE_SHAPE]
    costs = combine(result, None).to_dict()
    assert {t["tower"] for t in costs["towers"]} == {"query", "passage"}
    runs = mlflow_tmp.search_runs(search_all_experiments=True, output_format="list")
    child = {r.data.params["model"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert child["pair-query"].data.metrics["query_p99_ms_c2"] == pytest.approx(q["latency"][1]["p99_ms"])
    assert child["pair-passage"].data.metrics["passages_per_s"] == pytest.approx(p["passages_per_s"])
    with pytest.raises(DrscalingError, match="exceeds the 64 positions of model 'pair-passage'"):
        measure(towers_server, log_mlflow=False, **(SHORT | {"passage_seq_len": 100}))


# ---------------------------------------------------------------------------------------------
# Budget: the deployment comparison, numbers by hand
# ---------------------------------------------------------------------------------------------

METRICS = {
    "teacher": {"model": "t", "query_shape": "smollm2-135m", "passage_shape": "smollm2-135m",
                "query_n": 1e8, "passage_n": 1e8, "ce": 0.30, "mrr@10": 0.8, "train_usd": 50.0},
    "distilled": {"model": "d", "query_shape": "minilm-L1", "passage_shape": "smollm2-135m",
                  "query_n": 2e6, "passage_n": 1e8, "ce": 0.35, "mrr@10": 0.75, "train_usd": 5.0},
    "end_to_end": {"model": "e", "query_shape": "minilm-L1", "passage_shape": "minilm-L1",
                   "query_n": 2e6, "passage_n": 2e6, "ce": 0.50, "mrr@10": 0.6, "train_seconds": 3600},
}
COSTS = {
    "device_hour_usd": 2.0, "device": "test",
    "inference": {"points": [{"shape": "smollm2-135m", "n": 1e8, "tokens_per_s": 1.0,
                              "usd_per_million_tokens": 10.0}],
                  "fit": {"a": 1e-13, "b": 1.0}},
    "towers": [{"tower": "query", "shape": "minilm-L1", "model": "d-query", "n": 2e6,
                "usd_per_million_tokens": 0.5}],
}
WORK = TowerWorkload(corpus_pages=1e6, tokens_per_page=100, query_volume=1e7, tokens_per_query=10)


def test_tower_budget_by_hand():
    table = TowerCostTable("measured", COSTS)
    r = compare_towers(METRICS, table, budget=1500, workload=WORK)
    rows = {x["name"]: x for x in r["deployments"]}
    # large: smollm2 measured $10/1M tokens both sides: corpus 1e8 tokens -> $1000, queries 1e8 tokens -> $1000
    assert rows["large"]["cost"] == pytest.approx({"annotation": None, "training": 50.0, "corpus": 1000.0,
                                                   "queries": 1000.0, "total": 2050.0, "complete": False})
    # distilled: passage as above ($1000); the query tower measured as a query tower, $0.5/1M -> $50;
    # training = the teacher's 50 + its own 5
    assert rows["distilled"]["cost"]["corpus"] == pytest.approx(1000.0)
    assert rows["distilled"]["cost"]["queries"] == pytest.approx(50.0)
    assert rows["distilled"]["cost"]["training"] == pytest.approx(55.0)
    assert rows["distilled"]["cost"]["total"] == pytest.approx(1105.0)
    assert rows["distilled"]["per_token"]["query"]["source"] == "measured: query tower d-query"
    # small: minilm-L1 passage side: measured only as a query tower -> that number ($0.5/1M): corpus $50;
    # queries $50; training 1 h at $2/h
    assert rows["small"]["cost"]["corpus"] == pytest.approx(50.0)
    assert rows["small"]["cost"]["training"] == pytest.approx(2.0)
    assert rows["small"]["cost"]["total"] == pytest.approx(102.0)
    assert [rows[n]["fits"] for n in ("large", "distilled", "small")] == [False, True, True]
    assert r["best"] == "distilled" and r["ranking"] == ["distilled", "small"] and r["cheapest"] == "small"
    assert r["flags"]  # annotation unknown: said so
    text = format_tower_comparison(r)
    assert "Best within the budget: distilled (large passage tower + distilled small query tower)" in text
    # A bigger budget buys the large model; a tiny one buys nothing.
    assert compare_towers(METRICS, table, 1e4, WORK)["best"] == "large"
    none = compare_towers(METRICS, table, 10, WORK)
    assert none["best"] is None and "No deployment fits the budget; the cheapest is small" in format_tower_comparison(none)


def test_tower_budget_fit_and_paper_costs():
    # No measurement of a shape at all: the fit a * N**b ($1e-13 x 2e6 = $2e-7 per token).
    costs = COSTS | {"towers": [], "inference": COSTS["inference"] | {"points": []}}
    r = compare_towers({"teacher": METRICS["teacher"], "distilled": METRICS["distilled"]},
                       TowerCostTable("measured", costs), 1e9, WORK)
    rows = {x["name"]: x for x in r["deployments"]}
    assert rows["distilled"]["cost"]["queries"] == pytest.approx(1e-13 * 2e6 * 1e8)
    assert rows["distilled"]["per_token"]["query"]["source"].startswith("fit")
    assert "no 'end_to_end' entry" in rows["small"]["note"]
    # Paper costs: 2 FLOPs per parameter per token at $3.93/h, 312 TFLOP/s, 25% utilisation.
    usd_per_flop = 3.93 / (312e12 * 3600 * 0.25)
    r = compare_towers(METRICS, TowerCostTable("paper"), 1e9, WORK)
    large = next(x for x in r["deployments"] if x["name"] == "large")
    assert large["cost"]["corpus"] == pytest.approx(2 * 1e8 * usd_per_flop * 1e8)


def test_tower_budget_files_cli_and_errors(tmp_path, mlflow_tmp):
    from drscaling.cli import main

    metrics, costs = tmp_path / "metrics.json", tmp_path / "costs.json"
    with pytest.raises(DrscalingError, match="run `drscaling distill` first"):
        read_tower_metrics(metrics)
    metrics.write_text(json.dumps({"teacher": METRICS["teacher"]}))
    with pytest.raises(DrscalingError, match="no 'distilled' entry"):
        read_tower_metrics(metrics)
    metrics.write_text(json.dumps(METRICS | {"end_to_end": {"model": "e"}}))
    with pytest.raises(DrscalingError, match="'end_to_end' lacks query_shape"):
        read_tower_metrics(metrics)
    metrics.write_text(json.dumps(METRICS))
    with pytest.raises(DrscalingError, match="costs file not found.*drscaling measure"):
        run_tower_budget(metrics, 1500, "measured", costs, tmp_path / "out", WORK)
    with pytest.raises(DrscalingError, match="budget must be a positive"):
        compare_towers(METRICS, TowerCostTable("paper"), -1, WORK)
    with pytest.raises(DrscalingError, match="query_volume"):
        compare_towers(METRICS, TowerCostTable("paper"), 1, TowerWorkload(query_volume=-1))
    assert not (tmp_path / "out").exists()
    costs.write_text(json.dumps(COSTS))
    code = main(["budget", "--towers", str(metrics), "--costs", "measured", "--costs-path", str(costs),
                 "--budget", "1500", "--corpus-pages", "1e6", "--tokens-per-page", "100",
                 "--query-volume", "1e7", "--tokens-per-query", "10", "--out", str(tmp_path / "out")])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "towers.json").read_text())
    assert saved["best"] == "distilled" and saved["workload"]["query_volume"] == 1e7
    # towers.json read into TowerBudgetResult and written again: the same bytes; a malformed one names the field.
    typed = TowerBudgetResult.read(tmp_path / "out" / "towers.json")
    assert typed.best == "distilled" and typed.costs_path == str(costs)
    typed.write(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "out" / "towers.json").read_bytes()
    (tmp_path / "bad.json").write_text(json.dumps(saved | {"deployments": {}}))
    with pytest.raises(DrscalingError, match="bad.json: malformed 'deployments'"):
        TowerBudgetResult.read(tmp_path / "bad.json")
    run = next(r for r in mlflow_tmp.search_runs(search_all_experiments=True, output_format="list")
               if r.data.tags.get("drscaling.towers"))
    assert run.data.tags["best_deployment"] == "distilled"
    assert run.data.metrics["distilled_total_usd"] == pytest.approx(1105.0)
    assert main(["budget", "--towers", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o2")]) == 2
    # The distillation's own run time stands in for the distilled entry's missing training time.
    distilled = {k: v for k, v in METRICS["distilled"].items() if k != "train_usd"}
    metrics.write_text(json.dumps(METRICS | {"distilled": distilled, "distill": {"steps": 100, "step_seconds": 0.5}}))
    assert read_tower_metrics(metrics)["distilled"]["train_seconds"] == 50.0


def test_requests_that_outlast_the_window_still_count(towers_server):
    # A large tower's batch can take longer than the whole window (SmolLM2 at batch 32 on a CPU):
    # each thread still completes one counted request, and throughput spans its whole duration.
    from drscaling.loadgen import LoadConfig, run_load

    cell = run_load(towers_server, "pair-passage", 8, 2, LoadConfig(duration_s=1e-4, warmup_s=0.0), seq_len=16)
    assert cell["requests"] >= 2
    assert cell["seconds"] >= cell["p50_ms"] / 1e3
    assert cell["inferences_per_s"] == pytest.approx(cell["requests"] * 8 / cell["seconds"], rel=1e-2)  # seconds is rounded
