"""Serve exported encoders with NVIDIA Triton Inference Server, and talk to it.

Model repository (`build_model_repository`), one folder per model:
    <repo>/<name>/config.pbtxt          from serving/templates/config.pbtxt.in
    <repo>/<name>/1/model.onnx          the exported graph (any variant, renamed)
    <repo>/<name>/1/model.py            python flavour only: runs model.onnx with onnxruntime
    <repo>/<name>/1/tokenizer/          for clients: they tokenise, the server sees token ids
    <repo>/<name>/1/drscaling.json      the model's metadata (shape, N, max lengths)

Dual towers (ScalingNote; `build_tower_repository` on a dual export folder) are two models,
`<name>-query` and `<name>-passage`. Each config carries the parameters `tower` ("query",
"passage"; "shared" for a single encoder) and `retriever` (<name>), so clients find the right tower
by role: `encode_texts(..., role="query")`, `build_index` and `search` accept either a tower's own
name or the pair's <name>; an index records which model its queries must go through.

Two flavours from one template:
- "python" (default here): `backend: "python"`; model.py runs onnxruntime (CUDA provider on a GPU
  instance, CPU otherwise). Works with the tritonserver binary carried by the `nvidia-pytriton`
  wheel, which has no onnxruntime backend. `TritonServer` / `serve` start that binary.
- "onnxruntime": `platform: "onnxruntime_onnx"`, for the NGC Triton container on GPU hosts:

    # params.yaml serving: {flavour: onnxruntime, kind: KIND_GPU}, then
    drscaling export --from-sweep quick --out artifacts/export --repo artifacts/serving/repo
    docker run --gpus all --rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
        -v "$PWD/artifacts/serving/repo:/models" nvcr.io/nvidia/tritonserver:24.10-py3 \\
        tritonserver --model-repository=/models

  (24.10 is Triton 2.51, the release of the binary used here; any later -py3 tag works too.)
  The clients below (`encode_texts`, `build_index`, `search`, `costs.measure`) work against either.

Every client error (server down or not ready, unknown model, wrong dtype or shape, empty batch,
sequence too long) is raised as a DrscalingError naming the problem; the server keeps serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from drscaling import vector_index
from drscaling.errors import DrscalingError
from drscaling.files import atomic_path, read_jsonl
from drscaling.vector_index import IndexConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = REPO_ROOT / "serving" / "templates"
FLAVOURS = ("python", "onnxruntime")
KINDS = ("KIND_CPU", "KIND_GPU")
VERSION = "1"
TOWER_ROLES = ("shared", "query", "passage")
ONNX_FILES = {"fp32": "model.onnx", "opt": "model.opt.onnx", "fp16": "model.fp16.onnx",
              "int8": "model.int8.onnx"}


# ---------------------------------------------------------------------------------------------
# Model repository
# ---------------------------------------------------------------------------------------------


@dataclass
class RepositoryConfig:
    flavour: str = "python"
    max_batch_size: int = 64
    dynamic_batching: bool = True
    # 100 us: long enough for concurrent batch-1 requests to meet, short enough to be invisible
    # next to a ~1 ms CPU inference.
    max_queue_delay_us: int = 100
    instances: int = 1
    kind: str = "KIND_CPU"
    variant: str = "fp32"
    intra_op_threads: int = 0  # python flavour: onnxruntime threads per instance (0 = all cores)

    def validate(self) -> None:
        if self.flavour not in FLAVOURS:
            raise DrscalingError(f"flavour must be one of {FLAVOURS} (got '{self.flavour}')")
        if self.kind not in KINDS:
            raise DrscalingError(f"kind must be one of {KINDS} (got '{self.kind}')")
        if self.variant not in ONNX_FILES:
            raise DrscalingError(f"variant must be one of {list(ONNX_FILES)} (got '{self.variant}')")
        for name in ("max_batch_size", "instances"):
            if getattr(self, name) < 1:
                raise DrscalingError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_queue_delay_us < 0:
            raise DrscalingError("max_queue_delay_us must be >= 0")


def build_model_repository(
    onnx_dir: str | Path, repo_dir: str | Path, name: str, flavour: str = "python",
    max_batch_size: int = 64, dynamic_batching: bool = True, max_queue_delay_us: int = 100,
    instances: int = 1, kind: str = "KIND_CPU", variant: str = "fp32", intra_op_threads: int = 0,
    tower: str = "shared", retriever: str | None = None,
) -> Path:
    """Write repo_dir/<name>/ (config.pbtxt + version 1) from an export folder; returns its path.

    Other models already in repo_dir are left alone; <name> is replaced atomically as a whole.
    `tower` / `retriever` label one tower of a dual pair (build_tower_repository sets them).
    """
    from drscaling.model import is_dual

    cfg = RepositoryConfig(flavour, max_batch_size, dynamic_batching, max_queue_delay_us,
                           instances, kind, variant, intra_op_threads)
    cfg.validate()
    if tower not in TOWER_ROLES:
        raise DrscalingError(f"tower must be one of {TOWER_ROLES} (got '{tower}')")
    _check_name(name)
    onnx_dir = Path(onnx_dir)
    if is_dual(onnx_dir):
        raise DrscalingError(
            f"{onnx_dir} holds dual towers (query/ and passage/): build it with build_tower_repository"
        )
    meta = _check_export(onnx_dir, cfg.variant)
    onnx_file = onnx_dir / ONNX_FILES[cfg.variant]
    meta_file = onnx_dir / "drscaling.json"
    from drscaling.model import load_tokenizer

    tokenizer = load_tokenizer(onnx_dir / "tokenizer")
    params = {
        "onnx_file": "model.onnx",
        "variant": cfg.variant,
        "max_sequence_length": str(meta.get("max_positions", 512)),
        "max_query_len": str(meta.get("max_query_len", 32)),
        "max_passage_len": str(meta.get("max_passage_len", 180)),
        "vocab_size": str(len(tokenizer)),
        "pad_token_id": str(tokenizer.pad_token_id or 0),
        "shape": str(meta.get("shape", "")),
        "n_non_embedding": str(meta.get("n_non_embedding", 0)),
        "intra_op_threads": str(cfg.intra_op_threads),
        "tower": tower,
        "retriever": retriever or name,
    }
    text = render_config(name, cfg, int(meta["dim"]), params)
    repo_dir = Path(repo_dir)
    with atomic_path(repo_dir / name) as tmp:
        version = tmp / VERSION
        version.mkdir(parents=True)
        (tmp / "config.pbtxt").write_text(text)
        shutil.copy2(onnx_file, version / "model.onnx")
        if cfg.flavour == "python":
            shutil.copy2(TEMPLATES / "model.py", version / "model.py")
        shutil.copytree(onnx_dir / "tokenizer", version / "tokenizer")
        shutil.copy2(meta_file, version / "drscaling.json")
    return repo_dir / name


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise DrscalingError(f"model name '{name}' must be non-empty letters, digits, - _ .")


def _check_export(onnx_dir: Path, variant: str) -> dict:
    """An export folder's metadata, after checking it holds the graph of `variant` and a tokenizer."""
    onnx_file = onnx_dir / ONNX_FILES[variant]
    if not onnx_file.exists():
        raise DrscalingError(f"{onnx_file} not found: export the model first (variant '{variant}')")
    meta_file = onnx_dir / "drscaling.json"
    if not meta_file.exists() or not (onnx_dir / "tokenizer").is_dir():
        raise DrscalingError(f"{onnx_dir} is not an export folder (no drscaling.json / tokenizer/)")
    return json.loads(meta_file.read_text())


