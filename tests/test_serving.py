"""Serving: a real tritonserver process (python backend running onnxruntime), real tritonclient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, MODEL, assert_strict_json

from drscaling.errors import DrscalingError
from drscaling.export import ort_encode_fn, ort_session
from drscaling.model.tokenizer import load_tokenizer
from drscaling.serving import (
    TritonServer, build_index, build_model_repository, encode_texts, infer_ids, search,
)
from drscaling.vector_index import config_from

TEXTS = [
    "rsync copies files",
    "what is the GNU C compiler",
    "a real-time strategy game of ancient warfare with a custom engine and detailed artwork",
    "x",
    "Debian package manager",
]


def test_repository_layout(tiny_onnx, tmp_path):  # noqa: F811
    py = build_model_repository(tiny_onnx, tmp_path / "repo", "m", max_queue_delay_us=250)
    cfg = (py / "config.pbtxt").read_text()
    assert 'backend: "python"' in cfg and "max_queue_delay_microseconds: 250" in cfg
    assert 'key: "max_sequence_length"' in cfg and "dims: [ 32 ]" in cfg
    for f in ("model.onnx", "model.py", "tokenizer/tokenizer.json", "drscaling.json"):
        assert (py / "1" / f).exists(), f
    ort = build_model_repository(tiny_onnx, tmp_path / "repo", "g", flavour="onnxruntime",
                                 kind="KIND_GPU", dynamic_batching=False, variant="opt")
    cfg = (ort / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cfg and "KIND_GPU" in cfg
    assert "dynamic_batching" not in cfg and not (ort / "1" / "model.py").exists()
    assert (py / "config.pbtxt").exists()  # a second model leaves the first alone


def test_repository_bad_args(tiny_onnx, tmp_path):  # noqa: F811
    with pytest.raises(DrscalingError, match="flavour"):
        build_model_repository(tiny_onnx, tmp_path, "m", flavour="tensorrt")
    with pytest.raises(DrscalingError, match="kind"):
        build_model_repository(tiny_onnx, tmp_path, "m", kind="KIND_TPU")
    with pytest.raises(DrscalingError, match="export the model first"):
        build_model_repository(tiny_onnx, tmp_path, "m", variant="fp16")
    with pytest.raises(DrscalingError, match="export the model first"):
        build_model_repository(tmp_path, tmp_path / "r", "m")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_equals_onnxruntime(triton, tiny_onnx, protocol):  # noqa: F811
    tok = load_tokenizer(tiny_onnx / "tokenizer")
    ref = ort_encode_fn(ort_session(tiny_onnx / "model.onnx"), tok)(TEXTS, 128)
    got = encode_texts(triton, MODEL, TEXTS, protocol=protocol, batch_size=2)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-5
    assert np.abs(got[0] - got[1]).max() > 1e-3  # rows really differ (no broadcast first row)
    # A plain URL plus the tokenizer path works the same.
    tok_dir = triton.repo_dir / MODEL / "1" / "tokenizer"
    again = encode_texts(triton.url(protocol), MODEL, TEXTS, protocol=protocol, tokenizer=tok_dir)
    assert np.abs(again - ref).max() <= 1e-5


def test_concurrent_requests_are_batched_correctly(triton, tiny_onnx):  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    tok = load_tokenizer(tiny_onnx / "tokenizer")
    ref = ort_encode_fn(ort_session(tiny_onnx / "model.onnx"), tok)(TEXTS, 128)
    # Different lengths in flight at once: the model pads them into one batch and splits back.
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(
            lambda i: encode_texts(triton, MODEL, [TEXTS[i % 5]], protocol="grpc"), range(40)
        ))
    for i, out in enumerate(outs):
        assert np.abs(out[0] - ref[i % 5]).max() <= 1e-5


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_input_is_a_clear_error_and_server_keeps_serving(triton, protocol):
    ids = np.array([[2, 10, 11, 3], [2, 12, 3, 0]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    cases = [
        ((ids.astype(np.int32), mask.astype(np.int32)), "INT32.*expects 'INT64'"),
        ((ids[0], mask[0]), "unexpected shape"),
        ((ids[:0], mask[:0]), "empty batch"),
        ((np.full((1, 200), 5, np.int64), np.ones((1, 200), np.int64)),
         "sequence length 200 exceeds the model's maximum of 128"),
        ((ids * 1000, mask), "token ids must lie in"),
        ((ids, mask[:, :3]), "must both be \\[batch, sequence\\]"),
        ((np.ones((17, 4), np.int64),) * 2, "batch-size must be <= 16"),
    ]
    for args, pattern in cases:
        with pytest.raises(DrscalingError, match=pattern):
            infer_ids(triton, MODEL, *args, protocol=protocol)
    with pytest.raises(DrscalingError, match="model 'nope' is not ready.*ready models: tiny"):
        infer_ids(triton, "nope", ids, mask, protocol=protocol)
    with pytest.raises(DrscalingError, match="empty batch"):
        encode_texts(triton, MODEL, [], protocol=protocol)
    with pytest.raises(DrscalingError, match="exceeds"):
        encode_texts(triton, MODEL, ["a"], protocol=protocol, max_len=4096)
    # Still serving, and still right.
    out = infer_ids(triton, MODEL, ids, mask, protocol=protocol)
    assert out.shape == (2, 32) and np.isfinite(out).all()
    assert triton.is_running()


def test_index_and_search(triton, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    passages = sorted(set(CORPUS))
    corpus.write_text("".join(json.dumps({"pid": f"p{i}", "text": t}) + "\n"
                              for i, t in enumerate(passages)))
    meta = build_index(triton, MODEL, corpus, tmp_path / "index", protocol="grpc")
    assert meta["n"] == len(passages) and meta["dim"] == 32
    assert_strict_json(tmp_path / "index", at_least=2)  # index.json, pids.json, passages.jsonl
    emb = np.load(tmp_path / "index" / "embeddings.npy")
    assert emb.shape == (len(passages), 32)
    hits = search(triton, MODEL, tmp_path / "index", passages[2], k=3)
    assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1]
    assert all(isinstance(h[0], str) and isinstance(h[2], str) for h in hits)
    # Exact inner product (FAISS flat, the default): the ranking and scores of numpy's brute force.
    assert meta["index"] == {"type": "flat"} and (tmp_path / "index" / "faiss.index").exists()
    q = encode_texts(triton, MODEL, [passages[2]], max_len=32)[0]
    best = np.argsort(-(emb @ q), kind="stable")[:3]
    assert [h[0] for h in hits] == [f"p{i}" for i in best]
    np.testing.assert_allclose([h[1] for h in hits], (emb @ q)[best], rtol=0, atol=1e-5)
    # HNSW and IVF indexes from the same flags as the CLI; on six passages both find the exact top 3.
    for kind, flags in (("hnsw", {"hnsw_m": 8}), ("ivf", {"nlist": 2, "nprobe": 2})):
        approx = build_index(triton, MODEL, corpus, tmp_path / kind, index=config_from(index_type=kind, **flags))
        assert approx["index"]["type"] == kind
        assert [h[0] for h in search(triton, MODEL, tmp_path / kind, passages[2], k=3, nprobe=2, ef_search=16)] \
            == [h[0] for h in hits]
    with pytest.raises(DrscalingError, match="nlist 50 exceeds the 6 passages"):
        build_index(triton, MODEL, corpus, tmp_path / "bad", index=config_from(index_type="ivf", nlist=50))
    assert not (tmp_path / "bad").exists()
    # An index written before FAISS (no faiss.index) is still searched exactly, from embeddings.npy.
    (tmp_path / "index" / "faiss.index").rename(tmp_path / "faiss.index")
    assert search(triton, MODEL, tmp_path / "index", passages[2], k=3) == hits
    (tmp_path / "index" / "faiss.index").write_bytes(b"junk")
    with pytest.raises(DrscalingError, match="not a readable FAISS index"):
        search(triton, MODEL, tmp_path / "index", "q")
    (tmp_path / "faiss.index").replace(tmp_path / "index" / "faiss.index")
    with pytest.raises(DrscalingError, match="built with model 'tiny'"):
        search(triton, "other", tmp_path / "index", "q")
    with pytest.raises(DrscalingError, match="k must be"):
        search(triton, MODEL, tmp_path / "index", "q", k=0)
    with pytest.raises(DrscalingError, match="not an index"):
        search(triton, MODEL, tmp_path, "q")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"pid": "a", "text": "x"}\n{"pid": "a", "text": "y"}\n')
    with pytest.raises(DrscalingError, match="duplicate pid"):
        build_index(triton, MODEL, dup, tmp_path / "index2")
    assert not (tmp_path / "index2").exists()


def test_server_lifecycle_and_dead_server(tiny_onnx, tmp_path):  # noqa: F811
    repo = tmp_path / "repo"
    build_model_repository(tiny_onnx, repo, MODEL)
    server = TritonServer(repo, log_path=tmp_path / "triton.log")
    with server:
        assert server.is_running() and server.log_path == tmp_path / "triton.log"
        http, grpc = server.http_url, server.grpc_url
    assert server.proc.returncode == 0  # SIGINT is a clean shutdown
    assert "Started GRPCInferenceService" in (tmp_path / "triton.log").read_text()
    for url, protocol in ((http, "http"), (grpc, "grpc")):
        with pytest.raises(DrscalingError, match="not reachable"):
            encode_texts(url, MODEL, ["hello"], protocol=protocol)


def test_free_ports_are_distinct():
    """Triton refuses two equal ports ("cannot listen to GRPC requests and metrics requests at the same
    address and port"), which a CI run hit. Ports asked for one at a time repeat: 600 of them did in
    20 of 20 rounds here."""
    from drscaling.serving.server import free_ports

    ports = free_ports(600)
    assert len(set(ports)) == 600 and all(1024 <= p < 65536 for p in ports)


def test_server_start_failure_shows_the_log(tiny_onnx, tmp_path):  # noqa: F811
    # This Triton has no onnxruntime backend (findings): the NGC flavour must fail clearly here.
    repo = tmp_path / "repo"
    build_model_repository(tiny_onnx, repo, MODEL, flavour="onnxruntime")
    with pytest.raises(DrscalingError, match="(?s)before it was ready.*onnxruntime"):
        TritonServer(repo, startup_timeout_s=60).start()
    with pytest.raises(DrscalingError, match="holds no model"):
        TritonServer(tmp_path / "empty").start()


def test_a_sigkilled_serve_leaves_no_temp_folder(tiny_onnx, tmp_path):  # noqa: F811
    """SIGKILL (which no handler sees) of a real `drscaling serve`: its Triton stops and its private
    temp folder (backend copy, log) is removed all the same."""
    import subprocess
    import sys
    import time

    repo = tmp_path / "repo"
    build_model_repository(tiny_onnx, repo, MODEL)
    # port 0: serve draws free ports itself, and draws again if one is taken before Triton binds it
    proc = subprocess.Popen([sys.executable, "-m", "drscaling", "serve", "--repo", str(repo), "--http-port", "0",
                             "--grpc-port", "0", "--metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    while (line := proc.stdout.readline()) and "Press Ctrl-C" not in line:
        lines.append(line)
    assert line, f"serve ended before it was ready:\n{''.join(lines)[-2000:]}"
    [log] = [Path(line.split()[-1]) for line in lines if line.strip().startswith("log ")]
    [http] = [line.split()[1].removeprefix("http://") for line in lines if line.strip().startswith("HTTP ")]
    workdir = log.parent
    assert workdir.name.startswith("drscaling-triton-") and (workdir / "backends").is_dir()
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 90  # Triton drains for up to its exit timeout first
    while workdir.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workdir.exists(), f"{workdir} left behind by the killed serve"
    with pytest.raises(DrscalingError, match="not reachable"):
        encode_texts(http, MODEL, ["hello"])
