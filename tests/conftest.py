"""Shared fixtures: a small real slice of the embedded Debian snapshot, a tokenizer, an MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import hypothesis.configuration
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "data" / "debian" / "pairs.jsonl"

# ---------------------------------------------------------------------------------------------
# The test run must leave the repository as it found it: tests run in a temporary working folder
# (so relative paths such as MLflow's default ./mlruns artifact root land there), and the session
# fails if any file under the repository appeared, changed or vanished.
# ---------------------------------------------------------------------------------------------

# Never compared: git's own files, the environment, byte code (Python writes it on import).
_UNWATCHED_DIRS = {".git", ".venv", "__pycache__"}
_UNWATCHED_SUFFIXES = (".pyc", ".egg-info")


def repository_files(root: Path = REPO) -> dict[str, tuple[int, int]]:
    """{path relative to the repository: (size, mtime in ns)} of every file a test could touch."""
    out: dict[str, tuple[int, int]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _UNWATCHED_DIRS and not d.endswith(_UNWATCHED_SUFFIXES)]
        for name in files:
            if name.endswith(_UNWATCHED_SUFFIXES):
                continue
            path = Path(folder) / name
            try:
                st = path.lstat()
            except FileNotFoundError:  # removed while walking
                continue
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def repository_changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    changes = [f"new      {p}" for p in sorted(after.keys() - before.keys())]
    changes += [f"removed  {p}" for p in sorted(before.keys() - after.keys())]
    changes += [f"changed  {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return changes


_REPO_BEFORE = repository_files()  # at conftest import: before any test module runs
_REPO_CHANGES: list[str] = []

# hypothesis keeps its caches (constants, unicode tables, examples) under the working folder it was
# imported in, which is the repository root under `make test`: point it at a temporary folder.
_HYPOTHESIS_HOME = Path(tempfile.mkdtemp(prefix="drscaling-tests-hypothesis-"))
hypothesis.configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001
    """A run that changed the repository fails, whatever its tests said."""
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)
    _REPO_CHANGES[:] = repository_changes(_REPO_BEFORE, repository_files())
    if _REPO_CHANGES:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if session.config.pluginmanager.get_plugin("terminalreporter") is None:
            print(_changes_message(), file=sys.stderr)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if _REPO_CHANGES:  # printed last, just above the counts, so it cannot scroll out of sight
        terminalreporter.write_sep("!", "FAILED: the test run changed the repository", red=True, bold=True)
        terminalreporter.write_line(_changes_message(), red=True)


def _changes_message() -> str:
    shown = "\n".join(_REPO_CHANGES[:40])
    if len(_REPO_CHANGES) > 40:
        shown += f"\n... and {len(_REPO_CHANGES) - 40} more"
    return (f"the test run changed {len(_REPO_CHANGES)} file(s) under {REPO}; tests must write only under"
            f" their temporary folders (relative paths resolve in one):\n{shown}")


@pytest.fixture(scope="session", autouse=True)
def temp_working_folder(tmp_path_factory) -> Path:
    """Every test runs in a temporary working folder, never the repository root: whatever a test or
    a library writes to a relative path (MLflow's ./mlruns, ./artifacts, .hypothesis) stays out of
    the checkout. Tests name repository files through REPO."""
    cwd = tmp_path_factory.mktemp("cwd")
    previous = Path.cwd()
    os.chdir(cwd)
    yield cwd
    os.chdir(previous)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(temp_working_folder, tmp_path_factory) -> str:
    """Every test talks to one real MLflow SQLite store in a temp folder, never the project's."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(autouse=True)
def _mlflow_uri_per_test(mlflow_store):
    """Some tests point MLflow at their own store; mlflow keeps the URI in a process global that
    outlives their monkeypatched environment. Every test starts from the session store again."""
    import mlflow
    import mlflow.tracking.fluent

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_store
    mlflow.set_tracking_uri(mlflow_store)
    # set_experiment leaves its id in a process global and in MLFLOW_EXPERIMENT_ID; a later test on
    # another store would start runs in an experiment that store does not have.
    mlflow.tracking.fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    yield
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def raw_pairs(tmp_path_factory) -> Path:
    """The first 1,400 packages of the snapshot (restored by `dvc pull` in the test command)."""
    assert SNAPSHOT.exists(), f"{SNAPSHOT} missing: run `dvc pull` (the README's test command does)"
    out = tmp_path_factory.mktemp("raw") / "pairs.jsonl"
    with open(SNAPSHOT, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i >= 1400:
                break
            dst.write(line)
    return out


@pytest.fixture(scope="session")
def prepared(raw_pairs, tmp_path_factory) -> Path:
    from drscaling.dataset.snapshot import prepare_debian

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_debian(raw_pairs, out, dev_size=300, test_size=300, seed=13)
    return out


@pytest.fixture(scope="session")
def annotations(prepared, tmp_path_factory) -> Path:
    from drscaling.annotation.human import annotate_human
    from drscaling.annotation.ict import annotate_ict

    folder = tmp_path_factory.mktemp("annotations")
    annotate_human(prepared, folder / "human.jsonl")
    annotate_ict(prepared, folder / "ict.jsonl")
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(prepared, tmp_path_factory) -> Path:
    from drscaling.data import load_split
    from drscaling.model.tokenizer import train_tokenizer

    train = load_split(prepared, "train")
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(list(train.corpus["text"]) + list(train.queries["text"]), 2000, out)
    return out


# ---------------------------------------------------------------------------------------------
# A tiny random-weight encoder and its ONNX export, shared by the export, serving and cost tests
# ---------------------------------------------------------------------------------------------

CORPUS = [
    "rsync is a fast, versatile, remote and local file-copying tool",
    "the GNU C compiler, a fairly portable optimising compiler for C",
    "0 A.D. is a free real-time strategy game of ancient warfare",
    "a tool to manage Debian packages and their dependencies",
    "Python bindings for the ONNX runtime inference engine",
    "an HTTP server with support for virtual hosts and modules",
] * 20

_CACHE: dict[str, Path] = {}


def make_tiny_model(root: Path) -> Path:
    """One tiny random-weight encoder (bert-L2-H128, dim 32) per test session."""
    if "model" not in _CACHE:
        from drscaling.model.build import build_model
        from drscaling.model.saved import save_model
        from drscaling.model.tokenizer import train_tokenizer

        tok = train_tokenizer(CORPUS, 200, root / "tok")
        encoder, meta = build_model("bert-L2-H128", tok, dim=32, max_positions=128)
        save_model(encoder, tok, meta, root / "model")
        _CACHE["model"] = root / "model"
    return _CACHE["model"]


def random_retriever(tokenizer_dir: Path, seed: int):
    """A random-weight bert-L2-H128 (dim 32) single-tower retriever on the fixture data's tokenizer."""
    from drscaling.model.build import build_model
    from drscaling.model.retriever import Retriever, Tower
    from drscaling.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    encoder, meta = build_model("bert-L2-H128", tok, dim=32, seed=seed)
    return Retriever.single(Tower(encoder, tok, meta))


def make_tiny_export(root: Path) -> Path:
    if "onnx" not in _CACHE:
        from drscaling.export import export_onnx

        export_onnx(make_tiny_model(root), root / "onnx", variants=("fp32", "opt", "int8"))
        _CACHE["onnx"] = root / "onnx"
    return _CACHE["onnx"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return _CACHE.setdefault("root", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_root) -> Path:
    return make_tiny_model(tiny_root)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_root) -> Path:
    return make_tiny_export(tiny_root)


MODEL = "tiny"  # the tiny export's name in the served model repository
_SERVER: dict = {}


def shared_server(root: Path):
    """One Triton server on the tiny export per test session, shared by every test module that serves."""
    if "server" not in _SERVER:
        from drscaling.serving import TritonServer, build_model_repository

        repo = root / "repo"
        build_model_repository(make_tiny_export(root), repo, MODEL, max_batch_size=16)
        _SERVER["server"] = TritonServer(repo).start()
    return _SERVER["server"]


@pytest.fixture(scope="session")
def triton(tiny_root):
    server = shared_server(tiny_root)
    yield server
    server.stop()


@pytest.fixture
def mlflow_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from drscaling import tracking

    tracking.configure()
    import mlflow

    yield mlflow
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A local port that refuses connections for the whole test. Bound here and never listened on, it
    cannot be taken meanwhile by another process (a parallel worker's server), as a port closed after
    being found free could."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Strict JSON: every JSON / JSON-lines file a stage writes parses without NaN or Infinity
# ---------------------------------------------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def strict_load(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (Python's own parser accepts them)."""
    return json.loads(text, parse_constant=_refuse_constant)


def json_problems(root: Path, skip: tuple[str, ...] = (".git", ".dvc")) -> tuple[int, list[str]]:
    """(files checked, 'path: problem' for each *.json / *.jsonl under root that is not strict JSON)."""
    checked, problems = 0, []
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".json", ".jsonl") or not path.is_file() or set(path.relative_to(root).parts) & set(skip):
            continue
        checked += 1
        text = path.read_text(encoding="utf-8")
        docs = [line for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else [text]
        for i, doc in enumerate(docs, start=1):
            try:
                strict_load(doc)
            except ValueError as exc:
                problems.append(f"{path}{f' line {i}' if path.suffix == '.jsonl' else ''}: {exc}")
                break
    return checked, problems


def assert_strict_json(*roots: Path, at_least: int = 1) -> int:
    """Every JSON / JSON-lines file under the roots is strict JSON; returns how many were checked."""
    results = [json_problems(r) for r in roots]
    checked, problems = sum(n for n, _ in results), [p for _, ps in results for p in ps]
    assert not problems, "not strict JSON:\n" + "\n".join(problems[:20])
    assert checked >= at_least, f"only {checked} JSON file(s) under {', '.join(map(str, roots))}"
    return checked


def mlflow_artifact_folders(*experiments: str) -> list[Path]:
    """The local artifact folders of every run of these MLflow experiments (all of the store's when none
    is named); a local store, as in the tests."""
    from urllib.parse import urlparse

    import mlflow

    client = mlflow.MlflowClient()
    found = [client.get_experiment_by_name(e) for e in experiments] if experiments else client.search_experiments()
    assert all(found), f"no MLflow experiment among {experiments}"
    uris = [r.info.artifact_uri for r in mlflow.search_runs([e.experiment_id for e in found], output_format="list")]
    return [Path(urlparse(u).path if u.startswith("file:") else u) for u in uris]