def build_tower_repository(onnx_dir: str | Path, repo_dir: str | Path, name: str, **config) -> dict[str, Path]:
    """A dual export folder -> two models, repo_dir/<name>-query and repo_dir/<name>-passage.

    `config` takes build_model_repository's keywords (flavour, variant, max_batch_size, ...). Both
    towers are checked (export present, one embedding dimension) before either is written, so a bad
    pair leaves the repository as it was. Returns {"query": path, "passage": path}.
    """
    from drscaling.export import SIDES, tower_dim
    from drscaling.model import is_dual

    onnx_dir = Path(onnx_dir)
    if not is_dual(onnx_dir):
        raise DrscalingError(
            f"{onnx_dir} is not a dual-tower export (no towers.json): export a dual model with "
            "`drscaling export --model <dual model folder>` first"
        )
    _check_name(name)
    tower_dim(onnx_dir)
    for side in SIDES:
        _check_export(onnx_dir / side, config.get("variant", "fp32"))
    return {side: build_model_repository(onnx_dir / side, repo_dir, f"{name}-{side}", tower=side,
                                         retriever=name, **config)
            for side in SIDES}


def render_config(name: str, cfg: RepositoryConfig, dim: int, params: dict[str, str]) -> str:
    template = string.Template((TEMPLATES / "config.pbtxt.in").read_text())
    engine = 'backend: "python"' if cfg.flavour == "python" else 'platform: "onnxruntime_onnx"'
    batching = (
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}"
        if cfg.dynamic_batching else ""
    )
    parameters = ",\n".join(
        f'  {{\n    key: "{k}"\n    value: {{ string_value: "{v}" }}\n  }}' for k, v in params.items()
    )
    return template.substitute(
        name=name, flavour=cfg.flavour, engine=engine, max_batch_size=cfg.max_batch_size, dim=dim,
        dynamic_batching=batching, instances=cfg.instances, kind=cfg.kind, parameters=parameters,
    )


