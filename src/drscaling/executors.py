"""Where a sweep's points train: one after another in this process (`local`), or each as a Ray task on
a cluster (`ray`), all into one MLflow tracking server.

With Ray, a point that finished anywhere on the cluster is found through the tracking server (tags
config_key + data_key on a FINISHED training run; its metrics.json artifact is the result), so nothing
is trained twice. A worker that dies is retried by Ray (max_retries); the retry closes the run the dead
worker left RUNNING and, on the same node, resumes it from its checkpoint. A point that fails for its own
reasons ends its MLflow run FAILED with the cause; the other points still finish, then the sweep fails
naming it. Credentials (MLFLOW_TRACKING_USERNAME/PASSWORD) come from each node's environment: they are
never passed through Ray, logged, or recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from drscaling import tracking
from drscaling.checkpoints import Start, resolve_start
from drscaling.design import METRICS_FILE
from drscaling.errors import DrscalingError
from drscaling.files import read_json, write_json
from drscaling.model.tokenizer import uses_shared_tokenizer
from drscaling.train.config import Paths, TrainConfig
from drscaling.train.data import data_key, data_versions, run_data_key
from drscaling.train.run import train

EXECUTORS = ("local", "ray")
Points = list[tuple[str, TrainConfig]]  # (config key, config), in the order they are submitted


@dataclass
class RayConfig:
    address: str = ""  # host:port of the head's GCS, ray://host:10001, or "" (RAY_ADDRESS / a local cluster)
    num_cpus: float = 1.0  # per point
    num_gpus: float = 0.0  # per point
    max_retries: int = 2  # reruns of a point whose worker died (not of a point that raised)


def run_folder(out: Path, key: str) -> Path:
    return out / "runs" / key


def run_local(points: Points, paths: Paths, out: Path, tags: dict[str, str], desc: str) -> dict[str, dict]:
    """Each point in this process, one after another (finished ones are found in out/runs/<key>)."""
    return {key: train(cfg, dataclasses.replace(paths, out=run_folder(out, key)), tags=tags)
            for key, cfg in tqdm(points, desc=desc)}


# ---------------------------------------------------------------------------------------------
# Checks before anything trains
# ---------------------------------------------------------------------------------------------


def tracking_problem() -> str | None:
    """Why this process cannot use the tracking server, or None. One quick request, no retries."""
    uri = tracking.configure()
    if urlparse(uri).scheme not in ("http", "https"):
        return (f"MLFLOW_TRACKING_URI is {uri}: Ray workers need a tracking server they all reach;"
                " start `mlflow server` and set MLFLOW_TRACKING_URI=http://HOST:5000 (README)")
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="30")
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
        return None
    except Exception as exc:  # noqa: BLE001 - refused, unreachable, bad answer: all say the same to the user
        text = f"{type(exc).__name__}: {str(exc)[:300]}"
        hint = (" (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
                if any(code in text for code in ("401", "403", "nauthorized")) else "")
        return f"the MLflow tracking server at {uri} refused or did not answer{hint}: {text}"
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _check_address(address: str) -> None:
    """A dead host:port makes ray.init wait for minutes: try the TCP port first."""
    target = address.removeprefix("ray://")
    if not target or target == "auto" or ":" not in target:
        return
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise DrscalingError(f"no Ray cluster answers at {address} ({exc}): start one with `ray start --head`"
                             " (README) or fix --ray-address (params.yaml sweep.ray / index.ray)") from None


def _probe(uri: str, paths: Paths, versions: dict[str, str]) -> tuple[str, list[str]]:
    """On one node: can it import this code, reach the tracking server, and does it hold the same data?
    (`versions`: each source's data key without an init checkpoint; a point checks its own on start.)"""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    problems = [p for p in [tracking_problem()] if p]
    for source, version in versions.items():
        try:
            if data_key(paths, source) != version:
                problems.append(f"its {source} annotations or prepared splits differ from the driver's (dvc pull)")
        except OSError as exc:
            problems.append(f"cannot read the data ({exc}): dvc pull there (README)")
    return socket.gethostname(), problems


@contextlib.contextmanager
def connect(address: str) -> Iterator[object]:
    """The `ray` module connected to the cluster at `address` ("" : RAY_ADDRESS, else a local cluster);
    a dead address is a clear error at once. Disconnects on exit."""
    _check_address(address)
    import ray

    try:
        ray.init(address=address or None, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: no cluster
        raise DrscalingError(f"cannot connect to the Ray cluster at {address or 'auto'}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def ray_cluster(cfg: RayConfig, paths: Paths, versions: dict[str, str]) -> Iterator[object]:
    """Connect to the cluster after checking the tracking server, the address, and every node."""
    problem = tracking_problem()
    if problem:
        raise DrscalingError(problem)
    with connect(cfg.address) as ray:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(_probe)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        checks = ray.get([probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                          .remote(tracking.configure(), paths, versions) for n in nodes])
        bad = [f"{host}: {'; '.join(problems)}" for host, problems in checks if problems]
        if bad:
            raise DrscalingError("Ray nodes not ready for the sweep:\n  " + "\n  ".join(bad))
        yield ray


# ---------------------------------------------------------------------------------------------
# Finished points on the tracking server
# ---------------------------------------------------------------------------------------------


def finished_point(key: str, version: str) -> dict | None:
    """The result of a FINISHED training run of this config on this data, wherever it ran."""
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True, output_format="list", max_results=5, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.config_key = '{key}' and tags.data_key = '{version}' and attributes.status = 'FINISHED'"
                      " and tags.`drscaling.stage` = 'train'")
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=METRICS_FILE, dst_path=tmp)
            except Exception:  # noqa: BLE001 - a run from before results were logged: not usable
                continue
            return read_json(path)
    return None


def keep_locally(result: dict, folder: Path) -> dict:
    """out/runs/<key>/ as the local executor leaves it (model/ + metrics.json): `fit`, `export
    --from-sweep` and the local cache then see a point that trained on another machine."""
    done = folder / METRICS_FILE
    if done.exists() and all(read_json(done).get(k) == result.get(k) for k in ("config_key", "data_key")):
        return result
    import mlflow

    shutil.rmtree(folder / "model", ignore_errors=True)  # a model trained on other data or init weights
    folder.mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="model", dst_path=str(folder))
    write_json(done, result)
    return result


