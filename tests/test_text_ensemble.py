"""Text in, embeddings out: the <name>-text ensembles (Triton tokenises), and model-side input errors
answered as client errors (HTTP 400 / gRPC INVALID_ARGUMENT). A real tritonserver, real tritonclient."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import CORPUS
from conftest import MODEL
from test_serving import TEXTS
from tritonclient.utils import InferenceServerException

from drscaling.errors import DrscalingError
from drscaling.export import ort_encode_fn, ort_session
from drscaling.model.tokenizer import load_tokenizer
from drscaling.serving import (
    Client, build_index, build_model_repository, encode_texts, infer_ids, search,
)
from drscaling.serving.stub_env import ENV_VAR

MORE = [*TEXTS, "", "Ünïcödé naïve café, 日本語のテキスト", "debian " * 300, "  tabs\tand\nnewlines  ",
        "RSYNC Copies FILES!!! (quickly)"]
CLIENT_ERROR = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
MODULES = {"http": httpclient, "grpc": grpcclient}


def raw_infer(server, protocol: str, model: str, arrays: dict[str, np.ndarray], output: str):
    """One request through plain tritonclient: (array, None) or (None, (status, message))."""
    mod = MODULES[protocol]
    client = mod.InferenceServerClient(server.url(protocol))
    inputs = []
    for name, arr in arrays.items():
        inp = mod.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == object else "INT64")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    try:
        return client.infer(model, inputs).as_numpy(output), None
    except InferenceServerException as exc:
        return None, (str(exc.status()), exc.message())
    finally:
        client.close()


def as_bytes(texts: list[str]) -> np.ndarray:
    return np.array([[t.encode()] for t in texts], dtype=object)


def test_repository_has_the_text_models(tiny_onnx, tmp_path, monkeypatch):  # noqa: F811
    repo = tmp_path / "repo"
    build_model_repository(tiny_onnx, repo, "m", max_batch_size=8)
    tok_cfg = (repo / "m-tokenizer" / "config.pbtxt").read_text()
    ens_cfg = (repo / "m-text" / "config.pbtxt").read_text()
    assert 'backend: "python"' in tok_cfg and "TYPE_STRING" in tok_cfg and 'key: "EXECUTION_ENV_PATH"' in tok_cfg
    assert re.search(r'key: "max_length"\s+value: \{ string_value: "128" \}', tok_cfg)  # passage length
    assert 'platform: "ensemble"' in ens_cfg and 'model_name: "m-tokenizer"' in ens_cfg
    assert 'model_name: "m"' in ens_cfg and "dims: [ 32 ]" in ens_cfg and "max_batch_size: 8" in ens_cfg
    for cfg, interface in ((tok_cfg, "tokenizer"), (ens_cfg, "text"),
                           ((repo / "m" / "config.pbtxt").read_text(), "tensor")):
        assert re.search(rf'key: "interface"\s+value: {{ string_value: "{interface}" }}', cfg)
    assert json.loads((repo / "m-tokenizer" / "1" / "tokenizer.json").read_text())["model"]["vocab"]
    # Off on request: the tensor model alone, as before the ensembles.
    build_model_repository(tiny_onnx, repo, "n", text_ensemble=False)
    assert (repo / "n").is_dir() and not (repo / "n-text").exists() and not (repo / "n-tokenizer").exists()
    # No tokenizer environment: a clear error naming the fix, and nothing written.
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no-env"))
    with pytest.raises(DrscalingError, match="python -m drscaling.serving.stub_env"):
        build_model_repository(tiny_onnx, repo, "o")
    assert not any((repo / name).exists() for name in ("o", "o-text", "o-tokenizer"))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_ids_equal_client_ids(triton, protocol):  # noqa: F811
    tok = load_tokenizer(triton.repo_dir / MODEL / "1" / "tokenizer")
    for max_len in (4, 16, 128):
        for batch in (MORE, MORE[:1], MORE[5:8]):
            arrays = {"text": as_bytes(batch), "max_length": np.full((len(batch), 1), max_len, np.int64)}
            ids, error = raw_infer(triton, protocol, f"{MODEL}-tokenizer", arrays, "input_ids")
            assert error is None, error
            ref = tok(batch, max_length=max_len, truncation=True, padding=True, return_tensors="np")
            np.testing.assert_array_equal(ids, ref["input_ids"])
    # Without max_length: the model's passage length (128), as encode_texts' default
    ids, _ = raw_infer(triton, protocol, f"{MODEL}-tokenizer", {"text": as_bytes(MORE)}, "input_ids")
    assert ids.shape[1] == 128


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_text_ensemble_equals_client_tokenisation(triton, tiny_onnx, protocol):  # noqa: F811
    for role, batch_size in ((None, 32), ("query", 3), ("passage", 1)):
        client_side = encode_texts(triton, MODEL, MORE, protocol=protocol, batch_size=batch_size, role=role)
        server_side = encode_texts(triton.url(protocol), MODEL, MORE, protocol=protocol, batch_size=batch_size,
                                   role=role, server_tokenize=True)  # a bare URL: no tokenizer needed
        np.testing.assert_array_equal(server_side, client_side)
    ref = ort_encode_fn(ort_session(tiny_onnx / "model.onnx"), load_tokenizer(tiny_onnx / "tokenizer"))(MORE, 128)
    assert np.abs(server_side - ref).max() <= 1e-5
    with Client(triton, protocol) as client:  # the ensemble by its own name
        one = client.infer_text(f"{MODEL}-text", [MORE[1]])
    np.testing.assert_array_equal(one[0], encode_texts(triton, MODEL, [MORE[1]], protocol=protocol)[0])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_side_input_errors_are_client_errors(triton, protocol):  # noqa: F811
    bad = [
        (MODEL, {"input_ids": np.full((1, 200), 5, np.int64), "attention_mask": np.ones((1, 200), np.int64)},
         "sequence length 200 exceeds the model's maximum of 128"),
        (MODEL, {"input_ids": np.full((1, 4), 10**6, np.int64), "attention_mask": np.ones((1, 4), np.int64)},
         "token ids must lie in"),
        (f"{MODEL}-text", {"text": np.array([[b"ok"], [b"caf\xe9 \xff"]], dtype=object)},
         "text 1 of the request is not valid UTF-8"),
        (f"{MODEL}-text", {"text": as_bytes(["a", "b"]), "max_length": np.array([[8], [16]], np.int64)},
         "max_length must be one value per request"),
        (f"{MODEL}-text", {"text": as_bytes(["a"]), "max_length": np.array([[4096]], np.int64)},
         "max_length 4096 must lie in"),
    ]
    for model, arrays, message in bad:
        out, error = raw_infer(triton, protocol, model, arrays, "embedding")
        assert out is None and error[0] == CLIENT_ERROR[protocol] and message in error[1], (model, error)
    # Through drscaling's client: a DrscalingError that names the status
    code = "HTTP 400" if protocol == "http" else "INVALID_ARGUMENT"
    with pytest.raises(DrscalingError, match=f"\\({code}\\): token ids must lie in"):
        infer_ids(triton, MODEL, np.full((1, 4), 10**6, np.int64), np.ones((1, 4), np.int64), protocol=protocol)
    with pytest.raises(DrscalingError, match="text 0 cannot be sent as UTF-8"):
        encode_texts(triton, MODEL, ["\ud800 lone surrogate"], protocol=protocol, server_tokenize=True)
    assert triton.is_running()


def test_plain_json_over_http(triton):  # noqa: F811
    """What curl sends: JSON strings in, embeddings out; a model-side mistake is a real HTTP 400."""
    def post(model: str, inputs: list[dict]):
        body = json.dumps({"inputs": inputs}).encode()
        req = urllib.request.Request(f"http://{triton.http_url}/v2/models/{model}/infer", data=body)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, out = post(f"{MODEL}-text", [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": TEXTS[:2]}])
    emb = np.array(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
    assert status == 200 and np.abs(emb - encode_texts(triton, MODEL, TEXTS[:2])).max() <= 1e-6
    ids = {"name": "input_ids", "shape": [1, 200], "datatype": "INT64", "data": [5] * 200}
    mask = {"name": "attention_mask", "shape": [1, 200], "datatype": "INT64", "data": [1] * 200}
    status, out = post(MODEL, [ids, mask])
    assert status == 400 and "exceeds the model's maximum" in out["error"]


def test_good_text_requests_unchanged_among_bad_ones(triton):  # noqa: F811
    ref = encode_texts(triton, MODEL, TEXTS, batch_size=1)

    def one(i: int):
        if i % 3 == 0:
            return raw_infer(triton, "grpc", f"{MODEL}-text", {"text": np.array([[b"\xfe\xff"]], dtype=object)},
                             "embedding")[1][0]
        with Client(triton, "grpc") as client:
            return client.infer_text(f"{MODEL}-text", [TEXTS[i % 5]])[0]

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(48)))
    for i, out in enumerate(outs):
        if i % 3 == 0:
            assert out == CLIENT_ERROR["grpc"]
        else:
            assert np.abs(out - ref[i % 5]).max() <= 1e-5


def test_index_and_search_with_server_tokenize(triton, tmp_path):  # noqa: F811
    corpus = tmp_path / "corpus.jsonl"
    passages = sorted(set(CORPUS))
    corpus.write_text("".join(json.dumps({"pid": f"p{i}", "text": t}) + "\n" for i, t in enumerate(passages)))
    build_index(triton, MODEL, corpus, tmp_path / "client")
    build_index(triton.http_url, MODEL, corpus, tmp_path / "server", server_tokenize=True)
    np.testing.assert_array_equal(np.load(tmp_path / "server" / "embeddings.npy"),
                                  np.load(tmp_path / "client" / "embeddings.npy"))
    for query in (passages[2], "copy files"):
        assert search(triton.http_url, MODEL, tmp_path / "server", query, k=3, server_tokenize=True) \
            == search(triton, MODEL, tmp_path / "client", query, k=3)


def test_missing_ensemble_is_a_clear_error(tiny_onnx, tmp_path):  # noqa: F811
    from drscaling.serving import TritonServer

    repo = tmp_path / "repo"
    build_model_repository(tiny_onnx, repo, "plain", text_ensemble=False)
    with TritonServer(repo) as server, pytest.raises(DrscalingError, match="no text ensemble 'plain-text'"):
        encode_texts(server, "plain", ["hello"], server_tokenize=True)


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_repository_is_relocatable(tiny_onnx, tmp_path, monkeypatch):  # noqa: F811
    """The tokenizer model names its Python environment relative to itself (not the absolute path
    of this checkout's env): the same bytes wherever it is built, and a copy in another folder, the
    original gone, still serves the text ensemble."""
    import shutil

    from drscaling.serving import TritonServer

    first, second = tmp_path / "a" / "repo", tmp_path / "b" / "repo"
    build_model_repository(tiny_onnx, first, "m", max_batch_size=16)
    build_model_repository(tiny_onnx, second, "m", max_batch_size=16)
    files = _tree(first)
    assert files == _tree(second)  # deterministic, and nothing depends on where it was built
    assert not any(str(tmp_path).encode() in b or b"triton-stub-env" in b for b in files.values())
    assert '"$$TRITON_MODEL_DIRECTORY/1/python-env"' in files["m-tokenizer/config.pbtxt"].decode()
    moved = tmp_path / "elsewhere" / "copied"
    shutil.copytree(first, moved)
    shutil.rmtree(tmp_path / "a")
    ref = ort_encode_fn(ort_session(tiny_onnx / "model.onnx"), load_tokenizer(tiny_onnx / "tokenizer"))(MORE, 128)
    with TritonServer(moved) as server, Client(server) as client:
        assert np.abs(client.infer_text("m-text", MORE) - ref).max() <= 1e-5
    # Its environment is resolved when the server starts: a missing one is a clear error, no server.
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no-env"))
    with pytest.raises(DrscalingError, match="python -m drscaling.serving.stub_env"):
        TritonServer(moved).start()


def test_cli_server_tokenize(triton, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`drscaling encode/index/search --server-tokenize`: text to Triton, no tokenizer or --repo needed."""
    from drscaling.cli import main

    monkeypatch.chdir(tmp_path)  # no artifacts/serving/repo here: the client cannot tokenise
    url = triton.http_url
    out = tmp_path / "q.npy"
    assert main(["encode", "--url", url, "--model", MODEL, "--server-tokenize", "--out", str(out), *TEXTS[:3]]) == 0
    np.testing.assert_array_equal(np.load(out), encode_texts(triton, MODEL, TEXTS[:3]))
    capsys.readouterr()
    assert main(["encode", "--url", url, "--model", MODEL, "hello"]) == 2  # without the flag
    assert "no tokenizer for model 'tiny'" in capsys.readouterr().err
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"pid": f"p{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    assert main(["index", "--url", url, "--model", MODEL, "--server-tokenize", "--corpus", str(corpus),
                 "--out", str(tmp_path / "index")]) == 0
    capsys.readouterr()
    assert main(["search", "--url", url, "--model", MODEL, "--server-tokenize", "--index", str(tmp_path / "index"),
                 "-k", "2", TEXTS[1]]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = search(triton, MODEL, tmp_path / "index", TEXTS[1], k=2)  # client-side tokenisation
    assert [line.split()[2] for line in printed] == [pid for pid, _, _ in expected]
