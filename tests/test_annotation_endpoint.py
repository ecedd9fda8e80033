"""The endpoint client against real local servers on 127.0.0.1: redirects, non-HTTP replies, hung and
dropping servers, and failed requests retried by the next run.

Every server runs in threads of this process, is bound to 127.0.0.1 on a free port and is stopped
when its test ends; every test is bounded in time (the hung server by --timeout 1 --attempts 2).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml

from drscaling import cli
from drscaling.params import REPO
from drscaling.annotation import endpoint
from drscaling.annotation.config import API_KEY_ENV, GenerationConfig
from drscaling.annotation.format import cost_path
from drscaling.annotation.generated import annotate_generated
from drscaling.annotation.resumable import partial_path, target_passages
from drscaling.data import Split, save_dataset
from drscaling.errors import DrscalingError
from drscaling.files import read_jsonl

KEY = "sk-test-secret-0987654321"
PASSAGES = {
    "rsync": "rsync is a fast and versatile file-copying tool that can copy to or from another host.",
    "vim": "Vim is an almost compatible version of the UNIX editor Vi with many new features.",
    "curl": "curl is a command line tool for transferring data with URL syntax over many protocols.",
    "htop": "htop is an ncurses-based process viewer similar to top that scrolls vertically and horizontally.",
    "jq": "jq is like sed for JSON data: slice, filter, map and transform structured data with ease.",
    "tmux": "tmux enables a number of terminals to be accessed and controlled from a single terminal.",
}


def _split(names: list[str]) -> Split:
    return Split(
        corpus=pd.DataFrame({"pid": [f"p:{n}" for n in names], "text": [PASSAGES[n] for n in names]}),
        queries=pd.DataFrame({"qid": [f"q:{n}" for n in names], "text": [f"what is {n}" for n in names]}),
        qrels=pd.DataFrame({"qid": [f"q:{n}" for n in names], "pid": [f"p:{n}" for n in names]}),
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared") / "prepared"
    names = list(PASSAGES)
    save_dataset({"train": _split(names), "dev": _split(names[:2]), "test": _split(names[2:4])}, root)
    return root


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (*API_KEY_ENV, "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(endpoint, "_WARNED", set())


def _word(body: dict) -> str:
    """The package a request is about: the first word of the passage in its prompt."""
    prompt = body["messages"][0]["content"] if "messages" in body else body["prompt"]
    return prompt.rsplit("Passage: ", 1)[1].split()[0].lower()


def _chat_answer(word: str) -> bytes:
    content = json.dumps({f"query{i}": f"what does {word} do, question {i}" for i in range(1, 6)})
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": 100, "completion_tokens": 50}}).encode()


@contextlib.contextmanager
def http_server(respond: Callable[[BaseHTTPRequestHandler, dict | None], None]) -> Iterator[tuple[str, list[dict]]]:
    """A threaded HTTP server on 127.0.0.1 recording every request (method, path, headers, body)."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _handle(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
            respond(self, body)

        do_GET = do_POST = _handle

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # a client's whole batch connects at once; a full backlog delays requests

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _send(handler: BaseHTTPRequestHandler, code: int, data: bytes = b"{}", headers: dict | None = None) -> None:
    handler.send_response(code)
    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data)


@contextlib.contextmanager
def tcp_server(on_connect: Callable[[socket.socket, threading.Event], None]) -> Iterator[tuple[str, list]]:
    """A plain TCP server on 127.0.0.1 (for servers that do not speak HTTP); yields its URL and
    the accepted connections as (socket, time.monotonic() when accepted). Stopping it releases
    every handler and closes every socket."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    stop, conns, handlers = threading.Event(), [], []

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append((conn, time.monotonic()))
            t = threading.Thread(target=on_connect, args=(conn, stop), daemon=True)
            handlers.append(t)
            t.start()

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1", conns
    finally:
        stop.set()
        acceptor.join(5)
        for t in handlers:
            t.join(5)
        for conn, _ in conns:
            conn.close()
        listener.close()


def _read_request(conn: socket.socket) -> bytes:
    """The whole request, body included: closing a socket with unread bytes sends a reset, not a
    clean close, so a server that stopped at the headers would race the client's body."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