# ---------------------------------------------------------------------------------------------
# One point on a worker
# ---------------------------------------------------------------------------------------------


def _point_runs(client, key: str, parent_id: str, status: str = "") -> list:
    state = f" and attributes.status = '{status}'" if status else ""
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.config_key = '{key}' and tags.mlflow.parentRunId = '{parent_id}'"
                                     f" and tags.`drscaling.stage` = 'train'{state}")


def _train_point(cfg: TrainConfig, paths: Paths, tags: dict[str, str], uri: str, experiment: str,
                 parent_id: str, version: str, study: str | None = None) -> dict:
    """A Ray task: train one point as a child run of the sweep's parent run. `version`: the point's
    data key as the driver computed it (data + named init checkpoint), the one train() tags its run with."""
    _use_assigned_cpus()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["DRSCALING_EXPERIMENT"] = experiment
    if study:  # its models register under the study's name, as on the driver (registry.registered_name)
        os.environ["DRSCALING_STUDY"] = study
    tracking.configure()
    import mlflow

    client = mlflow.MlflowClient()
    key, host = cfg.key(), socket.gethostname()
    for orphan in _point_runs(client, key, parent_id, "RUNNING"):  # left by a worker that died
        client.set_tag(orphan.info.run_id, "error", f"worker died; retried by Ray on {host}")
        client.set_terminated(orphan.info.run_id, "KILLED")
    try:
        if run_data_key(paths, cfg) != version:
            raise DrscalingError(f"{host} holds other data or other init checkpoint weights ({cfg.init}) than the"
                                 " sweep's driver: `dvc pull` there, copy the checkpoint (README)")
        return train(cfg, paths, tags=tags | {"mlflow.parentRunId": parent_id, "ray_node": host})
    except Exception as exc:
        if not _point_runs(client, key, parent_id):  # failed before its run started: record it FAILED
            run = client.create_run(client.get_run(parent_id).info.experiment_id, run_name=f"{cfg.shape} (failed)", tags={
                "mlflow.parentRunId": parent_id, "drscaling.stage": "train", "config_key": key, "data_key": version,
                "shape": cfg.shape, "source": cfg.annotation_source, "ray_node": host,
                "error": f"{type(exc).__name__}: {exc}"[:5000]})
            client.set_terminated(run.info.run_id, "FAILED")
        raise


