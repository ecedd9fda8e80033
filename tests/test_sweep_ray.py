"""Sweeps and corpus indexes on a Ray cluster: a real two-node Ray cluster on 127.0.0.1 (a head and a second
node process joining it) and a real `mlflow server` with its basic-auth app, a SQLite backend and a shared
artifact folder; the indexes are compared with a real Triton server's. Everything started here is stopped
here (the whole process session of each daemon)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import CORPUS
from conftest import MODEL

from drscaling.errors import DrscalingError
from drscaling.checkpoints import resolve_start
from drscaling.executors import RayConfig, finished_point
from drscaling.files import read_json, read_jsonl
from drscaling.serving import build_index, encode_texts, free_ports, search
from drscaling.serving.client import resolve_tower
from drscaling.serving.index_ray import RayIndexConfig, RepositoryModels, build_index_ray, load_encoder, model_files
from drscaling.sweep import Preset, run_sweep
from drscaling.train.config import Paths
from drscaling.train.data import data_key
from drscaling.vector_index import config_from

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[1] / "src"
USER, PASSWORD = "admin", "a-test-password-1"
TINY = {"steps": 8, "batch_size": 8, "negatives": 16, "max_query_len": 16, "max_passage_len": 24, "lr": 0.001,
        "warmup_steps": 2, "eval_every": 8, "checkpoint_every": 8, "dim": 32,
        "eval": {"negatives": 64, "draws": 2, "max_query_len": 16, "max_passage_len": 24, "rank_pool": 400}}


def _start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A daemon in its own session, niced: the machine's cores belong to the tests."""
    return subprocess.Popen(["nice", "-n", "19", *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env or os.environ.copy(), start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to every process of the daemon's session (Ray's raylet, GCS and workers)."""
    def members() -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == proc.pid and fields[0] != "Z":  # the session id; a zombie is already gone
                out.append(int(stat.parent.name))
        return out

    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for pid in members():
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while proc.poll() is None or members():  # poll reaps the leader, which is not waited for otherwise
            if time.time() > deadline:
                break
            time.sleep(0.5)
    proc.wait(timeout=10)


def _start_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server --app-name basic-auth`: SQLite backend, artifacts in a folder every worker reaches."""
    (root / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {USER}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = os.environ | {"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"}
    return _start([str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
                   "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root",
                   str(root / "artifacts"), "--workers", "1"], root / "server.log", env)


def _wait_server(proc: subprocess.Popen, port: int, log: Path) -> str:
    uri = f"http://127.0.0.1:{port}"
    _wait_port(port, proc, log)
    for _ in range(300):  # the port opens before the app has started
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=10)
            break
        except OSError:
            time.sleep(1)
    return uri


def _join_node(address: str, node: list[str], procs: list, tmp: Path, env: dict) -> None:
    """Wait until the second node is up. Ray gives a raylet 30 s to register: on a loaded machine a
    node may need another try."""
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        for _ in range(1200):
            if sum(n["Alive"] for n in ray.nodes()) == 2:
                return
            if procs[-1].poll() is not None and len(procs) < 5:
                procs.append(_start(node, tmp / f"node{len(procs)}.log", env))
            time.sleep(0.5)
        raise AssertionError((tmp / "node.log").read_text()[-3000:])
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """The tracking server, a Ray head with 2 CPUs and a second node with 1 CPU, all on 127.0.0.1,
    started together. The nodes hold the credentials in their environment, as the README's recipe
    does; the code comes from PYTHONPATH."""
    # Ray's temp dir short: its sockets' paths must fit AF_UNIX's 107 bytes, which an xdist worker's
    # tmp_path (/tmp/pytest-of-<user>/pytest-N/popen-gwK/ray0/session_<date>_<pid>/sockets/...) did not
    root, tmp = tmp_path_factory.mktemp("server"), Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    server_port, port = free_ports(2)  # together: ports drawn one at a time can repeat
    server = _start_server(root, server_port)
    # RAY_AUTH_MODE: without it, a ~/.ray/auth_token (which a local `ray.init()` writes) makes the head demand it
    env = os.environ | {"PYTHONPATH": str(SRC), "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD,
                        "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
    common = ["--node-ip-address", "127.0.0.1", "--block", "--disable-usage-stats"]
    def head(port: int) -> list[str]:
        return [str(BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2", "--temp-dir", str(tmp),
                "--include-dashboard=false", *common]

    procs = [server, _start(head(port), tmp / "head.log", env)]
    try:
        for attempt in range(4):  # a raylet has 30 s to register: on a loaded machine the head may need another try
            try:
                _wait_head(procs[1], tmp / ("head.log" if attempt == 0 else f"head{attempt}.log"))
                break
            except AssertionError:
                if attempt == 3:
                    raise
                _stop(procs[1])
                [port] = free_ports(1)  # a fresh port: the last one may have been taken meanwhile
                procs[1] = _start(head(port), tmp / f"head{attempt + 1}.log", env)
        address = f"127.0.0.1:{port}"
        node = [str(BIN / "ray"), "start", "--address", address, "--num-cpus", "1", *common]
        procs.append(_start(node, tmp / "node.log", env))
        uri = _wait_server(server, server_port, root / "server.log")
        _join_node(address, node, procs, tmp, env)
        yield uri, address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(services) -> str:
    return services[0]


@pytest.fixture(scope="module")
def cluster(services) -> str:
    return services[1]


def _wait_head(proc: subprocess.Popen, log: Path) -> None:
    """Until `ray start --head` says it is up (its port opens before its raylet has registered)."""
    for _ in range(3600):
        if "Ray runtime started" in log.read_text():
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"the Ray head did not start: {log.read_text()[-3000:]}")


def _wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    for _ in range(1800):  # minutes on a loaded 2-core machine, seconds on an idle one
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    raise AssertionError(f"nothing listens on {port}: {log.read_text()[-3000:]}")


@pytest.fixture
def on_server(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    mlflow.set_tracking_uri(server)
    return server


def _paths(prepared, annotations, tokenizer_dir) -> Paths:
    return Paths(prepared=prepared, annotations=annotations, tokenizer=tokenizer_dir, out=Path("unused"))


def _train_runs(parent_id: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.`drscaling.stage` = 'train'")


def _parent(out: Path, label: str) -> str:
    return read_json(out / f"parent-{label}.json")["run_id"]


def test_dead_tracking_server_or_ray_address_fails_before_training(server, prepared, annotations, tokenizer_dir,
                                                                    tmp_path, monkeypatch, refused_port):
    preset = Preset("dead", train=TINY, joint={"shapes": ["bert-L2-H128"], "train_pairs": [50]})
    paths = _paths(prepared, annotations, tokenizer_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{refused_port}")
    t0 = time.time()
    with pytest.raises(DrscalingError, match="tracking server at http://127.0.0.1:.* did not answer"):
        run_sweep(preset, paths, {}, tmp_path, executor="ray", ray=RayConfig(address="127.0.0.1:1"))
    assert time.time() - t0 < 30
    # the server is up but refuses a client without credentials
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    with pytest.raises(DrscalingError, match="refused.*MLFLOW_TRACKING_USERNAME"):
        run_sweep(preset, paths, {}, tmp_path, executor="ray", ray=RayConfig(address="127.0.0.1:1"))
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{server}/api/2.0/mlflow/experiments/search?max_results=1")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with pytest.raises(DrscalingError, match="no Ray cluster answers at 127.0.0.1:1"):
        run_sweep(preset, paths, {}, tmp_path, executor="ray", ray=RayConfig(address="127.0.0.1:1"))
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_ray_sweep_one_finished_run_per_point_same_as_local_and_never_twice(
        cluster, on_server, prepared, annotations, tokenizer_dir, tmp_path, monkeypatch, mlflow_store):
    preset = Preset("grid", train=TINY, joint={"shapes": ["bert-L2-H128", "bert-L4-H128"], "train_pairs": [50, 100]})
    paths = _paths(prepared, annotations, tokenizer_dir)
    out = tmp_path / "ray"
    path = run_sweep(preset, paths, {}, out, "joint", executor="ray", ray=RayConfig(address=cluster))
    rows = read_jsonl(path)
    assert [(r["shape"], r["d"]) for r in rows] == [("bert-L2-H128", 50), ("bert-L2-H128", 100),
                                                   ("bert-L4-H128", 50), ("bert-L4-H128", 100)]  # grid order
    runs = _train_runs(_parent(out, "grid-joint"))
    assert sorted(r.data.tags["config_key"] for r in runs) == sorted(r["config_key"] for r in rows)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.tags.get("data_key") and r.data.tags.get("ray_node") for r in runs)
    for r in runs:  # the credentials the workers used are nowhere in the runs
        assert PASSWORD not in str(r.data.params) + str(r.data.tags)
    ids = read_json(out / "runs-joint.json")
    assert set(ids.values()) == {r.info.run_id for r in runs}

    # one shape of the grid through the local executor (another store, another folder): the same
    # results (one shape keeps the suite short; it covers both data sizes)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    one = Preset("grid", train=TINY, joint={"shapes": ["bert-L4-H128"], "train_pairs": [50, 100]})
    local = read_jsonl(run_sweep(one, paths, {}, tmp_path / "local", "joint"))
    assert [(r["shape"], r["d"]) for r in local] == [("bert-L4-H128", 50), ("bert-L4-H128", 100)]
    for a, b in zip(rows[2:], local, strict=True):
        assert {k: v for k, v in a.items() if k != "model_dir"} == pytest.approx(
            {k: v for k, v in b.items() if k != "model_dir"}, rel=1e-4)

    # rerun: every point is found on the tracking server, nothing trains, the results are the same
    monkeypatch.setenv("MLFLOW_TRACKING_URI", on_server)
    stamps = {p: p.stat().st_mtime for p in out.glob("runs/*/metrics.json")}
    again = read_jsonl(run_sweep(preset, paths, {}, out, "joint", executor="ray", ray=RayConfig(address=cluster)))
    assert again == rows
    assert len(_train_runs(_parent(out, "grid-joint"))) == 4
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/metrics.json")} == stamps


def test_killed_worker_is_retried_and_a_failing_point_is_reported(cluster, on_server, prepared, annotations,
                                                                   tokenizer_dir, tmp_path):
    """SIGKILL the worker that trains one point mid-run: Ray retries it, its run ends FINISHED (no
    duplicate, nothing left RUNNING). A point with more pairs than exist fails alone, FAILED with its cause."""
    train = TINY | {"steps": 40, "eval_every": 20, "checkpoint_every": 10, "seed": 7}
    preset = Preset("faults", train=train, data={"shape": "bert-L2-H128", "train_pairs": [60, 99999]})
    out = tmp_path / "faults"
    killed: list[int] = []

    def kill_first_worker() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            for run_file in out.glob("runs/*/run.json"):
                lock = (run_file.parent / ".lock").read_text().strip() if (run_file.parent / ".lock").exists() else ""
                if lock.startswith("pid "):
                    os.kill(int(lock.split()[1]), signal.SIGKILL)
                    killed.append(int(lock.split()[1]))
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    with pytest.raises(DrscalingError, match=r"(?s)1 of 2 points failed.*D=99999.*only \d+ pairs"):
        run_sweep(preset, _paths(prepared, annotations, tokenizer_dir), {}, out, "data", executor="ray",
                  ray=RayConfig(address=cluster, max_retries=2))
    killer.join(timeout=5)
    assert killed, "no worker was killed: the test did not exercise a retry"
    runs = _train_runs(_parent(out, "faults-data"))
    by_status = sorted((r.info.status, r.data.tags.get("error", "")[:40]) for r in runs)
    assert [s for s, _ in by_status] == ["FAILED", "FINISHED"], by_status  # one run each: the retry resumed it
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert "train_pairs=99999" in failed.data.tags["error"]
    assert (next(out.glob("runs/*/metrics.json"))).exists()
    finished = next(r for r in runs if r.info.status == "FINISHED")  # the adopted run, tagged as a fresh one is
    assert finished.data.tags["config_key"] == read_json(next(out.glob("runs/*/metrics.json")))["config_key"]


def _init_checkpoint(tokenizer_dir: Path, folder: Path, seed: int) -> Path:
    """A tiny L2/H128 BERT saved as a named --init folder."""
    import torch
    from transformers import BertConfig, BertModel

    from drscaling.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_point_from_a_named_init_checkpoint_is_found_from_another_machine(cluster, on_server, prepared, annotations,
                                                                             tokenizer_dir, tmp_path):
    """The cluster-wide lookup keys a point as train() tags it, the init checkpoint's weights included: a
    second driver with an empty output folder (another machine) trains nothing; other weights under the
    same name are another point."""
    init = _init_checkpoint(tokenizer_dir, tmp_path / "init", seed=0)
    preset = Preset("init", train=TINY | {"init": str(init)}, data={"shape": "bert-L2-H128", "train_pairs": [50]})
    paths = _paths(prepared, annotations, tokenizer_dir)
    # 2 CPUs (the head's): the point trains on 2 threads, though the node probe before it ran in a worker
    # with OMP_NUM_THREADS=1 that Ray may reuse (torch reads that variable once, at import)
    ray = RayConfig(address=cluster, num_cpus=2)
    [first] = read_jsonl(run_sweep(preset, paths, {}, tmp_path / "a", "data", executor="ray", ray=ray))
    [run] = _train_runs(_parent(tmp_path / "a", "init-data"))
    assert run.data.tags["init_checkpoint"] == str(init) and first["init_hash"] in run.data.tags["data_key"]
    assert run.data.tags["torch_threads"] == "2"

    other = tmp_path / "b"  # another machine: nothing in its output folder
    [again] = read_jsonl(run_sweep(preset, paths, {}, other, "data", executor="ray", ray=RayConfig(address=cluster)))
    assert _train_runs(_parent(other, "init-data")) == []  # found on the tracking server: not trained again
    assert {k: v for k, v in again.items() if k != "model_dir"} == {k: v for k, v in first.items() if k != "model_dir"}
    assert (other / "runs" / first["config_key"] / "metrics.json").exists()

    _init_checkpoint(tokenizer_dir, init, seed=1)  # other weights under the same name
    start = resolve_start("bert-L2-H128", str(init))
    assert finished_point(first["config_key"], data_key(paths, "human", start)) is None


# ---------------------------------------------------------------------------------------------
# drscaling index --executor ray
# ---------------------------------------------------------------------------------------------


def _corpus(path: Path, rows: list[dict], blank_at: int = -1) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_at >= 0:
        lines.insert(blank_at, "")  # skipped, as build_index skips it
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_index_on_ray_writes_the_triton_index(cluster, triton, tmp_path):
    """Ray Data actors on both nodes run the repository's graph in-process: the same files as the Triton
    build (pids, passages, index.json), embeddings equal to 1e-5, the same top-k for every query."""
    from drscaling.cli import main

    texts = sorted(set(CORPUS))
    rows = [{"pid": 1000 - i, "text": f"{texts[i % len(texts)]} {'é' * (i % 3)} {i} " * (1 + i % 4)} for i in range(150)]
    corpus = _corpus(tmp_path / "corpus.jsonl", rows, blank_at=40)
    local = build_index(triton, MODEL, corpus, tmp_path / "local", batch_size=16)  # the server takes 16 at most
    out = tmp_path / "ray"
    assert main(["index", "--executor", "ray", "--ray-address", cluster, "--repo", str(triton.repo_dir), "--model", MODEL,
                 "--corpus", str(corpus), "--out", str(out), "--concurrency", "2", "--num-gpus", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
    for name in ("pids.json", "passages.jsonl", "index.json"):
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert json.loads((out / "pids.json").read_text())[:2] == ["1000", "999"]  # corpus order
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), np.load(tmp_path / "local" / "embeddings.npy"),
                               rtol=0, atol=1e-5)
    assert json.loads((out / "index.json").read_text()) == local
    for query in (texts[0], texts[3], "package manager"):
        assert [h[0] for h in search(triton, MODEL, out, query, k=5)] == \
            [h[0] for h in search(triton, MODEL, tmp_path / "local", query, k=5)]


def test_an_index_actor_loads_the_served_graph_and_keeps_no_files(triton):
    """What each actor loads embeds as Triton does, and its files are gone once loaded: Ray ends actors
    without running finalizers, so files kept for the actor's life stayed in the temp folder."""
    models = RepositoryModels(triton.repo_dir)
    info = models.info(resolve_tower(models, MODEL, "passage"))
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("drscaling-index-*"))
    encode = load_encoder(model_files(triton.repo_dir, info), 16, 1, ["CPUExecutionProvider"])
    assert set(temp.glob("drscaling-index-*")) == before, "the actor's copy of the graph and tokenizer stayed"
    texts = sorted(set(CORPUS))[:5]
    np.testing.assert_allclose(encode(texts, info.max_len("passage")), encode_texts(triton, MODEL, texts),
                               rtol=0, atol=1e-5)


def test_index_on_ray_bad_input_fails_before_encoding(cluster, triton, tmp_path, refused_port):
    repo, corpus = triton.repo_dir, _corpus(tmp_path / "c.jsonl", [{"pid": "a", "text": "x"}, {"pid": "b", "text": "y"}])
    out = tmp_path / "out"
    t0, dead = time.time(), f"127.0.0.1:{refused_port}"
    with pytest.raises(DrscalingError, match=f"no Ray cluster answers at {dead}"):
        build_index_ray(repo, MODEL, corpus, out, RayIndexConfig(address=dead))
    assert time.time() - t0 < 30 and not out.exists()
    live = RayIndexConfig(address=cluster)
    for rows, match in (([{"pid": "a", "text": "x"}, {"pid": "a", "text": "y"}], "duplicate pid 'a'"),
                        ([{"pid": "a", "text": "x"}, {"pid": "b", "text": 3}], "every 'text' must be a string"),
                        ([{"pid": "a"}], "line 1 lacks the field.s. text")):
        with pytest.raises(DrscalingError, match=match):
            build_index_ray(repo, MODEL, _corpus(tmp_path / "bad.jsonl", rows), out, live)
        assert not out.exists()
    with pytest.raises(DrscalingError, match=f"model 'nope' is not in the repository.*{MODEL}"):
        build_index_ray(repo, "nope", corpus, out, live)
    with pytest.raises(DrscalingError, match="is a text model: name the encoder it wraps"):
        build_index_ray(repo, f"{MODEL}-text", corpus, out, live)
    with pytest.raises(DrscalingError, match="nlist 5 exceeds the 2 passages"):
        build_index_ray(repo, MODEL, corpus, out, live, config_from(index_type="ivf", nlist=5))
    assert not out.exists()