# ---------------------------------------------------------------------------------------------
# The server process
# ---------------------------------------------------------------------------------------------


def triton_dist() -> Path:
    """The tritonserver distribution inside the installed nvidia-pytriton wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise DrscalingError("nvidia-pytriton is not installed: pip install --no-deps nvidia-pytriton")
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (dist / "bin" / "tritonserver").exists():
        raise DrscalingError(f"no tritonserver binary under {dist}")
    return dist


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the parent (thread) dies, the kernel sends
    # SIGTERM, so a crashed test run or CLI never leaves an orphan server holding ports.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class ServerConfig:
    repo_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: pick a free port
    grpc_port: int = 0
    metrics_port: int = 0
    startup_timeout_s: float = 60.0
    exit_timeout_s: int = 5
    log_path: Path | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)


class TritonServer:
    """A tritonserver process on a model repository; use as a context manager.

    with TritonServer("serving/repository") as server:
        encode_texts(server.http_url, "bert-L2-H128", ["hello"])
    """

    def __init__(
        self, repo_dir: str | Path, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
        host: str = "127.0.0.1", startup_timeout_s: float = 60.0, log_path: str | Path | None = None,
        log_verbose: int = 0, extra_args: Sequence[str] = (),
    ):
        self.config = ServerConfig(
            Path(repo_dir), host, http_port, grpc_port, metrics_port, startup_timeout_s,
            log_path=Path(log_path) if log_path else None, log_verbose=log_verbose,
            extra_args=list(extra_args),
        )
        self.proc: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self.log_path: Path | None = None
        self.last_log = ""
        self.http_port = self.grpc_port = self.metrics_port = 0

    # URLs as tritonclient wants them (host:port, no scheme)
    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.metrics_port}/metrics"

    @property
    def repo_dir(self) -> Path:
        return self.config.repo_dir

    def url(self, protocol: str = "http") -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> TritonServer:
        cfg = self.config
        if not cfg.repo_dir.is_dir() or not any(cfg.repo_dir.glob("*/config.pbtxt")):
            raise DrscalingError(
                f"{cfg.repo_dir} holds no model (no */config.pbtxt): build the repository first"
            )
        if self.proc is not None and self.proc.poll() is None:
            raise DrscalingError("this TritonServer is already running")
        self._workdir = Path(tempfile.mkdtemp(prefix="drscaling-triton-"))
        backends = self._prepare_backends(self._workdir)
        self.log_path = cfg.log_path or self._workdir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        auto = cfg.http_port == 0 or cfg.grpc_port == 0 or cfg.metrics_port == 0
        # A free port found here can be taken by another process before Triton binds it; with
        # automatic ports, retry with fresh ones.
        for attempt in range(3 if auto else 1):
            self.http_port = cfg.http_port or free_port(cfg.host)
            self.grpc_port = cfg.grpc_port or free_port(cfg.host)
            self.metrics_port = cfg.metrics_port or free_port(cfg.host)
            self._launch(backends)
            try:
                self._wait_ready()
                return self
            except DrscalingError:
                log = self.log_tail()
                self._kill()
                if attempt < 2 and auto and "ddress already in use" in log:
                    continue
                self._cleanup()
                raise
        raise AssertionError("unreachable")

    def _prepare_backends(self, workdir: Path) -> Path:
        """A private backend directory: the python backend plus the stub for this interpreter."""
        dist = triton_dist()
        py = workdir / "backends" / "python"
        py.mkdir(parents=True)
        for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(dist / "backends" / "python" / f, py / f)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise DrscalingError(f"no Triton python backend stub for Python {version} in {dist}")
        shutil.copy2(stub, py / "triton_python_backend_stub")
        return workdir / "backends"

    def _env(self) -> dict[str, str]:
        env = os.environ.copy()
        dist = triton_dist()
        libs = dist.parents[1] / "nvidia_pytriton.libs"
        # The stub links libpython3.11 by soname; the running interpreter's own libpython must
        # come first, or the system one (a different 3.11 build) is loaded and model.py fails with
        # "'_thread.RLock' object has no attribute '_recursion_count'".
        paths = [sysconfig.get_config_var("LIBDIR") or "", str(libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
        # The embedded interpreter finds its prefix (and so this venv's site-packages: numpy,
        # onnxruntime) from the first python3 on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def _launch(self, backends: Path) -> None:
        cfg = self.config
        prefix = f"drscaling_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        cmd = [
            str(triton_dist() / "bin" / "tritonserver"),
            f"--model-repository={cfg.repo_dir.resolve()}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={prefix}",
            f"--http-address={cfg.host}", f"--http-port={self.http_port}",
            f"--grpc-address={cfg.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={cfg.host}", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
            f"--log-verbose={cfg.log_verbose}",
            "--strict-readiness=true",
            *cfg.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it; closed after launch
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env(), preexec_fn=_die_with_parent, cwd=self._workdir,
                # Own session: a terminal's Ctrl-C reaches only us, and stop() sends the one
                # SIGINT (a second SIGINT mid-shutdown makes Triton exit without draining).
                start_new_session=True,
            )
        except OSError as exc:
            raise DrscalingError(f"cannot start tritonserver: {exc}") from exc
        finally:
            log.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise DrscalingError(
                    f"tritonserver exited (status {code}) before it was ready; log "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise DrscalingError(
            f"tritonserver was not ready after {self.config.startup_timeout_s:.0f} s; log "
            f"{self.log_path}:\n{self.log_tail()}"
        )

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return "\n".join(self.last_log.splitlines()[-lines:])
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait(self) -> int:
        """Block until the server exits; returns its exit status."""
        if self.proc is None:
            raise DrscalingError("the server was never started")
        return self.proc.wait()

    def stop(self) -> int | None:
        """SIGINT (Triton's clean shutdown: unload models, drain requests), SIGKILL if it hangs."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                code = self.proc.wait(timeout=self.config.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                self._kill()
        elif self.proc is not None:
            code = self.proc.returncode
        self._cleanup()
        return code

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def _cleanup(self) -> None:
        """Remove the private temp dir (backend copy, and the log unless log_path was given);
        the log's tail stays in `last_log` so a failure can still be reported."""
        if self._workdir is None:
            return
        if self.log_path is not None and self.log_path.exists():
            self.last_log = self.log_tail(200)
        shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None


def serve(
    repo_dir: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
    log_path: str | Path | None = None, startup_timeout_s: float = 120.0,
) -> int:
    """Foreground server for the CLI: prints URLs and the log path, runs until Ctrl-C."""
    server = TritonServer(repo_dir, http_port, grpc_port, metrics_port, log_path=log_path,
                          startup_timeout_s=startup_timeout_s)

    def on_term(signum, frame):  # SIGTERM (kill, systemd, docker stop) stops as Ctrl-C does
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    server.start()
    models = sorted(p.parent.name for p in Path(repo_dir).glob("*/config.pbtxt"))
    print(f"Triton is serving {', '.join(models)} from {repo_dir}")
    print(f"  HTTP    http://{server.http_url}  (e.g. curl http://{server.http_url}/v2/health/ready)")
    print(f"  gRPC    {server.grpc_url}")
    print(f"  metrics {server.metrics_url}")
    print(f"  log     {server.log_path}")
    print("Press Ctrl-C to stop.", flush=True)
    try:
        code = server.wait()
        raise DrscalingError(f"tritonserver exited with status {code}; log:\n{server.log_tail()}")
    except KeyboardInterrupt:
        print("stopping Triton ...", flush=True)
        return server.stop() or 0
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    name: str
    max_sequence_length: int
    max_query_len: int
    max_passage_len: int
    dim: int
    params: dict[str, str]

    @property
    def tower(self) -> str:
        """"query" / "passage" for one tower of a dual pair, "shared" for a single encoder."""
        return self.params.get("tower", "shared")

    @property
    def retriever(self) -> str:
        """The pair's name for a tower (its models are <retriever>-query / -passage), else the model's."""
        return self.params.get("retriever", self.name)

    def max_len(self, role: str | None) -> int:
        """The default truncation for texts of `role` (queries: the query length, else passages')."""
        n = self.max_query_len if role == "query" else self.max_passage_len
        return min(n, self.max_sequence_length)


class Client:
    """One tritonclient (HTTP or gRPC) with DrscalingError for every failure.

    A tritonclient.http client must stay on the thread that created it: make one per thread.
    """

    def __init__(self, url: str | TritonServer, protocol: str = "http", timeout_s: float = 60.0):
        if protocol not in ("http", "grpc"):
            raise DrscalingError(f"protocol must be 'http' or 'grpc' (got '{protocol}')")
        self.protocol = protocol
        self.server = url if isinstance(url, TritonServer) else None
        address = url.url(protocol) if isinstance(url, TritonServer) else str(url)
        for scheme in ("http://", "https://", "grpc://"):
            if address.startswith(scheme):
                address = address[len(scheme):]
        self.url = address.rstrip("/")
        self.timeout_s = timeout_s
        if protocol == "http":
            import tritonclient.http as mod

            self.mod = mod
            self.client = mod.InferenceServerClient(
                self.url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        else:
            import tritonclient.grpc as mod

            self.mod = mod
            self.client = mod.InferenceServerClient(self.url)
        self._info: dict[str, ModelInfo] = {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            msg = exc.message() or str(exc)
            status = str(exc.status() or "")
            if "UNAVAILABLE" in status or "failed to connect" in msg.lower() \
                    or "connection refused" in msg.lower():
                raise self._unreachable(msg) from exc
            raise self._refused(what, exc) from exc
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise self._unreachable(str(exc) or type(exc).__name__) from exc

    def _refused(self, what: str, exc) -> DrscalingError:
        return DrscalingError(f"Triton at {self.url} refused {what}: {exc.message() or exc}")

    def _unreachable(self, why: str) -> DrscalingError:
        return DrscalingError(
            f"Triton server at {self.url} ({self.protocol}) is not reachable: {why}. "
            "Start it with `drscaling serve` (or check the URL and port)."
        )

    def check_ready(self, model: str) -> None:
        if not self._call("a health check", self.client.is_server_live):
            raise DrscalingError(f"Triton server at {self.url} is not live")
        if not self._call("a health check", self.client.is_server_ready):
            raise DrscalingError(f"Triton server at {self.url} is up but not ready (still loading?)")
        if not self._call("a model check", self.client.is_model_ready, model):
            raise DrscalingError(
                f"model '{model}' is not ready on Triton at {self.url}; ready models: "
                f"{', '.join(self.ready_models()) or 'none'}"
            )

    def ready_models(self) -> list[str]:
        index = self._call("a repository index", self.client.get_model_repository_index)
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            index = MessageToDict(index).get("models", [])
        return sorted(m["name"] for m in index if m.get("state") == "READY")

    def info(self, model: str) -> ModelInfo:
        if model not in self._info:
            self.check_ready(model)
            if self.protocol == "grpc":
                cfg = self._call("a config request", self.client.get_model_config, model,
                                 as_json=True)["config"]
            else:
                cfg = self._call("a config request", self.client.get_model_config, model)
            params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
            dims = cfg["output"][0]["dims"]
            self._info[model] = ModelInfo(
                name=model,
                max_sequence_length=int(params.get("max_sequence_length", 512)),
                max_query_len=int(params.get("max_query_len", 32)),
                max_passage_len=int(params.get("max_passage_len", 180)),
                dim=int(dims[-1]), params=params,
            )
        return self._info[model]

    def infer(self, model: str, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One inference request with arrays sent as they are (the server validates them)."""
        return self.prepare(model, input_ids, attention_mask)()

    def prepare(self, model: str, input_ids: np.ndarray, attention_mask: np.ndarray):
        """A zero-argument callable that sends this request again and again: the inputs are
        serialised once, so a load generator spends its CPU on requests, not on encoding."""
        inputs, outputs = self._request(input_ids, attention_mask)

        def send() -> np.ndarray:
            result = self._call(f"an inference on '{model}'", self.client.infer, model, inputs,
                                outputs=outputs)
            return result.as_numpy("embedding")

        return send

    def prepare_async(self, model: str, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Like prepare, but `submit(done)` returns at once and calls done(error_or_None) from a
        gRPC thread when the answer is in: one Python thread keeps many requests in flight, so a
        load generator on a small machine does not compete with the server for cores (gRPC only;
        tritonclient's HTTP client runs its async calls on gevent in the caller's thread)."""
        if self.protocol != "grpc":
            raise DrscalingError("asynchronous requests need protocol 'grpc'")
        inputs, outputs = self._request(input_ids, attention_mask)
        what = f"an inference on '{model}'"

        def submit(done) -> None:
            def finished(result, error) -> None:
                done(None if error is None else self._refused(what, error))

            self._call(what, self.client.async_infer, model, inputs, finished, outputs=outputs)

        return submit

    def _request(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[list, list]:
        from tritonclient.utils import np_to_triton_dtype

        if input_ids.ndim >= 1 and input_ids.shape[0] == 0:
            raise DrscalingError(f"empty batch: input_ids has shape {list(input_ids.shape)}")
        inputs = []
        for name, arr in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            arr = np.ascontiguousarray(arr)
            try:
                dtype = np_to_triton_dtype(arr.dtype)
            except Exception:
                dtype = None
            if dtype is None:
                raise DrscalingError(f"{name}: numpy dtype {arr.dtype} cannot be sent to Triton")
            inp = self.mod.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        return inputs, [self.mod.InferRequestedOutput("embedding")]


def resolve_tower(client: Client, model: str, role: str) -> str:
    """The served model that embeds `role` texts ("query" / "passage") for `model`.

    `model` is a shared encoder or a tower of that role (used as is), or the name of a dual pair,
    whose `<model>-<role>` tower is used. The other role's tower is refused: a passage tower
    embedding queries (or the reverse) gives silently wrong scores.
    """
    if role not in ("query", "passage"):
        raise DrscalingError(f"role must be 'query' or 'passage' (got '{role}')")
    ready = client.ready_models()
    if model not in ready and f"{model}-{role}" in ready:
        model = f"{model}-{role}"
    info = client.info(model)  # not ready: the usual error naming the ready models
    if info.tower not in ("shared", role):
        raise DrscalingError(
            f"model '{model}' is the {info.tower} tower of '{info.retriever}': {role} texts go through "
            f"'{info.retriever}-{role}' (or pass the pair's name, '{info.retriever}')"
        )
    return model


def _tokenizer_for(client: Client, model: str, tokenizer: str | Path | None, repo: str | Path | None = None):
    """The tokenizer shipped beside the model: explicit path, else from the model repository (a
    TritonServer's own, or `repo`: the folder the server was started on)."""
    from drscaling.model import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    for root in (client.server.repo_dir if client.server is not None else None, repo):
        if root is not None and (Path(root) / model / VERSION / "tokenizer").is_dir():
            return load_tokenizer(Path(root) / model / VERSION / "tokenizer")
    raise DrscalingError(
        f"no tokenizer for model '{model}': pass the repository the server runs on (repo=, --repo) or "
        f"tokenizer=<repository>/{model}/{VERSION}/tokenizer; the client tokenises, and the tokenizer "
        "lives beside the model in the repository"
    )


def infer_ids(
    url: str | TritonServer, model: str, input_ids: np.ndarray, attention_mask: np.ndarray,
    protocol: str = "http",
) -> np.ndarray:
    """Raw ids in, embeddings out: one request, no client-side checks (for tests and tools)."""
    with Client(url, protocol) as client:
        client.check_ready(model)
        return client.infer(model, input_ids, attention_mask)


def encode_texts(
    url: str | TritonServer, model: str, texts: Sequence[str], protocol: str = "http",
    batch_size: int = 32, max_len: int | None = None, tokenizer: str | Path | None = None,
    desc: str | None = None, role: str | None = None, repo: str | Path | None = None,
) -> np.ndarray:
    """Embed texts on Triton; returns float32 [len(texts), dim] in input order.

    Tokenised here with the tokenizer beside the model (`tokenizer`, or found through a
    TritonServer's repository), truncated to `max_len` (default: the model's query length for
    role="query", else its passage length). With `role`, `model` may name a dual pair: its tower of
    that role embeds the texts (see resolve_tower).
    """
    texts = list(texts)
    if not texts:
        raise DrscalingError("encode_texts: no texts given (empty batch)")
    if not all(isinstance(t, str) for t in texts):
        raise DrscalingError("encode_texts: every text must be a string")
    if batch_size < 1:
        raise DrscalingError(f"batch_size must be >= 1 (got {batch_size})")
    with Client(url, protocol) as client:
        if role is not None:
            model = resolve_tower(client, model, role)
        info = client.info(model)
        if max_len is None:  # the role's length, within what the model's positions allow
            max_len = info.max_len(role)
        if max_len > info.max_sequence_length:
            raise DrscalingError(
                f"max_len {max_len} exceeds the {info.max_sequence_length} positions of model "
                f"'{model}'"
            )
        tok = _tokenizer_for(client, model, tokenizer, repo)
        out = np.empty((len(texts), info.dim), dtype=np.float32)
        # Sorted by length so each batch pads little; results go back to input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=desc, disable=desc is None or len(starts) < 2, leave=False):
            idx = order[start : start + batch_size]
            enc = tok([texts[i] for i in idx], max_length=max_len, truncation=True, padding=True,
                      return_tensors="np", return_token_type_ids=False)
            out[idx] = client.infer(model, enc["input_ids"].astype(np.int64),
                                    enc["attention_mask"].astype(np.int64))
        return out


def build_index(
    url: str | TritonServer, model: str, corpus_path: str | Path, out_dir: str | Path,
    protocol: str = "http", batch_size: int = 32, tokenizer: str | Path | None = None,
    repo: str | Path | None = None, index: IndexConfig | None = None,
) -> dict:
    """Embed a JSONL corpus ({"pid", "text"} per line) on Triton; writes out_dir atomically:
    embeddings.npy (float32 [n, dim]), faiss.index (`index`: exact inner product by default, IVF or
    HNSW; see drscaling.vector_index), pids.json, passages.jsonl, index.json. Returns index.json."""
    index = index or IndexConfig()
    index.validate()
    rows = read_jsonl(corpus_path, required=("pid", "text"))
    pids = [str(r["pid"]) for r in rows]
    if len(set(pids)) != len(pids):
        dup = next(p for i, p in enumerate(pids) if p in pids[:i])
        raise DrscalingError(f"{corpus_path}: duplicate pid '{dup}'")
    texts = [r["text"] for r in rows]
    if not all(isinstance(t, str) for t in texts):
        raise DrscalingError(f"{corpus_path}: every 'text' must be a string")
    with Client(url, protocol) as client:
        model = resolve_tower(client, model, "passage")
        info = client.info(model)
    emb = encode_texts(url, model, texts, protocol=protocol, batch_size=batch_size,
                       tokenizer=tokenizer, desc=f"index {model}", repo=repo)
    # Queries must go through the same encoder (shared) or the pair's query tower.
    query_model = model if info.tower == "shared" else f"{info.retriever}-query"
    meta = {"model": model, "query_model": query_model, "retriever": info.retriever,
            "tower": info.tower, "n": len(pids), "dim": int(emb.shape[1]),
            "corpus": str(Path(corpus_path).resolve()), "score": "inner_product",
            "index": index.describe(len(pids))}
    built = vector_index.build(emb, index)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        np.save(tmp / "embeddings.npy", emb)  # the index's source: another index type needs no re-embedding
        vector_index.save(built, tmp / vector_index.INDEX_FILE)
        (tmp / "pids.json").write_text(json.dumps(pids))
        with open(tmp / "passages.jsonl", "w", encoding="utf-8") as fh:
            for pid, text in zip(pids, texts, strict=True):
                fh.write(json.dumps({"pid": pid, "text": text}, ensure_ascii=False) + "\n")
        (tmp / "index.json").write_text(json.dumps(meta, indent=2))
    return meta


def search(
    url: str | TritonServer, model: str, index_dir: str | Path, query: str, k: int = 10,
    protocol: str = "http", tokenizer: str | Path | None = None, repo: str | Path | None = None,
    nprobe: int | None = None, ef_search: int | None = None,
) -> list[tuple[str, float, str]]:
    """Top-k passages by inner product on the index's FAISS index: [(pid, score, text)], best first.
    Exact for a flat index; `nprobe` (IVF) and `ef_search` (HNSW) override the index's own settings.

    `model` is the index's query model (the shared encoder, or the pair's query tower) or the
    pair's name; any other model is refused, since its embeddings do not live in the index's space.
    """
    index_dir = Path(index_dir)
    if not (index_dir / "index.json").exists():
        raise DrscalingError(f"{index_dir} is not an index (no index.json): run build_index first")
    if k < 1:
        raise DrscalingError(f"k must be >= 1 (got {k})")
    meta = json.loads((index_dir / "index.json").read_text())
    query_model = meta.get("query_model", meta["model"])  # indexes of single encoders predate it
    if model not in (query_model, meta.get("retriever", query_model)):
        pair = (f" (the passage tower of '{meta['retriever']}': query it with '{query_model}' or "
                f"'{meta['retriever']}')" if meta.get("tower") == "passage" else "")
        raise DrscalingError(
            f"the index in {index_dir} was built with model '{meta['model']}'{pair}, not with '{model}': "
            "queries must be embedded by the index's own encoder or its query tower"
        )
    found = _load_index(index_dir)
    vector_index.configure(found, nprobe=nprobe, ef_search=ef_search)
    pids = json.loads((index_dir / "pids.json").read_text())
    if found.ntotal != len(pids):
        raise DrscalingError(f"{index_dir}: the FAISS index holds {found.ntotal} passages but pids.json "
                             f"{len(pids)}: rebuild the index with `drscaling index`")
    texts = [r["text"] for r in read_jsonl(index_dir / "passages.jsonl", required=("text",))]
    with Client(url, protocol) as client:
        info = client.info(query_model)
    if info.dim != found.d:
        raise DrscalingError(
            f"model '{query_model}' embeds in {info.dim} dimensions but the index in {index_dir} holds "
            f"{found.d}-dimensional passages: rebuild the index with the served passage model"
        )
    q = encode_texts(url, query_model, [query], protocol=protocol, max_len=info.max_len("query"),
                     tokenizer=tokenizer, repo=repo)
    scores, ids = vector_index.search(found, q, k)
    return [(pids[i], float(s), texts[i]) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]


def _load_index(index_dir: Path):
    """The index's FAISS index; an index written before FAISS (embeddings.npy only) gets an exact one."""
    if (index_dir / vector_index.INDEX_FILE).exists():
        return vector_index.load(index_dir / vector_index.INDEX_FILE)
    return vector_index.build(np.load(index_dir / "embeddings.npy"))
