"""The tritonserver process: the binary of the nvidia-pytriton wheel on a model repository."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
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

from drscaling.errors import DrscalingError


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


# What Triton's log says when a port it was given cannot be used: worth a retry with fresh ones.
PORT_CLASH = ("ddress already in use", "same address and port")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free now. Every socket stays bound until all are: ports asked for one at a
    time can come back the same (the kernel is free to hand a just-closed port out again), and
    Triton refuses to start when two of its ports are equal."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


# A small process per server that removes its temp folder once the process that made it is gone, by
# whatever end (SIGKILL included, which no handler sees): it reads the pids of the tritonserver
# processes it is told about until its stdin closes (the parent exited), waits for the last one to
# exit (PR_SET_PDEATHSIG stops it, and Triton drains for up to its exit timeout), then removes the folder.
_REAPER = """
import os, shutil, sys, time
pid = None
for line in sys.stdin:
    pid = int(line)
deadline = time.monotonic() + float(sys.argv[2])
while pid and time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.2)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the parent (thread) dies, the kernel sends
    # SIGTERM, so a crashed test run or CLI never leaves an orphan server holding ports.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


# Ready after 1.5 s for the tests' repository (an encoder, its tokenizer, the text ensemble) on an idle
# 2-core machine; every Python-backend model starts a stub process of its own, and cores shared with
# other work stretch that many times.
STARTUP_TIMEOUT_S = 120.0


@dataclass
class ServerConfig:
    repo_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: pick a free port
    grpc_port: int = 0
    metrics_port: int = 0
    startup_timeout_s: float = STARTUP_TIMEOUT_S
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
        host: str = "127.0.0.1", startup_timeout_s: float = STARTUP_TIMEOUT_S, log_path: str | Path | None = None,
        log_verbose: int = 0, extra_args: Sequence[str] = (),
    ):
        self.config = ServerConfig(
            Path(repo_dir), host, http_port, grpc_port, metrics_port, startup_timeout_s,
            log_path=Path(log_path) if log_path else None, log_verbose=log_verbose,
            extra_args=list(extra_args),
        )
        self.proc: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._stub_env: Path | None = None
        self._reaper: subprocess.Popen | None = None  # removes _workdir if this process is killed
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
        from drscaling.serving.stub_env import check_stub_env, uses_stub_env

        # The tokenizer models' environment is resolved now (see serving.stub_env): checked here, or
        # their stubs would never start and the server would time out.
        self._stub_env = check_stub_env() if uses_stub_env(cfg.repo_dir) else None
        self._workdir = Path(tempfile.mkdtemp(prefix="drscaling-triton-"))
        self._reaper = subprocess.Popen(  # start_new_session: a terminal's Ctrl-C does not stop it first
            [sys.executable, "-c", _REAPER, str(self._workdir), str(cfg.exit_timeout_s + 30)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        backends = self._prepare_backends(self._workdir)
        self.log_path = cfg.log_path or self._workdir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        auto = cfg.http_port == 0 or cfg.grpc_port == 0 or cfg.metrics_port == 0
        # A free port found here can be taken by another process before Triton binds it; with
        # automatic ports, retry with fresh ones.
        for attempt in range(3 if auto else 1):
            fresh = iter(free_ports(3, cfg.host))
            self.http_port, self.grpc_port, self.metrics_port = (
                port or next(fresh) for port in (cfg.http_port, cfg.grpc_port, cfg.metrics_port)
            )
            self._launch(backends)
            try:
                self._wait_ready()
                return self
            except DrscalingError:
                log = self.log_tail()
                self._kill()
                # A fresh port can equal a port the caller named: Triton says "same address and port".
                if attempt < 2 and auto and any(m in log for m in PORT_CLASH):
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
        if self._stub_env is not None:  # what the tokenizer models' bin/activate shim activates
            from drscaling.serving.stub_env import ENV_VAR

            env[ENV_VAR] = str(self._stub_env)
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
        if self._reaper is not None:
            self._reaper.stdin.write(f"{self.proc.pid}\n".encode())
            self._reaper.stdin.flush()

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
        """The log's last lines, after its error lines (glog's "E<date>" prefix) from before them:
        with several models, the one that failed to load is logged long before the shutdown."""
        if not self.log_path or not self.log_path.exists():
            return "\n".join(self.last_log.splitlines()[-lines:])
        text = self.log_path.read_text(errors="replace").splitlines()
        errors = [line for line in text[:-lines] if line[:1] == "E" and line[1:5].isdigit()]
        return "\n".join([*errors[-10:], *(["..."] if errors else []), *text[-lines:]])

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
        if self._reaper is not None:  # the folder is gone: let the reaper end
            self._reaper.stdin.close()
            self._reaper.wait()
            self._reaper = None


def serve(
    repo_dir: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
    log_path: str | Path | None = None, startup_timeout_s: float = STARTUP_TIMEOUT_S,
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