# ---------------------------------------------------------------------------------------------
# Redirects: the key never reaches another port
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [302, 303, 307])
def test_redirect_to_another_port_is_refused_and_the_key_stays(prepared, tmp_path, code):
    with http_server(lambda h, body: _send(h, 200, _chat_answer(_word(body)) if body else b"{}")) as (elsewhere, leaked):
        target = f"{elsewhere}/v1/chat/completions"
        with http_server(lambda h, body: _send(h, code, b"", {"Location": target})) as (base, seen):
            cfg = GenerationConfig(endpoint=f"{base}/v1", model="m", api_key=KEY, limit=2, request_attempts=1)
            with pytest.raises(DrscalingError) as info:
                annotate_generated("llm", prepared, tmp_path / "llm.jsonl", cfg, track=False)
    message = str(info.value)
    assert f"redirected (HTTP {code})" in message and elsewhere.rsplit(":", 1)[1] in message
    assert "another host, port or scheme" in message and KEY not in message
    assert seen and all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in seen)  # the key went where named
    assert leaked == []  # ... and nowhere else: not even a request without it
    assert not (tmp_path / "llm.jsonl").exists()


def test_the_redirect_fixture_catches_what_urllib_does_by_default():
    """Control: Python's own urlopen follows this 302 and re-sends the key to the second port, so
    the test above would see it if the client used urllib's defaults."""
    with http_server(lambda h, body: _send(h, 200)) as (elsewhere, leaked):
        with http_server(lambda h, body: _send(h, 302, b"", {"Location": f"{elsewhere}/x"})) as (base, _):
            req = urllib.request.Request(f"{base}/v1/chat/completions", data=b"{}", method="POST",
                                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                resp.read()
    assert [r["headers"].get("Authorization") for r in leaked] == [f"Bearer {KEY}"]


def test_same_origin_redirect_is_not_followed_either(prepared, tmp_path):
    with http_server(lambda h, body: _send(h, 301, b"", {"Location": "/v2/chat/completions"})) as (base, seen):
        cfg = GenerationConfig(endpoint=f"{base}/v1", model="m", api_key=KEY, limit=1)
        with pytest.raises(DrscalingError, match=r"redirected \(HTTP 301\) to http://127\.0\.0\.1:\d+/v2/chat/completions; "
                                                 "redirects are not followed"):
            annotate_generated("llm", prepared, tmp_path / "llm.jsonl", cfg, track=False)
    assert {r["path"] for r in seen} == {"/v1/chat/completions"}


# ---------------------------------------------------------------------------------------------
# Servers that are not HTTP, hang, or drop the connection
# ---------------------------------------------------------------------------------------------


def _garbage(conn: socket.socket, stop: threading.Event) -> None:
    _read_request(conn)
    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    conn.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        conn.recv(1024)  # until the client closes


def test_non_http_endpoint_is_a_clear_cli_error_without_traceback(prepared, tmp_path):
    out = tmp_path / "llm.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in (*API_KEY_ENV, "MLFLOW_RUN_ID")}
    env |= {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with tcp_server(_garbage) as (url, conns):
        proc = subprocess.run(
            [sys.executable, "-m", "drscaling", "annotate", "--source", "llm", "--regenerate", "--endpoint", url,
             "--model", "m", "--limit", "2", "--prepared", str(prepared), "--out", str(out)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"drscaling: error: endpoint {url} did not answer HTTP (got 'SSH-2.0-OpenSSH" in proc.stderr
    assert conns  # it was really asked
    assert not out.exists() and not cost_path(out).exists()


def _hang(conn: socket.socket, stop: threading.Event) -> None:
    _read_request(conn)
    stop.wait(60)  # never answers; released when the test's server stops


def test_hung_endpoint_gives_up_within_timeout_times_attempts(prepared, tmp_path, capsys):
    out = tmp_path / "llm.jsonl"
    with tcp_server(_hang) as (url, conns):
        code = cli.main(["annotate", "--source", "llm", "--regenerate", "--endpoint", url, "--model", "m",
                         "--limit", "2", "--timeout", "1", "--attempts", "2", "--prepared", str(prepared),
                         "--out", str(out)])
        ended = time.monotonic()
    err = capsys.readouterr().err
    assert code == 2
    assert "no answer within the 1 s timeout; gave up after 2 attempt(s)" in err and url in err
    # timed from the first request, so imports and data loading on a busy machine do not count
    waited = ended - min(t for _, t in conns)
    # the bound is 2 x 1 s + 1 s backoff; the default 30 s timeout would take > 60 s. The margin is for
    # a busy CI disk: saving the partial file fsyncs
    assert waited < 20, f"gave up {waited:.1f} s after the first request; the bound is 2 x 1 s + 1 s backoff"
    assert len(conns) == 4  # 2 passages x 2 attempts
    assert not out.exists() and partial_path(out).exists()


def _drop(conn: socket.socket, stop: threading.Event) -> None:
    _read_request(conn)
    conn.close()


def test_server_closing_without_answer_is_retried_then_clear(prepared, tmp_path):
    with tcp_server(_drop) as (url, conns):
        cfg = GenerationConfig(endpoint=url, model="m", limit=1, request_timeout_s=5, request_attempts=3)
        with pytest.raises(DrscalingError, match="closed the connection without answering; gave up after 3 attempt"):
            annotate_generated("llm", prepared, tmp_path / "llm.jsonl", cfg, track=False)
    assert len(conns) == 3


def test_refused_connection_fails_at_once_naming_the_redacted_endpoint(prepared, tmp_path, refused_port):
    port = refused_port
    # ten attempts would wait 1 + 2 + 4 + 8 + 5 x 10 = 65 s between them if a refusal were retried
    cfg = GenerationConfig(endpoint=f"http://127.0.0.1:{port}/v1", model="m", api_key=KEY, limit=1, request_attempts=10)
    started = time.monotonic()
    with pytest.raises(DrscalingError, match=rf"cannot reach endpoint http://127\.0\.0\.1:{port}/v1: connection refused") as info:
        annotate_generated("llm", prepared, tmp_path / "llm.jsonl", cfg, track=False)
    assert time.monotonic() - started < 20 and KEY not in str(info.value)
    assert endpoint.redact_url(f"http://user:{KEY}@10.0.0.1:8000/v1?key={KEY}") == "http://10.0.0.1:8000/v1"


def test_plain_http_to_a_remote_host_is_warned_once(capsys):
    for _ in range(2):
        endpoint.EndpointGenerator("http://10.11.12.13:8000/v1", "m", KEY, "appendix_a", 8, 0.7, 0.95, 1, 1)
    for quiet in ("https://10.11.12.13/v1", "http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:80/v1"):
        endpoint.EndpointGenerator(quiet, "m", KEY, "appendix_a", 8, 0.7, 0.95, 1, 1)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "http://10.11.12.13:8000/v1 is plain http" in err
    assert "API key" in err and KEY not in err


# ---------------------------------------------------------------------------------------------
# Failed requests are not done: the next run retries exactly those
# ---------------------------------------------------------------------------------------------


def test_passages_whose_requests_failed_are_retried_by_the_next_run(prepared, tmp_path):
    failing, failed = {"vim", "jq"}, set()
    outage = threading.Event()  # while set, the server answers 500 for the failing passages
    outage.set()

    def respond(h, body):
        word = _word(body)
        if word in failing and outage.is_set():
            failed.add(word)
            return _send(h, 500, b'{"error": "overloaded"}')
        _send(h, 200, _chat_answer(word))

    out = tmp_path / "llm.jsonl"
    cfg = GenerationConfig(model="m", limit=6, batch_size=2, request_attempts=1, request_timeout_s=5)
    with http_server(respond) as (base, seen):
        cfg.endpoint = f"{base}/v1"
        with pytest.raises(DrscalingError, match="(?s)HTTP 500.*running the same command again resumes") as info:
            annotate_generated("llm", prepared, out, cfg, track=False)
        assert not out.exists() and not cost_path(out).exists()
        first = [_word(r["body"]) for r in seen]
        ok_first = {w for w in first if w not in failing}
        assert failed and len(first) < len(PASSAGES)  # the run stopped at the batch with a failure
        assert "saved in" in str(info.value)
        seen.clear()
        outage.clear()
        cost = annotate_generated("llm", prepared, out, cfg, track=False)
        second = [_word(r["body"]) for r in seen]
    assert len(second) == len(set(second))  # each passage asked once
    assert set(second) == set(PASSAGES) - ok_first  # the failed and the untried ones, nothing done twice
    assert failed <= set(second)
    rows = read_jsonl(out)
    assert [r["pid"] for r in rows] == list(target_passages(prepared, 6, 0)["pid"])
    assert cost["pairs"] == 6 and cost["passages_failed"] == 0 and cost["passages_resumed"] == len(ok_first)
    assert not partial_path(out).exists()


def test_the_default_wait_on_a_hung_endpoint_is_bounded_to_two_minutes():
    """Without --timeout / --attempts, a hung endpoint fails within 2 minutes (it took ~8 before). The
    bound's formula is the one the hung-server test above measures against a real server."""
    from drscaling.annotation.bounds import REQUEST_ATTEMPTS, REQUEST_TIMEOUT_S, request_bound_s

    cfg = GenerationConfig()
    assert (cfg.request_timeout_s, cfg.request_attempts) == (REQUEST_TIMEOUT_S, REQUEST_ATTEMPTS)
    assert request_bound_s(cfg.request_timeout_s, cfg.request_attempts) <= 120
    parser = cli.build_parser()
    args = parser.parse_args(["annotate", "--source", "llm"])
    assert (args.timeout, args.attempts) in ((None, None), (REQUEST_TIMEOUT_S, REQUEST_ATTEMPTS))


def _forty_passages(tmp_path: Path) -> tuple[list[str], Path]:
    """A prepared dataset whose train split has 40 passages (pkg0..pkg39), for the real-process tests."""
    names = [f"pkg{i}" for i in range(40)]
    texts = {n: f"{n} is a package that provides tool number {n[3:]} for managing many different files" for n in names}
    split = Split(corpus=pd.DataFrame({"pid": [f"p:{n}" for n in names], "text": [texts[n] for n in names]}),
                  queries=pd.DataFrame({"qid": [f"q:{n}" for n in names], "text": [f"what is {n}" for n in names]}),
                  qrels=pd.DataFrame({"qid": [f"q:{n}" for n in names], "pid": [f"p:{n}" for n in names]}))
    prepared = tmp_path / "prepared"
    save_dataset({"train": split, "dev": _split(["rsync", "vim"]), "test": _split(["curl", "jq"])}, prepared)
    return names, prepared


def _annotate_env(tmp_path: Path, experiment: str) -> dict[str, str]:
    """A real `drscaling annotate` process's environment: no API key, its own MLflow store and experiment."""
    env = {k: v for k, v in os.environ.items() if k not in (*API_KEY_ENV, "MLFLOW_RUN_ID")}
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                  "DRSCALING_ANNOTATE_EXPERIMENT": experiment, "PYTHONUNBUFFERED": "1"}


def _annotate_cmd(base: str, prepared: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "drscaling", "annotate", "--source", "llm", "--regenerate", "--endpoint",
            f"{base}/v1", "--model", "m", "--limit", "40", "--prepared", str(prepared), "--out", str(out)]


def _settled(asked: list, quiet_s: float = 3.0, limit_s: float = 60.0) -> int:
    """How many requests were recorded once none has arrived for `quiet_s` (a killed client's bytes
    still in the kernel are retransmitted for a few seconds)."""
    deadline, count, since = time.monotonic() + limit_s, len(asked), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.1)
        if len(asked) != count:
            count, since = len(asked), time.monotonic()
    return count


def test_sigkilled_annotate_process_resumes_without_asking_twice(tmp_path):
    """SIGKILL a real `drscaling annotate --endpoint` after its first batch is saved: the rerun asks
    only the passages not saved, the published set has each passage once, nothing is left RUNNING."""
    import signal

    import mlflow

    names, prepared = _forty_passages(tmp_path)
    asked: list[str] = []

    def slow(h, body):
        asked.append(_word(body))
        time.sleep(1.5)  # a batch takes >= 1.5 s: time to kill the process between two batches
        _send(h, 200, _chat_answer(_word(body)))

    out, uri, env = tmp_path / "llm.jsonl", f"sqlite:///{tmp_path / 'mlflow.db'}", _annotate_env(tmp_path, "annotate-kill")
    with http_server(slow) as (base, _):
        cmd = _annotate_cmd(base, prepared, out)
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        part, deadline = partial_path(out), time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (part.exists() and part.read_text().count("\n")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # also when the wait failed: no process outlives the test
        proc.wait()
        saved = {r["pid"].split(":")[1] for r in read_jsonl(part)}
        assert saved and len(saved) < 40 and not out.exists()
        first = _settled(asked)  # requests the killed process sent are all recorded before the rerun starts
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(asked[first:]) == sorted(set(names) - saved)  # only what was not saved, each once
    rows = read_jsonl(out)
    assert sorted(r["pid"] for r in rows) == sorted(f"p:{n}" for n in names) and len({r["qid"] for r in rows}) == 40
    assert not part.exists()
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("annotate-kill").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_sigtermed_annotate_process_saves_its_batch_and_resumes_without_asking_twice(tmp_path):
    """SIGTERM a real `drscaling annotate --endpoint` while a batch is in flight: it waits for that
    batch, saves it, exits 130 with one line and publishes nothing; the rerun asks only the passages
    never asked, so over both runs every passage is asked exactly once."""
    import signal

    import mlflow

    names, prepared = _forty_passages(tmp_path)
    asked: list[str] = []
    in_flight = threading.Event()

    def slow(h, body):
        asked.append(_word(body))
        in_flight.set()
        time.sleep(1.0)  # a batch takes >= 1 s: the signal lands while one is in flight
        _send(h, 200, _chat_answer(_word(body)))

    out, uri, env = tmp_path / "llm.jsonl", f"sqlite:///{tmp_path / 'mlflow.db'}", _annotate_env(tmp_path, "annotate-term")
    settings = yaml.safe_load((REPO / "params.yaml").read_text())  # batches of 4: the signal lands long before the last
    settings["annotate"]["llm"]["generation"]["batch_size"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))  # the process runs in tmp_path: its params.yaml
    with http_server(slow) as (base, _):
        cmd = _annotate_cmd(base, prepared, out)
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        part, deadline = partial_path(out), time.monotonic() + 300
        try:
            while proc.poll() is None and time.monotonic() < deadline and not (part.exists() and part.read_text().count("\n")):
                time.sleep(0.05)
            in_flight.clear()  # the first batch is saved: wait for the second's requests, then stop the process
            assert in_flight.wait(60) and proc.poll() is None, "no second batch in flight"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
        assert "drscaling: stopped: SIGTERM: " in err and "running the same command again resumes there" in err
        saved = [r["pid"].split(":")[1] for r in read_jsonl(part)]
        assert sorted(saved) == sorted(asked) and len(saved) < 40  # the batch in flight was waited for and saved
        assert not out.exists() and not cost_path(out).exists()  # nothing published
        assert mlflow.MlflowClient(uri).get_experiment_by_name("annotate-term") is None  # no run opened, none RUNNING
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(asked) == sorted(names)  # over both runs: each passage asked once
    rows = read_jsonl(out)
    assert sorted(r["pid"] for r in rows) == sorted(f"p:{n}" for n in names) and len({r["qid"] for r in rows}) == 40
    assert not part.exists()
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("annotate-term").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