def _use_assigned_cpus() -> None:
    """Train on as many threads as the task holds CPUs. Ray sets OMP_NUM_THREADS per task, but torch reads
    it once, at import: a reused worker that imported torch for an earlier task (the node probe holds no
    CPU, so OMP_NUM_THREADS=1) trained a 2-CPU point on one thread, 1.3-1.5x slower (BENCHMARKS.md)."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def _run_keys(points: Points, paths: Paths, starts: dict[str, Start], hashed: dict[str, dict[str, str]]) -> dict[str, str]:
    """The key train() tags each run with (init checkpoint and, for scratch shapes, the shared tokenizer
    included): the same point on every machine. Each input is hashed once per sweep, not per point."""
    cache: dict[tuple[str, bool], dict[str, str]] = {}
    keys = {}
    for key, c in points:
        shared = uses_shared_tokenizer(starts[key].shape, starts[key].load or "")
        if (c.annotation_source, shared) not in cache:
            cache[(c.annotation_source, shared)] = (data_versions(paths, c.annotation_source, starts[key]) if shared
                                                    else hashed[c.annotation_source])
        keys[key] = data_key(paths, c.annotation_source, starts[key], cache[(c.annotation_source, shared)])
    return keys


def run_ray(points: Points, paths: Paths, out: Path, tags: dict[str, str], cfg: RayConfig, desc: str,
            parent_id: str, experiment: str, starts: dict[str, Start] | None = None) -> dict[str, dict]:
    """Every point not yet finished on the tracking server as a Ray task; results keyed like run_local's.
    `starts`: each point's resolved init checkpoint, by config key (resolved here when not given)."""
    paths = dataclasses.replace(paths, prepared=paths.prepared.resolve(), annotations=paths.annotations.resolve(),
                                tokenizer=paths.tokenizer.resolve())
    out = out.resolve()  # workers run elsewhere: every path they get is absolute (same layout on every node)
    hashed = {s: data_versions(paths, s) for s in sorted({c.annotation_source for _, c in points})}
    sources = {s: data_key(paths, s, versions=v) for s, v in hashed.items()}  # each node's data check
    starts = starts or {key: resolve_start(c.shape, c.init) for key, c in points}
    versions = _run_keys(points, paths, starts, hashed)
    results: dict[str, dict] = {}
    with ray_cluster(cfg, paths, sources) as ray:
        for key, c in points:
            found = finished_point(key, versions[key])
            if found:
                results[key] = keep_locally(found, run_folder(out, key)) | {"cached": True}
        task = ray.remote(_train_point).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                                max_retries=cfg.max_retries, retry_exceptions=False)
        uri = tracking.configure()
        refs = {task.remote(c, dataclasses.replace(paths, out=run_folder(out, key)), tags, uri, experiment, parent_id,
                            versions[key], tracking.study_name()): key for key, c in points if key not in results}
        failures: dict[str, str] = {}
        with tqdm(total=len(points), initial=len(results), desc=desc) as bar:
            pending = list(refs)
            while pending:
                [ref], pending = ray.wait(pending, num_returns=1)
                key = refs[ref]
                try:
                    results[key] = keep_locally(ray.get(ref), run_folder(out, key))
                except ray.exceptions.RayError as exc:
                    failures[key] = str(exc).strip().splitlines()[-1][:500]
                bar.update()
    if failures:
        lines = [f"{dict(points)[k].shape} D={dict(points)[k].train_pairs} ({k}): {why}" for k, why in failures.items()]
        raise DrscalingError(f"{len(failures)} of {len(points)} points failed (their MLflow runs say why; the others"
                             " are finished and will not train again):\n  " + "\n  ".join(lines))
    return results
